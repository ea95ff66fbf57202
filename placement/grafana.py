"""The fleet's Grafana dashboard, over the metrics it exports through Ray, and what provisions it
on KubeRay: a ConfigMap for Grafana's dashboard sidecar and a PodMonitor for Prometheus.

The panels are declared once, here (`ROWS`); `dashboard()` builds the JSON from them. Every
expression names a metric as Ray's metrics agents export it (Prometheus format, `ray_` prefix,
counters with `_total`): the fleet's own (`serve/ingress_metrics.py`, `serve/arm.py::ArmMetrics`,
tagged `arm`, and by Serve with `application`, `deployment`, `replica`) and Ray Serve's
(`ray_serve_*`). `tests/serve/test_serve_dashboard.py` starts the app, scrapes Ray's endpoint and
checks every name and label here against it.

Pure: no Ray, no Serve app; `placement.outputs` writes the files beside the KubeRay manifests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from placement import k8s
from placement.planner import PlacementReport

UID = "rerank-fleet"
TITLE = "rerank-fleet"
# Grafana 11's dashboard schema; later versions migrate it forward when they load it.
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Each Ray pod's metrics agent: KubeRay starts every node with --metrics-export-port=8080 and adds
# the container port `metrics` to every Ray container.
RAY_METRICS_PORT = 8080
RAY_METRICS_PORT_NAME = "metrics"
DASHBOARD_FILE = "rerank-fleet.json"  # the key in the ConfigMap: the sidecar writes it as this file

APP = 'application=~"$app"'
ARM = 'arm=~"$arm"'
RATE = "[$__rate_interval]"
AGREEMENT_WINDOW = "[5m]"  # shadow comparisons are a fraction of the traffic: a longer window than the rates
HITS, LOOKUPS = "hit_local|hit_redis", "hit_local|hit_redis|miss"  # serve/cache.py's events (both caches): a lookup is one of these


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]
    min: float | None = 0


def _rate(selector: str, by: str = "", window: str = RATE) -> str:
    """sum [by (...)] (rate(selector[window]))."""
    head = f"sum by ({by}) " if by else "sum"
    return f"{head}(rate({selector}{window}))"


def _per_deployment(gauge: str, what: str) -> Query:
    return Query(f"sum by (deployment) ({gauge}{{{APP}}})", f"{{{{deployment}}}}: {what}")


def _quantiles(bucket: str, matchers: str) -> tuple[Query, ...]:
    return tuple(
        Query(f"histogram_quantile({q}, sum by (arm, le) (rate({bucket}{{{matchers}}}{RATE})))", f"{{{{arm}}}} p{round(q * 100)}")
        for q in (0.5, 0.95, 0.99)
    )


def _ratio(numerator: str, denominator: str, by: str, legend: str, window: str = RATE) -> Query:
    """sum(rate(numerator)) / sum(rate(denominator)), both grouped alike."""
    return Query(f"{_rate(numerator, by, window)} / {_rate(denominator, by, window)}", legend)


def _hit_rate(metric: str, matchers: str, by: str, legend: str, hits: str = HITS) -> Query:
    return _ratio(f'{metric}{{{matchers}, event=~"{hits}"}}', f'{metric}{{{matchers}, event=~"{LOOKUPS}"}}', by, legend)


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    ("Traffic", (
        Panel(
            "Requests per second, per arm",
            "Answered: requests the ingress answered 200 with each arm (routed, pinned, failed over). Scored in the arm: every call "
            "the arm completed, shadow calls and noise-floor re-scores included.",
            "reqps",
            (Query(_rate(f'ray_rerank_requests_total{{{APP}, {ARM}, status="200"}}', "arm"), "{{arm}}: answered"),
             Query(_rate(f"ray_rerank_arm_requests_total{{{APP}, {ARM}}}", "arm"), "{{arm}}: scored in the arm")),
        ),
        Panel(
            "Answers by HTTP status",
            "Every rerank request the ingress answered, by status (errors carry no arm). 503 = refused: the panel below says why.",
            "reqps",
            (Query(_rate(f"ray_rerank_requests_total{{{APP}}}", "status"), "{{status}}"),),
        ),
    )),
    ("Latency", (
        Panel(
            "Latency per arm, end to end in the ingress",
            "p50, p95 and p99 of answered requests, from the body's arrival in the ingress to the answer (media, arm call, records).",
            "s",
            _quantiles("ray_rerank_request_latency_seconds_bucket", f"{APP}, {ARM}"),
        ),
        Panel(
            "Time in the arm per request",
            "p50, p95 and p99 of the arm's own time per scored request: feature cache, prepare, queue and forward.",
            "s",
            _quantiles("ray_rerank_arm_latency_seconds_bucket", f"{APP}, {ARM}"),
        ),
    )),
    ("Refusals and errors", (
        Panel(
            "Refusals (503) by reason",
            "Admission gate: the ingress refused before reading the body (ingress.max_in_flight). Queue budget: the arm's queued "
            "work was over its queue_budget_s (serve/admission.py), refused by the ingress before the call (its copy of each arm's "
            "budget refuses most) or by the arm replica itself. Deadline: the request's deadline passed while it waited for the "
            "arm. Lines per arm count shadow calls too. The last line is every 503 the ingress gave after routing, whatever the "
            "reason (the lines above, Serve's max_queued_requests, an arm down, a drain): its counter carries a status, not a reason.",
            "reqps",
            (Query(_rate(f'ray_rerank_requests_total{{{APP}, api="admission", status="503"}}'), "ingress: admission gate"),
             Query(_rate(f"ray_rerank_ingress_refusals_total{{{APP}, {ARM}}}", "arm, reason"), "{{arm}}: {{reason}}, at the ingress"),
             Query(_rate(f'ray_rerank_arm_errors_total{{{APP}, {ARM}, kind="ServiceUnavailable"}}', "arm"), "{{arm}}: queue budget, in the arm"),
             Query(_rate(f'ray_rerank_arm_errors_total{{{APP}, {ARM}, kind="DeadlineExceeded"}}', "arm"), "{{arm}}: deadline passed before work"),
             Query(_rate(f'ray_rerank_requests_total{{{APP}, api!="admission", status="503"}}'), "ingress: every 503 after routing")),
        ),
        Panel(
            "Arm errors by kind (refusals left out)",
            "Failed calls in the arms by exception type: input errors (4xx), FeaturesMissing (the ingress resends the image), "
            "and anything else (a 500, logged by the arm).",
            "reqps",
            (Query(_rate(f'ray_rerank_arm_errors_total{{{APP}, {ARM}, kind!~"ServiceUnavailable|DeadlineExceeded"}}', "arm, kind"), "{{arm}}: {{kind}}"),),
        ),
    )),
    ("Caches", (
        Panel(
            "Cache hit rates",
            "Share of image lookups in the arms served from the feature cache: from either tier (in-replica LRU, Redis), and "
            "from Redis alone. Share of the pairs looked up in the ingress's score cache (per arm: its scores are the arm's) "
            "answered from it, with no arm call: from either tier (the ingress's LRU, Redis).",
            "percentunit",
            (_hit_rate("ray_rerank_image_cache_events_total", f"{APP}, {ARM}", "arm", "{{arm}}: features, both tiers"),
             _hit_rate("ray_rerank_image_cache_events_total", f"{APP}, {ARM}", "arm", "{{arm}}: features from Redis", hits="hit_redis"),
             _hit_rate("ray_rerank_score_cache_events_total", f"{APP}, {ARM}", "arm", "{{arm}}: scores, both tiers")),
        ),
        Panel(
            "Cache faults",
            "Redis unreachable or slow (redis_error; later calls bypass Redis for cache.retry_after_s: bypass), undecodable "
            "entries (corrupt), entries over the item limit (too_large): in the arms' feature caches, the ingress's score cache "
            "and its URL memo (which counts only these). Each means recomputed features or scores or a new download, never a "
            "failed request.",
            "ops",
            (Query(_rate(f'ray_rerank_image_cache_events_total{{{APP}, {ARM}, event!~"{LOOKUPS}"}}', "arm, event"), "{{arm}}: {{event}}"),
             Query(_rate(f'ray_rerank_score_cache_events_total{{{APP}, {ARM}, event!~"{LOOKUPS}"}}', "arm, event"), "{{arm}}: scores {{event}}"),
             Query(_rate(f"ray_rerank_url_memo_events_total{{{APP}}}", "event"), "ingress URL memo: {{event}}")),
        ),
    )),
    ("Agreement", (
        Panel(
            "Ranking agreement of shadow calls (mean over 5 min)",
            "A shadow arm's ranking against the arm that answered the same request, named by `against` (the reference arm "
            "when it answers; spearman, ndcg@10, top10_overlap, rbo); the reference arm against itself is its noise floor "
            "(scored again in another batch). The fleet-wide comparison with the reference, with intervals and verdicts, is "
            "GET /v1/experiments.",
            "none",
            (_ratio(f"ray_rerank_shadow_agreement_sum{{{APP}, {ARM}}}", f"ray_rerank_shadow_agreement_count{{{APP}, {ARM}}}",
                    "arm, against, metric", "{{arm}} vs {{against}}: {{metric}}", AGREEMENT_WINDOW),),
            min=None,  # Spearman may be negative
        ),
        Panel(
            "Shadow comparisons with Spearman at most 0.9 (share, 5 min)",
            "The guardrails' default floor is Spearman 0.9 (experiment.guardrails.min_agreement): the share of comparisons at or below it.",
            "percentunit",
            (_ratio(f'ray_rerank_shadow_agreement_bucket{{{APP}, {ARM}, metric="spearman", le="0.9"}}',
                    f'ray_rerank_shadow_agreement_count{{{APP}, {ARM}, metric="spearman"}}', "arm, against", "{{arm}} vs {{against}}",
                    AGREEMENT_WINDOW),),
        ),
        Panel(
            "Shadow calls failed or dropped",
            "error: the shadow call failed; dropped: router.shadow.max_in_flight calls were already in flight.",
            "ops",
            (Query(_rate(f"ray_rerank_shadow_failures_total{{{APP}, {ARM}}}", "arm, reason"), "{{arm}}: {{reason}}"),),
        ),
    )),
    ("Replicas", (
        Panel(
            "Replicas per deployment: healthy and target",
            "Healthy: replicas that passed Serve's last health check. Target: what Serve aims for (the plan, or the autoscaler). "
            "An elastic arm starts at 0 and asks for its plan on the first autoscaling tick.",
            "short",
            (_per_deployment("ray_serve_deployment_replica_healthy", "healthy"), _per_deployment("ray_serve_autoscaling_target_replicas", "target")),
        ),
        Panel(
            "Requests waiting in Serve and in replicas",
            "Queued: requests the handles hold for a deployment, not yet sent to a replica (bounded by max_queued_requests). "
            "In replicas: requests being processed.",
            "short",
            (_per_deployment("ray_serve_deployment_queued_queries", "queued"), _per_deployment("ray_serve_replica_processing_queries", "in replicas")),
        ),
    )),
)  # fmt: skip

VARIABLES = (
    ("app", "Serve application", "label_values(ray_rerank_requests_total, application)"),
    ("arm", "Arm", f"label_values(ray_rerank_arm_requests_total{{{APP}}}, arm)"),
)


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    defaults: dict = {"unit": panel.unit}
    if panel.min is not None:
        defaults["min"] = panel.min
    if panel.unit == "percentunit":
        defaults["max"] = 1
    return {
        "id": panel_id,
        "type": "timeseries",
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 12, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "table", "placement": "bottom", "showLegend": True, "calcs": ["lastNotNull", "max"]},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {"datasource": DATASOURCE, "refId": chr(ord("A") + i), "expr": q.expr, "legendFormat": q.legend, "range": True}
            for i, q in enumerate(panel.queries)
        ],
    }


def _variable(name: str, label: str, query: str) -> dict:
    return {
        "name": name, "label": label, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": name}, "definition": query,
        "refresh": 2, "sort": 1, "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [], "hide": 0, "regex": "",
    }  # fmt: skip


def dashboard() -> dict:
    """The dashboard's JSON model (import it in Grafana, or provision it from a file or ConfigMap)."""
    panels: list[dict] = []
    y = 0
    for title, row in ROWS:
        panels.append({"id": len(panels) + 1, "type": "row", "title": title, "collapsed": False, "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        for i, panel in enumerate(row):
            x = 12 * (i % 2)
            panels.append(_panel(panel, len(panels) + 1, x, y))
            if x or i == len(row) - 1:
                y += 8
    datasource = {
        "name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
        "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1, "regex": "",
    }  # fmt: skip
    return {
        "id": None,
        "uid": UID,
        "title": TITLE,
        "description": "Per arm: requests/s, latency, refusals by reason, feature- and score-cache hit rates, shadow agreement; replicas per deployment. "
        "From the metrics Ray exports (placement/grafana.py).",
        "tags": ["rerank-fleet", "ray-serve"],
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "timezone": "browser",
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [datasource, *(_variable(*v) for v in VARIABLES)]},
        "panels": panels,
    }


def dashboard_json() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def expressions(model: dict) -> list[str]:
    """Every PromQL expression of a dashboard model: the panels' targets and the query variables'."""
    exprs = [t["expr"] for p in model["panels"] for t in p.get("targets", [])]
    return exprs + [v["definition"] for v in model["templating"]["list"] if v["type"] == "query"]


def render_dashboard_configmap(report: PlacementReport) -> dict:
    """The dashboard as a ConfigMap that Grafana's dashboard sidecar loads (the label
    kube-prometheus-stack's Grafana watches for: `grafana_dashboard: "1"`)."""
    deployment = report.inventory.deployment
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{deployment.cluster_name}-grafana-dashboard",
            "namespace": deployment.namespace,
            "labels": {"grafana_dashboard": "1"},
        },
        "data": {DASHBOARD_FILE: dashboard_json()},
    }


def render_pod_monitor(report: PlacementReport) -> dict:
    """A prometheus-operator PodMonitor: Prometheus scrapes every Ray pod of the fleet (head,
    ingress and GPU pods) on its metrics agent's port. The fleet's own label selects the pods
    (KubeRay's `ray.io/cluster` changes with each cluster an upgrade creates)."""
    deployment = report.inventory.deployment
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {"name": f"{deployment.cluster_name}-ray", "namespace": deployment.namespace},
        "spec": {
            "selector": {"matchLabels": k8s.ray_pod_label(deployment)},
            "podMetricsEndpoints": [
                {
                    "port": RAY_METRICS_PORT_NAME,
                    "path": "/metrics",
                    "interval": "15s",
                    # Which Ray cluster a series came from, across the clusters an upgrade creates.
                    "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_label_ray_io_cluster"], "targetLabel": "ray_io_cluster"}],
                }
            ],
        },
    }
