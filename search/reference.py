"""The configuration reference, generated from the pydantic models so it cannot drift."""

from __future__ import annotations

import typing

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mpq.search.config import SearchConfig
from mpq.spaces.space import LayerOptions, Override, SearchSpace


def _type_name(annotation: object) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    return text or str(annotation).replace("typing.", "")


def _rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str]]:
    rows = []
    for name, f in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += _rows(ann, f"{key}.")
            continue
        if f.default is PydanticUndefined and f.default_factory is None:
            default = "required"
        elif f.default_factory is not None:
            default = repr(f.default_factory())  # type: ignore[call-arg]
        else:
            default = repr(f.default)
        rows.append((key, _type_name(ann), default, f.description or ""))
    return rows


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def config_reference_markdown() -> str:
    """Markdown tables of every search-config and space field, with type, default and meaning."""
    parts = []
    for title, model, prefix in (
        ("Search config (`mpq search CONFIG`)", SearchConfig, ""),
        ("`space.defaults` and per-layer options", LayerOptions, "defaults."),
        ("`space.overrides[]` (exact name beats glob; first glob wins)", Override, ""),
        ("`space`", SearchSpace, ""),
    ):
        rows = [
            r
            for r in _rows(model, prefix)
            if not (model is SearchConfig and r[0].startswith("space."))
        ]
        if model is SearchSpace:
            rows = [r for r in rows if not r[0].startswith("defaults.")]
        rows = [r for r in rows if not r[0].endswith("fused_with")]  # set by groups only
        lines = [f"#### {title}", "", "| field | type | default | meaning |", "|---|---|---|---|"]
        lines += [f"| `{k}` | `{_cell(t)}` | `{_cell(d)}` | {_cell(m)} |" for k, t, d, m in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def readme_section(text: str) -> str:
    """The text between the config-reference markers of a README."""
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def write_into_readme(path: str) -> None:
    """Replace the README's config-reference section with the generated one."""
    with open(path) as f:
        text = f.read()
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w") as f:
        f.write(f"{head}{START}\n{config_reference_markdown()}{END}{tail}")
