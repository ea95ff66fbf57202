"""Fixtures of the serving tests: real Redis, a private Redis to kill, a local media server,
and (for `@pytest.mark.ray` tests) one real Ray Serve app per session."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest
from serving_testkit import free_port, png_bytes

SHARED_REDIS = "redis://127.0.0.1:6379"
UNIT_REDIS_DB = 11  # unit tests of the cache (keys under a per-run prefix)
E2E_REDIS_DB = 12  # the end-to-end app's cache (flushed before and after)
VLLM_REDIS_DB = 13  # the vLLM app's cache (flushed before and after)


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def shared_redis_url() -> str:
    if not _redis_answers(SHARED_REDIS):
        pytest.fail("these tests need Redis on 127.0.0.1:6379 (.ci/run starts one)")
    return SHARED_REDIS


@pytest.fixture
def unit_redis(shared_redis_url):
    """(url, key_prefix) on the shared server's db 11; this test's keys are deleted afterwards."""
    import redis

    url = f"{shared_redis_url}/{UNIT_REDIS_DB}"
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    yield url, prefix
    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=prefix + "*"))
    if keys:
        client.delete(*keys)


class PrivateRedis:
    """A redis-server of our own on a free port, so a test can stop it without touching 6379."""

    def __init__(self, workdir: Path):
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is needed for the Redis-outage test")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.pidfile = workdir / f"redis-{self.port}.pid"
        subprocess.run(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "yes", "--pidfile", str(self.pidfile), "--dir", str(workdir)],
            check=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while not _redis_answers(self.url):
            if time.monotonic() > deadline:
                raise RuntimeError("private redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill it (SIGKILL: an outage, not a graceful shutdown) and wait until it is gone."""
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            pid = int(self.pidfile.read_text().strip())
            os.kill(pid, 9)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.05)

    @property
    def running(self) -> bool:
        return _redis_answers(self.url)


@pytest.fixture(scope="module")
def private_redis(tmp_path_factory):
    server = PrivateRedis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


# ----------------------------------------------------------------------------- media server


class MediaServer:
    """Threaded HTTP server on 127.0.0.1 serving images, redirects, slow and oversize bodies."""

    def __init__(self):
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.images: dict[str, bytes] = {"/img.png": png_bytes(), "/other.png": png_bytes((30, 30, 200), seed=5)}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                url = urlparse(self.path)
                q = parse_qs(url.query)
                server.hits[url.path] += 1
                server.hosts.append(self.headers.get("Host", ""))
                if url.path in server.images:
                    body = server.images[url.path]
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif url.path == "/redirect":
                    self.send_response(302)
                    self.send_header("Location", q["to"][0])
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif url.path == "/loop":
                    self.send_response(302)
                    self.send_header("Location", "/loop")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                elif url.path == "/slow":
                    time.sleep(float(q.get("s", ["3"])[0]))
                    self.send_response(200)
                    self.send_header("Content-Length", "1")
                    self.end_headers()
                    self.wfile.write(b"x")
                elif url.path == "/big-chunked":
                    # No Content-Length: the cap must be enforced while streaming.
                    self.send_response(200)
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    chunk = b"\0" * 65536
                    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                        for _ in range(int(q.get("n", ["64"])[0])):
                            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                        self.wfile.write(b"0\r\n\r\n")
                elif url.path == "/big-declared":
                    self.send_response(200)
                    self.send_header("Content-Length", str(50 * 1024 * 1024))
                    self.end_headers()
                else:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # clients that hang up early (byte caps, timeouts) are expected here

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def media_server():
    server = MediaServer()
    yield server
    server.close()


# ------------------------------------------------------------------------------ tiny model


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir) -> Path:
    """The trained tiny model's folder (the top-level `tiny_model_dir` fixture; `engine_for` there
    loads engines from the same folder)."""
    return Path(tiny_model_dir)


# ------------------------------------------------------------------------- Ray Serve apps


@dataclass
class RunningApp:
    base_url: str
    client: httpx.Client
    redis_url: str | None
    model: Path  # the model folder the app serves (its model id)


def _fleet(model_dir: Path, arms: list[dict], redis_url: str | None, **extra) -> dict:
    return {
        "model": {"source": str(model_dir)},
        "arms": arms,
        "cache": {"redis_url": redis_url, "retry_after_s": 0.5, "redis_timeout_s": 0.2},
        "limits": {
            "max_documents": 50, "max_text_chars": 2000, "max_image_pixels": 4_000_000,
            "max_request_bytes": 2 * 1024 * 1024, "fetch_timeout_s": 5, "allowed_hosts": ["localhost"],
        },
        **extra,
    }  # fmt: skip


def _arm(name: str, weight: float, *, max_ongoing: int = 32, max_queued: int = 256) -> dict:
    # A wide queue budget: these apps' tests are about routing, isolation and Serve's count bounds,
    # and a crowd of 40 requests on a loaded CI machine can hold more than the default second of
    # work (the ingress's gate counts every call in flight). The budget has its own tests
    # (test_admission, test_serve_reliability's local_arm_app, test_serve_dashboard).
    return {
        "name": name, "precision": name, "weight": weight, "max_ongoing_requests": max_ongoing, "max_queued_requests": max_queued,
        "queue_budget_s": 30.0, "ray_actor_options": {"num_cpus": 0.5}, "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005},
    }  # fmt: skip


def _delete_keys(url: str, pattern: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=pattern))
    if keys:
        client.delete(*keys)


@pytest.fixture(scope="session")
def ray_serve():
    """One embedded Ray instance serving HTTP on a free loopback port, for the session, on the
    main job's request path (HAProxy and throughput mode: serve/request_path.py), so the tests hold
    the behaviours there. Token auth is off: a test cluster (the main job's test keeps it on)."""
    from serve.request_path import set_local_ray_environment

    saved = dict(os.environ)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    set_local_ray_environment(free_port=free_port)  # before Ray starts: its processes inherit it
    import ray
    from ray import serve

    try:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False, namespace="rerank-tests")
    finally:
        # Ray's processes have it now. Jobs the later tests start (the main job, the benches, in
        # subprocesses) choose their own, and must not inherit this instance's HAProxy ports.
        os.environ.clear()
        os.environ.update(saved)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _deploy(base: str, name: str, prefix: str, fleet: dict, redis_url: str | None) -> RunningApp:
    from ray import serve

    from serve.app import build_app

    serve.run(build_app({"config": fleet}), name=name, route_prefix=prefix)
    return RunningApp(base_url=base + prefix.rstrip("/"), client=httpx.Client(base_url=base + prefix.rstrip("/"), timeout=120),
                      redis_url=redis_url, model=Path(fleet["model"]["source"]))  # fmt: skip


@contextlib.contextmanager
def _deployed(base: str, name: str, prefix: str, fleet: dict):
    """A cache-less app deployed for the block, deleted after it."""
    from ray import serve

    app = _deploy(base, name, prefix, fleet, None)
    try:
        yield app
    finally:
        app.client.close()
        serve.delete(name)


@pytest.fixture(scope="module")
def serve_app(ray_serve, shared_redis_url, tiny_model):
    """The main app: arms fp32 and nf4 (weights 0.5/0.5), shadow to nf4 at 0.5, Redis db 12, one API key."""
    from ray import serve

    redis_url = f"{shared_redis_url}/{E2E_REDIS_DB}"
    _delete_keys(redis_url, "rerank:*")
    fleet = _fleet(tiny_model, [_arm("fp32", 0.5), _arm("nf4", 0.5)], redis_url,
                   router={"shadow": {"arm": "nf4", "fraction": 0.5}}, api_keys=["e2e-key"])  # fmt: skip
    app = _deploy(ray_serve, "rerank", "/", fleet, redis_url)
    try:
        yield app
    finally:
        app.client.close()
        serve.delete("rerank")
        _delete_keys(redis_url, "rerank:*")


@pytest.fixture(scope="module")
def chaos_app(ray_serve, private_redis, tiny_model):
    """A one-arm app whose Redis tier is the private redis-server the outage test kills; its arm
    takes 2 requests at a time with 2 queued, so bursts also exercise backpressure."""
    from ray import serve

    arm = _arm("fp32", 1.0, max_ongoing=2, max_queued=2)
    app = _deploy(ray_serve, "chaos", "/chaos", _fleet(tiny_model, [arm], private_redis.url), private_redis.url)
    try:
        yield app
    finally:
        app.client.close()
        serve.delete("chaos")


@pytest.fixture(scope="module")
def score_cache_app(ray_serve, private_redis, tiny_model):
    """Arms fp32 (every routed request) and nf4 (pins only), the score cache on (shared: the LRU,
    then the private redis-server, which the outage test kills); no shadow and no noise floor, so
    every arm call is the score cache's to make."""
    fleet = _fleet(tiny_model, [_arm("fp32", 1.0), _arm("nf4", 0.0)], private_redis.url,
                   score_cache={"mode": "shared"}, experiment={"noise_floor_fraction": 0.0})  # fmt: skip
    with _deployed(ray_serve, "scorecache", "/scorecache", fleet) as app:
        yield app


@pytest.fixture(scope="module")
def cascade_app(ray_serve, tiny_model):
    """Arms fp32 and nf4 (pins only, with their costs) and the cascade `casc` (nf4 first, fp32 on
    its top 3: every routed request), every cascade answer mirrored to fp32 on the full list (its
    agreement with the expensive arm alone); the score cache in the ingress's LRU (no Redis); no
    noise floor."""
    arms = [_arm("fp32", 0.0) | {"cost_per_replica_hour": 4.0}, _arm("nf4", 0.0) | {"cost_per_replica_hour": 1.0}]
    fleet = _fleet(tiny_model, arms, None, cascades=[{"name": "casc", "first": "nf4", "then": "fp32", "k": 3, "weight": 1.0}],
                   router={"shadow": {"arm": "fp32", "fraction": 1.0}}, score_cache={"mode": "local"},
                   experiment={"name": "cascade", "noise_floor_fraction": 0.0, "flush_interval_s": 0.2})  # fmt: skip
    with _deployed(ray_serve, "cascade", "/cascade", fleet) as app:
        yield app


@pytest.fixture(scope="module")
def parity_app(ray_serve, tiny_model):
    """One fp32 arm, no cache, text and body limits wide enough for the parity items (a pair of
    10k tokens, 70-frame videos sent inline)."""
    fleet = _fleet(tiny_model, [_arm("fp32", 1.0)], None)
    fleet["limits"].update(max_text_chars=200_000, max_request_bytes=8 * 1024 * 1024)
    with _deployed(ray_serve, "parity", "/parity", fleet) as app:
        yield app


@pytest.fixture(scope="module")
def vllm_app(ray_serve, shared_redis_url, tiny_model):
    """Two fp32 arms of the tiny model on the two backends (`hf`: transformers, `vllm`, its images
    through the project's vision tower as embeddings), every request of `hf` shadowed to `vllm`;
    Redis db 13 as the shared feature cache. Only in the vLLM environment."""
    from ray import serve

    hf, vllm = _arm("hf", 0.5), _arm("vllm", 0.5)
    hf["precision"] = vllm["precision"] = "fp32"
    vllm.update(backend="vllm", vllm={"enforce_eager": True, "block_size": 32})
    vllm.pop("batching")
    redis_url = f"{shared_redis_url}/{VLLM_REDIS_DB}"
    _delete_keys(redis_url, "rerank:*")
    fleet = _fleet(tiny_model, [hf, vllm], redis_url, router={"shadow": {"arm": "vllm", "fraction": 1.0}})
    app = _deploy(ray_serve, "vllm", "/vllm", fleet, redis_url)
    try:
        yield app
    finally:
        app.client.close()
        serve.delete("vllm")
        _delete_keys(redis_url, "rerank:*")


CANARY_BROKEN = ("zeroed", "scaled")


@pytest.fixture(scope="module")
def canary_app(ray_serve, tiny_model, tmp_path_factory):
    """Three arms at fp32 of checkpoints with the tiny model's canary reference: `fp32` (the tiny
    model) and two broken copies (tests/checkpoint_testkit.py): `zeroed` (the yes/no rows of
    lm_head zeroed: 0.5 for every pair) and `scaled` (the decoder's MLP down-projections 100x:
    wrong quantization scales). Serve gives up on the broken arms (the application DEPLOY_FAILED:
    `serve.run` raises, as it does for the main job, which serves on); the app serves with fp32.
    Yields the app and `serve.run`'s error."""
    from checkpoint_testkit import broken_copy
    from ray import serve

    from serve.app import build_app
    from serve.arm_arrival import deployment_states, failed_arms

    folder = tmp_path_factory.mktemp("broken")
    arms = [_arm("fp32", 1.0)] + [_arm(how, 1.0) | {"precision": "fp32", "checkpoint": str(broken_copy(tiny_model, folder / how, how))}
                                  for how in CANARY_BROKEN]  # fmt: skip
    for arm in arms:
        arm["ray_actor_options"] = {"num_cpus": 0.25}
    # Cascades over a broken arm (serve/cascade.py): `then-down` answers in fp32's order, marked
    # degraded; `first-down` is down with zeroed, and its routed share fails over to fp32.
    cascades = [{"name": "then-down", "first": "fp32", "then": "zeroed", "k": 2, "weight": 0.0},
                {"name": "first-down", "first": "zeroed", "then": "fp32", "k": 2, "weight": 1.0}]
    fleet = _fleet(tiny_model, arms, None, cascades=cascades, experiment={"noise_floor_fraction": 0.0})
    with pytest.raises(RuntimeError) as failed:  # at the first arm Serve gave up on
        serve.run(build_app({"config": fleet}), name="canary", route_prefix="/canary")
    deadline = time.monotonic() + 120
    while set(failed_arms(deployment_states("canary"), list(CANARY_BROKEN))) != set(CANARY_BROKEN) and time.monotonic() < deadline:
        time.sleep(0.5)  # and the others
    app = RunningApp(base_url=f"{ray_serve}/canary", client=httpx.Client(base_url=f"{ray_serve}/canary", timeout=120), redis_url=None, model=tiny_model)
    try:
        yield app, failed.value
    finally:
        app.client.close()
        serve.delete("canary")


@pytest.fixture(scope="module")
def random_model(tiny_model, tmp_path_factory):
    """The tiny model's folder with every weight replaced by noise of the same shape and scale:
    the same architecture and tokenizer, rankings unrelated to the trained model's (so without the
    tiny model's canary reference, which it would fail by design)."""
    import torch
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("random-model") / "model"
    shutil.copytree(tiny_model, out, ignore=shutil.ignore_patterns("canary.json"))
    gen = torch.Generator().manual_seed(7)
    for f in out.glob("*.safetensors"):
        tensors = load_file(f)
        noisy = {k: (torch.randn(v.shape, generator=gen) * (v.float().std() if v.numel() > 1 else 1.0)).to(v.dtype)
                 for k, v in tensors.items()}  # fmt: skip
        save_file(noisy, f, metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def exp_app(ray_serve, tiny_model, random_model):
    """Arms ref (the tiny model) and rand (random weights), two ingress replicas, an admin key,
    interleaving configured at 0 %, guardrails judging Spearman agreement after 10 comparisons."""
    ref = _arm("ref", 0.5) | {"precision": "fp32", "cost_per_replica_hour": 2.0}
    rand = _arm("rand", 0.5) | {"precision": "fp32", "checkpoint": str(random_model), "cost_per_replica_hour": 1.0}
    for a in (ref, rand):
        a["ray_actor_options"] = {"num_cpus": 0.4}
    fleet = _fleet(
        tiny_model, [ref, rand], None,
        ingress={"num_replicas": 2},
        admin_keys={"ops": "admin-secret"},
        router={"interleave": {"arms": ["ref", "rand"], "fraction": 0.0}},
        experiment={"name": "rand-vs-ref", "noise_floor_fraction": 0.0, "flush_interval_s": 0.2,
                    "guardrails": {"min_agreement": 0.9, "min_requests": 10}},
    )  # fmt: skip
    with _deployed(ray_serve, "experiments", "/exp", fleet) as app:
        yield app


@pytest.fixture(scope="module")
def fan_out_app(ray_serve, tiny_model):
    """Arms of the tiny model at fp32: `fan` on two replicas, splitting requests of over 500
    documents (serve/fan_out.py); `whole` on one replica, without fan-out; `tight` like `fan` but
    with a queue budget of 1 ms (no work may wait: the admission test's). Requests of up to 1000
    documents, a decode budget of ten 64x64 images a request; no noise-floor calls (they would
    score requests again on `fan`'s replicas)."""
    fan = _arm("fan", 0.5) | {"precision": "fp32", "num_replicas": 2, "fan_out_above": 500}
    whole = _arm("whole", 0.5) | {"precision": "fp32"}
    tight = fan | {"name": "tight", "weight": 0.0, "queue_budget_s": 0.001, "ray_actor_options": {"num_cpus": 0.25}}
    fleet = _fleet(tiny_model, [fan, whole, tight], None, experiment={"noise_floor_fraction": 0.0})
    fleet["limits"].update(max_documents=1000, max_request_bytes=8 * 1024 * 1024, max_request_pixels=10 * 64 * 64)
    with _deployed(ray_serve, "fanout", "/fanout", fleet) as app:
        yield app
