"""Parity cases written once for both sides: files and a JSON list for the official reference
(`official_reference.py`, run in its own process) and `ScoreRequest`s for the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput

REFERENCE = Path(__file__).parent / "official_reference.py"
REPO = Path(__file__).resolve().parents[2]


@dataclass
class Side:
    text: str | list[str] | None = None
    images: list[bytes] = field(default_factory=list)
    videos: list[tuple[str, object]] = field(default_factory=list)  # ("frames", [png bytes]) | ("file", mp4 bytes)


@dataclass
class Case:
    name: str
    query: Side
    documents: list[Side]
    instruction: str | None = None


def _reference_side(side: Side, folder: Path, tag: str) -> dict:
    out: dict = {}
    if side.text is not None:
        out["text"] = side.text
    if side.images:
        out["image"] = []
        for i, data in enumerate(side.images):
            (folder / f"{tag}-img{i}.png").write_bytes(data)
            out["image"].append(str(folder / f"{tag}-img{i}.png"))
    videos = []
    for v, (kind, payload) in enumerate(side.videos):
        if kind == "file":
            path = folder / f"{tag}-vid{v}.mp4"
            path.write_bytes(payload)  # type: ignore[arg-type]
            videos.append(str(path))
        else:
            frames = []
            for i, data in enumerate(payload):  # type: ignore[arg-type]
                (folder / f"{tag}-vid{v}-f{i:03d}.png").write_bytes(data)
                frames.append(str(folder / f"{tag}-vid{v}-f{i:03d}.png"))
            videos.append(frames)
    if videos:
        out["video"] = videos  # a list of videos, as the official `format_mm_content` takes several
    return out


def engine_item(side: Side, where: str) -> RerankItem:
    texts = [side.text] if isinstance(side.text, str) else side.text
    videos = []
    for v, (kind, payload) in enumerate(side.videos):
        if kind == "file":
            videos.append(VideoInput.of_file(payload, f"{where}.video.{v}"))  # type: ignore[arg-type]
        else:
            frames = tuple(ImageInput.of(d, f"{where}.video.{v}.{i}") for i, d in enumerate(payload))  # type: ignore[arg-type]
            videos.append(VideoInput.of_frames(frames, f"{where}.video.{v}"))
    return RerankItem(
        text="".join(texts) if texts is not None else None,
        images=tuple(ImageInput.of(d, f"{where}.image.{i}") for i, d in enumerate(side.images)),
        videos=tuple(videos),
        field=where,
    )


def engine_request(case: Case) -> ScoreRequest:
    return ScoreRequest(engine_item(case.query, "query"), tuple(engine_item(d, f"documents.{i}") for i, d in enumerate(case.documents)), case.instruction)


def run_official(model_dir: Path, cases: list[Case], folder: Path) -> dict[str, list[dict]]:
    """Score `cases` with the official path in a fresh process; per case name, per document."""
    packages = os.environ.get("RERANK_REFERENCE_PACKAGES", str(REPO / ".venv" / "reference-packages"))
    if not (Path(packages) / "SPECS").exists():
        pytest.fail(f"the official reference needs its packages in {packages}: run the tests with `bash scripts/test.sh`, which installs them")
    spec = []
    for c in cases:
        spec.append({
            "query": _reference_side(c.query, folder, f"{c.name}-q"),
            "documents": [_reference_side(d, folder, f"{c.name}-d{i}") for i, d in enumerate(c.documents)],
            "instruction": c.instruction,
        })  # fmt: skip
    (folder / "cases.json").write_text(json.dumps(spec))
    env = {**os.environ, "RERANK_REFERENCE_PACKAGES": packages, "RERANK_REFERENCE_THREADS": str(torch.get_num_threads()),
           "FORCE_QWENVL_VIDEO_READER": "decord"}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(REFERENCE), str(model_dir), str(folder / "cases.json"), str(folder / "out.pt")],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if proc.returncode != 0:
        pytest.fail(f"the official reference failed:\n{proc.stderr[-4000:]}")
    results = torch.load(folder / "out.pt", weights_only=False)
    return {c.name: r for c, r in zip(cases, results)}
