"""From an inventory to a plan: assess every (precision, node type) option, then solve.

Each option is checked against the fidelity floor (which rules a precision out everywhere),
hardware support, memory fit, throughput and node availability; every failed check is part of
its rejection reason. The options that pass become MILP variables. Pure: the caller reads the files and passes their contents.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from placement.hardware import hardware_support
from placement.inventory import CascadeSpec, Inventory, NodeType
from placement.memory import (
    GIB,
    Architecture,
    ParameterCounts,
    ReplicaMemory,
    Workload,
    count_parameters,
    read_architecture,
    replica_memory,
)
from placement.solve import Demand, NodePool, Objective, Option, Plan, Rejection, solve_placement
from placement.profiles import BenchEngineReport, CapacityReport, find_capacity, find_measured
from placement.throughput import PairShape, ThroughputEstimate, roofline_estimate


@dataclass(frozen=True)
class OptionAssessment:
    """Everything the planner worked out about running one precision on one node type."""

    precision: str
    node_type: NodeType
    memory: ReplicaMemory
    usable_bytes: int  # GPU memory less the headroom (vLLM: its reserved share, if smaller)
    throughput: ThroughputEstimate
    rejection: str | None  # None when the option became a MILP variable


@dataclass(frozen=True)
class PlacementReport:
    inventory: Inventory
    architecture: Architecture
    counts: ParameterCounts
    assessments: tuple[OptionAssessment, ...]
    plan: Plan
    bench: tuple[BenchEngineReport, ...] = ()  # measured reports the plan used (the feature-cache model reads their vision times)

    def assessment(self, precision: str, node_type: str) -> OptionAssessment:
        for a in self.assessments:
            if a.precision == precision and a.node_type.name == node_type:
                return a
        raise KeyError((precision, node_type))


def workload_of(inventory: Inventory) -> Workload:
    traffic = inventory.traffic
    return Workload(
        batch_tokens=traffic.batch_token_budget,
        mean_pair_tokens=pair_shape_of(inventory).mean_pair_tokens,
        with_images=traffic.image_share > 0,
    )


def pair_shape_of(inventory: Inventory) -> PairShape:
    traffic = inventory.traffic
    return PairShape(
        text_pair_tokens=traffic.text_pair_tokens,
        image_pair_tokens=traffic.image_pair_tokens,
        image_tokens=traffic.tokens_per_image,
        image_share=traffic.image_share,
    )


def assess_options(
    inventory: Inventory,
    arch: Architecture,
    bench: Sequence[BenchEngineReport] = (),
    capacity: Sequence[CapacityReport] = (),
) -> list[OptionAssessment]:
    counts = count_parameters(arch)
    workload = workload_of(inventory)
    shape = pair_shape_of(inventory)
    constraints = inventory.constraints
    model_ids = {inventory.model.source, inventory.model.name}
    assessments = []
    for arm in inventory.arms:
        precision = arm.precision
        memory = replica_memory(
            arch,
            precision,
            workload,
            runtime_overhead_bytes=int(constraints.runtime_overhead_gib * GIB),
            nf4_double_quant=inventory.model.nf4_double_quant,
        )
        fidelity = constraints.fidelity[precision]
        for node in inventory.node_types:
            gpu = node.gpu_model
            usable = usable_bytes(node, arm, constraints.memory_headroom)
            throughput = find_capacity(list(capacity), gpu, precision, model_ids) or find_measured(list(bench), gpu, precision, model_ids, shape) or roofline_estimate(
                gpu, precision, arch, counts, shape, batch_tokens=workload.batch_tokens, weight_bytes=memory.weight_bytes
            )
            if constraints.below_floor(precision):
                # A precision below the floor is out everywhere; its other shortcomings do not matter.
                reasons = [f"fidelity {fidelity:g} is below the floor {constraints.floor_for(precision):g}"]
            else:
                reasons = _shortcomings(precision, node, memory, usable, throughput, usable_note(node, arm, constraints.memory_headroom))
            reason = "; ".join(reasons) if reasons else None
            assessments.append(OptionAssessment(precision, node, memory, usable, throughput, reason))
    return assessments


def usable_bytes(node: NodeType, arm, memory_headroom: float) -> int:
    """GPU memory a replica may fill: the card less the headroom; a vLLM replica is also held to
    the share vLLM reserves (`gpu_memory_utilization`), whose rest of the model and activations
    becomes its KV-cache pool."""
    share = 1 - memory_headroom
    if arm.backend == "vllm":
        share = min(share, arm.vllm_memory_fraction)
    return int(node.gpu_memory_bytes * share)


def usable_note(node: NodeType, arm, memory_headroom: float) -> str:
    """How `usable_bytes` was reached, for the report."""
    if arm.backend == "vllm" and arm.vllm_memory_fraction < 1 - memory_headroom:
        return f"{node.gpu_memory_bytes / GIB:.1f} GiB x vLLM's gpu_memory_utilization {arm.vllm_memory_fraction:g}"
    return f"{node.gpu_memory_bytes / GIB:.1f} GiB less {memory_headroom:.0%} headroom"


def _shortcomings(
    precision: str,
    node: NodeType,
    memory: ReplicaMemory,
    usable: int,
    throughput: ThroughputEstimate,
    note: str,
) -> list[str]:
    """Every reason this option cannot run, so the report shows all of them at once."""
    gpu = node.gpu_model
    reasons = []
    unsupported = hardware_support(precision, node.effective_compute_capability)
    if unsupported is not None:
        reasons.append(f"{unsupported} ({gpu.key})")
    if memory.total_bytes > usable:
        reasons.append(
            f"{memory.label} needs {memory.total_gib:.1f} GiB > {usable / GIB:.1f} GiB usable on {gpu.key} ({note})"
        )
    if throughput.pairs_per_s <= 0 and unsupported is None:
        reasons.append(throughput.detail)
    if node.node_ceiling == 0:
        reasons.append("no nodes of this type are available")
    return reasons


def plan_placement(
    inventory: Inventory,
    architecture_config: Mapping,
    *,
    bench: Sequence[BenchEngineReport] = (),
    capacity: Sequence[CapacityReport] = (),
    objective: Objective = "cost",
    budget: float | None = None,
) -> PlacementReport:
    """Assess every option, solve the MILP, and return the plan with its reasoning.

    Raises `placement.solve.PlacementInfeasible` (reasons included) when nothing fits.
    """
    arch = read_architecture(architecture_config)
    assessments = assess_options(inventory, arch, bench, capacity)
    options = [
        Option(a.precision, a.node_type.name, a.throughput.pairs_per_s) for a in assessments if a.rejection is None
    ]
    rejected = _group_rejections(assessments, inventory)
    pools = [
        NodePool(n.name, n.gpus_per_node, n.node_floor, n.node_ceiling, n.cost_per_hour) for n in inventory.node_types
    ]
    demand = Demand(
        pairs_per_s=inventory.traffic.target_pairs_per_s * (1 + inventory.constraints.capacity_headroom),
        shares={a.precision: a.share for a in inventory.arms if a.share is not None},
        free_precisions=frozenset(
            a.precision
            for a in inventory.arms
            if a.share is None and not inventory.constraints.below_floor(a.precision)
        ),
        cascade_share=sum(c.share for c in inventory.cascades),
        cascade_load=cascade_loads(inventory.cascades, inventory.traffic.documents_per_request),
    )
    plan = solve_placement(options, pools, demand, objective=objective, budget=budget, rejected=rejected)
    return PlacementReport(inventory, arch, count_parameters(arch), tuple(assessments), plan, tuple(bench))


def cascade_loads(cascades: Sequence[CascadeSpec], documents_per_request: int) -> dict[str, float]:
    """What cascades put on each precision's capacity, in pairs per pair of the fleet's traffic: a
    cascade answering a share s of the requests has its first arm score all their pairs (s) and its
    then arm min(k, documents) of each request's (s x min(k, documents) / documents). E.g. 30 % of
    requests through nf4 then bf16 on the top 10 of 100 documents: nf4 0.3, bf16 0.03 (the other
    70 % go to the arms alone, by their shares)."""
    loads: dict[str, float] = {}
    for c in cascades:
        loads[c.first] = loads.get(c.first, 0.0) + c.share
        loads[c.then] = loads.get(c.then, 0.0) + c.share * min(c.k, documents_per_request) / documents_per_request
    return loads


def _group_rejections(assessments: list[OptionAssessment], inventory: Inventory) -> tuple[Rejection, ...]:
    """One line per rejected option; a fidelity rejection, the same on every node type, becomes one line."""
    constraints = inventory.constraints
    rejections: list[Rejection] = []
    for a in assessments:
        if a.rejection is None:
            continue
        if constraints.below_floor(a.precision):
            if not any(r.precision == a.precision and r.node_type is None for r in rejections):
                rejections.append(Rejection(a.precision, None, a.rejection))
            continue
        rejections.append(Rejection(a.precision, a.node_type.name, a.rejection))
    return tuple(rejections)


def arm_name(precision: str, node_type: str) -> str:
    return f"{precision}-{node_type}"


@dataclass(frozen=True)
class CascadeRoute:
    """A cascade as rendered: over one Serve arm of each of its precisions, with its share of the traffic."""

    name: str
    first: tuple[str, str]  # (precision, node type) of its first arm
    then: tuple[str, str]
    k: int
    weight: float


def cascade_routes(inventory: Inventory, plan: Plan) -> list[CascadeRoute]:
    """Each cascade over the Serve arms its precisions run as: one per (first arm, then arm) pair
    when a precision runs on several node types, its share split by their capacity (as
    `arm_weights` splits a precision's share)."""
    routes = []
    for c in inventory.cascades:
        firsts = [p for p in plan.placements if p.precision == c.first]
        thens = [p for p in plan.placements if p.precision == c.then]
        pairs = [(f, t) for f in firsts for t in thens]
        for i, (f, t) in enumerate(pairs):
            weight = c.share * f.pairs_per_s / plan.capacity_of(c.first) * t.pairs_per_s / plan.capacity_of(c.then)
            routes.append(CascadeRoute(name=c.name if len(pairs) == 1 else f"{c.name}-{i + 1}", first=(f.precision, f.node_type),
                                       then=(t.precision, t.node_type), k=c.k, weight=round(weight, 4)))  # fmt: skip
    return routes


def arm_weights(plan: Plan) -> dict[tuple[str, str], float]:
    """Traffic share per arm: a precision's share split between its node types by their capacity.

    Precisions with a required share get exactly that share; the precisions left to the planner
    split what remains in proportion to the capacity the plan gave them.
    """
    demand = plan.demand
    free_capacity = sum(plan.capacity_of(p) for p in demand.free_precisions)
    weights = {}
    for placement in plan.placements:
        if placement.precision in demand.shares:
            share = demand.shares[placement.precision]
            group_capacity = plan.capacity_of(placement.precision)
        else:
            share = demand.free_share
            group_capacity = free_capacity
        weights[(placement.precision, placement.node_type)] = round(share * placement.pairs_per_s / group_capacity, 4)
    return weights
