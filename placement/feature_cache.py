"""Whether caching image features pays, per arm, and how big the cache Redis must be (it holds
the shared image features and, when the ingress's score cache is shared, the scores).

A cached image skips the vision tower but costs moving its features: (1 + deepstack mergers) x
visual tokens x decoder width x 2 bytes, 32 MiB for one 1024-token image of Qwen3-VL-8B. On a
slow GPU the tower costs far more than that transfer, so the shared Redis tier pays; on an
H100 the tower costs about as much as the transfer, so only the in-replica LRU (a memory copy)
does. The tower's time is measured where possible (`bench engine` reports, or the inventory's
`vision_ms_per_image`), else the roofline. Pure functions of the plan: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from engine.config import DEFAULT_MAX_PIXELS, FACTOR
from placement.inventory import Inventory, NodeType
from placement.memory import Architecture
from placement.planner import PlacementReport, arm_name
from placement.profiles import BenchEngineReport, find_vision_ms
from placement.throughput import roofline_vision_ms

FEATURE_DTYPE_BYTES = 2  # features are kept and cached in bf16/fp16
# Shared only when fetching costs at most half the tower's time: a hit must save real work after
# Redis's own jitter and deserialisation.
FETCH_TO_VISION_LIMIT = 0.5
MIB = 1024**2
MIN_CACHE_BYTES = 256 * MIB
REDIS_OVERHEAD = 1.10  # per-key bookkeeping and allocator slack
SCORE_PAIR_BYTES = 200  # one cached score in Redis: its key, 8 bytes, its expiry (measured ~197 with a 63-character key; ours are 45)


def image_feature_bytes(arch: Architecture, image_tokens: int) -> int:
    """Bytes of one image's cached features (the merger's output and each deepstack merger's)."""
    return (1 + arch.vision.deepstack_layers) * image_tokens * arch.vision.out_hidden * FEATURE_DTYPE_BYTES


def max_item_bytes(arch: Architecture) -> int:
    """The cache's per-entry bound: the features of the largest image the model accepts, rounded up to a MiB."""
    largest = image_feature_bytes(arch, DEFAULT_MAX_PIXELS // (FACTOR * FACTOR))
    return math.ceil(largest * 1.02 / MIB) * MIB  # + the entry's header


@dataclass(frozen=True)
class CacheChoice:
    """The feature-cache tier of one arm and the figures behind it."""

    mode: str  # "shared" | "local" | "off", the arm's `feature_cache`
    feature_mib: float
    vision_ms: float
    fetch_ms: float
    reason: str


def vision_ms(
    inventory: Inventory, arch: Architecture, node: NodeType, precision: str, bench: Sequence[BenchEngineReport] = ()
) -> tuple[float, str]:
    """(ms, how) of the vision tower on the traffic's typical image: the inventory's figure, else a
    `bench engine` measurement on this GPU, else the roofline."""
    if node.vision_ms_per_image is not None:
        return node.vision_ms_per_image, "measured, from the inventory"
    model_ids = {inventory.model.source, inventory.model.name}
    found = find_vision_ms(bench, node.gpu_model, precision, model_ids, arch, inventory.traffic.tokens_per_image)
    if found is not None:
        return found
    return roofline_vision_ms(node.gpu_model, arch, inventory.traffic.tokens_per_image), "roofline"


def choose(
    inventory: Inventory, arch: Architecture, node: NodeType, precision: str, bench: Sequence[BenchEngineReport] = ()
) -> CacheChoice:
    traffic, deployment = inventory.traffic, inventory.deployment
    nbytes = image_feature_bytes(arch, traffic.tokens_per_image)
    tower_ms, how = vision_ms(inventory, arch, node, precision, bench)
    fetch = deployment.cache_rtt_ms + nbytes * 8 / (deployment.cache_network_gbps * 1e9) * 1e3
    figures = f"{nbytes / MIB:.1f} MiB per image: fetch {fetch:.1f} ms vs vision tower {tower_ms:.1f} ms ({how}) on {node.gpu}"
    if traffic.image_share == 0:
        return CacheChoice("off", nbytes / MIB, tower_ms, fetch, "no image traffic")
    if fetch <= FETCH_TO_VISION_LIMIT * tower_ms:
        return CacheChoice("shared", nbytes / MIB, tower_ms, fetch, f"{figures}: the shared Redis pays")
    return CacheChoice("local", nbytes / MIB, tower_ms, fetch, f"{figures}: only the in-replica LRU pays")


@dataclass(frozen=True)
class CacheSizing:
    maxmemory_bytes: int
    working_set_bytes: int
    detail: str

    @property
    def fits_fraction(self) -> float:
        return min(1.0, self.maxmemory_bytes / self.working_set_bytes) if self.working_set_bytes else 1.0


def size_shared_cache(inventory: Inventory, arch: Architecture, *, features: bool = True) -> CacheSizing:
    """Redis `maxmemory` for the new images of one cache window (`features`: some arm shares them)
    and, with the score cache shared, the new pairs of one score-cache window, within
    deployment.cache_max_memory_gib."""
    traffic = inventory.traffic
    new_images_per_s = traffic.target_qps * traffic.documents_per_request * traffic.image_share * traffic.new_image_fraction if features else 0.0
    working_set = int(new_images_per_s * traffic.cache_window_s * image_feature_bytes(arch, traffic.tokens_per_image) * REDIS_OVERHEAD)
    parts = [f"{new_images_per_s:.2f} new images/s x {traffic.cache_window_s} s window x "
             f"{image_feature_bytes(arch, traffic.tokens_per_image) / MIB:.1f} MiB = {working_set / 1024**3:.1f} GiB"] if features else []  # fmt: skip
    if traffic.score_cache == "shared":
        new_pairs_per_s = traffic.target_qps * traffic.documents_per_request * traffic.new_pair_fraction
        scores = int(new_pairs_per_s * traffic.score_cache_window_s * SCORE_PAIR_BYTES)
        working_set += scores
        parts.append(f"scores: {new_pairs_per_s:.1f} new pairs/s x {traffic.score_cache_window_s} s window x {SCORE_PAIR_BYTES} B = {scores / 1024**3:.2f} GiB")
    cap = int(inventory.deployment.cache_max_memory_gib * 1024**3)
    maxmemory = max(MIN_CACHE_BYTES, min(cap, working_set))
    maxmemory = math.ceil(maxmemory / MIB) * MIB
    detail = "; ".join(parts)
    if working_set > cap:
        detail += f"; capped at {cap / 1024**3:g} GiB (deployment.cache_max_memory_gib): {cap / working_set:.0%} of the window fits"
    return CacheSizing(maxmemory, working_set, detail)


def cache_choices(report: PlacementReport) -> dict[str, CacheChoice]:
    """The feature-cache tier of every planned arm (by arm name)."""
    nodes = {n.name: n for n in report.inventory.node_types}
    return {
        arm_name(p.precision, p.node_type): choose(report.inventory, report.architecture, nodes[p.node_type], p.precision, report.bench)
        for p in report.plan.placements
    }


def uses_shared_cache(report: PlacementReport) -> bool:
    return any(c.mode == "shared" for c in cache_choices(report).values())


def uses_cache_redis(report: PlacementReport) -> bool:
    """Whether the fleet needs the cache Redis: an arm shares image features, or the score cache is shared."""
    return uses_shared_cache(report) or report.inventory.traffic.score_cache == "shared"


def cache_redis_sizing(report: PlacementReport) -> CacheSizing:
    return size_shared_cache(report.inventory, report.architecture, features=uses_shared_cache(report))
