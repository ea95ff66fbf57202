"""The runner's safety: loopback-only targets (nothing is ever sent to the refused ones) and a hard
time limit that ends a Locust process which does not stop by itself."""

from __future__ import annotations

import socket
import sys

import pytest

from loadtest import runner
from loadtest.runner import LoadTestPlan, RemoteTargetRefused, checked_target, run_loadtest


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.1:8000",
        "http://192.168.1.20",
        "http://0.0.0.0:8000",  # "any address" is not loopback
        "https://[2001:db8::1]:8443",
        "http://example.com",  # refused whether or not it resolves here
        "http://rerank.invalid:8000",  # does not resolve: cannot be checked, so refused
        "ftp://127.0.0.1/",
        "http:///v2/rerank",
    ],
)
def test_non_loopback_targets_are_refused(url):
    with pytest.raises(RemoteTargetRefused):
        checked_target(url)


def test_a_name_is_refused_if_any_of_its_addresses_is_not_loopback():
    def resolves_to_both(host, port, proto=0):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]  # fmt: skip

    with pytest.raises(RemoteTargetRefused, match="93.184.215.14"):
        checked_target("http://mixed.test:8000", resolve=resolves_to_both)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://127.0.0.1:8000", "http://127.0.0.1:8000"),
        ("http://127.3.2.1:9/", "http://127.3.2.1:9"),
        ("http://[::1]:8000", "http://[::1]:8000"),
        ("http://localhost:8000/prefix/", "http://127.0.0.1:8000/prefix"),  # the name is replaced by its address
    ],
)
def test_loopback_targets_are_accepted_and_pinned_to_their_address(url, expected):
    assert checked_target(url) == expected


def test_allow_remote_skips_the_check_without_resolving():
    def must_not_resolve(*args, **kwargs):
        raise AssertionError("allow_remote must not need a resolution")

    assert checked_target("http://10.0.0.1:8000/", allow_remote=True, resolve=must_not_resolve) == "http://10.0.0.1:8000"


def test_run_and_cli_refuse_before_doing_anything(tmp_path):
    from cli import main

    out = tmp_path / "never-created"
    with pytest.raises(RemoteTargetRefused):
        run_loadtest(LoadTestPlan(host="http://10.0.0.1:8000", duration_s=1, out_dir=out))
    assert main(["loadtest", "--host", "http://example.com", "--quick", "--out", str(out)]) == 2
    assert not out.exists()  # no folder, no Locust process, no request


def test_hard_time_limit_terminates_a_process_that_would_not_stop(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "KILL_GRACE_S", 1.0)
    # Ignores SIGTERM, so only the SIGKILL that follows the grace period ends it.
    stubborn = [sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(120)"]
    code, _wall, killed = runner.run_locust_process(stubborn, {}, tmp_path / "log", wall_limit_s=1.0)
    assert killed and code == -9
    polite = [sys.executable, "-c", "import time; time.sleep(120)"]
    code, _wall, killed = runner.run_locust_process(polite, {}, tmp_path / "log2", wall_limit_s=1.0)
    assert killed and code == -15


def test_plan_limits():
    with pytest.raises(ValueError):
        LoadTestPlan(host="http://127.0.0.1:8000", users=0)
    with pytest.raises(ValueError):
        LoadTestPlan(host="http://127.0.0.1:8000", mode="both")  # type: ignore[arg-type]
    plan = LoadTestPlan(host="http://127.0.0.1:8000", duration_s=30, stop_timeout_s=5)
    assert plan.wall_limit_s == 30 + 5 + runner.STARTUP_GRACE_S
