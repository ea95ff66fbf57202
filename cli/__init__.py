"""`rerank-fleet`: the project's one command line.

  up                 run the serving app on a local embedded Ray cluster (the main job)
  score              rerank documents for a query and print a ranked table
  bench engine       engine throughput / latency / memory per precision and batch size
  bench serving      Serve path vs direct engine, batching gain, cache hit vs miss
  bench backends     vLLM backend vs transformers engine, alone and through Serve
  bench reliability  overload, a killed replica, slow clients and drain against a local app
  bench fan-out      one 1000-document request on 1 replica vs fanned out over 2: latency ratio
  bench score-cache  the score cache on vs off on Zipf-distributed queries and documents, through the fleet
  bench cascade      a cascade (nf4, then fp32 on its top 10) vs fp32 alone on the evaluation set, through the fleet
  eval               ranking fidelity of a precision against a reference precision; records the canary reference
  quantize           make an AWQ W4A16 (or FP8) checkpoint with llm-compressor, with its canary reference
  build-tiny         build and train the offline tiny model (cached), with its canary reference
  weights            fill the weights volume, mark a checkpoint complete, wait for what an arm reads
  check-driver       this node's NVIDIA driver against the image's CUDA build (before Ray starts)
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


def _add_layout_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layout", default="shared", choices=["shared", "split"],
                   help="shared: every process on every core (the main job's); split: production's layout on this machine, the HTTP "
                   "path (head node: HAProxy, ingress, ledger, controller, and the load generator) on the first CPU and the arm "
                   "replicas (a second Ray node) on the others (serve/local.py)")  # fmt: skip


def _engine_config(args):
    from engine.config import EngineConfig

    return EngineConfig(min_pixels=args.min_pixels, max_pixels=args.max_pixels)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp")


def _item_argument(value: str, field: str):
    """A query or document argument as the API takes an item: a JSON object is the API's item
    itself (`{"text", "image", "video"}` or `{"content": [parts]}`, media as URLs, data URIs or
    base64); a URL is that image, a path ending in an image suffix that image file (a missing
    file is an error, never text); anything else is text."""
    import base64
    import json

    from engine.errors import InputError

    if value.lstrip().startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise InputError(field, f"not valid JSON ({e.msg})") from None
    lower = value.lower()
    if lower.startswith(("http://", "https://")):
        return {"image": value}
    if lower.endswith(IMAGE_SUFFIXES):
        path = Path(value)
        if not path.is_file():
            raise InputError(field, f"no such image file: {value}")
        return {"image": base64.b64encode(path.read_bytes()).decode()}
    return value


def _score_request(args):
    """The engine's request for `score`'s arguments: parsed by the API's own item parser and
    resolved by its fetcher (URLs fetched safely, within the service's limits). Problems raise
    `InputError` naming the argument as the API names the field (one line from `main`)."""
    import asyncio

    from pydantic import ValidationError

    from serve.config import LimitsConfig
    from serve.errors import input_error
    from serve.fetch import MediaFetcher
    from serve.protocol_vllm import VllmRerankRequest

    body = {"query": _item_argument(args.query, "query"), "documents": [_item_argument(d, f"documents.{i}") for i, d in enumerate(args.documents)]}
    if args.instruction is not None:
        body["instruction"] = args.instruction
    try:
        req = VllmRerankRequest.model_validate(body).to_internal()
    except ValidationError as e:
        raise input_error(e) from None

    async def resolve():
        fetcher = MediaFetcher(LimitsConfig())
        try:
            return await fetcher.resolve_request(req)
        finally:
            await fetcher.aclose()

    return asyncio.run(resolve())


def cmd_score(args) -> int:
    from engine.engine import RerankEngine
    from workshop.tiny import resolve_source

    request = _score_request(args)  # bad arguments fail before the model loads
    engine = RerankEngine.load(resolve_source(args.model), args.precision, config=_engine_config(args), device=args.device)
    scores = engine.score_requests([request])[0].scores
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    print(f"model={engine.model_id} precision={engine.precision} device={engine.device}")
    print(f"{'rank':>4}  {'score':>8}  {'index':>5}  document")
    for rank, i in enumerate(order, 1):
        print(f"{rank:>4}  {scores[i]:8.4f}  {i:>5}  {args.documents[i][:80]}")
    return 0


def cmd_bench_engine(args) -> int:
    from placement.predict import datasheet_tflops
    from bench.engine import run_engine_bench

    sharing = {"both": [False, True], "on": [True], "off": [False]}[args.share_prefix]
    run_engine_bench(
        model=args.model,
        precisions=args.precisions.split(","),
        batch_sizes=[int(b) for b in args.batch_sizes.split(",") if b],
        cases=[c for c in args.cases.split(",") if c],
        sharing=sharing,
        device=args.device,
        repeats=args.repeats,
        out=args.out,
        random_config=args.random_config,
        peak_tflops=datasheet_tflops,
    )
    return 0


def cmd_bench_serving(args) -> int:
    from bench.serving import run_serving_bench

    run_serving_bench(out=args.out, serve_mode=args.serve_mode, in_flight=args.in_flight, compare_requests=args.compare_requests, layout=args.layout,
                      keep_cores_awake=args.keep_cores_awake)
    return 0


def cmd_bench_idle_gap(args) -> int:
    from bench.idle_gap import run_idle_gap_bench

    run_idle_gap_bench(out=args.out)
    return 0


def _scenarios(text: str) -> list[str]:
    from bench.reliability import check_scenarios

    try:
        return check_scenarios([s.strip() for s in text.split(",") if s.strip()])
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_bench_reliability(args) -> int:
    from bench.reliability import SCENARIOS, run_reliability_bench

    run_reliability_bench(config=args.config, duration_s=args.duration, out=args.out, scenarios=args.scenarios or SCENARIOS, layout=args.layout)
    return 0


def cmd_bench_score_cache(args) -> int:
    from bench.score_cache import run_score_cache_bench

    run_score_cache_bench(config=args.config, duration_s=args.duration, concurrency=args.concurrency, docs=args.docs, fresh=args.fresh,
                          out=args.out, layout=args.layout)  # fmt: skip
    return 0


def cmd_bench_fan_out(args) -> int:
    from bench.fan_out import run_fan_out_bench

    run_fan_out_bench(model_source=args.model, documents=args.documents, words=args.words, repeats=args.repeats, out=args.out)
    return 0


def cmd_bench_cascade(args) -> int:
    from bench.cascade import run_cascade_bench

    run_cascade_bench(model_source=args.model, queries=args.queries, documents=args.documents, k=args.k, repeats=args.repeats, out=args.out)
    return 0


def cmd_bench_backends(args) -> int:
    from bench.backends import run_backend_bench

    run_backend_bench(model_source=args.model, repeats=args.repeats, requests=args.requests, concurrency=args.concurrency, out=args.out)
    return 0


def cmd_eval(args) -> int:
    from workshop.evaluate import run_eval

    vllm = dict(spec.split("=", 1) if "=" in spec else (spec, "") for spec in args.vllm.split(",") if spec)
    precisions = [p for p in args.precisions.split(",") if p]
    run_eval(model=args.model, precisions=precisions, reference=args.reference, device=args.device, out=args.out, vllm=vllm)
    return 0


def cmd_quantize(args) -> int:
    from workshop.quantize import quantize

    out = quantize(args.model, args.out, scheme=args.scheme, num_samples=args.samples)
    print(f"wrote {out}")
    return 0


def cmd_weights(args) -> int:
    from workshop import weights_volume

    into = Path(args.into)
    if args.weights == "fill":
        checkpoint = weights_volume.fill(args.source, into)
        print(f"filled {into} with {checkpoint}")
        return 0
    if args.weights == "mark":
        for done in args.done:
            print(f"marked {weights_volume.mark(into, done)}")
        return 0
    missing = weights_volume.wait(into, args.need, timeout_s=args.timeout, staged=args.staged, log=lambda line: print(line, flush=True))
    if missing:
        print(f"error: after {args.timeout:g} s, {into} still lacks {', '.join(missing)}: did the weights Jobs run? "
              "(kubectl get jobs; docs/DEPLOY.md, step 3)", file=sys.stderr)  # fmt: skip
        return 1
    print(f"{into} holds {', '.join(args.need)}")
    return 0


def cmd_check_driver(args) -> int:
    from cli.driver_check import run

    return run(args)


def cmd_build_tiny(args) -> int:
    from workshop.canary import ensure_reference
    from workshop.tiny import ensure_tiny_model

    path = ensure_tiny_model()
    print(path)
    print((path / "training_report.json").read_text())
    print(f"canary reference: {ensure_reference(path, recorded_by='rerank-fleet build-tiny')}")
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
    p.add_argument("query", help="text, an image path or URL, or an item as the API takes it (JSON)")
    p.add_argument("documents", nargs="+", help="texts, image paths or image URLs, or an item as the API takes it (JSON: "
                   '{"text", "image", "video"} or {"content": [parts]})')
    p.set_defaults(func=cmd_score)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    p = bench.add_parser("engine", help="engine throughput, latency and peak memory")
    _add_model_args(p)
    p.add_argument("--precisions", default="fp32,bf16,int8,nf4")
    p.add_argument("--cases", default="short100,batch32x8,long100,imgquery,imgdocs", help="named cases (bench/engine.py CASES)")
    p.add_argument("--batch-sizes", default="1,8,32", help="also: one query x N documents, half images (docsN cases)")
    p.add_argument("--share-prefix", default="both", choices=["both", "on", "off"], help="shared-prefix scoring on, off or both")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--random-config", default=None, help="config.json of a real architecture: random weights, no download")
    p.add_argument("--out", default="out/bench-engine.json")
    p.set_defaults(func=cmd_bench_engine)
    p = bench.add_parser("serving", help="Serve overhead, batching gain, cache hit vs miss")
    p.add_argument("--out", default="out/bench-serving.json")
    p.add_argument("--serve-mode", default=None, choices=["default", "throughput", "haproxy", "both"],
                   help="Ray Serve's request path for the fleet and the echo app alike (serve/request_path.py; default: the main job's)")
    p.add_argument("--in-flight", type=int, default=16, help="requests in flight for the fleet-vs-echo CPU and p50 figures")
    p.add_argument("--compare-requests", type=int, default=96, help="requests per app at --in-flight")
    p.add_argument("--keep-cores-awake", action="store_true",
                   help="a SCHED_IDLE busy loop per core for the run, so a VM that gives idle vCPUs away measures as dedicated cores would (bench/awake_cores.py)")
    _add_layout_arg(p)
    p.set_defaults(func=cmd_bench_serving)
    p = bench.add_parser("idle-gap", help="the engine's latency after a pause before each request, with and without the CPU kept awake")
    p.add_argument("--out", default="out/bench-idle-gap.json")
    p.set_defaults(func=cmd_bench_idle_gap)
    p = bench.add_parser("backends", help="vLLM backend vs transformers engine, alone and through Serve (vLLM environment)")
    p.add_argument("--model", default="tiny")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=24, help="HTTP requests per arm and kind")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", default="out/bench-backends.json")
    p.set_defaults(func=cmd_bench_backends)
    p = bench.add_parser("fan-out", help="one large request on 1 replica vs fanned out over 2 (a CPU each): latency ratio")
    p.add_argument("--model", default="tiny", help="'tiny' (offline model), a local folder or a hub id")
    p.add_argument("--documents", type=int, default=1000, help="documents of the request")
    p.add_argument("--words", type=int, default=12, help="words per document")
    p.add_argument("--repeats", type=int, default=7, help="requests per arm (interleaved)")
    p.add_argument("--out", default="out/bench-fan-out.json")
    p.set_defaults(func=cmd_bench_fan_out)
    p = bench.add_parser("cascade", help="a cascade (nf4 first, fp32 on its top k) vs fp32 alone on the offline model's evaluation set")
    p.add_argument("--model", default="tiny", help="'tiny' (the offline model: its labelled evaluation set)")
    p.add_argument("--queries", type=int, default=24, help="tasks of the evaluation set")
    p.add_argument("--documents", type=int, default=20, help="documents per task (the evaluation set's 20 by default)")
    p.add_argument("--k", type=int, default=10, help="documents of nf4's order fp32 rescores")
    p.add_argument("--repeats", type=int, default=3, help="requests per side and task (interleaved)")
    p.add_argument("--out", default="out/bench-cascade.json")
    p.set_defaults(func=cmd_bench_cascade)
    p = bench.add_parser("reliability", help="overload, replica kill, slow clients, drain: a table of outcomes (loopback only)")
    p.add_argument("--config", default=None, help="fleet config (default: configs/local.yaml)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per load scenario")
    p.add_argument("--scenarios", default=None, type=_scenarios, help="comma-separated subset of overload,bursts,replica-kill,slow-clients,redis-kill,drain "
                   "(default: all; the capacity run always comes first: the others' rates follow it)")
    p.add_argument("--out", default="out/bench-reliability.json")
    _add_layout_arg(p)
    p.set_defaults(func=cmd_bench_reliability)
    p = bench.add_parser("score-cache", help="score cache on vs off: Zipf queries and documents through the fleet (loopback only)")
    p.add_argument("--config", default=None, help="fleet config (default: configs/local.yaml)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per run (cache off, then on)")
    p.add_argument("--concurrency", type=int, default=8, help="clients sending back to back")
    p.add_argument("--docs", type=int, default=16, help="documents per request")
    p.add_argument("--fresh", type=float, default=0.02, help="chance that a slot of a query's candidate list holds a fresh document (index churn)")
    p.add_argument("--out", default="out/bench-score-cache.json")
    _add_layout_arg(p)
    p.set_defaults(func=cmd_bench_score_cache)

    p = sub.add_parser("eval", help="ranking fidelity against a reference precision")
    _add_model_args(p)
    p.add_argument("--precisions", default="bf16,int8,nf4")
    p.add_argument("--reference", default="fp32")
    p.add_argument("--vllm", default="", help="rows scored by the vLLM backend, PRECISION[=CHECKPOINT],... (vLLM environment), e.g. w8a8=out/w8a8")
    p.add_argument("--out", default="out/eval.json")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="AWQ W4A16 / FP8 checkpoint with llm-compressor")
    p.add_argument("--model", default="tiny")
    p.add_argument("--scheme", default="awq", choices=["awq", "w8a8", "fp8"], help="awq: W4A16; w8a8: int8 weights and activations (vLLM backend); fp8")
    p.add_argument("--samples", type=int, default=64, help="calibration rerank pairs")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("build-tiny", help="build and train the offline tiny model, with its canary reference")
    p.set_defaults(func=cmd_build_tiny)

    weights = sub.add_parser("weights", help="the weights volume: fill, mark complete, wait (Jobs and init steps run these)")
    weights_sub = weights.add_subparsers(dest="weights", required=True)
    p = weights_sub.add_parser("fill", help="download a hub model into INTO/hf, or copy a folder into INTO; then mark it")
    p.add_argument("--from", dest="source", required=True, help="a hub id (Qwen/Qwen3-VL-Reranker-8B) or a local folder")
    p.add_argument("--into", required=True, help="the mount path of the weights volume")
    p.set_defaults(func=cmd_weights)
    p = weights_sub.add_parser("mark", help="record checkpoints as complete in the volume (after a quantize or an object-store sync)")
    p.add_argument("--into", required=True)
    p.add_argument("--done", action="append", required=True, help="a checkpoint as an arm names it (hub id or path); repeatable")
    p.set_defaults(func=cmd_weights)
    p = weights_sub.add_parser("wait", help="wait until every needed checkpoint is marked complete (a GPU pod's init step)")
    p.add_argument("--into", required=True)
    p.add_argument("--need", action="append", required=True, help="a checkpoint an arm reads; repeatable")
    p.add_argument("--timeout", type=float, default=4 * 3600, help="seconds, then fail naming what is missing")
    p.add_argument("--staged", action="store_true", help="a volume staged by hand: a checkpoint on disk counts without a marker")
    p.set_defaults(func=cmd_weights)

    from cli.driver_check import add_arguments as driver_arguments

    p = sub.add_parser("check-driver", help="this node's NVIDIA driver against the image's CUDA build (before Ray starts on it)")
    driver_arguments(p)
    p.set_defaults(func=cmd_check_driver)

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
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        from engine.errors import RerankError

        if isinstance(e, RerankError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
