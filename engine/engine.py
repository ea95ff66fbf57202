"""`RerankEngine`: scores (query, document) pairs exactly as the official Qwen3-VL-Reranker.

Two phases, so CPU work overlaps the device (a replica runs `prepare` on a CPU pool while
`forward` runs the previous batch):

    prepared = engine.prepare(request, cached_features)   # CPU; the only place input errors arise
    results = engine.forward([prepared, ...])             # device; one call per dynamic batch

`score` does both for one request. The vision path is split from the decoder: `forward` returns
the features of every image it encoded, so a cache can feed them back to `prepare` later.

score = sigmoid(logit("yes") - logit("no")) at the last token, computed in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path

import torch

from engine.config import DecodeBudgets, EngineConfig
from engine.errors import ModelLoadError
from engine.features import FeatureSpec, ImageFeatures
from engine.fingerprint import checkpoint_fingerprint
from engine.forward import Forward, RequestScores
from engine.inputs import ImageInput, RerankItem, ScoreRequest
from engine.model import LoadedModel, chat_template_of, checkpoint_folder, load_model
from engine.prepare import PreparedRequest, Preparer
from engine.score_key import ScoreSpec
from engine.vision import VisionParams, VisionPreprocessor
from engine.vision_tower import VisionTower

# Families whose video path is not implemented, and why (a request with a video gets this, naming the field).
VIDEO_REFUSAL = {
    "lychee": "video is not supported for lychee-rerank-mm: Qwen2.5-VL renders videos without Qwen3-VL's per-frame "
    "timestamps and needs its own temporal positions, which this engine does not implement yet; send frames as images",
}


def score_settings(cfg: EngineConfig, vision: VisionParams, **more: object) -> dict[str, object]:
    """The engine settings a score depends on (`engine.score_key`): all of `cfg` but its decode
    budgets (they refuse a request, never change a score), the image limits in force, and `more`."""
    settings: dict[str, object] = cfg.model_dump(exclude=set(DecodeBudgets.model_fields))
    return {**settings, "min_pixels": vision.min_pixels, "max_pixels": vision.max_pixels, **more}


def device_name(device: torch.device) -> str:
    """What a replica runs on, as the placement planner names devices: the GPU's CUDA name, or cpu."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class RerankEngine:
    def __init__(self, loaded: LoadedModel, tokenizer, cfg: EngineConfig, *, model_id: str):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.model_id = model_id
        self.precision = loaded.precision
        self.device = loaded.device
        hf_cfg = self.model.config
        image_token_id, video_token_id = int(hf_cfg.image_token_id), int(hf_cfg.video_token_id)
        self.yes_id, self.no_id = self._answer_token_ids()
        self.chat_template = chat_template_of(tokenizer, loaded.folder, loaded.source)
        self.folder = folder = loaded.folder or checkpoint_folder(loaded.source)
        try:
            self.vision_params = VisionParams.from_checkpoint(folder, cfg, loaded.family)
        except ValueError as e:
            raise ModelLoadError(f"model: {e}") from None
        self.preprocessor = VisionPreprocessor(
            self.vision_params, max_image_bytes=cfg.max_image_bytes, max_image_pixels=cfg.max_image_pixels, max_video_frames=cfg.max_video_file_frames
        )
        tower = VisionTower(self.model.model.visual, loaded.family, self.device)
        self.feature_spec = FeatureSpec(
            vision_fingerprint=tower.fingerprint(),
            vision_precision=tower.dtype_name,
            min_pixels=self.vision_params.min_pixels,
            max_pixels=self.vision_params.max_pixels,
        )
        self.preparer = Preparer(
            cfg, tokenizer, self.chat_template, self.preprocessor, self.feature_spec, self._rope_index,
            image_token_id=image_token_id, video_token_id=video_token_id, video_refusal=VIDEO_REFUSAL.get(loaded.family),
        )  # fmt: skip
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.forwarder = Forward(
            self.model, tower, device=self.device, feature_spec=self.feature_spec, yes_id=self.yes_id, no_id=self.no_id,
            pad_id=pad, image_token_id=image_token_id, video_token_id=video_token_id, max_batch_tokens=cfg.max_batch_tokens,
        )  # fmt: skip

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def load(cls, source: str, precision: str, *, config: EngineConfig | None = None, device: str = "auto", model_id: str | None = None) -> RerankEngine:
        """Load a checkpoint (local folder or hub id) at `precision`. The engine never builds a
        model: make the offline one first (`workshop.tiny.ensure_tiny_model`)."""
        from transformers import AutoTokenizer

        loaded = load_model(source, precision, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:
            raise ModelLoadError(f"model: cannot load the tokenizer of {source!r}: {e}") from None
        return cls(loaded, tokenizer, config or EngineConfig(), model_id=model_id or source)

    def _answer_token_ids(self) -> tuple[int, int]:
        ids = []
        for word in ("yes", "no"):
            toks = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                raise ModelLoadError(f"model: tokenizer splits {word!r} into {len(toks)} tokens; the reranker needs one")
            ids.append(toks[0])
        return ids[0], ids[1]

    def _rope_index(self, ids: torch.Tensor, mm: torch.Tensor, image_grid: torch.Tensor | None, video_grid: torch.Tensor | None) -> torch.Tensor:
        """Multimodal rotary positions (3, 1, L) of one whole pair: the model's own function (pure)."""
        positions, _ = self.model.model.get_rope_index(ids, mm_token_type_ids=mm, image_grid_thw=image_grid, video_grid_thw=video_grid)
        return positions

    def describe(self) -> dict:
        return {
            "model": self.model_id,
            "family": self.loaded.family,
            "precision": self.precision,
            "device": str(self.device),
            "device_name": device_name(self.device),
            "compute_dtype": str(self.loaded.compute_dtype).removeprefix("torch."),
            "vision_fingerprint": self.feature_spec.vision_fingerprint,
            "share_prefix": self.cfg.share_prefix,
            "weights_fingerprint": self.score_spec.weights_fingerprint,
            "scorer": self.score_spec.digest,
        }

    @cached_property
    def score_spec(self) -> ScoreSpec:
        """What besides the pair determines a score (`engine.score_key`); the checkpoint is hashed
        on first use (a replica does it at start)."""
        settings = score_settings(self.cfg, self.vision_params, family=self.loaded.family, compute_dtype=str(self.loaded.compute_dtype))
        return ScoreSpec.of(checkpoint_fingerprint(Path(self.folder)), self.precision, "transformers", settings)

    # ---- the two phases -----------------------------------------------------------------------

    def prepare(self, request: ScoreRequest, features: Mapping[str, ImageFeatures] | None = None) -> PreparedRequest:
        return self.preparer.prepare(request, features)

    def forward(self, prepared: Sequence[PreparedRequest]) -> list[RequestScores]:
        return self.forwarder.run(prepared)

    # ---- conveniences -------------------------------------------------------------------------

    def score(self, query: RerankItem | str, documents: Sequence[RerankItem | str], instruction: str | None = None) -> list[float]:
        return self.forward([self.prepare(ScoreRequest.of(query, documents, instruction))])[0].scores

    def score_requests(self, requests: Sequence[ScoreRequest], features: Mapping[str, ImageFeatures] | None = None) -> list[RequestScores]:
        return self.forward([self.prepare(r, features) for r in requests])

    def encode_images(self, images: Sequence[ImageInput]) -> list[ImageFeatures]:
        """Decode, resize and run the ViT on images; one `ImageFeatures` each, in order."""
        patches = [self.preprocessor.image(img.data or b"", img.field) for img in images]
        return self.forwarder.tower.features(patches, [img.digest for img in images], self.feature_spec)

    def render_prompt(self, query: RerankItem, document: RerankItem, instruction: str | None = None) -> str:
        """The chat-templated text of a pair, one placeholder per image/video (before expansion)."""
        return self.preparer.render_pair(query, document, instruction)
