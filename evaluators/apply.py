"""Apply a configuration to a model: a new, simulated-quantized model (the original untouched).

Weights are replaced by ``x' = (Q(w) - z) * s`` (the seed's formulas, ``evaluators.quantize``),
or rounded through float16 at 16 bits. Input activations of layers with ``a_bits`` 8 are
quantize-dequantized by a forward pre-hook: with a range calibrated once over calibration
batches (``static``) or computed on every call (``dynamic``); at 16 they round through float16.
Activations are asymmetric (unsigned 8-bit, as ONNX Runtime's and PyTorch's int8 kernels take).

Which input a layer's activation is: a Linear/Conv's input; ``in_proj_weight`` multiplies
query, key and value. A single-layer, one-direction recurrent module with a quantized activation
runs as its two products (``evaluators.recurrent``, equal to the module in float), so ``weight_ih``
quantizes the step's input and ``weight_hh`` the state of every step, and only where the product
reads them (the gates blend the float state), as a low-bit kernel per product computes; any
other recurrent module quantizes the sequence input and the state passed in.
This simulated model is the reference the real kernels (``evaluators.backends``) are checked
against.

Batch semantics: a dynamic per-tensor range is taken per sample (over every axis but the
batch axis), so evaluating N episodes batched gives what N batch-1 evaluations give -- a robot
runs batch 1, and one episode must not set another's scale.

A module whose ``forward`` its parent never calls gets no hook call: ``nn.MultiheadAttention``
multiplies by ``out_proj.weight`` itself. Such an attention is rerouted (``_OutProjCalled``:
attention with an identity output projection -- exact -- then ``out_proj`` called as a module),
and a hooked module that still never runs on the first calibration batch is an error naming
the layer: its activation choice would be measured without being applied.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpq.evaluators.calibrate import make_observer, run_batches
from mpq.evaluators.quantize import (
    choose_qparams,
    fake_quantize_activation,
    fake_quantize_blocks,
    fake_quantize_weight,
    weight_qparams,
)
from mpq.evaluators.recurrent import replace_stepwise, rewritable
from mpq.spaces.discover import LayerInfo, discover_layers
from mpq.spaces.space import ACT_BLOCK, KEEP, QuantConfig


@dataclass
class _InputSpec:
    arg_index: int
    bits: int
    dynamic: bool
    per_token: bool
    observer: Any = None
    per_block: bool = False
    range: tuple[torch.Tensor, torch.Tensor] | None = None


def batch_axis(module: nn.Module, arg_index: int, x: torch.Tensor) -> int | None:
    """The batch axis of input ``arg_index`` of ``module`` (None: an unbatched input).

    Recurrent states are ``(layers, B, H)``; sequences and attention inputs follow
    ``batch_first``; a Conv{n}d input is batched with n + 2 axes; anything else leads with B.
    """
    if isinstance(module, nn.RNNBase):
        if x.dim() != 3:
            return None
        return 1 if arg_index == 1 or not module.batch_first else 0
    if isinstance(module, nn.MultiheadAttention):
        return (0 if module.batch_first else 1) if x.dim() == 3 else None
    if isinstance(module, nn.modules.conv._ConvNd):
        return 0 if x.dim() == len(module.kernel_size) + 2 else None
    if hasattr(module, "_mpq_batch_axis"):  # a rerouted out_proj: its attention's layout
        return module._mpq_batch_axis  # type: ignore[no-any-return]
    return 0 if x.dim() > 1 else None


def _arg_indices(layer: LayerInfo) -> tuple[int, ...]:
    if layer.kind == "attention_in_proj":
        return (0, 1, 2)  # query, key, value
    if layer.kind in ("gru", "lstm", "rnn") and layer.param.startswith("weight_hh"):
        return (1,)  # the state passed in
    return (0,)


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` where ``x`` needs no gradient; else ``x + (quantized - x).detach()``: the
    quantized value forward, the identity backward (the straight-through estimator, for
    quantization-aware training: ``round`` has no gradient)."""
    if not x.requires_grad:
        return quantized
    return x + (quantized - x).detach()


class _InputQuantizer:
    """A forward pre-hook that observes (calibration) or fake-quantizes chosen inputs."""

    def __init__(self) -> None:
        self.specs: list[_InputSpec] = []
        self.calibrating = False
        self.calls = 0

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]):  # type: ignore[no-untyped-def]
        self.calls += 1
        names = ("query", "key", "value") if isinstance(module, nn.MultiheadAttention) else ()
        args_list = list(args)
        for spec in self.specs:
            i = spec.arg_index
            in_args = i < len(args_list)
            x = args_list[i] if in_args else (kwargs.get(names[i]) if i < len(names) else None)
            rest: tuple[Any, ...] | None = None
            if isinstance(x, tuple) and x:  # an LSTM's (h, c): weight_hh multiplies h
                x, rest = x[0], x[1:]
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                continue
            if self.calibrating:
                if spec.observer is not None:
                    spec.observer.update(x)
                continue
            x = straight_through(x, self._quantize(x.detach(), spec, batch_axis(module, i, x)))
            if rest is not None:
                x = (x, *rest)
            if in_args:
                args_list[i] = x
            else:
                kwargs[names[i]] = x
        return tuple(args_list), kwargs

    @staticmethod
    def _quantize(x: torch.Tensor, spec: _InputSpec, axis: int | None) -> torch.Tensor:
        if spec.bits == 16:
            return x.half().to(x.dtype)
        if spec.per_block:
            return fake_quantize_blocks(x, spec.bits, ACT_BLOCK)
        lo, hi = spec.range if spec.range is not None else (None, None)
        return fake_quantize_activation(x, spec.bits, False, lo, hi, spec.per_token, axis)


class _OutProjCalled(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` that calls ``out_proj`` as a module, so its hooks run.

    The attention runs with an identity output projection (``y = x I^T + 0``: every product but
    one is an exact zero, so ``y == x`` bit for bit), then ``out_proj`` is applied by calling it.
    """

    def forward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        proj = self.out_proj
        weight, bias = proj._parameters["weight"], proj._parameters["bias"]
        eye = torch.eye(weight.shape[1], dtype=weight.dtype, device=weight.device)
        proj._parameters["weight"] = nn.Parameter(eye, requires_grad=False)
        proj._parameters["bias"] = (
            None if bias is None else nn.Parameter(torch.zeros_like(bias), requires_grad=False)
        )
        try:
            attended, weights = super().forward(*args, **kwargs)
        finally:
            proj._parameters["weight"], proj._parameters["bias"] = weight, bias
        # out_proj sees (B, L, E) batch first, (L, B, E) otherwise, (L, E) unbatched
        batched = attended.dim() == 3
        proj._mpq_batch_axis = (0 if self.batch_first else 1) if batched else None
        return proj(attended), weights


def _reroute_out_proj(model: nn.Module, module_name: str) -> None:
    """Make the attention owning ``module_name`` (an ``out_proj``) call it through forward."""
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child == "out_proj" and type(parent) is nn.MultiheadAttention:
        parent.__class__ = _OutProjCalled


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


class _OutputQuantizer:
    """A forward hook that observes (calibration) or fake-quantizes a layer's output with a
    static range: ``out_bits`` 8, what ``QLinearConv`` does (its output is uint8)."""

    def __init__(self, bits: int, observer: Any) -> None:
        self.bits = bits
        self.observer = observer
        self.range: tuple[torch.Tensor, torch.Tensor] | None = None
        self.calibrating = False

    def __call__(self, module: nn.Module, args: Any, out: Any) -> Any:
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        if self.calibrating:
            self.observer.update(out)
            return out
        lo, hi = self.range if self.range is not None else (None, None)
        return straight_through(
            out, fake_quantize_activation(out.detach(), self.bits, False, lo, hi)
        )


@dataclass
class _Instrumented:
    model: nn.Module
    inputs: dict[str, _InputQuantizer]  # module name -> its input hook
    outputs: dict[str, _OutputQuantizer]  # module name -> its output hook


def _instrument(
    model: nn.Module,
    config: QuantConfig,
    observer: str,
    layers: tuple[LayerInfo, ...],
    quantize_weights: bool,
) -> _Instrumented:
    qmodel = copy.deepcopy(model).eval()
    if quantize_weights:
        quantize_weights_(qmodel, layers, config)
    qmodel, products = _recurrent_products(qmodel, layers, config)
    hooks: dict[str, _InputQuantizer] = {}
    outs: dict[str, _OutputQuantizer] = {}
    for layer in layers:
        c = config.layers[layer.name]
        if c.out_bits != KEEP:
            outs[layer.module] = _OutputQuantizer(c.out_bits, make_observer(observer, c.out_bits))
        if c.a_bits == KEEP:
            continue
        module = products.get(layer.name, layer.module)
        hook = hooks.setdefault(module, _InputQuantizer())
        static = c.a_bits <= 8 and c.act_mode == "static"
        per_token, per_block = c.act_granularity == "per_token", c.act_granularity == "per_block"
        for i in (0,) if layer.name in products else _arg_indices(layer):
            obs = make_observer(observer, c.a_bits) if static else None
            hook.specs.append(
                _InputSpec(i, c.a_bits, not static, per_token, obs, per_block=per_block)
            )
    for module_name, hook in hooks.items():
        _reroute_out_proj(qmodel, module_name)
        qmodel.get_submodule(module_name).register_forward_pre_hook(hook, with_kwargs=True)
    for module_name, out in outs.items():
        qmodel.get_submodule(module_name).register_forward_hook(out)
    return _Instrumented(qmodel, hooks, outs)


def _recurrent_products(
    qmodel: nn.Module, layers: tuple[LayerInfo, ...], config: QuantConfig
) -> tuple[nn.Module, dict[str, str]]:
    """Each rewritable recurrent module with a quantized activation becomes a
    ``StepwiseRecurrent`` (its weights as quantized; in place, or the model itself where it is
    one). Returns the model and, per such layer, the product module whose input is that
    layer's activation: its own name (``memory_gru.weight_hh_l0``)."""
    modules = {
        la.module
        for la in layers
        if la.kind in ("gru", "lstm", "rnn")
        and config.layers[la.name].a_bits != KEEP
        and rewritable(qmodel.get_submodule(la.module)) is None
    }
    qmodel = replace_stepwise(qmodel, modules)
    return qmodel, {la.name: la.name for la in layers if la.module in modules}


def _calibrate(
    inst: _Instrumented, calibration: Iterable[Any] | None, layers: tuple[LayerInfo, ...]
) -> None:
    """Observe static ranges over ``calibration`` (and check every input hook runs)."""
    hooks, outs = inst.inputs, inst.outputs
    static_specs = [s for h in hooks.values() for s in h.specs if s.observer is not None]
    if (static_specs or outs) and calibration is None:
        raise ValueError("static activations need calibration data (got none)")
    if not (hooks or outs) or calibration is None:
        return
    batches = calibration if static_specs or outs else list(itertools.islice(calibration, 1))
    observers = [*hooks.values(), *outs.values()]
    for h in observers:
        h.calibrating = True
    try:
        run_batches(inst.model, batches)
    finally:
        for h in observers:
            h.calibrating = False
    _check_hooks_ran(hooks, layers)
    for s in static_specs:
        # An input never seen in calibration (a recurrent layer called without a state)
        # keeps no range; should it ever arrive it is quantized dynamically.
        s.range = s.observer.range() if s.observer.samples else None
        s.observer = None
    for o in outs.values():
        o.range = o.observer.range() if o.observer.samples else None


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
    inst = _instrument(model, config, observer, layers, quantize_weights)
    _calibrate(inst, calibration, layers)
    _int32_biases(model, inst, config, layers)
    return inst.model


def _int32_biases(
    model: nn.Module, inst: _Instrumented, config: QuantConfig, layers: tuple[LayerInfo, ...]
) -> None:
    """In place: the bias of each static int8 convolution (``out_bits`` 8, what
    ``QLinearConv`` runs) as that kernel adds it, an int32 at the scale of its products:
    ``b' = round(b / (s_x s_w)) s_x s_w`` per output channel, ``s_x`` the input's static uint8
    scale and ``s_w`` the weight's int8 scale (the notes' formulas). One code of difference in
    an output near a rounding boundary otherwise moves what follows: in a loop (a diffusion
    policy's denoising steps) it grew to 5-8% of the output."""
    for la in layers:
        c = config.layers[la.name]
        module = inst.model.get_submodule(la.module)
        bias = getattr(module, "bias", None)
        spec = inst.inputs.get(la.module)
        qlinearconv = la.kind in ("conv1d", "conv2d") and c.out_bits == 8 and c.w_bits == 8
        if not qlinearconv or not isinstance(bias, torch.Tensor) or spec is None:
            continue
        if spec.specs[0].range is None:
            continue
        lo, hi = spec.specs[0].range
        s_x = choose_qparams(torch.as_tensor(lo), torch.as_tensor(hi), 8, symmetric=False).scale
        weight = getattr(model.get_submodule(la.module), la.param).detach()
        _, qp = weight_qparams(weight.float(), 8, "per_channel", None, symmetric=True)
        scale = s_x.float() * qp.scale.reshape(-1).float()  # float32, as the kernel's
        with torch.no_grad():
            bias.copy_((torch.round(bias.float() / scale) * scale).to(bias.dtype))


def static_ranges(
    model: nn.Module,
    config: QuantConfig,
    calibration: Iterable[Any],
    observer: str = "minmax",
    layers: tuple[LayerInfo, ...] | None = None,
) -> dict[str, dict[str, tuple[float, float]]]:
    """The calibrated static ranges of the simulated model of ``config``: module name ->
    ``{"input": (lo, hi), "output": (lo, hi)}`` where calibrated (a backend that runs static
    int8 kernels takes these, so its ranges are the simulated model's)."""
    layers = layers if layers is not None else discover_layers(model)
    config.check(layers)
    inst = _instrument(model, config, observer, layers, quantize_weights=True)
    _calibrate(inst, calibration, layers)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for name, hook in inst.inputs.items():
        spec = hook.specs[0]
        if spec.range is not None:
            out.setdefault(name, {})["input"] = (float(spec.range[0]), float(spec.range[1]))
    for name, o in inst.outputs.items():
        if o.range is not None:
            out.setdefault(name, {})["output"] = (float(o.range[0]), float(o.range[1]))
    return out


def _check_hooks_ran(hooks: dict[str, _InputQuantizer], layers: tuple[LayerInfo, ...]) -> None:
    """Raise ``ValueError`` for a layer whose activation hook never ran on calibration data."""
    for name, hook in hooks.items():
        if hook.calls == 0:
            layer = next(la.name for la in layers if name in (la.module, la.name))
            raise ValueError(
                f"layer {layer!r}: its module is never called through forward on the "
                "calibration data (its parent reads the weight directly, or the branch is "
                "unused), so its a_bits cannot be applied; give it a_bits: 32"
            )
