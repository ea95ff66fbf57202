"""The local layouts of serve/local.py: the split layout lays a fleet out as production does
(the HTTP path on a head node, the arms on a node of their own), each node on CPUs of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from serving_testkit import free_port

from engine.errors import ConfigError
from serve.config import FleetConfig
from serve.local import ARMS_RESOURCE, DEFAULT_CONFIG, HTTP_RESOURCE, place

PROBE = Path(__file__).resolve().parent / "split_layout_probe.py"
REPO = Path(__file__).resolve().parents[2]


def test_the_split_layout_steers_the_ingress_the_ledger_and_each_arm_to_their_node():
    fleet = FleetConfig.from_yaml(DEFAULT_CONFIG)
    assert place(fleet, "shared") is fleet
    split = place(fleet, "split")
    assert split.ingress.resources == {HTTP_RESOURCE: 1.0}  # the ledger asks for what the ingress asks for
    assert all(a.ray_actor_options.resources == {ARMS_RESOURCE: 1.0} for a in split.arms)
    assert [a.ray_actor_options.num_cpus for a in split.arms] == [a.ray_actor_options.num_cpus for a in fleet.arms]
    assert place(split, "split") == split
    with pytest.raises(ConfigError, match="layout must be one of shared, split"):
        place(fleet, "spread")


def cpu_set(kernel_list: str) -> set[int]:
    """A Cpus_allowed_list ("0-2,5") as a set of CPU numbers."""
    out: set[int] = set()
    for part in kernel_list.split(","):
        first, _, last = part.partition("-")
        out.update(range(int(first), int(last or first) + 1))
    return out


@pytest.mark.ray
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the split layout needs two CPUs")
def test_split_layout_runs_the_http_path_and_the_arms_on_cpus_of_their_own(tiny_model, tmp_path):
    """The main job's config in the split layout, started as the benches start it, in its own
    process with token auth on (no RAY_* settings): the worker node joins with the token, every arm
    replica runs on it and on the arm CPUs only; the head's processes (HAProxy, the ingress, the
    ledger, Serve's controller, its raylet and the GCS) and the driver on the head's CPU; a rerank
    answers 200 over HTTP."""
    allowed = sorted(os.sched_getaffinity(0))
    head, arms = {allowed[0]}, set(allowed[1:])
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["model"]["source"] = str(tiny_model)
    config_path = tmp_path / "local.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("RAY_")}, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, str(PROBE), str(config_path), str(free_port())], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["status"] == 200 and report["arm"] in {"fp32", "nf4"}, report
    assert report["auth"] == "token" and report["nodes"] == 2, report
    # What the benches record is what the kernel shows for each process.
    for row in report["placement"]:
        assert all(cpu_set(report["proc"][str(pid)]) == cpu_set(row["cpus"]) for pid in row["pids"]), (row, report["proc"])
    where: dict[str, set[tuple[str, frozenset[int]]]] = {}
    for row in report["placement"]:
        where.setdefault(row["role"], set()).add((row["node"], frozenset(cpu_set(row["cpus"]))))
    assert where["arm"] == {("worker", frozenset(arms))}, report
    for role in ("proxy", "ingress", "ledger", "controller", "gcs_server"):
        assert where[role] == {("head", frozenset(head))}, (role, report)
    assert where["raylet"] == {("head", frozenset(head)), ("worker", frozenset(arms))}, report
    assert where["load generator"] == {("", frozenset(head))}, report
    assert cpu_set(report["driver_after"]) == set(allowed), report  # the driver gets its CPUs back


def test_free_ports_come_from_outside_the_kernels_ephemeral_range_and_rays_worker_ports():
    """A port picked for HAProxy's stats page is bound only once Ray is up; Ray's processes bind
    port 0 meanwhile, so the pick must be one the kernel never hands out for port 0."""
    import socket

    from serve.local import RAY_WORKER_PORTS_END, _ephemeral_ports

    low, high = _ephemeral_ports()
    ports = {free_port() for _ in range(20)}
    assert all(RAY_WORKER_PORTS_END < p < low or p > high for p in ports), sorted(ports)
    assert len(ports) > 1  # picked at random, not the same one each time
    with socket.socket() as s:  # free on every interface, as HAProxy binds it
        s.bind(("", ports.pop()))
