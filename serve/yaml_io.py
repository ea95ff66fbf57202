"""YAML files in and out, for the fleet config (`serve.config`) and the planner (`placement`).

Reading: a file whose top level is a mapping, validated into a pydantic model, any error told as
one line that names every invalid field by its dotted path. Writing: block-style YAML, multi-line strings as literal
blocks, no aliases. Pure: yaml and pydantic only.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def read_yaml_mapping(path: str | Path, error: type[Exception]) -> dict:
    """A YAML file whose top level is a mapping, or `error` saying why not."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise error(f"{path}: cannot read YAML: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the top level must be a mapping")
    return data


def describe_validation_error(err: ValidationError, source: str, what: str) -> str:
    """One line naming every invalid field by its dotted path, e.g. `arms.1.precision: ...`."""
    problems = [f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}" for e in err.errors()]
    return f"{source}: invalid {what}: " + "; ".join(problems)


def validated(model: type[M], data, error: type[Exception], source: str, what: str) -> M:
    """`data` as a `model`, or `error` naming every invalid field (`describe_validation_error`)."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise error(describe_validation_error(e, source, what)) from None


class _BlockDumper(yaml.SafeDumper):
    """Writes multi-line strings (e.g. serveConfigV2) as readable literal blocks, and no YAML aliases."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _str_representer)


def dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False, width=4096)


def dump_yaml_all(documents: list) -> str:
    return yaml.dump_all(documents, Dumper=_BlockDumper, sort_keys=False, width=4096)
