"""Prometheus metrics of the front door (per arm and API shape) through `ray.serve.metrics`."""

from __future__ import annotations


class IngressMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("rerank_requests", "Rerank requests by arm, API and status.", ("arm", "api", "status"))
        self.latency = metrics.Histogram(
            "rerank_request_latency_seconds", "End-to-end time in the ingress per answered request.",
            [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60], ("arm",),
        )  # fmt: skip
        self.shadow_agreement = metrics.Histogram(
            "rerank_shadow_agreement",
            "Ranking agreement of a shadow arm with the arm that answered (`against`: the reference arm in a "
            "shadow experiment; itself for the noise floor) by metric; negative Spearman values fall in the lowest bucket.",
            [0.1, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0], ("arm", "against", "metric"),
        )  # fmt: skip
        self.shadow_failures = metrics.Counter("rerank_shadow_failures", "Shadow calls failed or dropped.", ("arm", "reason"))
        self.refusals = metrics.Counter(
            "rerank_ingress_refusals", "Arm calls the ingress refused before making them, by arm and reason "
            "(queue_budget: over the arm's queue_budget_s as this ingress sees it; serve/admission.py).", ("arm", "reason"),
        )  # fmt: skip
        self.memo_events = metrics.Counter("rerank_url_memo_events", "URL-memo cache events of the ingress.", ("event",))
        self.score_cache_events = metrics.Counter(
            "rerank_score_cache_events", "Score-cache events of the ingress by arm: hit_local, hit_redis, miss (per distinct pair "
            "looked up), redis_error, bypass, corrupt (serve/score_cache.py).", ("arm", "event"),
        )  # fmt: skip
