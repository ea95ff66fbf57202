"""The exact placement solver: integer replicas per (precision, node type) by mixed-integer LP.

Variables: x[o] >= 0 integer replicas of each feasible option o = (precision, node type), each
replica one GPU; y[n] integer nodes of each pool; Z >= 0 the traffic (pairs/s) the plan serves
with the requested split. Constraints:

    sum_{o on n} x[o] <= gpus_per_node[n] * y[n]          GPUs used fit the nodes paid for
    min_nodes[n] <= y[n] <= max_nodes[n]                   inventory limits
    sum_{o of p} rate[o] x[o] >= (share[p] + load[p]) * Z  each fixed-share precision p
    sum_{o of free p} rate[o] x[o] >= (1 - sum shares + sum_{free p} load[p]) * Z
                                                           the rest, by precisions left to the planner
    sum_{o of p} rate[o] x[o] >= load[p] * Z               each free precision a cascade runs on

where load[p] is what cascades put on precision p, per pair of routed traffic (`Demand.cascade_load`:
a cascade's first arm scores every pair of its share, its then arm k a request). The last two rows
together are exactly "each free precision carries its cascade load and the free precisions share the
rest", whatever split of the rest the solver picks.

Objective "cost": Z >= demand, minimise sum cost[n] y[n]; then, at that cost, maximise Z; then
use the fewest replicas. Objective "capacity": sum cost[n] y[n] <= budget, maximise Z; then the
lowest cost; then the fewest replicas. Each stage is one `scipy.optimize.milp` call, so the
result is optimal lexicographically. Options that cannot exist at all (memory, hardware,
fidelity) never become variables: they arrive here as `Rejection`s and are reported.

Pure: plain data in, a `Plan` out; no I/O, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

Objective = Literal["cost", "capacity"]


@dataclass(frozen=True)
class Option:
    """A (precision, node type) pair that can run: a replica fits and the GPU supports the precision."""

    precision: str
    node_type: str
    pairs_per_replica: float


@dataclass(frozen=True)
class NodePool:
    name: str
    gpus_per_node: int
    min_nodes: int
    max_nodes: int
    cost_per_hour: float


@dataclass(frozen=True)
class Demand:
    """The traffic to serve (already including headroom) and how it must split between precisions."""

    pairs_per_s: float
    shares: dict[str, float]  # precision -> required share of traffic
    free_precisions: frozenset[str]  # precisions the planner may use for the rest
    cascade_share: float = 0.0  # the share of traffic cascades answer (routed to neither arm alone)
    cascade_load: dict[str, float] = field(default_factory=dict)  # precision -> pairs cascades send it, per pair of traffic

    @property
    def free_share(self) -> float:
        return max(0.0, 1.0 - sum(self.shares.values()) - self.cascade_share)

    def groups(self) -> list[tuple[str, frozenset[str], float]]:
        """(label, precisions, pairs per pair of traffic they must serve together): one row of the MILP each."""
        def plus(load: float) -> str:
            return f" + cascades {load:g}" if load else ""

        out = []
        for p, s in self.shares.items():
            load = self.cascade_load.get(p, 0.0)
            out.append((f"{p} (share {s:g}{plus(load)})", frozenset({p}), s + load))
        free_load = sum(load for p, load in self.cascade_load.items() if p in self.free_precisions)
        if self.free_share > 1e-12 or free_load > 0:
            label = f"{'/'.join(sorted(self.free_precisions)) or 'no precision'} (remaining share {self.free_share:g}{plus(free_load)})"
            out.append((label, self.free_precisions, self.free_share + free_load))
        out += [(f"{p} (cascades {load:g})", frozenset({p}), load) for p, load in self.cascade_load.items() if p not in self.shares and load > 0]
        return out


@dataclass(frozen=True)
class Rejection:
    precision: str
    node_type: str | None  # None: the precision is excluded on every node type
    reason: str


@dataclass(frozen=True)
class Placement:
    precision: str
    node_type: str
    replicas: int
    pairs_per_replica: float

    @property
    def pairs_per_s(self) -> float:
        return self.replicas * self.pairs_per_replica


@dataclass(frozen=True)
class Plan:
    objective: Objective
    placements: tuple[Placement, ...]  # only options with replicas > 0
    nodes: dict[str, int]  # node type -> nodes used
    cost_per_hour: float
    servable_pairs_per_s: float  # traffic the plan serves at the requested split (Z)
    demand: Demand
    rejected: tuple[Rejection, ...]
    unused: tuple[Rejection, ...] = field(default=())  # feasible options the optimum did not use, and why

    @property
    def replicas(self) -> int:
        return sum(p.replicas for p in self.placements)

    def capacity_of(self, precision: str) -> float:
        return sum(p.pairs_per_s for p in self.placements if p.precision == precision)


class PlacementInfeasible(Exception):
    """No placement meets the demand within the inventory; `reasons` say why."""

    def __init__(self, reasons: list[str], rejected: tuple[Rejection, ...]):
        self.reasons = reasons
        self.rejected = rejected
        lines = ["no feasible placement:"] + [f"  - {r}" for r in reasons]
        if rejected:
            lines.append("options excluded before solving:")
            lines += [f"  - {_describe(r)}" for r in rejected]
        super().__init__("\n".join(lines))


def _describe(r: Rejection) -> str:
    where = f"{r.precision} on {r.node_type}" if r.node_type else f"{r.precision} (all node types)"
    return f"{where}: {r.reason}"


@dataclass
class _Model:
    """The MILP's matrices, built once and re-solved with different objectives per stage."""

    options: list[Option]
    pools: list[NodePool]
    demand: Demand
    rows: list[np.ndarray] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)

    @property
    def n_x(self) -> int:
        return len(self.options)

    @property
    def n_vars(self) -> int:
        return self.n_x + len(self.pools) + 1  # x..., y..., Z

    def y(self, i: int) -> int:
        return self.n_x + i

    @property
    def z(self) -> int:
        return self.n_vars - 1

    def add(self, coefficients: np.ndarray, lower: float, upper: float) -> None:
        self.rows.append(coefficients)
        self.lower.append(lower)
        self.upper.append(upper)

    def cost_vector(self) -> np.ndarray:
        c = np.zeros(self.n_vars)
        for i, pool in enumerate(self.pools):
            c[self.y(i)] = pool.cost_per_hour
        return c

    def z_vector(self) -> np.ndarray:
        c = np.zeros(self.n_vars)
        c[self.z] = 1.0
        return c

    def replica_vector(self) -> np.ndarray:
        c = np.zeros(self.n_vars)
        c[: self.n_x] = 1.0
        return c

    def solve(self, objective: np.ndarray) -> np.ndarray | None:
        """Minimise `objective`; None when infeasible."""
        pool_index = {p.name: i for i, p in enumerate(self.pools)}
        lb = np.zeros(self.n_vars)
        ub = np.zeros(self.n_vars)
        for k, option in enumerate(self.options):
            pool = self.pools[pool_index[option.node_type]]
            ub[k] = pool.gpus_per_node * pool.max_nodes
        for i, pool in enumerate(self.pools):
            lb[self.y(i)] = pool.min_nodes
            ub[self.y(i)] = pool.max_nodes
        ub[self.z] = np.inf
        integrality = np.ones(self.n_vars)
        integrality[self.z] = 0
        constraints = (
            [LinearConstraint(np.vstack(self.rows), np.array(self.lower), np.array(self.upper))] if self.rows else []
        )
        result = milp(objective, integrality=integrality, bounds=Bounds(lb, ub), constraints=constraints)
        if result.status != 0 or result.x is None:
            return None
        return result.x


def _build(options: list[Option], pools: list[NodePool], demand: Demand) -> _Model:
    model = _Model(options=options, pools=pools, demand=demand)
    pool_index = {p.name: i for i, p in enumerate(pools)}
    for i, pool in enumerate(pools):
        row = np.zeros(model.n_vars)
        for k, option in enumerate(options):
            if pool_index[option.node_type] == i:
                row[k] = 1.0
        row[model.y(i)] = -pool.gpus_per_node
        model.add(row, -np.inf, 0.0)
    for _, precisions, share in demand.groups():
        row = np.zeros(model.n_vars)
        for k, option in enumerate(options):
            if option.precision in precisions:
                row[k] = option.pairs_per_replica
        row[model.z] = -share
        model.add(row, 0.0, np.inf)
    return model


def _snap(values: np.ndarray, model: _Model) -> tuple[list[int], list[int], float]:
    x = [int(round(v)) for v in values[: model.n_x]]
    y = [int(round(values[model.y(i)])) for i in range(len(model.pools))]
    return x, y, float(values[model.z])


def servable_traffic(x: list[int], options: list[Option], demand: Demand) -> float:
    """Z: the most traffic these replicas serve while every precision group gets its share."""
    ratios = []
    for _, precisions, share in demand.groups():
        capacity = sum(xi * o.pairs_per_replica for xi, o in zip(x, options) if o.precision in precisions)
        ratios.append(capacity / share)
    return min(ratios) if ratios else 0.0


def _diagnose(options: list[Option], pools: list[NodePool], demand: Demand, objective: Objective, budget: float | None) -> list[str]:
    reasons: list[str] = []
    gpus = {p.name: p.gpus_per_node * p.max_nodes for p in pools}
    if objective == "capacity":
        floor_cost = sum(p.cost_per_hour * p.min_nodes for p in pools)
        if budget is not None and floor_cost > budget:
            reasons.append(f"budget {budget:g}/h is below the cost of the minimum node counts ({floor_cost:g}/h)")
        return reasons or ["the budget cannot buy any replica of the required precisions"]
    for label, precisions, share in demand.groups():
        needed = share * demand.pairs_per_s
        group_options = [o for o in options if o.precision in precisions]
        if not group_options:
            reasons.append(f"{label} needs {needed:.1f} pairs/s but no node type can run it (see exclusions)")
            continue
        fastest_on: dict[str, float] = {}
        for o in group_options:
            fastest_on[o.node_type] = max(fastest_on.get(o.node_type, 0.0), o.pairs_per_replica)
        best = sum(rate * gpus[node_type] for node_type, rate in fastest_on.items())
        if best + 1e-9 < needed:
            reasons.append(
                f"{label} needs {needed:.1f} pairs/s but at most {best:.1f} pairs/s fit on every GPU it can use"
            )
    if not reasons:
        total_gpus = sum(gpus.values())
        reasons.append(
            f"each precision fits alone, but together they need more than the {total_gpus} GPUs in the inventory "
            f"to serve {demand.pairs_per_s:.1f} pairs/s"
        )
    return reasons


def solve_placement(
    options: list[Option],
    pools: list[NodePool],
    demand: Demand,
    *,
    objective: Objective = "cost",
    budget: float | None = None,
    rejected: tuple[Rejection, ...] = (),
) -> Plan:
    """Optimal replicas per option; raises PlacementInfeasible with reasons when none exists."""
    if objective == "capacity" and budget is None:
        raise ValueError("the capacity objective needs a budget")
    options = [o for o in options if o.pairs_per_replica > 0]
    model = _build(options, pools, demand)
    cost = model.cost_vector()
    if objective == "cost":
        z_floor = np.zeros(model.n_vars)
        z_floor[model.z] = 1.0
        model.add(z_floor, demand.pairs_per_s, np.inf)
        stages = [cost, -model.z_vector(), model.replica_vector()]
    else:
        model.add(cost, -np.inf, float(budget))
        stages = [-model.z_vector(), cost, model.replica_vector()]
    solution = None
    for objective_vector in stages:
        solution = model.solve(objective_vector)
        if solution is None:
            raise PlacementInfeasible(_diagnose(options, pools, demand, objective, budget), rejected)
        # Hold this stage's optimum (with a little slack for floating point) while the next improves.
        best = float(objective_vector @ solution)
        model.add(objective_vector, -np.inf, best + 1e-7 * max(1.0, abs(best)))
    x, y, _ = _snap(solution, model)
    placements = tuple(
        Placement(o.precision, o.node_type, xi, o.pairs_per_replica) for o, xi in zip(options, x) if xi > 0
    )
    used = {(p.precision, p.node_type) for p in placements}
    unused = tuple(
        Rejection(o.precision, o.node_type, _unused_reason(o, pools, objective))
        for o in options
        if (o.precision, o.node_type) not in used
    )
    return Plan(
        objective=objective,
        placements=placements,
        nodes={pool.name: yi for pool, yi in zip(pools, y)},
        cost_per_hour=sum(pool.cost_per_hour * yi for pool, yi in zip(pools, y)),
        servable_pairs_per_s=servable_traffic(x, options, demand),
        demand=demand,
        rejected=tuple(rejected),
        unused=unused,
    )


def _unused_reason(option: Option, pools: list[NodePool], objective: Objective) -> str:
    pool = next(p for p in pools if p.name == option.node_type)
    per_gpu_hour = pool.cost_per_hour / pool.gpus_per_node
    price = per_gpu_hour / option.pairs_per_replica * 1000
    better = "meets the demand at lower cost" if objective == "cost" else "serves more traffic within the budget"
    return (
        f"feasible ({option.pairs_per_replica:.1f} pairs/s per replica, {price:.3f}/h per 1000 pairs/s) "
        f"but the optimum {better} without it"
    )
