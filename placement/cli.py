"""`rerank-fleet plan`: plan a placement from an inventory YAML and write what deploys it.

    python -m placement.cli plan configs/placement-example.yaml --out /tmp/plan
    python -m placement.cli plan inventory.yaml --objective capacity --budget 40 --profile bench.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from placement.inventory import Inventory, InventoryError
from placement.memory import ArchitectureError
from placement.planner import plan_placement
from placement.outputs import OUTPUT_FILES, render_outputs, write_outputs
from placement.render import RenderError, read_architecture_config
from placement.report import format_plan
from placement.solve import PlacementInfeasible
from placement.profiles import CapacityReport, read_bench_reports
from serve.yaml_io import describe_validation_error, read_yaml_mapping


def add_subparser(subparsers) -> argparse.ArgumentParser:
    """Register the `plan` subcommand on an argparse subparsers object."""
    parser = subparsers.add_parser(
        "plan",
        help="choose replicas per precision arm and GPU type, and write the deployment files",
        description="Plan which precision arm runs on which GPU type with how many replicas (exact MILP), "
        "print the reasoning, and optionally write the Serve config, ray-up YAMLs and KubeRay manifests.",
    )
    parser.add_argument("inventory", type=Path, help="inventory YAML (node types, model, traffic, arms, constraints)")
    parser.add_argument(
        "--profile",
        type=Path,
        action="append",
        default=[],
        help="`rerank-fleet bench engine --out` JSON or `scripts/gpu-check.sh`'s gpu-check.json, measured on one GPU type (repeat for several)",
    )
    parser.add_argument(
        "--capacity",
        type=Path,
        action="append",
        default=[],
        help="`rerank-fleet loadtest --capacity` capacity.json (served end to end at an SLO); preferred over --profile",
    )
    parser.add_argument(
        "--out", type=Path, help=f"folder to write {', '.join(OUTPUT_FILES.values())} into"
    )
    parser.add_argument(
        "--objective",
        choices=("cost", "capacity"),
        default="cost",
        help="cost: meet the traffic at the lowest cost; capacity: serve the most traffic within --budget",
    )
    parser.add_argument("--budget", type=float, help="cost per hour the capacity objective may spend")
    parser.add_argument(
        "--image", help="the project's image as pushed, e.g. ghcr.io/org/rerank-fleet@sha256:... (replaces deployment.image)"
    )
    parser.set_defaults(func=run_plan)
    return parser


def _load_measurement(path: Path, parse, what: str):
    try:
        return parse(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as err:
        raise InventoryError(f"{path}: cannot read the {what}: {err}") from None
    except ValidationError as err:
        raise InventoryError(describe_validation_error(err, str(path), what)) from None


def load_inventory(path: Path, *, image: str | None = None) -> Inventory:
    """The inventory file, with `deployment.image` replaced by `image` when given (validated alike)."""
    if image is None:
        return Inventory.from_yaml(path)
    data = read_yaml_mapping(path, InventoryError)
    deployment = data.get("deployment") if isinstance(data.get("deployment"), dict) else {}
    return Inventory.from_dict({**data, "deployment": {**deployment, "image": image}}, source=f"{path} with --image")


def run_plan(args: argparse.Namespace) -> int:
    if args.objective == "capacity" and args.budget is None:
        print("error: --objective capacity needs --budget", file=sys.stderr)
        return 2
    try:
        inventory = load_inventory(args.inventory, image=args.image)
        architecture = read_architecture_config(inventory, args.inventory)
        bench = [report for path in args.profile for report in _load_measurement(path, read_bench_reports, "bench engine profile")]
        capacity = [_load_measurement(path, CapacityReport.model_validate, "capacity report") for path in args.capacity]
        report = plan_placement(inventory, architecture, bench=bench, capacity=capacity, objective=args.objective, budget=args.budget)
    except (InventoryError, ArchitectureError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except PlacementInfeasible as err:
        print(str(err), file=sys.stderr)
        return 1
    print(format_plan(report))
    if args.out is not None:
        try:
            outputs = render_outputs(report, str(args.inventory))
        except RenderError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        written = write_outputs(outputs, args.out)
        print("\nWrote " + ", ".join(str(p) for p in written))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m placement.cli")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_subparser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
