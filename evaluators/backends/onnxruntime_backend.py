"""The ``onnxruntime`` backend (default on CPU): one ONNX model with per-node precision.

Export (TorchScript exporter, batch-1 example inputs), then for each Linear / attention
projection whose weight asks for <= 8 bits, ``MatMulNBits`` at 2, 4 or 8 bits with block-32
scales holding the design notes' codes (``onnx_nbits``: the simulated model's weights bit for
bit), every other MatMul left alone. ``a_bits`` 8 selects ``accuracy_level=4`` (the kernel
quantizes its input to int8, symmetric per block of 32: recorded as ``per_block``, which the
simulated model of what ran reproduces), ``a_bits`` 32 keeps float activations (level 1).

Lowering that is recorded per layer, never hidden:

- 3 bits runs as 4, 5 and 6 bits as 8 (the kernel has 2, 4 and 8); per-tensor scales run as
  block-32 scales (finer, the kernel's only layout), per-channel ones too where 32 divides K.
- Conv1d/Conv2d with ``w_bits`` <= 8 and ``a_bits`` 8: static QDQ int8 -- ``QuantizeLinear``/
  ``DequantizeLinear`` around the ``Conv`` (input and output ranges calibrated on the project's
  calibration batches with the notes' min-max formula, uint8 asymmetric per tensor; weights
  int8 symmetric per output channel), which ONNX Runtime fuses into ``QLinearConv``. Narrower
  weights run as int8, dynamic activation ranges as calibrated static ones (ORT's dynamic int8
  conv is slow); without calibration data the conv runs in float32. All recorded.
- Conv3d, GRU/LSTM/RNN and Embedding run in float32 here (no low-bit kernel wired for them).
- NOTE: the exporter emits ``Gemm`` for a Linear on 2-D input, which ``MatMulNBits`` skips; such
  nodes are rewritten to ``MatMul`` + ``Add`` first.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper
from torch import nn

from mpq.evaluators.apply import static_ranges
from mpq.evaluators.backends.base import Lowered, register_backend
from mpq.evaluators.backends.onnx_graph import (  # noqa: F401  (re-exported for tests)
    QDQ_CONV,
    conv_nodes,
    gemm_to_matmul,
    matmul_nodes,
    qdq_conv,
    signed_conv_exact,
)
from mpq.evaluators.backends.onnx_nbits import (
    BLOCK,
    int8_input_runs,
    prune_initializers,
    replace_matmuls,
)
from mpq.evaluators.size import config_size, layer_size_bytes
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, KEEP, LayerChoice, QuantConfig

NBITS = (2, 4, 8)


def nbits_for(w_bits: int) -> int:
    """The narrowest MatMulNBits width that holds ``w_bits`` (3 -> 4, 5 and 6 -> 8)."""
    return next(b for b in NBITS if b >= w_bits)


def export_onnx(model: nn.Module, example_inputs: tuple[Any, ...]) -> onnx.ModelProto:
    buf = io.BytesIO()
    names = [f"input_{i}" for i in range(len(example_inputs))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            example_inputs,
            buf,
            dynamo=False,
            input_names=names,
            opset_version=17,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


QLINEARCONV = "QLinearConv int8 (static QDQ)"
QLINEARCONV_U8 = "QLinearConv u8 x u8 (static QDQ; u8 x s8 inexact here)"


def qlinearconv_kernel() -> str:
    """The static int8 conv kernel that is exact on this CPU (``signed_conv_exact``)."""
    return QLINEARCONV if signed_conv_exact() else QLINEARCONV_U8


FLOAT32 = "float32 (onnxruntime)"
CONV_RAN = LayerChoice(
    w_bits=8, a_bits=8, granularity="per_channel", act_mode="static", out_bits=8
)


def stored_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers the graph uses: the weights as this backend stores them.

    ``MatMulNBits`` packs ``b``-bit weights in bytes with one float32 scale per block of 32 (and
    packed zero points when asymmetric), which is ``evaluators.size`` for the configuration that
    ran; a static int8 conv adds its input and output scale and zero point (2 x 5 bytes).
    """
    used = {name for node in model.graph.node for name in node.input}
    return sum(  # from shape and dtype: no copy of the tensors
        math.prod(init.dims) * helper.tensor_dtype_to_np_dtype(init.data_type).itemsize
        for init in model.graph.initializer
        if init.name in used
    )


def packed_layer_bytes(layer: LayerInfo, kernel: str, ran: LayerChoice) -> int:
    """Bytes this backend stores for one layer, in its own layout.

    ``MatMulNBits`` (N output rows, K inputs, ``nb = ceil(K / 32)`` blocks per row: K is padded
    to whole blocks, zero points are packed per row)::

        N * nb * 32 * b / 8  +  4 * N * nb  +  (asymmetric) N * ceil(nb * b / 8)

    ``QLinearConv``: 8-bit weights, a float32 scale and an 8-bit zero point per output channel,
    and the input and output activation scale (float32) and zero point (uint8):
    ``n + 5 * C_out + 2 * (4 + 1)``.
    Layers in float: ``evaluators.size``.
    """
    if kernel.startswith("MatMulNBits"):
        k = layer.reduction_size
        n_rows, blocks, b = layer.num_params // k, math.ceil(k / BLOCK), ran.w_bits
        zero = 0 if ran.symmetric else n_rows * math.ceil(blocks * b / 8)
        return n_rows * blocks * BLOCK * b // 8 + 4 * n_rows * blocks + zero
    if kernel.startswith("QLinearConv"):
        return layer.num_params + 5 * layer.shape[0] + 2 * (4 + 1)
    return layer_size_bytes(layer, ran)


def _int8_input(choice: LayerChoice) -> bool:
    """a8 asked, and this CPU's MatMulNBits at that width really has the int8-input kernel."""
    return choice.a_bits == 8 and int8_input_runs(nbits_for(choice.w_bits))


def _ran_choice(choice: LayerChoice, layer: LayerInfo) -> LayerChoice:
    """What ``MatMulNBits`` runs: codes at 2/4/8 bits per block of 32 (per channel where K is
    no multiple of 32: the row's scale in every block); accuracy level 4 quantizes its input to
    int8 per block of 32, symmetric (``per_block``), level 1 keeps it float32."""
    gran = "per_group" if layer.reduction_size % BLOCK == 0 else "per_channel"
    int8_input = _int8_input(choice)
    return LayerChoice(
        w_bits=nbits_for(choice.w_bits),
        a_bits=8 if int8_input else 32,
        granularity=gran,
        group_size=BLOCK if gran == "per_group" else None,
        symmetric=choice.symmetric,
        act_granularity="per_block" if int8_input else "per_tensor",
    )


@register_backend("onnxruntime")
class OnnxRuntimeBackend:
    name = "onnxruntime"

    def _conv_ranges(
        self,
        model: nn.Module,
        layers: tuple[LayerInfo, ...],
        config: QuantConfig,
        qdq: dict[str, LayerInfo],
        nodes: dict[str, list[str]],
        calibration: Any,
        observer: str,
    ) -> dict[str, tuple[float, float, float, float]]:
        """Per static int8 conv module: (input lo, hi, output lo, hi), calibrated on the
        simulated model of what will run -- upstream layers quantized as they will be -- so the
        QDQ ranges are the simulated model's own."""
        if not qdq:
            return {}
        plan = {}
        for la in layers:
            c = config.layers[la.name]
            if la.name in qdq:
                plan[la.name] = CONV_RAN
            elif la.name in nodes and c.w_bits <= INT_BITS_MAX:
                plan[la.name] = _ran_choice(c, la)
            else:
                plan[la.name] = LayerChoice()
        found = static_ranges(model, QuantConfig(layers=plan), calibration, observer, layers)
        return {
            la.module: (*found[la.module]["input"], *found[la.module]["output"])
            for la in qdq.values()
        }

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        return (*NBITS, 32) if layer.kind in ("linear", "attention_in_proj") else (32,)

    def kernel_for(self, layer: LayerInfo, choice: LayerChoice) -> str:
        """The kernel ``lower()`` runs ``choice`` on (given calibration data and a found node)."""
        if choice.w_bits <= INT_BITS_MAX and layer.kind in QDQ_CONV and choice.a_bits == 8:
            return qlinearconv_kernel()
        if choice.w_bits <= INT_BITS_MAX and layer.kind in ("linear", "attention_in_proj"):
            level = 4 if _int8_input(choice) else 1
            return f"MatMulNBits int{nbits_for(choice.w_bits)} block{BLOCK} acc{level}"
        return FLOAT32

    def fallback_reason(self, layer: LayerInfo, choice: LayerChoice) -> str | None:
        if choice.w_bits == KEEP:
            return None
        if layer.kind in QDQ_CONV and choice.w_bits <= INT_BITS_MAX:
            if choice.a_bits != 8:
                return f"w{choice.w_bits} -> float32: QLinearConv needs a_bits 8 (no weight-only)"
            c = CONV_RAN
            asked = (choice.w_bits, choice.granularity, choice.symmetric, choice.act_mode)
            if asked != (c.w_bits, c.granularity, c.symmetric, c.act_mode):
                return (
                    f"w{choice.w_bits} {choice.granularity} a8 {choice.act_mode} -> int8 "
                    "per_channel a8 static (QLinearConv)"
                )
            return None
        if layer.kind not in ("linear", "attention_in_proj"):
            return f"w{choice.w_bits} -> float32: no low-bit kernel wired for {layer.kind}"
        if choice.w_bits > INT_BITS_MAX:
            return f"w{choice.w_bits} -> float32: float16 has no faster CPU kernel"
        ran = _ran_choice(choice, layer)
        if (
            ran.w_bits != choice.w_bits
            or ran.granularity != choice.granularity
            or (ran.group_size != choice.group_size)
        ):
            layout = f"block{BLOCK}" if ran.granularity == "per_group" else ran.granularity
            return f"w{choice.w_bits} {choice.granularity} -> int{ran.w_bits} {layout}"
        if choice.a_bits == 8 and not _int8_input(choice):
            return (
                f"a8 -> a32: MatMulNBits int{ran.w_bits} has no int8-input kernel on this CPU "
                "(accuracy level 4 computes in float32 here)"
            )
        if choice.a_bits == 8 and (choice.act_mode, choice.act_granularity) != (
            "dynamic",
            "per_block",
        ):
            return (
                f"a8 {choice.act_mode} {choice.act_granularity} -> a8 dynamic symmetric per "
                f"block of {BLOCK} (MatMulNBits accuracy level 4)"
            )
        if choice.a_bits == 16:
            return "a16 -> float32 activations"
        return None

    def lower(
        self,
        model: nn.Module,
        layers: tuple[LayerInfo, ...],
        config: QuantConfig,
        example_inputs: tuple[Any, ...],
        threads: int = 1,
        calibration: list[tuple[Any, ...]] | None = None,
        observer: str = "minmax",
    ) -> Lowered:
        import onnxruntime as ort

        config.check(layers)
        proto = export_onnx(model.eval(), example_inputs)
        renamed = gemm_to_matmul(proto)
        nodes = matmul_nodes(proto, layers, renamed)
        kernels: dict[str, str] = {}
        fallbacks: dict[str, str] = {}
        nbits: dict[str, tuple[LayerChoice, int]] = {}  # MatMul node -> (ran, accuracy level)
        ran: dict[str, LayerChoice] = {}
        convs = conv_nodes(proto, layers)
        qdq = {
            la.name: la
            for la in layers
            if la.name in convs
            and config.layers[la.name].w_bits <= INT_BITS_MAX
            and config.layers[la.name].a_bits == 8
            and calibration
        }
        ranges = self._conv_ranges(model, layers, config, qdq, nodes, calibration, observer)
        replaced = {
            convs[name].output[0]: qdq_conv(
                proto, convs[name], ranges[la.module], not signed_conv_exact()
            )
            for name, la in qdq.items()
        }
        if replaced:
            new_nodes = []
            for n in proto.graph.node:
                new_nodes.extend(replaced.get(n.output[0], [n]) if n.op_type == "Conv" else [n])
            del proto.graph.node[:]
            proto.graph.node.extend(new_nodes)
        for la in layers:
            c = config.layers[la.name]
            if la.name in qdq:
                kernels[la.name] = qlinearconv_kernel()
                ran[la.name] = CONV_RAN
                reason = self.fallback_reason(la, c)
                if reason is not None:
                    fallbacks[la.name] = reason
            elif la.name in nodes and c.w_bits <= INT_BITS_MAX:
                ran[la.name] = _ran_choice(c, la)
                for node_name in nodes[la.name]:
                    nbits[node_name] = (ran[la.name], 4 if _int8_input(c) else 1)
                kernels[la.name] = self.kernel_for(la, c)
                reason = self.fallback_reason(la, c)
                if reason is not None:
                    fallbacks[la.name] = reason
            else:
                kernels[la.name] = FLOAT32
                ran[la.name] = LayerChoice()
                if c.w_bits != KEEP:
                    fallbacks[la.name] = self.fallback_reason(la, c) or ""
                    if la.kind in ("linear", "attention_in_proj") and la.name not in nodes:
                        fallbacks[la.name] = (
                            f"w{c.w_bits} -> float32: no MatMul node in the export"
                        )
                    elif la.kind in QDQ_CONV and la.name not in convs:
                        fallbacks[la.name] = f"w{c.w_bits} -> float32: no Conv node in the export"
                    elif la.kind in QDQ_CONV and c.w_bits <= INT_BITS_MAX and c.a_bits == 8:
                        fallbacks[la.name] = (
                            f"w{c.w_bits} -> float32: static int8 conv needs calibration data"
                        )
        replace_matmuls(proto, nbits)
        prune_initializers(proto)  # the float weights rewrites replaced: not in what ships
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        model_bytes = proto.SerializeToString()
        session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        feeds = {
            f"input_{i}": (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
            for i, t in enumerate(example_inputs)
        }

        def fresh() -> Any:
            """A new session of the same model: its own packed weights, cold caches."""
            new = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
            return lambda: new.run(None, feeds)

        feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}

        def run() -> Any:
            return session.run(None, feeds)

        ran_config = QuantConfig(layers=ran)
        predicted = config_size(model, layers, ran_config).other_bytes + sum(
            packed_layer_bytes(la, kernels[la.name], ran[la.name]) for la in layers
        )
        return Lowered(
            run,
            session,
            kernels,
            fallbacks,
            ran_config,
            stored_bytes(proto),
            predicted,
            fresh,
            artifact=model_bytes,
            artifact_kind="onnx",
        )
