"""Apply a configuration to a model: a new, simulated-quantized model (the original untouched).

Weights are replaced by ``x' = (Q(w) - z) * s`` (the seed's formulas, ``evaluators.quantize``),
or rounded through float16 at 16 bits. Input activations of layers with ``a_bits`` 8 are
quantize-dequantized by a forward pre-hook: with a range calibrated once over calibration
batches (``static``) or computed on every call (``dynamic``); at 16 they round through float16.
Activations are asymmetric (unsigned 8-bit, as ONNX Runtime's and PyTorch's int8 kernels take).

Which input a layer's activation is: a Linear/Conv's input; a recurrent layer's ``weight_ih``
multiplies the sequence input, its ``weight_hh`` the state passed in (exact for a policy run one
control step at a time, as robots run them); ``in_proj_weight`` multiplies query, key and value.
This simulated model is the reference the real kernels (``evaluators.backends``) are checked
against.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpq.evaluators.calibrate import make_observer, run_batches
from mpq.evaluators.quantize import fake_quantize_activation, fake_quantize_weight
from mpq.spaces.discover import LayerInfo, discover_layers
from mpq.spaces.space import KEEP, QuantConfig


@dataclass
class _InputSpec:
    arg_index: int
    bits: int
    dynamic: bool
    per_token: bool
    observer: Any = None
    range: tuple[torch.Tensor, torch.Tensor] | None = None


def _arg_indices(layer: LayerInfo) -> tuple[int, ...]:
    if layer.kind == "attention_in_proj":
        return (0, 1, 2)  # query, key, value
    if layer.kind in ("gru", "lstm", "rnn") and layer.param.startswith("weight_hh"):
        return (1,)  # the state passed in
    return (0,)


class _InputQuantizer:
    """A forward pre-hook that observes (calibration) or fake-quantizes chosen inputs."""

    def __init__(self) -> None:
        self.specs: list[_InputSpec] = []
        self.calibrating = False

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):  # type: ignore[no-untyped-def]
        names = ("query", "key", "value") if isinstance(module, nn.MultiheadAttention) else ()
        args_list = list(args)
        for spec in self.specs:
            i = spec.arg_index
            in_args = i < len(args_list)
            x = args_list[i] if in_args else (kwargs.get(names[i]) if i < len(names) else None)
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                continue
            if self.calibrating:
                if spec.observer is not None:
                    spec.observer.update(x)
                continue
            x = self._quantize(x, spec)
            if in_args:
                args_list[i] = x
            else:
                kwargs[names[i]] = x
        return tuple(args_list), kwargs

    @staticmethod
    def _quantize(x: torch.Tensor, spec: _InputSpec) -> torch.Tensor:
        if spec.bits == 16:
            return x.half().to(x.dtype)
        lo, hi = spec.range if spec.range is not None else (None, None)
        return fake_quantize_activation(x, spec.bits, False, lo, hi, spec.per_token)


def _get_param(model: nn.Module, layer: LayerInfo) -> nn.Parameter:
    module = model.get_submodule(layer.module)
    return getattr(module, layer.param)  # type: ignore[no-any-return]


def quantize_weights_(
    model: nn.Module, layers: tuple[LayerInfo, ...], config: QuantConfig
) -> None:
    """In place: every layer's weight becomes its simulated-quantized value."""
    with torch.no_grad():
        for layer in layers:
            c = config.layers[layer.name]
            param = _get_param(model, layer)
            if c.w_bits == KEEP:
                continue
            if c.w_bits == 16:
                param.copy_(param.half().to(param.dtype))
            else:
                param.copy_(
                    fake_quantize_weight(param, c.w_bits, c.granularity, c.group_size, c.symmetric)
                )


def apply_config(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[Any] | None = None,
    observer: str = "minmax",
    layers: tuple[LayerInfo, ...] | None = None,
    quantize_weights: bool = True,
) -> nn.Module:
    """A deep copy of ``model`` with ``config`` applied (see the module docstring).

    Args:
        calibration: batches of model inputs; required when any layer has static activations.
        observer: ``minmax`` (the notes), ``percentile`` or ``mse`` (``evaluators.calibrate``).
        quantize_weights: False when the weights already hold quantized values (an exported
            artifact), so only the activation quantization is attached.

    Raises:
        ValueError: the config does not fit the model, or static activations get no (or
            non-finite) calibration data.
    """
    layers = layers if layers is not None else discover_layers(model)
    config.check(layers)
    qmodel = copy.deepcopy(model).eval()
    if quantize_weights:
        quantize_weights_(qmodel, layers, config)
    hooks: dict[str, _InputQuantizer] = {}
    for layer in layers:
        c = config.layers[layer.name]
        if c.a_bits == KEEP:
            continue
        hook = hooks.setdefault(layer.module, _InputQuantizer())
        static = c.a_bits <= 8 and c.act_mode == "static"
        for i in _arg_indices(layer):
            obs = make_observer(observer, c.a_bits) if static else None
            hook.specs.append(
                _InputSpec(i, c.a_bits, not static, c.act_granularity == "per_token", obs)
            )
    for module_name, hook in hooks.items():
        qmodel.get_submodule(module_name).register_forward_pre_hook(hook, with_kwargs=True)
    static_specs = [s for h in hooks.values() for s in h.specs if s.observer is not None]
    if static_specs:
        if calibration is None:
            raise ValueError("static activations need calibration data (got none)")
        for h in hooks.values():
            h.calibrating = True
        try:
            run_batches(qmodel, calibration)
        finally:
            for h in hooks.values():
                h.calibrating = False
        for s in static_specs:
            # An input never seen in calibration (a recurrent layer called without a state)
            # keeps no range; should it ever arrive it is quantized dynamically.
            seen = bool(s.observer.samples)
            s.range = s.observer.range() if seen else None
            s.observer = None
    return qmodel
