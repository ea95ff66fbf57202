"""Which arm answers a request, and whether a second arm shadows it. Pure logic: no Ray, no I/O.

Precedence: an explicit pin (header or body field) wins, then a sticky key, then a weighted
random draw. Sticky assignment hashes the key with SHA-256 onto the cumulative weights, so it
is deterministic across processes and restarts and stable while the weights are unchanged.
Shadowing mirrors a fraction of requests to the shadow arm, never to the arm that answered.
Arms the ingress sees as down (`serve.health`) take no routed traffic: a sticky or weighted
request whose arm is down goes to the others by their weights ("failover"); a pin is kept (the
ingress refuses it at once), and a down arm is never a shadow.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from engine.errors import InputError

RouteReason = Literal["pinned", "sticky", "weighted", "failover"]


@dataclass(frozen=True)
class RouteDecision:
    arm: str
    reason: RouteReason
    shadow_arm: str | None = None


@dataclass(frozen=True)
class ShadowPolicy:
    arm: str
    fraction: float


class ArmRouter:
    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        shadow: ShadowPolicy | None = None,
        rng: random.Random | None = None,
        salt: str = "",
    ):
        if not weights:
            raise ValueError("no arms")
        if any(w < 0 for w in weights.values()):
            raise ValueError("weights must be >= 0")
        total = float(sum(weights.values()))
        if total <= 0:
            raise ValueError("at least one weight must be > 0")
        if shadow is not None and shadow.arm not in weights:
            raise ValueError(f"shadow arm {shadow.arm!r} is not an arm")
        self.arms: tuple[str, ...] = tuple(weights)
        self.shares: dict[str, float] = {a: weights[a] / total for a in self.arms}
        # Arms with zero weight take no routed traffic (pins and shadow still reach them).
        self._routable = [a for a in self.arms if weights[a] > 0]
        cumulative, acc = [], 0.0
        for a in self._routable:
            acc += weights[a] / total
            cumulative.append(acc)
        cumulative[-1] = 1.0  # float sums may fall short of 1
        self._cumulative = cumulative
        self.shadow = shadow
        self._rng = rng or random.Random()
        self._salt = salt

    @classmethod
    def from_config(cls, fleet, *, rng: random.Random | None = None) -> ArmRouter:
        """From a `FleetConfig`: arm weights in config order, shadow policy from `router.shadow`."""
        shadow_cfg = fleet.router.shadow
        shadow = ShadowPolicy(arm=shadow_cfg.arm, fraction=shadow_cfg.fraction) if shadow_cfg else None
        return cls({a.name: a.weight for a in fleet.arms}, shadow=shadow, rng=rng)

    def route(
        self,
        *,
        pin: str | None = None,
        pin_field: str = "arm",
        sticky_key: str | None = None,
        down: frozenset[str] = frozenset(),
    ) -> RouteDecision:
        if pin is not None:
            if pin not in self.arms:
                raise InputError(pin_field, f"unknown arm {pin!r}; arms are {list(self.arms)}")
            arm, reason = pin, "pinned"
        elif sticky_key is not None:
            arm, reason = self.sticky_arm(sticky_key), "sticky"
        else:
            arm, reason = self._pick(self._rng.random()), "weighted"
        if reason != "pinned" and arm in down:
            arm, reason = self.failover(arm, down), "failover"
        return RouteDecision(arm=arm, reason=reason, shadow_arm=self._shadow_for(arm, down))  # type: ignore[arg-type]

    def failover(self, arm: str, down: frozenset[str]) -> str:
        """Another routable arm, drawn by weight among those not down; `arm` itself when none is."""
        others = [a for a in self._routable if a != arm and a not in down]
        if not others:
            return arm
        weights = [self.shares[a] for a in others]
        return self._rng.choices(others, weights=weights)[0]

    def sticky_arm(self, key: str) -> str:
        """The arm a sticky key maps to: a function of the key and the weights only."""
        digest = hashlib.sha256((self._salt + "\x00" + key).encode("utf-8")).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64  # uniform in [0, 1)
        return self._pick(u)

    def _pick(self, u: float) -> str:
        return self._routable[min(bisect.bisect_right(self._cumulative, u), len(self._routable) - 1)]

    def _shadow_for(self, primary: str, down: frozenset[str] = frozenset()) -> str | None:
        if self.shadow is None or self.shadow.fraction <= 0 or self.shadow.arm == primary or self.shadow.arm in down:
            return None
        return self.shadow.arm if self._rng.random() < self.shadow.fraction else None


def resolve_pin(header_value: str | None, body_value: str | None, header_name: str) -> tuple[str | None, str]:
    """The pinned arm and the field to blame if it is wrong; header and body must agree when both are set."""
    if header_value is not None and body_value is not None and header_value != body_value:
        raise InputError("arm", f"body field arm={body_value!r} conflicts with header {header_name}={header_value!r}")
    if body_value is not None:
        return body_value, "arm"
    return header_value, header_name
