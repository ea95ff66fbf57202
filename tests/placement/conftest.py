"""Shared fixtures for the placement tests: the repo's model configs, and the `ray` marker."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

MODELS_DIR = Path(__file__).resolve().parents[2] / "configs" / "models"


def pytest_configure(config):
    config.addinivalue_line("markers", "ray: starts a local multi-node Ray cluster (tens of seconds)")


def load_model_config(name: str) -> dict:
    return json.loads((MODELS_DIR / f"{name}.json").read_text())


@pytest.fixture(scope="session")
def qwen3_vl_8b() -> dict:
    return load_model_config("qwen3-vl-8b")


@pytest.fixture(scope="session")
def qwen3_vl_2b() -> dict:
    return load_model_config("qwen3-vl-2b")
