"""CPU pre-processing of images and videos into the patch tensors the vision tower reads.

Kept apart from the model step so it can run while the accelerator works. Each step follows the
official pipeline (the reranker's calls into qwen-vl-utils 0.0.14, then the Qwen3-VL processor):
images are sized by qwen-vl-utils' `smart_resize` and go through transformers' PIL-backed
Qwen2-VL image processor; videos are sampled, sized, resized (torchvision's bicubic, re-stated in
torch because torchvision has no CPU build here), normalised and patchified as qwen-vl-utils and
the Qwen3-VL video processor do. `tests/engine/test_parity_video.py` holds each against them.
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
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from engine.config import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, EngineConfig
from engine.errors import ImageDecodeError, ImageTooLarge, InputError
from engine.image_header import PixelBudget, open_image
from engine.inputs import VideoInput


@dataclass(frozen=True)
class VisionParams:
    """The checkpoint's image-processor settings plus the pixel and frame limits in force."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    min_pixels: int
    max_pixels: int
    video_fps: float
    video_max_frames: int
    video_min_pixels: int
    video_max_pixels: int
    video_total_pixels: int
    video_file_total_pixels: int
    frame_list_fps: float

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_checkpoint(cls, folder: Path, cfg: EngineConfig, family: str) -> VisionParams:
        """Patch geometry from the checkpoint's preprocessor_config.json; image limits from `cfg`,
        or where `cfg` leaves them unset the family's official ones: Qwen3-VL-Reranker's constants,
        or for lychee-rerank-mm (Qwen2.5-VL) the limits its checkpoint's processor declares."""
        cfg_path = folder / "preprocessor_config.json"
        pre = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        if family == "lychee":
            size = pre.get("size") or {}
            default_min = int(pre.get("min_pixels") or size.get("shortest_edge") or QWEN2_5_VL_MIN_PIXELS)
            default_max = int(pre.get("max_pixels") or size.get("longest_edge") or QWEN2_5_VL_MAX_PIXELS)
        else:
            default_min, default_max = DEFAULT_MIN_PIXELS, DEFAULT_MAX_PIXELS
        min_pixels = cfg.min_pixels if cfg.min_pixels is not None else default_min
        max_pixels = cfg.max_pixels if cfg.max_pixels is not None else default_max
        if min_pixels > max_pixels:
            raise ValueError(f"min_pixels ({min_pixels}) must not exceed max_pixels ({max_pixels})")
        return cls(
            patch_size=int(pre.get("patch_size", 16)),
            temporal_patch_size=int(pre.get("temporal_patch_size", 2)),
            merge_size=int(pre.get("merge_size", 2)),
            image_mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
            image_std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
            min_pixels=min_pixels,
            max_pixels=max_pixels,
            video_fps=cfg.video_fps,
            video_max_frames=cfg.video_max_frames,
            video_min_pixels=cfg.video_min_pixels,
            video_max_pixels=cfg.video_max_pixels,
            video_total_pixels=cfg.video_total_pixels,
            video_file_total_pixels=cfg.video_file_total_pixels,
            frame_list_fps=cfg.frame_list_fps,
        )


# Qwen2.5-VL's image processor defaults, for a lychee checkpoint that declares no limits.
QWEN2_5_VL_MIN_PIXELS = 56 * 56
QWEN2_5_VL_MAX_PIXELS = 28 * 28 * 1280


@dataclass(frozen=True)
class PixelPatches:
    """Flattened patches of one image or video, ready for the vision tower."""

    pixel_values: torch.Tensor  # (t*h*w, C*temporal*patch*patch)
    grid_thw: tuple[int, int, int]
    timestamps: tuple[float, ...] = ()  # video: seconds, one per temporal group

    def tokens_per_frame(self, merge_size: int) -> int:
        return self.grid_thw[1] * self.grid_thw[2] // (merge_size**2)


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
        """A video as the official pipeline makes it: qwen-vl-utils' `fetch_video` (frames picked,
        each frame's area bounded by the per-frame limits and the whole video's pixel cap, resized
        by torchvision's bicubic), then the Qwen3-VL video processor (with `do_resize=False`):
        rescale and normalise fused, patchify, one timestamp per temporal group."""
        p = self.params
        if video.frames:
            frames, indices, fps = self._frame_list(video, field, budget)
            total_pixels = p.video_total_pixels
        else:
            frames, indices, fps = decode_sampled_video(video.data or b"", field, self, budget)
            total_pixels = p.video_file_total_pixels
        w0, h0 = frames[0].size
        max_px = max(min(p.video_max_pixels, total_pixels / len(frames) * FRAME_FACTOR), int(p.video_min_pixels * 1.05))
        try:
            h, w = reference_size(h0, w0, p.factor, p.video_min_pixels, max_px)
        except ValueError as e:  # e.g. aspect ratio over 200
            raise InputError(field, f"video frames cannot be resized: {e}") from None
        mean = torch.tensor([m * (1 / RESCALE) for m in p.image_mean], dtype=torch.float32)[:, None, None]
        std = torch.tensor([s * (1 / RESCALE) for s in p.image_std], dtype=torch.float32)[:, None, None]
        temporal = p.temporal_patch_size
        frames = frames + [frames[-1]] * (-len(frames) % temporal)  # the processor pads with the last frame
        grid = (len(frames) // temporal, h // p.patch_size, w // p.patch_size)
        per_group = grid[1] * grid[2]
        pixel_values = torch.empty((grid[0] * per_group, 3 * temporal * p.patch_size**2), dtype=torch.float32)
        # One temporal group at a time: memory holds the output and two float frames, never the whole float video.
        for g in range(grid[0]):
            group = torch.stack([resize_like_torchvision(frame_tensor(f), h, w) for f in frames[g * temporal : (g + 1) * temporal]])
            pixel_values[g * per_group : (g + 1) * per_group] = patchify_video((group - mean) / std, p.patch_size, temporal, p.merge_size)[0]
        return PixelPatches(pixel_values, grid, frame_timestamps(indices, fps, temporal))

    def _frame_list(self, video: VideoInput, field: str, budget: PixelBudget | None) -> tuple[list[Image.Image], list[int], float]:
        """A video given as frames, as the official reranker and qwen-vl-utils take it: every frame
        up to `video_max_frames`, more picked by `linspace` (rounded down); each frame resized by
        `fetch_image` on its own first (qwen-vl-utils passes its factor as the patch size there, so
        sides snap to multiples of twice the factor); an odd count padded with the last frame;
        timestamps at `frame_list_fps` (2.0, qwen-vl-utils' sample_fps) unless the video gives one."""
        p = self.params
        snap = 2 * p.factor
        frames = []
        for i in frame_list_indices(len(video.frames), p.video_max_frames):
            img = self.decode(video.frames[i].data or b"", f"{field}.{i}", budget)  # only the kept frames are decoded
            try:
                h, w = reference_size(img.height, img.width, snap, 4 * snap * snap, 16384 * snap * snap)
            except ValueError as e:
                raise InputError(f"{field}.{i}", f"video frame cannot be resized: {e}") from None
            frames.append(img.resize((w, h)))
        if len({f.size for f in frames}) != 1:  # the official torch.stack fails here
            raise InputError(field, "all video frames must have the same size")
        while len(frames) % FRAME_FACTOR:
            frames.append(frames[-1])
        return frames, list(range(len(frames))), video.fps or p.frame_list_fps


FRAME_FACTOR = 2  # qwen-vl-utils: frame counts are multiples of 2
RESCALE = 1 / 255  # the video processor's rescale_factor, fused into the normalisation as it does


def frame_list_indices(total: int, max_frames: int) -> list[int]:
    """The official reranker's `sample_frames`: all frames up to `max_frames`, else
    `np.linspace(0, total - 1, max_frames, dtype=int)` (rounded down)."""
    if total <= max_frames:
        return list(range(total))
    return [int(i) for i in np.linspace(0, total - 1, max_frames, dtype=int)]


def sample_frame_indices(total: int, native_fps: float, fps: float, max_frames: int, min_frames: int = 4) -> list[int]:
    """Frame indices of a video file as qwen-vl-utils picks them: `smart_nframes` (`fps` per second
    of video, between `min_frames` and `max_frames`, a multiple of 2, at most every frame), then its
    readers' `torch.linspace(0, total - 1, n).round()` (float32, ties to even)."""
    if total < 1:
        raise ValueError("video has no frames")
    lo = math.ceil(min_frames / FRAME_FACTOR) * FRAME_FACTOR
    hi = math.floor(max_frames / FRAME_FACTOR) * FRAME_FACTOR
    n = min(max(total / native_fps * fps, lo), hi, total)
    n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if n < FRAME_FACTOR:  # one frame: qwen-vl-utils refuses it; here it is kept (and padded)
        return list(range(total))
    return torch.linspace(0, total - 1, n).round().long().tolist()


def frame_timestamps(indices: list[int], fps: float, temporal: int) -> tuple[float, ...]:
    """Seconds of each temporal group, as the Qwen3-VL processor's `_calculate_timestamps`: the
    indices padded with the last, each over `fps`, the mean of a group's first and last."""
    idx = list(indices)
    while len(idx) % temporal:
        idx.append(idx[-1])
    t = [i / fps for i in idx]
    return tuple((t[i] + t[i + temporal - 1]) / 2 for i in range(0, len(t), temporal))


def frame_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB frame as a (C, H, W) uint8 tensor, as qwen-vl-utils stacks them."""
    return torch.from_numpy(np.array(img, dtype=np.uint8).transpose(2, 0, 1).copy())


def resize_like_torchvision(frame: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, H, W) uint8 -> (C, height, width) float32 as qwen-vl-utils resizes video frames
    (`torchvision.transforms.functional.resize`, bicubic, antialias, on uint8: interpolated in
    float32, clamped, rounded back to uint8; then `.float()`). Frame by frame: the interpolation
    is per plane, so this equals resizing the stacked video, with one frame's memory at a time."""
    if tuple(frame.shape[1:]) == (height, width):
        return frame.float()
    out = torch.nn.functional.interpolate(frame[None].float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp(0, 255).round().to(torch.uint8)[0].float()


def patchify_video(frames: torch.Tensor, patch: int, temporal: int, merge: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, C, H, W) normalised frames -> (groups*gh*gw, C*temporal*patch*patch), the Qwen3-VL video
    processor's layout (frames padded to a multiple of `temporal` with the last)."""
    t, c, h, w = frames.shape
    if pad := -t % temporal:
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
        t += pad
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, c * temporal * patch * patch).contiguous(), (gt, gh, gw)


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
                raise ImageTooLarge(field, f"video has {total} frames, over the limit of {pre.max_video_frames} (max_video_file_frames)")
            if total < 1:
                raise ImageDecodeError(field, "video has no frames")
            # Every frame is decoded (codecs need the ones before), so all of them are charged.
            if budget is not None:
                budget.charge(total * width * height, field)
            wanted = sample_frame_indices(total, fps, p.video_fps, p.video_max_frames)
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
        wanted = [min(kept, key=lambda k: abs(k - w)) for w in sample_frame_indices(decoded, fps, p.video_fps, p.video_max_frames)]
    return [frames[i] for i in wanted], wanted, fps


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
