"""The folders are the layers and imports point one way (engine <- workshop <- serve <- placement,
loadtest, bench, cli). Each package is imported in a clean interpreter where the modules it must not
need are blocked: importing one of them fails there."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

PROBE = textwrap.dedent(
    """
    import importlib, importlib.abc, pkgutil, sys

    BLOCKED = set(sys.argv[2].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name in BLOCKED or name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked in this layer: {name}")
            return None

    sys.meta_path.insert(0, Block())
    package = importlib.import_module(sys.argv[1])
    names = [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")] if hasattr(package, "__path__") else []
    for name in names:
        importlib.import_module(name)
    print(len(names) + 1, "modules")
    """
)

LAYERS = {
    # The engine needs torch, transformers (and what they import) and PIL; never the serving layer,
    # Ray, an HTTP framework or Redis. pydantic is allowed: a validation library, with which the
    # engine's settings are validated where they are declared (`engine.config`), not mirrored.
    # (yaml cannot be blocked: huggingface_hub imports it.)
    "engine": "serve,workshop,placement,loadtest,bench,ray,fastapi,starlette,uvicorn,redis,locust",
    # Planning is pure: pydantic, yaml and scipy; no model, image or Ray code.
    "placement": "torch,PIL,ray,transformers,fastapi,starlette,uvicorn,redis,httpx,locust,bitsandbytes,"
    "engine.engine,engine.forward,engine.prepare,engine.vision,engine.model,workshop",
    # The serving layer never reaches up: the benchmarks, the planner, the load test and the command line use it.
    "serve": "placement,loadtest,cli,bench",
    # Ranking metrics are a leaf: the serving layer and the tools both import them.
    "ranking": "engine,serve,workshop,placement,loadtest,bench,cli,torch,ray,fastapi,redis,httpx,pydantic",
}
# The serving layer's pure cores: decisions and bookkeeping with no Ray, HTTP, Redis or model
# code, so they test in milliseconds.
PURE_CORE = "ray,torch,transformers,PIL,fastapi,starlette,uvicorn,redis,httpx,engine.engine,engine.forward,engine.vision"
LAYERS.update(dict.fromkeys(
    ["serve.router", "serve.health", "serve.arm_arrival", "serve.experiments", "serve.statistics", "serve.ledger",
     "serve.experiment_page", "serve.deploy_options", "serve.config", "serve.arm_result", "serve.admission", "serve.request_path",
     "serve.cascade"],
    PURE_CORE,
))  # fmt: skip


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_package_imports_without_the_layers_above_it(package):
    out = subprocess.run(
        [sys.executable, "-c", PROBE, package, LAYERS[package]], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "modules" in out.stdout


def test_the_probe_does_block():
    """The check can fail: a layer that needs a blocked module is refused."""
    out = subprocess.run([sys.executable, "-c", PROBE, "engine", "torch"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "blocked in this layer: torch" in out.stderr


def _readme_modules(folder: str) -> list[str]:
    """The modules the README's layout block lists under `folder/`, one line a module."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{folder}/ "))
    names = []
    for line in lines[start + 1:]:
        if not line.startswith("  ") or line.startswith("   "):
            break
        names.append(line.split()[0])
    return names


@pytest.mark.parametrize("folder", ["engine", "serve", "workshop", "bench"])
def test_the_readme_lists_each_module_once_and_only_modules_that_exist(folder):
    listed = _readme_modules(folder)
    present = sorted(p.name for p in (REPO / folder).glob("*.py") if p.name != "__init__.py")
    assert sorted(listed) == present, (sorted(set(present) - set(listed)), sorted(set(listed) - set(present)))
