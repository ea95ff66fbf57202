"""`EngineConfig`: everything that shapes how the engine prepares and scores, in one frozen value.

Plain data (no pydantic, no YAML): the serving layer validates its own typed config at the edge
and builds this from it (`serve.config.FleetConfig.engine_config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.prompt import DEFAULT_INSTRUCTION

# Official Qwen3-VL-Reranker pixel limits: 4*32*32 .. 1800*32*32.
DEFAULT_MIN_PIXELS = 4 * 32 * 32
DEFAULT_MAX_PIXELS = 1800 * 32 * 32


@dataclass(frozen=True)
class EngineConfig:
    # Tokens of a pair's body (all but the final 5); longer bodies lose ordinary tokens from their
    # end. The official reranker's MAX_LENGTH: a pair has at most 10240 + 5 tokens.
    max_length: int = 10240
    min_pixels: int = DEFAULT_MIN_PIXELS  # image area after resize
    max_pixels: int = DEFAULT_MAX_PIXELS
    video_fps: float = 1.0
    video_max_frames: int = 64
    video_max_pixels: int = 768 * 32 * 32
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
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must not exceed max_pixels ({self.max_pixels})")
