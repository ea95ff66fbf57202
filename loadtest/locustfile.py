"""Locust traffic against a rerank-fleet endpoint, one row per precision arm.

Two ways to split the load, chosen by RERANK_LOADTEST_MODE (`loadtest/runner.py` sets it):

* `pinned` (default): one user class per arm, `Pinned_<arm>`, whose requests carry the pin
  header (or body field `arm`); Locust spreads users evenly over the classes. A response from
  another arm counts as a failure.
* `split`: one class, `RouterSplitUser`, sends unpinned requests and the router's weights decide;
  each request is renamed after the arm that answered.

Either way a request shows in Locust as `rerank[<arm>]`. The arms are read from
RERANK_LOADTEST_ARMS (comma list) when this file is imported, because Locust discovers user
classes at import time. Traffic shape: the `--rerank-*` options below, each defaulting to its
RERANK_LOADTEST_* environment variable (see `loadtest.payloads.TrafficConfig`). A bearer key,
if the endpoint needs one, is read from RERANK_LOADTEST_API_KEY (environment only: never on a
command line). With `--rerank-client-stats PATH` the per-arm tallies this process saw in the
responses (image-cache hits and misses, routing reasons) are written there as JSON at test stop. With
`--csv PREFIX`, the final statistics are also written to PREFIX_stats_final.csv and
PREFIX_failures_final.csv when Locust quits (see `_write_final_csv`).

    RERANK_LOADTEST_ARMS=fp32,nf4 locust -f loadtest/locustfile.py --host http://127.0.0.1:8000
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

import gevent
from locust import HttpUser, events, task

try:
    import loadtest.payloads  # noqa: F401
except ImportError:  # run from a checkout without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loadtest.payloads import ENV_PREFIX, ImagePool, TrafficConfig, TrafficGenerator, pinned_class_name, request_name

RERANK_PATH = "/v2/rerank"
ARMS = tuple(a.strip() for a in os.environ.get(ENV_PREFIX + "ARMS", "fp32,nf4").split(",") if a.strip())
MODE = os.environ.get(ENV_PREFIX + "MODE", "pinned")
if MODE not in ("pinned", "split"):
    raise ValueError(f"{ENV_PREFIX}MODE must be 'pinned' or 'split', got {MODE!r}")
UNANSWERED = "unanswered"  # the row of split-mode requests that no arm answered (errors)


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    defaults = TrafficConfig()
    env = ENV_PREFIX
    parser.add_argument("--rerank-docs", type=int, env_var=env + "DOCS", default=defaults.docs, help="documents per request")
    parser.add_argument("--rerank-text-chars", type=int, env_var=env + "TEXT_CHARS", default=defaults.text_chars,
                        help="characters per text document")  # fmt: skip
    parser.add_argument("--rerank-image-share", type=float, env_var=env + "IMAGE_SHARE", default=defaults.image_share,
                        help="share of documents that are images")  # fmt: skip
    parser.add_argument("--rerank-pool-size", type=int, env_var=env + "POOL_SIZE", default=defaults.pool_size,
                        help="images drawn once and reused (cache hits)")  # fmt: skip
    parser.add_argument("--rerank-repeat-rate", type=float, env_var=env + "REPEAT_RATE", default=defaults.repeat_rate,
                        help="share of image documents taken from the pool")  # fmt: skip
    parser.add_argument("--rerank-top-n", type=int, env_var=env + "TOP_N", default=defaults.top_n, help="results asked for")
    parser.add_argument("--rerank-seed", type=int, env_var=env + "SEED", default=defaults.seed, help="seed of pool and requests")
    parser.add_argument("--rerank-wait", type=float, env_var=env + "WAIT_S", default=0.1,
                        help="each user waits uniformly 0..this many seconds between requests")  # fmt: skip
    parser.add_argument("--rerank-pin-header", env_var=env + "PIN_HEADER", default="x-rerank-arm", help="header that pins an arm")
    parser.add_argument("--rerank-pin-via", choices=["header", "body"], env_var=env + "PIN_VIA", default="header",
                        help="pin through the header or the body field `arm`")  # fmt: skip
    parser.add_argument("--rerank-client-stats", env_var=env + "CLIENT_STATS", default="",
                        help="write per-arm response tallies to this JSON file at test stop", include_in_web_ui=False)  # fmt: skip


class _Shared:
    """Per-process state: built once at Locust's init event, read by every user."""

    config: TrafficConfig | None = None
    pool: ImagePool | None = None
    streams = itertools.count()  # a distinct, reproducible request stream per spawned user
    tallies: dict[str, Counter] = defaultdict(Counter)
    routed_by: dict[str, Counter] = defaultdict(Counter)


@events.init.add_listener
def _build_pool(environment, **_kwargs) -> None:
    opts = environment.parsed_options
    if opts is None:  # library use without a command line
        _Shared.config = TrafficConfig.from_env()
    else:
        _Shared.config = TrafficConfig(
            docs=opts.rerank_docs, text_chars=opts.rerank_text_chars, image_share=opts.rerank_image_share,
            pool_size=opts.rerank_pool_size, repeat_rate=opts.rerank_repeat_rate, top_n=opts.rerank_top_n,
            seed=opts.rerank_seed,
        )  # fmt: skip
    _Shared.pool = ImagePool(_Shared.config.pool_size, _Shared.config.seed)
    # Drawing the pool (and importing torch with the tiny model's module) blocks for seconds.
    # gevent's loop caches "now" and would start Locust's --run-time timer from that stale
    # time, ending the test seconds early: refresh it.
    gevent.get_hub().loop.update_now()


@events.test_stop.add_listener
def _write_client_stats(environment, **_kwargs) -> None:
    opts = environment.parsed_options
    path = getattr(opts, "rerank_client_stats", "") if opts is not None else ""
    if not path:
        return
    arms = {
        arm: {**dict(counts), "routed_by": dict(_Shared.routed_by[arm])} for arm, counts in sorted(_Shared.tallies.items())
    }
    Path(path).write_text(json.dumps({"mode": MODE, "arms": arms, "traffic": _Shared.config.__dict__}, indent=2))


@events.quitting.add_listener
def _write_final_csv(environment, **_kwargs) -> None:
    """Locust rewrites `<prefix>_stats.csv` once a second while the test runs but not after it
    stops, so requests that finish during the stop timeout are missing from it. By `quitting`
    every user has stopped: write the final table (Locust's own CSV writer and columns) beside it."""
    opts = environment.parsed_options
    prefix = getattr(opts, "csv_prefix", None) if opts is not None else None
    if not prefix or environment.runner is None:
        return
    from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

    table = StatsCSV(environment, PERCENTILES_TO_REPORT)
    for suffix, write in (("stats_final", table.requests_csv), ("failures_final", table.failures_csv)):
        with open(f"{prefix}_{suffix}.csv", "w", newline="") as f:
            write(csv.writer(f))


class RerankUser(HttpUser):
    """Sends Cohere v2 rerank requests of the configured shape; subclasses decide the arm."""

    abstract = True
    pinned_arm: str | None = None

    def on_start(self) -> None:
        stream = next(_Shared.streams)
        self.traffic = TrafficGenerator(_Shared.config, _Shared.pool, stream=stream)
        self.wait_rng = random.Random(stream)
        opts = self.environment.parsed_options
        self.max_wait_s = opts.rerank_wait if opts is not None else 0.1
        self.pin_header = opts.rerank_pin_header if opts is not None else "x-rerank-arm"
        self.pin_via = opts.rerank_pin_via if opts is not None else "header"
        key = os.environ.get(ENV_PREFIX + "API_KEY")
        self.auth = {"authorization": f"Bearer {key}"} if key else {}

    def wait_time(self) -> float:
        return self.wait_rng.uniform(0.0, self.max_wait_s)

    @task
    def rerank(self) -> None:
        generated = self.traffic.next_request()
        body, headers = generated.body, dict(self.auth)
        if self.pinned_arm is not None:
            if self.pin_via == "header":
                headers[self.pin_header] = self.pinned_arm
            else:
                body = {**body, "arm": self.pinned_arm}
        name = request_name(self.pinned_arm or UNANSWERED)
        # allow_redirects=False: a redirect must never carry load to an address the runner did not check.
        with self.client.post(
            RERANK_PATH, json=body, headers=headers, name=name, catch_response=True, allow_redirects=False
        ) as response:
            answered = _check(response, self.pinned_arm, expected_results=body["top_n"])
            if answered is not None and self.pinned_arm is None:
                response.request_meta["name"] = request_name(answered)  # split mode: the row of the arm that answered
            tally = _Shared.tallies[answered or self.pinned_arm or UNANSWERED]
            tally["requests"] += 1
            tally["pool_images_sent"] += generated.pool_images
            tally["fresh_images_sent"] += generated.fresh_images
            tally["text_documents_sent"] += generated.text_documents


def _check(response, pinned_arm: str | None, expected_results: int) -> str | None:
    """Mark the response failed unless it is a well-formed answer (from the pinned arm, if any).
    Returns the arm that answered, when the response names one."""
    if response.status_code == 0:  # connection refused, reset or timed out
        response.failure(f"no response: {type(response.error).__name__}")
        return None
    answered = response.headers.get("x-rerank-arm")
    if response.status_code != 200:
        try:
            kind = response.json()["error"]["type"]
        except (ValueError, KeyError, TypeError):
            kind = "unparsed"
        response.failure(f"HTTP {response.status_code} {kind}")  # stable text: Locust groups failures by it
        return answered
    try:
        payload = response.json()
        meta = payload["meta"]
        answered = meta["arm"]
        results = payload["results"]
        cache = meta.get("image_cache", {})
    except (ValueError, KeyError, TypeError):
        response.failure("malformed rerank response")
        return answered
    if pinned_arm is not None and answered != pinned_arm:
        response.failure(f"answered by arm {answered}, not the pinned {pinned_arm}")
    elif len(results) != expected_results:
        response.failure(f"{len(results)} results, expected {expected_results}")
    else:
        response.success()
    tally = _Shared.tallies[answered]
    tally["answered"] += 1
    tally["cache_hits"] += int(cache.get("hits", 0))
    tally["cache_misses"] += int(cache.get("misses", 0))
    _Shared.routed_by[answered][meta.get("routed_by", "unknown")] += 1
    return answered


class RouterSplitUser(RerankUser):
    """Unpinned traffic: the router's weights (or sticky keys) choose the arm."""

    abstract = MODE != "split"


def _pinned_class(arm: str) -> type[RerankUser]:
    return type(pinned_class_name(arm), (RerankUser,), {"abstract": False, "pinned_arm": arm, "__module__": __name__})


if MODE == "pinned":
    for _arm in ARMS:
        globals()[pinned_class_name(_arm)] = _pinned_class(_arm)
