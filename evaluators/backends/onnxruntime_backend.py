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

import functools
import io
import math
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from mpq.evaluators.apply import static_ranges
from mpq.evaluators.backends.base import Lowered, register_backend
from mpq.evaluators.backends.onnx_nbits import (
    BLOCK,
    int8_input_runs,
    prune_initializers,
    replace_matmuls,
)
from mpq.evaluators.quantize import choose_qparams, quantize, weight_qparams
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


def gemm_to_matmul(model: onnx.ModelProto) -> dict[str, str]:
    """Rewrite ``Gemm(A, W, b, transB=1)`` with initializer ``W`` as ``MatMul(A, W^T) + b``.

    Returns: weight initializer name -> the new MatMul node's name.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    renamed: dict[str, str] = {}
    new_nodes = []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ok = (
            node.op_type == "Gemm"
            and node.input[1] in inits
            and attrs.get("transB", 0) == 1
            and attrs.get("transA", 0) == 0
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
        )
        if not ok:
            new_nodes.append(node)
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        wt_name = f"{node.input[1]}_T"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), wt_name))
        mm_name = f"{node.name}_MatMul"
        out = node.output[0] if len(node.input) < 3 else f"{node.output[0]}_mm"
        new_nodes.append(helper.make_node("MatMul", [node.input[0], wt_name], [out], name=mm_name))
        if len(node.input) >= 3:
            new_nodes.append(
                helper.make_node(
                    "Add", [out, node.input[2]], [node.output[0]], name=f"{node.name}_Add"
                )
            )
        renamed[node.input[1]] = mm_name
    del graph.node[:]
    graph.node.extend(new_nodes)
    return renamed


def matmul_nodes(
    model: onnx.ModelProto, layers: tuple[LayerInfo, ...], renamed: dict[str, str]
) -> dict[str, list[str]]:
    """Layer name -> the MatMul node names that multiply by its weight.

    The exporter names a node by its module scope, and nests containers unevenly
    (``/blocks/blocks.0/ff1/MatMul`` for ``blocks.0.ff1``), while a constant-folded weight
    loses its name (``onnx::MatMul_365``). So a node belongs to the longest module name its
    scope ends with, and only where its initializer is the layer's transposed weight (K rows),
    or a slice of it (attention whose query and key/value inputs differ: two MatMuls).
    """
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out: dict[str, list[str]] = {}
    by_module = {la.module: la for la in layers if la.kind in ("linear", "attention_in_proj")}
    for la in layers:
        wname = f"{la.module}.{la.param}"
        if wname in renamed:
            out.setdefault(la.name, []).append(renamed[wname])
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.name in renamed.values():
            continue
        scope = node.name.lstrip("/").rsplit("/", 1)[0].replace("/", ".")
        owners = [m for m in by_module if scope == m or scope.endswith(f".{m}")]
        if not owners:
            continue
        la = by_module[max(owners, key=len)]
        dims = inits[node.input[1]]  # W^T (K, N), or columns of it (cross-attention: q; k, v)
        if len(dims) == 2 and dims[0] == la.reduction_size and dims[1] <= la.shape[0]:
            out.setdefault(la.name, []).append(node.name)
    return out


def _matmul_names(model: onnx.ModelProto) -> set[str]:
    return {n.name for n in model.graph.node if n.op_type == "MatMul"}


QDQ_CONV = ("conv1d", "conv2d")
QLINEARCONV = "QLinearConv int8 (static QDQ)"
QLINEARCONV_U8 = "QLinearConv u8 x u8 (static QDQ; u8 x s8 inexact here)"


def qlinearconv_kernel() -> str:
    """The static int8 conv kernel that is exact on this CPU (``signed_conv_exact``)."""
    return QLINEARCONV if signed_conv_exact() else QLINEARCONV_U8


FLOAT32 = "float32 (onnxruntime)"
CONV_RAN = LayerChoice(
    w_bits=8, a_bits=8, granularity="per_channel", act_mode="static", out_bits=8
)


def conv_nodes(model: onnx.ModelProto, layers: tuple[LayerInfo, ...]) -> dict[str, onnx.NodeProto]:
    """Layer name -> the ``Conv`` node whose weight input is that layer's parameter."""
    by_weight = {f"{la.module}.{la.param}": la.name for la in layers if la.kind in QDQ_CONV}
    return {
        by_weight[n.input[1]]: n
        for n in model.graph.node
        if n.op_type == "Conv" and n.input[1] in by_weight
    }


def _uint8_qparams(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    qp = choose_qparams(torch.tensor(lo), torch.tensor(hi), 8, symmetric=False)
    return np.float32(qp.scale.item()), np.uint8(int(qp.zero_point.item()))


def qdq_conv(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    ranges: tuple[float, float, float, float],
    unsigned_weights: bool = False,
) -> list[onnx.NodeProto]:
    """``Q/DQ(x) -> Conv(DQ(int8 W)) -> Q/DQ(y)`` in place of ``node`` (ORT: ``QLinearConv``).

    ``unsigned_weights``: the int8 codes stored as uint8 with zero point 128 (the same values),
    which ONNX Runtime runs as u8 x u8 -- exact where its u8 x s8 kernel saturates (no VNNI).
    """
    graph, p = model.graph, node.name or node.output[0]
    w = numpy_helper.to_array(next(i for i in graph.initializer if i.name == node.input[1]))
    grouped, qp = weight_qparams(torch.tensor(w), 8, "per_channel", None, symmetric=True)
    codes = quantize(grouped, qp).reshape(w.shape).numpy()
    s_w = qp.scale.reshape(-1).numpy().astype(np.float32)
    if unsigned_weights:  # the same codes as uint8 around 128 (u8 x u8: no 16-bit saturation)
        w_q, z_w = (codes + 128).astype(np.uint8), np.full(len(s_w), 128, np.uint8)
    else:
        w_q, z_w = codes.astype(np.int8), np.zeros(len(s_w), np.int8)
    s_x, z_x = _uint8_qparams(ranges[0], ranges[1])
    s_y, z_y = _uint8_qparams(ranges[2], ranges[3])
    for arr, name in (
        (s_x, "sx"),
        (z_x, "zx"),
        (s_y, "sy"),
        (z_y, "zy"),
        (w_q, "wq"),
        (s_w, "sw"),
        (z_w, "zw"),
    ):
        graph.initializer.append(numpy_helper.from_array(np.asarray(arr), f"{p}_{name}"))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def qdq(op: str, src: str, dst: str, k: str) -> onnx.NodeProto:
        return helper.make_node(op, [src, f"{p}_s{k}", f"{p}_z{k}"], [dst])

    return [
        qdq("QuantizeLinear", node.input[0], f"{p}_xq", "x"),
        qdq("DequantizeLinear", f"{p}_xq", f"{p}_xd", "x"),
        helper.make_node(
            "DequantizeLinear", [f"{p}_wq", f"{p}_sw", f"{p}_zw"], [f"{p}_wd"], axis=0
        ),
        helper.make_node(
            "Conv", [f"{p}_xd", f"{p}_wd", *node.input[2:]], [f"{p}_y"], name=p, **attrs
        ),
        qdq("QuantizeLinear", f"{p}_y", f"{p}_yq", "y"),
        qdq("DequantizeLinear", f"{p}_yq", node.output[0], "y"),
    ]


@functools.cache
def signed_conv_exact() -> bool:
    """Whether ONNX Runtime's ``QLinearConv`` with int8 weights computes exactly here.

    Probed once per process: a 1x1 conv over 64 channels with every input at the top of its
    uint8 range (255) and every weight code at 127, so each ``u8 x s8`` pair overflows 16 bits
    where the kernel sums pairs there (AVX2, AVX-512 without VNNI); exact is 64.
    """
    import onnxruntime as ort

    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64, 1, 1])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 1, 1])
    graph = helper.make_graph([], "probe", [x], [y])
    w = np.ones((1, 64, 1, 1), np.float32)
    graph.initializer.append(numpy_helper.from_array(w, "w"))
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="probe")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.graph.node.extend(qdq_conv(model, conv, (0.0, 1.0, 0.0, 128.0)))
    model.graph.initializer.remove(model.graph.initializer[0])  # "w": read, now unused
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"x": np.ones((1, 64, 1, 1), np.float32)})[0]
    return bool(abs(float(got.reshape(-1)[0]) - 64.0) < 1.0)


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
