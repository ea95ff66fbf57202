"""Every series the Grafana dashboard reads (placement/grafana.py) exists, with the labels it
names: an app on the session's Ray Serve instance answers, refuses (at the ingress's gate, and on
an arm's queue budget in the arm and in the ingress), fails and shadows a few requests, with images by URL, its Redis tier down; then Ray's Prometheus
endpoint on this node is scraped over HTTP, parsed with prometheus_client's text parser, and each
expression's metric names, label matchers and grouping labels are checked against the app's series."""

from __future__ import annotations

import base64
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from promql_testkit import reads
from serving_testkit import free_port

from engine.errors import DeadlineExceeded
from placement.grafana import dashboard, expressions

pytestmark = pytest.mark.ray

APP = "dashboard"
SCRAPE_TIMEOUT_S = 90  # Ray's processes report every 10 s; a Serve gauge is refreshed every 10 s
GATE = 3  # ingress.max_in_flight: a burst of 8 finds the gate full
# Label values the dashboard selects that only a rarer event makes (a deadline passing while a
# request waits for its batch): checked against the code that names them instead of the scrape.
RARE_VALUES = {("ray_rerank_arm_errors_total", "kind", "DeadlineExceeded"): DeadlineExceeded.__name__}


@pytest.fixture(scope="module")
def dashboard_app(ray_serve, tiny_model, media_server):
    from ray import serve

    from serve.app import build_app

    def arm(name: str, weight: float, **extra) -> dict:
        return {"name": name, "precision": "fp32", "weight": weight, "ray_actor_options": {"num_cpus": 0.5},
                "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.0}, **extra}  # fmt: skip

    fleet = {
        "model": {"source": str(tiny_model)},
        # cand takes no routed traffic: it is shadowed (agreement) and, pinned, refuses past a queue budget of ~0
        "arms": [arm("ref", 1.0), arm("cand", 0.0, queue_budget_s=1e-6)],
        "router": {"shadow": {"arm": "cand", "fraction": 1.0}},
        "ingress": {"max_in_flight": GATE},
        "limits": {"allowed_hosts": ["localhost"]},
        # A Redis nobody answers: the caches count their fault events (redis_error, bypass), and still serve from memory.
        "cache": {"redis_url": f"redis://127.0.0.1:{free_port()}/0", "redis_timeout_s": 0.2, "retry_after_s": 0.5},
        "score_cache": {"mode": "shared"},  # its hits and its faults, with the same dead Redis
    }
    serve.run(build_app({"config": fleet}), name=APP, route_prefix=f"/{APP}")
    try:
        yield f"{ray_serve}/{APP}"
    finally:
        serve.delete(APP)


def _traffic(base: str, image_url: str) -> None:
    """Both refusals, answers with shadow comparisons, image-cache, score-cache and URL-memo misses
    then hits, an error in the arm."""
    # Long enough that the arm still scores the first when the next arrive: the ingress knows no
    # rate for an arm before its first answer and admits, so the arm's own budget refuses them;
    # from the second burst on, the ingress knows the arm's rate and refuses first.
    burst = {"query": "a red circle", "documents": [f"a red circle on a white page, document {i} " * 4 for i in range(32)]}
    with httpx.Client(base_url=base, timeout=60) as client:

        def pinned(_) -> httpx.Response:  # bypassing the score cache: every burst is work for the arm
            return client.post("/v2/rerank", json=burst, headers={"x-rerank-arm": "cand", "x-rerank-score-cache": "bypass"})

        seen: set[str] = set()
        with ThreadPoolExecutor(8) as pool:
            for burst_number in range(5):
                for r in pool.map(pinned, range(8)):
                    assert r.status_code in (200, 503), r.text
                    if r.status_code == 503:
                        seen.add("queue budget" if "queue_budget_s" in r.json()["error"]["message"] else "gate")
                if burst_number >= 1 and seen == {"queue budget", "gate"}:
                    break
        assert seen == {"queue budget", "gate"}, f"a burst of 8 pinned requests met only {seen}"
        text = {"query": "a red circle", "documents": [f"a red circle, document {i}" for i in range(8)]}
        for _ in range(3):  # the second and third from the score cache
            assert client.post("/v2/rerank", json=text).status_code == 200
        for _ in range(2):  # the second finds the URL memoised and the features cached
            assert client.post("/v2/rerank", json={"query": "a blue circle", "documents": [{"image": image_url}]}).status_code == 200
        not_an_image = {"query": "q", "documents": [{"image": f"data:image/png;base64,{base64.b64encode(b'not a png').decode()}"}]}
        assert client.post("/v2/rerank", json=not_an_image).status_code == 400  # decoded, and refused, in the arm


def _scrape(port: int) -> dict[str, list[dict[str, str]]]:
    """sample name (with its _total/_bucket/_sum/_count suffix) -> the label sets of its series."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    series: dict[str, list[dict[str, str]]] = defaultdict(list)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            series[sample.name].append(sample.labels)
    return series


def _problems(scraped: dict[str, list[dict[str, str]]]) -> list[str]:
    found = []
    for expr in expressions(dashboard()):
        read = reads(expr)
        for selector in read.selectors:
            samples = [s for s in scraped.get(selector.metric, []) if s.get("application") == APP]
            if not samples:
                others = sorted({s.get("application", "") for s in scraped.get(selector.metric, [])})
                found.append(f"{selector.metric}: no series of app {APP!r} (of apps {others}) ({expr})")
                continue
            labels = set().union(*samples)
            for label, op, value in selector.matchers:
                if label not in labels:
                    found.append(f"{selector.metric}: no label {label!r} (has {sorted(labels)})")
                elif op == "=" and "$" not in value and not any(s.get(label) == value for s in samples):
                    if RARE_VALUES.get((selector.metric, label, value)) != value:
                        found.append(f'{selector.metric}: no series with {label}="{value}"')
            missing = read.grouping - labels
            if missing:
                found.append(f"{selector.metric}: grouped by {sorted(missing)}, which it lacks ({expr})")
    return found


def test_every_dashboard_expression_names_series_that_ray_exports(dashboard_app, media_server):
    import ray

    _traffic(dashboard_app, media_server.url("/img.png", host="localhost"))
    (node,) = ray.nodes()
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    while True:
        problems = _problems(_scrape(node["MetricsExportPort"]))
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not problems, "\n".join(problems)
