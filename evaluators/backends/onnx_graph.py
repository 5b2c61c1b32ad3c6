"""Graph surgery on the exported ONNX model: which nodes are a layer's, and static int8 convs.

``gemm_to_matmul`` makes every Linear a ``MatMul`` (``MatMulNBits`` replaces MatMuls only);
``matmul_nodes`` and ``conv_nodes`` map layers to their nodes; ``qdq_conv`` writes the static
int8 ``Q/DQ -> Conv -> Q/DQ`` pattern ONNX Runtime fuses into ``QLinearConv``, and
``signed_conv_exact`` probes whether that kernel is exact with int8 weights on this CPU.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from mpq.evaluators.quantize import choose_qparams, quantize, weight_qparams
from mpq.spaces.discover import LayerInfo

QDQ_CONV = ("conv1d", "conv2d")


def gemm_to_matmul(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Rewrite ``Gemm(A, W, b, transB=1)`` with initializer ``W`` as ``MatMul(A, W^T) + b``.

    Returns: weight initializer name -> the new MatMul nodes' names (several where the module
    runs more than once per call: ``W^T`` is written once, every node reads it).
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    renamed: dict[str, list[str]] = {}
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
        wt_name = f"{node.input[1]}_T"
        if node.input[1] not in renamed:
            w = numpy_helper.to_array(inits[node.input[1]])
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
        renamed.setdefault(node.input[1], []).append(mm_name)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return renamed


def matmul_nodes(
    model: onnx.ModelProto, layers: tuple[LayerInfo, ...], renamed: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Layer name -> the MatMul node names that multiply by its weight.

    The exporter names a node by its module scope, and nests containers unevenly
    (``/blocks/blocks.0/ff1/MatMul`` for ``blocks.0.ff1``), while a constant-folded weight
    loses its name (``onnx::MatMul_365``). So a node belongs to the longest module name its
    scope ends with, and only where its initializer is the layer's transposed weight (K rows),
    or a slice of it (attention whose query and key/value inputs differ: two MatMuls). A scope
    that is the end of exactly one module's name belongs to it (a wrapper that calls a
    sub-module directly leaves the skipped parents out of the scope).
    """
    inits = {i.name: tuple(i.dims) for i in model.graph.initializer}
    out: dict[str, list[str]] = {}
    by_module = {la.module: la for la in layers if la.kind in ("linear", "attention_in_proj")}
    # a recurrent module exported as its products (``recurrent.StepwiseRecurrent``): each
    # product's scope is the layer's own name (``memory_gru.weight_ih_l0``)
    by_module |= {la.name: la for la in layers if la.kind in ("gru", "lstm", "rnn")}
    for la in layers:
        wname = f"{la.module}.{la.param}"
        if wname in renamed:
            out.setdefault(la.name, []).extend(renamed[wname])
    from_gemm = {name for names in renamed.values() for name in names}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.name in from_gemm:
            continue
        scope = node.name.lstrip("/").rsplit("/", 1)[0].replace("/", ".")
        owners = [m for m in by_module if scope == m or scope.endswith(f".{m}")]
        if not owners:  # a module its parent's forward skipped (a wrapper calling
            # ``policy.model(...)``): the scope is the end of one module name, and only one
            skipped = [m for m in by_module if m.endswith(f".{scope}")]
            owners = skipped if len(skipped) == 1 else []
        if not owners:
            continue
        la = by_module[max(owners, key=len)]
        dims = inits[node.input[1]]  # W^T (K, N), or columns of it (cross-attention: q; k, v)
        if len(dims) == 2 and dims[0] == la.reduction_size and dims[1] <= la.shape[0]:
            out.setdefault(la.name, []).append(node.name)
    return out


def conv_nodes(
    model: onnx.ModelProto, layers: tuple[LayerInfo, ...]
) -> dict[str, list[onnx.NodeProto]]:
    """Layer name -> the ``Conv`` nodes whose weight input is that layer's parameter: one, or
    several where the module runs more than once per call (a diffusion policy's denoising loop,
    unrolled by the exporter, runs each convolution at every step)."""
    by_weight = {f"{la.module}.{la.param}": la.name for la in layers if la.kind in QDQ_CONV}
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        if n.op_type == "Conv" and n.input[1] in by_weight:
            out.setdefault(by_weight[n.input[1]], []).append(n)
    return out


def gather_tables(model: onnx.ModelProto, layers: tuple[LayerInfo, ...]) -> dict[str, str]:
    """Embedding layer name -> its table's initializer, where only ``Gather`` nodes (axis 0)
    read it (a table also read by a ``MatMul``, e.g. tied with an output layer, is left out)."""
    by_weight = {f"{la.module}.{la.param}": la.name for la in layers if la.kind == "embedding"}
    readers: dict[str, set[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            if i in by_weight:
                axis = next((a.i for a in n.attribute if a.name == "axis"), 0)
                ok = n.op_type == "Gather" and n.input[0] == i and axis == 0
                readers.setdefault(i, set()).add("gather" if ok else n.op_type)
    return {by_weight[w]: w for w, kinds in readers.items() if kinds == {"gather"}}


def _uint8_qparams(lo: float, hi: float) -> tuple[np.ndarray, np.ndarray]:
    qp = choose_qparams(torch.tensor(lo), torch.tensor(hi), 8, symmetric=False)
    return np.float32(qp.scale.item()), np.uint8(int(qp.zero_point.item()))


def _conv_weight_codes(
    w: np.ndarray, unsigned_weights: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """int8 codes per output channel, symmetric (the notes' formula), their scales and zero
    points; with ``unsigned_weights`` the same codes as uint8 around 128 (u8 x u8: no 16-bit
    saturation)."""
    grouped, qp = weight_qparams(torch.tensor(w), 8, "per_channel", None, symmetric=True)
    codes = quantize(grouped, qp).reshape(w.shape).numpy()
    s_w = qp.scale.reshape(-1).numpy().astype(np.float32)
    if unsigned_weights:
        return (codes + 128).astype(np.uint8), s_w, np.full(len(s_w), 128, np.uint8)
    return codes.astype(np.int8), s_w, np.zeros(len(s_w), np.int8)


def qdq_conv(
    model: onnx.ModelProto,
    node: onnx.NodeProto,
    ranges: tuple[float, float, float, float],
    unsigned_weights: bool = False,
    weights: str | None = None,
) -> list[onnx.NodeProto]:
    """``Q/DQ(x) -> Conv(DQ(int8 W)) -> Q/DQ(y)`` in place of ``node`` (ORT: ``QLinearConv``).

    ``unsigned_weights``: the int8 codes stored as uint8 with zero point 128 (the same values),
    which ONNX Runtime runs as u8 x u8 -- exact where its u8 x s8 kernel saturates (no VNNI).
    ``weights``: the name of the int8 weight and its input and output quantization parameters,
    written once and shared by every node of one layer (the same codes and ranges: one range
    per module over all its calls); default: the node's own.
    """
    graph, p = model.graph, node.name or node.output[0]
    wp = weights or p
    if not any(i.name == f"{wp}_wq" for i in graph.initializer):
        w = numpy_helper.to_array(next(i for i in graph.initializer if i.name == node.input[1]))
        w_q, s_w, z_w = _conv_weight_codes(w, unsigned_weights)
        s_x, z_x = _uint8_qparams(ranges[0], ranges[1])
        s_y, z_y = _uint8_qparams(ranges[2], ranges[3])
        tensors = {"sx": s_x, "zx": z_x, "sy": s_y, "zy": z_y, "wq": w_q, "sw": s_w, "zw": z_w}
        for name, arr in tensors.items():
            graph.initializer.append(numpy_helper.from_array(np.asarray(arr), f"{wp}_{name}"))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def qdq(op: str, src: str, dst: str, k: str) -> onnx.NodeProto:
        return helper.make_node(op, [src, f"{wp}_s{k}", f"{wp}_z{k}"], [dst])

    return [
        qdq("QuantizeLinear", node.input[0], f"{p}_xq", "x"),
        qdq("DequantizeLinear", f"{p}_xq", f"{p}_xd", "x"),
        helper.make_node(
            "DequantizeLinear", [f"{wp}_wq", f"{wp}_sw", f"{wp}_zw"], [f"{p}_wd"], axis=0
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
    # IR 8 (what opset 17 needs): the installed onnx would stamp its newest, which an older
    # onnxruntime refuses ("Unsupported model IR version: 14, max supported IR version: 13")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    model.graph.node.extend(qdq_conv(model, conv, (0.0, 1.0, 0.0, 128.0)))
    model.graph.initializer.remove(model.graph.initializer[0])  # "w": read, now unused
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    got = session.run(None, {"x": np.ones((1, 64, 1, 1), np.float32)})[0]
    return bool(abs(float(got.reshape(-1)[0]) - 64.0) < 1.0)
