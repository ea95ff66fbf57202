"""Fixtures of the load-test tests: the stand-in endpoint (a real HTTP server on 127.0.0.1) and,
for `@pytest.mark.ray` tests, the real Serve app with two tiny-model arms."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from standin_endpoint import StandinEndpoint

from serve.local import free_port


@pytest.fixture
def standin():
    """fp32 and nf4 at equal weights; nf4 shadows every other request and fails every 5th of its own."""
    endpoint = StandinEndpoint({"fp32": 0.5, "nf4": 0.5}, shadow="nf4", shadow_fraction=0.5, fail_every={"nf4": 5})
    yield endpoint
    endpoint.close()


@pytest.fixture(scope="module")
def fleet_app(tiny_model_dir):
    """The real app (`serve.app.build_app`) with arms fp32 and nf4 of the tiny model, every fp32
    request shadowed to nf4, the in-replica feature cache only; base URL on 127.0.0.1.

    Reuses a Ray instance and Serve proxy another fixture already started in this process
    (deploying beside its apps under /loadtest); otherwise starts its own and shuts it down."""
    model = Path(tiny_model_dir)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve

    from serve.app import build_app

    arm = {"max_ongoing_requests": 32, "ray_actor_options": {"num_cpus": 0.5},
           "batching": {"max_batch_size": 16, "batch_wait_timeout_s": 0.005}}  # fmt: skip
    fleet = {
        "model": {"source": str(model)},
        "arms": [{"name": "fp32", "precision": "fp32", **arm}, {"name": "nf4", "precision": "nf4", **arm}],
        "router": {"shadow": {"arm": "nf4", "fraction": 1.0}},
        "cache": {"redis_url": None},
        # No noise-floor mirror: fp32's cache use must be exactly what its own answers report.
        "experiment": {"noise_floor_fraction": 0.0},
    }
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
                 namespace="rerank-loadtest-tests")  # fmt: skip
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:
        from ray.serve.context import _get_global_client

        port = _get_global_client().http_config.port
    try:
        serve.run(build_app({"config": fleet}), name="loadtest", route_prefix="/loadtest")
        yield f"http://127.0.0.1:{port}/loadtest"
    finally:
        try:
            serve.delete("loadtest")
        finally:
            if owns_ray:
                serve.shutdown()
                ray.shutdown()
