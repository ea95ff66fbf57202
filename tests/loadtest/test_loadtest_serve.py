"""The quick mode against the real Serve app: two arms of the tiny model (fp32, nf4) on embedded
Ray, every fp32 request shadowed to nf4. The report must name both arms with their precisions and
carry this run's server-side figures."""

from __future__ import annotations

import json

import pytest
from loadtest_testkit import agreement_values, report_table

from loadtest.report import experiments_delta, final_or_periodic, read_stats_csv

pytestmark = pytest.mark.ray


def test_quick_pinned_run_against_the_local_app(fleet_app, tmp_path):
    from cli import main

    out = tmp_path / "serve-quick"
    assert main(["loadtest", "--quick", "--host", fleet_app, "--out", str(out)]) == 0

    table = report_table((out / "report.md").read_text())
    stats = read_stats_csv(final_or_periodic(out, "stats"))
    deltas = experiments_delta(json.loads((out / "experiments_before.json").read_text()),
                               json.loads((out / "experiments_after.json").read_text()))  # fmt: skip
    client = json.loads((out / "client_stats.json").read_text())["arms"]
    for arm in ("fp32", "nf4"):
        precision, requests, failures = table[arm][0], int(table[arm][1]), int(table[arm][2])
        assert precision == arm  # reported by the endpoint's /v1/experiments
        assert requests == stats[f"rerank[{arm}]"].requests > 0 and failures == 0
        # Pinned requests the app answered during the run: exactly Locust's requests.
        assert deltas[arm].answered == requests and deltas[arm].routed_by == {"pinned": requests}
        assert table[arm][7].endswith("%")  # image documents were sent: the cache was used
    # fp32 answers only its own requests, so the cache use its responses reported is the server's.
    assert (client["fp32"]["cache_hits"], client["fp32"]["cache_misses"]) == (deltas["fp32"].cache_hits, deltas["fp32"].cache_misses)
    # Every fp32 request was mirrored to nf4 and compared.
    assert table["fp32"][8] == "reference"
    values, n = agreement_values(table["nf4"][8])
    assert n == deltas["nf4"].agreement_n == deltas["nf4"].shadow_requests > 0
    assert n + deltas["nf4"].shadow_failed == stats["rerank[fp32]"].requests
    assert all(-1.0 <= v <= 1.0 for v in values)
    assert json.loads((out / "run.json").read_text())["killed"] is False


def test_capacity_sweep_against_the_local_app(fleet_app, tmp_path):
    """Two load steps on arm fp32 with real Locust: each step's figures come from its own Locust
    run, the capacity is one of them, and the JSON is what the planner reads."""
    from cli import main
    from placement.profiles import CapacityReport

    out = tmp_path / "capacity"
    argv = ["loadtest", "--capacity", "--host", fleet_app, "--arms", "fp32", "--user-steps", "1,2", "--duration", "3",
            "--slo-ms", "10000", "--docs", "4", "--pool-size", "4", "--stop-timeout", "2", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "capacity.json").read_text())
    (arm,) = report["arms"]
    assert arm["arm"] == "fp32" and arm["precision"] == "fp32" and arm["device"] == "cpu" and arm["replicas"] == 1
    assert [s["users"] for s in arm["steps"]] == [1, 2]
    for step in arm["steps"]:
        locust = read_stats_csv(final_or_periodic(out / "fp32" / f"users-{step['users']}", "stats"))["rerank[fp32]"]
        assert step["requests"] == locust.requests > 0 and step["failures"] == 0
    assert arm["capacity_rps"] == max(s["rps"] for s in arm["steps"]) > 0
    assert arm["pairs_per_s"] == arm["capacity_rps"] * 4
    assert CapacityReport.model_validate(report).arms[0].pairs_per_s == arm["pairs_per_s"]
    assert (out / "capacity.png").stat().st_size > 0
