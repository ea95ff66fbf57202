"""Hardware rules, inventory validation, throughput sources, and the planner's rejections."""

from __future__ import annotations

import copy

import pytest

from placement.hardware import GPU_CATALOGUE, gpu_for_device_name, hardware_support
from placement.inventory import Inventory, InventoryError
from placement.memory import count_parameters, read_architecture
from placement.planner import pair_shape_of, plan_placement
from placement.solve import PlacementInfeasible
from placement.profiles import BenchEngineReport, read_bench_reports
from placement.throughput import KERNEL_EFFICIENCY, mean_pair_flops

BASE = {
    "model": {"name": "qwen3-vl-8b", "source": "Qwen/Qwen3-VL-Reranker-8B", "awq_checkpoint": "/models/awq"},
    "node_types": [
        {"name": "l4", "gpu": "L4", "gpus_per_node": 1, "max_nodes": 8, "cost_per_hour": 0.8},
        {"name": "t4", "gpu": "T4", "gpus_per_node": 1, "max_nodes": 8, "cost_per_hour": 0.5},
    ],
    "traffic": {"target_qps": 1, "documents_per_request": 10, "tokens_per_document": 256},
    "arms": [{"precision": "bf16"}, {"precision": "fp16"}, {"precision": "nf4"}],
}


def inventory(**changes) -> Inventory:
    data = copy.deepcopy(BASE)
    for key, value in changes.items():
        data[key] = value
    return Inventory.from_dict(data)


# ---- hardware rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("precision", "gpu", "supported"),
    [
        ("bf16", "T4", False),
        ("bf16", "V100-16GB", False),
        ("bf16", "A10G", True),
        ("fp16", "T4", True),
        ("fp8", "A100-80GB", False),
        ("fp8", "RTX-3060", False),
        ("fp8", "L4", True),
        ("fp8", "H100-80GB", True),
        ("awq", "T4", False),
        ("awq", "RTX-A4000", True),
        ("nf4", "V100-16GB", True),
        ("int8", "T4", True),
    ],
)
def test_precision_needs_its_compute_capability(precision, gpu, supported):
    reason = hardware_support(precision, GPU_CATALOGUE[gpu].compute_capability)
    assert (reason is None) == supported
    if not supported:
        assert "compute capability" in reason


def test_bf16_refused_below_ampere_names_fp16_as_the_alternative():
    assert "use fp16" in hardware_support("bf16", 7.5)


# ---- inventory validation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field", "reason"),
    [
        ({"node_types": [{**BASE["node_types"][0], "gpu": "T5"}]}, "node_types.0.gpu", "unknown GPU 'T5'"),
        ({"node_types": [{**BASE["node_types"][0], "count": 2}]}, "node_types.0", "either count"),
        ({"node_types": [{**BASE["node_types"][0], "gpus_per_node": 0}]}, "node_types.0.gpus_per_node", "greater than or equal"),
        ({"node_types": [{**BASE["node_types"][0], "colour": "red"}]}, "node_types.0.colour", "Extra inputs"),
        ({"traffic": {"target_qps": -1, "documents_per_request": 1, "tokens_per_document": 1}}, "traffic.target_qps", "greater than"),
        ({"arms": [{"precision": "fp32"}]}, "arms.0.precision", "Input should be"),
        ({"arms": [{"precision": "bf16", "share": 0.7}, {"precision": "fp8", "share": 0.7}]}, "arms", "more than 1"),
        ({"arms": [{"precision": "bf16", "share": 0.5}, {"precision": "fp8", "share": 0.4}]}, "arms", "must add up to 1"),
        ({"model": {"name": "m", "source": "s"}, "arms": [{"precision": "awq"}]}, "awq_checkpoint", "required"),
        (
            {"node_types": [{**BASE["node_types"][0], "gpus_per_node": 4, "cpus_per_node": 4}]},
            "node_types.l4.cpus_per_node",
            "cannot host 4 replicas",
        ),
        (
            {"node_types": [BASE["node_types"][0], {**BASE["node_types"][0], "name": "l4-big", "gpus_per_node": 4}]},
            "node_types",
            "one node type per GPU type",
        ),
    ],
)
def test_bad_inventory_names_the_field(changes, field, reason):
    with pytest.raises(InventoryError) as err:
        inventory(**changes)
    message = str(err.value)
    assert field in message and reason in message


def test_arms_default_to_every_precision_left_to_the_planner():
    data = copy.deepcopy(BASE)
    del data["arms"]
    assert [a.precision for a in Inventory.from_dict(data).arms] == ["bf16", "fp16", "int8", "nf4", "awq", "fp8"]
    del data["model"]["awq_checkpoint"]  # no AWQ checkpoint: no awq arm by default
    assert [a.precision for a in Inventory.from_dict(data).arms] == ["bf16", "fp16", "int8", "nf4", "fp8"]
    assert all(a.share is None for a in Inventory.from_dict(data).arms)


def test_bad_yaml_file_names_the_file_and_field(tmp_path):
    path = tmp_path / "inv.yaml"
    path.write_text("model: {name: m, source: s}\nnode_types: []\ntraffic: {target_qps: 1, documents_per_request: 1, tokens_per_document: 1}\n")
    with pytest.raises(InventoryError, match=r"inv.yaml: invalid inventory: node_types: List should have at least 1 item"):
        Inventory.from_yaml(path)
    path.write_text("- not a mapping\n")
    with pytest.raises(InventoryError, match="top level must be a mapping"):
        Inventory.from_yaml(path)


# ---- planner rejections ---------------------------------------------------------------------


def test_options_that_cannot_run_are_rejected_with_their_reasons(qwen3_vl_8b):
    report = plan_placement(inventory(constraints={"fidelity_floor": 0.98}), qwen3_vl_8b)
    reasons = {(r.precision, r.node_type): r.reason for r in report.plan.rejected}
    # bf16 on a T4 fails twice: no bf16 below compute capability 8.0, and 18.7 GiB (text-only traffic) does not fit.
    assert "bf16 needs compute capability >= 8.0" in reasons[("bf16", "t4")]
    assert "bf16 needs 18.7 GiB > 13.5 GiB usable on T4 (15.0 GiB less 10% headroom)" in reasons[("bf16", "t4")]
    assert reasons[("fp16", "t4")].startswith("fp16 needs 18.7 GiB > 13.5 GiB usable on T4")
    # A precision under the fidelity floor is out on every node type, reported once.
    assert reasons[("nf4", None)] == "fidelity 0.975 is below the floor 0.98"
    assert not any(r.precision == "nf4" and r.node_type for r in report.plan.rejected)
    # What remains runs on L4s only.
    assert {p.node_type for p in report.plan.placements} == {"l4"}


def test_a_per_precision_fidelity_floor_excludes_only_that_precision(qwen3_vl_8b):
    constraints = {"fidelity_floors": {"nf4": 0.99}, "fidelity": {"fp16": 0.95}}
    report = plan_placement(inventory(constraints=constraints, arms=[{"precision": "nf4"}, {"precision": "fp16"}]), qwen3_vl_8b)
    reasons = {(r.precision, r.node_type): r.reason for r in report.plan.rejected}
    assert reasons[("nf4", None)] == "fidelity 0.975 is below the floor 0.99"
    assert ("fp16", None) not in reasons  # 0.95 is above the global floor of 0


def test_infeasible_plan_is_refused_with_the_reason(qwen3_vl_8b):
    # Nothing but T4s, and the 8B model at bf16/fp16 does not fit them; nf4 is below the floor.
    inv = inventory(
        node_types=[BASE["node_types"][1]],
        arms=[{"precision": "fp16", "share": 1.0}],
    )
    with pytest.raises(PlacementInfeasible) as refused:
        plan_placement(inv, qwen3_vl_8b)
    message = str(refused.value)
    assert "fp16 (share 1) needs 12.0 pairs/s but no node type can run it" in message
    assert "fp16 on t4: fp16 needs 18.7 GiB > 13.5 GiB usable on T4" in message


def test_the_2b_model_fits_a_t4_at_fp16(qwen3_vl_2b):
    report = plan_placement(inventory(arms=[{"precision": "fp16"}]), qwen3_vl_2b)
    assert report.assessment("fp16", "t4").rejection is None
    assert {p.node_type for p in report.plan.placements} == {"t4"}  # cheaper per pair than the L4


# ---- throughput sources ---------------------------------------------------------------------


def test_roofline_entries_say_so_and_follow_the_formula(qwen3_vl_8b):
    inv = inventory(arms=[{"precision": "bf16"}])
    report = plan_placement(inv, qwen3_vl_8b)
    entry = report.assessment("bf16", "l4").throughput
    assert entry.source == "roofline" and entry.detail.startswith("roofline:")
    arch = read_architecture(qwen3_vl_8b)
    shape = pair_shape_of(inv)
    rows = 16384 // shape.mean_pair_tokens
    flops = mean_pair_flops(arch, count_parameters(arch), shape)
    # 2 x 6.95e9 decoder weights x 352 tokens dominates the pair's FLOPs ...
    assert flops == pytest.approx(2 * 6_945_767_424 * 352, rel=0.05)
    # ... and an L4 is compute-bound: rows x efficiency / (rows x flops / peak).
    assert entry.pairs_per_s == pytest.approx(rows * KERNEL_EFFICIENCY["bf16"] / (rows * flops / 121e12))


def test_measured_entries_replace_the_roofline_and_say_so(qwen3_vl_8b):
    # Two `rerank-fleet bench engine --out` reports: the 8B on an L4, and the 2B (another model) on an L4.
    on_l4 = BenchEngineReport.model_validate(
        {
            "model": "Qwen/Qwen3-VL-Reranker-8B",
            "device": "NVIDIA L4",
            "image_share": 0.0,
            "rows": [
                {"precision": "bf16", "batch_size": 8, "pairs_per_s": 7.5, "p50_ms": 1.0},
                {"precision": "bf16", "batch_size": 32, "pairs_per_s": 9.0, "p50_ms": 1.0},
                {"precision": "fp8", "skipped": "not installed"},
            ],
        }
    )
    other_model = on_l4.model_copy(update={"model": "Qwen/Qwen3-VL-Reranker-2B"})
    report = plan_placement(
        inventory(arms=[{"precision": "bf16"}, {"precision": "fp16"}]), qwen3_vl_8b, bench=[other_model, on_l4]
    )
    measured = report.assessment("bf16", "l4").throughput
    assert measured.source == "measured"
    assert measured.pairs_per_s == 9.0  # the best batch size
    assert "NVIDIA L4" in measured.detail
    assert report.assessment("fp16", "l4").throughput.source == "roofline"  # not measured
    assert report.assessment("bf16", "t4").throughput.source == "roofline"  # another GPU


def test_a_gpu_check_file_replaces_the_roofline_for_its_gpu_with_the_nearest_workload(qwen3_vl_8b):
    """`scripts/gpu-check.sh`'s JSON holds one report per architecture; each row says its workload.
    The planner takes the device-step rate (a replica overlaps preparation), from the rows whose
    image share is nearest the traffic's, rescaled by tokens per pair."""
    row = {"precision": "bf16", "requests": 32, "pairs_per_s": 100.0, "p50_ms": 1.0}
    gpu_check = {
        "tool": "gpu-check", "device": "NVIDIA H200",
        "reports": [
            {"model": "Qwen/Qwen3-VL-Reranker-2B", "device": "NVIDIA H200", "rows": [{**row, "case": "short", "forward_pairs_per_s": 9000.0}]},
            {"model": "Qwen/Qwen3-VL-Reranker-8B", "device": "NVIDIA H200", "weights": [{"precision": "bf16"}], "rows": [
                {**row, "case": "short", "batch_size": 256, "forward_pairs_per_s": 2000.0, "mean_pair_tokens": 80.0, "image_share": 0.0},
                {**row, "case": "long", "batch_size": 256, "forward_pairs_per_s": 600.0, "mean_pair_tokens": 480.0, "image_share": 0.0},
                {**row, "case": "imgdocs", "batch_size": 128, "forward_pairs_per_s": 900.0, "mean_pair_tokens": 280.0, "image_share": 1.0},
                {"precision": "int8", "case": "short", "requests": 1, "error": "RuntimeError: boom"},
                {"precision": "fp8", "skipped": "precision: fp8 on the transformers backend needs the `kernels` package"},
            ]},
        ],
    }  # fmt: skip
    reports = read_bench_reports(gpu_check)
    assert [r.model for r in reports] == ["Qwen/Qwen3-VL-Reranker-2B", "Qwen/Qwen3-VL-Reranker-8B"]
    nodes = [{"name": "h200", "gpu": "H200", "gpus_per_node": 1, "max_nodes": 2, "cost_per_hour": 5.0}]
    report = plan_placement(inventory(node_types=nodes, arms=[{"precision": "bf16"}, {"precision": "int8"}]), qwen3_vl_8b, bench=reports)
    entry = report.assessment("bf16", "h200").throughput
    # Text traffic (352 tokens/pair): the long-query row rescales to 600 x 480 / 352, above the short row's 2000 x 80 / 352.
    assert entry.source == "measured" and entry.pairs_per_s == pytest.approx(600.0 * 480 / 352)
    assert "NVIDIA H200 (long)" in entry.detail and "device step alone" in entry.detail
    assert report.assessment("int8", "h200").throughput.source == "roofline"  # its only row failed
    image_traffic = inventory(node_types=nodes, arms=[{"precision": "bf16"}], traffic={**BASE["traffic"], "image_share": 1.0})
    shape = pair_shape_of(image_traffic)
    entry = plan_placement(image_traffic, qwen3_vl_8b, bench=reports).assessment("bf16", "h200").throughput
    assert "(imgdocs)" in entry.detail and entry.pairs_per_s == pytest.approx(900.0 * 280 / shape.mean_pair_tokens)


def test_measured_figures_are_rescaled_to_the_planned_pair_length(qwen3_vl_8b):
    bench = BenchEngineReport.model_validate(
        {"model": "qwen3-vl-8b", "device": "NVIDIA L4", "mean_pair_tokens": 704, "rows": [{"precision": "bf16", "batch_size": 32, "pairs_per_s": 9.0}]}
    )
    report = plan_placement(inventory(arms=[{"precision": "bf16"}]), qwen3_vl_8b, bench=[bench])
    assert report.assessment("bf16", "l4").throughput.pairs_per_s == pytest.approx(9.0 * 704 / 352)


@pytest.mark.parametrize(
    ("device", "key"),
    [("NVIDIA H100 80GB HBM3", "H100-80GB"), ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
     ("NVIDIA L4", "L4"), ("NVIDIA L40S", "L40S"), ("NVIDIA A10G", "A10G"), ("Tesla T4", "T4"),
     ("Tesla V100-SXM2-16GB", "V100-16GB"), ("NVIDIA RTX A4000", "RTX-A4000"), ("NVIDIA GeForce RTX 3060", "RTX-3060"),
     ("CPU x86_64 x2 threads", None)],
)
def test_bench_device_names_map_to_the_catalogue(device, key):
    assert gpu_for_device_name(device) == key


# ---- backends -------------------------------------------------------------------------------


def test_a_vllm_arm_is_held_to_the_share_vllm_reserves_and_renders_its_backend(qwen3_vl_8b):
    """A vLLM replica fills at most its gpu_memory_utilization of the card (the rest of that share
    is its KV-cache pool): fp16 8B (~19 GiB a replica) fits an L4 (24 GiB) at 0.9, not at 0.6,
    and the refusal says why. The rendered Serve config carries each arm's backend."""
    from placement.render import ServeTarget, fleet_config

    arms = [{"precision": "fp16", "backend": "vllm", "vllm_memory_fraction": 0.9}, {"precision": "nf4"}]
    report = plan_placement(inventory(arms=arms), qwen3_vl_8b)
    fp16_l4 = report.assessment("fp16", "l4")
    assert fp16_l4.rejection is None and fp16_l4.usable_bytes == int(fp16_l4.node_type.gpu_memory_bytes * 0.9)
    fleet = fleet_config(report, ServeTarget(redis_url=None, secrets_dir="/secrets"))
    backends = {a.precision: (a.backend, a.vllm.gpu_memory_utilization) for a in fleet.arms}
    assert backends.get("fp16") == ("vllm", 0.9) and backends.get("nf4", ("transformers",))[0] == "transformers"

    tight = plan_placement(inventory(arms=[{"precision": "fp16", "backend": "vllm", "vllm_memory_fraction": 0.6}, {"precision": "nf4"}]), qwen3_vl_8b)
    rejection = tight.assessment("fp16", "l4").rejection
    assert rejection is not None and "vLLM's gpu_memory_utilization 0.6" in rejection


def test_an_arm_s_fan_out_is_rendered_into_its_serve_arm(qwen3_vl_8b):
    """fan_out_above and fan_out_chunk of an inventory arm reach every Serve arm of its precision;
    arms without them render fan-out off."""
    from placement.render import ServeTarget, fleet_config

    arms = [{"precision": "fp16", "fan_out_above": 200, "fan_out_chunk": 100}, {"precision": "nf4"}]
    fleet = fleet_config(plan_placement(inventory(arms=arms), qwen3_vl_8b), ServeTarget(redis_url=None, secrets_dir="/secrets"))
    fan = {(a.precision, a.fan_out_above, a.fan_out_chunk) for a in fleet.arms}
    assert fan <= {("fp16", 200, 100), ("nf4", None, None)} and ("fp16", 200, 100) in fan


def test_a_cascade_s_requests_land_on_both_of_its_arms_and_it_is_rendered_over_their_serve_arms(qwen3_vl_8b):
    """30 % of requests through nf4 then fp16 on the top 10 of 100 documents: nf4 carries its own
    20 % plus every pair of the cascade's, fp16 its own 50 % plus a tenth of the cascade's pairs; the
    Serve config carries the cascade over the arms the plan runs those precisions as."""
    from placement.planner import cascade_loads
    from placement.render import ServeTarget, fleet_config

    cascades = [{"first": "nf4", "then": "fp16", "k": 10, "share": 0.3}]
    inv = inventory(arms=[{"precision": "fp16", "share": 0.5}, {"precision": "nf4", "share": 0.2}], cascades=cascades,
                    traffic={"target_qps": 0.5, "documents_per_request": 100, "tokens_per_document": 256})  # fmt: skip
    assert cascade_loads(inv.cascades, 100) == pytest.approx({"nf4": 0.3, "fp16": 0.03})
    assert cascade_loads(inv.cascades, 4) == pytest.approx({"nf4": 0.3, "fp16": 0.3})  # k over the list: every pair
    report = plan_placement(inv, qwen3_vl_8b)
    plan, pairs = report.plan, report.plan.demand.pairs_per_s
    assert plan.demand.cascade_share == 0.3 and plan.demand.free_share == pytest.approx(0, abs=1e-12)
    assert plan.capacity_of("nf4") >= (0.2 + 0.3) * pairs - 1e-6 and plan.capacity_of("fp16") >= (0.5 + 0.03) * pairs - 1e-6
    alone = plan_placement(inventory(arms=[{"precision": "fp16", "share": 0.5}, {"precision": "nf4", "share": 0.2}, {"precision": "bf16", "share": 0.3}],
                                     traffic=inv.traffic.model_dump()), qwen3_vl_8b).plan  # fmt: skip
    assert plan.capacity_of("nf4") > alone.capacity_of("nf4") - 1e-6  # the cascade's first arm takes what an arm alone would

    fleet = fleet_config(report, ServeTarget(redis_url=None, secrets_dir="/secrets"))
    arms = {a.name: a for a in fleet.arms}
    assert fleet.cascades and all(c.k == 10 for c in fleet.cascades)
    for c in fleet.cascades:
        assert arms[c.first].precision == "nf4" and arms[c.then].precision == "fp16" and c.name.startswith("cascade-nf4-fp16-k10")
    assert sum(c.weight for c in fleet.cascades) == pytest.approx(0.3, abs=1e-3)
    assert sum(a.weight for a in fleet.arms) == pytest.approx(0.7, abs=1e-3)
    from placement.report import format_plan

    table = format_plan(report)
    assert "cascade-nf4-fp16-k10: 30% of requests; nf4 scores all their pairs (18.0 pairs/s), fp16 the top 10 of each (1.8 pairs/s)" in table


SHARED = [{"precision": "fp16", "share": 0.5}, {"precision": "nf4"}]


@pytest.mark.parametrize(("arms", "cascade", "reason"), [
    (SHARED, {"first": "awq", "then": "fp16", "share": 0.1}, "cascades.0.first: awq is not one of the arms' precisions"),
    (SHARED, {"first": "nf4", "then": "nf4", "share": 0.1}, "cascades.0: first and then are the same precision nf4"),
    (SHARED, {"first": "nf4", "then": "fp16", "share": 0.6}, "arms' and cascades' shares add up to 1.1, more than 1"),
    ([{"precision": "fp16", "share": 0.5}, {"precision": "nf4", "share": 0.3}], {"first": "nf4", "then": "fp16", "share": 0.1},
     "every arm has a share, so they must add up to 1 (got 0.9)"),
])  # fmt: skip
def test_a_bad_cascade_names_its_field(arms, cascade, reason):
    with pytest.raises(InventoryError) as refused:
        inventory(arms=arms, cascades=[cascade])
    assert reason in str(refused.value)


def test_load_tested_capacity_replaces_other_figures_for_its_gpu(qwen3_vl_8b, tmp_path):
    """A `loadtest --capacity` report (written by the load tester itself) is preferred over a
    `bench engine` figure and the roofline on the GPU it was measured on, and says so."""
    import json

    from loadtest.capacity import write_outputs
    from placement.profiles import CapacityReport

    steps = [{"users": 1, "requests": 40, "failures": 0, "rps": 2.0, "p50_ms": 400.0, "p95_ms": 450.0},
             {"users": 2, "requests": 60, "failures": 0, "rps": 3.0, "p50_ms": 600.0, "p95_ms": 800.0}]  # fmt: skip
    written = {
        "schema": "rerank-fleet capacity/1", "model": "Qwen/Qwen3-VL-Reranker-8B", "slo_p95_ms": 1000.0, "docs_per_request": 20,
        "image_share": 0.0, "step_duration_s": 30, "user_steps": [1, 2], "measured_at": "2026-12-02T00:00:00+00:00", "machine": {},
        "arms": [{"arm": "bf16-l4", "precision": "bf16", "device": "NVIDIA L4", "replicas": 2, "capacity_rps": 3.0, "pairs_per_s": 60.0,
                  "at_users": 2, "p95_ms_at_capacity": 800.0, "steps": steps}],
    }  # fmt: skip
    write_outputs(written, tmp_path)
    capacity = CapacityReport.model_validate(json.loads((tmp_path / "capacity.json").read_text()))
    bench = BenchEngineReport.model_validate(
        {"model": "Qwen/Qwen3-VL-Reranker-8B", "device": "NVIDIA L4", "rows": [{"precision": "bf16", "batch_size": 32, "pairs_per_s": 9.0}]}
    )
    report = plan_placement(inventory(arms=[{"precision": "bf16"}]), qwen3_vl_8b, bench=[bench], capacity=[capacity])
    on_l4 = report.assessment("bf16", "l4").throughput
    assert on_l4.source == "measured" and on_l4.pairs_per_s == 30.0 and "loadtest --capacity" in on_l4.detail  # per replica
    assert report.assessment("bf16", "t4").throughput.source == "roofline"  # measured on an L4 only
    assert (tmp_path / "capacity.png").stat().st_size > 0 and "| bf16-l4 | bf16 | NVIDIA L4 | 2 | 3.00 | 60.0 |" in (tmp_path / "capacity.md").read_text()
