"""Arms on an elastic cluster (`cluster.elastic`): their replicas arrive when GPU nodes join, or never.

Two things the ingress needs, both from Serve's own public API:

- `await_arms`: the ingress starts (so the application reports RUNNING, which KubeRay waits for
  before it routes traffic) once every arm answers, or `grace_s` after the first one did. A
  cluster being upgraded thus takes traffic only when it can serve it, arms whose nodes join
  within `grace_s` of each other all start serving together, and an arm whose nodes never come
  delays the fleet by at most `grace_s`.
- `unplaced_arms`: which arms have no running replica, and why, read from `serve.status()`
  (Serve's message names the resources a pending replica waits for, or the error its replicas
  failed to start with, e.g. a canary that disagrees with its reference), so `/health` and
  `/ready` can say it and the router sends nothing there.

An arm whose replicas fail to start (Serve gives up after 3 tries a replica) is not waited for:
its calls fail at once with Serve's `DeploymentUnavailableError` (`gave_up`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping

from serve.deploy_options import arm_deployment_name

log = logging.getLogger(__name__)

WAIT_LOG_INTERVAL_S = 30.0


async def await_arms(calls: Mapping[str, Callable[[], Awaitable]], grace_s: float, *, clock: Callable[[], float] = time.monotonic,
                     poll_s: float = 1.0, retry_s: float = 1.0, gave_up: Callable[[BaseException], bool] = lambda e: False) -> set[str]:  # fmt: skip
    """Call every arm (`calls[arm]()`, e.g. its `describe`) until each has answered once, or until
    `grace_s` has passed since the first answered; returns the arms that answered.
    A call that fails (the arm's replica crashed while starting) is made again `retry_s` later,
    unless `gave_up(error)`: the arm will not start (Serve gave up on it), and is not waited for."""
    start = clock()
    first: float | None = None  # when the first arm answered: the grace counts from there
    answered: set[str] = set()
    pending: dict[asyncio.Future, str] = {asyncio.ensure_future(_call(calls[a])): a for a in calls}
    last_log = start
    try:
        while pending:
            if first is not None and clock() - first >= grace_s:
                break
            done, _ = await asyncio.wait(pending, timeout=poll_s, return_when=asyncio.FIRST_COMPLETED)
            for future in done:
                arm = pending.pop(future)
                if future.exception() is None:
                    answered.add(arm)
                    first = clock() if first is None else first
                elif gave_up(future.exception()):
                    log.warning("arm %s will not start (%s); not waiting for it", arm, type(future.exception()).__name__)
                else:
                    log.warning("arm %s did not answer while starting (%s); asking again", arm, type(future.exception()).__name__)
                    pending[asyncio.ensure_future(_call(calls[arm], delay_s=retry_s))] = arm
            if pending and clock() - last_log >= WAIT_LOG_INTERVAL_S:
                last_log = clock()
                waited = f"{clock() - first:.0f} s of {grace_s:.0f} s grace" if first is not None else f"{clock() - start:.0f} s, none yet"
                log.warning("waiting for arms %s (answered: %s; %s)", sorted(pending.values()), sorted(answered) or "none", waited)
    finally:
        for future in pending:
            future.cancel()
    return answered


async def _call(call: Callable[[], Awaitable], delay_s: float = 0.0):
    if delay_s:
        await asyncio.sleep(delay_s)
    return await call()


def unplaced_arms(deployments: Mapping[str, tuple[int, str, str]], arms: list[str]) -> dict[str, str]:
    """arm -> why it has no running replica, from `deployments` (Serve deployment name ->
    (running replicas, status, Serve's message)); arms with a running replica are left out."""
    out = {}
    for arm in arms:
        running, status, message = deployments.get(arm_deployment_name(arm), (0, "absent", ""))
        if running == 0:
            reason = serve_reason(message)
            out[arm] = f"no replica running (Serve: {status}{': ' + reason if reason else ''})"
    return out


GAVE_UP = ("DEPLOY_FAILED", "UNHEALTHY")  # Serve's statuses of a deployment whose replicas failed to start, tried no more


def failed_arms(deployments: Mapping[str, tuple[int, str, str]], arms: list[str]) -> dict[str, str]:
    """arm -> why, for the arms Serve gave up on: no running replica, and their deployment
    DEPLOY_FAILED (at deploy) or UNHEALTHY (scaling up), after its replicas failed to start."""
    out = {}
    for arm in arms:
        running, status, message = deployments.get(arm_deployment_name(arm), (0, "absent", ""))
        if running == 0 and status in GAVE_UP:
            out[arm] = serve_reason(message) or status
    return out


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def serve_reason(message: str) -> str:
    """Serve's deployment message in one line: where it carries a replica's start-up error (a
    sentence, then "Error:" and the traceback), the sentence and the error's last line, e.g. "The
    deployment failed to start 3 times in a row: RuntimeError: arm 'nf4' ... cannot start: canary
    failed: ..."."""
    message = _ANSI.sub("", message).strip()
    head, sep, error = message.partition("Error:\n")
    if not sep:
        return message
    sentence = head.split(". ")[0].strip().rstrip(".")
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    return f"{sentence}: {lines[-1]}" if lines else sentence


def deployment_states(app_name: str) -> dict[str, tuple[int, str, str]]:
    """Serve deployment name -> (running replicas, status, message) of one application, from
    `serve.status()` (a controller call: a slow loop's work, never a request's)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {name: (int(d.replica_states.get("RUNNING", 0)), str(getattr(d.status, "value", d.status)), d.message or "") for name, d in app.deployments.items()}
