"""`rerank-fleet`: the project's one command line.

  up                 run the serving app on a local embedded Ray cluster (the main job)
  score              rerank documents for a query and print a ranked table
  bench engine       engine throughput / latency / memory per precision and batch size
  bench serving      Serve path vs direct engine, batching gain, cache hit vs miss
  eval               ranking fidelity of a precision against a reference precision
  quantize           make an AWQ W4A16 (or FP8) checkpoint with llm-compressor
  build-tiny         build and train the offline tiny model (cached)
  plan               placement planner: which precision runs on which GPU
  loadtest           Locust comparison of precision arms against a running endpoint
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="tiny", help="'tiny' (offline model), a local folder or a hub id")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-pixels", type=int, default=None, help="image pixel limit after resize")
    p.add_argument("--min-pixels", type=int, default=None)


def _model_config(args):
    from serve.config import ModelConfig

    extra = {k: v for k, v in (("max_pixels", args.max_pixels), ("min_pixels", args.min_pixels)) if v is not None}
    return ModelConfig(source=args.model, **extra)


def _read_item(value: str):
    """A document/query on the command line: text, or an image path/URL (by extension or scheme)."""
    from serve.engine.inputs import RerankItem

    lower = value.lower()
    if lower.startswith(("http://", "https://")):
        import httpx

        r = httpx.get(value, timeout=20, follow_redirects=True)
        r.raise_for_status()
        return RerankItem(images=(r.content,))
    if lower.endswith((".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")) and Path(value).exists():
        return RerankItem(images=(Path(value).read_bytes(),))
    return RerankItem(text=value)


def cmd_score(args) -> int:
    from serve.engine.engine import RerankEngine

    engine = RerankEngine.load(_model_config(args), args.precision, device=args.device)
    query = _read_item(args.query)
    docs = [_read_item(d) for d in args.documents]
    scores = engine.score(query, docs, instruction=args.instruction)
    order = sorted(range(len(docs)), key=lambda i: -scores[i])
    print(f"model={engine.model_id} precision={engine.precision} device={engine.device}")
    print(f"{'rank':>4}  {'score':>8}  {'index':>5}  document")
    for rank, i in enumerate(order, 1):
        print(f"{rank:>4}  {scores[i]:8.4f}  {i:>5}  {args.documents[i][:80]}")
    return 0


def cmd_bench_engine(args) -> int:
    from serve.engine.bench import run_engine_bench

    run_engine_bench(
        model=args.model,
        precisions=args.precisions.split(","),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
        device=args.device,
        image_share=args.image_share,
        repeats=args.repeats,
        out=args.out,
        random_config=args.random_config,
    )
    return 0


def cmd_bench_serving(args) -> int:
    from serve.bench_serving import run_serving_bench

    run_serving_bench(out=args.out)
    return 0


def cmd_eval(args) -> int:
    from serve.engine.evaluate import run_eval

    run_eval(model=args.model, precisions=args.precisions.split(","), reference=args.reference, device=args.device, out=args.out)
    return 0


def cmd_quantize(args) -> int:
    from serve.engine.quantize import quantize

    out = quantize(args.model, args.out, scheme=args.scheme, num_samples=args.samples)
    print(f"wrote {out}")
    return 0


def cmd_build_tiny(args) -> int:
    from serve.engine.tiny import ensure_tiny_model

    path = ensure_tiny_model()
    print(path)
    print((path / "training_report.json").read_text())
    return 0


def cmd_up(args) -> int:
    from serve.local import run_local

    run_local(args.config, redis_url=args.redis_url, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rerank-fleet", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="serve locally on embedded Ray (main job)")
    p.add_argument("--config", default=None, help="fleet YAML (default: configs/local.yaml)")
    p.add_argument("--redis-url", default=None, help="use a Redis feature cache, e.g. redis://127.0.0.1:6379/0")
    p.add_argument("--port", type=int, default=None)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("score", help="rerank documents for a query")
    _add_model_args(p)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--instruction", default=None)
    p.add_argument("query")
    p.add_argument("documents", nargs="+", help="texts, image paths or image URLs")
    p.set_defaults(func=cmd_score)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("engine", help="engine throughput, latency and peak memory")
    _add_model_args(p)
    p.add_argument("--precisions", default="fp32,bf16,int8,nf4")
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--image-share", type=float, default=0.5, help="share of documents that are images")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--random-config", default=None, help="config.json of a real architecture: random weights, no download")
    p.add_argument("--out", default="out/bench-engine.json")
    p.set_defaults(func=cmd_bench_engine)
    p = bench.add_parser("serving", help="Serve overhead, batching gain, cache hit vs miss")
    p.add_argument("--out", default="out/bench-serving.json")
    p.set_defaults(func=cmd_bench_serving)

    p = sub.add_parser("eval", help="ranking fidelity against a reference precision")
    _add_model_args(p)
    p.add_argument("--precisions", default="bf16,int8,nf4")
    p.add_argument("--reference", default="fp32")
    p.add_argument("--out", default="out/eval.json")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="AWQ W4A16 / FP8 checkpoint with llm-compressor")
    p.add_argument("--model", default="tiny")
    p.add_argument("--scheme", default="awq", choices=["awq", "fp8"])
    p.add_argument("--samples", type=int, default=64, help="calibration rerank pairs")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("build-tiny", help="build and train the offline tiny model")
    p.set_defaults(func=cmd_build_tiny)

    try:
        from placement.cli import add_subparser as add_plan
    except ImportError:
        add_plan = None
    if add_plan is not None:
        add_plan(sub)
    try:
        from loadtest.cli import add_subparser as add_loadtest
    except ImportError:
        add_loadtest = None
    if add_loadtest is not None:
        add_loadtest(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from serve.engine.errors import RerankError

        if isinstance(e, RerankError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
