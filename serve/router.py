"""Which arm answers a request, and whether a second arm shadows it. Pure logic: no Ray, no I/O.

Precedence: an explicit pin (header or body field) wins, then interleaving (a sampled request is
answered by two arms' rankings merged, team-draft), then a sticky key, then a weighted random
draw. Sticky assignment is weighted rendezvous hashing: each arm draws an exponential variable
from SHA-256(key, arm) and the smallest draw / weight wins, so it is deterministic across
processes and restarts, and a weight change moves only the users it must (moving 10 % of the
traffic moves about 10 % of users; an arm taken out moves only its own users).
Shadowing mirrors a fraction of requests to the shadow arm, never to the arm that answered; the
noise floor mirrors a fraction of the reference arm's requests to the reference arm itself.
Arms the ingress sees as down (`serve.health`) take no routed traffic: a sticky or weighted
request whose arm is down goes to the others by their weights ("failover"); a pin is kept (the
ingress refuses it at once), and a down arm is never a shadow.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from engine.errors import InputError

RouteReason = Literal["pinned", "sticky", "weighted", "failover", "interleaved"]


@dataclass(frozen=True)
class RouteDecision:
    arm: str
    reason: RouteReason
    shadow_arm: str | None = None
    interleave_with: str | None = None  # reason "interleaved": the second arm whose ranking is merged in


@dataclass(frozen=True)
class ShadowPolicy:
    arm: str
    fraction: float


@dataclass(frozen=True)
class NoiseFloorPolicy:
    """Mirror `fraction` of the reference arm's routed requests to the reference arm itself."""

    arm: str
    fraction: float


@dataclass(frozen=True)
class InterleavePolicy:
    arms: tuple[str, str]
    fraction: float


@dataclass(frozen=True)
class ControlState:
    """What every ingress routes by, as the experiment ledger publishes it
    (`serve.ledger.ExperimentLedger.control_state`). A replica follows a state unless it is older
    than the one it has: a newer `version`, or any other `epoch` (a restarted ledger)."""

    epoch: float
    version: int
    experiment: str
    active: bool
    weights: dict[str, float]  # routed weights now: ramp and guardrails applied
    shadow: ShadowPolicy | None
    noise_floor: NoiseFloorPolicy
    interleave: InterleavePolicy | None

    def to_json(self) -> dict[str, Any]:
        """Plain data for an HTTP answer."""
        data = asdict(self)
        if self.interleave:
            data["interleave"]["arms"] = list(self.interleave.arms)
        return data


class ArmRouter:
    def __init__(
        self,
        weights: Mapping[str, float],
        *,
        shadow: ShadowPolicy | None = None,
        noise_floor: NoiseFloorPolicy | None = None,
        interleave: InterleavePolicy | None = None,
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
        for policy in (shadow, noise_floor):
            if policy is not None and policy.arm not in weights:
                raise ValueError(f"shadow arm {policy.arm!r} is not an arm")
        if interleave is not None and not set(interleave.arms) <= set(weights):
            raise ValueError(f"interleaved arms {interleave.arms} are not all arms")
        self.arms: tuple[str, ...] = tuple(weights)
        self.shares: dict[str, float] = {a: weights[a] / total for a in self.arms}
        # Arms with zero weight take no routed traffic (pins and shadow still reach them).
        self._routable = [a for a in self.arms if weights[a] > 0]
        self.shadow = shadow
        self.noise_floor = noise_floor
        self.interleave = interleave
        self._rng = rng or random.Random()
        self._salt = salt

    @classmethod
    def from_control(cls, control: ControlState, *, rng: random.Random | None = None) -> ArmRouter:
        """From the experiment ledger's control state: the live weights, shadow, noise floor and
        interleaving the ingress routes by."""
        return cls(control.weights, shadow=control.shadow, noise_floor=control.noise_floor, interleave=control.interleave, rng=rng)

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
        elif self._interleaves(down):
            first, second = self.interleave.arms if self._rng.random() < 0.5 else self.interleave.arms[::-1]
            return RouteDecision(arm=first, reason="interleaved", interleave_with=second)
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
        """The arm a sticky key maps to: a function of the key and the weights only (weighted
        rendezvous hashing: the smallest Exp(1) draw of SHA-256(key, arm) divided by the weight)."""
        return min(self._routable, key=lambda arm: -math.log(self._unit(key, arm)) / self.shares[arm])

    def _unit(self, key: str, arm: str) -> float:
        digest = hashlib.sha256(f"{self._salt}\x00{key}\x00{arm}".encode()).digest()
        return (int.from_bytes(digest[:8], "big") + 1) / (2**64 + 1)  # uniform in (0, 1)

    def _pick(self, u: float) -> str:
        acc = 0.0
        for arm in self._routable:
            acc += self.shares[arm]
            if u < acc:
                return arm
        return self._routable[-1]  # float sums may fall short of 1

    def _interleaves(self, down: frozenset[str]) -> bool:
        p = self.interleave
        return p is not None and p.fraction > 0 and not set(p.arms) & down and self._rng.random() < p.fraction

    def _shadow_for(self, primary: str, down: frozenset[str] = frozenset()) -> str | None:
        u = self._rng.random()
        floor = self.noise_floor
        if floor is not None and floor.arm == primary and floor.fraction > 0:
            if u < floor.fraction:
                return primary
            u -= floor.fraction
        if self.shadow is None or self.shadow.fraction <= 0 or self.shadow.arm == primary or self.shadow.arm in down:
            return None
        return self.shadow.arm if u < self.shadow.fraction else None


def resolve_pin(header_value: str | None, body_value: str | None, header_name: str) -> tuple[str | None, str]:
    """The pinned arm and the field to blame if it is wrong; header and body must agree when both are set."""
    if header_value is not None and body_value is not None and header_value != body_value:
        raise InputError("arm", f"body field arm={body_value!r} conflicts with header {header_name}={header_value!r}")
    if body_value is not None:
        return body_value, "arm"
    return header_value, header_name
