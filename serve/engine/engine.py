"""`RerankEngine`: scores (query, document) pairs exactly as the official Qwen3-VL-Reranker.

The vision path is split from the decoder so that an image's features can be computed once,
cached (see `ImageFeatures`) and reused: `encode_images` runs the ViT, `score_pairs` consumes
precomputed features and fuses them into the decoder input the way the model's own forward
does (placeholder scatter, deepstack injection, multimodal RoPE).

score = sigmoid(logit("yes") - logit("no")) at the last token, computed in fp32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from serve.config import ModelConfig
from serve.engine.errors import InputError, ModelLoadError
from serve.engine.features import FeatureSpec, ImageFeatures
from serve.engine.inputs import ImageRef, RerankItem, ScorePair, VideoInput, check_not_empty, image_digest
from serve.engine.model import LoadedModel, load_model
from serve.engine.prompt import QWEN3_VL_CHAT_TEMPLATE, VisionSlot, build_messages, expand_vision_placeholders, truncate_keeping_final
from serve.engine.vision import PixelPatches, VisionParams, VisionPreprocessor

log = logging.getLogger(__name__)

IMAGE, VIDEO = 1, 2  # mm_token_type_ids values, as the HF processors emit them


@dataclass
class EncodedPair:
    """One pair as token ids plus the visual features its placeholder runs consume, in order."""

    input_ids: list[int]
    mm_types: list[int]
    visuals: list[ImageFeatures] = field(default_factory=list)  # images and videos, in order of appearance
    kinds: list[int] = field(default_factory=list)  # IMAGE or VIDEO per visual

    def __len__(self) -> int:
        return len(self.input_ids)


def resolve_source(source: str) -> str:
    if source == "tiny":
        from serve.engine.tiny import ensure_tiny_model

        return str(ensure_tiny_model())
    return source


class RerankEngine:
    def __init__(self, loaded: LoadedModel, tokenizer, model_cfg: ModelConfig, *, max_image_bytes: int, max_image_pixels: int, model_id: str):
        self.loaded = loaded
        self.model = loaded.model
        self.tokenizer = tokenizer
        self.cfg = model_cfg
        self.model_id = model_id
        self.precision = loaded.precision
        self.device = loaded.device
        hf_cfg = self.model.config
        self.image_token_id = int(hf_cfg.image_token_id)
        self.video_token_id = int(hf_cfg.video_token_id)
        self.yes_id, self.no_id = self._answer_token_ids()
        self.chat_template = self._chat_template()
        folder = loaded.folder or Path(_hub_folder(loaded.source))
        self.vision_params = VisionParams.from_checkpoint(
            folder,
            min_pixels=model_cfg.min_pixels,
            max_pixels=model_cfg.max_pixels,
            video_max_pixels=model_cfg.video_max_pixels,
            video_fps=model_cfg.video_fps,
            video_max_frames=model_cfg.video_max_frames,
        )
        self.preprocessor = VisionPreprocessor(self.vision_params, max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels)
        self.visual = self.model.model.visual
        self.vision_dtype = next(self.visual.parameters()).dtype
        self.feature_spec = FeatureSpec(
            vision_fingerprint=self._vision_fingerprint(),
            vision_precision=str(self.vision_dtype).removeprefix("torch."),
            min_pixels=model_cfg.min_pixels,
            max_pixels=model_cfg.max_pixels,
        )
        self._keep_tokens = set(self.tokenizer.all_special_ids) | {self.image_token_id, self.video_token_id}
        self._tail_len = len(self.tokenizer("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
        # One forward at a time: replicas call from a worker thread; torch modules are not re-entrant.
        self._lock = threading.Lock()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model: ModelConfig,
        precision: str,
        *,
        checkpoint: str | None = None,
        device: str = "auto",
        max_image_bytes: int = 20 * 1024 * 1024,
        max_image_pixels: int = 64 * 1024 * 1024,
    ) -> RerankEngine:
        from transformers import AutoTokenizer

        source = resolve_source(checkpoint or model.source)
        loaded = load_model(source, precision, device)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:
            raise ModelLoadError(f"model: cannot load the tokenizer of {source!r}: {e}") from None
        tokenizer.padding_side = "left"
        model_id = "tiny-qwen3-vl-reranker" if model.source == "tiny" and checkpoint is None else (checkpoint or model.source)
        return cls(loaded, tokenizer, model, max_image_bytes=max_image_bytes, max_image_pixels=max_image_pixels, model_id=model_id)

    def _answer_token_ids(self) -> tuple[int, int]:
        ids = []
        for word in ("yes", "no"):
            toks = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                raise ModelLoadError(f"model: tokenizer splits {word!r} into {len(toks)} tokens; the reranker needs one")
            ids.append(toks[0])
        return ids[0], ids[1]

    def _chat_template(self) -> str:
        tpl = getattr(self.tokenizer, "chat_template", None)
        if tpl:
            return tpl
        folder = self.loaded.folder
        if folder is not None:
            for name in ("chat_template.jinja", "chat_template.json"):
                p = folder / name
                if p.exists():
                    return p.read_text() if name.endswith(".jinja") else json.loads(p.read_text())["chat_template"]
        log.warning("no chat template in %s; using the built-in Qwen3-VL template", self.loaded.source)
        return QWEN3_VL_CHAT_TEMPLATE

    def _vision_fingerprint(self) -> str:
        h = hashlib.sha256(self.loaded.family.encode())
        for name, p in sorted(self.visual.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:32]

    def describe(self) -> dict:
        return {
            "model": self.model_id,
            "family": self.loaded.family,
            "precision": self.precision,
            "device": str(self.device),
            "compute_dtype": str(self.loaded.compute_dtype).removeprefix("torch."),
            "vision_fingerprint": self.feature_spec.vision_fingerprint,
        }

    # ---- public API ---------------------------------------------------------------------------

    def score(self, query: RerankItem, documents: Sequence[RerankItem], instruction: str | None = None) -> list[float]:
        pairs = [ScorePair(query, d, instruction, "query", f"documents.{i}") for i, d in enumerate(documents)]
        return self.score_pairs(pairs)

    def render_prompt(self, pair: ScorePair) -> str:
        """The chat-templated text of a pair, one placeholder per image/video (before expansion)."""
        instruction = pair.instruction or self.cfg.default_instruction
        messages = build_messages(pair.query, pair.document, instruction)
        return self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True)

    def encode_images(self, images: Sequence[bytes], fields: Sequence[str] | None = None) -> list[ImageFeatures]:
        """Run decode, resize and the ViT on encoded images; one `ImageFeatures` each, in order."""
        fields = list(fields) if fields is not None else [f"images.{i}" for i in range(len(images))]
        patches = [self.preprocessor.image(b, f) for b, f in zip(images, fields)]
        feats = self._run_vision(patches)
        return [
            ImageFeatures(embeds=e, deepstack=d, grid_thw=p.grid_thw, spec=self.feature_spec, image_digest=image_digest(b))
            for b, p, (e, d) in zip(images, patches, feats)
        ]

    def score_pairs(self, pairs: Sequence[ScorePair], image_features: Mapping[str, ImageFeatures] | None = None) -> list[float]:
        """Scores in input order. Images missing from `image_features` (cache_key -> features) are encoded here."""
        if not pairs:
            return []
        for p in pairs:
            check_not_empty(p.query, p.query_field)
            check_not_empty(p.document, p.document_field)
        # Hash each image once per call (a query image recurs in every pair), and run each video's
        # ViT once however many pairs share it.
        image_keys = {data: self.feature_spec.cache_key(image_digest(data)) for p in pairs for item in (p.query, p.document) for data in item.images}
        features = self._resolve_images(pairs, dict(image_features or {}), image_keys)
        videos: dict[VideoInput, tuple[ImageFeatures, PixelPatches]] = {}
        encoded = [self._encode_pair(p, features, image_keys=image_keys, videos=videos) for p in pairs]
        scores: list[float] = [0.0] * len(pairs)
        for batch in self.plan_batches([len(e) for e in encoded]):
            out = self._score_batch([encoded[i] for i in batch])
            for i, s in zip(batch, out):
                scores[i] = s
        return scores

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Micro-batches of indices, sorted by length to cut padding, each within the token budget
        (rows x longest row <= max_batch_tokens; a single over-budget pair goes alone)."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
        batches: list[list[int]] = []
        current: list[int] = []
        for i in order:
            longest = lengths[i]  # ascending order: the newcomer is the longest
            if current and longest * (len(current) + 1) > self.cfg.max_batch_tokens:
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    # ---- vision -------------------------------------------------------------------------------

    @torch.inference_mode()
    def _run_vision(self, patches: Sequence[PixelPatches]) -> list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]]:
        """ViT over several images/videos at once (attention stays within each: cu_seqlens)."""
        if not patches:
            return []
        pixel_values = torch.cat([p.pixel_values for p in patches]).to(self.device, self.vision_dtype)
        grid = torch.tensor([p.grid_thw for p in patches], dtype=torch.long, device=self.device)
        with self._lock:
            out = self.visual(pixel_values, grid_thw=grid, return_dict=True)
        merge = self.visual.spatial_merge_size**2
        sizes = [math.prod(p.grid_thw) // merge for p in patches]
        embeds = torch.split(out.pooler_output.float().cpu(), sizes)
        deep = getattr(out, "deepstack_features", None) or []
        deep_split = [torch.split(d.float().cpu(), sizes) for d in deep]
        return [(embeds[i], tuple(d[i] for d in deep_split)) for i in range(len(patches))]

    def _resolve_images(
        self, pairs: Sequence[ScorePair], features: dict[str, ImageFeatures], image_keys: Mapping[bytes | ImageRef, str]
    ) -> dict[str, ImageFeatures]:
        todo: dict[str, tuple[bytes | ImageRef, str]] = {}
        for p in pairs:
            for item, fld in ((p.query, p.query_field), (p.document, p.document_field)):
                for j, data in enumerate(item.images):
                    key = image_keys[data]
                    if key not in features and key not in todo:
                        todo[key] = (data, f"{fld}.images.{j}")
        for key, (data, fld) in todo.items():
            if isinstance(data, ImageRef):
                raise InputError(data.field or fld, "image known only by its digest has no cached features; send its bytes")
        if todo:
            keys = list(todo)
            computed = self.encode_images([todo[k][0] for k in keys], [todo[k][1] for k in keys])
            features.update(zip(keys, computed))
        return features

    def _video_features(self, video: VideoInput, fld: str) -> tuple[ImageFeatures, PixelPatches]:
        patches = self.preprocessor.video(video, f"{fld}.video")
        (e, d) = self._run_vision([patches])[0]
        return ImageFeatures(e, d, patches.grid_thw, self.feature_spec, "video"), patches

    # ---- text ---------------------------------------------------------------------------------

    def _encode_pair(
        self,
        pair: ScorePair,
        features: Mapping[str, ImageFeatures],
        text: str | None = None,
        *,
        image_keys: Mapping[bytes | ImageRef, str] | None = None,
        videos: dict[VideoInput, tuple[ImageFeatures, PixelPatches]] | None = None,
    ) -> EncodedPair:
        """Token ids of a pair; `text` overrides the rendered prompt (the tiny model's training curriculum).
        `image_keys` (bytes -> cache key) and `videos` (memo of video features) are shared across the
        pairs of one call; without them each is computed here."""
        text = text if text is not None else self.render_prompt(pair)
        videos = {} if videos is None else videos
        slots: list[VisionSlot] = []
        visuals: list[ImageFeatures] = []
        kinds: list[int] = []
        merge = self.vision_params.merge_size**2
        for item, fld in ((pair.query, pair.query_field), (pair.document, pair.document_field)):
            if item.video is not None:  # videos render first, as in the reference
                if item.video not in videos:
                    videos[item.video] = self._video_features(item.video, fld)
                feats, patches = videos[item.video]
                slots.append(VisionSlot("video", patches.tokens_per_frame(self.vision_params.merge_size), patches.timestamps))
                visuals.append(feats)
                kinds.append(VIDEO)
            for data in item.images:
                key = image_keys[data] if image_keys is not None else self.feature_spec.cache_key(image_digest(data))
                feats = features[key]
                t, h, w = feats.grid_thw
                slots.append(VisionSlot("image", t * h * w // merge))
                visuals.append(feats)
                kinds.append(IMAGE)
        text = expand_vision_placeholders(text, slots)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > self.cfg.max_length:
            cut = truncate_keeping_final(ids, self.cfg.max_length, self._keep_tokens, self._tail_len)
            if cut is None:
                raise InputError(pair.document_field, f"images/video need more than max_length={self.cfg.max_length} tokens")
            ids = cut
        mm = [IMAGE if t == self.image_token_id else VIDEO if t == self.video_token_id else 0 for t in ids]
        return EncodedPair(ids, mm, visuals, kinds)

    # ---- decoder ------------------------------------------------------------------------------

    def collate(self, rows: Sequence[EncodedPair]) -> dict[str, torch.Tensor]:
        """Left-padded ids, attention mask and multimodal token types of a micro-batch."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        mm = torch.zeros((len(rows), width), dtype=torch.int)
        for r, row in enumerate(rows):
            n = len(row)
            ids[r, width - n :] = torch.tensor(row.input_ids)
            mask[r, width - n :] = 1
            mm[r, width - n :] = torch.tensor(row.mm_types, dtype=torch.int)
        return {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": mm}

    @torch.inference_mode()
    def _score_batch(self, rows: Sequence[EncodedPair]) -> list[float]:
        batch = {k: v.to(self.device) for k, v in self.collate(rows).items()}
        with self._lock:
            hidden = self._decoder_last_hidden(batch, rows)
        return self._yes_no_scores(hidden)

    def _decoder_last_hidden(self, batch: dict[str, torch.Tensor], rows: Sequence[EncodedPair]) -> torch.Tensor:
        """The fused forward with precomputed visual features; mirrors Qwen3VLModel.forward."""
        core = self.model.model
        ids, mask, mm = batch["input_ids"], batch["attention_mask"], batch["mm_token_type_ids"]
        embeds = core.get_input_embeddings()(ids)
        visuals = [v for r in rows for v in r.visuals]  # row-major = order of the placeholder runs
        kinds = [k for r in rows for k in r.kinds]
        lm_kwargs: dict = {}
        image_grid = video_grid = None
        if visuals:
            # Images and videos interleave in order of appearance, so one scatter over the joint mask
            # places each run where the model's separate image/video scatters would.
            vis_mask = (ids == self.image_token_id) | (ids == self.video_token_id)
            flat = torch.cat([v.embeds for v in visuals]).to(embeds.device, embeds.dtype)
            if int(vis_mask.sum()) != flat.shape[0]:
                raise RuntimeError(f"{int(vis_mask.sum())} visual tokens but {flat.shape[0]} features")
            embeds = embeds.masked_scatter(vis_mask.unsqueeze(-1), flat)
            if visuals[0].deepstack:
                lm_kwargs["visual_pos_masks"] = vis_mask
                lm_kwargs["deepstack_visual_embeds"] = [
                    torch.cat([v.deepstack[layer] for v in visuals]).to(embeds.device, embeds.dtype) for layer in range(len(visuals[0].deepstack))
                ]
            img = [v.grid_thw for v, k in zip(visuals, kinds) if k == IMAGE]
            vid = [v.grid_thw for v, k in zip(visuals, kinds) if k == VIDEO]
            image_grid = torch.tensor(img, dtype=torch.long, device=ids.device) if img else None
            video_grid = torch.tensor(vid, dtype=torch.long, device=ids.device) if vid else None
        rope_kwargs = {}
        if self.loaded.family == "lychee" and video_grid is not None:
            rope_kwargs["second_per_grid_ts"] = torch.full((video_grid.shape[0],), self.vision_params.temporal_patch_size / self.vision_params.video_fps)
        position_ids, _ = core.get_rope_index(
            ids, mm_token_type_ids=mm, image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=mask, **rope_kwargs
        )
        out = core.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, use_cache=False, **lm_kwargs)
        return out.last_hidden_state[:, -1]  # left padding: the last column is every row's final token

    def _yes_no_scores(self, last_hidden: torch.Tensor) -> list[float]:
        head = self.model.lm_head
        weight = getattr(head, "weight", None)
        if isinstance(head, torch.nn.Linear) and weight is not None and weight.dtype.is_floating_point:
            rows = weight[[self.yes_id, self.no_id]].float()
            logits = last_hidden.float() @ rows.T
        else:  # a quantized head (only if configured): read its output, then go to fp32
            logits = head(last_hidden)[:, [self.yes_id, self.no_id]].float()
        return torch.sigmoid(logits[:, 0] - logits[:, 1]).tolist()

    @torch.inference_mode()
    def fused_scores(self, pairs: Sequence[ScorePair]) -> list[float]:
        """Reference path for tests: the model's own forward from pixel values, one pair at a time,
        no precomputed features (images only)."""
        out = []
        for p in pairs:
            images = [b for item in (p.query, p.document) for b in item.images]
            patches = [self.preprocessor.image(b, "image") for b in images]
            grids_only = {
                self.feature_spec.cache_key(image_digest(b)): ImageFeatures(torch.empty(0), (), pp.grid_thw, self.feature_spec, image_digest(b))
                for b, pp in zip(images, patches)
            }
            batch = {k: v.to(self.device) for k, v in self.collate([self._encode_pair(p, grids_only)]).items()}
            if patches:
                batch["pixel_values"] = torch.cat([pp.pixel_values for pp in patches]).to(self.device, self.vision_dtype)
                batch["image_grid_thw"] = torch.tensor([pp.grid_thw for pp in patches], device=self.device)
            logits = self.model(**batch, use_cache=False, logits_to_keep=1).logits[:, -1].float()
            out.append(float(torch.sigmoid(logits[0, self.yes_id] - logits[0, self.no_id])))
        return out


def _hub_folder(source: str) -> str:
    from huggingface_hub import snapshot_download

    return snapshot_download(source, allow_patterns=["*.json"])
