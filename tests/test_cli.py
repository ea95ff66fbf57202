"""The command line's own behaviour: `score` ranks texts and image files, and the items the API
takes (parsed by the API's own parser); a bad argument is a one-line error naming it as the API
names the field (exit 2), never a traceback and never scored as text."""

from __future__ import annotations

import pytest
from media_testkit import picture, png

from cli import main


def test_score_ranks_texts_and_image_files(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "red.png"
    image.write_bytes(png(picture(64, 48, 1)))
    assert main(["score", "--model", str(tiny_model_dir), "a red circle", "a red circle", "a blue square", str(image)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("model=") and len(out) == 2 + 3
    assert {line.split()[2] for line in out[2:]} == {"0", "1", "2"}


def test_score_takes_the_items_the_api_takes(tiny_model_dir, tmp_path, capsys):
    """The API's item forms as arguments: content parts (an OpenAI image part with `detail`
    included) and {text, image}; content parts of a text score as that text, as in the API."""
    import base64
    import json

    data_uri = "data:image/png;base64," + base64.b64encode(png(picture(64, 48, 1))).decode()
    items = [
        "a red circle",
        json.dumps({"content": [{"type": "text", "text": "a red circle"}]}),
        json.dumps({"content": [{"type": "image_url", "image_url": {"url": data_uri, "detail": "low"}}, {"type": "text", "text": "red"}]}),
        json.dumps({"text": "a picture", "image": data_uri}),
    ]
    assert main(["score", "--model", str(tiny_model_dir), json.dumps({"text": "a red circle"}), *items]) == 0
    rows = {int(line.split()[2]): line.split()[1] for line in capsys.readouterr().out.splitlines()[2:]}
    assert sorted(rows) == [0, 1, 2, 3] and rows[0] == rows[1]


@pytest.mark.parametrize(
    "argument, message",
    [
        ("no/such/picture.png", "error: documents.1: no such image file: no/such/picture.png"),
        ("http://127.0.0.1:9/x.png", "error: documents.1.image: "),  # loopback: refused by the safe fetcher, as in the service
        ("http://unreachable.invalid/x.png", "error: documents.1.image: "),
        ('{"content": [{"type": "audio_url", "audio_url": "x"}]}', "error: documents.1.content.0: "),  # as the API names it
        ('{"text": "a", "image": "not base64!"}', "error: documents.1.image: "),
        ('{"text": ', "error: documents.1: not valid JSON"),
    ],
)
def test_a_bad_document_argument_is_a_one_line_error_naming_it(tiny_model_dir, capsys, argument, message):
    assert main(["score", "--model", str(tiny_model_dir), "a query", "a text", argument]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err


@pytest.mark.ray
def test_bench_reliability_prints_its_table_and_where_the_cpu_went(tiny_model_dir, tmp_path):
    """`rerank-fleet bench reliability --scenarios overload`, short, in its own process (it starts
    its own embedded Ray): the capacity and 2x rows, every refusal with Retry-After, and each
    role's cores, the arms' and the load generator's among them."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "reliability.json"
    args = ["bench", "reliability", "--scenarios", "overload", "--duration", "3", "--out", str(out)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", f"from cli import main; raise SystemExit(main({args!r}))"],
                          capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| 2x capacity (open loop" in done.stdout and "max_ms" in done.stdout
    report = json.loads(out.read_text())
    capacity, overload = report["rows"]
    assert capacity["scenario"].startswith("capacity") and capacity["200"] > 0 and report["capacity_req_per_s"] > 0
    assert overload["sent"] == round(2 * report["capacity_req_per_s"] * 3) and overload["hung"] == 0  # as open_loop counts them
    assert overload["refusals_with_retry_after"] == overload["503"]
    assert overload["max_ms"] >= overload["p99_ms"] and 0 < overload["answered_of_capacity"]
    for row in (capacity, overload):
        assert row["cpu_cores"]["arms"] > 0.1 and row["cpu_cores"]["load generator"] > 0 and row["cpu_cores"]["ingress"] > 0
        assert row["cpu_busy"] and all(0 <= v <= 1 for v in row["cpu_busy"].values())
    assert report["layout"] == "shared" and {"arm", "ingress", "proxy", "load generator"} <= {r["role"] for r in report["placement"]}
    assert "layout shared" in done.stdout and "placement: " in done.stdout


def test_the_benches_take_a_layout_and_refuse_an_unknown_one(capsys):
    from cli import build_parser

    for bench in ("reliability", "serving"):
        assert build_parser().parse_args(["bench", bench]).layout == "shared"
        assert build_parser().parse_args(["bench", bench, "--layout", "split"]).layout == "split"
    with pytest.raises(SystemExit) as e:
        main(["bench", "reliability", "--layout", "spread"])
    assert e.value.code == 2 and "argument --layout: invalid choice: 'spread'" in capsys.readouterr().err


def test_an_unknown_reliability_scenario_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "reliability", "--scenarios", "overload,nope"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --scenarios: unknown scenario(s) ['nope']; choose from overload," in err


def test_bench_score_cache_traffic_is_zipf_with_stable_candidate_lists():
    """The score-cache bench's workload (pure): Zipf queries (the head query most often, the
    rank-1/rank-2 ratio near 2**1.1), each sent with its own candidate list, a few slots fresh."""
    from collections import Counter

    from bench.score_cache import workload
    from cli import build_parser

    bodies = workload(3000, docs=8)
    counts = Counter(b["query"] for b in bodies)
    (top, n1), (_, n2) = counts.most_common(2)
    assert top.endswith("query 0") and 1.5 < n1 / n2 < 3.0 and 300 < len(counts) < 3000
    lists = [b["documents"] for b in bodies if b["query"] == top]
    assert all(len(docs) == len(set(docs)) == 8 for docs in lists)
    stable = Counter(d for docs in lists for d in docs)
    assert sum(n for _, n in stable.most_common(8)) / (8 * len(lists)) > 0.7  # mostly the query's own list
    assert workload(50, docs=8) == workload(50, docs=8)  # both sides of the bench send the same sequence
    args = build_parser().parse_args(["bench", "score-cache", "--duration", "5"])
    assert (args.duration, args.concurrency, args.docs, args.layout) == (5.0, 8, 16, "shared")
