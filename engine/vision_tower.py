"""`VisionTower`: a checkpoint's vision encoder (ViT + merger + deepstack mergers) as a unit of its
own: image/video patches in, `(pooled tokens, deepstack features)` out.

The transformers engine runs the one inside its model (`Forward`). The vLLM backend loads it alone
(`VisionTower.load`: only the `visual` weights are read) so that it can compute image features
the shared feature cache keeps and hand them to vLLM as embeddings. Both name their features with
the same `fingerprint` (the vision weights, bit for bit), so arms that run the same vision weights
at the same dtype share cache entries whatever their backend.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from engine.errors import ModelLoadError
from engine.features import FeatureSpec, ImageFeatures
from engine.vision import PixelPatches

VIT_PATCH_BUDGET = 65536  # patches per vision-tower call
# Where a Qwen3-VL checkpoint keeps its vision weights: transformers >= 4.52 nests them under
# `model.`, older exports (and the original release format) at the top.
VISUAL_PREFIXES = ("model.visual.", "visual.")


class VisionTower:
    def __init__(self, visual: torch.nn.Module, family: str, device: torch.device):
        self.visual = visual
        self.family = family
        self.device = device
        self.dtype = next(visual.parameters()).dtype

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def fingerprint(self) -> str:
        """Hash of the family and every vision weight (names and bytes): features are reusable
        exactly between towers with equal fingerprints (and equal dtypes, which the cache key adds)."""
        h = hashlib.sha256(self.family.encode())
        for name, p in sorted(self.visual.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:32]

    @torch.inference_mode()
    def encode(self, patches: Sequence[PixelPatches]) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """Features of several images/videos (fp32, on the CPU), in calls of at most
        `VIT_PATCH_BUDGET` patches; attention stays within each image."""
        out: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []
        chunk: list[PixelPatches] = []
        for p in [*patches, None]:
            if p is None or (chunk and sum(c.pixel_values.shape[0] for c in chunk) + p.pixel_values.shape[0] > VIT_PATCH_BUDGET):
                out.extend(self._run(chunk))
                chunk = []
            if p is not None:
                chunk.append(p)
        return out

    def features(self, patches: Sequence[PixelPatches], digests: Sequence[str], spec: FeatureSpec) -> list[ImageFeatures]:
        """`ImageFeatures` of each patched image (or video), named by its digest under `spec`."""
        computed = self.encode(patches) if patches else []
        return [ImageFeatures(e, d, p.grid_thw, spec, digest) for p, digest, (e, d) in zip(patches, digests, computed)]

    def _run(self, patches: Sequence[PixelPatches]) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        if not patches:
            return []
        pixel_values = torch.cat([p.pixel_values for p in patches]).to(self.device, self.dtype)
        grid = torch.tensor([p.grid_thw for p in patches], dtype=torch.long, device=self.device)
        out = self.visual(pixel_values, grid_thw=grid, return_dict=True)
        merge = self.visual.spatial_merge_size**2
        sizes = [math.prod(p.grid_thw) // merge for p in patches]
        embeds = torch.split(out.pooler_output.float().cpu(), sizes)
        deep = getattr(out, "deepstack_features", None) or []
        deep_split = [torch.split(d.float().cpu(), sizes) for d in deep]
        return [(embeds[i], tuple(d[i] for d in deep_split)) for i in range(len(patches))]

    @classmethod
    def load(cls, source: str, folder: Path, dtype: torch.dtype, device: torch.device) -> VisionTower:
        """The vision tower of a Qwen3-VL checkpoint alone: built from its `vision_config`, its
        weights read from the checkpoint's safetensors (nothing else is loaded). A checkpoint whose
        vision weights are quantized (not plain tensors) is refused: features must come from the
        weights the official model runs."""
        from safetensors import safe_open
        from transformers import AutoConfig
        from transformers.initialization import no_init_weights
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        try:
            config = AutoConfig.from_pretrained(source)
        except Exception as e:
            raise ModelLoadError(f"model: cannot read the config of {source!r}: {type(e).__name__}: {e}") from None
        if config.model_type != "qwen3_vl":
            raise ModelLoadError(f"model: a vision tower alone loads from Qwen3-VL checkpoints; {source!r} is {config.model_type!r}")
        files = _safetensors_files(source, folder)
        state: dict[str, torch.Tensor] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    prefix = next((p for p in VISUAL_PREFIXES if key.startswith(p)), None)
                    if prefix is not None:
                        state[key[len(prefix) :]] = f.get_tensor(key)
        # Built in place without random initialisation (every weight is then loaded; the rotary
        # frequencies, computed at construction, are not stored in checkpoints).
        with no_init_weights(), device:
            visual = Qwen3VLVisionModel._from_config(config.vision_config, dtype=dtype)
        expected = set(visual.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise ModelLoadError(
                f"model: the vision weights of {source!r} do not match a plain Qwen3-VL vision tower "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}); quantized vision towers cannot feed the feature cache"
            )
        visual.load_state_dict(state)
        return cls(visual.eval(), "qwen3-vl", device)


def _safetensors_files(source: str, folder: Path) -> list[Path]:
    """The checkpoint's safetensors files holding vision weights (a sharded checkpoint: only the
    shards its index names for them), downloaded from the hub when `source` is a hub id."""
    index_path = folder / "model.safetensors.index.json"
    if not Path(source).is_dir():
        from huggingface_hub import hf_hub_download, snapshot_download

        try:
            index_path = Path(hf_hub_download(source, "model.safetensors.index.json"))
        except Exception:
            return [Path(snapshot_download(source, allow_patterns=["model.safetensors"])) / "model.safetensors"]
        folder = index_path.parent
        names = _visual_shards(index_path)
        snapshot_download(source, allow_patterns=names)
        return [folder / n for n in names]
    if index_path.exists():
        return [folder / n for n in _visual_shards(index_path)]
    single = folder / "model.safetensors"
    if not single.exists():
        raise ModelLoadError(f"model: {folder} has no model.safetensors (or index)")
    return [single]


def _visual_shards(index_path: Path) -> list[str]:
    weight_map = json.loads(index_path.read_text()).get("weight_map", {})
    return sorted({f for k, f in weight_map.items() if k.startswith(VISUAL_PREFIXES)})
