"""The API does what its OpenAPI schema says: schemathesis (every check: schema-valid requests
accepted, schema-violating ones refused, response shapes, status codes, `Allow` on 405, ...)
against a real app over real HTTP, bounded in examples, must find nothing. `schemathesis.toml`
at the repository root lets a schema-valid request get 400/413 only where the server checks what
a schema cannot say (undecodable image bytes, forbidden addresses, refused text, sizes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _arm, _deployed, _fleet
from serving_testkit import same_results

pytestmark = pytest.mark.ray
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def schema_app(ray_serve, tiny_model):
    arm = _arm("fp32", 1.0)
    arm["precision"] = "fp32"
    with _deployed(ray_serve, "schema", "/schema", _fleet(tiny_model, [arm], None, admin_keys={"schema": "schema-admin"})) as app:
        yield app


def test_schemathesis_finds_no_failure_with_every_check(schema_app):
    cli = Path(sys.executable).parent / "schemathesis"
    run = subprocess.run(
        [str(cli), "run", f"{schema_app.base_url}/openapi.json", "--url", schema_app.base_url, "--checks", "all",
         "--max-examples", "15", "--seed", "7", "--workers", "1", "--request-timeout", "30"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-6000:]
    assert "passed" in out and "failed" not in out.split("Test cases:")[-1], out[-3000:]


def test_empty_and_blank_queries_are_scored_alike_and_tokens_are_counted(schema_app):
    """An empty query, a blank one and an item with nothing in it are all scored (the official
    reranker scores an empty side as NULL), the same way; usage counts the tokens scored."""
    answers = {}
    for name, query in {"empty": "", "blank": "   ", "blank item": {"text": "  "}, "nothing": {}}.items():
        r = schema_app.client.post("/v1/rerank", json={"query": query, "documents": ["a red circle", "a blue square"]})
        assert r.status_code == 200, (name, r.text)
        answers[name] = r.json()
        assert answers[name]["usage"]["total_tokens"] > 0
    assert same_results(answers["empty"]["results"], answers["blank"]["results"])
    assert same_results(answers["empty"]["results"], answers["blank item"]["results"])
