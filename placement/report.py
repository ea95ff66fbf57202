"""Human-readable views of a plan: the terminal table, and the memory table in docs/PLACEMENT.md."""

from __future__ import annotations

import json
from pathlib import Path

from placement import feature_cache
from placement.hardware import PLANNED_PRECISIONS
from placement.memory import GIB, Workload, count_parameters, read_architecture, replica_memory
from placement.planner import PlacementReport, arm_name, arm_weights, cascade_routes


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return out


def format_plan(report: PlacementReport) -> str:
    """The terminal table: arms, nodes, cost, memory breakdowns, throughput sources, rejections."""
    inventory = report.inventory
    plan = report.plan
    traffic = inventory.traffic
    headroom = inventory.constraints.capacity_headroom
    weights = arm_weights(plan)
    lines = [
        f"Placement for {inventory.model.name} ({report.counts.total / 1e9:.2f} B parameters), objective: {plan.objective}",
        f"Traffic: {traffic.target_qps:g} QPS x {traffic.documents_per_request} documents = "
        f"{traffic.target_pairs_per_s:g} pairs/s; planned with {headroom:.0%} headroom: {plan.demand.pairs_per_s:.1f} pairs/s",
        "",
        "Chosen arms",
    ]
    rows = []
    for p in plan.placements:
        a = report.assessment(p.precision, p.node_type)
        rows.append(
            [
                arm_name(p.precision, p.node_type),
                p.precision,
                p.node_type,
                a.node_type.gpu,
                str(p.replicas),
                f"{p.pairs_per_replica:.1f}",
                a.throughput.source,
                f"{p.pairs_per_s:.1f}",
                f"{weights[(p.precision, p.node_type)]:.4f}",
                f"{a.memory.total_gib:.1f} / {a.usable_bytes / GIB:.1f} GiB",
            ]
        )
    lines += _table(
        ["arm", "precision", "node type", "GPU", "replicas", "pairs/s each", "source", "pairs/s", "weight", "memory / usable"],
        rows,
    )
    if inventory.cascades:
        docs = traffic.documents_per_request
        lines += ["", "Cascades (no GPU of their own: their requests' pairs land on their arms, counted in the shares above)"]
        for c in inventory.cascades:
            then = c.share * min(c.k, docs) / docs
            lines.append(f"  {c.name}: {c.share:.0%} of requests; {c.first} scores all their pairs ({c.share * plan.demand.pairs_per_s:.1f} pairs/s), "
                         f"{c.then} the top {c.k} of each ({then * plan.demand.pairs_per_s:.1f} pairs/s)")  # fmt: skip
        for route in cascade_routes(inventory, plan):
            lines.append(f"  rendered {route.name}: {arm_name(*route.first)} then {arm_name(*route.then)}, weight {route.weight:.4f}")
    lines += ["", "Nodes"]
    node_rows = []
    for node in inventory.node_types:
        count = plan.nodes[node.name]
        used = sum(p.replicas for p in plan.placements if p.node_type == node.name)
        node_rows.append(
            [
                node.name,
                node.gpu,
                f"{count} of {node.node_floor}..{node.node_ceiling}",
                f"{used} / {count * node.gpus_per_node}",
                f"{node.cost_per_hour:g}",
                f"{count * node.cost_per_hour:.2f}",
            ]
        )
    lines += _table(["node type", "GPU", "nodes (limits)", "GPUs used", "cost/h each", "cost/h"], node_rows)
    lines += [
        "",
        f"Total cost {plan.cost_per_hour:.2f}/h; serves {plan.servable_pairs_per_s:.1f} pairs/s at the requested split "
        f"(target {plan.demand.pairs_per_s:.1f}).",
        "",
        "Memory per replica",
    ]
    shown = set()
    for p in plan.placements:
        a = report.assessment(p.precision, p.node_type)
        if p.precision not in shown:
            shown.add(p.precision)
            lines.append(a.memory.explain())
    lines += ["", "Throughput per replica"]
    for p in plan.placements:
        a = report.assessment(p.precision, p.node_type)
        lines.append(f"  {p.precision} on {a.node_type.gpu}: {a.throughput.pairs_per_s:.1f} pairs/s, {a.throughput.detail}")
    lines += ["", "Feature cache per arm (image features: fetch from the shared Redis vs run the vision tower)"]
    for name, choice in feature_cache.cache_choices(report).items():
        lines.append(f"  {name}: {choice.mode} ({choice.reason})")
    if feature_cache.uses_cache_redis(report):
        lines.append(f"  cache Redis maxmemory: {feature_cache.cache_redis_sizing(report).detail}")
    lines += ["", "Rejected options"]
    for r in plan.rejected:
        where = f"{r.precision} on {r.node_type}" if r.node_type else f"{r.precision} (every node type)"
        lines.append(f"  {where}: {r.reason}")
    if plan.unused:
        lines += ["", "Feasible options the optimum did not use"]
        for r in plan.unused:
            lines.append(f"  {r.precision} on {r.node_type}: {r.reason}")
    return "\n".join(lines)


# --- docs -----------------------------------------------------------------------------------

DOCS_BEGIN = "<!-- generated:memory-table (placement.outputs.regenerate_examples) -->"
DOCS_END = "<!-- /generated:memory-table -->"
DOCS_MODELS = (("Qwen3-VL(-Reranker)-8B", "qwen3-vl-8b.json"), ("Qwen3-VL(-Reranker)-2B", "qwen3-vl-2b.json"))
# The workload the docs table is computed for: the serving app's default micro-batch, image documents present.
DOCS_WORKLOAD = Workload(batch_tokens=16384, mean_pair_tokens=512, with_images=True)
DOCS_RUNTIME_OVERHEAD = GIB


def memory_table_markdown(models_dir: Path) -> str:
    lines = [
        f"Workload: {DOCS_WORKLOAD.batch_tokens} tokens per micro-batch, {DOCS_WORKLOAD.mean_pair_tokens:g} tokens per pair "
        f"({DOCS_WORKLOAD.rows} pairs), image documents present; runtime overhead {DOCS_RUNTIME_OVERHEAD / GIB:g} GiB. "
        "Figures in GiB.",
        "",
    ]
    for title, filename in DOCS_MODELS:
        arch = read_architecture(json.loads((models_dir / filename).read_text()))
        counts = count_parameters(arch)
        lines += [
            f"**{title}**: {counts.total:,} parameters = vision tower {counts.vision_tower:,} + decoder linears "
            f"{counts.decoder_linears:,} + norms/biases {counts.decoder_small:,} + embeddings {counts.embeddings:,} "
            f"+ lm_head {counts.lm_head:,}{' (tied)' if not counts.lm_head else ''}.",
            "",
            "| precision | decoder linears | vision tower | embeddings | lm_head | norms | weights | kernel scratch | activations | overhead | **total** |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        variants = [(p, True) for p in PLANNED_PRECISIONS]
        variants.insert(variants.index(("nf4", True)) + 1, ("nf4", False))
        for precision, double_quant in variants:
            memory = replica_memory(
                arch, precision, DOCS_WORKLOAD, runtime_overhead_bytes=DOCS_RUNTIME_OVERHEAD, nf4_double_quant=double_quant
            )
            by_name = {item.name: item.bytes for item in memory.items}
            weights = sum(by_name[k] for k in ("decoder linears", "vision tower", "embeddings", "lm_head", "norms and biases"))
            cells = [
                by_name["decoder linears"],
                by_name["vision tower"],
                by_name["embeddings"],
                by_name["lm_head"],
                by_name["norms and biases"],
                weights,
                by_name["kernel scratch"],
                by_name["activations"],
                by_name["runtime overhead"],
            ]
            row = " | ".join(f"{c / GIB:.2f}" for c in cells)
            lines.append(f"| {memory.label} | {row} | **{memory.total_gib:.2f}** |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def replace_generated_block(text: str, block: str) -> str:
    """`text` with the part between the generated-table markers replaced by `block`."""
    start = text.index(DOCS_BEGIN) + len(DOCS_BEGIN)
    end = text.index(DOCS_END)
    return text[:start] + "\n" + block + text[end:]
