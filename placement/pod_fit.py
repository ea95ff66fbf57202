"""Render-time check that every pod fits the node type it is meant for.

A pod's requests are what the scheduler reserves: its containers together, or its largest init
container if that is more (init containers run one at a time, before the others). A pod whose
requests exceed its node type's allocatable resources (`placement.machines`) stays Pending
forever, so such a plan is refused here, naming the pod, the node type and the shortfall.
Pure: plain numbers in, an error or nothing out.
"""

from __future__ import annotations

from dataclasses import dataclass

from placement.machines import MACHINES, Allocatable, allocatable


class PodFitError(ValueError):
    """A pod larger than the node type it is meant for; the message names both and the shortfall."""


@dataclass(frozen=True)
class PodRequest:
    pod: str  # e.g. "rayservice rerank-fleet, worker group l4"
    node_type: str  # e.g. "node_types.l4 (g6.xlarge)"
    cpu: float
    memory_gib: float


def quantity_cpu(value: str) -> float:
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def quantity_gib(value: str) -> float:
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1.0, "Ti": 1024.0}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value) / 2**30


def pod_requests(spec: dict) -> tuple[float, float]:
    """(CPU, GiB) a pod spec reserves: max(sum of its containers, its largest init container)."""

    def of(container: dict) -> tuple[float, float]:
        requests = (container.get("resources") or {}).get("requests") or {}
        return quantity_cpu(str(requests.get("cpu", "0"))), quantity_gib(str(requests.get("memory", "0")))

    app = [of(c) for c in spec.get("containers", [])]
    init = [of(c) for c in spec.get("initContainers", [])]
    cpu = max([sum(c for c, _ in app), *(c for c, _ in init)])
    memory = max([sum(m for _, m in app), *(m for _, m in init)])
    return cpu, memory


def machine_allocatable(machine: str, platform: str) -> Allocatable | None:
    """What one node of `machine` leaves our pods on `platform`, or None where it is not known."""
    if platform not in ("eks", "gke") or machine not in MACHINES:
        return None
    return allocatable(MACHINES[machine], platform)


def check_fits(request: PodRequest, room: Allocatable) -> None:
    short = []
    if request.cpu > room.cpu + 1e-9:
        short.append(f"{request.cpu - room.cpu:.2f} CPU (asks {request.cpu:g}, {room.cpu:.2f} allocatable)")
    if request.memory_gib > room.memory_gib + 1e-9:
        short.append(f"{request.memory_gib - room.memory_gib:.2f} GiB (asks {request.memory_gib:.2f}, {room.memory_gib:.2f} allocatable)")
    if short:
        raise PodFitError(f"{request.pod} does not fit node type {request.node_type}: short by {' and '.join(short)} [{room.detail}]")


def check_pods_fit(platform: str, owner: str, pods: list[tuple[str, dict, str, str | None]]) -> list[str]:
    """Each (pod, pod spec, node type, machine) against its machine on `platform`: PodFitError for
    the first that does not fit; a note for each whose machine the plan does not know."""
    notes = []
    for name, spec, node_type, machine in pods:
        room = machine_allocatable(machine, platform) if machine else None
        if room is None:
            notes.append(f"{owner} {name}: not checked against its nodes ({platform} nodes of {node_type} have no machine the plan knows)")
            continue
        cpu, memory = pod_requests(spec)
        check_fits(PodRequest(f"{owner} {name}", f"{node_type} ({machine})", cpu, memory), room)
    return notes
