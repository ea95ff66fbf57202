"""The main job, as a user runs it (no RAY_* settings): `run_local` with the default config says
when it is ready, serves HTTP on 127.0.0.1 only through Serve's fast path (HAProxy, throughput
mode), lets nobody on the network into its Ray cluster without the token it made, and on Ctrl-C
drains: requests in flight finish (none dropped), then it stops cleanly."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
import yaml
from listener_probe import exposed, listeners, node_address
from serving_testkit import free_port

from serve.local import DEFAULT_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_main_job_serves_default_config_and_stops_on_ctrl_c(tiny_model, tmp_path):
    # The default config, with its model pinned to the folder the other tests use ("tiny" resolves
    # to the same folder unless RERANK_TEST_MODEL_DIR points elsewhere).
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["model"]["source"] = str(tiny_model)
    for arm in config["arms"]:  # the drain below holds five long requests in flight; admission has its own tests
        arm["queue_budget_s"] = 10.0
    config_path = tmp_path / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    # As a user runs it: none of the test suite's Ray settings (auth off) reach the job.
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "PYTHONUNBUFFERED": "1"}
    code = f"import sys; from serve.local import run_local; sys.exit(run_local({str(config_path)!r}, None, {port}))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not any("Ctrl-C stops." in line for line in seen):
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                if proc.poll() is not None:
                    break
        output = "".join(seen)
        assert "Ctrl-C stops." in output, output
        assert "ready: rerank-fleet serving" in output and f"http://127.0.0.1:{port}" in output and "curl" in output
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.get("/health").status_code == 200
            ready = c.get("/ready")
            assert ready.status_code == 200 and ready.json()["arms"] == {"fp32": "ok", "nf4": "ok"}, ready.text
            r = c.post("/v2/rerank", json={"query": "a red circle", "documents": ["a red circle", "a blue square"]})
            assert r.status_code == 200 and r.json()["meta"]["arm"] in {"fp32", "nf4"}
            arms = c.get("/v1/models").json()["data"][0]["arms"]
            assert [(a["name"], a["precision"]) for a in arms] == [("fp32", "fp32"), ("nf4", "nf4")]
        # Serve's HTTP (HAProxy's frontend, the ingress replicas it forwards to) is on loopback only.
        found = listeners(proc.pid)
        assert [ip for _, ip, p, _ in found if p == port] == ["127.0.0.1"], found
        assert any(name == "haproxy" for name, *_ in found), found  # the fast path is the one serving
        token = next(psutil.Process(pid).environ()["RAY_AUTH_TOKEN"] for name, _, _, pid in found if name == "gcs_server")
        # Ray's gRPC servers bind every interface whatever the node address (Ray resolves loopback
        # to a reachable address): each must refuse a caller without the token, and let the token
        # in (the control). What else is reachable is read-only metrics (README "Security").
        probed = exposed(proc.pid, token)
        assert {v.verdict for v in probed} <= {"token required", "metrics page"}, [v for v in probed if v.verdict not in ("token required", "metrics page")]
        assert any(v.process == "gcs_server" and v.verdict == "token required" for v in probed), probed
        # A Ray client on the network, as an attacker would start one: refused without the token.
        gcs = next(p for name, _, p, _ in found if name == "gcs_server")
        join = f"import ray; ray.init(address='{node_address()}:{gcs}'); print('joined')"
        stranger = {**env, "HOME": str(tmp_path)}  # no ~/.ray/auth_token either
        refused = subprocess.run([sys.executable, "-c", join], env=stranger, capture_output=True, text=True, timeout=180)
        assert refused.returncode != 0 and "joined" not in refused.stdout, refused.stdout + refused.stderr
        allowed = subprocess.run([sys.executable, "-c", join], env={**stranger, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}, capture_output=True, text=True, timeout=180)
        assert allowed.returncode == 0 and "joined" in allowed.stdout, allowed.stdout + allowed.stderr  # the control

        # Ctrl-C with requests in flight: every one of them is answered before the job stops.
        # Long enough (about a second each on two cores) that the five overlap wherever they start.
        docs = [f"document number {i} about a red circle, " + "with a few more words about shapes and colours " * 6 for i in range(48)]
        in_flight: list[int] = []

        def one_request():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
                r = c.post("/v2/rerank", json={"query": "a red circle", "documents": docs})
                in_flight.append(r.status_code if r.status_code == 200 else (r.status_code, r.text))

        # 5 requests: within every arm's queue budget (raised above) and the ingress's gate, so none
        # is refused whichever arm each lands on.
        clients = [threading.Thread(target=one_request) for _ in range(5)]
        for t in clients:
            t.start()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            deadline = time.monotonic() + 30
            while (seen_in_flight := c.get("/health").json()["in_flight"]) < len(clients) and time.monotonic() < deadline:
                time.sleep(0.01)
            # Every request is in the ingress or an arm: signal at once, on that very sample (a second
            # /health round trip on two busy cores can outlast the requests themselves).
            assert seen_in_flight == len(clients)
            proc.send_signal(signal.SIGINT)
            while not c.get("/health").json()["draining"]:
                time.sleep(0.05)
            late = c.post("/v2/rerank", json={"query": "late", "documents": ["a"]})
            assert late.status_code == 503 and late.headers["retry-after"] and "draining" in late.json()["error"]["message"]
        for t in clients:
            t.join(timeout=120)
        assert in_flight == [200] * len(clients), in_flight
        assert proc.wait(timeout=120) == 0, output
        reader.join(timeout=10)
        rest = "".join(lines.queue)
        assert "draining in-flight requests" in rest and "stopped." in rest, output + rest
        with socket.socket() as s:  # the HTTP proxy is gone with the cluster
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:  # the test failed: stop the job and all it started (HAProxy would outlive a killed actor)
            tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
            for pid in reversed(tree):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            proc.wait()
