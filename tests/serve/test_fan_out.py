"""Fan-out's pure parts (serve/fan_out.py): where a request is cut, what each chunk carries, and the
whole request's decode budget charged before the split with the engine's own errors (checked
against the engine's `prepare` of the unsplit request). No Ray; the tiny model's engine only for
the budget's parity."""

from __future__ import annotations

import pytest
from serving_testkit import png_bytes

from engine.errors import ConfigError, InputError
from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput
from serve.config import ArmConfig, FleetConfig, LimitsConfig
from serve.fan_out import charge_whole, chunk_bounds, split


def arm(**fan) -> ArmConfig:
    return ArmConfig(name="a", precision="fp32", **fan)


def test_off_unless_set_and_only_above_the_threshold():
    assert chunk_bounds(1000, arm()) == [(0, 1000)]
    assert chunk_bounds(500, arm(fan_out_above=500)) == [(0, 500)]
    assert chunk_bounds(501, arm(fan_out_above=500)) == [(0, 251), (251, 501)]  # as few chunks as will do, even sizes


@pytest.mark.parametrize("n, above, chunk", [(1000, 500, None), (1000, 250, None), (1000, 100, 300), (7, 2, None), (999, 1, 333), (12, 3, 1)])
def test_chunks_cover_the_request_in_order_within_the_chunk_size(n, above, chunk):
    bounds = chunk_bounds(n, arm(fan_out_above=above, fan_out_chunk=chunk))
    size = chunk or above
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, in order
    lengths = [b - a for a, b in bounds]
    assert max(lengths) <= size and max(lengths) - min(lengths) <= 1
    assert len(bounds) == -(-n // size)


def test_each_chunk_keeps_the_query_instruction_limits_and_each_document_its_own_field():
    job = ScoreRequest.of("q", [f"d{i}" for i in range(10)], instruction="find it", max_tokens_per_doc=7)
    chunks = split(job, arm(fan_out_above=4))
    assert [len(c.documents) for c in chunks] == [4, 3, 3]
    assert all(c.query == job.query and c.instruction == "find it" and c.max_tokens_per_doc == 7 for c in chunks)
    assert [d.field for c in chunks for d in c.documents] == [f"documents.{i}" for i in range(10)]  # errors name the whole request's index
    assert split(job, arm()) == [job] and split(job, arm(fan_out_above=10)) == [job]


def test_a_request_with_a_video_is_scored_whole():
    video = RerankItem(videos=(VideoInput.of_file(b"not really a video"),), field="documents.3")
    docs = [*(RerankItem(text=f"d{i}", field=f"documents.{i}") for i in range(3)), video]
    job = ScoreRequest(RerankItem(text="q", field="query"), tuple(docs))
    assert split(job, arm(fan_out_above=1)) == [job]


def test_fan_out_chunk_needs_fan_out_above():
    with pytest.raises(ConfigError, match="fan_out_chunk"):
        FleetConfig.from_dict({"arms": [{"name": "a", "precision": "fp32", "fan_out_chunk": 10}]})
    with pytest.raises(ConfigError, match="fan_out_above"):
        FleetConfig.from_dict({"arms": [{"name": "a", "precision": "fp32", "fan_out_above": 0}]})


# ------------------------------------------------------------------ the whole request's decode budget


def image_doc(i: int, side: int = 64, data: bytes | None = None) -> RerankItem:
    img = ImageInput.of(data if data is not None else png_bytes(side=side, seed=i), field=f"documents.{i}.image")
    return RerankItem(images=(img,), field=f"documents.{i}")


def request(images: dict[int, RerankItem], n: int = 40) -> ScoreRequest:
    docs = [images.get(i) or RerankItem(text=f"document {i}", field=f"documents.{i}") for i in range(n)]
    return ScoreRequest(RerankItem(text="query", field="query"), tuple(docs))


def engine_error(engine, job: ScoreRequest) -> InputError | None:
    try:
        engine.prepare(job, {})
    except InputError as e:
        return e
    return None


def limits(**budgets) -> LimitsConfig:
    return LimitsConfig(**budgets)


@pytest.mark.parametrize(
    "case, budgets",
    [
        ("undecodable image", {}),
        ("image over max_image_pixels", {"max_image_pixels": 60 * 60}),
        ("image over max_image_bytes", {"max_image_bytes": 150}),
        ("request over max_request_pixels", {"max_request_pixels": 5 * 64 * 64 + 10}),
        ("within every budget", {}),
    ],
)
def test_the_whole_request_is_charged_as_the_engine_charges_it_unsplit(engine_for, case, budgets):
    images = {i: image_doc(i) for i in (3, 11, 17, 25, 30, 33, 38)}  # in every chunk of 10
    images[11] = image_doc(11, data=png_bytes(seed=3))  # the same image twice: charged once, as the engine does
    if case == "undecodable image":
        images[25] = image_doc(25, data=b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    job = request(images)
    expected = engine_error(engine_for("fp32", **budgets), job)
    if case == "within every budget":
        assert expected is None
        charge_whole(job, limits(**budgets))
        return
    assert expected is not None, case
    with pytest.raises(InputError) as got:
        charge_whole(job, limits(**budgets))
    assert (type(got.value), got.value.field, str(got.value)) == (type(expected), expected.field, str(expected))
    # Every chunk alone is within the request budget: only the whole request is over it.
    if case == "request over max_request_pixels":
        assert all(engine_error(engine_for("fp32", **budgets), c) is None for c in split(job, arm(fan_out_above=10)))
