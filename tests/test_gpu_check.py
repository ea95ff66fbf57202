"""The GPU check (`scripts/gpu-check.sh`) as CI can run it: on CPU with shrunk architectures, with
every import the GPU machine cannot satisfy blocked, so the command that gets one run on a lent
GPU is known to start there. Its files must hold measured figures beside the planner's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from placement.hardware import GPU_CATALOGUE
from placement.profiles import find_measured, read_bench_reports
from placement.throughput import PairShape

REPO = Path(__file__).resolve().parents[1]
# What the GPU machine lacks (docs/BENCHMARKS.md, "GPU check"): bitsandbytes travels as a wheel
# when it can, so the check must also run without it. pydantic travels as wheels too, always
# (`--fetch-wheels`): the engine's settings are pydantic models.
ABSENT_ON_THE_GPU_MACHINE = ("ray", "vllm", "bitsandbytes", "llm_compressor", "fastapi", "redis", "locust")

BLOCKER = textwrap.dedent(
    """
    import importlib.abc, sys

    BLOCKED = set({blocked!r})

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"absent on the GPU machine: {{name}}")
            return None

    sys.meta_path.insert(0, Block())
    """
)


@pytest.fixture(scope="module")
def guarded_env(tmp_path_factory) -> dict:
    """An environment whose Python cannot import what the GPU machine lacks (a sitecustomize)."""
    site = tmp_path_factory.mktemp("gpu-machine-site")
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=ABSENT_ON_THE_GPU_MACHINE))
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHON": sys.executable}
    return env


def test_the_guard_blocks(guarded_env):
    out = subprocess.run([sys.executable, "-c", "import fastapi"], env=guarded_env, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "absent on the GPU machine: fastapi" in out.stderr


@pytest.fixture(scope="module")
def smoke(guarded_env, tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu-check")
    work = tmp_path_factory.mktemp("gpu-check-work")
    run = subprocess.run(
        ["bash", "scripts/gpu-check.sh", "--cpu-smoke", str(out), "--work", str(work), "--repeats", "1"],
        cwd=REPO, env=guarded_env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads((out / "gpu-check.json").read_text()), (out / "gpu-check.md").read_text()


def test_cpu_smoke_measures_each_architecture_beside_the_planner(smoke):
    report, markdown = smoke
    assert report["cpu_smoke"] and report["device"] == "cpu" and report["bitsandbytes"] is None
    assert [r["model"] for r in report["reports"]] == ["Qwen/Qwen3-VL-Reranker-8B", "Qwen/Qwen3-VL-Reranker-2B"]
    for rep in report["reports"]:
        measured = [r for r in rep["rows"] if "pairs_per_s" in r]
        # bf16 and fp16 run on CPU: 3 cases x requests 1 and 2 each.
        assert {(r["precision"], r["case"], r["requests"]) for r in measured} == {
            (p, c, n) for p in ("bf16", "fp16") for c in ("short", "long", "imgdocs") for n in (1, 2)
        }
        for r in measured:
            assert r["pairs"] == r["requests"] * (4 if r["case"] == "imgdocs" else 8)
            assert r["forward_pairs_per_s"] > 0 and r["p50_ms"] > 0 and r["decoder_tokens"] > 0
            assert r["predicted_weights_gib"] > 0 and r["predicted_activation_gib"] > 0
            assert r["predicted_pairs_per_s"] is None and "no throughput model" in r["predicted_note"]  # no roofline for a CPU
        long = [r for r in measured if r["case"] == "long"]
        assert all(r["decoder_tokens"] < r["pair_tokens"] for r in long)  # the ~400-token query ran once per request
        assert all(r["image_tokens"] > 0 for r in measured if r["case"] == "imgdocs")
        skipped = {r["precision"]: r["skipped"] for r in rep["rows"] if "skipped" in r}
        assert "bitsandbytes" in skipped["int8"] and "bitsandbytes" in skipped["nf4"] and "fp8" in skipped["fp8"]
        assert not [r for r in rep["rows"] if "error" in r]
        # The weights held, tensor by tensor, are what the planner's memory model says, exactly.
        for w in rep["weights"]:
            assert w["held_vs_predicted"] == pytest.approx(1.0, abs=1e-9), w
        assert {v["precision"] for v in rep["vision"]} == {"bf16", "fp16"}
        assert all(v["ms_per_image"] > 0 and v["image_tokens"] == 1024 for v in rep["vision"])
    assert "| bf16 | long | 2 |" in markdown and "held / planner" in markdown and "skipped: precision: int8 needs" in markdown


def test_the_planner_reads_the_file(smoke):
    report, _ = smoke
    reports = read_bench_reports(report)
    assert len(reports) == 2 and all(r.rows for r in reports)
    # Measured on a CPU, it never stands in for a GPU; the same file from an H200 does.
    h200 = GPU_CATALOGUE["H200"]
    shape = PairShape(text_pair_tokens=300, image_pair_tokens=500, image_tokens=256, image_share=0.0)
    ids = {"Qwen/Qwen3-VL-Reranker-8B"}
    assert find_measured(reports, h200, "bf16", ids, shape) is None
    relabelled = read_bench_reports({**report, "reports": [{**r, "device": "NVIDIA H200"} for r in report["reports"]]})
    entry = find_measured(relabelled, h200, "bf16", ids, shape)
    assert entry is not None and entry.source == "measured" and "device step alone" in entry.detail
