"""The ``onnxruntime`` backend (default on CPU): one ONNX model with per-node precision.

Export (TorchScript exporter, batch-1 example inputs), then for each Linear / attention
projection whose weight asks for <= 8 bits, ``MatMulNBits`` at 2, 4 or 8 bits with block-32
scales (``MatMulNBitsQuantizer``, one pass per (bits, symmetry, accuracy level) group, every other
node excluded). ``a_bits`` 8 selects ``accuracy_level=4`` (int8 activations inside the kernel),
``a_bits`` 32 keeps float activations (``accuracy_level=1``).

Lowering that is recorded per layer, never hidden:

- 3 bits runs as 4, 5 and 6 bits as 8 (the kernel has 2, 4 and 8); per-channel and per-tensor
  scales run as block-32 scales (finer, the kernel's only layout).
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
import logging
import math
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from mpq.evaluators.backends.base import Lowered, register_backend
from mpq.evaluators.quantize import choose_qparams, quantize, weight_qparams
from mpq.evaluators.size import config_size, layer_size_bytes
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, KEEP, LayerChoice, QuantConfig

logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
BLOCK = 32
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
FLOAT32 = "float32 (onnxruntime)"
CONV_RAN = LayerChoice(w_bits=8, a_bits=8, granularity="per_channel", act_mode="static")


def conv_nodes(model: onnx.ModelProto, layers: tuple[LayerInfo, ...]) -> dict[str, onnx.NodeProto]:
    """Layer name -> the ``Conv`` node whose weight input is that layer's parameter."""
    by_weight = {f"{la.module}.{la.param}": la.name for la in layers if la.kind in QDQ_CONV}
    return {
        by_weight[n.input[1]]: n
        for n in model.graph.node
        if n.op_type == "Conv" and n.input[1] in by_weight
    }


def conv_ranges(
    model: nn.Module, modules: list[str], calibration: list[tuple[Any, ...]]
) -> dict[str, tuple[float, float, float, float]]:
    """Per conv module: (input min, input max, output min, output max) over the calibration."""
    seen = {m: [np.inf, -np.inf, np.inf, -np.inf] for m in modules}
    if not modules:
        return {}

    def hook(name: str):  # type: ignore[no-untyped-def]
        def record(_m: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
            r, x = seen[name], args[0]
            r[0], r[1] = min(r[0], float(x.min())), max(r[1], float(x.max()))
            r[2], r[3] = min(r[2], float(out.min())), max(r[3], float(out.max()))

        return record

    handles = [model.get_submodule(m).register_forward_hook(hook(m)) for m in modules]
    try:
        with torch.inference_mode():
            for batch in calibration:
                model(*batch)
    finally:
        for h in handles:
            h.remove()
    return {m: (r[0], r[1], r[2], r[3]) for m, r in seen.items()}


def _uint8_qparams(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    qp = choose_qparams(torch.tensor(lo), torch.tensor(hi), 8, symmetric=False)
    return np.float32(qp.scale.item()), np.uint8(int(qp.zero_point.item()))


def qdq_conv(
    model: onnx.ModelProto, node: onnx.NodeProto, ranges: tuple[float, float, float, float]
) -> list[onnx.NodeProto]:
    """``Q/DQ(x) -> Conv(DQ(int8 W)) -> Q/DQ(y)`` in place of ``node`` (ORT: ``QLinearConv``)."""
    graph, p = model.graph, node.name or node.output[0]
    w = numpy_helper.to_array(next(i for i in graph.initializer if i.name == node.input[1]))
    grouped, qp = weight_qparams(torch.tensor(w), 8, "per_channel", None, symmetric=True)
    w_q = quantize(grouped, qp).reshape(w.shape).numpy().astype(np.int8)
    s_w = qp.scale.reshape(-1).numpy().astype(np.float32)
    s_x, z_x = _uint8_qparams(ranges[0], ranges[1])
    s_y, z_y = _uint8_qparams(ranges[2], ranges[3])
    for arr, name in (
        (s_x, "sx"),
        (z_x, "zx"),
        (s_y, "sy"),
        (z_y, "zy"),
        (w_q, "wq"),
        (s_w, "sw"),
    ):
        graph.initializer.append(numpy_helper.from_array(np.asarray(arr), f"{p}_{name}"))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def qdq(op: str, src: str, dst: str, k: str) -> onnx.NodeProto:
        return helper.make_node(op, [src, f"{p}_s{k}", f"{p}_z{k}"], [dst])

    return [
        qdq("QuantizeLinear", node.input[0], f"{p}_xq", "x"),
        qdq("DequantizeLinear", f"{p}_xq", f"{p}_xd", "x"),
        helper.make_node("DequantizeLinear", [f"{p}_wq", f"{p}_sw"], [f"{p}_wd"], axis=0),
        helper.make_node(
            "Conv", [f"{p}_xd", f"{p}_wd", *node.input[2:]], [f"{p}_y"], name=p, **attrs
        ),
        qdq("QuantizeLinear", f"{p}_y", f"{p}_yq", "y"),
        qdq("DequantizeLinear", f"{p}_yq", node.output[0], "y"),
    ]


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

    ``QLinearConv``: int8 weights, a float32 scale per output channel, and the input and output
    activation scale (float32) and zero point (uint8): ``n + 4 * C_out + 2 * (4 + 1)``.
    Layers in float: ``evaluators.size``.
    """
    if kernel.startswith("MatMulNBits"):
        k = layer.reduction_size
        n_rows, blocks, b = layer.num_params // k, math.ceil(k / BLOCK), ran.w_bits
        zero = 0 if ran.symmetric else n_rows * math.ceil(blocks * b / 8)
        return n_rows * blocks * BLOCK * b // 8 + 4 * n_rows * blocks + zero
    if kernel.startswith("QLinearConv"):
        return layer.num_params + 4 * layer.shape[0] + 2 * (4 + 1)
    return layer_size_bytes(layer, ran)


def _ran_choice(choice: LayerChoice, layer: LayerInfo) -> LayerChoice:
    gran = "per_group" if layer.reduction_size % BLOCK == 0 else "per_channel"
    return LayerChoice(
        w_bits=nbits_for(choice.w_bits),
        a_bits=32,
        granularity=gran,
        group_size=BLOCK if gran == "per_group" else None,
        symmetric=choice.symmetric,
    )


@register_backend("onnxruntime")
class OnnxRuntimeBackend:
    name = "onnxruntime"

    def __init__(self) -> None:
        # (model, calibration, ranges of all its convs): the ranges are the float model's, so
        # one calibration pass serves every configuration an evaluator lowers.
        self._ranges: (
            tuple[nn.Module, Any, dict[str, tuple[float, float, float, float]]] | None
        ) = None

    def _conv_ranges(
        self, model: nn.Module, layers: tuple[LayerInfo, ...], calibration: Any
    ) -> dict[str, tuple[float, float, float, float]]:
        if self._ranges is None or not (
            self._ranges[0] is model and self._ranges[1] is calibration
        ):
            modules = sorted({la.module for la in layers if la.kind in QDQ_CONV})
            self._ranges = (model, calibration, conv_ranges(model, modules, calibration))
        return self._ranges[2]

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        return (*NBITS, 32) if layer.kind in ("linear", "attention_in_proj") else (32,)

    def kernel_for(self, layer: LayerInfo, choice: LayerChoice) -> str:
        """The kernel ``lower()`` runs ``choice`` on (given calibration data and a found node)."""
        if choice.w_bits <= INT_BITS_MAX and layer.kind in QDQ_CONV and choice.a_bits == 8:
            return QLINEARCONV
        if choice.w_bits <= INT_BITS_MAX and layer.kind in ("linear", "attention_in_proj"):
            level = 4 if choice.a_bits == 8 else 1
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
        if choice.a_bits == 8 and choice.act_mode == "static":
            return "static int8 activations -> dynamic int8 inside MatMulNBits"
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
    ) -> Lowered:
        import onnxruntime as ort
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        config.check(layers)
        proto = export_onnx(model.eval(), example_inputs)
        renamed = gemm_to_matmul(proto)
        nodes = matmul_nodes(proto, layers, renamed)
        kernels: dict[str, str] = {}
        fallbacks: dict[str, str] = {}
        groups: dict[tuple[int, bool, int], list[str]] = {}
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
        ranges = self._conv_ranges(model, layers, calibration) if qdq else {}
        replaced = {
            convs[name].output[0]: qdq_conv(proto, convs[name], ranges[la.module])
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
                kernels[la.name] = QLINEARCONV
                ran[la.name] = CONV_RAN
                reason = self.fallback_reason(la, c)
                if reason is not None:
                    fallbacks[la.name] = reason
            elif la.name in nodes and c.w_bits <= INT_BITS_MAX:
                bits, level = nbits_for(c.w_bits), 4 if c.a_bits == 8 else 1
                groups.setdefault((bits, c.symmetric, level), []).extend(nodes[la.name])
                kernels[la.name] = self.kernel_for(la, c)
                ran[la.name] = _ran_choice(c, la)
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
        for (bits, symmetric, level), names in sorted(groups.items()):
            q = MatMulNBitsQuantizer(
                proto,
                bits=bits,
                block_size=BLOCK,
                is_symmetric=symmetric,
                accuracy_level=level,
                # every other MatMul: the unmapped ones too, which must stay float32
                nodes_to_exclude=sorted(_matmul_names(proto) - set(names)),
            )
            q.process()
            proto = q.model.model
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        session = ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
        feeds = {
            f"input_{i}": (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
            for i, t in enumerate(example_inputs)
        }
        feeds = {k: v for k, v in feeds.items() if k in {i.name for i in session.get_inputs()}}

        def run() -> Any:
            return session.run(None, feeds)

        ran_config = QuantConfig(layers=ran)
        predicted = config_size(model, layers, ran_config).other_bytes + sum(
            packed_layer_bytes(la, kernels[la.name], ran[la.name]) for la in layers
        )
        return Lowered(
            run, session, kernels, fallbacks, ran_config, stored_bytes(proto), predicted
        )
