"""The ``torch`` backends: torchao's low-bit kernels under ``torch.compile`` (Inductor).

``torch`` runs on the CPU, ``torch-cuda`` on the first CUDA device (an error in one line when
there is none), ``torch-cuda-fp8`` is ``torch-cuda`` with float8 where int8 activations are
asked (Hopper/Ada, compute capability >= 8.9). Per layer, from the kind and the choice alone
(``plan``), what runs -- torchao quantizes the original float weights into each kernel's own
layout, and the trial records what was asked, the kernel, and the choice that ran:

====================================  ==============================================  =========
asked                                 kernel                                          ran
====================================  ==============================================  =========
Linear, w <= 8, a8                    int8 x int8, activations quantized per token    w8 a8
(CUDA: K, N % 8 == 0)                 on every call (``Int8DynamicActivationInt8Weight``;
                                      Inductor fuses ``_int_mm`` and the scales; rows
                                      padded to 8, CUDA 24: ``_PadRows``)
(K, N % 16 == 0)                      ``torch-cuda-fp8``: float8 e4m3 rows            w8 a8
Linear, w <= 4, a32/a16, where the    int4 weight-only, groups of 32, bfloat16        w4 g32 a16
int4 layout fits (``int4_layout``)    activations (CPU ``Int4OpaqueTensor``; CUDA
                                      tinygemm ``Int4WeightOnly``, K padded to 1024)
Linear, other w <= 8, a32/a16         int8 weight-only (``Int8WeightOnly``)           w8 a32
Linear, w16                           bfloat16 weights and activations                w16 a16
GRU/LSTM/RNN, every weight w <= 8     ``quantize_dynamic`` int8 (CPU only)            w8 a8
anything else (conv, embedding, ...)  float32                                         float32
====================================  ==============================================  =========

On a CPU whose int8 x int8 kernel is not exact (``int8_dynamic_exact``: oneDNN without VNNI
saturates ``u8 x s8`` pairs in 16 bits, 10-99% off on AVX2), ``a8`` runs on the weight-only
kernels (int4 where asked and it fits, else int8), recorded with the reason. On the AVX2 EPYC
the int8 x int8 kernel was also 2.5x slower than float32 (3136 -> 256 at 8 padded rows).

16 bits run as bfloat16 here (the space's 16 is float16: the same bytes, 3 fewer mantissa bits,
recorded). ``nn.MultiheadAttention`` reads ``out_proj.weight`` itself, so that Linear and a
recurrent module with any weight above 8 bits run in float32, known only at lowering (recorded).

Compilation: ``freezing`` (weights become constants, so Inductor prepacks them; without it the
int8 path runs at eager speed), ``allow_rnn`` (a GRU otherwise breaks the graph, and Dynamo then
mis-traces torchao's tensor subclasses), and one fresh code object per lowered model: Dynamo
keeps its cache on the code object with 8 entries, so a search that lowers hundreds of
configurations of one model would otherwise fall back to eager, silently, after eight.
"""

from __future__ import annotations

import copy
import functools
import itertools
import types
import warnings
from typing import Any

import torch
from torch import nn

from mpq.evaluators.backends.base import Lowered, register_backend
from mpq.evaluators.cpu_isa import isa_summary
from mpq.evaluators.size import config_size, layer_size_bytes
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, KEEP, LayerChoice, QuantConfig

INT8_DYNAMIC = "int8 x int8 dynamic per-token (torchao, inductor)"
FLOAT8_DYNAMIC = "float8 e4m3 dynamic per-row (torchao, inductor)"
INT4_WEIGHT_ONLY = "int4 weight-only g32, bf16 activations (torchao, inductor)"
INT8_WEIGHT_ONLY = "int8 weight-only (torchao, inductor)"
BFLOAT16 = "bfloat16 (inductor)"
RNN_INT8 = "int8 dynamic (torch quantize_dynamic)"
FLOAT32 = "float32 (inductor)"
INT4_GROUP = 32
_RECURRENT = ("gru", "lstm", "rnn")

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


def _dims_divisible(layer: LayerInfo, multiple: int) -> bool:
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
    K % 32 == 0 and N % 16 == 0. CUDA (tinygemm, ``Int4TilePackedTo4dTensor``): K padded up to a
    multiple of 1024 and N to 8 -- a 384-wide layer stores 1024 columns -- so int4 is used only
    where the padded weight is smaller than int8's, else int8.
    """
    rows, k = layer.shape[0], layer.reduction_size
    if device == "cpu":
        fits = k % INT4_GROUP == 0 and rows % 16 == 0
        return (rows, k) if fits else None
    padded = _round_up(rows, 8), _round_up(k, 1024)
    smaller = _int4_bytes(*padded) < packed_layer_bytes(layer, INT8_WEIGHT_ONLY)
    return padded if smaller else None


def _int4_bytes(rows: int, k: int) -> int:
    """Packed pairs, and a bfloat16 scale and zero point per group of 32: 0.625 bytes a weight."""
    return rows * k // 2 + 4 * rows * k // INT4_GROUP


def _key(c: LayerChoice) -> tuple[Any, ...]:
    """The fields of a choice that change what is computed (group size only per group...)."""
    w = (c.w_bits,)
    if c.w_bits <= INT_BITS_MAX:
        w += (c.granularity, c.group_size, c.symmetric)
    a = (c.a_bits,) + ((c.act_mode, c.act_granularity) if c.a_bits <= INT_BITS_MAX else ())
    return w + a


def short(c: LayerChoice) -> str:
    """``w4 per_group32 asym a16`` -- a choice in a few words, for fallback reasons."""
    parts = [f"w{c.w_bits}"]
    if c.w_bits <= INT_BITS_MAX:
        gran = c.granularity + (str(c.group_size) if c.group_size else "")
        parts += [gran, "sym" if c.symmetric else "asym"]
    parts.append(f"a{c.a_bits}")
    if c.a_bits <= INT_BITS_MAX:
        parts += [c.act_mode, c.act_granularity]
    return " ".join(parts)


def _inside_attention(model: nn.Module, module_name: str) -> bool:
    parent = module_name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent), nn.MultiheadAttention)


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
    """Bytes of every parameter and buffer the lowered module holds (shared ones once), with the
    packed weights of ``quantize_dynamic`` recurrent modules."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
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
        assert layout is not None, f"{layer.name} has no int4 layout on {device}"
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
            compiled = torch.compile(_fresh_entry(linear))
            with torch._inductor.config.patch(freezing=True):
                got = compiled(x)
    except Exception as exc:  # noqa: BLE001  a kernel that does not even run is not exact
        warnings.warn(
            f"int8 x int8 probe failed ({exc!s:.200}): weight-only kernels run", stacklevel=2
        )
        return False
    return bool(torch.allclose(got, exact, rtol=1e-3, atol=0.0))


def _fresh_entry(module: nn.Module, counter: itertools.count = itertools.count()) -> Any:  # noqa: B008
    """``module(*args)`` as a function with a code object of its own (Dynamo's cache key)."""

    def entry(*args: Any) -> Any:
        return module(*args)

    code = entry.__code__.replace(co_name=f"mpq_lowered_{next(counter)}")
    return types.FunctionType(code, entry.__globals__, code.co_name, None, entry.__closure__)


@register_backend("torch")
class TorchBackend:
    """torchao kernels under ``torch.compile`` on ``device`` (see the module docstring)."""

    name = "torch"
    device = "cpu"
    float8 = False

    def _device(self) -> torch.device:
        if self.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"backend {self.name!r} needs a CUDA device and torch.cuda.is_available() is "
                f"False (torch {torch.__version__})"
            )
        if self.float8 and torch.cuda.get_device_capability() < (8, 9):
            raise RuntimeError(
                f"backend {self.name!r} needs compute capability >= 8.9 for float8, got "
                f"{torch.cuda.get_device_capability()}"
            )
        return torch.device(self.device)

    def plan(self, layer: LayerInfo, choice: LayerChoice) -> str:
        """The kernel ``choice`` runs on for ``layer`` (from the kind and the choice alone)."""
        w = choice.w_bits
        if w == KEEP:
            return FLOAT32
        if layer.kind == "linear":
            if w == 16:
                return BFLOAT16
            if choice.a_bits == 8 and self.float8 and _dims_divisible(layer, 16):
                return FLOAT8_DYNAMIC
            if choice.a_bits == 8 and self._int8_dynamic_runs(layer):
                return INT8_DYNAMIC
            if w <= 4 and int4_layout(layer, self.device) is not None:
                return INT4_WEIGHT_ONLY
            return INT8_WEIGHT_ONLY
        if layer.kind in _RECURRENT and w <= INT_BITS_MAX and self.device == "cpu":
            return RNN_INT8
        return FLOAT32

    def _int8_dynamic_runs(self, layer: LayerInfo) -> bool:
        if self.device == "cpu":
            return int8_dynamic_exact()
        return _dims_divisible(layer, 8)

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        if layer.kind == "linear":
            int4 = int4_layout(layer, self.device) is not None
            return (*((4,) if int4 else ()), 8, 16, 32)
        return (8, 32) if layer.kind in _RECURRENT and self.device == "cpu" else (32,)

    def kernel_for(self, layer: LayerInfo, choice: LayerChoice) -> str:
        return self.plan(layer, choice)

    def fallback_reason(self, layer: LayerInfo, choice: LayerChoice) -> str | None:
        return self._reason(layer, choice, self.plan(layer, choice))

    def _reason(self, layer: LayerInfo, choice: LayerChoice, kernel: str) -> str | None:
        if choice.w_bits == KEEP:
            return None
        if kernel == FLOAT32:
            return f"w{choice.w_bits} -> float32: no {layer.kind} kernel wired in torchao here"
        if kernel == FLOAT8_DYNAMIC:  # not an integer format: always a change, always said
            return f"{short(choice)} -> float8 e4m3 weights and activations per row ({kernel})"
        ran = RAN[kernel]
        if _key(ran) == _key(choice):
            return None
        why = ""
        weight_only = kernel in (INT8_WEIGHT_ONLY, INT4_WEIGHT_ONLY)
        if weight_only and choice.a_bits == 8 and self.device == "cpu":
            why = f": int8 x int8 is inexact on this CPU ({isa_summary()}; no VNNI)"
        return f"{short(choice)} -> {short(ran)} ({kernel}){why}"

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
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            PerRow,
            quantize_,
        )

        config.check(layers)
        device = self._device()
        kernels = {la.name: self.plan(la, config.layers[la.name]) for la in layers}
        # Found only here: MHA's out_proj, and recurrent modules that quantize whole.
        by_module: dict[str, list[LayerInfo]] = {}
        for la in layers:
            by_module.setdefault(la.module, []).append(la)
        late: dict[str, str] = {}
        for module_name, group in by_module.items():
            if group[0].kind == "linear" and _inside_attention(model, module_name):
                if kernels[group[0].name] != FLOAT32:
                    late[group[0].name] = "nn.MultiheadAttention reads out_proj.weight directly"
            elif group[0].kind in _RECURRENT and len({kernels[la.name] for la in group}) > 1:
                for la in group:
                    if kernels[la.name] != FLOAT32:
                        late[la.name] = "a recurrent module quantizes whole; a sibling stays float"
        for name in late:
            kernels[name] = FLOAT32

        lowered = copy.deepcopy(model).eval().to(device)
        cuda = device.type == "cuda"
        in_place = {  # quantize_ swaps the Linear's weight; float32 activations
            INT8_DYNAMIC: Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
            INT8_WEIGHT_ONLY: Int8WeightOnlyConfig(set_inductor_config=False),
        }
        cast: dict[str, Any] = {  # in a _CastLinear: bfloat16 activations (None: plain bf16)
            BFLOAT16: None,
            INT4_WEIGHT_ONLY: Int4WeightOnlyConfig(
                group_size=INT4_GROUP,
                int4_packing_format="tile_packed_to_4d",
                set_inductor_config=False,
            )
            if cuda
            else PrototypeInt4WeightOnlyConfig(group_size=INT4_GROUP, set_inductor_config=False),
        }
        if self.float8:  # float8 rowwise scaled matmuls take bfloat16 activations
            cast[FLOAT8_DYNAMIC] = Float8DynamicActivationFloat8WeightConfig(
                granularity=PerRow(), set_inductor_config=False
            )
        rnn_modules = set()
        for la in layers:
            kernel = kernels[la.name]
            if kernel in in_place:
                quantize_(lowered, in_place[kernel], filter_fn=_named(la.module))
                if kernel == INT8_DYNAMIC:
                    inner = lowered.get_submodule(la.module)
                    _replace(lowered, la.module, _PadRows(inner, 24 if cuda else 8))
            elif kernel in cast:
                new = _cast_linear(lowered.get_submodule(la.module), cast[kernel])
                _replace(lowered, la.module, new)
            elif kernel == RNN_INT8:
                rnn_modules.add(la.module)
        if rnn_modules:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # quantize_dynamic's deprecation notice
                lowered = torch.ao.quantization.quantize_dynamic(
                    lowered,
                    {m: torch.ao.quantization.default_dynamic_qconfig for m in rnn_modules},
                    dtype=torch.qint8,
                )
        fallbacks = {}
        for la in layers:
            c = config.layers[la.name]
            if la.name in late:
                fallbacks[la.name] = f"w{c.w_bits} -> float32: {late[la.name]}"
            else:
                reason = self._reason(la, c, kernels[la.name])
                if reason is not None:
                    fallbacks[la.name] = reason

        size = stored_bytes(lowered)
        inputs = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in example_inputs)
        compiled = torch.compile(_fresh_entry(lowered))
        ready = False

        def run() -> Any:
            nonlocal ready
            if not ready:  # the first call compiles, under these settings (a warm-up call)
                with (
                    torch.inference_mode(),
                    torch._dynamo.config.patch(allow_rnn=True),
                    torch._inductor.config.patch(freezing=True),
                ):
                    compiled(*inputs)
                ready = True
            with torch.inference_mode():
                out = compiled(*inputs)
            if cuda:
                torch.cuda.synchronize(device)
            return out

        ran_config = QuantConfig(layers={la.name: RAN[kernels[la.name]] for la in layers})
        predicted = config_size(model, layers, QuantConfig.uniform(layers, LayerChoice()))
        predicted_bytes = predicted.other_bytes + sum(
            packed_layer_bytes(la, kernels[la.name], self.device) for la in layers
        )
        return Lowered(run, lowered, kernels, fallbacks, ran_config, size, predicted_bytes)


def _replace(model: nn.Module, module_name: str, new: nn.Module) -> None:
    parent, _, child = module_name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _named(module_name: str) -> Any:
    def match(_module: nn.Module, fqn: str) -> bool:
        return fqn == module_name

    return match


@register_backend("torch-cuda")
class TorchCudaBackend(TorchBackend):
    name = "torch-cuda"
    device = "cuda"


@register_backend("torch-cuda-fp8")
class TorchCudaFloat8Backend(TorchBackend):
    name = "torch-cuda-fp8"
    device = "cuda"
    float8 = True
