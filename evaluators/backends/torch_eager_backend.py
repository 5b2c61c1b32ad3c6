"""The ``torch-eager`` backend: PyTorch's own int8 CPU kernels (FBGEMM / oneDNN), eager mode.

For targets that run the policy in eager PyTorch without a C++ compiler (``torch.compile``
needs one); the ``torch`` backend (torchao kernels under ``torch.compile``) is faster.

- Linear with ``w_bits <= 8``: ``torch.ao.quantization.quantize_dynamic`` (int8 weights, int8
  activations quantized per call). Below 8 bits there is no real CPU kernel in torch, so the
  layer runs at int8 and the fallback is recorded.
- GRU/LSTM/RNN: ``quantize_dynamic`` quantizes a whole recurrent module, so it runs at int8 only
  when every weight of it asks for <= 8 bits; otherwise it runs in float32 (recorded).
- Conv, Embedding, attention input projections and float16 requests run in float32 here (eager
  torch has no dynamic int8 conv kernel); the ``onnxruntime`` backend covers them.

The weights handed to the kernels are the simulated-quantized ones (``evaluators.apply``), so
the lowered model computes what the configuration asked, at the precision that really ran.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import torch
from torch import nn

from mpq.evaluators.apply import quantize_weights_
from mpq.evaluators.backends.base import (
    RECURRENT_KINDS,
    LayerPlan,
    Lowered,
    PlannedBackend,
    register_backend,
)
from mpq.evaluators.inputs import Inputs, call
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, KEEP, LayerChoice, QuantConfig

INT8_DYNAMIC = "int8 dynamic (torch quantize_dynamic)"
FLOAT32 = "float32 (torch eager)"


def _int8_ran(asked: LayerChoice) -> LayerChoice:
    """``quantize_dynamic``: int8 activations per tensor, computed on every call."""
    return asked.model_copy(
        update={"a_bits": 8, "act_mode": "dynamic", "act_granularity": "per_tensor"}
    )


@register_backend("torch-eager")
class TorchEagerBackend(PlannedBackend):
    """PyTorch's own int8 kernels in eager mode (see the module docstring).

    Float kernels run the simulated-quantized weights, so they compute the asked choice; int8
    kernels add per-tensor int8 activations (and requantize the weights at int8).
    """

    def __init__(self, name: str = "torch-eager", device: str = "cpu") -> None:
        self.name = name
        self.device = device

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        if layer.kind == "linear" or layer.kind in RECURRENT_KINDS:
            return (8, 32)
        return (32,)

    def plan_layer(self, layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
        # NOTE: a Linear inside nn.MultiheadAttention (out_proj) is only known from the model
        # (``plan``); with fallback disabled the trial fails with that reason.
        real = layer.kind == "linear" or layer.kind in RECURRENT_KINDS
        if choice.w_bits == KEEP:
            return LayerPlan(FLOAT32, choice)
        if choice.w_bits > INT_BITS_MAX:
            why = f"w{choice.w_bits} -> float32: no eager float16 CPU kernel"
            return LayerPlan(FLOAT32, choice, why)
        if not real:
            why = f"w{choice.w_bits} -> float32: no eager int kernel for {layer.kind}"
            return LayerPlan(FLOAT32, choice, why)
        why = f"w{choice.w_bits} -> int8: no CPU kernel below 8 bits in torch"
        return LayerPlan(INT8_DYNAMIC, _int8_ran(choice), why if choice.w_bits < 8 else None)

    def float_plan(self, layer: LayerInfo, asked: LayerChoice, why: str) -> LayerPlan:
        """Float runs the simulated-quantized weights: the asked choice."""
        return LayerPlan(FLOAT32, asked, f"w{asked.w_bits} -> float32: {why}")

    def lower(
        self,
        model: nn.Module,
        layers: tuple[LayerInfo, ...],
        config: QuantConfig,
        example_inputs: Inputs,
        threads: int = 1,
        calibration: list[tuple[Any, ...]] | None = None,  # dynamic kernels only: unused
        observer: str = "minmax",  # (no static ranges here)
    ) -> Lowered:
        plan = self.plan(model, layers, config)
        lowered = copy.deepcopy(model).eval()
        quantize_weights_(lowered, layers, config)
        modules = {la.module for la in layers if plan.layers[la.name].kernel == INT8_DYNAMIC}
        if modules:
            qconfig = torch.ao.quantization.default_dynamic_qconfig
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantize_dynamic's deprecation notice
                lowered = torch.ao.quantization.quantize_dynamic(
                    lowered, dict.fromkeys(modules, qconfig), dtype=torch.qint8
                )

        def run() -> Any:
            return call(lowered, example_inputs)

        return Lowered(run, lowered, plan)
