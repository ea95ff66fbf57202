"""CPU pre-processing of images and videos into the patch tensors the vision tower reads.

Kept apart from the model step so it can run while the accelerator works. Images go through
transformers' PIL-backed Qwen2-VL image processor (no torchvision needed); video frames are
sampled as the reference (qwen-vl-utils) does and patchified with the same layout the Qwen3-VL
video processor uses, written here because that processor requires torchvision.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

from serve.engine.errors import ImageDecodeError, ImageTooLarge, InputError
from serve.engine.inputs import VideoInput, decode_image


@dataclass(frozen=True)
class VisionParams:
    """The checkpoint's image-processor settings plus our (configurable) pixel limits."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int
    video_max_pixels: int
    video_fps: float
    video_max_frames: int

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_checkpoint(cls, folder: Path, *, min_pixels: int, max_pixels: int, video_max_pixels: int, video_fps: float, video_max_frames: int) -> VisionParams:
        cfg_path = folder / "preprocessor_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        return cls(
            patch_size=int(cfg.get("patch_size", 16)),
            temporal_patch_size=int(cfg.get("temporal_patch_size", 2)),
            merge_size=int(cfg.get("merge_size", 2)),
            image_mean=tuple(cfg.get("image_mean", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
            image_std=tuple(cfg.get("image_std", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            video_max_pixels=video_max_pixels,
            video_fps=video_fps,
            video_max_frames=video_max_frames,
        )


@dataclass(frozen=True)
class PixelPatches:
    """Flattened patches of one image or video, ready for the vision tower."""

    pixel_values: torch.Tensor  # (t*h*w, C*temporal*patch*patch)
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...] = ()  # video: seconds, one per temporal group

    def tokens_per_frame(self, merge_size: int) -> int:
        return self.grid_thw[1] * self.grid_thw[2] // (merge_size**2)


class VisionPreprocessor:
    def __init__(self, params: VisionParams, *, max_image_bytes: int, max_image_pixels: int):
        self.params = params
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self._image_processor = Qwen2VLImageProcessorPil(
            patch_size=params.patch_size,
            temporal_patch_size=params.temporal_patch_size,
            merge_size=params.merge_size,
            image_mean=list(params.image_mean),
            image_std=list(params.image_std),
            min_pixels=params.min_pixels,
            max_pixels=params.max_pixels,
        )

    def decode(self, data: bytes, field: str) -> Image.Image:
        return decode_image(data, field_name=field, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels)

    def image(self, data: bytes, field: str) -> PixelPatches:
        img = self.decode(data, field)
        try:
            out = self._image_processor(images=[img], return_tensors="pt")
        except ValueError as e:  # e.g. aspect ratio over 200
            raise InputError(field, f"image cannot be resized: {e}") from None
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        return PixelPatches(out["pixel_values"].to(torch.float32), (t, h, w))

    def video(self, video: VideoInput, field: str) -> PixelPatches:
        p = self.params
        frames, indices, fps = self._sample_frames(video, field)
        w0, h0 = frames[0].size
        max_px = max(p.video_max_pixels, p.min_pixels)
        h, w = smart_resize(h0, w0, factor=p.factor, min_pixels=p.min_pixels, max_pixels=max_px)
        arr = np.stack([np.asarray(f.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0 for f in frames])
        arr = (arr - np.asarray(p.image_mean, np.float32)) / np.asarray(p.image_std, np.float32)
        arr = arr.transpose(0, 3, 1, 2)  # T, C, H, W
        pixel_values, grid = patchify_video(arr, p.patch_size, p.temporal_patch_size, p.merge_size)
        return PixelPatches(torch.from_numpy(pixel_values), grid, frame_timestamps(indices, fps, p.temporal_patch_size))

    def _sample_frames(self, video: VideoInput, field: str) -> tuple[list[Image.Image], list[int], float]:
        p = self.params
        if video.frames:
            images = [self.decode(b, f"{field}.frames.{i}") for i, b in enumerate(video.frames)]
            native_fps = video.fps or p.video_fps
            idx = sample_frame_indices(len(images), native_fps, native_fps, p.video_max_frames, p.temporal_patch_size)
            frames = [images[i] for i in idx]
        else:
            frames_all, native_fps = decode_video_file(video.data or b"", field, self.max_image_pixels)
            idx = sample_frame_indices(len(frames_all), native_fps, p.video_fps, p.video_max_frames, p.temporal_patch_size)
            frames = [frames_all[i] for i in idx]
        if len({f.size for f in frames}) != 1:
            raise InputError(field, "all video frames must have the same size")
        return frames, idx, native_fps


def sample_frame_indices(total: int, native_fps: float, fps: float, max_frames: int, multiple: int = 2, min_frames: int = 4) -> list[int]:
    """Frame indices as qwen-vl-utils (`smart_nframes`) samples them: `fps` per second of video,
    between `min_frames` and `max_frames`, a multiple of the temporal patch size, spread evenly
    from the first to the last frame."""
    if total < 1:
        raise ValueError("video has no frames")
    lo = math.ceil(min_frames / multiple) * multiple
    hi = math.floor(min(max_frames, total) / multiple) * multiple
    n = min(max(total / native_fps * fps, lo), hi, total)
    n = math.floor(n / multiple) * multiple
    if n < multiple:  # a clip shorter than one temporal patch: keep every frame, patchify pads
        return list(range(total))
    return [int(x) for x in np.rint(np.linspace(0, total - 1, n))]


def frame_timestamps(indices: list[int], fps: float, temporal: int) -> tuple[float, ...]:
    """Seconds of each temporal group: mean of its first and last frame time, as Qwen3-VL renders them."""
    idx = list(indices)
    while len(idx) % temporal:
        idx.append(idx[-1])
    t = [i / fps for i in idx]
    return tuple((t[i] + t[i + temporal - 1]) / 2 for i in range(0, len(t), temporal))


def patchify_video(frames: np.ndarray, patch: int, temporal: int, merge: int) -> tuple[np.ndarray, tuple[int, int, int]]:
    """(T, C, H, W) normalised frames -> (groups*gh*gw, C*temporal*patch*patch), Qwen2/3-VL order."""
    t, c, h, w = frames.shape
    if t % temporal:
        frames = np.concatenate([frames, np.repeat(frames[-1:], temporal - t % temporal, axis=0)])
        t = frames.shape[0]
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * temporal * patch * patch), dtype=np.float32), (gt, gh, gw)


def decode_video_file(data: bytes, field: str, max_pixels: int) -> tuple[list[Image.Image], float]:
    """Decode every frame of an encoded video (PyAV). The frame count is bounded by the byte limit upstream."""
    try:
        import av  # optional dependency: only video files need it
    except ImportError:
        raise InputError(field, "video files need the 'av' package on the server; send frames instead") from None
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 24)
            frames = []
            for frame in container.decode(stream):
                if frame.width * frame.height > max_pixels:
                    raise ImageTooLarge(field, f"video frame is {frame.width}x{frame.height}, over {max_pixels} pixels")
                frames.append(frame.to_image().convert("RGB"))
    except InputError:
        raise
    except Exception as e:
        raise ImageDecodeError(field, f"not a decodable video ({type(e).__name__}: {e})") from None
    if not frames:
        raise ImageDecodeError(field, "video has no frames")
    return frames, fps if math.isfinite(fps) and fps > 0 else 24.0
