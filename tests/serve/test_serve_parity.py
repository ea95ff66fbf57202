"""The served API scores every parity item exactly as the engine does (which the engine tests hold
against the official pipeline): no limit or conversion is applied differently at the edge. Real
Serve over real HTTP, an fp32 arm, media sent inline as the API takes them."""

from __future__ import annotations

import base64

import pytest
from media_testkit import mp4, picture, png

from engine.inputs import ImageInput, RerankItem, ScoreRequest, VideoInput

pytestmark = pytest.mark.ray


def data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def test_every_parity_item_scores_through_the_api_as_in_the_engine(parity_app, engine_for):
    rgba, thin = png(picture(160, 96, 7, "RGBA")), png(picture(600, 12, 6))
    five = [png(picture(96, 64, i)) for i in range(5)]
    seventy = [png(picture(40, 30, 100 + i)) for i in range(70)]
    clip = mp4([picture(320, 240, 50 + i) for i in range(12)], fps=4)
    long_text = "a red circle near a blue square " * 1400  # over 8192 tokens, under the official 10240 + 5
    # (API document, the same document as the engine takes it)
    cases = [
        ({"text": long_text}, RerankItem(text=long_text)),
        ({"image": data_uri(rgba)}, RerankItem(images=(ImageInput.of(rgba),))),
        ({"image": data_uri(thin)}, RerankItem(images=(ImageInput.of(thin),))),
        ({"video": [data_uri(f) for f in five]}, RerankItem(videos=(VideoInput.of_frames(tuple(ImageInput.of(f) for f in five)),))),
        ({"video": [data_uri(f) for f in seventy]}, RerankItem(videos=(VideoInput.of_frames(tuple(ImageInput.of(f) for f in seventy)),))),
        ({"video": data_uri(clip, "video/mp4")}, RerankItem(videos=(VideoInput.of_file(clip),))),
        (
            {"content": [{"type": "video_url", "video_url": data_uri(clip, "video/mp4")}, {"type": "video", "video": [data_uri(f) for f in five[:3]]},
                         {"type": "text", "text": "two "}, {"type": "text", "text": "videos"}]},
            RerankItem(text="two videos", videos=(VideoInput.of_file(clip), VideoInput.of_frames(tuple(ImageInput.of(f) for f in five[:3])))),
        ),  # fmt: skip
        ({}, RerankItem()),
        ({"text": ""}, RerankItem(text="")),
    ]
    # Cohere's max_tokens_per_doc (default 4096, as Cohere documents it) is raised past the pair's
    # length: the official limit is max_length, applied by the engine.
    body = {"query": "a red circle", "documents": [c[0] for c in cases], "max_tokens_per_doc": 20000}
    r = parity_app.client.post("/v2/rerank", json=body)
    assert r.status_code == 200, r.text
    served = {res["index"]: res["relevance_score"] for res in r.json()["results"]}
    engine = engine_for("fp32").score_requests([ScoreRequest.of("a red circle", [c[1] for c in cases])])[0].scores
    # Within 1e-5, not bit-equal: the replica runs torch on its own thread count.
    diffs = {i: abs(served[i] - s) for i, s in enumerate(engine)}
    assert max(diffs.values()) <= 1e-5, diffs
    assert len(set(engine)) >= 7  # the items really differ (no constant score hides a mismatch)
