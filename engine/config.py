"""`EngineConfig`: everything that shapes how the engine prepares and scores, in one frozen value.

Plain data (no pydantic, no YAML): the serving layer validates its own typed config at the edge
and builds this from it (`serve.config.FleetConfig.engine_config`).
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class EngineConfig:
    # Tokens of a pair's body (all but the final 5); longer bodies lose ordinary tokens from their
    # end. The official reranker's MAX_LENGTH: a pair has at most 10240 + 5 tokens.
    max_length: int = 10240
    # Image area after resize. None: the model family's official limits (Qwen3-VL-Reranker's
    # constants above; lychee-rerank-mm's from its checkpoint's preprocessor_config.json).
    min_pixels: int | None = None
    max_pixels: int | None = None
    video_fps: float = 1.0  # frames sampled per second of a video file (official FPS)
    video_max_frames: int = 64  # official MAX_FRAMES: files sample at most this many; frame lists keep this many
    video_min_pixels: int = VIDEO_MIN_PIXELS  # area of one frame after resize, at least
    video_max_pixels: int = VIDEO_MAX_PIXELS  # and at most
    video_total_pixels: int = VIDEO_TOTAL_PIXELS  # a frame-list video's frames together, at most
    video_file_total_pixels: int = VIDEO_FILE_TOTAL_PIXELS  # a video file's sampled frames together, at most
    frame_list_fps: float = 2.0  # timestamps of frame lists given without an fps (qwen-vl-utils' sample_fps)
    default_instruction: str = DEFAULT_INSTRUCTION
    max_batch_tokens: int = 16384  # one decoder micro-batch: shared prefix + rows x longest suffix
    # Decode budgets: bound the CPU and memory one request can cost before any model work.
    max_image_bytes: int = 20 * 1024 * 1024  # encoded bytes of one image
    max_image_pixels: int = 32 * 1024 * 1024  # decoded pixels of one image or video frame
    max_request_pixels: int = 128 * 1024 * 1024  # decoded pixels of every image and frame of one request
    max_video_frames: int = 4096  # frames a video file may have (counted before decoding)
    # Shared-prefix scoring: the tokens every pair of a request shares (system turn, instruction,
    # query) run through the decoder once when at least this many are shared by 2+ pairs.
    share_prefix: bool = True
    min_shared_tokens: int = 16

    def __post_init__(self):
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
