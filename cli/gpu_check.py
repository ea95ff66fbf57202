"""`bash scripts/gpu-check.sh OUT_DIR`: the real Qwen3-VL-Reranker-8B and -2B architectures, at
full depth with random weights built on the machine itself (no weights travel), measured per
precision the transformers backend runs there, each figure beside the planner's prediction.

Written for a GPU lent for minutes: one command, ending inside `--budget-s` (what is left when the
time is spent is listed as skipped, never silently dropped), its files rewritten after every row
so a run cut short still leaves its figures. It imports only what that machine has (torch,
transformers, PIL, numpy, safetensors, psutil; bitsandbytes if its wheel travelled): no Ray,
vLLM, llm-compressor or pydantic (`tests/test_gpu_check.py` runs it with those blocked).

Per architecture and precision: load time, the weights held (allocator, and by component beside
the planner's memory model); for a short-text case, a ~400-token shared query and image
documents at 1, 8 and 32 requests per engine call: pairs/s of serial calls and of the device
step alone, p50, decoder tokens, decoder MFU (2 x projection weights per token) against the
bf16 matmul rate measured here and the datasheet peak, the activation peak; the vision tower's
time on a 1024-token image. `predicted_*` keys are the planner's (`placement.predict`).

`--cpu-smoke`: the same run on CPU with shrunk architectures (2 layers, narrow), for CI.
`--weights-only`: load and account the weights, no timing (the CPU memory-model table).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Target:
    """An architecture the check measures, and the model id the planner knows it by."""

    key: str
    config: Path
    model_id: str


TARGETS = {
    "8b": Target("8b", REPO / "configs/models/qwen3-vl-8b.json", "Qwen/Qwen3-VL-Reranker-8B"),
    "2b": Target("2b", REPO / "configs/models/qwen3-vl-2b.json", "Qwen/Qwen3-VL-Reranker-2B"),
}
# Real head width (the M-RoPE sections need 128) and layer kinds, two layers of each tower, narrow.
SMOKE_OVERRIDES = {
    "text_config": {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "head_dim": 128, "vocab_size": 1024},
    "vision_config": {"depth": 2, "hidden_size": 128, "intermediate_size": 256, "num_heads": 2, "out_hidden_size": 256,
                      "deepstack_visual_indexes": [0, 1]},
}  # fmt: skip
DOCS_PER_REQUEST = {"short": 8, "long": 8, "imgdocs": 4}
IMAGE_DOC_SIDE = 448  # 196 visual tokens per image document
MATMUL_SIDE = 8192


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/gpu-check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="folder for gpu-check.json and gpu-check.md")
    p.add_argument("--cpu-smoke", action="store_true", help="CPU, shrunk architectures: the command's own test")
    p.add_argument("--weights-only", action="store_true", help="load each precision and account its weights; no timing")
    p.add_argument("--archs", default="8b,2b", help="comma-separated: 8b, 2b")
    p.add_argument("--precisions", default="bf16,nf4,int8,fp16,fp8", help="in the order measured (interleaved across architectures)")
    p.add_argument("--requests", default=None, help="requests per engine call (default 1,8,32; --cpu-smoke: 1,2)")
    p.add_argument("--image-side", type=int, default=None, help=f"pixels of a square image document (default {IMAGE_DOC_SIDE}; --cpu-smoke: 96)")
    p.add_argument("--repeats", type=int, default=2, help="timed device steps per row (after one warm-up)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting new rows after this many seconds")
    p.add_argument("--profile", default=None, metavar="CASE:REQUESTS",
                   help="instead of the measurements: torch.profiler tables of one call (e.g. short:8) and of the vision tower, per architecture and precision")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "rerank-fleet-gpu-check", help="where checkpoints are built")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = GpuCheck(args).run()
    failed = [r for rep in report["reports"] for r in rep["rows"] if "error" in r]
    return 1 if failed else 0


class GpuCheck:
    def __init__(self, args: argparse.Namespace):
        import torch

        self.args = args
        self.torch = torch
        self.t0 = time.monotonic()
        self.device = "cpu" if args.cpu_smoke or not torch.cuda.is_available() else "cuda"
        self.targets = [TARGETS[a] for a in args.archs.split(",") if a]
        self.precisions = [p for p in args.precisions.split(",") if p]
        self.requests = [int(r) for r in (args.requests or ("1,2" if args.cpu_smoke else "1,8,32")).split(",") if r]
        self.image_side = args.image_side or (96 if args.cpu_smoke else IMAGE_DOC_SIDE)
        self.report: dict = {}

    # ---- the run ------------------------------------------------------------------------------

    def run(self) -> dict:
        import torch
        import transformers

        from engine.engine import device_name

        dev = torch.device(self.device)
        self.device_name = device_name(dev) if dev.type == "cuda" else "cpu"
        self.report = {
            "tool": "gpu-check", "device": self.device_name, "date": time.strftime("%Y-%m-%d %H:%M"),
            "cpu_smoke": self.args.cpu_smoke, "weights": "random (real shapes)", "torch": torch.__version__,
            "transformers": transformers.__version__, "bitsandbytes": _version("bitsandbytes"),
            "torch_threads": torch.get_num_threads(), "budget_s": self.args.budget_s, "reports": [],
        }  # fmt: skip
        if self.device == "cuda" and not self.args.weights_only:
            self.report["measured_bf16_tflops"] = self.matmul_tflops()
            log(f"bf16 matmul {MATMUL_SIDE}^3: {self.report['measured_bf16_tflops']:.0f} TFLOP/s")
        folders = {}
        for target in self.targets:
            t = time.monotonic()
            folders[target.key] = self.build(target)
            log(f"{target.key}: random checkpoint ready in {time.monotonic() - t:.0f} s ({folders[target.key]})")
            self.report["reports"].append({"model": target.model_id, "architecture": str(target.config.relative_to(REPO)),
                                           "device": self.device_name, "rows": [], "vision": [], "weights": []})  # fmt: skip
        for precision in self.precisions:
            for target, rep in zip(self.targets, self.report["reports"]):
                self.measure_precision(target, folders[target.key], precision, rep)
        self.write()
        log(f"done in {time.monotonic() - self.t0:.0f} s: {self.args.out / 'gpu-check.json'}")
        return self.report

    def build(self, target: Target) -> Path:
        from workshop.random_model import build_random_model

        suffix = "-smoke" if self.args.cpu_smoke else ""
        return build_random_model(target.config, self.args.work / f"{target.key}{suffix}", device=self.device,
                                  overrides=SMOKE_OVERRIDES if self.args.cpu_smoke else None)  # fmt: skip

    def over_budget(self) -> bool:
        return time.monotonic() - self.t0 > self.args.budget_s

    def config_of(self, folder: Path) -> dict:
        return json.loads((folder / "config.json").read_text())

    def measure_precision(self, target: Target, folder: Path, precision: str, rep: dict) -> None:
        from engine.config import EngineConfig
        from engine.engine import RerankEngine
        from engine.errors import PrecisionUnsupported
        from placement.predict import predict_weights
        from workshop.weight_bytes import held_weight_bytes

        torch = self.torch
        if self.over_budget():
            rep["rows"].append({"precision": precision, "skipped": f"time budget of {self.args.budget_s:g} s spent before it started"})
            return self.write()
        gc.collect()
        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated() if cuda else _rss()
        t = time.monotonic()
        try:
            engine = RerankEngine.load(str(folder), precision, config=EngineConfig(), device=self.device, model_id=target.model_id)
        except PrecisionUnsupported as e:
            rep["rows"].append({"precision": precision, "skipped": str(e)})
            log(f"{target.key} {precision}: skipped: {e}")
            return self.write()
        except Exception as e:  # a load failure is a finding: recorded, and the run goes on
            traceback.print_exc()
            rep["rows"].append({"precision": precision, "error": f"load: {type(e).__name__}: {e}"})
            return self.write()
        load_s = time.monotonic() - t
        allocated = (torch.cuda.memory_allocated() if cuda else _rss()) - before
        config = self.config_of(folder)
        held = {k: v / 2**30 for k, v in held_weight_bytes(engine.model).items()}
        predicted = predict_weights(config, precision, on_cpu=not cuda)
        held_total = sum(held[k] for k in predicted if k != "total")
        rep["weights"].append({
            "precision": precision, "load_s": load_s, "allocated_gib": allocated / 2**30, "held_gib": held,
            "held_total_gib": held_total, "predicted_gib": predicted, "held_vs_predicted": held_total / predicted["total"],
        })  # fmt: skip
        log(f"{target.key} {precision}: loaded in {load_s:.1f} s, {held_total:.2f} GiB held, planner {predicted['total']:.2f} GiB")
        self.write()
        if self.args.profile:
            self.profile(engine, f"{target.key}-{precision}")
        elif not self.args.weights_only:
            self.measure_cases(engine, config, precision, rep, weights_gib=allocated / 2**30)
        del engine
        gc.collect()

    def measure_cases(self, engine, config: dict, precision: str, rep: dict, *, weights_gib: float) -> None:
        from placement.predict import MeasuredCall, predict_call, predict_vision_ms
        from bench.engine import case_requests, measure_case, time_vision

        for name in DOCS_PER_REQUEST:
            for n in self.requests:
                row = {"precision": precision, "case": name, "requests": n}
                if self.over_budget():
                    rep["rows"].append({**row, "skipped": f"time budget of {self.args.budget_s:g} s spent"})
                    continue
                case = self.case(name, n)
                try:
                    m = measure_case(engine, case_requests(case), self.args.repeats)
                except Exception as e:
                    traceback.print_exc()
                    rep["rows"].append({**row, "error": f"{type(e).__name__}: {e}"})
                    self.write()
                    continue
                image_docs = m["pairs"] * case.image_share
                call = MeasuredCall(pairs=m["pairs"], pair_tokens=m["pair_tokens"], decoder_tokens=m["decoder_tokens"], image_share=case.image_share,
                                    image_tokens=m["visual_tokens"] / image_docs if image_docs else 0.0, max_batch_tokens=engine.cfg.max_batch_tokens)  # fmt: skip
                row.update(m, batch_size=m["pairs"], mean_pair_tokens=call.mean_pair_tokens, image_share=case.image_share, image_tokens=call.image_tokens,
                           weights_gib=weights_gib, **self.mfu(engine, precision, m), **predict_call(config, precision, self.device_name, call))  # fmt: skip
                if row.get("predicted_pairs_per_s"):
                    row["forward_vs_predicted"] = row["forward_pairs_per_s"] / row["predicted_pairs_per_s"]
                row["activation_vs_predicted"] = row["activation_peak_gib"] / row["predicted_activation_gib"] if row["predicted_activation_gib"] else None
                rep["rows"].append(row)
                log(f"{rep['model']} {precision} {name} x{n}: {m['forward_pairs_per_s']:.1f} pairs/s (device), p50 {m['p50_ms']:.1f} ms"
                    + (f", predicted {row['predicted_pairs_per_s']:.1f}" if row.get("predicted_pairs_per_s") else ""))  # fmt: skip
                self.write()
        if not self.over_budget():
            try:
                vision = time_vision(engine, self.args.repeats)
                vision["predicted_ms_per_image"] = predict_vision_ms(config, self.device_name, vision["image_tokens"])
                rep["vision"].append({"precision": precision, **vision})
            except Exception as e:
                traceback.print_exc()
                rep["rows"].append({"precision": precision, "case": "vision", "error": f"{type(e).__name__}: {e}"})
            self.write()

    def profile(self, engine, name: str) -> None:
        """Where one call's time goes: operators by CPU and by device time, kernel launches, and the
        device's busy share of the wall time (launch-bound code leaves the GPU idle)."""
        from torch.profiler import ProfilerActivity, profile

        from bench.engine import case_requests, sync, time_vision

        case_name, n = self.args.profile.split(":")
        prepared = [engine.prepare(r) for r in case_requests(self.case(case_name, int(n)))]
        engine.forward(prepared)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        sections = []
        for what, call in (("forward", lambda: engine.forward(prepared)), ("vision tower", lambda: time_vision(engine, 1))):
            call()
            sync(engine)
            t = time.perf_counter()
            with profile(activities=activities) as prof:
                call()
                sync(engine)
            wall = time.perf_counter() - t
            events = prof.key_averages()
            device_us = sum(e.self_device_time_total for e in events) if self.device == "cuda" else 0
            launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
            sections.append(f"## {what}: {self.args.profile}, wall {1000 * wall:.1f} ms (profiled), device busy {device_us / 1e3:.1f} ms, "
                            f"{launches} kernel launches\n\nby self CPU time:\n{events.table(sort_by='self_cpu_time_total', row_limit=25)}\n"
                            + (f"by device time:\n{events.table(sort_by='self_device_time_total', row_limit=15)}\n" if self.device == "cuda" else ""))  # fmt: skip
            log(f"{name} {what}: wall {1000 * wall:.1f} ms, device busy {device_us / 1e3:.1f} ms, {launches} launches")
        self.args.out.mkdir(parents=True, exist_ok=True)
        (self.args.out / f"profile-{name}.txt").write_text("\n".join(sections))

    def case(self, name: str, requests: int):
        """`requests` requests of the named workload: short texts, a ~400-token query, or image documents."""
        from bench.engine import Case

        return Case(name, requests, DOCS_PER_REQUEST[name], "long" if name == "long" else "short",
                    1.0 if name == "imgdocs" else 0.0, image_side=self.image_side)  # fmt: skip

    def mfu(self, engine, precision: str, m: dict) -> dict:
        """Decoder TFLOP/s (2 x projection weights per token, as `bench engine` counts them) against the measured and datasheet peaks."""
        from placement.predict import datasheet_tflops
        from workshop.weight_bytes import decoder_matmul_parameters

        tflops = 2 * decoder_matmul_parameters(engine.model) * m["decoder_tokens"] / (m["forward_ms"] / 1000) / 1e12
        out = {"decoder_tflops": tflops}
        measured = self.report.get("measured_bf16_tflops")
        if measured:
            out["mfu_vs_measured_bf16"] = tflops / measured
        sheet = datasheet_tflops(self.device_name, precision)
        if sheet:
            out["mfu_vs_datasheet"] = tflops / sheet
        return out

    def matmul_tflops(self) -> float:
        """The bf16 matmul rate this GPU reaches on random data: the physical limit MFU is read against."""
        torch = self.torch
        a = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(MATMUL_SIDE, MATMUL_SIDE, device="cuda", dtype=torch.bfloat16)
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1000 / 20
        del a, b
        return 2 * MATMUL_SIDE**3 / seconds / 1e12

    # ---- output -------------------------------------------------------------------------------

    def write(self) -> None:
        out = self.args.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu-check.json").write_text(json.dumps(self.report, indent=2))
        (out / "gpu-check.md").write_text(format_markdown(self.report))


def format_markdown(report: dict) -> str:
    lines = [
        f"# GPU check: {report['device']}, {report['date']}",
        "",
        f"torch {report['torch']}, transformers {report['transformers']}, bitsandbytes {report['bitsandbytes'] or 'absent'}; "
        f"weights {report['weights']}" + (", **shrunk architectures (CPU smoke)**" if report["cpu_smoke"] else "")
        + (f"; bf16 matmul measured at {report['measured_bf16_tflops']:.0f} TFLOP/s" if report.get("measured_bf16_tflops") else ""),
    ]  # fmt: skip
    for rep in report["reports"]:
        lines += ["", f"## {rep['model']} ({rep['architecture']})", "",
                  "| precision | load s | held GiB | planner GiB | held / planner | allocator GiB |", "|---|--:|--:|--:|--:|--:|"]  # fmt: skip
        for w in rep["weights"]:
            lines.append(f"| {w['precision']} | {w['load_s']:.1f} | {w['held_total_gib']:.3f} | {w['predicted_gib']['total']:.3f} | "
                         f"{w['held_vs_predicted']:.3f} | {w['allocated_gib']:.3f} |")  # fmt: skip
        lines += ["", "| precision | case | requests | pairs | pairs/s | device pairs/s | planner pairs/s | device / planner | p50 ms | "
                  "prepare ms | decoder tokens | MFU (measured bf16) | activation GiB | planner GiB |",
                  "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
        for r in rep["rows"]:
            if "pairs_per_s" not in r:
                what = f"skipped: {r['skipped']}" if "skipped" in r else f"**error**: {r['error']}"
                lines.append(f"| {r['precision']} | {r.get('case', '')} | {r.get('requests', '')} | {what} |||||||||||")
                continue
            lines.append(
                f"| {r['precision']} | {r['case']} | {r['requests']} | {r['pairs']} | {r['pairs_per_s']:.1f} | {r['forward_pairs_per_s']:.1f} | "
                f"{_num(r.get('predicted_pairs_per_s'))} | {_num(r.get('forward_vs_predicted'), '.2f')} | {r['p50_ms']:.1f} | {r['prepare_ms']:.1f} | "
                f"{r['decoder_tokens']} | {_pct(r.get('mfu_vs_measured_bf16'))} | {r['activation_peak_gib']:.3f} | {r['predicted_activation_gib']:.3f} |"
            )
        for v in rep["vision"]:
            predicted = f" (planner's roofline {v['predicted_ms_per_image']:.1f} ms)" if v.get("predicted_ms_per_image") else ""
            lines.append(f"\nvision tower ({v['precision']}): {v['ms_per_image']:.1f} ms per {v['image_tokens']}-token image{predicted}")
    return "\n".join(lines) + "\n"


def _num(x, fmt: str = ".1f") -> str:
    return format(x, fmt) if isinstance(x, (int, float)) else "n/a"


def _pct(x) -> str:
    return f"{100 * x:.1f} %" if isinstance(x, (int, float)) else "n/a"


def _version(package: str) -> str | None:
    """The version of an importable package (installed but unimportable counts as absent)."""
    import importlib

    try:
        return getattr(importlib.import_module(package), "__version__", "unknown")
    except ImportError:
        return None


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def log(message: str) -> None:
    print(f"[gpu-check] {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
