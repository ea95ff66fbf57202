"""The canary set and its reference scores (`canary.json` in a model folder; the format and the
judgement are `engine/canary.py`).

The set is fixed: four text queries, each with six documents of graded relevance (one clear best,
two that match the query in part, three that do not; one best document is an image), worded as
the offline model's world (coloured shapes) and plain enough for any reranker. A reference is
the model's own scores of it at full precision, recorded by the tools that make or check a
checkpoint: `rerank-fleet quantize` (the source model's scores, into the checkpoint it writes),
`rerank-fleet eval` (the reference precision's) and `rerank-fleet build-tiny` / the main job (the
offline model's, once: `ensure_reference`). 24 pairs: about 35 ms on the tiny model on CPU.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from engine.canary import CANARY_FILE, CanaryGroup, CanaryReference, read_reference

FULL_PRECISIONS = ("fp32", "bf16", "fp16")
# (query, documents best first: the clear match, two partial matches, three others); an
# ("image", colour, shape) document is that shape drawn (workshop.tiny.draw, seeded).
GROUPS = (
    ("red circle", ("a red circle", "a blue circle", "a red square", "a green triangle", "the cross is yellow", "a purple square")),
    ("find a blue square", (("image", "blue", "square"), "a purple square", "a blue cross", "an orange circle", "a yellow triangle", "a green cross")),
    ("show me a yellow triangle", ("the triangle is yellow", "a green triangle", "a yellow circle", "a purple square", "a red cross", "an orange circle")),
    ("green cross", ("an image showing a green cross", "a red cross", "a green circle", "a blue triangle", "an orange square", "a yellow circle")),
)  # fmt: skip
SEED = 2026


def canary_set() -> list[tuple]:
    """[(query item, [document items])]: the fixed canary groups, documents in a seeded shuffled
    order (so that neither the reference's order nor a constant scorer's is the input order)."""
    from engine.inputs import ImageInput, RerankItem
    from workshop.tiny import Thing, draw

    rng = random.Random(SEED)
    out = []
    for query, documents in GROUPS:
        items = [RerankItem(images=(ImageInput.of(draw(Thing(d[1], d[2]), rng)),)) if isinstance(d, tuple) else RerankItem(text=d)
                 for d in documents]  # fmt: skip
        rng.shuffle(items)
        out.append((RerankItem(text=query), items))
    return out


def score_reference(engine, recorded_by: str) -> CanaryReference:
    """The canary set scored by `engine` (a `RerankEngine` at full precision)."""
    if engine.precision not in FULL_PRECISIONS:
        raise ValueError(f"a canary reference is scored at full precision ({', '.join(FULL_PRECISIONS)}), not {engine.precision}")
    groups = tuple(CanaryGroup(q, tuple(docs), tuple(engine.score(q, docs))) for q, docs in canary_set())
    return CanaryReference(groups, model=Path(str(engine.model_id)).name or str(engine.model_id), precision=engine.precision,
                           device=str(engine.device), recorded_by=f"{recorded_by} ({time.strftime('%Y-%m-%d')})")  # fmt: skip


def record_reference(folder: Path, *, engine=None, precision: str = "fp32", device: str = "cpu", recorded_by: str = "record_reference") -> Path:
    """Score the canary set with the model in `folder` (or `engine`, already loaded at full
    precision) and write `folder/canary.json`; returns its path."""
    if engine is None:
        from engine.engine import RerankEngine

        engine = RerankEngine.load(str(folder), precision, device=device)
    return score_reference(engine, recorded_by).write(Path(folder))


def ensure_reference(folder: Path, recorded_by: str = "ensure_reference") -> Path:
    """`folder/canary.json`, recorded (fp32, CPU) if the folder has none; for the offline model,
    which `build-tiny` and the main job build once and then find cached."""
    from filelock import FileLock

    folder = Path(folder)
    path = folder / CANARY_FILE
    if path.exists():
        return path
    with FileLock(str(folder) + ".canary.lock"):  # test workers and the main job may race
        if read_reference(folder) is None:
            record_reference(folder, recorded_by=recorded_by)
    return path
