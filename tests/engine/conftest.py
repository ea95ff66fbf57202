"""Fixtures of the engine tests."""

import sys
import types

import pytest


@pytest.fixture(scope="session")
def qwen_vl_utils():
    """qwen-vl-utils' `vision_process` module, for its image functions (`fetch_image`,
    `smart_resize`), in this process. It imports torchvision at the top (its video readers), which
    this process must not load (transformers would switch processors): the import is made with an
    empty stand-in, removed right after; the image functions never touch it. The video path runs
    with the real torchvision in the official reference's own process (`official_reference.py`)."""
    stand_in = types.ModuleType("torchvision")
    stand_in.io = types.ModuleType("torchvision.io")
    stand_in.transforms = types.ModuleType("torchvision.transforms")
    stand_in.transforms.InterpolationMode = types.SimpleNamespace(BICUBIC="bicubic", BILINEAR="bilinear")
    names = {"torchvision": stand_in, "torchvision.io": stand_in.io, "torchvision.transforms": stand_in.transforms}
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update(names)
    try:
        import qwen_vl_utils.vision_process as vp
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    return vp
