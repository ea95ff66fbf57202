"""Mergeable statistics with confidence intervals for A/B experiments. Pure: numpy and scipy only.

Every summary here merges exactly across ingress replicas, so the fleet-wide figure is the same
whichever replica reported first:
- `LatencyHistogram`: counts in log-spaced buckets 2 % wide; a quantile is exact to within 1 %
  (the bucket's geometric middle), and merging adds counts.
- `Moments`: count, sum and sum of squares of a per-request value (an agreement metric, a click
  NDCG); its mean has a Student-t interval.
Intervals: Wilson for proportions, a multinomial bootstrap of the two histograms for a ratio of
quantiles (no raw samples kept), Welch for a difference of means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import stats as sps

GROWTH = 1.02  # bucket width: a quantile is within 1 % of the true value
FLOOR_S = 1e-4  # everything under 0.1 ms shares the first bucket
Z95 = 1.959963984540054


def _bucket(x: float) -> int:
    return 0 if x <= FLOOR_S else 1 + int(math.log(x / FLOOR_S) / math.log(GROWTH))


def _bucket_value(b: int) -> float:
    """The geometric middle of bucket b (its upper bound for bucket 0)."""
    return FLOOR_S if b == 0 else FLOOR_S * GROWTH ** (b - 0.5)


@dataclass
class LatencyHistogram:
    counts: dict[int, int] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return sum(self.counts.values())

    def add(self, seconds: float) -> None:
        b = _bucket(seconds)
        self.counts[b] = self.counts.get(b, 0) + 1

    def merge(self, other: LatencyHistogram) -> None:
        for b, c in other.counts.items():
            self.counts[b] = self.counts.get(b, 0) + c

    def quantile(self, q: float) -> float | None:
        """Nearest-rank quantile (q in 0..1), in seconds; None when empty."""
        return _quantile(*self._arrays(), q)

    def share_over(self, seconds: float) -> tuple[int, int]:
        """(requests slower than `seconds`, all requests), counted by whole buckets above it."""
        limit = _bucket(seconds)
        return sum(c for b, c in self.counts.items() if b > limit), self.n

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        keys = sorted(self.counts)
        return np.array([_bucket_value(b) for b in keys]), np.array([self.counts[b] for b in keys], dtype=np.int64)

    def to_dict(self) -> dict[str, int]:
        return {str(b): c for b, c in self.counts.items()}

    @classmethod
    def from_dict(cls, d: dict) -> LatencyHistogram:
        return cls({int(b): int(c) for b, c in d.items()})


def _quantile(values: np.ndarray, counts: np.ndarray, q: float) -> float | None:
    total = int(counts.sum()) if len(counts) else 0
    if total == 0:
        return None
    rank = max(1, math.ceil(q * total))
    return float(values[np.searchsorted(np.cumsum(counts), rank)])


@dataclass
class Moments:
    n: int = 0
    total: float = 0.0
    squares: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        self.total += x
        self.squares += x * x

    def merge(self, other: Moments) -> None:
        self.n += other.n
        self.total += other.total
        self.squares += other.squares

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    @property
    def variance(self) -> float | None:
        if self.n < 2:
            return None
        return max(0.0, (self.squares - self.total * self.total / self.n) / (self.n - 1))

    def ci(self, level: float = 0.95) -> tuple[float, float] | None:
        """Student-t interval of the mean (None under 2 values)."""
        if self.n < 2:
            return None
        half = sps.t.ppf(0.5 + level / 2, self.n - 1) * math.sqrt(self.variance / self.n)
        return self.mean - half, self.mean + half

    def to_list(self) -> list[float]:
        return [self.n, self.total, self.squares]

    @classmethod
    def from_list(cls, v: list) -> Moments:
        return cls(int(v[0]), float(v[1]), float(v[2]))


def wilson(k: int, n: int, level: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of a proportion k/n."""
    if n == 0:
        return None
    z = sps.norm.ppf(0.5 + level / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def quantile_ratio_ci(arm: LatencyHistogram, ref: LatencyHistogram, q: float, *, reps: int = 1000,
                      level: float = 0.95, seed: int = 0) -> tuple[float, float] | None:
    """Bootstrap interval of quantile_q(arm) / quantile_q(ref): each replicate resamples both
    histograms from their own empirical distributions (the quantile of a resample drawn exactly,
    see `_bootstrap_quantiles`)."""
    if arm.n < 2 or ref.n < 2:
        return None
    rng = np.random.default_rng(seed)
    ratios = _bootstrap_quantiles(arm, q, reps, rng) / _bootstrap_quantiles(ref, q, reps, rng)
    lo, hi = np.quantile(ratios, [0.5 - level / 2, 0.5 + level / 2])
    return float(lo), float(hi)


def _bootstrap_quantiles(h: LatencyHistogram, q: float, reps: int, rng: np.random.Generator) -> np.ndarray:
    """The q-quantile (nearest rank k) of `reps` resamples of the histogram, drawn exactly without
    resampling: the k-th smallest of n draws from a distribution is its inverse CDF at the k-th
    smallest of n uniforms, which is Beta(k, n - k + 1)."""
    values, counts = h._arrays()
    n = int(counts.sum())
    k = max(1, math.ceil(q * n))
    cdf = np.cumsum(counts) / n
    u = rng.beta(k, n - k + 1, size=reps)
    return values[np.minimum(np.searchsorted(cdf, u, side="left"), len(values) - 1)]


def mean_difference_ci(a: Moments, b: Moments, level: float = 0.95) -> tuple[float, float] | None:
    """Welch interval of mean(a) - mean(b)."""
    if a.n < 2 or b.n < 2:
        return None
    va, vb = a.variance / a.n, b.variance / b.n
    se = math.sqrt(va + vb)
    d = a.mean - b.mean
    if se == 0:
        return d, d
    denom = va * va / (a.n - 1) + vb * vb / (b.n - 1)
    dof = (va + vb) ** 2 / denom if denom > 0 else math.inf
    half = sps.t.ppf(0.5 + level / 2, max(1.0, dof)) * se
    return d - half, d + half


def samples_needed(floor: Moments, arm: Moments, margin: float, *, power: float = 0.8, level: float = 0.95) -> int | None:
    """Comparisons of `arm` needed (with `floor` as it is) for the one-sided interval of
    mean(floor) - mean(arm) to fall under `margin` at the observed means and variances, with the
    given power; None when no number of arm samples will do (the observed difference is past the
    margin, or the floor's own uncertainty already fills the room)."""
    if floor.n < 2 or arm.n < 2:
        return None
    gap = margin - (floor.mean - arm.mean)
    if gap <= 0:
        return None
    z = sps.norm.ppf(0.5 + level / 2) + sps.norm.ppf(power)
    room = (gap / z) ** 2 - floor.variance / floor.n
    if arm.variance == 0:
        return arm.n if room > 0 else None
    return math.ceil(arm.variance / room) if room > 0 else None


def sign_test_p(wins: int, losses: int) -> float | None:
    """Two-sided p-value that wins and losses are equally likely (ties left out)."""
    if wins + losses == 0:
        return None
    return float(sps.binomtest(wins, wins + losses, 0.5).pvalue)
