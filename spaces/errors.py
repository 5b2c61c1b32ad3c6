"""One error dialect for every validation path: the first pydantic error as one line."""

from __future__ import annotations

from pydantic import ValidationError


def validation_error_line(source: str, exc: ValidationError) -> ValueError:
    """The first pydantic error as one line: ``source: field.path: message (got value)``."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "<root>"
    msg = err["msg"].removeprefix("Value error, ")
    got = "" if err["type"] == "missing" else f" (got {err.get('input')!r})"
    if len(got) > 80:
        got = got[:77] + "...)"
    more = f" [+{exc.error_count() - 1} more]" if exc.error_count() > 1 else ""
    return ValueError(f"{source}: {loc}: {msg}{got}{more}")
