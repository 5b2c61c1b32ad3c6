"""A user's code named in a config: ``"package.module:function"`` -> the function, and the one
way mpq calls it (``call_user``: what it raises becomes one line naming it)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from typing import Any

DEBUG_ENV = "MPQ_DEBUG"  # set (mpq --debug): a user callable's exception keeps its traceback


def call_user(fn: Callable[..., Any], spec: str, what: str, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, where ``fn`` is the user's ``spec``.

    Raises:
        ValueError: one line, ``model 'pkg.mod:build' raised RuntimeError: boom``, for any
            exception ``fn`` raises (with ``MPQ_DEBUG`` set: the exception itself, traceback
            and all).
    """
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        if os.environ.get(DEBUG_ENV):
            raise
        text = str(exc).strip()
        first = f": {text.splitlines()[0][:300]}" if text else ""
        raise ValueError(
            f"{what} {spec!r} raised {type(exc).__name__}{first} (mpq --debug shows the traceback)"
        ) from None


def load_callable(spec: str, what: str = "callable") -> Callable[..., Any]:
    """Import ``"package.module:function"`` and return the function.

    Modules next to where mpq runs are importable where the CLI (and Ray's workers, through
    their ``PYTHONPATH``) put the current directory on the path, as ``python -m`` does.

    Raises:
        ValueError: one line naming the spec, when it is malformed, does not import, or does
            not name a callable.
    """
    if spec.startswith("lerobot:"):  # a LeRobot policy or dataset folder (lerobot_policy)
        from mpq.evaluators import lerobot_policy

        return lerobot_policy.scheme_callable(spec, what)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{what} {spec!r}: expected 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"{what} {spec!r}: module {module_name!r} does not import ({exc})"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {spec!r}: {attr!r} is not callable")
    return obj  # type: ignore[no-any-return]
