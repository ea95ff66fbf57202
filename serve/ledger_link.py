"""An ingress replica's side of the experiment ledger: what it recorded since its last flush, and
the delivery of it to the `Ledger` deployment exactly once.

Records go into a `Tally` and a list of shown rankings; a flush seals them into a numbered batch
(an empty one too: it is the replica's heartbeat) and sends every batch not yet acknowledged,
oldest first, one flush at a time. A batch whose call failed, timed out or was cancelled stays and
is sent again with the same number; the ledger ignores a number it has merged already, so a lost
reply never double-counts. Each batch names the experiment it was recorded in, so records from
before an experiment (re)start never reach the new one. While the ledger cannot be reached,
unsent batches are kept up to a bound.

Each batch also names the newest fleet-wide read of the results the replica knew of when it
sealed it: a read waits for a batch from every replica sealed after it began (`serve.ledger`).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass

from serve.experiments import Tally
from serve.ledger import FlushReply, Shown
from serve.router import ControlState

log = logging.getLogger(__name__)

LEDGER_TIMEOUT_S = 5.0
MAX_PENDING_BATCHES = 240  # a minute of flushes at 0.25 s; older unsent ones are merged together
MAX_PENDING_SHOWN = 20_000  # rankings kept while the ledger cannot be reached (feedback joins need them)
SHOWN_DEPTH = 100  # positions of a shown ranking kept for joining feedback (clicks past it are rare)


@dataclass
class Batch:
    seq: int
    experiment: str
    sealed_after_read: int  # the newest fleet-wide read begun when it was sealed
    tally: Tally
    shown: list[Shown]


class LedgerLink:
    def __init__(self, arms: list[str], handle, experiment: str):
        self.arms = arms
        self.source = uuid.uuid4().hex  # this replica, as the ledger knows it
        self.tally = Tally(arms)
        self.shown: list[Shown] = []
        self.experiment = experiment
        self.latest_read = 0  # the newest fleet-wide read the ledger has told of
        self._sealed_after_read = 0  # latest_read when the latest batch was sealed
        self._handle = handle
        self._seq = 0
        self._pending: list[Batch] = []
        self._lock = asyncio.Lock()

    def record_shown(self, request_id: str, arms: tuple[str, ...], order: list[int], teams: list[int], n: int) -> None:
        self.shown.append(Shown(request_id, arms, tuple(order[:SHOWN_DEPTH]), tuple(teams[:SHOWN_DEPTH]), n))

    @property
    def read_waiting(self) -> bool:
        """A fleet-wide read began after the latest batch was sealed: it waits for the next one."""
        return self._sealed_after_read < self.latest_read

    def _seal(self) -> None:
        self._seq += 1
        self._sealed_after_read = self.latest_read
        self._pending.append(Batch(self._seq, self.experiment, self.latest_read, self.tally, self.shown))
        self.tally, self.shown = Tally(self.arms), []
        if len(self._pending) > MAX_PENDING_BATCHES:  # the ledger has been away a while
            old, keep = self._pending[:-1], self._pending[-1]
            merged = Tally(self.arms)
            for b in [*old, keep]:
                merged.merge(b.tally)
            shown = [s for b in [*old, keep] for s in b.shown][-MAX_PENDING_SHOWN:]
            self._pending = [Batch(keep.seq, keep.experiment, keep.sealed_after_read, merged, shown)]

    async def flush(self) -> ControlState | None:
        """Send what is unsent; the ledger's control state, or None if it could not be reached."""
        async with self._lock:
            self._seal()
            try:
                async with asyncio.timeout(LEDGER_TIMEOUT_S):
                    while self._pending:
                        b = self._pending[0]
                        tally = None if b.tally.empty() else b.tally.to_dict()
                        reply: FlushReply = await self._handle.flush.remote(self.source, b.seq, b.experiment, tally, b.shown, b.sealed_after_read)
                        self._pending.pop(0)
            except Exception as e:  # noqa: BLE001 - the experiment must never break serving
                log.warning("cannot reach the experiment ledger (%s); %d batches wait", type(e).__name__, len(self._pending))
                return None
            self.experiment = reply.control.experiment
            self.latest_read = reply.latest_read
            return reply.control
