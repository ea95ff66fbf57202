"""The main job: `run_local` with the default config serves on 127.0.0.1 and stops cleanly on Ctrl-C."""

from __future__ import annotations

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
import pytest
import yaml
from serving_testkit import free_port

from serve.local import DEFAULT_CONFIG

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]


def test_main_job_serves_default_config_and_stops_on_ctrl_c(tiny_model, tmp_path):
    # The default config, with its model pinned to the folder the other tests use ("tiny" resolves
    # to the same folder unless RERANK_TEST_MODEL_DIR points elsewhere).
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["model"]["source"] = str(tiny_model)
    config_path = tmp_path / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
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
        assert f"http://127.0.0.1:{port}" in output and "curl" in output
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            assert c.get("/health").status_code == 200
            r = c.post("/v2/rerank", json={"query": "a red circle", "documents": ["a red circle", "a blue square"]})
            assert r.status_code == 200 and r.json()["meta"]["arm"] in {"fp32", "nf4"}
            arms = c.get("/v1/models").json()["data"][0]["arms"]
            assert [(a["name"], a["precision"]) for a in arms] == [("fp32", "fp32"), ("nf4", "nf4")]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, output
        reader.join(timeout=10)
        rest = "".join(lines.queue)
        assert "stopped." in rest, output + rest
        with socket.socket() as s:  # the HTTP proxy is gone with the cluster
            assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
