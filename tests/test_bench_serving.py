"""`rerank-fleet bench serving`'s comparison of the fleet with the echo app: CPU per request per
role, attributed by application; the goals judged from the run's own figures; HAProxy mode
without a binary fails naming it; and the whole bench at tiny sizes, in its own process."""

from __future__ import annotations

import copy

import pytest

from bench.fleet_vs_echo import format_fleet_vs_echo, goal_verdicts, set_serve_mode
from bench.load import steady_rate
from bench.serve_cpu import CpuSample, ServeCpu, ServeProcess
from engine.errors import ConfigError


def test_cpu_per_request_is_attributed_by_role_and_application():
    procs = [ServeProcess(1, "proxy", None), ServeProcess(2, "ingress", "rerank"), ServeProcess(3, "arm", "rerank", ("a", "serve")),
             ServeProcess(4, "ledger", "rerank"), ServeProcess(5, "controller", None), ServeProcess(6, "ingress", "echo")]  # fmt: skip
    before = CpuSample({p.pid: p for p in procs[:-1]}, {1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0}, {3: 0.5}, {"load generator": 1.0})
    restarted_haproxy = ServeProcess(7, "proxy", None)  # started between the samples: counts whole
    after = CpuSample({p.pid: p for p in [*procs, restarted_haproxy]}, {1: 1.1, 2: 1.4, 3: 2.0, 4: 1.02, 5: 1.01, 6: 9.0, 7: 0.1},
                      {3: 1.1}, {"load generator": 1.05})  # fmt: skip
    row = ServeCpu.per_request("rerank", before, after, answered=10)
    assert row["cpu_ms_per_request"] == {"proxy": 20.0, "ingress": 40.0, "arm machinery": 40.0, "engine": 60.0, "ledger": 2.0, "controller": 1.0}
    assert row["serve_path_cpu_ms"] == 103.0  # the engine apart; the echo app's ingress (pid 6) never counts for the fleet
    assert row["not_counted_ms"] == {"load generator": 5.0}


def results(fleet_cpu: float, echo_cpu: float, fleet_p50_1: float, engine_p50: float, rps_1: float, rps_32: float) -> dict:
    def app(cpu: float, p50_1: float) -> dict:
        row = {"requests": 96, "p50_ms": p50_1, "p95_ms": p50_1, "req_per_s": 1.0, "serve_path_cpu_ms": cpu, "not_counted_ms": {},
               "cpu_ms_per_request": {"proxy": cpu / 2, "ingress": cpu / 2, "arm machinery": 0.0, "engine": 0.0, "ledger": 0.0, "controller": 0.0}}  # fmt: skip
        return {"in_flight_1": row, "in_flight_16": copy.deepcopy(row), "equal_rate": {**copy.deepcopy(row), "rate_req_per_s": 40.0}}

    r = {
        "overhead": {"direct_ms": {"p50": engine_p50}, "serve_ms": {"p50": fleet_p50_1}},
        "batching": {"concurrency": 32, "rps_concurrency_1": rps_1, "rps_concurrency_32": rps_32, "gain": round(rps_32 / rps_1, 2)},
        "fleet_vs_echo": {"serve_mode": "both", "serve_env": {}, "in_flight": 16, "docs_per_request": 8,
                          "fleet": app(fleet_cpu, fleet_p50_1), "echo": app(echo_cpu, 1.0),
                          "worked_echo": {"work_ms": engine_p50, "fleet_ms": {"p50": fleet_p50_1, "p95": fleet_p50_1 + 2},
                                          "echo_ms": {"p50": engine_p50 + 3, "p95": engine_p50 + 4}, "serve_floor_ms": 3.0,
                                          "fleet_over_echo_ms": round(fleet_p50_1 - engine_p50 - 3, 2)}},
    }  # fmt: skip
    r["goals"] = goal_verdicts(r)
    return r


def test_the_goals_are_judged_from_the_runs_figures():
    met = results(fleet_cpu=9.0, echo_cpu=5.0, fleet_p50_1=12.0, engine_p50=8.0, rps_1=10.0, rps_32=30.0)
    assert [(g["value"], g["pass"]) for g in met["goals"]] == [(1.8, True), (4.0, True), (3.0, True)]
    missed = results(fleet_cpu=30.0, echo_cpu=5.0, fleet_p50_1=20.0, engine_p50=8.0, rps_1=10.0, rps_32=12.0)
    assert [(g["value"], g["pass"]) for g in missed["goals"]] == [(6.0, False), (12.0, False), (1.2, False)]
    text = "\n".join(format_fleet_vs_echo(missed))
    assert "FAIL  fleet's CPU outside the engine <= 2x the echo app's (per request, both at 40.0 req/s): 6.0 (limit 2; 30.0 vs 5.0 ms" in text
    assert "| CPU ms/request, both at 40.0 req/s: proxy | 15.0 | 2.5 |" in text
    # Beside the added p50, Serve's own floor for a request of the engine's length (the echo arm working as long).
    assert ("FAIL  Serve's added p50 at 1 in flight <= 5 ms over the engine alone (ms): 12.0 (limit 5; fleet 20.0 ms - engine alone 8.0 ms"
            in text)  # fmt: skip
    assert "Serve's own floor for a request whose arm works 8.0 ms: 3.0 ms (the echo app so working, alternated with the fleet: 11.0 against the fleet's 20.0 ms)" in text
    assert "| p50 / p95 at 1 in flight, the echo arm working 8.0 ms a request (alternated blocks, ms) | 20.0 / 22.0 | 11.0 / 12.0 |" in text
    assert "Serve's floor for a request whose arm works 8.0 ms (the engine alone's p50): 3.0 ms; the fleet over that echo app: 9.0 ms" in text


def test_throughput_in_flight_leaves_out_the_loops_fill_and_drain():
    # 4 in flight: the first 4 answers come together after a slow first batch (fill), then one
    # every 0.1 s, and the last 4 trickle out with fewer and fewer in flight (drain).
    finished = [1.0, 1.0, 1.0, 1.0, *(1.0 + 0.1 * i for i in range(1, 21)), 5.0, 6.0, 7.0, 8.0]
    assert steady_rate(finished, 4) == pytest.approx(20 / 2.0)  # answers 5..24 over 1.0 -> 3.0 s
    assert len(finished) / finished[-1] == 3.5  # the whole run's figure, a third of it
    with pytest.raises(ValueError, match="too few to measure 4 in flight"):
        steady_rate(finished[:9], 4)


def test_awake_cores_run_a_lowest_class_loop_per_cpu_and_stop_with_the_block():
    import contextlib
    import os
    import time

    import psutil

    from bench.awake_cores import LOOP, awake_cores

    mine = psutil.Process()

    def new_children() -> list[psutil.Process]:  # the loops; not the session's Ray cluster, when one runs
        found = []
        for p in mine.children():
            with contextlib.suppress(psutil.Error):
                if LOOP in p.cmdline():
                    found.append(p)
        return found

    with awake_cores(True, max_s=60) as cpus:
        assert cpus == sorted(os.sched_getaffinity(0))
        loops = new_children()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(os.sched_getscheduler(p.pid) == os.SCHED_IDLE for p in loops):
            time.sleep(0.05)  # each loop sets its own class as it starts
        assert len(loops) == len(cpus)
        assert all(os.sched_getscheduler(p.pid) == os.SCHED_IDLE for p in loops)
        assert sorted(p.cpu_affinity()[0] for p in loops if len(p.cpu_affinity()) == 1) == cpus
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in loops)
    with awake_cores(False) as none:
        assert none == [] and new_children() == []


def test_idle_gap_bench_measures_each_pause_with_and_without_the_cpu_kept_awake(tiny_model_dir, tmp_path):
    import json

    from bench.idle_gap import run_idle_gap_bench

    out = tmp_path / "gap.json"
    run_idle_gap_bench(out=str(out), model_source=str(tiny_model_dir), requests=4, gaps_ms=(0, 1), docs_per_request=2)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["cpu_kept_awake"], r["pause_ms"]) for r in rows] == [(False, 0), (False, 1), (True, 0), (True, 1)]
    assert all(r["p50_ms"] > 0 for r in rows)


def test_haproxy_mode_without_a_binary_fails_naming_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))
    with pytest.raises(ConfigError, match="serve mode 'haproxy' needs an HAProxy binary and none was found"):
        set_serve_mode("haproxy")


@pytest.mark.ray
def test_bench_serving_measures_the_fleet_and_the_echo_app_per_role(tiny_model_dir, tmp_path):
    """The whole bench at tiny sizes in its own process (it sets the Serve mode before Ray starts):
    every role of both apps that does work per request has CPU figures, and the verdicts are
    computed from them."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "serving.json"
    sizes = dict(requests=6, overhead_requests=8, docs_per_request=4, concurrency=8, image_requests=1, prefix_requests=1, compare_requests=48, in_flight=4)
    code = f"from bench.serving import run_serving_bench; run_serving_bench(out={str(out)!r}, model_source={str(tiny_model_dir)!r}, **{sizes!r})"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fleet vs echo app, serve mode" in done.stdout and "[bench serving] 5/5" in done.stderr
    r = json.loads(out.read_text())
    fe = r["fleet_vs_echo"]
    fleet, echo = fe["fleet"]["equal_rate"], fe["echo"]["equal_rate"]
    assert fleet["rate_req_per_s"] == echo["rate_req_per_s"] > 0 and fleet["requests"] == echo["requests"] == 48
    for row in (fleet, echo, fe["fleet"]["in_flight_4"], fe["echo"]["in_flight_4"]):
        assert row["cpu_ms_per_request"]["ingress"] > 0 and row["cpu_ms_per_request"]["arm machinery"] > 0 and row["p50_ms"] > 0
        assert row["serve_path_cpu_ms"] == pytest.approx(sum(v for k, v in row["cpu_ms_per_request"].items() if k != "engine"), abs=0.05)
    assert fleet["cpu_ms_per_request"]["engine"] > 0 and echo["cpu_ms_per_request"]["engine"] == 0
    assert fleet["cpu_ms_per_request"]["ledger"] >= 0 and echo["cpu_ms_per_request"]["ledger"] == 0
    cpu_goal, p50_goal, batching_goal = r["goals"]
    assert cpu_goal["value"] == round(fleet["serve_path_cpu_ms"] / echo["serve_path_cpu_ms"], 2) and cpu_goal["pass"] == (cpu_goal["value"] <= 2)
    o = r["overhead"]  # through Serve and into the engine alone, interleaved
    assert o["serve_ms"]["n"] == o["direct_ms"]["n"] == 8 and p50_goal["value"] == round(o["serve_ms"]["p50"] - o["direct_ms"]["p50"], 2)
    assert batching_goal["value"] == r["batching"]["gain"]
    b = r["batching"]
    assert b["rounds"] == 3 and b["gain"] == sorted(b["gain_by_round"])[1]  # the median of the rounds' own ratios
    # The engine alone behind the arm's batching, same bodies and CPUs: its own rates, and the fleet's share of them.
    assert b["engine_alone_rps_1"] > 0 and b["engine_alone_rps_8"] > 0 and b["engine_alone_gain"] > 0 and b["fleet_share_of_engine_alone"] > 0
    assert "engine alone, the arm's batching without Serve (req/s, 1 -> 8)" in done.stdout
    assert any(p.startswith("proxy") for p in fe["processes"]) and any(p.startswith("ingress of echo") for p in fe["processes"])
    # The echo arm worked the engine alone's p50 a request, alternated with the fleet: no answer came sooner than that work.
    w = fe["worked_echo"]
    assert w["work_ms"] == o["direct_ms"]["p50"] and w["fleet_ms"]["n"] == w["echo_ms"]["n"] == 48
    assert w["echo_ms"]["p50"] >= w["work_ms"] and w["serve_floor_ms"] == round(w["echo_ms"]["p50"] - w["work_ms"], 2)
    # ... and the echo app measured after it works no more: its lone requests answer well under that work.
    assert fe["echo"]["in_flight_1"]["p50_ms"] < w["echo_ms"]["p50"]
