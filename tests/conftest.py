"""Shared fixtures: the trained tiny model (built once per machine, cached) and engines per precision."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The trained tiny model with its canary reference (every test app's arms score the canary at
    start); RERANK_TEST_MODEL_DIR names another build (e.g. while its recipe changes)."""
    from workshop.canary import ensure_reference
    from workshop.tiny import ensure_tiny_model

    override = os.environ.get("RERANK_TEST_MODEL_DIR")
    folder = Path(override) if override else ensure_tiny_model()
    ensure_reference(folder, recorded_by="tests")
    return folder


@pytest.fixture(scope="session")
def engine_for(tiny_model_dir):
    """engine_for(precision, **EngineConfig overrides) -> a RerankEngine on the tiny model, loaded once each."""
    from engine.config import EngineConfig
    from engine.engine import RerankEngine

    cache = {}

    def get(precision: str, **overrides):
        key = (precision, tuple(sorted(overrides.items())))
        if key not in cache:
            cache[key] = RerankEngine.load(str(tiny_model_dir), precision, config=EngineConfig(**overrides), device="cpu")
        return cache[key]

    return get
