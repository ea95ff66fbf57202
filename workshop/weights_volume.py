"""The weights volume: filled once, read by every GPU node, and a marker for each checkpoint in it.

What a deployment runs (`rerank-fleet weights ...`, rendered by `placement.weights_jobs` as
Kubernetes Jobs and init containers, and as `ray up` node commands):

- `fill --from SOURCE --into MOUNT`: a hub id is downloaded into `MOUNT/hf` (the `HF_HOME` every
  replica reads offline); a folder (weights staged on a disk or NFS share, or the offline model
  in tests) is copied to `MOUNT/<its name>`. Either way a marker records it, last.
- `rerank-fleet quantize --model ... --out MOUNT/<name>` writes the AWQ checkpoint an awq arm
  reads, and `mark --into MOUNT --done MOUNT/<name>` records it.
- `wait --into MOUNT --need CHECKPOINT ...`: a GPU pod's init step, until every checkpoint its
  arms read has its marker (or a timeout, naming the ones missing): a replica never starts on a
  half-filled volume, whatever order the Jobs and the cluster come up in.

A marker is written after the data (and renamed into place), so its presence means complete.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

MARKERS = ".rerank-fleet"


def marker_path(into: Path, checkpoint: str) -> Path:
    """Where the marker of `checkpoint` (a hub id, or a folder under the mount, as an arm names it) lives."""
    slug = checkpoint.strip("/").replace("/", "--") or "root"
    return Path(into) / MARKERS / f"{slug}.json"


def mark(into: Path, checkpoint: str, **facts) -> Path:
    """Record `checkpoint` as complete in the volume at `into` (atomically)."""
    path = marker_path(into, checkpoint)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"checkpoint": checkpoint, "completed": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **facts}, indent=2))
    tmp.replace(path)
    return path


def fill(source: str, into: Path) -> str:
    """Put `source` into the volume at `into`; returns the checkpoint name an arm reads it by (the
    hub id, or the copied folder's path)."""
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    src = Path(source)
    if src.is_dir():
        dest = into / src.name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(src, dest)
        checkpoint, size = str(dest), _bytes(dest)
    else:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(source, cache_dir=into / "hf" / "hub"))
        checkpoint, size = source, _bytes(folder)
    mark(into, checkpoint, source=source, bytes=size)
    return checkpoint


def on_disk(into: Path, checkpoint: str) -> bool:
    """Whether a checkpoint staged by hand is there: a folder with its config.json, or a hub id's
    snapshot in the volume's HF_HOME. (A fill writes a marker instead, which also says complete.)"""
    if checkpoint.startswith("/"):
        return (Path(checkpoint) / "config.json").is_file()
    cache = Path(into) / "hf" / "hub" / f"models--{checkpoint.replace('/', '--')}" / "snapshots"
    return any(cache.glob("*/config.json"))


def missing(into: Path, needs: list[str], *, staged: bool = False) -> list[str]:
    """The checkpoints not yet complete: without a marker (`staged`: and not on disk either)."""
    return [n for n in needs if not marker_path(into, n).is_file() and not (staged and on_disk(into, n))]


def wait(into: Path, needs: list[str], *, timeout_s: float, staged: bool = False, interval_s: float = 10.0, log=print) -> list[str]:
    """Wait until every checkpoint in `needs` is complete; returns those still missing when
    `timeout_s` ran out (empty: all there)."""
    deadline = time.monotonic() + timeout_s
    last: list[str] | None = None
    while True:
        left = missing(into, needs, staged=staged)
        if not left or time.monotonic() >= deadline:
            return left
        if left != last:
            log(f"waiting for {', '.join(left)} in {into} (the weights Jobs fill it)")
            last = left
        time.sleep(interval_s)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
