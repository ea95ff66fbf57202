"""The MILP against brute force on small random cases, and infeasible demands refused with reasons."""

from __future__ import annotations

import itertools
import random

import pytest

from placement.solve import Demand, NodePool, Option, PlacementInfeasible, Rejection, solve_placement


def brute_force_z(x: tuple[int, ...], options: list[Option], demand: Demand) -> float:
    """Traffic served at the requested split, computed independently of the solver module."""
    caps: dict[str, float] = {}
    for xi, o in zip(x, options):
        caps[o.precision] = caps.get(o.precision, 0.0) + xi * o.pairs_per_replica
    if demand.cascade_load:
        return cascade_z(caps, demand)
    ratios = [caps.get(p, 0.0) / s for p, s in demand.shares.items()]
    free_share = 1.0 - sum(demand.shares.values())
    if free_share > 1e-12:
        ratios.append(sum(caps.get(p, 0.0) for p in demand.free_precisions) / free_share)
    return min(ratios)


def cascade_z(caps: dict[str, float], demand: Demand) -> float:
    """With cascades: the most traffic Z for which some split of the free share over the free
    precisions leaves every precision its own share plus its cascade load (bisection on Z, each Z
    checked by filling the free share precision by precision)."""
    rest = 1.0 - sum(demand.shares.values()) - demand.cascade_share

    def serves(z: float) -> bool:
        for p, share in demand.shares.items():
            if caps.get(p, 0.0) < (share + demand.cascade_load.get(p, 0.0)) * z * (1 - 1e-12):
                return False
        left = rest
        for p in sorted(demand.free_precisions):
            spare = caps.get(p, 0.0) / z - demand.cascade_load.get(p, 0.0)
            if spare < -1e-12:
                return False
            left -= min(left, spare)
        return left <= 1e-12

    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if serves(mid) else (lo, mid)
    return lo


def brute_force(options, pools, demand, objective, budget):
    """Best (key, x, y) over every integer assignment within the bounds, or None."""
    best = None
    for y in itertools.product(*[range(p.min_nodes, p.max_nodes + 1) for p in pools]):
        capacity = {p.name: p.gpus_per_node * yi for p, yi in zip(pools, y)}
        cost = sum(p.cost_per_hour * yi for p, yi in zip(pools, y))
        if objective == "capacity" and cost > budget + 1e-9:
            continue
        ranges = [range(capacity[o.node_type] + 1) for o in options]
        for x in itertools.product(*ranges):
            used = {p.name: 0 for p in pools}
            for xi, o in zip(x, options):
                used[o.node_type] += xi
            if any(used[n] > capacity[n] for n in used):
                continue
            z = brute_force_z(x, options, demand)
            if objective == "cost":
                if z < demand.pairs_per_s - 1e-9:
                    continue
                key = (round(cost, 6), -round(z, 6), sum(x))
            else:
                key = (-round(z, 6), round(cost, 6), sum(x))
            if best is None or key < best[0]:
                best = (key, x, y)
    return best


def random_case(rng: random.Random):
    pools = []
    for i in range(2):
        max_nodes = rng.randint(1, 2)
        pools.append(
            NodePool(
                name=f"n{i}",
                gpus_per_node=rng.randint(1, 2),
                min_nodes=rng.choice([0, 0, 1]) if max_nodes else 0,
                max_nodes=max_nodes,
                cost_per_hour=round(rng.uniform(0.5, 5.0), 2),
            )
        )
    precisions = ["bf16", "awq"]
    options = [
        Option(p, pool.name, round(rng.uniform(1.0, 10.0), 2))
        for p in precisions
        for pool in pools
        if rng.random() < 0.8  # some options are missing, as memory or hardware would exclude them
    ]
    if rng.random() < 0.5:
        share = rng.choice([0.3, 0.5, 0.7])
        demand_shares = {"bf16": share}
        free = frozenset({"awq"})
    else:
        demand_shares = {"bf16": 0.5, "awq": 0.5}
        free = frozenset()
    demand = Demand(pairs_per_s=round(rng.uniform(2.0, 25.0), 2), shares=demand_shares, free_precisions=free)
    return options, pools, demand


def with_cascade(demand: Demand, rng: random.Random) -> Demand:
    """A cascade answering part of the traffic: awq scores all its pairs, bf16 its top k of 10 (the
    arms' own shares shrunk to make room)."""
    share, k = rng.choice([0.2, 0.4]), rng.choice([1, 3, 10])
    shares = {p: s * (1 - share) for p, s in demand.shares.items()}
    return Demand(demand.pairs_per_s, shares, demand.free_precisions, cascade_share=share,
                  cascade_load={"awq": share, "bf16": share * k / 10})  # fmt: skip


@pytest.mark.parametrize("cascade", [False, True])
@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("objective", ["cost", "capacity"])
def test_milp_is_optimal_against_brute_force(seed, objective, cascade):
    rng = random.Random(seed * 7919 + (objective == "capacity"))
    options, pools, demand = random_case(rng)
    if cascade:
        demand = with_cascade(demand, rng)
    budget = round(rng.uniform(1.0, 12.0), 2) if objective == "capacity" else None
    expected = brute_force(options, pools, demand, objective, budget)
    if expected is None:
        with pytest.raises(PlacementInfeasible) as refused:
            solve_placement(options, pools, demand, objective=objective, budget=budget)
        assert refused.value.reasons
        return
    plan = solve_placement(options, pools, demand, objective=objective, budget=budget)
    x = tuple(next((p.replicas for p in plan.placements if (p.precision, p.node_type) == (o.precision, o.node_type)), 0) for o in options)
    y = tuple(plan.nodes[p.name] for p in pools)
    z = brute_force_z(x, options, demand)
    key = (round(plan.cost_per_hour, 6), -round(z, 6), plan.replicas) if objective == "cost" else (
        -round(z, 6), round(plan.cost_per_hour, 6), plan.replicas)
    assert key == expected[0], f"solver {x, y} vs brute force {expected[1:]}"
    # The plan is itself feasible: GPUs used fit the nodes bought, within the inventory.
    for pool, yi in zip(pools, y):
        assert pool.min_nodes <= yi <= pool.max_nodes
        assert sum(xi for xi, o in zip(x, options) if o.node_type == pool.name) <= pool.gpus_per_node * yi
    assert plan.servable_pairs_per_s == pytest.approx(z)


def test_the_cheapest_mix_is_chosen_over_the_fastest_gpu():
    pools = [NodePool("big", 8, 0, 1, 98.0), NodePool("small", 1, 0, 20, 0.8)]
    options = [Option("bf16", "big", 54.0), Option("bf16", "small", 6.6)]
    plan = solve_placement(options, pools, Demand(60.0, {"bf16": 1.0}, frozenset()))
    assert plan.nodes == {"big": 0, "small": 10}
    assert plan.cost_per_hour == pytest.approx(8.0)
    assert [p.replicas for p in plan.placements] == [10]


def test_fixed_shares_are_honoured():
    pools = [NodePool("a", 4, 0, 2, 4.0)]
    options = [Option("bf16", "a", 10.0), Option("fp8", "a", 20.0)]
    plan = solve_placement(options, pools, Demand(60.0, {"bf16": 0.5, "fp8": 0.5}, frozenset()))
    assert plan.capacity_of("bf16") >= 30.0 and plan.capacity_of("fp8") >= 30.0
    # After the cheapest cost (2 nodes), the 8 GPUs paid for are split to serve the most traffic.
    assert {(p.precision, p.replicas) for p in plan.placements} == {("bf16", 5), ("fp8", 3)}


def test_more_demand_than_the_inventory_holds_is_refused_with_the_reason():
    pools = [NodePool("l4", 1, 0, 2, 0.8)]
    options = [Option("bf16", "l4", 6.0)]
    rejected = (Rejection("bf16", "t4", "bf16 needs 19.2 GiB > 13.5 GiB usable on T4"),)
    with pytest.raises(PlacementInfeasible) as refused:
        solve_placement(options, pools, Demand(50.0, {"bf16": 1.0}, frozenset()), rejected=rejected)
    message = str(refused.value)
    assert "bf16 (share 1) needs 50.0 pairs/s but at most 12.0 pairs/s fit on every GPU it can use" in message
    assert "bf16 on t4: bf16 needs 19.2 GiB > 13.5 GiB usable on T4" in message


def test_a_required_precision_without_any_node_type_is_refused():
    pools = [NodePool("t4", 1, 0, 4, 0.5)]
    options = [Option("fp16", "t4", 3.0)]
    with pytest.raises(PlacementInfeasible, match="fp8 \\(share 0.5\\) needs 5.0 pairs/s but no node type can run it"):
        solve_placement(options, pools, Demand(10.0, {"fp8": 0.5}, frozenset({"fp16"})))


def test_arms_that_fit_alone_but_not_together_are_refused():
    pools = [NodePool("a", 1, 0, 3, 1.0)]
    options = [Option("bf16", "a", 10.0), Option("fp8", "a", 10.0)]
    with pytest.raises(PlacementInfeasible, match="together they need more than the 3 GPUs"):
        solve_placement(options, pools, Demand(40.0, {"bf16": 0.5, "fp8": 0.5}, frozenset()))


def test_a_budget_below_the_minimum_nodes_is_refused():
    pools = [NodePool("a", 1, 2, 3, 5.0)]
    with pytest.raises(PlacementInfeasible, match="budget 4/h is below the cost of the minimum node counts"):
        solve_placement([Option("bf16", "a", 10.0)], pools, Demand(1.0, {"bf16": 1.0}, frozenset()), objective="capacity", budget=4.0)


def test_capacity_objective_spends_within_the_budget():
    pools = [NodePool("a", 1, 0, 10, 1.0), NodePool("b", 2, 0, 5, 3.0)]
    options = [Option("bf16", "a", 4.0), Option("bf16", "b", 5.0)]
    plan = solve_placement(options, pools, Demand(1.0, {"bf16": 1.0}, frozenset()), objective="capacity", budget=7.5)
    assert plan.cost_per_hour <= 7.5
    # 7 nodes of "a" (28 pairs/s) beat any mix with "b" (3.0/h for 10 pairs/s).
    assert plan.servable_pairs_per_s == pytest.approx(28.0)
