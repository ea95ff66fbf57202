"""The official Qwen3-VL-Reranker scoring path, re-stated for the parity tests; run in its own process.

    python official_reference.py MODEL_DIR CASES.json OUT.pt

Re-stated from QwenLM/Qwen3-VL-Embedding `src/models/qwen3_vl_reranker.py` (its logic, not the
engine's): `format_mm_content` / `format_mm_instruction` (the messages, with the limits it puts
on each image and video), `sample_frames` (frame lists), `tokenize` (chat template, then
`process_vision_info`, then the processor with `do_resize=False`, truncation keeping special tokens
and the final 5) and `compute_scores`. Called as they are: qwen-vl-utils 0.0.14 (fetching,
sampling, sizing and torchvision resizing of images and videos), transformers' Qwen3-VL processor
(image and video processors, prompt expansion with frame timestamps) and the model itself. The
chat template is the official Qwen3-VL one (`data/qwen3_vl_chat_template.jinja`, SHA-256 pinned by
the tests). Nothing of the project is imported.

It runs on the official repository's own stack, as its lockfile pins it: transformers 4.57.3
(not the project's 5.17: the two expand a video prompt differently, 5.x keeping an outer
`<|vision_start|>`/`<|vision_end|>` around the per-frame blocks), qwen-vl-utils 0.0.14, decord (its
video reader) and torchvision (its resizing; the Qwen3-VL video processor). `scripts/test.sh`
installs them into a folder of their own, `.venv/reference-packages`, which only this process puts
on its path. PyPI's torchvision is a CUDA build: it imports beside the CPU torch once the fake
kernels of its C operators (nms, roi_align, ...; missing here) are skipped, which nothing used
here needs.

CASES.json: a list of {"query": SIDE, "documents": [SIDE, ...], "instruction": str | null};
SIDE: {"text": str | [str], "image": path | [path], "video": VIDEO | [VIDEO]}; VIDEO: a file path
or a list of frame-image paths. OUT.pt: per case, per document: input_ids, the processor's pixel
tensors and grids, each video's frame indices and the score.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# Official constants (qwen3_vl_reranker.py).
MAX_LENGTH = 10240
IMAGE_FACTOR = 16 * 2
MIN_PIXELS = 4 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_PIXELS = 1800 * IMAGE_FACTOR * IMAGE_FACTOR
FPS = 1
MAX_FRAMES = 64
FRAME_MAX_PIXELS = 768 * IMAGE_FACTOR * IMAGE_FACTOR
MAX_TOTAL_PIXELS = 10 * FRAME_MAX_PIXELS
SYSTEM = 'Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the answer can only be "yes" or "no".'
DEFAULT_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tiff", ".svg"}
TEMPLATE = Path(__file__).parent / "data" / "qwen3_vl_chat_template.jinja"


def import_reference_packages(folder: str) -> None:
    """Put `folder` (the official stack) first on the path and import PyPI's torchvision beside
    the CPU torch, skipping the fake kernels of its missing C ops."""
    import torch.library

    sys.path.insert(0, folder)
    real = torch.library.register_fake

    def tolerant(op, *args, **kwargs):
        def register(fn):
            try:
                return real(op, *args, **kwargs)(fn)
            except RuntimeError:  # "operator torchvision::nms does not exist": no C ops in this build
                return fn

        return register

    torch.library.register_fake = tolerant
    try:
        import torchvision  # noqa: F401
    finally:
        torch.library.register_fake = real


def is_video_input(video) -> bool:
    if isinstance(video, str):
        return True
    return isinstance(video, list) and bool(video) and isinstance(video[0], str) and os.path.splitext(video[0].lower())[1] in IMAGE_EXTENSIONS


def sample_frames(frames: list, max_segments: int) -> list:
    import numpy as np

    if len(frames) <= max_segments:
        return frames
    return [frames[i] for i in np.linspace(0, len(frames) - 1, max_segments, dtype=int).tolist()]


def format_mm_content(text, image, video, prefix: str) -> list[dict]:
    content = [{"type": "text", "text": prefix}]
    texts = [] if text is None else [text] if isinstance(text, str) else list(text)
    images = [] if image is None else image if isinstance(image, list) else [image]
    videos = [] if video is None else [video] if is_video_input(video) else list(video)
    if not texts and not images and not videos:
        content.append({"type": "text", "text": "NULL"})
        return content
    for vid in videos:
        if isinstance(vid, list):
            frames = ["file://" + f for f in sample_frames(vid, MAX_FRAMES)]
            content.append({"type": "video", "video": frames, "total_pixels": MAX_TOTAL_PIXELS})
        else:
            content.append({"type": "video", "video": "file://" + vid, "fps": FPS, "max_frames": MAX_FRAMES})
    for img in images:
        content.append({"type": "image", "image": "file://" + img, "min_pixels": MIN_PIXELS, "max_pixels": MAX_PIXELS})
    for txt in texts:
        content.append({"type": "text", "text": txt})
    return content


def format_mm_instruction(query: dict, document: dict, instruction: str | None) -> list[dict]:
    contents = [{"type": "text", "text": "<Instruct>: " + (instruction or DEFAULT_INSTRUCTION)}]
    contents += format_mm_content(query.get("text"), query.get("image"), query.get("video"), "<Query>:")
    contents += format_mm_content(document.get("text"), document.get("image"), document.get("video"), "\n<Document>:")
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]}, {"role": "user", "content": contents}]


def truncate_tokens(tokens: list[int], max_length: int, special: list[int]) -> list[int]:
    if len(tokens) <= max_length:
        return tokens
    special_set = set(special)
    keep = max_length - sum(1 for t in tokens if t in special_set)
    out, kept = [], 0
    for t in tokens:
        if t in special_set:
            out.append(t)
        elif kept < keep:
            out.append(t)
            kept += 1
    return out


class OfficialReranker:
    def __init__(self, model_dir: str):
        import torch
        from transformers import AutoImageProcessor, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        pre = json.loads((Path(model_dir) / "preprocessor_config.json").read_text())
        geometry = {k: pre[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std")}
        self.processor = Qwen3VLProcessor(
            image_processor=AutoImageProcessor.from_pretrained(model_dir),
            video_processor=Qwen3VLVideoProcessor(**geometry),
            tokenizer=self._tokenizer(model_dir),
            chat_template=TEMPLATE.read_text(),
        )
        lm = Qwen3VLForConditionalGeneration.from_pretrained(model_dir, config=self._config(model_dir), dtype=torch.float32).eval()
        self.model = lm.model
        vocab = self.processor.tokenizer.get_vocab()
        weight = lm.lm_head.weight.data
        self.score_linear = torch.nn.Linear(weight.shape[1], 1, bias=False)
        with torch.no_grad():
            self.score_linear.weight[0] = weight[vocab["yes"]] - weight[vocab["no"]]

    @staticmethod
    def _config(model_dir: str):
        """The checkpoint's config, its rotary settings restated under 4.57's names (a
        transformers 5 config says `rope_parameters` where 4.57 reads `rope_scaling`/`rope_theta`)."""
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir)
        text = config.text_config
        rope = json.loads((Path(model_dir) / "config.json").read_text())["text_config"].get("rope_parameters")
        if getattr(text, "rope_scaling", None) is None and rope:
            text.rope_scaling = dict(rope)
            text.rope_theta = rope["rope_theta"]
        return config

    @staticmethod
    def _tokenizer(model_dir: str):
        """The checkpoint's tokenizer.json with its special tokens. (Built by hand: the tiny
        model's tokenizer_config.json is written by transformers 5, whose class name and token
        list format 4.57 does not read.)"""
        from transformers import Qwen2TokenizerFast

        cfg = json.loads((Path(model_dir) / "tokenizer_config.json").read_text())
        return Qwen2TokenizerFast(
            tokenizer_file=str(Path(model_dir) / "tokenizer.json"), eos_token=cfg["eos_token"], pad_token=cfg["pad_token"],
            additional_special_tokens=cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or [], padding_side="left",
        )  # fmt: skip

    def tokenize(self, pair: list[dict]) -> tuple[dict, list[list[int]]]:
        from qwen_vl_utils import process_vision_info

        text = self.processor.apply_chat_template([pair], tokenize=False, add_generation_prompt=True)
        images, videos, video_kwargs = process_vision_info([pair], image_patch_size=16, return_video_kwargs=True, return_video_metadata=True)
        metadata = None
        frame_indices: list[list[int]] = []
        if videos is not None:
            videos, metadata = (list(x) for x in zip(*videos))
            frame_indices = [[int(i) for i in m["frames_indices"]] for m in metadata]
        inputs = self.processor(
            text=text, images=images, videos=videos, video_metadata=metadata, truncation=False, padding=False, do_resize=False, **video_kwargs
        )
        special = self.processor.tokenizer.all_special_ids
        ids = [truncate_tokens(list(x[:-5]), MAX_LENGTH, special) + list(x[-5:]) for x in inputs["input_ids"]]
        padded = self.processor.tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt", max_length=MAX_LENGTH)
        for key in padded:
            inputs[key] = padded[key]
        return inputs, frame_indices

    def score(self, inputs) -> float:
        import torch

        with torch.no_grad():
            batch = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
            if "mm_token_type_ids" in inputs:
                batch["mm_token_type_ids"] = torch.as_tensor(inputs["mm_token_type_ids"])
            hidden = self.model(**batch).last_hidden_state[:, -1]
            return float(torch.sigmoid(self.score_linear(hidden)).squeeze())


def main(model_dir: str, cases_path: str, out_path: str) -> None:
    import torch

    import_reference_packages(os.environ["RERANK_REFERENCE_PACKAGES"])
    torch.set_num_threads(int(os.environ.get("RERANK_REFERENCE_THREADS", "1")))
    reranker = OfficialReranker(model_dir)
    results = []
    for case in json.loads(Path(cases_path).read_text()):
        docs = []
        for document in case["documents"]:
            inputs, frame_indices = reranker.tokenize(format_mm_instruction(case["query"], document, case.get("instruction")))
            docs.append({
                "input_ids": inputs["input_ids"][0].tolist(),
                **{k: inputs[k] for k in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw") if k in inputs},
                "frame_indices": frame_indices,
                "score": reranker.score(inputs),
            })  # fmt: skip
        results.append(docs)
    torch.save(results, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:4])
