"""The `Ledger` deployment: one replica holding the fleet's `ExperimentLedger` (see `serve.ledger`
for why the state lives here). Every method is a coroutine, so calls run one at a time on the
replica's event loop and never interleave a half-made change."""

from __future__ import annotations

from typing import Any

from ray import serve

from serve.config import FleetConfig
from serve.ledger import ExperimentLedger, Shown
from serve.router import ControlState


@serve.deployment(name="Ledger")
class LedgerReplica:
    def __init__(self, config: dict):
        self.ledger = ExperimentLedger(FleetConfig.from_dict(config))

    async def flush(self, source: str, seq: int, experiment: str, tally: dict | None, shown: list[Shown]) -> ControlState:
        return self.ledger.flush(source, seq, experiment, tally, shown)

    async def control(self) -> ControlState:
        return self.ledger.control_state()

    async def results(self) -> dict[str, Any]:
        return self.ledger.results()

    async def feedback(self, request_id: str, clicked: list[int], purchased: list[int] | None) -> dict[str, Any]:
        return self.ledger.feedback(request_id, clicked, purchased)

    async def set_weights(self, who: str, weights: dict[str, float]) -> ControlState:
        return self.ledger.set_weights(who, weights)

    async def set_shadow(self, who: str, arm: str | None, fraction: float | None, noise_floor_fraction: float | None,
                         interleave_fraction: float | None) -> ControlState:  # fmt: skip
        return self.ledger.set_shadow(who, arm, fraction, noise_floor_fraction, interleave_fraction)

    async def start(self, who: str, name: str) -> ControlState:
        return self.ledger.start(who, name)

    async def stop(self, who: str) -> ControlState:
        return self.ledger.stop(who)
