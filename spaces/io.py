"""Read and write spaces and configurations as YAML or JSON (by file suffix).

Loading never executes code: ``yaml.safe_load`` / ``json.loads``, then pydantic validation.
Every failure is one line naming the file, the field and the value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from mpq.files import write_atomic
from mpq.spaces.errors import validation_error_line
from mpq.spaces.space import QuantConfig, SearchSpace

M = TypeVar("M", bound=BaseModel)
_SUFFIXES = (".yaml", ".yml", ".json")


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in _SUFFIXES:
        raise ValueError(f"{path}: unknown file type {suffix!r}; use one of {_SUFFIXES}")
    return "json" if suffix == ".json" else "yaml"


def read_data(path: str | Path) -> Any:
    """Parse a YAML/JSON file into plain data (dicts, lists, scalars)."""
    path = Path(path)
    kind = _format(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return json.loads(text) if kind == "json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: malformed JSON at line {exc.lineno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(f"{path}: malformed YAML{where}: {problem}") from None


def parse_model(cls: type[M], data: Any, source: str) -> M:
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping at the top, got {type(data).__name__}")
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        raise validation_error_line(source, exc) from None


def load_space(path: str | Path) -> SearchSpace:
    return parse_model(SearchSpace, read_data(path), str(path))


def load_config(path: str | Path) -> QuantConfig:
    return parse_model(QuantConfig, read_data(path), str(path))


def dump_text(model: BaseModel, path: str | Path) -> str:
    data = model.model_dump(mode="json", exclude_none=True)
    if _format(Path(path)) == "json":
        return json.dumps(data, indent=2, sort_keys=False) + "\n"
    return yaml.safe_dump(data, sort_keys=False)


def save(model: BaseModel, path: str | Path) -> Path:
    """Save a space or configuration as YAML or JSON (by suffix), atomically."""
    write_atomic(path, dump_text(model, path))
    return Path(path)
