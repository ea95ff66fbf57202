"""`ImageFeatures`: the vision tower's output for one image, reusable across requests.

A cached entry must never be used by a model it does not belong to, so the key hashes the
image bytes together with everything that changes the value: the vision weights'
fingerprint, the vision tower's precision and the pixel limits used to resize.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = "1"


class FeatureDecodeError(ValueError):
    """Bytes that are not a serialized ImageFeatures of this format (e.g. a corrupt cache entry)."""


@dataclass(frozen=True)
class FeatureSpec:
    """What, besides the image bytes, determines the features."""

    vision_fingerprint: str
    vision_precision: str
    min_pixels: int
    max_pixels: int

    def cache_key(self, image_digest: str) -> str:
        parts = [FORMAT_VERSION, image_digest, self.vision_fingerprint, self.vision_precision, str(self.min_pixels), str(self.max_pixels)]
        return "imgfeat:" + hashlib.sha256("|".join(parts).encode()).hexdigest()


@dataclass(frozen=True)
class ImageFeatures:
    """Pooled (merged) visual tokens, the deepstack features per injection layer, and the patch grid."""

    embeds: torch.Tensor  # (tokens, text_hidden)
    deepstack: tuple[torch.Tensor, ...]  # each (tokens, text_hidden)
    grid_thw: tuple[int, int, int]  # (t, h, w) in patches, before the spatial merge
    spec: FeatureSpec
    image_digest: str

    @property
    def num_tokens(self) -> int:
        return int(self.embeds.shape[0])

    @property
    def cache_key(self) -> str:
        return self.spec.cache_key(self.image_digest)

    def to_bytes(self) -> bytes:
        tensors = {"embeds": self.embeds.contiguous()}
        tensors.update({f"deepstack.{i}": t.contiguous() for i, t in enumerate(self.deepstack)})
        meta = {
            "format": FORMAT_VERSION,
            "grid_thw": json.dumps(list(self.grid_thw)),
            "image_digest": self.image_digest,
            "vision_fingerprint": self.spec.vision_fingerprint,
            "vision_precision": self.spec.vision_precision,
            "min_pixels": str(self.spec.min_pixels),
            "max_pixels": str(self.spec.max_pixels),
        }
        return st_save(tensors, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes) -> ImageFeatures:
        try:
            tensors = st_load(data)
            meta = _read_metadata(data)
            if meta.get("format") != FORMAT_VERSION:
                raise FeatureDecodeError(f"unknown format {meta.get('format')!r}")
            n_deep = sum(1 for k in tensors if k.startswith("deepstack."))
            spec = FeatureSpec(
                vision_fingerprint=meta["vision_fingerprint"],
                vision_precision=meta["vision_precision"],
                min_pixels=int(meta["min_pixels"]),
                max_pixels=int(meta["max_pixels"]),
            )
            grid = tuple(int(x) for x in json.loads(meta["grid_thw"]))
            feats = cls(
                embeds=tensors["embeds"],
                deepstack=tuple(tensors[f"deepstack.{i}"] for i in range(n_deep)),
                grid_thw=grid,  # type: ignore[arg-type]
                spec=spec,
                image_digest=meta["image_digest"],
            )
        except FeatureDecodeError:
            raise
        except (SafetensorError, KeyError, ValueError, TypeError, json.JSONDecodeError) as e:
            raise FeatureDecodeError(f"not serialized ImageFeatures: {type(e).__name__}: {e}") from None
        if len(grid) != 3 or any(t.shape != feats.embeds.shape for t in feats.deepstack):
            raise FeatureDecodeError("inconsistent shapes in serialized ImageFeatures")
        return feats

    def matches(self, spec: FeatureSpec, image_digest: str) -> bool:
        return self.spec == spec and self.image_digest == image_digest


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors layout: u64 little-endian header length, then a JSON header with "__metadata__".
    if len(data) < 8:
        raise FeatureDecodeError("too short")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or 8 + n > len(data):
        raise FeatureDecodeError("bad header length")
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__") or {})
