"""The canary: a few fixed rerank groups whose reference scores are recorded with a model, scored
again by every replica before it takes traffic (`serve/arm.py`).

A quantized or converted checkpoint can fail silently: a zeroed or lost score head answers 0.5 for
every pair, wrong quantization scales scramble the ranking, and requests still succeed. The
reference is recorded with the model (`canary.json` beside its `config.json`) by the tools that
make or check a checkpoint (`workshop/canary.py`: `rerank-fleet quantize`, `eval`, `build-tiny`),
scored by the model at full precision; a replica whose ranking of the same groups disagrees with
it beyond `CanaryBound` refuses to start, naming the agreement it reached.

This module is the file's format and the judgement: pure (no torch, no I/O but the file's read
and write), so the judgement tests in milliseconds.
"""

from __future__ import annotations

import base64
import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.errors import ModelLoadError
from engine.inputs import ImageInput, RerankItem, ScoreRequest
from ranking.metrics import ranking, spearman

CANARY_FILE = "canary.json"
FORMAT = "rerank-fleet-canary-1"


@dataclass(frozen=True)
class CanaryGroup:
    """One query, its documents, and the reference's score of each document."""

    query: RerankItem
    documents: tuple[RerankItem, ...]
    scores: tuple[float, ...]

    def request(self) -> ScoreRequest:
        return ScoreRequest.of(self.query, self.documents)


@dataclass(frozen=True)
class CanaryReference:
    """The canary set of one model with its reference scores, and how they were recorded."""

    groups: tuple[CanaryGroup, ...]
    model: str  # what scored the reference (folder name or hub id)
    precision: str  # the reference's precision (full: fp32, bf16 or fp16)
    device: str
    recorded_by: str  # the command that wrote it

    def requests(self) -> list[ScoreRequest]:
        return [g.request() for g in self.groups]

    @property
    def pairs(self) -> int:
        return sum(len(g.documents) for g in self.groups)

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "model": self.model, "precision": self.precision, "device": self.device, "recorded_by": self.recorded_by,
            "groups": [{"query": _item_json(g.query), "documents": [_item_json(d) for d in g.documents], "scores": list(g.scores)}
                       for g in self.groups],
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: dict, where: str = CANARY_FILE) -> CanaryReference:
        try:
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT!r}")
            groups = tuple(_group(g) for g in data["groups"])
            if not groups:
                raise ValueError("no groups")
            return cls(groups, str(data["model"]), str(data["precision"]), str(data["device"]), str(data["recorded_by"]))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"{where}: not a canary reference ({type(e).__name__}: {e})") from None

    def write(self, folder: Path) -> Path:
        """Write `canary.json` into `folder` atomically (a replica reading it never sees half a file)."""
        folder = Path(folder)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".canary-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, folder / CANARY_FILE)
        return folder / CANARY_FILE


def read_reference(folder: Path) -> CanaryReference | None:
    """The canary reference shipped in a model folder; None when it has none."""
    path = Path(folder) / CANARY_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not JSON ({e})") from None
    return CanaryReference.from_json(data, str(path))


def _item_json(item: RerankItem) -> dict:
    if item.videos:
        raise ValueError("canary items hold text and images only")
    out: dict = {"text": item.text} if item.text is not None else {}
    if item.images:
        out["images"] = [base64.b64encode(img.data or b"").decode() for img in item.images]
    return out


def _item(data: dict) -> RerankItem:
    images = tuple(ImageInput.of(base64.b64decode(b, validate=True)) for b in data.get("images", ()))
    return RerankItem(text=data.get("text"), images=images)


def _group(data: dict) -> CanaryGroup:
    documents = tuple(_item(d) for d in data["documents"])
    scores = tuple(float(s) for s in data["scores"])
    if len(scores) != len(documents) or len(documents) < 2:
        raise ValueError(f"a group needs at least 2 documents and a score each ({len(documents)} documents, {len(scores)} scores)")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError("reference scores must be finite")
    return CanaryGroup(_item(data["query"]), documents, scores)


# ---- the judgement ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryBound:
    """What a replica's canary scores must reach against the reference.

    Set from what the tiny model's quantized arms reach on the canary set: bf16, fp16, int8, nf4
    and AWQ W4A16 rank every group exactly as fp32 does (Spearman 1.0; on the held-out set's 20
    documents a query 0.997-0.999); checkpoints broken by weights 10-100x off reached 0.54-0.79,
    a zeroed yes/no head constant scores (docs/BENCHMARKS.md, "Canary")."""

    min_mean_spearman: float = 0.9  # Spearman of each group's scores with the reference's, averaged over the groups
    top1_tie: float = 0.02  # the replica's top document agrees when its reference score is within this of the reference's best
    min_top1: float = 1.0  # share of groups whose top document agrees
    min_spread: float = 1e-3  # scores spanning less than this (max - min) are constant: a dead score head


DEFAULT_BOUND = CanaryBound()


@dataclass(frozen=True)
class CanaryVerdict:
    passed: bool
    groups: int
    pairs: int
    mean_spearman: float
    min_spearman: float
    top1: int  # groups whose top document agrees
    spread: float  # max - min of every canary score
    problems: tuple[str, ...]  # why it failed; empty when passed
    bound: CanaryBound = DEFAULT_BOUND

    def summary(self) -> str:
        """The agreement reached, with the bound, in one line."""
        b = self.bound
        return (f"mean Spearman {self.mean_spearman:.3f} over {self.groups} groups (min {self.min_spearman:.3f}; bound >= "
                f"{b.min_mean_spearman:g}), top-1 {self.top1}/{self.groups} (bound >= {math.ceil(b.min_top1 * self.groups)}), "
                f"score spread {self.spread:.4f}")  # fmt: skip

    def explain(self) -> str:
        return ("passed: " if self.passed else "failed: " + "; ".join(self.problems) + "; reached ") + self.summary()

    def to_dict(self) -> dict:
        return {"passed": self.passed, "groups": self.groups, "pairs": self.pairs, "mean_spearman": round(self.mean_spearman, 4),
                "min_spearman": round(self.min_spearman, 4), "top1": self.top1, "spread": round(self.spread, 4), "problems": list(self.problems)}  # fmt: skip


def judge(reference: CanaryReference, scores: Sequence[Sequence[float]], bound: CanaryBound = DEFAULT_BOUND) -> CanaryVerdict:
    """Whether `scores` (one list per canary group, in the reference's document order) rank the
    canary set like the reference: finite, not constant, mean Spearman and top-1 agreement within
    `bound`. Pure."""
    if len(scores) != len(reference.groups) or any(len(s) != len(g.scores) for s, g in zip(scores, reference.groups)):
        raise ValueError("scores must hold one score per canary document, group by group")
    flat = [float(x) for group in scores for x in group]
    problems = []
    bad = sum(not math.isfinite(x) for x in flat)
    finite = [x for x in flat if math.isfinite(x)]
    spread = max(finite) - min(finite) if finite else 0.0
    if bad:
        problems.append(f"{bad} of {len(flat)} scores are not finite")
    if spread < bound.min_spread:
        problems.append(f"scores are constant ({finite[0]:.4f} for every pair)" if finite and not bad else f"score spread {spread:.2g}")
    rhos, top1 = [], 0
    for group, got in zip(reference.groups, scores):
        got = [float(x) for x in got]
        if not all(math.isfinite(x) for x in got) or max(got) - min(got) < bound.min_spread:
            rhos.append(0.0)  # no ranking at all
            continue
        rho = spearman(group.scores, got)
        rhos.append(rho if math.isfinite(rho) else 0.0)
        best = max(group.scores)
        top1 += group.scores[ranking(got)[0]] >= best - bound.top1_tie
    mean = sum(rhos) / len(rhos)
    if mean < bound.min_mean_spearman:
        problems.append(f"mean Spearman {mean:.3f} < {bound.min_mean_spearman:g}")
    if top1 < bound.min_top1 * len(rhos):
        problems.append(f"top document disagrees in {len(rhos) - top1} of {len(rhos)} groups")
    return CanaryVerdict(not problems, len(rhos), len(flat), mean, min(rhos), top1, spread, tuple(problems), bound)
