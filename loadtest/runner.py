"""Run Locust headless against a rerank endpoint and collect what a comparison report needs.

`run_loadtest(plan)`:

1. checks the target: every address the host name resolves to must be loopback unless
   `allow_remote` (nothing is sent anywhere before this check passes), and pins the checked
   address into the URL so Locust cannot resolve the name to something else later;
2. asks `/health`, then snapshots `/v1/experiments`;
3. runs `locust --headless` as a subprocess with Locust's own `-t` limit plus a hard wall-clock
   limit of its own, after which the process group is terminated, then killed;
4. snapshots `/v1/experiments` again once shadow traffic has settled (bounded polls);
5. writes `run.json` (the plan, timings, exit status) beside Locust's CSV and HTML.

Everything lands in `plan.out_dir`: locust_stats.csv, locust_stats_history.csv,
locust_failures.csv, locust_exceptions.csv, locust.html, locust.log, client_stats.json,
experiments_before.json, experiments_after.json, run.json.
"""

from __future__ import annotations

import ipaddress
import math
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

from loadtest.payloads import ENV_PREFIX, TrafficConfig, pinned_class_name

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
CSV_PREFIX = "locust"
# Locust's own startup (imports, drawing the image pool) and CSV/HTML writing after the run.
STARTUP_GRACE_S = 60.0
KILL_GRACE_S = 5.0
SHADOW_SETTLE_POLLS = 10
SHADOW_SETTLE_INTERVAL_S = 0.5


class RemoteTargetRefused(ValueError):
    """The target is not (only) loopback and remote targets were not allowed."""


class EndpointError(RuntimeError):
    """The endpoint did not answer as a rerank-fleet endpoint should."""


def checked_target(url: str, *, allow_remote: bool = False, resolve=socket.getaddrinfo) -> str:
    """The URL to send load to, after checking it.

    Without `allow_remote`, the host must resolve, and every address it resolves to must be
    loopback (127.0.0.0/8 or ::1); the returned URL then names the first such address instead
    of the host name, so no later resolution can lead elsewhere. Raises `RemoteTargetRefused`."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise RemoteTargetRefused(f"{url!r}: only http(s) URLs can be load-tested")
    host = parts.hostname
    if not host:
        raise RemoteTargetRefused(f"{url!r}: no host name")
    if allow_remote:
        return url.rstrip("/")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise RemoteTargetRefused(f"{url!r}: {e}") from None
    try:
        literal = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            infos = resolve(host, port, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as e:
            raise RemoteTargetRefused(f"{host!r} does not resolve ({e}); cannot check it is loopback") from None
        addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]
        if not addresses:
            raise RemoteTargetRefused(f"{host!r} resolves to no address")
    remote = sorted({str(a) for a in addresses if not a.is_loopback})
    if remote:
        raise RemoteTargetRefused(
            f"{host!r} resolves to non-loopback address(es) {remote}: load tests go to 127.0.0.0/8 or ::1 "
            "only, unless remote targets are explicitly allowed (--allow-remote)"
        )
    address = addresses[0]
    netloc = f"[{address}]" if address.version == 6 else str(address)
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


@dataclass(frozen=True)
class LoadTestPlan:
    host: str
    users: int = 8
    spawn_rate: float = 8.0
    duration_s: int = 60
    arms: tuple[str, ...] = ()  # empty: ask the endpoint
    mode: Literal["pinned", "split"] = "pinned"
    traffic: TrafficConfig = field(default_factory=TrafficConfig)
    out_dir: Path = Path("out/loadtest")
    wait_s: float = 0.1  # think time: each user waits uniformly 0..wait_s between requests
    stop_timeout_s: float = 10.0  # how long Locust lets in-flight requests finish at the end
    pin_header: str | None = None  # None: the endpoint's router.pin_header
    reference_arm: str | None = None  # None: the arm the shadow arm is compared against
    allow_remote: bool = False
    api_key: str | None = None
    start_local: str | None = None  # the fleet YAML the CLI started for this run (recorded only)

    def __post_init__(self) -> None:
        if self.users < 1 or self.spawn_rate <= 0 or self.duration_s < 1 or self.stop_timeout_s < 0 or self.wait_s < 0:
            raise ValueError("users >= 1, spawn_rate > 0, duration_s >= 1, stop_timeout_s >= 0 and wait_s >= 0 are required")
        if self.mode not in ("pinned", "split"):
            raise ValueError(f"mode must be 'pinned' or 'split', got {self.mode!r}")

    @property
    def wall_limit_s(self) -> float:
        """The hard limit on the Locust process, whatever Locust itself does."""
        return self.duration_s + self.stop_timeout_s + STARTUP_GRACE_S


@dataclass
class LoadTestRun:
    plan: LoadTestPlan
    target: str  # the checked URL load went to
    arms: tuple[str, ...]
    pin_header: str
    out_dir: Path
    started_at: str
    locust_returncode: int | None = None
    locust_wall_s: float | None = None
    killed: bool = False  # the hard limit ended Locust
    experiments_before: dict | None = None
    experiments_after: dict | None = None
    command: list[str] = field(default_factory=list)

    @property
    def stats_csv(self) -> Path:
        return self.out_dir / f"{CSV_PREFIX}_stats.csv"

    @property
    def failures_csv(self) -> Path:
        return self.out_dir / f"{CSV_PREFIX}_failures.csv"

    @property
    def html(self) -> Path:
        return self.out_dir / "locust.html"

    @property
    def client_stats(self) -> Path:
        return self.out_dir / "client_stats.json"

    def to_json(self) -> dict:
        plan = asdict(self.plan)
        plan["out_dir"] = str(self.plan.out_dir)
        plan["api_key"] = "***" if self.plan.api_key else None
        return {
            "plan": plan,
            "target": self.target,
            "arms": list(self.arms),
            "pin_header": self.pin_header,
            "started_at": self.started_at,
            "locust_returncode": self.locust_returncode,
            "locust_wall_s": self.locust_wall_s,
            "killed": self.killed,
            "command": self.command,
            "machine": machine_description(),
        }


def machine_description() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    try:
        locust_version = version("locust")
    except PackageNotFoundError:
        locust_version = None
    return {
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "locust": locust_version,
    }


def _get_json(client: httpx.Client, path: str) -> dict | None:
    try:
        r = client.get(path)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    try:
        data = r.json()
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def discover_arms(experiments: dict | None, models: dict | None) -> tuple[str, ...]:
    """Arm names in the endpoint's configured order: from /v1/experiments, else /v1/models."""
    if experiments and isinstance(experiments.get("arms"), dict) and experiments["arms"]:
        return tuple(experiments["arms"])
    if models:
        for card in models.get("data", []):
            names = tuple(a["name"] for a in card.get("arms", []) if "name" in a)
            if names:
                return names
    return ()


def _shadow_calls(experiments: dict | None) -> int:
    if not experiments:
        return 0
    total = 0
    for arm in experiments.get("arms", {}).values():
        s = arm.get("shadow", {})
        total += int(s.get("requests", 0)) + int(s.get("errors", 0)) + int(s.get("dropped", 0))
    return total


def settled_experiments(client: httpx.Client) -> dict | None:
    """/v1/experiments once shadow calls stop changing (they finish after their primary answers)."""
    previous = _get_json(client, "/v1/experiments")
    for _ in range(SHADOW_SETTLE_POLLS):
        time.sleep(SHADOW_SETTLE_INTERVAL_S)
        current = _get_json(client, "/v1/experiments")
        if current is None or _shadow_calls(current) == _shadow_calls(previous):
            return current or previous
        previous = current
    return previous


def locust_command(plan: LoadTestPlan, target: str, arms: tuple[str, ...], out_dir: Path) -> list[str]:
    classes = [pinned_class_name(a) for a in arms] if plan.mode == "pinned" else ["RouterSplitUser"]
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "-u", str(plan.users), "-r", str(plan.spawn_rate), "-t", f"{plan.duration_s}s",
        "--host", target, "--csv", str(out_dir / CSV_PREFIX), "--csv-full-history",
        "--html", str(out_dir / "locust.html"), "--stop-timeout", f"{math.ceil(plan.stop_timeout_s)}s",
        "--only-summary", "--loglevel", "WARNING", *classes,
    ]  # fmt: skip


def locust_env(plan: LoadTestPlan, arms: tuple[str, ...], pin_header: str, out_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and not k.startswith("LOCUST_")}
    env.update(plan.traffic.to_env())
    env.update({
        ENV_PREFIX + "ARMS": ",".join(arms),
        ENV_PREFIX + "MODE": plan.mode,
        ENV_PREFIX + "WAIT_S": str(plan.wait_s),
        ENV_PREFIX + "PIN_HEADER": pin_header,
        ENV_PREFIX + "CLIENT_STATS": str(out_dir / "client_stats.json"),
    })  # fmt: skip
    if plan.api_key:
        env[ENV_PREFIX + "API_KEY"] = plan.api_key
    # The locustfile imports loadtest.payloads (and workshop.tiny): make the checkout importable.
    root = str(LOCUSTFILE.parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_locust_process(command: list[str], env: dict[str, str], log_path: Path, wall_limit_s: float) -> tuple[int, float, bool]:
    """Run Locust in its own process group; after `wall_limit_s` terminate the group, then kill it.
    Returns (exit code, wall seconds, killed)."""
    started = time.monotonic()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip
        killed = False
        try:
            proc.wait(timeout=wall_limit_s)
        except subprocess.TimeoutExpired:
            killed = True
            os.killpg(proc.pid, signal.SIGTERM)  # the group Popen created for this process alone
            try:
                proc.wait(timeout=KILL_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=KILL_GRACE_S)
    return proc.returncode, time.monotonic() - started, killed


def run_loadtest(plan: LoadTestPlan) -> LoadTestRun:
    target = checked_target(plan.host, allow_remote=plan.allow_remote)
    out_dir = Path(plan.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    headers = {"authorization": f"Bearer {plan.api_key}"} if plan.api_key else {}
    # follow_redirects=False: like Locust, the runner never follows the endpoint elsewhere.
    with httpx.Client(base_url=target, timeout=10.0, headers=headers, follow_redirects=False) as client:
        health = _get_json(client, "/health")
        if health is None:
            raise EndpointError(f"{target}/health did not answer 200 with JSON: is the endpoint running?")
        before = _get_json(client, "/v1/experiments")
        arms = plan.arms or discover_arms(before, _get_json(client, "/v1/models"))
        if not arms:
            raise EndpointError(f"{target}: no arms given and neither /v1/experiments nor /v1/models names any")
        pin_header = plan.pin_header or (before or {}).get("router", {}).get("pin_header") or "x-rerank-arm"
        run = LoadTestRun(
            plan=plan, target=target, arms=tuple(arms), pin_header=pin_header, out_dir=out_dir,
            started_at=datetime.now(UTC).isoformat(timespec="seconds"), experiments_before=before,
        )  # fmt: skip
        run.command = locust_command(plan, target, run.arms, out_dir)
        env = locust_env(plan, run.arms, pin_header, out_dir)
        run.locust_returncode, run.locust_wall_s, run.killed = run_locust_process(
            run.command, env, out_dir / "locust.log", plan.wall_limit_s
        )
        run.experiments_after = settled_experiments(client)
    for name, data in (("experiments_before", run.experiments_before), ("experiments_after", run.experiments_after)):
        (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2))
    (out_dir / "run.json").write_text(json.dumps(run.to_json(), indent=2))
    return run


def load_run(out_dir: Path) -> dict:
    """What `run_loadtest` wrote to `out_dir`, as plain data (for the report)."""
    out_dir = Path(out_dir)

    def read(name: str):
        p = out_dir / name
        return json.loads(p.read_text()) if p.exists() else None

    return {
        "run": read("run.json"),
        "experiments_before": read("experiments_before.json"),
        "experiments_after": read("experiments_after.json"),
        "client_stats": read("client_stats.json"),
    }
