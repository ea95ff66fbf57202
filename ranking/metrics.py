"""Ranking agreement and quality metrics (Spearman, NDCG@k, top-k overlap, RBO, click metrics, team-draft
interleaving), shared by `eval`, shadow traffic, experiments and the ledger. Pure functions; a leaf
module: it imports nothing of this project."""

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
        "rbo": rank_biased_overlap(ranking(reference), ranking(candidate)),
    }


def rank_biased_overlap(a: Sequence[int], b: Sequence[int], p: float = 0.9) -> float:
    """Rank-biased overlap (Webber et al. 2010) of two complete rankings of the same items,
    extrapolated form: top-weighted (p = 0.9 puts ~86 % of the weight on the first 10 ranks), 1.0
    for identical rankings."""
    depth = min(len(a), len(b))
    if depth == 0:
        return 1.0
    seen_a: set[int] = set()
    seen_b: set[int] = set()
    overlap, total = 0, 0.0
    for d in range(1, depth + 1):
        x, y = a[d - 1], b[d - 1]
        if x == y:
            overlap += 1
        else:
            overlap += (x in seen_b) + (y in seen_a)
        seen_a.add(x)
        seen_b.add(y)
        total += overlap / d * p ** (d - 1)
    return (overlap / depth) * p**depth + (1 - p) * total


def click_ndcg(shown: Sequence[int], clicked: set[int], k: int = 10) -> float:
    """NDCG@k of a shown ranking with clicked documents as relevant (binary gains); 0 without clicks."""
    ideal = sum(1 / math.log2(r + 2) for r in range(min(k, len(clicked))))
    if ideal == 0:
        return 0.0
    return sum(1 / math.log2(r + 2) for r, i in enumerate(shown[:k]) if i in clicked) / ideal


def reciprocal_rank(shown: Sequence[int], clicked: set[int]) -> float:
    """1 / rank of the first clicked document in the shown ranking; 0 without clicks."""
    return next((1 / (r + 1) for r, i in enumerate(shown) if i in clicked), 0.0)


def team_draft_interleave(a: Sequence[int], b: Sequence[int], coins: Sequence[bool]) -> tuple[list[int], list[int]]:
    """Team-draft interleaving (Radlinski et al. 2008) of two rankings of the same items: the team
    with fewer picks adds its best item not yet taken; on equal picks a coin decides (`coins[r]`
    True: team a). Returns (the interleaved ranking, the team of each position: 0 = a, 1 = b); a
    click on a position is credited to its team."""
    rankings = (list(a), list(b))
    pointers = [0, 0]
    picks = [0, 0]
    out: list[int] = []
    teams: list[int] = []
    taken: set[int] = set()
    flips = 0
    while len(out) < len(set(a) | set(b)):
        if picks[0] == picks[1]:
            team = 0 if coins[flips % len(coins)] else 1
            flips += 1
        else:
            team = 0 if picks[0] < picks[1] else 1
        for side in (team, 1 - team):  # a team with nothing left passes the pick on
            ranked = rankings[side]
            while pointers[side] < len(ranked) and ranked[pointers[side]] in taken:
                pointers[side] += 1
            if pointers[side] < len(ranked):
                item = ranked[pointers[side]]
                out.append(item)
                teams.append(side)
                taken.add(item)
                picks[side] += 1
                break
    return out, teams
