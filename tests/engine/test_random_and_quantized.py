"""Random-weight real architectures load and score; `quantize` makes an AWQ W4A16 checkpoint of the
tiny model on CPU that the engine's `awq` precision loads and that ranks like fp32."""

import json
from pathlib import Path

import pytest

from engine.engine import RerankEngine
from ranking.metrics import agreement
from workshop.tiny import eval_set

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_random_weight_builder_keeps_the_real_widths(tmp_path):
    from workshop.random_model import build_random_model

    real = json.loads((REPO / "configs/models/qwen3-vl-2b.json").read_text())
    # Real widths and heads; fewer layers and a small vocabulary so it fits a CI machine quickly.
    shrink = {"text_config": {"num_hidden_layers": 2, "vocab_size": 1024}, "vision_config": {"depth": 2, "deepstack_visual_indexes": [0, 1]}}
    folder = build_random_model(REPO / "configs/models/qwen3-vl-2b.json", tmp_path / "r2b", overrides=shrink)
    engine = RerankEngine.load(str(folder), "fp32", device="cpu")
    text = engine.model.config.text_config
    assert (text.hidden_size, text.intermediate_size, text.num_attention_heads) == (
        real["text_config"]["hidden_size"], real["text_config"]["intermediate_size"], real["text_config"]["num_attention_heads"])
    assert engine.model.config.vision_config.hidden_size == real["vision_config"]["hidden_size"]
    (s,) = engine.score("red circle", ["a red circle"])
    assert 0.0 < s < 1.0


@pytest.fixture(scope="module")
def awq_checkpoint(tiny_model_dir, tmp_path_factory):
    from workshop.quantize import quantize

    return quantize(str(tiny_model_dir), tmp_path_factory.mktemp("awq") / "tiny-awq", num_samples=8)


@pytest.mark.slow
def test_quantize_writes_compressed_tensors_w4a16_without_vision_or_head(awq_checkpoint):
    qc = json.loads((awq_checkpoint / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["group_size"], weights["type"]) == (4, 128, "int")
    assert "lm_head" in qc["ignore"] and all("visual" in n or n == "lm_head" for n in qc["ignore"])


@pytest.mark.slow
def test_awq_precision_loads_the_checkpoint_and_ranks_like_fp32(awq_checkpoint, engine_for):
    awq = RerankEngine.load(str(awq_checkpoint), "awq", device="cpu")
    ref = engine_for("fp32")
    spearmans = []
    for q, docs, _ in eval_set(seed=5, n_queries=4):
        spearmans.append(agreement(ref.score(q, docs), awq.score(q, docs))["spearman"])
    # Bound documented in docs/BENCHMARKS.md (Fidelity).
    assert min(spearmans) >= 0.8


@pytest.mark.slow
def test_quantize_ships_the_sources_canary_reference_and_the_awq_arm_passes_it(awq_checkpoint, engine_for):
    """The checkpoint carries its source's canary scores at full precision (the reference a
    replica of it is judged against at start), and the AWQ model ranks the canary set within the bound."""
    from engine.canary import judge, read_reference

    canary = read_reference(awq_checkpoint)
    assert canary is not None and canary.precision == "fp32" and canary.recorded_by.startswith("rerank-fleet quantize --scheme awq")
    fp32 = engine_for("fp32")
    for group in canary.groups:
        assert fp32.score(group.query, group.documents) == pytest.approx(list(group.scores), abs=1e-5)
    awq = RerankEngine.load(str(awq_checkpoint), "awq", device="cpu")
    verdict = judge(canary, [awq.score(g.query, g.documents) for g in canary.groups])
    print(f"\ncanary awq: {verdict.explain()}")
    assert verdict.passed, verdict.explain()
