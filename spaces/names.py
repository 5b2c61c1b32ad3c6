"""Layer names in spaces and configurations: globs, and the one-line error for a name that
matches no layer (closest names suggested)."""

from __future__ import annotations

import difflib


def is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


def unknown_name_error(where: str, name: str, known: list[str]) -> ValueError:
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = (
        f"; closest: {close}"
        if close
        else f"; layers: {known[:6]}{'...' if len(known) > 6 else ''}"
    )
    return ValueError(f"{where}: unknown layer {name!r}{hint}")
