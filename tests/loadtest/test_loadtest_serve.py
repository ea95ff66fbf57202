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
