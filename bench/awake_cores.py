"""Keep this machine's cores from idling during a bench, as dedicated cores would.

Some VMs hand a vCPU that halts back to the host at once (the 2-core VM of docs/BENCHMARKS.md runs
`cpuidle-haltpoll` with `guest_halt_poll_ns=0` under a nested hypervisor): another tenant runs on
the physical core meanwhile, and the vCPU comes back with cold caches. Measured on such a VM
(docs/BENCHMARKS.md): the tiny engine's 8-document request takes 13.7 ms back to back and 24.7 ms
after a 0.5 ms pause. At 1 request in flight every process on the request path pauses between
hops, so every hop pays it, and what is measured is the host's scheduler, not Serve or the engine.

`awake_cores` runs one busy loop per core under `SCHED_IDLE`, the lowest CPU class: it runs only
when nothing else wants the core, and a waking task preempts it at once. The vCPU never halts,
and the figures are those of dedicated cores (a bare-metal node, or a Kubernetes pod with
static CPU-manager cores). `rerank-fleet bench idle-gap` (bench/idle_gap.py) measures the effect on the engine alone.
Its cost: while a task of the bench competes with it for a core, the
loop's share is CFS's weight 3 against the task's (1024 at nice 0, 36 at Ray's worker niceness
15): at most ~8 % of that core. Each loop ends by itself after `max_s`, and with the bench.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator

LOOP = """
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    pass
"""


@contextlib.contextmanager
def awake_cores(enabled: bool, max_s: float = 3600) -> Iterator[list[int]]:
    """A `SCHED_IDLE` busy loop on each of this process's CPUs while the block runs (when
    `enabled`); yields the CPUs it keeps awake."""
    with awake_cores_on(sorted(os.sched_getaffinity(0)) if enabled else [], max_s) as cpus:
        yield cpus


@contextlib.contextmanager
def awake_cores_on(cpus: list[int], max_s: float = 3600) -> Iterator[list[int]]:
    loops = [subprocess.Popen([sys.executable, "-c", LOOP, str(cpu), str(max_s)]) for cpu in cpus]
    try:
        yield cpus
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
