"""Run in its own process by test_serve_local_layout.py: start a fleet config in the split layout
(serve/local.py) as the benches do, answer one rerank over HTTP, and print as JSON where each
process ran, as the benches record it (`bench.serve_cpu.placement`), with the Cpus_allowed_list the
kernel shows in /proc for each of its pids.

Usage: python split_layout_probe.py CONFIG_YAML PORT
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import httpx


def cpus_allowed_list(pid: int) -> str:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list:"))


def main(config: str, port: int) -> None:
    from bench.serve_cpu import placement
    from serve.local import embedded_serve, local_fleet, wait_until_ready

    with embedded_serve(local_fleet(config, None, port), layout="split") as base:
        import ray  # only now: Ray reads its auth settings when first imported, and embedded_serve sets them

        if not wait_until_ready(base, 300, threading.Event()):
            raise SystemExit(f"not ready: {httpx.get(f'{base}/ready', timeout=30).text}")
        answer = httpx.post(f"{base}/v2/rerank", json={"query": "a red circle", "documents": ["a red circle", "a blue square"]}, timeout=60)
        rows = placement()
        report = {"status": answer.status_code, "arm": answer.headers.get("x-rerank-arm"), "auth": os.environ.get("RAY_AUTH_MODE"),
                  "nodes": len([n for n in ray.nodes() if n["Alive"]]), "placement": rows,
                  "proc": {pid: cpus_allowed_list(pid) for r in rows for pid in r["pids"]}}  # fmt: skip
    report["driver_after"] = cpus_allowed_list(os.getpid())
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
