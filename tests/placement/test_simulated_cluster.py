"""A plan deployed on a simulated multi-node Ray cluster puts every replica on its planned node type.

One machine runs a head node (no GPUs) and one worker node per planned node of
configs/placement-small.yaml, each declaring fake GPUs and `accelerator_type:<name>` (the resource
Ray itself adds for a detected GPU). A decoy node with free GPUs of another type would attract
replicas whose pinning was missing. The Serve deployments use exactly the generated
`ray_actor_options` and replica counts.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from placement.render import INGRESS_RESOURCE
from serve.local import free_port  # outside the kernel's ephemeral range: a Ray process cannot take it first

pytestmark = pytest.mark.ray

REPO_ROOT = Path(__file__).resolve().parents[2]
SMALL_INVENTORY = REPO_ROOT / "configs" / "placement-small.yaml"
DECOY_ACCELERATOR = "A10G"


@pytest.fixture(scope="module")
def small_plan():
    from placement.inventory import Inventory
    from placement.planner import plan_placement
    from placement.render import read_architecture_config

    inventory = Inventory.from_yaml(SMALL_INVENTORY)
    report = plan_placement(inventory, read_architecture_config(inventory, SMALL_INVENTORY))
    # The plan must use both node types, or the test could not tell pinning from luck.
    assert {p.node_type for p in report.plan.placements} == {"l4", "t4"}
    return report


@pytest.fixture(scope="module")
def cluster(small_plan):
    os.environ["RAY_AUTH_MODE"] = "disabled"  # local test cluster; Ray 2.60 enables token auth otherwise
    import ray
    from ray.cluster_utils import Cluster

    sim = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": True, "dashboard_port": free_port()},
    )
    try:
        for node in small_plan.inventory.node_types:
            for _ in range(small_plan.plan.nodes[node.name]):
                sim.add_node(
                    num_cpus=node.cpus_per_node,
                    num_gpus=node.gpus_per_node,
                    resources={f"accelerator_type:{node.accelerator_type}": 1},
                )
        sim.add_node(num_cpus=2, num_gpus=2, resources={f"accelerator_type:{DECOY_ACCELERATOR}": 1})
        for _ in range(small_plan.inventory.deployment.ingress.replicas):  # the ingress nodes, as ray_up and kuberay declare them
            sim.add_node(num_cpus=1, num_gpus=0, resources={INGRESS_RESOURCE: 1})
        sim.wait_for_nodes()
        sim.connect()
        yield sim
    finally:
        from ray import serve

        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            sim.shutdown()


def _node_accelerators() -> dict[str, str | None]:
    import ray

    out = {}
    for node in ray.nodes():
        if node["Alive"]:
            types = [k.split(":", 1)[1] for k in node["Resources"] if k.startswith("accelerator_type:")]
            out[node["NodeID"]] = types[0] if types else None
    return out


def _replica_nodes(app_name: str) -> dict[str, list[str]]:
    """Deployment name -> node ids of its live replicas, from Ray's state API."""
    from ray.util.state import list_actors

    replicas: dict[str, list[str]] = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        prefix = f"ServeReplica:{app_name}:"
        if actor.class_name.startswith(prefix):
            replicas.setdefault(actor.class_name[len(prefix):], []).append(actor.node_id)
    return replicas


def _assert_every_replica_on_its_planned_node_type(report, app_name: str) -> None:
    accelerators = _node_accelerators()
    expected = {f"Arm-{p.precision}-{p.node_type}": p for p in report.plan.placements}
    node_types = {n.name: n for n in report.inventory.node_types}
    deadline = time.monotonic() + 20
    while True:  # the state API can lag the controller by a moment
        replicas = _replica_nodes(app_name)
        if all(len(replicas.get(name, [])) == p.replicas for name, p in expected.items()) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for name, placement in expected.items():
        nodes = replicas.get(name, [])
        assert len(nodes) == placement.replicas, f"{name}: {len(nodes)} replicas, planned {placement.replicas}"
        wanted = node_types[placement.node_type].accelerator_type
        assert Counter(accelerators[n] for n in nodes) == Counter({wanted: placement.replicas}), name
    arm_nodes = {n for name, nodes in replicas.items() if name.startswith("Arm-") for n in nodes}
    assert DECOY_ACCELERATOR not in {accelerators[n] for n in arm_nodes}
    # The ingress (and the ledger) run on the ingress nodes only, one ingress replica per node.
    ingress_nodes = {n["NodeID"] for n in __import__("ray").nodes() if n["Alive"] and INGRESS_RESOURCE in n["Resources"]}
    ingress = replicas.get("Ingress", [])
    assert len(ingress) == report.inventory.deployment.ingress.replicas == len(set(ingress)) and set(ingress) <= ingress_nodes
    assert set(replicas.get("Ledger", [])) <= ingress_nodes


def test_stand_in_deployments_land_on_their_planned_gpu_types(small_plan, cluster):
    """Minimal deployments per arm, with the generated replica counts and ray_actor_options."""
    from ray import serve

    from placement.render import render_serve_config

    config = render_serve_config(small_plan)
    (application,) = config["applications"]
    deployments = {d["name"]: d for d in application["deployments"]}

    @serve.deployment
    class ArmStandIn:
        def __call__(self) -> str:
            import ray

            return ray.get_runtime_context().get_node_id()

    @serve.deployment
    class IngressStandIn:
        def __init__(self, *arms):
            self.arms = arms

        async def __call__(self, request) -> str:
            return "ok"

    # Each arm as rendered: on a cluster whose nodes join later, it starts at 0 replicas and its
    # autoscaling policy asks for the planned count at once (serve/arm_scaling.py).
    arms = [
        ArmStandIn.options(
            name=name,
            autoscaling_config=settings["autoscaling_config"],
            ray_actor_options=settings["ray_actor_options"],
        ).bind()
        for name, settings in deployments.items()
        if name.startswith("Arm-")
    ]
    ingress = IngressStandIn.options(
        name="Ingress", num_replicas=deployments["Ingress"]["num_replicas"], max_replicas_per_node=deployments["Ingress"]["max_replicas_per_node"],
        ray_actor_options=deployments["Ingress"]["ray_actor_options"],
    ).bind(*arms)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, proxy_location="HeadOnly")
    serve.run(ingress, name="standin", route_prefix="/standin")
    try:
        _assert_every_replica_on_its_planned_node_type(small_plan, "standin")
    finally:
        serve.delete("standin")


def _tiny_model_source() -> str | None:
    """'tiny' when the offline model of this code is built (`serve.app.resolve_model` then finds
    it), else the build RERANK_TEST_MODEL_DIR names (as the top-level `tiny_model_dir` fixture
    does), else None: building it here would take minutes (the engine tests build it)."""
    try:
        from workshop.tiny import TINY_MODEL_NAME, build_fingerprint, cache_root
    except ImportError:
        return None
    if (cache_root() / f"{TINY_MODEL_NAME}-{build_fingerprint()}" / "DONE").exists():
        return "tiny"
    override = os.environ.get("RERANK_TEST_MODEL_DIR")
    return override if override and (Path(override) / "DONE").exists() else None


@pytest.mark.skipif(_tiny_model_source() is None, reason="the tiny model is not built yet (the engine tests build it)")
def test_the_serving_app_lands_on_its_planned_gpu_types(small_plan, cluster, tmp_path_factory):
    """The real app (`serve.app.build_app`) from the generated Serve config, model source 'tiny'
    (or the tiny build RERANK_TEST_MODEL_DIR names).

    Only three things change from the generated config: the model is the project's tiny offline
    model, the engines run on CPU since the GPUs are simulated, and the secret files it references
    are in a temporary folder. Replica counts and ray_actor_options are as generated.
    """
    from ray import serve

    from placement.render import render_serve_config
    from serve.app import build_app

    (application,) = render_serve_config(small_plan)["applications"]
    fleet = on_this_machine(application["args"]["config"], tmp_path_factory.mktemp("secrets"))
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()}, proxy_location="HeadOnly")
    serve.run(build_app({"config": fleet}), name="rerank-app", route_prefix="/rerank-app")
    try:
        _assert_every_replica_on_its_planned_node_type(small_plan, "rerank-app")
    finally:
        serve.delete("rerank-app")


def on_this_machine(fleet: dict, secrets: Path) -> dict:
    """A rendered fleet config changed only where this machine differs from the cluster: the
    offline model on CPU (the GPUs are simulated), and the secret files it names in `secrets`."""
    fleet["model"]["source"] = _tiny_model_source()
    (secrets / "api-keys").write_text("client-key")
    (secrets / "admin-keys").write_text("ops=admin-key")
    for field in ("api_keys_from", "admin_keys_from"):
        fleet[field] = {"file": str(secrets / Path(fleet[field]["file"]).name)}
    for arm in fleet["arms"]:
        arm["device"] = "cpu"
    return fleet


def test_small_inventory_matches_the_simulated_nodes():
    data = yaml.safe_load(SMALL_INVENTORY.read_text())
    assert {n["gpu"] for n in data["node_types"]} == {"L4", "T4"}
