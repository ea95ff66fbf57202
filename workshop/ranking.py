"""Ranking agreement and quality metrics, shared by `eval` and shadow traffic. Pure functions."""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.stats import spearmanr


def ranking(scores: Sequence[float]) -> list[int]:
    """Indices ordered by descending score; ties keep input order (stable)."""
    return sorted(range(len(scores)), key=lambda i: -scores[i])


def ndcg_at_k(scores: Sequence[float], gains: Sequence[float], k: int = 10) -> float:
    """NDCG@k of the order induced by `scores`, with graded relevance `gains`. 1.0 if no gain exists."""
    if len(scores) != len(gains):
        raise ValueError("scores and gains differ in length")
    order = ranking(scores)[:k]
    dcg = sum(gains[i] / math.log2(r + 2) for r, i in enumerate(order))
    ideal = sorted(gains, reverse=True)[:k]
    idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal))
    return 1.0 if idcg == 0 else dcg / idcg


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation; 1.0 when either side is constant or has fewer than 2 items."""
    if len(a) != len(b):
        raise ValueError("score lists differ in length")
    if len(a) < 2 or len(set(a)) == 1 or len(set(b)) == 1:
        return 1.0 if list(ranking(a)) == list(ranking(b)) else 0.0
    return float(spearmanr(a, b).statistic)


def top_k_overlap(a: Sequence[float], b: Sequence[float], k: int = 10) -> float:
    """|top-k(a) ∩ top-k(b)| / k' where k' = min(k, n)."""
    kk = min(k, len(a))
    if kk == 0:
        return 1.0
    return len(set(ranking(a)[:kk]) & set(ranking(b)[:kk])) / kk


def agreement(reference: Sequence[float], candidate: Sequence[float], k: int = 10) -> dict[str, float]:
    """How closely `candidate` ranks like `reference`: Spearman, NDCG@k (reference scores as gains), top-k overlap."""
    # Reference scores as gains: relevance according to the reference arm, rank-based so scale does not matter.
    n = len(reference)
    gains = [0.0] * n
    for r, i in enumerate(ranking(reference)):
        gains[i] = float(n - r)
    return {
        "spearman": spearman(reference, candidate),
        f"ndcg@{k}": ndcg_at_k(candidate, gains, k),
        f"top{k}_overlap": top_k_overlap(reference, candidate, k),
    }
