"""A model's inputs: positional (a tuple) or keyword (a mapping of names to tensors).

Example inputs and calibration batches may be either: ``(image, instruction)`` for a policy
whose ``forward`` takes positions, ``{"input_ids": ids, "attention_mask": mask}`` for a
``transformers`` model whose ``forward`` is called with keywords (GPT-2 needs its attention
mask to export: without it the mask is built with ``aten::diff``, which ONNX cannot trace).
The exported graph's inputs carry the mapping's names, or ``input_0``, ``input_1``, ...
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

Inputs = tuple[Any, ...] | dict[str, Any]


def as_inputs(batch: Any) -> Inputs:
    """A mapping stays a mapping (in its order); a tuple or list becomes a tuple; anything
    else is one positional input.

    Raises:
        ValueError: a mapping whose keys are not all names (strings).
    """
    if isinstance(batch, dict):
        bad = [k for k in batch if not isinstance(k, str)]
        if bad:
            raise ValueError(f"keyword inputs must be named by strings, got keys {bad[:3]}")
        return dict(batch)
    return tuple(batch) if isinstance(batch, tuple | list) else (batch,)


def call(model: nn.Module | Any, inputs: Inputs) -> Any:
    """``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple."""
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def input_names(inputs: Inputs) -> list[str]:
    """The exported graph's input names: the mapping's keys, or ``input_0``, ``input_1``..."""
    return list(inputs) if isinstance(inputs, dict) else [f"input_{i}" for i in range(len(inputs))]


def values(inputs: Inputs) -> list[Any]:
    return list(inputs.values()) if isinstance(inputs, dict) else list(inputs)


def input_feeds(inputs: Inputs, wanted: set[str] | None = None) -> dict[str, np.ndarray]:
    """ONNX Runtime feeds under the exported names, those in ``wanted`` (the graph's inputs:
    an input the graph does not read is dropped by the exporter)."""
    out = {}
    for name, x in zip(input_names(inputs), values(inputs), strict=True):
        if wanted is None or name in wanted:
            out[name] = np.asarray(x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
    return out


def session_feeds(session: Any, inputs: Inputs) -> dict[str, np.ndarray]:
    """``input_feeds`` for the inputs an ONNX Runtime ``session`` reads."""
    return input_feeds(inputs, {i.name for i in session.get_inputs()})


def to_device(inputs: Inputs, device: str | torch.device) -> Inputs:
    def move(x: Any) -> Any:
        return x.to(device) if isinstance(x, torch.Tensor) else x

    if isinstance(inputs, dict):
        return {k: move(v) for k, v in inputs.items()}
    return tuple(move(x) for x in inputs)
