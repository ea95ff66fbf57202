"""`rerank-fleet bench fan-out`'s pure parts: the fleet it serves (one replica without fan-out, two
replicas fanning out into two chunks, one replica fanning out), the request it sends, its
command line. The bench itself runs a local Serve app; its figures are in docs/BENCHMARKS.md."""

from __future__ import annotations

from bench.fan_out import ARMS, fan_out_fleet, request_body
from cli import build_parser
from serve.fan_out import chunk_bounds


def test_the_bench_fleet_is_one_replica_against_two_with_the_request_split_in_two():
    fleet = fan_out_fleet("/models/tiny", 8768, documents=1000)
    arms = {a.name: a for a in fleet.arms}
    assert tuple(arms) == ARMS
    assert [(arms[a].num_replicas, len(chunk_bounds(1000, arms[a]))) for a in ARMS] == [(1, 1), (2, 2), (1, 2)]
    assert all(a.precision == "fp32" and a.torch_threads == 1 for a in fleet.arms)
    assert fleet.limits.max_documents == 1000 and fleet.experiment.noise_floor_fraction == 0.0


def test_the_request_has_the_documents_asked_for_and_is_the_same_for_a_seed():
    body = request_body(1000, words=12, seed=3)
    assert len(body["documents"]) == 1000 and len(set(body["documents"])) == 1000
    assert all(len(d.split()) == 13 for d in body["documents"])  # "i:" and 12 words
    assert body == request_body(1000, words=12, seed=3) and body != request_body(1000, words=12, seed=4)


def test_the_command_line_defaults():
    args = build_parser().parse_args(["bench", "fan-out"])
    assert (args.model, args.documents, args.words, args.repeats, args.out) == ("tiny", 1000, 12, 7, "out/bench-fan-out.json")
