"""The ``torch`` backends: torchao's low-bit kernels under ``torch.compile`` (Inductor).

``torch`` runs on the CPU, ``torch-cuda`` on the first CUDA device (an error in one line when
there is none), ``torch-cuda-fp8`` is ``torch-cuda`` with float8 where int8 activations are
asked (Hopper/Ada, compute capability >= 8.9). Per layer, from the kind and the choice alone
(``plan``), what runs -- torchao quantizes the original float weights into each kernel's own
layout (the int4 kernels are written with the design notes' codes, ``notes_int4_weight``),
and the trial records what was asked, the kernel, and the choice that ran:

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
                                      tinygemm tiles, K padded to 1024)
Linear, other w <= 8, a32/a16         int8 weight-only (``Int8WeightOnly``)           w8 a32
Linear, w16                           bfloat16 weights and activations                w16 a16
GRU/LSTM/RNN, every weight w <= 8     ``quantize_dynamic`` int8 (CPU only)            w8 a8
anything else (conv, embedding, ...)  float32                                         float32
====================================  ==============================================  =========

On a CPU whose int8 x int8 kernel is not exact (``int8_dynamic_exact``: oneDNN without VNNI
saturates ``u8 x s8`` pairs in 16 bits, 10-99% off on AVX2), ``a8`` runs on the weight-only
kernels (int4 where asked and it fits, else int8), recorded with the reason. On the AVX2 EPYC
the int8 x int8 kernel was also 2.5x slower than float32 (3136 -> 256 at 8 padded rows).

Convolutions run in float32 on this backend, said per layer. NOTE, why not torchao's PT2E int8
convolutions (``X86InductorQuantizer``): PT2E quantizes a whole ``torch.export`` graph, with
its own choice of which ops carry int8 between them, while this backend swaps weights for
torchao tensors module by module under ``torch.compile``; running both in one model, with a
simulated model that follows PT2E's per-op choices, is not built. The default ``onnxruntime``
backend runs static int8 convolutions (``QLinearConv``, the simulated model's own ranges).

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
from typing import Any

import torch
from torch import nn

from mpq.evaluators.backends.base import (
    RECURRENT_KINDS,
    LayerPlan,
    Lowered,
    PlannedBackend,
    register_backend,
)
from mpq.evaluators.backends.torch_kernels import (  # noqa: F401  (kernel names: re-exported)
    BFLOAT16,
    FLOAT8_DYNAMIC,
    FLOAT32,
    HANDLERS,
    INT4_WEIGHT_ONLY,
    INT8_DYNAMIC,
    INT8_WEIGHT_ONLY,
    RAN,
    RNN_INT8,
    LowerContext,
    dims_divisible,
    finish_rnn,
    fresh_entry,
    int4_layout,
    int8_dynamic_exact,
    packed_layer_bytes,
    stored_bytes,
)
from mpq.evaluators.cpu_isa import isa_summary
from mpq.evaluators.inputs import Inputs, call, to_device
from mpq.evaluators.size import config_size
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, KEEP, LayerChoice, QuantConfig


def _same(a: LayerChoice, b: LayerChoice) -> bool:
    """Whether two choices compute the same (group size only per group, activation modes
    only for integer activations...)."""

    def key(c: LayerChoice) -> tuple[Any, ...]:
        w: tuple[Any, ...] = (c.w_bits,)
        if c.w_bits <= INT_BITS_MAX:
            w += (c.granularity, c.group_size, c.symmetric)
        a = (c.a_bits,) + ((c.act_mode, c.act_granularity) if c.a_bits <= INT_BITS_MAX else ())
        return w + a

    return key(a) == key(b)


@register_backend("torch")
@register_backend("torch-cuda", device="cuda")
@register_backend("torch-cuda-fp8", device="cuda", float8=True)
class TorchBackend(PlannedBackend):
    """torchao kernels under ``torch.compile`` on ``device`` (see the module docstring);
    ``float8``: float8 e4m3 where int8 activations are asked (CUDA, capability >= 8.9)."""

    def __init__(self, name: str = "torch", device: str = "cpu", float8: bool = False) -> None:
        self.name = name
        self.device = device
        self.float8 = float8

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

    def _kernel(self, layer: LayerInfo, choice: LayerChoice) -> str:
        w = choice.w_bits
        if w == KEEP:
            return FLOAT32
        if layer.kind == "linear":
            if w == 16:
                return BFLOAT16
            if choice.a_bits == 8 and self.float8 and dims_divisible(layer, 16):
                return FLOAT8_DYNAMIC
            if choice.a_bits == 8 and self._int8_dynamic_runs(layer):
                return INT8_DYNAMIC
            if w <= 4 and int4_layout(layer, self.device) is not None:
                return INT4_WEIGHT_ONLY
            return INT8_WEIGHT_ONLY
        if layer.kind in RECURRENT_KINDS and w <= INT_BITS_MAX and self.device == "cpu":
            return RNN_INT8
        return FLOAT32

    def plan_layer(self, layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
        """The kernel ``choice`` runs on for ``layer`` (from the kind and the choice alone),
        the choice that runs (``RAN``) and why it differs from the asked one."""
        kernel = self._kernel(layer, choice)
        ran = RAN[kernel]
        if choice.w_bits == KEEP or (kernel != FLOAT8_DYNAMIC and _same(ran, choice)):
            return LayerPlan(kernel, ran)
        if kernel == FLOAT32:
            why = f"w{choice.w_bits} -> float32: no {layer.kind} kernel wired in torchao here"
            return LayerPlan(kernel, ran, why)
        if kernel == FLOAT8_DYNAMIC:  # not an integer format: always a change, always said
            why = f"{choice.describe()} -> float8 e4m3 weights and activations per row ({kernel})"
            return LayerPlan(kernel, ran, why)
        inexact = ""
        weight_only = kernel in (INT8_WEIGHT_ONLY, INT4_WEIGHT_ONLY)
        if weight_only and choice.a_bits == 8 and self.device == "cpu":
            inexact = f": int8 x int8 is inexact on this CPU ({isa_summary()}; no VNNI)"
        return LayerPlan(
            kernel, ran, f"{choice.describe()} -> {ran.describe()} ({kernel}){inexact}"
        )

    def _int8_dynamic_runs(self, layer: LayerInfo) -> bool:
        if self.device == "cpu":
            return int8_dynamic_exact()
        return dims_divisible(layer, 8)

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        if layer.kind == "linear":
            int4 = int4_layout(layer, self.device) is not None
            return (*((4,) if int4 else ()), 8, 16, 32)
        return (8, 32) if layer.kind in RECURRENT_KINDS and self.device == "cpu" else (32,)

    def float_plan(self, layer: LayerInfo, asked: LayerChoice, why: str) -> LayerPlan:
        return LayerPlan(FLOAT32, RAN[FLOAT32], f"w{asked.w_bits} -> float32: {why}")

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
        """Execute the plan: each layer's module swapped by its kernel's handler, then
        ``torch.compile`` with freezing on a fresh code object."""
        plan = self.plan(model, layers, config)
        ctx = LowerContext(self._device())
        lowered = copy.deepcopy(model).eval().to(ctx.device)
        for la in layers:
            HANDLERS[plan.layers[la.name].kernel](lowered, la, ctx)
        lowered = finish_rnn(lowered, ctx)
        run = _compiled_runner(lowered, to_device(example_inputs, ctx.device), ctx.cuda)
        floats = config_size(model, layers, QuantConfig.uniform(layers, LayerChoice()))
        predicted_bytes = floats.other_bytes + sum(
            packed_layer_bytes(la, plan.layers[la.name].kernel, self.device) for la in layers
        )
        return Lowered(run, lowered, plan, stored_bytes(lowered), predicted_bytes)


def _compiled_runner(lowered: nn.Module, inputs: Inputs, cuda: bool) -> Any:
    """``run()``: the compiled module on ``inputs``; the first call compiles, under the
    settings of the module docstring (a warm-up call)."""
    compiled = torch.compile(fresh_entry(lowered))
    ready = False

    def run() -> Any:
        nonlocal ready
        if not ready:
            with (
                torch.inference_mode(),
                torch._dynamo.config.patch(allow_rnn=True),
                torch._inductor.config.patch(freezing=True),
            ):
                call(compiled, inputs)
            ready = True
        with torch.inference_mode():
            out = call(compiled, inputs)
        if cuda:
            torch.cuda.synchronize()
        return out

    return run
