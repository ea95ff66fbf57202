"""`rerank-fleet check-driver`: does this node's NVIDIA driver run the image's CUDA build?

A GPU node whose driver is older than the CUDA build of the image's torch starts Ray, takes arm
replicas, and fails them one by one at their first CUDA call ("driver too old"). Run first on a
GPU node (an init container of every GPU pod; a `ray up` node command before Ray starts), this
check fails the node instead, naming both versions, so no replica is ever placed there.

NVIDIA's minor-version compatibility: a CUDA 12.x build runs on any driver >= 525.60.13, a 13.x
build on any >= 580.65.06 (docs.nvidia.com/deploy/cuda-compatibility).
"""

from __future__ import annotations

import argparse
import subprocess
import sys

MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.strip().split(".") if p.isdigit())


def required_driver(cuda: str) -> str:
    """The oldest driver that runs a CUDA `cuda` ("13.0") build."""
    major = _version(cuda)[0]
    if major not in MIN_DRIVER:
        raise ValueError(f"no driver rule for CUDA {cuda}")
    return MIN_DRIVER[major]


def check(driver: str, cuda: str, build: str) -> str | None:
    """None when `driver` runs the CUDA `cuda` build (named `build` in messages), else why not."""
    need = required_driver(cuda)
    if _version(driver) >= _version(need):
        return None
    return (f"NVIDIA driver {driver} on this node is older than {need}, which the image's CUDA {cuda} build ({build}) needs: "
            f"use a node image whose driver is >= {need.split('.')[0]} (docs/DEPLOY.md, 'NVIDIA driver')")  # fmt: skip


def node_driver() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.splitlines()[0].strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--driver", help="the driver version to check (default: what nvidia-smi reports)")
    parser.add_argument("--cuda", help="the CUDA version of the build (default: this image's torch.version.cuda)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cli.driver_check", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    build = "given"
    cuda = args.cuda
    if cuda is None:
        import torch

        cuda, build = torch.version.cuda, f"torch {torch.__version__}"
        if cuda is None:
            print("check-driver: this image's torch is a CPU build: nothing to check", file=sys.stderr)
            return 0
    try:
        driver = args.driver or node_driver()
    except (OSError, subprocess.SubprocessError) as e:
        print(f"check-driver: cannot read the NVIDIA driver version (nvidia-smi: {e}); is the driver installed on this node?", file=sys.stderr)
        return 1
    problem = check(driver, cuda, build)
    if problem:
        print(f"check-driver: {problem}", file=sys.stderr)
        return 1
    print(f"check-driver: NVIDIA driver {driver} runs the image's CUDA {cuda} build ({build})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
