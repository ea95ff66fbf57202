"""What an arm answers for one request (pure data, shared by the arm, the ingress and the stats)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArmResult:
    scores: list[float]
    arm: str
    precision: str
    model: str
    cache_hits: int
    cache_misses: int
    batch_requests: int  # requests merged into the forward pass that produced these scores
    # Cache events (hit_local, redis_error, bypass, ...) of this request's lookups and stores.
    cache_events: dict[str, int] = field(default_factory=dict)
    tokens: int = 0  # tokens the decoder ran for this request (a shared prefix counted once)
