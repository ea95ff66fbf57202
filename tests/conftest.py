"""Shared fixtures: the trained tiny model (built once per machine, cached) and engines per precision."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir():
    from serve.engine.tiny import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def engine_for(tiny_model_dir):
    """engine_for(precision) -> a RerankEngine on the tiny model, loaded once per precision."""
    from serve.config import ModelConfig
    from serve.engine.engine import RerankEngine

    cache = {}

    def get(precision: str, **model_overrides):
        key = (precision, tuple(sorted(model_overrides.items())))
        if key not in cache:
            cfg = ModelConfig(source=str(tiny_model_dir), **model_overrides)
            cache[key] = RerankEngine.load(cfg, precision, device="cpu")
        return cache[key]

    return get
