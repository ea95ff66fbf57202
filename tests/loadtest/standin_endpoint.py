"""A small stand-in rerank endpoint: a real HTTP server on 127.0.0.1 speaking the fleet's API.

It answers `POST /v2/rerank` in the Cohere v2 shape with `meta.arm`/`meta.precision` and the
`x-rerank-arm` header, routes like the real router (pin header or body field `arm`, else a
weighted draw), keeps a real per-arm image cache (hits are images it has seen before), mirrors a
share of requests to a shadow arm and scores their agreement with `ranking.metrics.agreement`,
fails every `fail_every[arm]`-th request to an arm with a 503, and serves `/health`,
`/v1/models` and `/v1/experiments` in the real ingress's shapes. Its own exact counters let the
tests check that a report's numbers come from the run.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from ranking.metrics import agreement

PIN_HEADER = "x-rerank-arm"


def _score(arm: str, query: str, document) -> float:
    """A deterministic relevance score; the two arms differ slightly, as two precisions would."""
    text = json.dumps(document, sort_keys=True)
    h = int.from_bytes(hashlib.sha256(f"{query}\x00{text}".encode()).digest()[:8], "big") / 2**64
    if arm != "fp32":
        h += (int.from_bytes(hashlib.sha256(f"{arm}{text}".encode()).digest()[:4], "big") / 2**32 - 0.5) * 0.2
    return max(0.0, min(1.0, h))


class StandinEndpoint:
    def __init__(self, arms: dict[str, float], *, shadow: str | None = None, shadow_fraction: float = 0.0,
                 fail_every: dict[str, int] | None = None, api_key: str | None = None, seed: int = 0):  # fmt: skip
        self.weights = arms
        self.shadow, self.shadow_fraction = shadow, shadow_fraction
        self.fail_every = fail_every or {}
        self.api_key = api_key
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.seen_images: dict[str, set[str]] = defaultdict(set)
        # Exact counters, per arm.
        self.requests: Counter = Counter()  # every request routed to the arm (answered or failed)
        self.answered: Counter = Counter()
        self.failed: Counter = Counter()
        self.routed_by: dict[str, Counter] = defaultdict(Counter)
        self.cache_hits: Counter = Counter()  # primary and shadow lookups, as the real ingress counts them
        self.cache_misses: Counter = Counter()
        self.primary_cache_hits: Counter = Counter()  # what responses reported
        self.primary_cache_misses: Counter = Counter()
        self.comparisons: dict[str, list[dict]] = defaultdict(list)  # shadow arm -> agreement dicts
        self.compared_against: dict[str, Counter] = defaultdict(Counter)
        self.latencies_s: dict[str, list[float]] = defaultdict(list)
        self.request_hosts: list[str] = []
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                if not endpoint._authorized(self) and self.path != "/health":
                    return self._json(401, {"error": {"type": "unauthorized", "message": "key", "code": 401}})
                if self.path == "/health":
                    return self._json(200, {"status": "ok", "arms": list(endpoint.weights)})
                if self.path == "/v1/models":
                    return self._json(200, endpoint.models())
                if self.path == "/v1/experiments":
                    return self._json(200, endpoint.experiments())
                return self._json(404, {"error": {"type": "http_error", "message": "not found", "code": 404}})

            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                endpoint.request_hosts.append(self.headers.get("Host", ""))
                if not endpoint._authorized(self):
                    return self._json(401, {"error": {"type": "unauthorized", "message": "key", "code": 401}})
                if self.path != "/v2/rerank":
                    return self._json(404, {"error": {"type": "http_error", "message": "not found", "code": 404}})
                status, payload, headers = endpoint.rerank(json.loads(body), self.headers.get(PIN_HEADER))
                self._json(status, payload, headers)

            def _json(self, status, payload, headers=None):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                pass  # Locust drops connections of requests still in flight when it stops

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _authorized(self, handler) -> bool:
        return self.api_key is None or handler.headers.get("authorization") == f"Bearer {self.api_key}"

    # ------------------------------------------------------------------ behaviour

    def _lookup_images(self, arm: str, documents: list) -> tuple[int, int]:
        hits = misses = 0
        for d in documents:
            if isinstance(d, dict) and "image" in d:
                digest = hashlib.sha256(d["image"].encode()).hexdigest()
                if digest in self.seen_images[arm]:
                    hits += 1
                else:
                    misses += 1
                    self.seen_images[arm].add(digest)
        return hits, misses

    def rerank(self, body: dict, pin_header: str | None) -> tuple[int, dict, dict]:
        started = time.perf_counter()
        pin = body.get("arm") or pin_header
        with self.lock:
            if pin is not None and pin not in self.weights:
                return 400, {"error": {"type": "invalid_input", "field": "arm", "message": "unknown arm", "code": 400}}, {}
            if pin is not None:
                arm, reason = pin, "pinned"
            else:
                arm = self.rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
                reason = "weighted"
            self.requests[arm] += 1
            every = self.fail_every.get(arm)
            if every and self.requests[arm] % every == 0:
                self.failed[arm] += 1  # like the real ingress: an arm error names no answering arm
                return 503, {"error": {"type": "overloaded", "message": "retry later", "code": 503}}, {"retry-after": "1"}
            query, docs = body["query"], body["documents"]
            scores = [_score(arm, json.dumps(query), d) for d in docs]
            hits, misses = self._lookup_images(arm, docs)
            self.answered[arm] += 1
            self.routed_by[arm][reason] += 1
            self.cache_hits[arm] += hits
            self.cache_misses[arm] += misses
            self.primary_cache_hits[arm] += hits
            self.primary_cache_misses[arm] += misses
            shadowed = self.shadow is not None and self.shadow != arm and self.rng.random() < self.shadow_fraction
            if shadowed:
                shadow_scores = [_score(self.shadow, json.dumps(query), d) for d in docs]
                s_hits, s_misses = self._lookup_images(self.shadow, docs)
                self.cache_hits[self.shadow] += s_hits
                self.cache_misses[self.shadow] += s_misses
                self.comparisons[self.shadow].append(agreement(scores, shadow_scores, 10))
                self.compared_against[self.shadow][arm] += 1
            self.latencies_s[arm].append(time.perf_counter() - started)
        order = sorted(range(len(docs)), key=lambda i: -scores[i])[: body.get("top_n") or len(docs)]
        meta = {"arm": arm, "precision": arm, "model": "standin", "routed_by": reason,
                "image_cache": {"hits": hits, "misses": misses}}  # fmt: skip
        payload = {"id": "x", "results": [{"index": i, "relevance_score": scores[i]} for i in order], "meta": meta}
        return 200, payload, {"x-rerank-arm": arm, "x-rerank-precision": arm, "x-rerank-routed-by": reason}

    # ------------------------------------------------------------------ reports

    def models(self) -> dict:
        total = sum(self.weights.values())
        arms = [{"name": a, "precision": a, "weight": w / total} for a, w in self.weights.items()]
        return {"object": "list", "data": [{"id": "standin", "object": "model", "owned_by": "tests", "arms": arms}]}

    def experiments(self) -> dict:
        with self.lock:
            arms = {}
            total = sum(self.weights.values())
            for a in self.weights:
                comps = self.comparisons[a]
                means = {k: round(sum(c[k] for c in comps) / len(comps), 6) for k in (comps[0] if comps else {})}
                looked = self.cache_hits[a] + self.cache_misses[a]
                arms[a] = {
                    "precision": a, "share": self.weights[a] / total, "requests": self.answered[a],
                    "errors": {"client": 0, "server": self.failed[a]}, "routed_by": dict(self.routed_by[a]),
                    "latency_ms": {"n": len(self.latencies_s[a]), "p50": None, "p95": None, "p99": None},
                    "image_cache": {"hits": self.cache_hits[a], "misses": self.cache_misses[a],
                                    "hit_rate": round(self.cache_hits[a] / looked, 4) if looked else None},
                    "shadow": {"requests": len(comps), "errors": 0, "dropped": 0,
                               "agreement": {"n": len(comps), "against": dict(self.compared_against[a]), **means}},
                }  # fmt: skip
            return {
                "router": {"pin_header": PIN_HEADER, "sticky_header": "x-rerank-user",
                           "shadow": {"arm": self.shadow, "fraction": self.shadow_fraction} if self.shadow else None},
                "arms": arms,
                "scope": "stand-in",
            }  # fmt: skip

    def counters(self) -> dict:
        """A copy of the exact counters, to diff around a run."""
        with self.lock:
            return {
                "requests": Counter(self.requests), "answered": Counter(self.answered), "failed": Counter(self.failed),
                "cache_hits": Counter(self.cache_hits), "cache_misses": Counter(self.cache_misses),
                "primary_cache_hits": Counter(self.primary_cache_hits),
                "primary_cache_misses": Counter(self.primary_cache_misses),
                "comparisons": {a: list(c) for a, c in self.comparisons.items()},
            }  # fmt: skip
