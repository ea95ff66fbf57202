"""`rerank-fleet bench cascade`'s pure parts: the fleet it serves (fp32, nf4 and the cascade over
them), the evaluation set as request bodies, the rankings it reads and the figures it makes of
them, its command line. The bench itself runs a local Serve app; its figures are in docs/BENCHMARKS.md."""

from __future__ import annotations

import base64

import pytest

from bench.cascade import cascade_fleet, shown, summarise, task_bodies
from cli import build_parser
from ranking.metrics import ndcg_at_k


def test_the_bench_fleet_is_a_cascade_over_its_two_arms():
    fleet = cascade_fleet("/models/tiny", 8769, k=10)
    assert [(a.name, a.precision, a.torch_threads, a.weight) for a in fleet.arms] == [("fp32", "fp32", 1, 0), ("nf4", "nf4", 1, 0)]
    (c,) = fleet.cascades
    assert (c.name, c.first, c.then, c.k, c.weight) == ("cascade", "nf4", "fp32", 10, 1)
    assert fleet.score_cache.mode == "off" and fleet.experiment.noise_floor_fraction == 0.0  # every pair scored, nothing else sent


def test_the_evaluation_set_goes_as_the_api_takes_it():
    bodies = task_bodies(3, 20)
    assert len(bodies) == 3 and all(len(b["documents"]) == len(g) == 20 for b, g in bodies)
    images = [d["image"] for b, _ in bodies for d in b["documents"] if isinstance(d, dict)]
    assert images and all(base64.b64decode(x).startswith(b"\x89PNG") for x in images)
    assert all(isinstance(b["query"], str) for b, _ in bodies)
    assert sorted(bodies[0][1], reverse=True)[:3] == [2.0, 2.0, 2.0]  # the set's graded labels


def test_the_figures_are_of_the_rankings_shown():
    answer = {"results": [{"index": 2}, {"index": 0}, {"index": 1}]}
    assert shown(answer, 3) == [2.0, 1.0, 3.0]
    gains = [0.0, 1.0, 2.0]
    tasks = [{"gains": gains, "fp32": [1.0, 2.0, 3.0], "cascade": [2.0, 1.0, 3.0], "nf4": [3.0, 2.0, 1.0],
              "pairs": {"fp32": {"fp32": 3}, "cascade": {"nf4": 3, "fp32": 2}, "nf4": {"nf4": 3}},
              "tokens": {"fp32": 30, "cascade": 50, "nf4": 30}}] * 2  # fmt: skip
    fp32, casc = summarise("fp32", tasks, [0.1, 0.2]), summarise("cascade", tasks, [0.2, 0.4])
    assert fp32["agreement_with_fp32"]["spearman"]["mean"] == 1.0 and fp32["ndcg@10_labels"]["mean"] == 1.0
    assert casc["ndcg@10_labels"]["mean"] == pytest.approx(round(ndcg_at_k([2.0, 1.0, 3.0], gains, 10), 4))
    assert casc["agreement_with_fp32"]["spearman"]["mean"] == 0.5 and casc["pairs_per_request"] == {"nf4": 3, "fp32": 2}
    assert casc["latency_ms"]["p50"] == pytest.approx(300.0) and casc["decoder_tokens_per_request"] == 50


def test_the_command_line_defaults():
    args = build_parser().parse_args(["bench", "cascade"])
    assert (args.model, args.queries, args.documents, args.k, args.repeats, args.out) == ("tiny", 24, 20, 10, 3, "out/bench-cascade.json")
