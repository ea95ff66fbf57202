"""`rerank-fleet eval`: how faithfully a precision ranks compared with a reference precision.

On the tiny model's held-out labelled set: Spearman and top-10 overlap against the reference
arm's scores, NDCG@10 with the reference's ranking as gains, absolute NDCG@10 against the true
labels, and the largest absolute score difference. `vllm` adds rows scored by the vLLM backend
(precision -> checkpoint, e.g. a W8A8 checkpoint from `rerank-fleet quantize --scheme w8a8`), in
the vLLM environment, against the same transformers reference.

It also records the model's canary reference (`canary.json`: the canary set scored by the reference
precision, workshop/canary.py) into the model's folder (beside the report for a hub model), and
judges every row's canary scores against it as a replica would at start (the `canary` column).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from engine.canary import judge
from ranking.metrics import agreement, ndcg_at_k
from workshop.canary import FULL_PRECISIONS, score_reference


def labelled_set(model: str):
    if model != "tiny":
        raise SystemExit("eval needs a labelled set; only the tiny model's synthetic held-out set ships with the project")
    from workshop.tiny import eval_set

    return eval_set()


def run_eval(model: str, precisions: list[str], reference: str = "fp32", device: str = "auto", out: str | None = None,
             vllm: dict[str, str] | None = None) -> dict:  # fmt: skip
    from engine.engine import RerankEngine
    from workshop.tiny import resolve_source

    tasks = labelled_set(model)
    source = resolve_source(model)
    ref = RerankEngine.load(source, reference, device=device)
    # The canary reference is scored at full precision; against a quantized reference there is none.
    canary = score_reference(ref, recorded_by=f"rerank-fleet eval --reference {reference}") if reference in FULL_PRECISIONS else None
    groups = canary.groups if canary else ()
    canary_tasks = [(g.query, g.documents, None) for g in groups]
    every = tasks + canary_tasks  # each row scores both: the held-out set, then the canary set

    def row(precision: str, scores: list[list[float]]) -> dict:
        return {"precision": precision, "reference": reference, **_metrics(ref_scores, scores[: len(tasks)], tasks),
                "canary": judge(canary, scores[len(tasks):]).to_dict() if canary else None}  # fmt: skip

    ref_scores = [ref.score(q, docs) for q, docs, _ in tasks]
    rows = [row(reference, ref_scores + [list(g.scores) for g in groups])]
    for precision in precisions:
        eng = RerankEngine.load(source, precision, device=device)
        rows.append(row(precision, [eng.score(q, docs) for q, docs, _ in every]))
        del eng
    for precision, checkpoint in (vllm or {}).items():
        rows.append(row(f"{precision} (vllm)", _vllm_scores(checkpoint or source, precision, every, device)))
    if canary:
        print(f"canary reference ({canary.pairs} pairs, {reference}) written to {write_canary(canary, source, out)}")
    report = {
        "model": ref.model_id,
        "device": str(ref.device),
        "tasks": len(tasks),
        "documents_per_task": len(tasks[0][1]),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    print(format_table(rows))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=2))
    return report


def _vllm_scores(checkpoint: str, precision: str, tasks, device: str) -> list[list[float]]:
    import asyncio

    from engine.config import EngineConfig
    from engine.inputs import ScoreRequest
    from engine.vllm_engine import VllmRerankEngine, VllmSettings

    engine = VllmRerankEngine(checkpoint, precision, config=EngineConfig(), settings=VllmSettings(enforce_eager=True), device="cuda" if device == "cuda" else "cpu")

    async def all_tasks():
        scores = [(await engine.score_request(ScoreRequest.of(q, docs))).scores for q, docs, _ in tasks]
        await engine.aclose()
        return scores

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(all_tasks())
    finally:
        loop.close()


def write_canary(canary, source: str, out: str | None) -> Path:
    """`canary.json` into the model's folder when it is a local one, else beside the report (copy
    it into the model folder the arms read)."""
    folder = Path(source) if Path(source).is_dir() else Path(out or ".").parent
    folder.mkdir(parents=True, exist_ok=True)
    return canary.write(folder)


def _metrics(ref_scores, scores, tasks) -> dict:
    agree = [agreement(a, b, k=10) for a, b in zip(ref_scores, scores)]
    return {
        "spearman": float(np.mean([a["spearman"] for a in agree])),
        "ndcg@10_vs_reference": float(np.mean([a["ndcg@10"] for a in agree])),
        "top10_overlap": float(np.mean([a["top10_overlap"] for a in agree])),
        "ndcg@10_labels": float(np.mean([ndcg_at_k(s, gains, 10) for s, (_, _, gains) in zip(scores, tasks)])),
        "max_abs_score_diff": float(max(max(abs(x - y) for x, y in zip(a, b)) for a, b in zip(ref_scores, scores))),
    }


def format_table(rows: list[dict]) -> str:
    head = (f"| {'precision':9} | {'spearman':>8} | {'NDCG@10 vs ref':>14} | {'top-10 overlap':>14} | {'NDCG@10 labels':>14} | "
            f"{'max abs Δscore':>14} | {'canary':>22} |")  # fmt: skip
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        c = r["canary"]
        canary = f"{'pass' if c['passed'] else 'FAIL'} ρ {c['mean_spearman']:.3f} top-1 {c['top1']}/{c['groups']}" if c else "-"
        lines.append(
            f"| {r['precision']:9} | {r['spearman']:8.4f} | {r['ndcg@10_vs_reference']:14.4f} | {r['top10_overlap']:14.4f} | "
            f"{r['ndcg@10_labels']:14.4f} | {r['max_abs_score_diff']:14.5f} | {canary:>22} |"
        )
    return "\n".join(lines)
