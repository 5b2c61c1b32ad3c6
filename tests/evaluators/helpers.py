"""An evaluator's fields (model, layers, backend, inputs, spec) without loading a task: what
the latency table and the kernel autotune read."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn

from mpq.evaluators.backends import get_backend
from mpq.spaces.discover import discover_layers
from tests.models import example_inputs


def bare_evaluator(model: nn.Module, name: str) -> SimpleNamespace:
    """``model`` (eval mode) on ``onnxruntime``, batch 1, calibrated on its example input."""
    torch.manual_seed(0)
    x = example_inputs(model.eval(), batch=1)
    backend = get_backend("onnxruntime")
    return SimpleNamespace(
        base_backend=backend,
        backend=backend,
        layers=discover_layers(model),
        model=model,
        example_inputs=x,
        calibration=[x],
        spec=SimpleNamespace(
            backend="onnxruntime",
            latency_threads=1,
            latency_runs=3,
            latency_warmup=1,
            latency_visits=2,
            observer="minmax",
            model=name,
            checkpoint=None,
        ),
    )
