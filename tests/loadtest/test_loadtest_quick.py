"""The quick mode end to end: real Locust against a real HTTP endpoint on 127.0.0.1, and the
report's numbers checked against what that run produced (Locust's CSV, the endpoint's own
counters, /v1/experiments)."""

from __future__ import annotations

import json

import httpx
import pytest
from loadtest_testkit import agreement_values, report_table

from loadtest.report import final_or_periodic, read_stats_csv
from loadtest.runner import LoadTestPlan, run_loadtest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _delta(after: dict, before: dict, key: str, arm: str) -> int:
    return after[key][arm] - before[key][arm]


def _check_plots(out_dir):
    for name in ("latency_percentiles.png", "throughput.png", "failures.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) < 100_000


def _check_table_matches_locust_csv(table: dict, stats: dict) -> None:
    for arm, cells in table.items():
        row = stats["Aggregated" if arm == "all" else f"rerank[{arm}]"]
        requests, failures, rps, p50, p95, p99 = cells[1:7]
        assert int(requests) == row.requests and int(failures) == row.failures
        assert rps == f"{row.rps:.2f}"
        assert [p50, p95, p99] == [f"{row.p50_ms:.0f}", f"{row.p95_ms:.0f}", f"{row.p99_ms:.0f}"]


def test_quick_pinned_run_report_numbers_come_from_the_run(standin, tmp_path):
    from cli import main

    # Traffic before the run (unpinned, some shadowed): the report must leave it out.
    with httpx.Client(base_url=standin.url) as client:
        for i in range(6):
            body = {"query": "red circle", "documents": ["a red circle", {"image": f"data:image/png;base64,AAA{i % 2}"}]}
            assert client.post("/v2/rerank", json=body).status_code in (200, 503)
    before = standin.counters()
    out = tmp_path / "pinned"

    assert main(["loadtest", "--quick", "--host", standin.url, "--out", str(out)]) == 0

    after = standin.counters()
    report = (out / "report.md").read_text()
    table = report_table(report)
    assert set(table) == {"fp32", "nf4", "all"}
    stats = read_stats_csv(final_or_periodic(out, "stats"))
    _check_table_matches_locust_csv(table, stats)

    # Locust's counts are the endpoint's counts of this run: every request, every 503.
    for arm in ("fp32", "nf4"):
        assert stats[f"rerank[{arm}]"].requests == _delta(after, before, "requests", arm) > 0
        assert stats[f"rerank[{arm}]"].failures == _delta(after, before, "failed", arm)
    assert stats["rerank[nf4]"].failures > 0 and stats["rerank[fp32]"].failures == 0
    assert "HTTP 503 overloaded" in report

    # Cache hit rate: this run's lookups at the endpoint (shadow lookups included for nf4).
    for arm in ("fp32", "nf4"):
        hits, misses = _delta(after, before, "cache_hits", arm), _delta(after, before, "cache_misses", arm)
        assert table[arm][7] == f"{100 * hits / (hits + misses):.1f}%"

    # Agreement: the mean over exactly this run's shadow comparisons of nf4 against fp32.
    assert table["fp32"][8] == "reference"
    run_comparisons = after["comparisons"]["nf4"][len(before["comparisons"]["nf4"]) :]
    values, n = agreement_values(table["nf4"][8])
    assert n == len(run_comparisons) > 0
    expected_spearman = sum(c["spearman"] for c in run_comparisons) / n
    assert values[0] == pytest.approx(expected_spearman, abs=1.5e-3)

    # The load generator saw the same answers and cache use the endpoint reported.
    client = json.loads((out / "client_stats.json").read_text())["arms"]
    for arm in ("fp32", "nf4"):
        assert client[arm]["answered"] == _delta(after, before, "answered", arm)
        assert client[arm]["cache_hits"] == _delta(after, before, "primary_cache_hits", arm)
        assert client[arm]["cache_misses"] == _delta(after, before, "primary_cache_misses", arm)
    _check_plots(out)
    assert all(host == standin.url.removeprefix("http://") for host in standin.request_hosts)

    # The report is a function of the run's files: rebuilt from them, it is the same.
    (out / "report.md").unlink()
    assert main(["loadtest", "--report-from", str(out)]) == 0
    assert (out / "report.md").read_text() == report


def test_quick_split_run_names_rows_by_the_answering_arm(standin, tmp_path):
    out = tmp_path / "split"
    plan = LoadTestPlan(host=standin.url, users=4, spawn_rate=4, duration_s=4, mode="split", out_dir=out, stop_timeout_s=5)
    before = standin.counters()
    run = run_loadtest(plan)
    after = standin.counters()
    assert not run.killed and run.arms == ("fp32", "nf4")

    from loadtest.report import build_report

    report = build_report(out)
    stats = read_stats_csv(final_or_periodic(out, "stats"))
    for arm in ("fp32", "nf4"):
        # Renamed after the arm that answered: exactly the requests the router sent there and answered.
        assert stats[f"rerank[{arm}]"].requests == _delta(after, before, "answered", arm) > 0
        assert stats[f"rerank[{arm}]"].failures == 0
    # An error names no answering arm: those requests form their own row.
    failed = sum(_delta(after, before, "failed", arm) for arm in ("fp32", "nf4"))
    assert stats["rerank[unanswered]"].failures == stats["rerank[unanswered]"].requests == failed > 0
    table = report_table(report.markdown.read_text())
    _check_table_matches_locust_csv(table, stats)
    assert "weighted" in report.markdown.read_text()
    _check_plots(out)
