"""The output(s) of a model that matter: ``output: logits`` in a config.

A model may return a tensor, a tuple, a mapping (``transformers``' ``ModelOutput`` is one), a
dataclass or a named tuple, nested. ``output`` says what the task, the proxy, QAT and the
exported graph read:

- a path of keys, attributes or indices: ``logits``, ``0``, ``action.mean``;
- a list of paths: a tuple of those, in that order;
- ``module:function``: called with the model's output, returns a tensor or a tuple of them.

It is applied as a forward hook on the model itself (``select_output``), so every copy of it
(the simulated model, the QAT shadow, the exported graph, the lowered module) returns the same
thing and no module is renamed: the space's layer names stay the model's own. Without it the
proxy reads the first tensor (``logits`` of a mapping) and the graph exports every tensor.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mpq.evaluators.callables import call_user, load_callable

OutputSpec = str | tuple[str, ...]


def describe(output: Any) -> str:
    """What a model returned, in a few words: ``CausalLMOutput(logits, past_key_values)``."""
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    name = type(output).__name__
    keys = choices(output)
    return f"{name}({', '.join(keys)})" if keys else name


def choices(output: Any) -> list[str]:
    """The names one step of a path may take on ``output``: keys, fields or indices."""
    if isinstance(output, Mapping):
        return [str(k) for k in output]
    if isinstance(output, tuple) and hasattr(output, "_fields"):
        return list(output._fields)
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        return [f.name for f in dataclasses.fields(output)]
    if isinstance(output, tuple | list):
        return [str(i) for i in range(len(output))]
    return []


def pick(output: Any, path: str) -> Any:
    """The value at ``path`` (dot-separated keys, fields or indices) of ``output``; a mapping's
    key may hold dots itself (``observation.state``): the longest key that matches is taken.

    Raises:
        ValueError: a step is not there; the message says what the model returned and what
            the path may name instead.
    """
    here, parts, i = output, path.split("."), 0
    while i < len(parts):
        part = parts[i]
        if isinstance(here, Mapping):
            keys = [j for j in range(len(parts), i, -1) if ".".join(parts[i:j]) in here]
            if not keys:
                raise ValueError(_missing(path, part, here, output))
            here, i = here[".".join(parts[i : keys[0]])], keys[0]
            continue
        if isinstance(here, tuple | list) and re.fullmatch(r"-?\d+", part):
            if not -len(here) <= int(part) < len(here):
                raise ValueError(_missing(path, part, here, output))
            here = here[int(part)]
        elif part in choices(here):
            here = getattr(here, part)
        else:
            raise ValueError(_missing(path, part, here, output))
        i += 1
    return here


def _missing(path: str, part: str, here: Any, output: Any) -> str:
    options = choices(here)
    hint = f"one of {', '.join(options)}" if options else "a path to a tensor"
    where = "" if here is output else f" (at {part!r}: {describe(here)})"
    return (
        f"output {path!r}: the model returned {describe(output)}{where}, with no {part!r}; "
        f"set output to {hint}"
    )


class OutputSelector:
    """A forward hook returning the output(s) that matter (plain data: pickles to workers and
    deep-copies with the model)."""

    def __init__(self, spec: OutputSpec) -> None:
        self.spec = spec

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(self.spec, tuple):
            return tuple(_tensor(pick(output, p), p, output) for p in self.spec)
        if ":" in self.spec:
            fn = load_callable(self.spec, "output")
            return call_user(fn, self.spec, "output", output)
        return _tensor(pick(output, self.spec), self.spec, output)


def _tensor(value: Any, path: str, output: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(
            f"output {path!r} is {describe(value)}, not a tensor (the model returned "
            f"{describe(output)}); set output to a path down to a tensor"
        )
    return value


def select_output(model: nn.Module, spec: OutputSpec | None) -> nn.Module:
    """In place: ``model`` returns what ``spec`` names (nothing changes for None)."""
    if spec is not None:
        model.register_forward_hook(OutputSelector(spec))
    return model
