"""The `Ledger` deployment: one replica holding the fleet's `ExperimentLedger` (see `serve.ledger`
for why the state lives here). Every method is a coroutine, so calls run one at a time on the
replica's event loop and never interleave a half-made change; a read waits on the loop while
flushes go on."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from ray import serve

from serve.config import FleetConfig
from serve.ledger import READ_WAIT_FLUSHES, ExperimentLedger, FlushReply, Shown
from serve.router import ControlState


@serve.deployment(name="Ledger")
class LedgerReplica:
    def __init__(self, config: dict):
        self.ledger = ExperimentLedger(FleetConfig.from_dict(config))
        self._flushed = asyncio.Condition()  # reads wait on it for the batches they need

    async def flush(self, source: str, seq: int, experiment: str, tally: dict | None, shown: list[Shown], sealed_after_read: int) -> FlushReply:
        async with self._flushed:
            reply = self.ledger.flush(source, seq, experiment, tally, shown, sealed_after_read)
            self._flushed.notify_all()
            return reply

    async def results(self) -> dict[str, Any]:
        """Read-your-writes: waits until every live ingress replica has sent a batch sealed after
        this read began, so every answer given before the read counts. A replica learns of the
        read from its next flush's reply and flushes again at once: about one flush interval. The
        wait is bounded; past it the results name the replicas that did not report."""
        read = self.ledger.begin_read()
        async with self._flushed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_WAIT_FLUSHES * self.ledger.fleet.experiment.flush_interval_s):
                    await self._flushed.wait_for(lambda: not self.ledger.unreported(read))
        return self.ledger.results(self.ledger.unreported(read))

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
