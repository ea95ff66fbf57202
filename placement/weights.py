"""Where each arm's replicas read their weights, and the render-time check that they can.

An arm reads `model.awq_checkpoint` (awq arms) or `model.source`. A path must lie under the
folder its node type mounts (`weights.mount_path`) from a volume or an object-store copy: a
path nothing mounts would leave that arm failing to start, and KubeRay routes no traffic to a
RayService until every Serve application runs. A hub id resolves in `HF_HOME=<mount>/hf`:
pre-filled and offline for volume and object_store, downloaded at start for hub. Pure logic.
"""

from __future__ import annotations

import math
import posixpath
from dataclasses import dataclass

from placement.inventory import Inventory, NodeType, WeightsSpec
from placement.memory import ParameterCounts, weight_items

GIB = 1024**3
DISK_MARGIN = 1.2  # safetensors index, tokenizer and processor files, partial-download slack


class WeightsPlanError(ValueError):
    """A plan whose arm reads weights its node type does not provide; the message names both."""


def checkpoint_of(inventory: Inventory, precision: str) -> str:
    return inventory.model.awq_checkpoint if precision == "awq" and inventory.model.awq_checkpoint else inventory.model.source


def is_path(checkpoint: str) -> bool:
    return checkpoint.startswith("/")


def hf_home(spec: WeightsSpec) -> str:
    return posixpath.join(spec.mount_path, "hf")


def weights_env(spec: WeightsSpec, token_file: str) -> dict[str, str]:
    """The replica's environment for `spec`: HF_HOME on the weights mount, offline unless it
    downloads from the hub, and the hub token's file when it needs one."""
    env = {"HF_HOME": hf_home(spec)}
    if spec.source != "hub":
        env["HF_HUB_OFFLINE"] = "1"
    elif spec.hub_token:
        env["HF_TOKEN_PATH"] = token_file
    return env


def check_arm_weights(inventory: Inventory, placements: list[tuple[str, NodeType]]) -> None:
    """Raise WeightsPlanError for the first (precision, node type) whose checkpoint cannot be read there."""
    for precision, node in placements:
        spec = inventory.weights_for(node)
        checkpoint = checkpoint_of(inventory, precision)
        arm = f"{precision}-{node.name}"
        if not is_path(checkpoint):
            continue  # a hub id: HF_HOME is on the weights mount in every mode
        if spec.source == "hub":
            raise WeightsPlanError(
                f"arm {arm} reads {checkpoint}, but node type {node.name} downloads its weights from the hub "
                "(weights.source: hub): give a hub id, or a volume / object_store that holds this folder"
            )
        inside = posixpath.normpath(checkpoint) == spec.mount_path or posixpath.normpath(checkpoint).startswith(spec.mount_path.rstrip("/") + "/")
        if not inside:
            raise WeightsPlanError(
                f"arm {arm} reads {checkpoint}, but node type {node.name} mounts its weights at {spec.mount_path} "
                f"(weights.source: {spec.source}): move the checkpoint under it or change weights.mount_path"
            )


def checkpoint_bytes(counts: ParameterCounts, precision: str, *, nf4_double_quant: bool) -> int:
    """Size on disk of what an arm loads: the bf16 source (quantised at load) or the AWQ checkpoint."""
    stored = "awq" if precision == "awq" else "bf16"
    return sum(item.bytes for item in weight_items(counts, stored, nf4_double_quant=nf4_double_quant))


def disk_gib(inventory: Inventory, counts: ParameterCounts, node: NodeType, precisions: set[str]) -> int:
    """Local disk for copying or downloading the checkpoints this node type's arms read."""
    spec = inventory.weights_for(node)
    if spec.disk_gib is not None:
        return spec.disk_gib
    checkpoints = {checkpoint_of(inventory, p): p for p in precisions}
    total = sum(checkpoint_bytes(counts, p, nf4_double_quant=inventory.model.nf4_double_quant) for p in checkpoints.values())
    return max(1, math.ceil(total * DISK_MARGIN / GIB))


@dataclass(frozen=True)
class CopyCommand:
    """The shell command that copies an object-store prefix into a folder (an init step)."""

    image: str
    command: list[str]


def copy_command(uri: str, dest: str) -> CopyCommand:
    if uri.startswith("s3://"):
        return CopyCommand("amazon/aws-cli:2.22.35", ["aws", "s3", "sync", "--only-show-errors", uri, dest])
    return CopyCommand("google/cloud-sdk:502.0.0-slim", ["gcloud", "storage", "rsync", "--recursive", uri, dest])
