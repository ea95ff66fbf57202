"""The engine's settings, each declared once, here, with its constraint and description.

- `ModelSettings`: how the model reads a pair (a fleet config's `model:` section sets these).
- `DecodeBudgets`: what one request may cost to decode (its `limits:` section sets these).
- `EngineConfig`: both, plus the few limits fixed by the official code; what an engine runs with.
- `VllmSettings`: the vLLM arguments an arm with `backend: vllm` may set (its `vllm:` block).

Frozen pydantic models: an invalid value is refused where it is set, naming the field. The
serving layer reuses these classes in its config (`serve.config`) rather than mirroring them; the
engine itself reads no YAML and knows nothing of serving.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.prompt import DEFAULT_INSTRUCTION

# Official Qwen3-VL-Reranker limits (QwenLM/Qwen3-VL-Embedding `qwen3_vl_reranker.py`; factor 32 =
# patch 16 x merge 2) and the qwen-vl-utils 0.0.14 defaults its calls leave in force.
FACTOR = 32
DEFAULT_MIN_PIXELS = 4 * FACTOR * FACTOR  # MIN_PIXELS
DEFAULT_MAX_PIXELS = 1800 * FACTOR * FACTOR  # MAX_PIXELS
VIDEO_MIN_PIXELS = 128 * FACTOR * FACTOR  # qwen-vl-utils VIDEO_MIN_TOKEN_NUM (the reranker passes no video minimum)
VIDEO_MAX_PIXELS = 768 * FACTOR * FACTOR  # FRAME_MAX_PIXELS = qwen-vl-utils VIDEO_MAX_TOKEN_NUM
VIDEO_TOTAL_PIXELS = 10 * VIDEO_MAX_PIXELS  # MAX_TOTAL_PIXELS: passed for frame-list videos only
VIDEO_FILE_TOTAL_PIXELS = int(128000 * FACTOR * FACTOR * 0.9)  # qwen-vl-utils' default (MODEL_SEQ_LEN 128000): files


class Settings(BaseModel):
    """Frozen, and an unknown name is an error (a typo never passes silently)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(Settings):
    max_length: int = Field(
        10240, ge=64, description="Tokens of a pair's body (all but its final 5), as the official reranker's MAX_LENGTH; "
        "longer bodies lose ordinary tokens from their end, special and vision tokens are kept.",
    )
    min_pixels: int | None = Field(
        None, ge=1, description="Smallest image area after resize; default: the model's official limit "
        f"(Qwen3-VL-Reranker {DEFAULT_MIN_PIXELS}; lychee-rerank-mm: its checkpoint's processor).",
    )
    max_pixels: int | None = Field(
        None, ge=1, description="Largest image area after resize; default: the model's official limit "
        f"(Qwen3-VL-Reranker {DEFAULT_MAX_PIXELS}; lychee-rerank-mm: its checkpoint's processor).",
    )
    video_fps: float = Field(1.0, gt=0, description="Frames sampled per second of a video file (official FPS).")
    video_max_frames: int = Field(
        64, ge=2, description="Most frames sampled from a video file, and kept from a frame list (official MAX_FRAMES)."
    )
    video_min_pixels: int = Field(VIDEO_MIN_PIXELS, ge=1, description="Smallest area of one video frame after resize (qwen-vl-utils).")
    video_max_pixels: int = Field(VIDEO_MAX_PIXELS, ge=1, description="Largest area of one video frame after resize (official FRAME_MAX_PIXELS).")
    video_total_pixels: int = Field(
        VIDEO_TOTAL_PIXELS, ge=1, description="Largest area of a frame-list video's frames together (official MAX_TOTAL_PIXELS)."
    )
    default_instruction: str = Field(DEFAULT_INSTRUCTION, min_length=1, description="Instruction when a request gives none.")
    max_batch_tokens: int = Field(
        16384, ge=64, description="Token budget of one engine micro-batch: shared prefix + rows x longest remainder."
    )
    share_prefix: bool = Field(True, description="Run the tokens every pair of a request shares (system turn, instruction, query) once.")

    @model_validator(mode="after")
    def _pixels_ordered(self):
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
        return self


class DecodeBudgets(Settings):
    """Bounds on the CPU and memory one request can cost, checked before any model work."""

    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1, description="Encoded bytes of one image.")
    max_image_pixels: int = Field(32 * 1024 * 1024, ge=1, description="Decoded pixels of one image or video frame (decompression-bomb guard).")
    max_request_pixels: int = Field(
        128 * 1024 * 1024, ge=1, description="Decoded pixels of all images and video frames of one request (decode budget)."
    )
    max_video_file_frames: int = Field(4096, ge=1, description="Frames a video file may have (counted before decoding).")


class EngineConfig(ModelSettings, DecodeBudgets):
    """Everything that shapes how the engine prepares and scores, in one frozen value."""

    video_file_total_pixels: int = Field(
        VIDEO_FILE_TOTAL_PIXELS, ge=1, description="Largest area of a video file's sampled frames together (qwen-vl-utils' default)."
    )
    frame_list_fps: float = Field(2.0, gt=0, description="Timestamps of frame lists given without an fps (qwen-vl-utils' sample_fps).")
    min_shared_tokens: int = Field(
        16, ge=1, description="Shared-prefix scoring runs the shared tokens once when at least this many are shared by 2+ pairs."
    )

    @classmethod
    def of(cls, model: ModelSettings, budgets: DecodeBudgets) -> EngineConfig:
        """The engine's config from the two sections that set it (subclasses' own fields left out)."""
        return cls(**model.model_dump(include=set(ModelSettings.model_fields)), **budgets.model_dump(include=set(DecodeBudgets.model_fields)))


class VllmSettings(Settings):
    """vLLM engine arguments an arm may set (`engine.vllm_engine.engine_args` passes them on)."""

    block_size: int = Field(32, ge=1, description="KV-cache block size: 32 lets the ~80-token shared system+instruction prefix hit the prefix cache (128 never does).")
    enable_prefix_caching: bool = Field(True, description="vLLM's automatic prefix caching (the shared prompt head is computed once).")
    max_num_batched_tokens: int | None = Field(None, ge=1, description="Tokens per engine step (chunked prefill); default: vLLM's.")
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences per engine step; default: vLLM's.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="Share of GPU memory vLLM reserves (weights + KV cache).")
    cpu_kvcache_space_gib: int = Field(1, ge=1, description="KV-cache size on vLLM's CPU backend.")
    enforce_eager: bool = Field(False, description="Skip torch.compile and graphs: faster start, slower steady state.")
    max_model_len: int | None = Field(None, ge=64, description="Longest pair vLLM accepts; default: the checkpoint's.")
    vision_encoder: Literal["project", "vllm"] = Field(
        "project", description="project: the checkpoint's vision tower runs in the replica and vLLM gets its features as embeddings, "
        "through the shared feature cache (a repeated image skips the ViT across replicas and restarts); vllm: raw images, vLLM's own "
        "vision tower and per-engine encoder cache.",
    )
