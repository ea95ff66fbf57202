"""A checkpoint's fingerprint: one hash of every file of its folder that changes a score.

Those are the weights (`*.safetensors`, `*.bin`, `*.pt`, `*.pth`), the model's config, the
tokenizer's files, the chat template and the image/video processor settings; files written
beside them that change no score (READMEs, reports, canary references, completion markers) are
left out, so recording such a file never invalidates cached scores.

Each file counts by its name and the SHA-256 of its bytes. A file in the hub cache is a link to a
blob named by that very hash (Git LFS names its objects by their SHA-256), which is taken
without reading the file: a hub checkpoint is fingerprinted at once, a local folder at the speed
of reading it (~1 GB/s for SHA-256 here: about 15 s for an 8B model in bf16).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SCORE_FILES = frozenset({
    "config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
    "video_preprocessor_config.json", "processor_config.json",
})  # fmt: skip
_LFS_BLOB = re.compile(r"^[0-9a-f]{64}$")
_CHUNK = 8 * 1024 * 1024


def scores_by(path: Path) -> bool:
    """Whether a checkpoint file changes scores (and so the fingerprint)."""
    return path.name in SCORE_FILES or path.name.endswith(WEIGHT_SUFFIXES)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes: a hub-cache blob's own name when the path links to one."""
    target = path.resolve()
    if target.parent.name == "blobs" and _LFS_BLOB.match(target.name):
        return target.name
    h = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def checkpoint_fingerprint(folder: Path) -> str:
    """Hash of the score-changing files directly in `folder`, by name and content."""
    h = hashlib.sha256(b"checkpoint-fingerprint-1")
    for path in sorted(p for p in Path(folder).iterdir() if p.is_file() and scores_by(p)):
        h.update(path.name.encode() + b"\0" + file_sha256(path).encode() + b"\n")
    return h.hexdigest()[:32]
