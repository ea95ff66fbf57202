"""The command line's own behaviour: `score` ranks texts and image files, and a bad argument is a
one-line error naming it (exit 2), never a traceback and never scored as text."""

from __future__ import annotations

import pytest
from media_testkit import picture, png

from cli import main


def test_score_ranks_texts_and_image_files(tiny_model_dir, tmp_path, capsys):
    image = tmp_path / "red.png"
    image.write_bytes(png(picture(64, 48, 1)))
    assert main(["score", "--model", str(tiny_model_dir), "a red circle", "a red circle", "a blue square", str(image)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("model=") and len(out) == 2 + 3
    assert {line.split()[2] for line in out[2:]} == {"0", "1", "2"}


@pytest.mark.parametrize(
    "argument, message",
    [
        ("no/such/picture.png", "error: documents.1: no such image file: no/such/picture.png"),
        ("http://127.0.0.1:9/x.png", "error: documents.1: "),  # loopback: refused by the safe fetcher, as in the service
        ("http://unreachable.invalid/x.png", "error: documents.1: "),
    ],
)
def test_a_bad_document_argument_is_a_one_line_error_naming_it(tiny_model_dir, capsys, argument, message):
    assert main(["score", "--model", str(tiny_model_dir), "a query", "a text", argument]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
