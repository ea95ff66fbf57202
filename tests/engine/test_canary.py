"""The canary's judgement (pure, milliseconds) and its reference on the tiny model: a replica's
scores of the canary set pass only when they rank it like the reference; constant, NaN and
scrambled scores fail, naming the agreement reached. The recorded reference passes the quantized
arms and fails checkpoints broken as quantization breaks them (a zeroed score head, wrong scales)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from checkpoint_testkit import BROKEN, broken_copy

from engine.canary import CANARY_FILE, CanaryBound, CanaryGroup, CanaryReference, judge, read_reference
from engine.errors import ModelLoadError
from engine.inputs import ImageInput, RerankItem

PNG = bytes.fromhex("89504e470d0a1a0a")  # bytes stand in for an image: the format carries them, judging never decodes


def reference(*groups: list[float]) -> CanaryReference:
    made = tuple(
        CanaryGroup(RerankItem(text=f"q{g}"), tuple(RerankItem(text=f"d{g}.{i}") for i in range(len(s))), tuple(s))
        for g, s in enumerate(groups)
    )
    return CanaryReference(made, model="m", precision="fp32", device="cpu", recorded_by="test")


REF = reference([0.9, 0.6, 0.5, 0.2, 0.1], [0.1, 0.8, 0.3, 0.05, 0.4], [0.7, 0.2, 0.95, 0.3, 0.1])


def test_the_reference_itself_and_a_monotone_rescaling_pass():
    assert judge(REF, [g.scores for g in REF.groups]).passed
    # Quantization moves scores (nf4 by up to 0.18 on the held-out set); only the order is judged.
    squashed = [[0.3 + 0.2 * x for x in g.scores] for g in REF.groups]
    verdict = judge(REF, squashed)
    assert verdict.passed and verdict.mean_spearman == pytest.approx(1.0) and verdict.top1 == 3 and not verdict.problems


@pytest.mark.parametrize("constant", [0.5, 1.0, 0.0])
def test_constant_scores_fail(constant):
    """A zeroed yes/no head answers 0.5 everywhere; stuck-at-1.0 and all-zero checkpoints likewise."""
    verdict = judge(REF, [[constant] * len(g.scores) for g in REF.groups])
    assert not verdict.passed
    assert any("constant" in p for p in verdict.problems) and f"{constant:.4f}" in verdict.explain()
    assert verdict.mean_spearman == 0.0 and verdict.spread == 0.0


def test_nan_scores_fail_and_are_counted():
    scores = [list(g.scores) for g in REF.groups]
    scores[1][2] = math.nan
    verdict = judge(REF, scores)
    assert not verdict.passed and "1 of 15 scores are not finite" in verdict.problems


def test_a_scrambled_ranking_fails_with_its_spearman_named():
    reversed_ = [[1 - x for x in g.scores] for g in REF.groups]
    verdict = judge(REF, reversed_)
    assert not verdict.passed and verdict.mean_spearman == pytest.approx(-1.0)
    assert "mean Spearman -1.000" in verdict.explain() and "top-1 0/3" in verdict.explain()


def test_one_swap_of_near_equal_documents_passes_and_a_lost_top_document_does_not():
    near = [list(g.scores) for g in REF.groups]
    near[0][2], near[0][1] = near[0][1], near[0][2]  # 0.6 and 0.5 swap: Spearman 0.9 in that group, mean 0.967
    assert judge(REF, near).passed
    lost = [list(g.scores) for g in REF.groups]
    lost[2] = [0.96, 0.2, 0.7, 0.3, 0.1]  # the best and the next swap places: the top document changed
    verdict = judge(REF, lost)
    assert not verdict.passed and verdict.problems == ("top document disagrees in 1 of 3 groups",) and verdict.top1 == 2


def test_a_top_document_within_the_tie_margin_of_the_best_agrees():
    tied = reference([0.80, 0.79, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])  # the reference barely prefers document 0
    swapped = [[0.79, 0.80, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]]  # Spearman 0.976
    assert judge(tied, swapped).passed
    assert judge(tied, swapped, CanaryBound(top1_tie=0.001)).problems == ("top document disagrees in 1 of 1 groups",)


def test_the_bound_is_the_one_given():
    swapped = [[0.9, 0.5, 0.6, 0.2, 0.1], *[g.scores for g in REF.groups[1:]]]
    assert judge(REF, swapped).passed  # mean Spearman 0.967
    strict = judge(REF, swapped, CanaryBound(min_mean_spearman=0.99))
    assert not strict.passed and strict.problems == ("mean Spearman 0.967 < 0.99",) and "bound >= 0.99" in strict.summary()


def test_scores_of_another_shape_are_refused():
    with pytest.raises(ValueError):
        judge(REF, [[0.1, 0.2]])


def test_the_file_round_trips_with_images(tmp_path):
    image = RerankItem(images=(ImageInput.of(PNG),))
    ref = CanaryReference((CanaryGroup(RerankItem(text="q"), (image, RerankItem(text="d")), (0.7, 0.2)),), "m", "fp32", "cpu", "test")
    ref.write(tmp_path)
    back = read_reference(tmp_path)
    assert back == ref and back.groups[0].documents[0].images[0].data == PNG
    assert [r.documents[0].images[0].digest for r in back.requests()] == [image.images[0].digest]
    assert back.pairs == 2 and [p.name for p in tmp_path.iterdir()] == [CANARY_FILE]  # written atomically: no temporary left


def test_a_folder_without_a_reference_has_none_and_a_broken_one_is_named(tmp_path):
    assert read_reference(tmp_path) is None
    (tmp_path / CANARY_FILE).write_text(json.dumps({"format": "rerank-fleet-canary-1", "groups": []}))
    with pytest.raises(ModelLoadError, match="not a canary reference"):
        read_reference(tmp_path)
    (tmp_path / CANARY_FILE).write_text("{")
    with pytest.raises(ModelLoadError, match="not JSON"):
        read_reference(tmp_path)


# ---- on the tiny model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recorded(tiny_model_dir, tmp_path_factory):
    """A copy of the tiny model (4.6 MB) with its canary reference recorded by `record_reference`."""
    from workshop.canary import record_reference

    folder = tmp_path_factory.mktemp("canary") / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns(CANARY_FILE))
    record_reference(folder, recorded_by="test")
    return folder


def test_the_recorded_reference_is_the_fixed_set_scored_at_fp32(recorded, engine_for):
    from workshop.canary import GROUPS

    ref = read_reference(recorded)
    assert ref.precision == "fp32" and ref.recorded_by.startswith("test") and len(ref.groups) == len(GROUPS)
    assert sum(bool(d.images) for g in ref.groups for d in g.documents) == 1  # one image document
    engine = engine_for("fp32")
    for group in ref.groups:  # the scores of the model it was recorded from
        assert engine.score(group.query, group.documents) == pytest.approx(list(group.scores), abs=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16", "int8", "nf4"])
def test_the_quantized_arms_pass_their_canary(recorded, engine_for, precision):
    ref = read_reference(recorded)
    engine = engine_for(precision)
    verdict = judge(ref, [engine.score(g.query, g.documents) for g in ref.groups])
    print(f"\ncanary {precision}: {verdict.explain()}")
    assert verdict.passed, verdict.explain()


@pytest.mark.parametrize("how", BROKEN)
def test_broken_checkpoints_fail_their_canary(recorded, tmp_path, how):
    from engine.engine import RerankEngine

    ref = read_reference(recorded)
    engine = RerankEngine.load(str(broken_copy(recorded, tmp_path / how, how)), "fp32", device="cpu")
    verdict = judge(ref, [engine.score(g.query, g.documents) for g in ref.groups])
    print(f"\ncanary {how}: {verdict.explain()}")
    assert not verdict.passed, verdict.explain()
    if how == "zeroed":
        assert verdict.spread == 0.0 and "scores are constant (0.5000 for every pair)" in verdict.problems
