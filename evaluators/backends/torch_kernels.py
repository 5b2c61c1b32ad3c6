"""The ``torch`` backend's kernels: torchao's layouts, their exact bytes, the int8 probe, and
one handler per kernel (``HANDLERS``, by kernel name) that swaps a layer's module for it.

See ``torch_backend.py`` for which choice runs on which kernel.
"""

from __future__ import annotations

import functools
import itertools
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpq.evaluators.size import layer_size_bytes, persistent_buffers
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import LayerChoice

INT8_DYNAMIC = "int8 x int8 dynamic per-token (torchao, inductor)"
FLOAT8_DYNAMIC = "float8 e4m3 dynamic per-row (torchao, inductor)"
INT4_WEIGHT_ONLY = "int4 weight-only g32, bf16 activations (torchao, inductor)"
INT8_WEIGHT_ONLY = "int8 weight-only (torchao, inductor)"
BFLOAT16 = "bfloat16 (inductor)"
RNN_INT8 = "int8 dynamic (torch quantize_dynamic)"
FLOAT32 = "float32 (inductor)"
INT4_GROUP = 32

RAN = {
    INT8_DYNAMIC: LayerChoice(w_bits=8, a_bits=8, act_granularity="per_token"),
    FLOAT8_DYNAMIC: LayerChoice(w_bits=8, a_bits=8, act_granularity="per_token"),
    INT4_WEIGHT_ONLY: LayerChoice(
        w_bits=4, a_bits=16, granularity="per_group", group_size=INT4_GROUP, symmetric=False
    ),
    INT8_WEIGHT_ONLY: LayerChoice(w_bits=8),
    BFLOAT16: LayerChoice(w_bits=16, a_bits=16),
    RNN_INT8: LayerChoice(w_bits=8, a_bits=8, granularity="per_tensor"),
    FLOAT32: LayerChoice(),
}


def dims_divisible(layer: LayerInfo, multiple: int) -> bool:
    """CUDA's int8 ``_int_mm`` (cuBLAS) wants K and N in multiples of 8, float8's
    ``_scaled_mm`` multiples of 16 (torchao leaves a float8 weight that doesn't fit in bf16,
    silently: so the plan never asks for it)."""
    return layer.reduction_size % multiple == 0 and layer.shape[0] % multiple == 0


class _PadRows(nn.Module):
    """int8 x int8 on few rows: the flattened rows are zero-padded to ``min_rows`` (a multiple of
    8) and cut after. cuBLAS's ``_int_mm`` refuses 16 rows or fewer; oneDNN's int8 matmul on an
    AMX CPU (the kernel Inductor's freezing picks) falls back to its reference loop for one row
    and fewer than ~512 outputs -- 32 ms instead of 0.2 for the shipped policy's 3136 -> 256
    layer at batch 1. Zero rows quantize per token on their own: the real rows are unchanged.
    """

    def __init__(self, inner: nn.Module, min_rows: int) -> None:
        super().__init__()
        self.inner = inner
        self.min_rows = min_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        n = rows.shape[0]
        padded = max(self.min_rows, _round_up(n, 8))
        y = self.inner(nn.functional.pad(rows, (0, 0, 0, padded - n)))[:n]
        return y.reshape(*x.shape[:-1], y.shape[-1])


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def int4_layout(layer: LayerInfo, device: str) -> tuple[int, int] | None:
    """``(rows, K)`` the int4 kernel stores for ``layer`` on ``device``; None where it doesn't fit.

    CPU (``Int4OpaqueTensor``): groups of 32 along K and tiles of 16 rows, nothing padded, so
    K % 32 == 0 and N % 16 == 0. CUDA (tinygemm, ``Int4TilePackedTo4dTensor``): K % 32 == 0
    (the notes' groups are the kernel's), K padded up to a multiple of 1024 and N to 8 -- a
    384-wide layer stores 1024 columns -- so int4 is used only where the padded weight is
    smaller than int8's (and the GPU has tensor cores), else int8.
    """
    rows, k = layer.shape[0], layer.reduction_size
    if device == "cpu":
        fits = k % INT4_GROUP == 0 and rows % 16 == 0
        return (rows, k) if fits else None
    padded = _round_up(rows, 8), _round_up(k, 1024)
    smaller = _int4_bytes(*padded) < packed_layer_bytes(layer, INT8_WEIGHT_ONLY)
    return padded if smaller and k % INT4_GROUP == 0 and _tensor_cores() else None


def _tensor_cores() -> bool:
    """tinygemm's int4 kernels need compute capability >= 8.0 (torchao's ``from_hp`` refuses
    less); planned without a GPU, a modern one is assumed."""
    return not torch.cuda.is_available() or torch.cuda.get_device_capability() >= (8, 0)


def _int4_bytes(rows: int, k: int) -> int:
    """Packed pairs, and a bfloat16 scale and zero point per group of 32: 0.625 bytes a weight."""
    return rows * k // 2 + 4 * rows * k // INT4_GROUP


class _CastLinear(nn.Module):
    """``inner`` (bias-free Linear in bfloat16 or int4) on bfloat16 input; float32 out + bias.

    The bias stays float32, added after the cast back, as the float model adds it.
    """

    def __init__(self, inner: nn.Linear, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.inner = inner
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x.to(torch.bfloat16)).to(x.dtype)
        return y if self.bias is None else y + self.bias


def _cast_linear(linear: nn.Linear, config: Any) -> _CastLinear:
    from torchao.quantization import quantize_

    inner = nn.Linear(linear.in_features, linear.out_features, bias=False)
    inner = inner.to(device=linear.weight.device, dtype=torch.bfloat16)
    with torch.no_grad():
        inner.weight.copy_(linear.weight)
    if config is not None:
        quantize_(inner, config)
    return _CastLinear(inner, linear.bias)


def tensor_bytes(t: torch.Tensor) -> int:
    """Data bytes of a tensor; a torchao tensor subclass counts the tensors it holds."""
    if hasattr(t, "__tensor_flatten__") and type(t) not in (torch.Tensor, nn.Parameter):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    if t.is_quantized:  # data, then its float64 scale and int64 zero point
        return t.int_repr().nbytes + 16
    return t.nbytes


def stored_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer the lowered module holds (shared ones
    once; a non-persistent buffer is made at construction, not stored), with the packed weights
    of ``quantize_dynamic`` recurrent modules."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *(b for _, b in persistent_buffers(module))]:
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    for m in module.modules():
        if hasattr(m, "_all_weight_values") and hasattr(m, "_weight_bias"):
            for group in m._weight_bias().values():
                total += sum(tensor_bytes(t) for t in group.values())
    return total


def packed_layer_bytes(layer: LayerInfo, kernel: str, device: str = "cpu") -> int:
    """Bytes a kernel stores for one layer's weight (N rows, K = reduction size, n = N K)::

    int8 (torchao):  n + 4 N + N    int8 data, a float32 scale and an int8 zero point a row
    float8:          n + 4 N        e4m3 data, a float32 scale a row
    int4 g32:        Np Kp / 2 + 4 Np Kp / 32   packed pairs, bfloat16 scale and zero a group,
                     of the shape ``int4_layout`` pads to (CUDA pads; the CPU does not)
    bfloat16:        2 n
    quantize_dynamic RNN weight: n + 16   int8 data, float64 scale, int64 zero point
    """
    n, rows = layer.num_params, layer.shape[0]
    if kernel in (INT8_DYNAMIC, INT8_WEIGHT_ONLY):
        return n + 5 * rows
    if kernel == FLOAT8_DYNAMIC:
        return n + 4 * rows
    if kernel == INT4_WEIGHT_ONLY:
        layout = int4_layout(layer, device)
        if layout is None:
            raise ValueError(f"layer {layer.name!r}: no int4 layout on {device}")
        return _int4_bytes(*layout)
    if kernel == BFLOAT16:
        return 2 * n
    if kernel == RNN_INT8:
        return n + 16
    return layer_size_bytes(layer, LayerChoice())


@functools.cache
def int8_dynamic_exact() -> bool:
    """Whether the CPU's int8 x int8 kernel (what Inductor's freezing lowers torchao's dynamic
    int8 Linear to: oneDNN ``qlinear_pointwise``) computes exactly, in this process.

    Probed, not guessed from the CPU's flags: activations and weights at the top of their range
    (``x_q = 127``, shifted to ``u8 = 255``; ``w_q = 127``) make every ``u8 x s8`` pair overflow
    16 bits where the kernel sums pairs there (AVX2 and AVX-512 without VNNI), and compiled must
    equal eager (``_int_mm``: exact integer sums). A probe that fails to run counts as inexact.
    Once per process (one small compile), under the ISA caps of its environment
    (``ONEDNN_MAX_CPU_ISA``).
    """
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    linear = nn.Linear(64, 16, bias=False)
    with torch.no_grad():
        linear.weight.fill_(0.5)
    quantize_(linear, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
    x = torch.ones(8, 64)
    try:
        with torch.inference_mode():
            exact = linear(x)  # eager ``_int_mm``: exact integer sums
            compiled = torch.compile(fresh_entry(linear))
            with torch._inductor.config.patch(freezing=True):
                got = compiled(x)
    except Exception as exc:  # noqa: BLE001  a kernel that does not even run is not exact
        warnings.warn(
            f"int8 x int8 probe failed ({exc!s:.200}): weight-only kernels run", stacklevel=2
        )
        return False
    return bool(torch.allclose(got, exact, rtol=1e-3, atol=0.0))


def fresh_entry(module: nn.Module, counter: itertools.count = itertools.count()) -> Any:  # noqa: B008
    """``module(*args, **kwargs)`` as a function with a code object of its own (Dynamo's cache
    key); keyword inputs (a ``transformers`` model's) pass through."""

    def entry(*args: Any, **kwargs: Any) -> Any:
        return module(*args, **kwargs)

    code = entry.__code__.replace(co_name=f"mpq_lowered_{next(counter)}")
    return types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)


@dataclass
class LowerContext:
    """What the handlers of one lowering share: the device, and the recurrent modules that
    ``quantize_dynamic`` converts in one pass after the per-layer handlers."""

    device: torch.device
    rnn_modules: set[str] = field(default_factory=set)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


Handler = Callable[[nn.Module, LayerInfo, LowerContext], None]
HANDLERS: dict[str, Handler] = {}


def handles(*kernels: str) -> Callable[[Handler], Handler]:
    """Register a handler for ``kernels`` (torchao's config-type -> handler registry, by name)."""

    def wrap(fn: Handler) -> Handler:
        for kernel in kernels:
            HANDLERS[kernel] = fn
        return fn

    return wrap


@handles(INT8_DYNAMIC)
def _int8_dynamic(lowered: nn.Module, la: LayerInfo, ctx: LowerContext) -> None:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    config = Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)
    quantize_(lowered, config, filter_fn=_named(la.module))
    inner = lowered.get_submodule(la.module)
    _replace(lowered, la.module, _PadRows(inner, 24 if ctx.cuda else 8))


@handles(INT8_WEIGHT_ONLY)
def _int8_weight_only(lowered: nn.Module, la: LayerInfo, ctx: LowerContext) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(
        lowered, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=_named(la.module)
    )


@handles(BFLOAT16)
def _bfloat16(lowered: nn.Module, la: LayerInfo, ctx: LowerContext) -> None:
    _replace(lowered, la.module, _cast_linear(lowered.get_submodule(la.module), None))


def notes_int4_weight(weight: torch.Tensor) -> Any:
    """The int4 kernel's weight holding the design notes' codes: CPU ``Int4OpaqueTensor``, CUDA
    tinygemm ``Int4TilePackedTo4dTensor`` (on ``weight``'s device).

    ``Q = clamp(round(w / s) + z, 0, 15)``, ``s = (max - min) / 15``, ``z = round(-min / s)``
    per group of 32 (``RAN[INT4_WEIGHT_ONLY]``: asymmetric; ``quantize.choose_qparams``, which
    widens the range to hold 0 and clamps ``z`` to [0, 15], as the simulated model does).
    tinygemm (both devices) dequantizes ``(Q - 8) s + zero`` with its zero point in the float
    domain, so ``zero = (8 - z) s`` gives ``(Q - z) s``, the notes' ``x'``; scale and zero are
    stored in bfloat16, as the kernel reads them (with its bfloat16 output, under ``s / 8``
    from ``x'``). torchao's own choice (``from_hp``) takes the group's min and max as the
    grid's ends with an unrounded zero: up to ``s / 2`` from ``x'``, which put a lowered 4-bit
    model 0.11-0.17 of its output scale off the simulated one.

    CUDA pads K to a multiple of 1024 and N to 8 (``int4_layout``): padded codes are 8 with
    scale 1 and zero 0, so they dequantize to 0 (and meet zero-padded activations anyway).
    """
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    from mpq.evaluators.quantize import quantize, weight_qparams

    rows, k = weight.shape
    grouped, qp = weight_qparams(weight, 4, "per_group", INT4_GROUP, symmetric=False)
    codes = quantize(grouped, qp).reshape(weight.shape).to(torch.int32)
    scale = qp.scale.reshape(rows, -1)
    zero = ((8 - qp.zero_point) * qp.scale).reshape(rows, -1)
    bf16 = torch.bfloat16
    if weight.device.type != "cuda":
        from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor

        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale_and_zero = pack_tinygemm_scales_and_zeros(scale.to(bf16), zero.to(bf16), bf16)
        return Int4OpaqueTensor(packed, scale_and_zero, [1, INT4_GROUP], weight.shape)
    from torchao.quantization import Int4TilePackedTo4dTensor

    pad_rows, pad_k = _round_up(rows, 8) - rows, _round_up(k, 1024) - k
    codes = nn.functional.pad(codes, (0, pad_k, 0, pad_rows), value=8)
    groups = (0, pad_k // INT4_GROUP, 0, pad_rows)
    scale = nn.functional.pad(scale, groups, value=1.0)
    zero = nn.functional.pad(zero, groups, value=0.0)
    pairs = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack(pairs, 8)  # inner_k_tiles, torchao's
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale.to(bf16), zero.to(bf16), bf16)
    return Int4TilePackedTo4dTensor(packed, scale_and_zero, [1, INT4_GROUP], weight.shape)


@handles(INT4_WEIGHT_ONLY)
def _int4_weight_only(lowered: nn.Module, la: LayerInfo, ctx: LowerContext) -> None:
    """The notes' codes in the device's tinygemm layout (``notes_int4_weight``)."""
    linear = lowered.get_submodule(la.module)
    cast = _cast_linear(linear, None)
    weight = notes_int4_weight(linear.weight.detach())
    cast.inner.weight = nn.Parameter(weight, requires_grad=False)
    _replace(lowered, la.module, cast)


@handles(FLOAT8_DYNAMIC)
def _float8_dynamic(lowered: nn.Module, la: LayerInfo, ctx: LowerContext) -> None:
    """float8 rowwise scaled matmuls take bfloat16 activations."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    config = Float8DynamicActivationFloat8WeightConfig(
        granularity=PerRow(), set_inductor_config=False
    )
    _replace(lowered, la.module, _cast_linear(lowered.get_submodule(la.module), config))


@handles(RNN_INT8)
def _rnn_int8(lowered: nn.Module, la: LayerInfo, ctx: LowerContext) -> None:
    ctx.rnn_modules.add(la.module)  # converted whole, after every layer: ``finish_rnn``


@handles(FLOAT32)
def _float32(lowered: nn.Module, la: LayerInfo, ctx: LowerContext) -> None:
    """Nothing to swap: the float module runs."""


def finish_rnn(lowered: nn.Module, ctx: LowerContext) -> nn.Module:
    """``quantize_dynamic`` on the recurrent modules the handlers collected."""
    if not ctx.rnn_modules:
        return lowered
    qconfig = torch.ao.quantization.default_dynamic_qconfig
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantize_dynamic's deprecation notice
        return torch.ao.quantization.quantize_dynamic(
            lowered, dict.fromkeys(ctx.rnn_modules, qconfig), dtype=torch.qint8
        )


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _named(module_name: str) -> Any:
    def match(_module: nn.Module, fqn: str) -> bool:
        return fqn == module_name

    return match
