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

from engine.errors import ImageDecodeError, ImageTooLarge, InputError
from engine.inputs import VideoInput


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


class PixelBudget:
    """Decoded pixels one request may still spend (`EngineConfig.max_request_pixels`): every image
    and video frame is charged from its header, before its pixels are decoded."""

    def __init__(self, limit: int):
        self.limit = limit
        self.spent = 0

    def charge(self, pixels: int, field: str) -> None:
        self.spent += pixels
        if self.spent > self.limit:
            raise ImageTooLarge(field, f"the request's images and frames decode to over {self.limit} pixels (max_request_pixels)")


class VisionPreprocessor:
    def __init__(self, params: VisionParams, *, max_image_bytes: int, max_image_pixels: int, max_video_frames: int = 4096):
        self.params = params
        self.max_image_bytes = max_image_bytes
        self.max_image_pixels = max_image_pixels
        self.max_video_frames = max_video_frames
        self._image_processor = Qwen2VLImageProcessorPil(
            patch_size=params.patch_size,
            temporal_patch_size=params.temporal_patch_size,
            merge_size=params.merge_size,
            image_mean=list(params.image_mean),
            image_std=list(params.image_std),
            min_pixels=params.min_pixels,
            max_pixels=params.max_pixels,
        )

    def charge(self, data: bytes, field: str, budget: PixelBudget) -> None:
        """Charge an image's decoded size to `budget` from its header (its limits checked too)."""
        w, h = open_image(data, field_name=field, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels).size
        budget.charge(w * h, field)

    def decode(self, data: bytes, field: str, budget: PixelBudget | None = None) -> Image.Image:
        return decode_image(data, field_name=field, max_bytes=self.max_image_bytes, max_pixels=self.max_image_pixels, budget=budget)

    def image(self, data: bytes, field: str, budget: PixelBudget | None = None) -> PixelPatches:
        img = resize_as_reference(self.decode(data, field, budget), self.params, field)
        try:
            out = self._image_processor(images=[img], return_tensors="pt")
        except ValueError as e:  # e.g. aspect ratio over 200
            raise InputError(field, f"image cannot be resized: {e}") from None
        t, h, w = (int(x) for x in out["image_grid_thw"][0])
        return PixelPatches(out["pixel_values"].to(torch.float32), (t, h, w))

    def video(self, video: VideoInput, field: str, budget: PixelBudget | None = None) -> PixelPatches:
        p = self.params
        frames, indices, fps = self._sample_frames(video, field, budget)
        w0, h0 = frames[0].size
        max_px = max(p.video_max_pixels, p.min_pixels)
        try:
            h, w = smart_resize(h0, w0, factor=p.factor, min_pixels=p.min_pixels, max_pixels=max_px)
        except ValueError as e:  # e.g. aspect ratio over 200
            raise InputError(field, f"video frames cannot be resized: {e}") from None
        arr = np.stack([np.asarray(f.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0 for f in frames])
        arr = (arr - np.asarray(p.image_mean, np.float32)) / np.asarray(p.image_std, np.float32)
        arr = arr.transpose(0, 3, 1, 2)  # T, C, H, W
        pixel_values, grid = patchify_video(arr, p.patch_size, p.temporal_patch_size, p.merge_size)
        return PixelPatches(torch.from_numpy(pixel_values), grid, frame_timestamps(indices, fps, p.temporal_patch_size))

    def _sample_frames(self, video: VideoInput, field: str, budget: PixelBudget | None) -> tuple[list[Image.Image], list[int], float]:
        p = self.params
        if video.frames:
            native_fps = video.fps or p.video_fps
            idx = sample_frame_indices(len(video.frames), native_fps, native_fps, p.video_max_frames, p.temporal_patch_size)
            # Only the sampled frames are decoded.
            frames = [self.decode(video.frames[i].data or b"", f"{field}.{i}", budget) for i in idx]
        else:
            frames, idx, native_fps = decode_sampled_video(video.data or b"", field, self, budget)
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


def decode_sampled_video(data: bytes, field: str, pre: VisionPreprocessor, budget: PixelBudget | None) -> tuple[list[Image.Image], list[int], float]:
    """Sample a video file's frames while decoding it (PyAV): the frame count comes from the
    container (or a packet count, which decodes nothing), the indices are chosen first, and only
    those frames are kept, so memory holds at most the sampled frames. A video with more than
    `max_video_frames` frames, or whose decoded frames would exceed the pixel limits, is refused
    before its frames are decoded."""
    p = pre.params
    try:
        import av  # optional dependency: only video files need it
    except ImportError:
        raise InputError(field, "video files need the 'av' package on the server; send frames instead") from None
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 24)
            fps = fps if math.isfinite(fps) and fps > 0 else 24.0
            width, height = stream.codec_context.width, stream.codec_context.height
            if width < 1 or height < 1:
                raise ImageDecodeError(field, f"video stream declares no frame size ({width}x{height})")
            if width * height > pre.max_image_pixels:
                raise ImageTooLarge(field, f"video frames are {width}x{height}, over the limit of {pre.max_image_pixels} pixels")
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            if total > pre.max_video_frames:
                raise ImageTooLarge(field, f"video has {total} frames, over the limit of {pre.max_video_frames} (max_video_frames)")
            if total < 1:
                raise ImageDecodeError(field, "video has no frames")
            # Every frame is decoded (codecs need the ones before), so all of them are charged.
            if budget is not None:
                budget.charge(total * width * height, field)
            wanted = sample_frame_indices(total, fps, p.video_fps, p.video_max_frames, p.temporal_patch_size)
            keep = set(wanted)
            container.seek(0)
            frames: dict[int, Image.Image] = {}
            decoded = 0
            for i, frame in enumerate(container.decode(stream)):
                decoded = i + 1
                # The budget was charged at the declared size: a stream whose frames grow is refused.
                if (frame.width, frame.height) != (width, height):
                    raise ImageDecodeError(field, f"video frame {i} is {frame.width}x{frame.height}, not the declared {width}x{height}")
                if i in keep:
                    frames[i] = frame.to_image().convert("RGB")
                if i >= wanted[-1] or i + 1 >= total:
                    break
    except InputError:
        raise
    except Exception as e:
        raise ImageDecodeError(field, f"not a decodable video ({type(e).__name__}: {e})") from None
    if not frames:
        raise ImageDecodeError(field, "video has no frames")
    if len(frames) < len(wanted):
        # The container over-reported its frame count: sample the frames it really has, each
        # index served by the nearest frame that was kept.
        kept = sorted(frames)
        wanted = [min(kept, key=lambda k: abs(k - w)) for w in sample_frame_indices(decoded, fps, p.video_fps, p.video_max_frames, p.temporal_patch_size)]
    return [frames[i] for i in wanted], wanted, fps


def open_image(data: bytes, *, field_name: str, max_bytes: int, max_pixels: int) -> Image.Image:
    """Open encoded bytes (header only: no pixels decoded yet), refusing oversize input."""
    if len(data) > max_bytes:
        raise ImageTooLarge(field_name, f"image is {len(data)} bytes, over the limit of {max_bytes}")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
    except Exception as e:  # PIL raises many types for corrupt data
        raise ImageDecodeError(field_name, f"not a decodable image ({type(e).__name__}: {e})") from None
    if w < 1 or h < 1:
        raise ImageDecodeError(field_name, f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise ImageTooLarge(field_name, f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (max_image_pixels)")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as qwen-vl-utils makes it (`to_rgb`): RGBA composited onto white through its alpha;
    every other mode converted by PIL (which ignores the transparency of P and LA)."""
    if img.mode == "RGBA":
        white = Image.new("RGB", img.size, (255, 255, 255))
        white.paste(img, mask=img.split()[3])
        return white
    return img.convert("RGB")


MAX_ASPECT_RATIO = 200  # qwen-vl-utils' MAX_RATIO


def reference_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) as qwen-vl-utils' `smart_resize` computes them: multiples of `factor`, the
    area within [min_pixels, max_pixels], a side never under `factor` (its `max(factor, ...)`)."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"absolute aspect ratio must be smaller than {MAX_ASPECT_RATIO}, got {max(height, width) / min(height, width):.1f}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
        if h < factor or w < factor:  # qwen-vl-utils would pass a zero side on: refuse instead
            raise ValueError(f"a {width}x{height} image has a side under {factor} px within max_pixels={max_pixels}")
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def resize_as_reference(img: Image.Image, params: VisionParams, field: str) -> Image.Image:
    """The official pipeline resizes each image with PIL before the processor sees it
    (qwen-vl-utils `fetch_image`: `image.resize((w, h))`, PIL's default filter); the processor then
    finds its size already fitting and leaves it."""
    width, height = img.size
    try:
        h, w = reference_size(height, width, params.factor, params.min_pixels, params.max_pixels)
    except ValueError as e:
        raise InputError(field, f"image cannot be resized: {e}") from None
    return img if (w, h) == img.size else img.resize((w, h))


def decode_image(data: bytes, *, field_name: str, max_bytes: int, max_pixels: int, budget: PixelBudget | None = None) -> Image.Image:
    """Decode bytes to an RGB image; the limits (and `budget`) are checked from the header first."""
    img = open_image(data, field_name=field_name, max_bytes=max_bytes, max_pixels=max_pixels)
    if budget is not None:
        budget.charge(img.size[0] * img.size[1], field_name)
    try:
        img.load()  # the first frame of an animated image
        return to_rgb(img)
    except Exception as e:
        raise ImageDecodeError(field_name, f"not a decodable image ({type(e).__name__}: {e})") from None
