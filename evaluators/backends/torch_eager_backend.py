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

import warnings
from typing import Any

import torch
from torch import nn

from mpq.evaluators.apply import quantize_weights_
from mpq.evaluators.backends.base import Lowered, register_backend
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, KEEP, LayerChoice, QuantConfig

INT8_DYNAMIC = "int8 dynamic (torch quantize_dynamic)"
FLOAT32 = "float32 (torch eager)"
_RECURRENT = ("gru", "lstm", "rnn")


def _inside_attention(model: nn.Module, module_name: str) -> bool:
    """MultiheadAttention reads its ``out_proj.weight`` directly, so it cannot be swapped."""
    parent = module_name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent), nn.MultiheadAttention)


@register_backend("torch-eager")
class TorchEagerBackend:
    name = "torch-eager"

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        if layer.kind == "linear" or layer.kind in _RECURRENT:
            return (8, 32)
        return (32,)

    def kernel_for(self, layer: LayerInfo, choice: LayerChoice) -> str:
        """The kernel ``lower()`` runs ``choice`` on (a whole recurrent module must agree)."""
        real = layer.kind == "linear" or layer.kind in _RECURRENT
        return INT8_DYNAMIC if real and choice.w_bits <= INT_BITS_MAX else FLOAT32

    def fallback_reason(self, layer: LayerInfo, choice: LayerChoice) -> str | None:
        # NOTE: a Linear inside nn.MultiheadAttention (out_proj) is only known at lower() time;
        # lower() records it and, with fallback disabled, the trial fails with that reason.
        if choice.w_bits == KEEP:
            return None
        if choice.w_bits > INT_BITS_MAX:
            return f"w{choice.w_bits} -> float32: no eager float16 CPU kernel"
        if layer.kind != "linear" and layer.kind not in _RECURRENT:
            return f"w{choice.w_bits} -> float32: no eager int kernel for {layer.kind}"
        if choice.w_bits < 8:
            return f"w{choice.w_bits} -> int8: no CPU kernel below 8 bits in torch"
        return None

    def lower(
        self,
        model: nn.Module,
        layers: tuple[LayerInfo, ...],
        config: QuantConfig,
        example_inputs: tuple[Any, ...],
        threads: int = 1,
        calibration: list[tuple[Any, ...]] | None = None,  # dynamic kernels only: unused
        observer: str = "minmax",  # (no static ranges here)
    ) -> Lowered:
        import copy

        config.check(layers)
        lowered = copy.deepcopy(model).eval()
        quantize_weights_(lowered, layers, config)
        kernels: dict[str, str] = {}
        fallbacks: dict[str, str] = {}
        modules: set[str] = set()
        by_module: dict[str, list[LayerInfo]] = {}
        for la in layers:
            by_module.setdefault(la.module, []).append(la)
        for module_name, group in by_module.items():
            wants_int = [config.layers[la.name].w_bits <= INT_BITS_MAX for la in group]
            real = (group[0].kind == "linear" and not _inside_attention(model, module_name)) or (
                group[0].kind in _RECURRENT
            )
            runs_int = real and all(wants_int)
            if runs_int:
                modules.add(module_name)
            for la, want in zip(group, wants_int, strict=True):
                bits = config.layers[la.name].w_bits
                kernels[la.name] = INT8_DYNAMIC if runs_int else FLOAT32
                reason = self.fallback_reason(la, config.layers[la.name])
                if want and not runs_int and (reason is None or "-> int8" in reason):
                    # found only here, not from the kind: it runs in float32 after all
                    reason = f"w{bits} -> float32: " + (
                        "a recurrent module quantizes whole; a sibling weight stays float"
                        if real
                        else "nn.MultiheadAttention reads out_proj.weight directly"
                    )
                if reason is not None:
                    fallbacks[la.name] = reason
        if modules:
            qconfig = torch.ao.quantization.default_dynamic_qconfig
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantize_dynamic's deprecation notice
                lowered = torch.ao.quantization.quantize_dynamic(
                    lowered, {m: qconfig for m in modules}, dtype=torch.qint8
                )

        def run() -> Any:
            return lowered(*example_inputs)

        # Float kernels run the simulated-quantized weights, so they compute the asked choice;
        # int8 kernels add per-tensor int8 activations (and requantize the weights at int8).
        ran = {}
        for la in layers:
            asked = config.layers[la.name]
            if kernels[la.name] == INT8_DYNAMIC:
                asked = asked.model_copy(
                    update={"a_bits": 8, "act_mode": "dynamic", "act_granularity": "per_tensor"}
                )
            ran[la.name] = asked
        return Lowered(run, lowered, kernels, fallbacks, QuantConfig(layers=ran))
