"""KubeRay's order of events, played on a simulated cluster (`ray.cluster_utils.Cluster`).

KubeRay submits the RayService's `serveConfigV2` to the head's dashboard (`PUT
/api/serve/applications/`) as soon as the head pod is ready, once, and never again while the
config is unchanged; GPU worker pods join afterwards (minutes later, or never for a sold-out
type); it routes traffic once every application reads RUNNING (`GET /api/serve/applications/`).
No Kubernetes runs here: this simulation is the evidence (docs/DEPLOY.md says so).

Each run: a head (no CPUs for replicas, as rendered) and the ingress nodes; the rendered Serve
config, changed only where this machine differs (the offline model on CPU, secret files in a
temporary folder, no cache Redis), submitted once through the dashboard's REST API; then the GPU
worker nodes, with fake GPUs and their `accelerator_type`. The second run never adds one GPU
type: the others serve, the missing arm is named with its reason, and the statuses KubeRay reads
let traffic through.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import httpx
import pytest
import yaml

from placement.kuberay import render_rayservice
from placement.render import INGRESS_RESOURCE
from serve.local import free_port

from test_simulated_cluster import SMALL_INVENTORY, _tiny_model_source, on_this_machine

pytestmark = [pytest.mark.ray, pytest.mark.skipif(_tiny_model_source() is None, reason="the tiny model is not built yet (the engine tests build it)")]

ARM_GRACE_S = 15  # the rendered 300 s, shortened: the run that lacks a GPU type waits this long for it
RUNNING_WITHIN_S = 240  # after the last node joins (model loads on two CPU cores included)
AUTH = {"authorization": "Bearer client-key"}


@pytest.fixture(scope="module")
def small_report():
    from placement.inventory import Inventory
    from placement.planner import plan_placement
    from placement.render import read_architecture_config

    inventory = Inventory.from_yaml(SMALL_INVENTORY)
    return plan_placement(inventory, read_architecture_config(inventory, SMALL_INVENTORY))


def submitted_config(report, secrets: Path, http_port: int) -> dict:
    """The RayService's serveConfigV2 as KubeRay submits it, changed only where this machine differs."""
    config = yaml.safe_load(render_rayservice(report).data["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    fleet = application["args"]["config"]
    assert fleet["cluster"]["elastic"] is True  # what the renderer writes for every cluster
    on_this_machine(fleet, secrets)
    fleet["cluster"]["arm_grace_s"] = ARM_GRACE_S
    fleet["cache"] = {"redis_url": None}  # the cache Redis's Service exists on Kubernetes only
    config["http_options"] = {"host": "127.0.0.1", "port": http_port}
    return config


class SimulatedKubeRay:
    """A head with the dashboard (no CPUs for replicas, as rendered) and the ingress nodes."""

    def __init__(self, report):
        from ray.cluster_utils import Cluster

        self.report = report
        self.dashboard_port = free_port()
        self.http_port = free_port()
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": True, "dashboard_port": self.dashboard_port},
        )
        for _ in range(report.inventory.deployment.ingress.replicas):
            self.cluster.add_node(num_cpus=1, num_gpus=0, resources={INGRESS_RESOURCE: 1})
        self.cluster.wait_for_nodes()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"

    def submit(self, config: dict) -> None:
        """KubeRay's one submission (`PUT /api/serve/applications/`), retried while the dashboard starts, as KubeRay does."""
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.put(f"{self.dashboard}/api/serve/applications/", json=config, timeout=30)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                response = None
            assert time.monotonic() < deadline, f"the dashboard refused the config: {response and response.text[-2000:]}"
            time.sleep(1)

    def app_statuses(self) -> dict[str, str]:
        """What KubeRay reads: every application's status from the dashboard."""
        body = httpx.get(f"{self.dashboard}/api/serve/applications/?api_type=declarative", timeout=30).json()
        return {name: app["status"] for name, app in (body.get("applications") or {}).items()}

    def add_gpu_nodes(self, skip: set[str] = frozenset()) -> None:
        for node in self.report.inventory.node_types:
            if node.name in skip:
                continue
            for _ in range(self.report.plan.nodes[node.name]):
                self.cluster.add_node(num_cpus=node.cpus_per_node, num_gpus=node.gpus_per_node, resources={f"accelerator_type:{node.accelerator_type}": 1})
        self.cluster.wait_for_nodes()

    def close(self) -> None:
        import ray
        from ray import serve

        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()


@pytest.fixture
def kuberay(small_report):
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a local test cluster; Ray 2.60 enables token auth otherwise
    sim = SimulatedKubeRay(small_report)
    sim.cluster.connect()
    try:
        yield sim
    finally:
        sim.close()


def _wait_running_and_answered(sim: SimulatedKubeRay, base_url: str, deadline: float) -> tuple[dict, dict]:
    """Poll as KubeRay does until every application is RUNNING, then send a rerank; returns the
    statuses and the answer (fails at `deadline`)."""
    statuses: dict = {}
    while time.monotonic() < deadline:
        statuses = sim.app_statuses()
        assert "DEPLOY_FAILED" not in statuses.values(), statuses
        if statuses and set(statuses.values()) == {"RUNNING"}:
            response = httpx.post(f"{base_url}/v2/rerank", headers=AUTH, timeout=60,
                                  json={"query": "a red circle", "documents": ["a red circle", "a blue square"]})  # fmt: skip
            if response.status_code == 200:
                return statuses, response.json()
        time.sleep(1)
    pytest.fail(f"not RUNNING and answering within the bound: {statuses}")


def test_the_rendered_config_runs_when_gpu_nodes_join_after_the_submission(kuberay, small_report, tmp_path):
    config = submitted_config(small_report, tmp_path, kuberay.http_port)
    kuberay.submit(config)
    base_url = f"http://127.0.0.1:{kuberay.http_port}"
    # Before any GPU node: the app is built (never refused for resources it lacks now) and waits.
    time.sleep(10)
    before = kuberay.app_statuses()
    assert before and set(before.values()) <= {"DEPLOYING", "NOT_STARTED"}, before
    kuberay.add_gpu_nodes()
    joined = time.monotonic()
    statuses, answer = _wait_running_and_answered(kuberay, base_url, joined + RUNNING_WITHIN_S)
    took = time.monotonic() - joined
    assert [r["index"] for r in answer["results"]][0] == 0  # the tiny model ranks the match first
    # Every arm serves once its replicas are up (the ingress's probe brings in any that answered after it started).
    deadline = time.monotonic() + 60
    while set((health := httpx.get(f"{base_url}/health", headers=AUTH, timeout=30).json())["arm_state"].values()) != {"up"}:
        assert time.monotonic() < deadline, health
        time.sleep(1)
    print(f"\nKubeRay order, every GPU type joins: RUNNING and answered {took:.0f} s after the last node joined; {statuses}")


def test_an_arm_whose_gpu_type_never_joins_degrades_the_fleet_without_holding_it(kuberay, small_report, tmp_path):
    config = submitted_config(small_report, tmp_path, kuberay.http_port)
    fleet = config["applications"][0]["args"]["config"]
    missing_type = "t4"
    missing = [a["name"] for a in fleet["arms"] if a["name"].endswith(f"-{missing_type}")]
    present = [a["name"] for a in fleet["arms"] if a["name"] not in missing]
    assert missing and present
    kuberay.submit(config)
    base_url = f"http://127.0.0.1:{kuberay.http_port}"
    kuberay.add_gpu_nodes(skip={missing_type})
    joined = time.monotonic()
    statuses, answer = _wait_running_and_answered(kuberay, base_url, joined + RUNNING_WITHIN_S + ARM_GRACE_S)
    assert set(statuses.values()) == {"RUNNING"}  # what KubeRay reads: traffic may flow
    answered_by = [httpx.post(f"{base_url}/v2/rerank", headers=AUTH, timeout=60, json={"query": "red", "documents": ["red", "blue"]})
                   for _ in range(6)]  # fmt: skip
    assert all(r.status_code == 200 for r in answered_by)
    assert {r.headers["x-rerank-arm"] for r in answered_by} <= set(present)
    health = httpx.get(f"{base_url}/health", headers=AUTH, timeout=30).json()
    for arm in missing:
        assert health["arm_state"][arm] == "down", health
    ready = httpx.get(f"{base_url}/ready", headers=AUTH, timeout=60)
    assert ready.status_code == 200 and set(ready.json()["degraded"]) == set(missing), ready.text
    for arm in missing:
        reason = ready.json()["arms"][arm]
        assert "no replica running" in reason or "no answer within cluster.arm_grace_s" in reason, reason
    print(f"\nKubeRay order, {missing_type} never joins: {statuses}; /ready: {json.dumps(ready.json())}")
