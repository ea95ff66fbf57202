"""The score cache's keys (engine/score_key.py) and the checkpoint fingerprint (engine/fingerprint.py):
a key changes with everything that changes a score and with nothing else. Pure, milliseconds
(the last test reads two engines of the tiny model, loaded once per session)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import replace

import pytest

from engine.fingerprint import checkpoint_fingerprint
from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput
from engine.score_key import ScoreSpec, item_digest, pair_keys

SETTINGS = {"max_length": 10240, "min_pixels": 4096, "max_pixels": 1843200, "default_instruction": "Given a search query...", "share_prefix": True}
SPEC = ScoreSpec.of("weights-a", "fp32", "transformers", SETTINGS)
PNG_A, PNG_B = b"\x89PNG fake image a", b"\x89PNG fake image b"


def request(**changes) -> ScoreRequest:
    base = ScoreRequest.of("red circle", ["a red circle", RerankItem(text="a shape", images=(ImageInput.of(PNG_A, "x"),))])
    return replace(base, **changes)


def keys(spec: ScoreSpec = SPEC, req: ScoreRequest | None = None) -> list[str]:
    return pair_keys(spec.digest, req or request())


def test_keys_are_stable_and_one_per_document():
    assert keys() == keys() and len(keys()) == 2 and len(set(keys())) == 2
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys())


@pytest.mark.parametrize(
    "changed",
    [
        ScoreSpec.of("weights-b", "fp32", "transformers", SETTINGS),  # other weights
        ScoreSpec.of("weights-a", "nf4", "transformers", SETTINGS),  # precision
        ScoreSpec.of("weights-a", "bf16", "transformers", SETTINGS),
        ScoreSpec.of("weights-a", "fp32", "vllm", SETTINGS),  # backend
        ScoreSpec.of("weights-a", "fp32", "transformers", {**SETTINGS, "max_length": 512}),  # truncation
        ScoreSpec.of("weights-a", "fp32", "transformers", {**SETTINGS, "max_pixels": 1024 * 1024}),  # image limits
        ScoreSpec.of("weights-a", "fp32", "transformers", {**SETTINGS, "default_instruction": "Find images."}),
        ScoreSpec.of("weights-a", "fp32", "transformers", {**SETTINGS, "compute_dtype": "torch.bfloat16"}),
    ],
)
def test_every_key_changes_with_the_scorer(changed):
    assert changed.digest != SPEC.digest
    assert not set(keys(changed)) & set(keys())


@pytest.mark.parametrize(
    "changes",
    [
        {"instruction": "Find the matching shape."},  # an instruction given
        {"instruction": "Given a search query..."},  # the default's text, given: not assumed equal to None
        {"max_tokens_per_doc": 16},  # a limit that cuts the documents
        {"query": RerankItem(text="red circles", field="query")},
        {"query": RerankItem(text="red circle", images=(ImageInput.of(PNG_B),), field="query")},
    ],
)
def test_every_key_changes_with_the_requests_own_parts(changes):
    assert not set(keys(req=request(**changes))) & set(keys())


def test_a_document_key_follows_that_documents_content_only():
    base = request()
    other_image = replace(base, documents=(base.documents[0], replace(base.documents[1], images=(ImageInput.of(PNG_B, "x"),))))
    assert keys(req=other_image)[0] == keys()[0] and keys(req=other_image)[1] != keys()[1]
    # Where an item came from (its field path, its URL) is not its content.
    moved = ScoreRequest.of("red circle", [RerankItem(text="a shape", images=(ImageInput(ImageInput.of(PNG_A).digest, None, "documents.9.image", "https://cdn/x.png"),)), "a red circle"])
    assert keys(req=moved) == [keys()[1], keys()[0]]


def test_no_two_different_items_hash_alike():
    digests = {
        item_digest(RerankItem()),  # empty: scored as NULL
        item_digest(RerankItem(text="")),  # an empty string: rendered as nothing
        item_digest(RerankItem(text="ab")),
        item_digest(RerankItem(text="a", images=(ImageInput.of(PNG_A),))),
        item_digest(RerankItem(images=(ImageInput.of(PNG_A),))),
        item_digest(RerankItem(images=(ImageInput.of(PNG_A), ImageInput.of(PNG_B)))),
        item_digest(RerankItem(images=(ImageInput.of(PNG_B), ImageInput.of(PNG_A)))),
        item_digest(RerankItem(videos=(VideoInput.of_file(PNG_A),))),
        item_digest(RerankItem(videos=(VideoInput.of_frames((ImageInput.of(PNG_A), ImageInput.of(PNG_B))),))),
        item_digest(RerankItem(videos=(VideoInput.of_frames((ImageInput.of(PNG_A), ImageInput.of(PNG_B)), fps=4.0),))),
    }
    assert len(digests) == 10
    # Text moved between the query and a document changes the pair.
    assert pair_keys("s", ScoreRequest.of("ab", ["c"])) != pair_keys("s", ScoreRequest.of("a", ["bc"]))


def test_settings_are_named_not_ordered():
    assert ScoreSpec.of("weights-a", "fp32", "transformers", dict(reversed(list(SETTINGS.items())))).digest == SPEC.digest


# ------------------------------------------------------------------------ checkpoint fingerprint


def _checkpoint(folder, weights: bytes = b"weights") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text('{"model_type": "qwen3_vl"}')
    (folder / "tokenizer.json").write_text('{"vocab": {}}')
    (folder / "model.safetensors").write_bytes(weights)


def test_the_fingerprint_follows_weights_and_tokenizer_not_reports(tmp_path):
    _checkpoint(tmp_path / "a")
    base = checkpoint_fingerprint(tmp_path / "a")
    for name in ("canary.json", "README.md", "training_report.json", "DONE", "rerank_fleet_quantize.json"):
        (tmp_path / "a" / name).write_text("anything")
    assert checkpoint_fingerprint(tmp_path / "a") == base
    (tmp_path / "a" / "model.safetensors").write_bytes(b"weightz")
    assert checkpoint_fingerprint(tmp_path / "a") != base
    _checkpoint(tmp_path / "b")
    (tmp_path / "b" / "tokenizer.json").write_text('{"vocab": {"x": 1}}')
    assert checkpoint_fingerprint(tmp_path / "b") != base


def test_a_hub_cache_blob_counts_by_its_name_as_its_content(tmp_path):
    """A hub snapshot links its files to blobs named by their SHA-256: the fingerprint takes the
    name without reading, and equals that of a plain folder with the same bytes."""
    _checkpoint(tmp_path / "plain")
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "rev"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in (tmp_path / "plain").iterdir():
        blob = blobs / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.write_bytes(f.read_bytes())
        os.symlink(blob, snapshot / f.name)
    assert checkpoint_fingerprint(snapshot) == checkpoint_fingerprint(tmp_path / "plain")
    # Taken by name: a blob whose bytes no longer match its name keeps its (content-addressed) name.
    next(blobs.glob("*")).write_bytes(b"changed on disk")
    assert checkpoint_fingerprint(snapshot) == checkpoint_fingerprint(tmp_path / "plain")


def test_the_engines_scorer_names_precision_and_checkpoint(engine_for):
    fp32, nf4 = engine_for("fp32"), engine_for("nf4")
    assert fp32.score_spec.weights_fingerprint == nf4.score_spec.weights_fingerprint == checkpoint_fingerprint(fp32.folder)
    assert fp32.score_spec.digest != nf4.score_spec.digest
    assert fp32.describe()["scorer"] == fp32.score_spec.digest
    assert engine_for("fp32", max_length=512).score_spec.digest != fp32.score_spec.digest
    assert engine_for("fp32", max_image_bytes=1024).score_spec.digest == fp32.score_spec.digest  # a budget refuses, never changes a score
