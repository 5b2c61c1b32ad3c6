"""``MatMulNBits`` nodes written with the design notes' codes, so ONNX Runtime runs exactly the
weights the simulated model uses.

ONNX Runtime's own ``MatMulNBitsQuantizer`` picks its codes differently (symmetric 4-bit:
``s = w_maxabs / -8``; the notes: ``s = max|w| / 7``), which put the lowered model 14% (4-bit)
to 93% (2-bit) of the output scale away from the simulated one on a 1024 -> 36 layer. Here each
mapped ``MatMul(A, B)`` becomes ``MatMulNBits(A, B_q, scales[, zero_points])`` (domain
``com.microsoft``) with::

    B_q:          uint8 [N, nb, 32 * b / 8]   codes of each row's blocks of 32 along K, packed
                                              low bits first; the last block padded with z
    scales:       float32 [N * nb]            per block (a per-channel choice: the row's scale
                                              in every block of the row)
    zero_points:  uint8 [N * ceil(nb * b / 8)]  asymmetric only, packed per row the same way;
                                              symmetric: the kernel's default 2^(b-1), codes
                                              stored as q + 2^(b-1)

so ``(B_q - z) * s`` is the notes' ``x' = (Q(x) - z) * s`` bit for bit.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from mpq.evaluators.quantize import quantize, weight_qparams
from mpq.evaluators.size import layer_size_bytes
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import LayerChoice

BLOCK = 32  # the default block; per_group choices of BLOCKS run at their own size
BLOCKS = (16, 32, 64, 128, 256)  # what MatMulNBits and GatherBlockQuantized accept


def block_of(ran: LayerChoice) -> int:
    """The kernel's block size for ``ran``: its group, or ``BLOCK`` (a per-channel choice
    stores the row's scale in every block)."""
    return ran.group_size if ran.granularity == "per_group" and ran.group_size else BLOCK


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned ``bits``-bit codes along the last axis into bytes, low bits first."""
    per_byte = 8 // bits
    pad = (-codes.shape[-1]) % per_byte
    if pad:
        codes = np.concatenate([codes, np.zeros((*codes.shape[:-1], pad), codes.dtype)], -1)
    grouped = codes.reshape(*codes.shape[:-1], -1, per_byte).astype(np.uint16)
    shifts = (np.arange(per_byte, dtype=np.uint16) * bits)[None, :]
    return (grouped << shifts).sum(-1).astype(np.uint8)


def nbits_tensors(
    w: np.ndarray, ran: LayerChoice, name: str
) -> tuple[list[onnx.TensorProto], int, int]:
    """The initializers of ``w`` (N rows, K) at the choice that runs; returns (them, N, K)."""
    n, k = w.shape
    block = block_of(ran)
    bits, nb = ran.w_bits, -(-k // block)
    grouped, qp = weight_qparams(
        torch.tensor(w), bits, ran.granularity, ran.group_size, ran.symmetric
    )
    codes = quantize(grouped, qp).reshape(n, k).numpy()
    scale = qp.scale.reshape(n, -1).numpy().astype(np.float32)  # (N, groups) groups: nb or 1
    zero = qp.zero_point.reshape(n, -1).numpy()
    if ran.symmetric:
        offset = 2 ** (bits - 1)
        codes, zero = codes + offset, np.full_like(zero, offset)
    if scale.shape[1] != nb:  # per channel: the row's scale and zero point in every block
        scale, zero = np.repeat(scale, nb, 1), np.repeat(zero, nb, 1)
    padded = np.concatenate([codes, np.repeat(zero[:, -1:], nb * block - k, 1)], 1)
    blocks = padded.reshape(n, nb, block).astype(np.uint8)
    out = [
        numpy_helper.from_array(_pack(blocks, bits), f"{name}_nbits_B"),
        numpy_helper.from_array(scale.reshape(-1), f"{name}_nbits_scales"),
    ]
    if not ran.symmetric:
        zp = _pack(zero.astype(np.uint8), bits).reshape(-1)
        out.append(numpy_helper.from_array(zp, f"{name}_nbits_zero_points"))
    return out, n, k


def _rewrite_matmuls(
    model: onnx.ModelProto,
    names: set[str],
    rewrite: Callable[[onnx.NodeProto, np.ndarray], tuple[list, list[onnx.NodeProto]]],
) -> None:
    """In place: each ``MatMul`` node in ``names`` becomes ``rewrite(node, W)`` (``W``: its
    float weight, N rows x K) -> (new initializers, nodes that replace it); the float weight
    goes unless another node still reads it."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    dropped: set[str] = set()
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.name not in names:
            nodes.append(node)
            continue
        w_t = numpy_helper.to_array(inits[node.input[1]])  # (K, N)
        tensors, new_nodes = rewrite(node, np.ascontiguousarray(w_t.T, np.float32))
        graph.initializer.extend(tensors)
        dropped.add(node.input[1])
        nodes += new_nodes
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = {i for node in graph.node for i in node.input}
    keep = [i for i in graph.initializer if i.name not in dropped or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def replace_matmuls(model: onnx.ModelProto, choices: dict[str, tuple[LayerChoice, int]]) -> None:
    """In place: each ``MatMul`` node named in ``choices`` (node name -> (the choice that runs,
    accuracy level)) becomes ``MatMulNBits`` with the notes' codes; the float weight goes."""

    def rewrite(node: onnx.NodeProto, w: np.ndarray) -> tuple[list, list[onnx.NodeProto]]:
        ran, level = choices[node.name]
        tensors, n, k = nbits_tensors(w, ran, node.name)
        nbits = helper.make_node(
            "MatMulNBits",
            [node.input[0], *(t.name for t in tensors)],
            list(node.output),
            name=f"{node.name}_Q{ran.w_bits}",
            domain="com.microsoft",
            K=k,
            N=n,
            bits=ran.w_bits,
            block_size=block_of(ran),
            accuracy_level=level,
        )
        return tensors, [nbits]

    _rewrite_matmuls(model, set(choices), rewrite)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


DEQUANT = "MatMul float32 (int{bits} weights, dequantized at load)"


def container_bits(bits: int) -> int:
    """The packing width of ``bits``-bit codes in the dequantized-at-load layout (2, 4 or 8)."""
    return next(c for c in (2, 4, 8) if c >= bits)


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    """A ``Constant`` node: graph structure (shapes, shifts), not a stored weight."""
    return helper.make_node(
        "Constant", [], [name], name=name, value=numpy_helper.from_array(value, name)
    )


def dequant_graph(
    w: np.ndarray, ran: LayerChoice, name: str
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto], str]:
    """A weight-only layer stored at its bits and dequantized by the graph: (initializers,
    nodes, the output holding ``W^T`` (K, N) float32) for ``w`` (N rows, K).

    Stored: the notes' codes of ``group_view(w)`` (symmetric: ``q + 2^(b-1)``) packed
    ``container_bits(b)`` to a byte, low bits first; a float32 scale per group; asymmetric, a
    uint8 zero point per group. The nodes unpack (``BitShift``, ``Mod``), ``Cast``, subtract
    the zero point, multiply by the scale -- ``x' = (Q(x) - z) * s`` in the simulated model's
    operation order, so bit for bit -- and transpose. Every input is a constant, so ONNX
    Runtime folds the chain into one float32 weight when the session loads: the step runs
    ONNX Runtime's float MatMul, while the file ships the low-bit codes.
    """
    grouped, qp = weight_qparams(
        torch.tensor(w), ran.w_bits, ran.granularity, ran.group_size, ran.symmetric
    )
    codes = quantize(grouped, qp).reshape(-1).numpy().astype(np.int64)
    offset = 2 ** (ran.w_bits - 1) if ran.symmetric else 0
    c = container_bits(ran.w_bits)
    per_byte = 8 // c
    packed = _pack((codes + offset).astype(np.uint8)[None, :], c).reshape(-1)
    inits = [
        numpy_helper.from_array(packed, f"{name}_dq_codes"),
        numpy_helper.from_array(qp.scale.numpy().astype(np.float32), f"{name}_dq_scales"),
    ]
    p = f"{name}_dq"
    nodes = []
    if per_byte == 1:
        flat = inits[0].name
    else:
        parts = []
        for j in range(per_byte):
            nodes += [
                _const(f"{p}_shift{j}", np.array([j * c], np.uint8)),
                helper.make_node(
                    "BitShift", [inits[0].name, f"{p}_shift{j}"], [f"{p}_s{j}"], direction="RIGHT"
                ),
                _const(f"{p}_mod{j}", np.array([2**c], np.uint8)),
                helper.make_node("Mod", [f"{p}_s{j}", f"{p}_mod{j}"], [f"{p}_m{j}"]),
                _const(f"{p}_axes{j}", np.array([1], np.int64)),
                helper.make_node("Unsqueeze", [f"{p}_m{j}", f"{p}_axes{j}"], [f"{p}_u{j}"]),
            ]
            parts.append(f"{p}_u{j}")
        nodes += [
            helper.make_node("Concat", parts, [f"{p}_cat"], axis=1),
            _const(f"{p}_flat_shape", np.array([-1], np.int64)),
            helper.make_node("Reshape", [f"{p}_cat", f"{p}_flat_shape"], [f"{p}_padded"]),
            _const(f"{p}_start", np.array([0], np.int64)),
            _const(f"{p}_end", np.array([codes.size], np.int64)),
            helper.make_node("Slice", [f"{p}_padded", f"{p}_start", f"{p}_end"], [f"{p}_flat"]),
        ]
        flat = f"{p}_flat"
    nodes += [
        helper.make_node("Cast", [flat], [f"{p}_f"], to=onnx.TensorProto.FLOAT),
        _const(f"{p}_grouped_shape", np.array(grouped.shape, np.int64)),
        helper.make_node("Reshape", [f"{p}_f", f"{p}_grouped_shape"], [f"{p}_g"]),
    ]
    if ran.symmetric:
        nodes.append(_const(f"{p}_offset", np.array(offset, np.float32)))
        zero = f"{p}_offset"
    else:
        zp = qp.zero_point.numpy().astype(np.uint8)
        inits.append(numpy_helper.from_array(zp, f"{name}_dq_zero_points"))
        nodes.append(helper.make_node("Cast", [inits[-1].name], [f"{p}_z"], to=1))
        zero = f"{p}_z"
    n, k = w.shape
    nodes += [
        helper.make_node("Sub", [f"{p}_g", zero], [f"{p}_centred"]),
        helper.make_node("Mul", [f"{p}_centred", inits[1].name], [f"{p}_w"]),
        _const(f"{p}_shape", np.array([n, k], np.int64)),
        helper.make_node("Reshape", [f"{p}_w", f"{p}_shape"], [f"{p}_rows"]),
        helper.make_node("Transpose", [f"{p}_rows"], [f"{p}_wt"], perm=[1, 0]),
    ]
    return inits, nodes, f"{p}_wt"


def replace_with_dequant(model: onnx.ModelProto, choices: dict[str, LayerChoice]) -> None:
    """In place: the weight of each ``MatMul`` named in ``choices`` (node name -> the choice
    that runs, weight-only) is stored at its bits and dequantized by the graph
    (``dequant_graph``); the float weight goes."""

    def rewrite(node: onnx.NodeProto, w: np.ndarray) -> tuple[list, list[onnx.NodeProto]]:
        tensors, dq_nodes, weight = dequant_graph(w, choices[node.name], node.name)
        matmul = helper.make_node(
            "MatMul", [node.input[0], weight], list(node.output), name=node.name
        )
        return tensors, [*dq_nodes, matmul]

    _rewrite_matmuls(model, set(choices), rewrite)


def gather_tensors(w: np.ndarray, ran: LayerChoice, name: str) -> list[onnx.TensorProto]:
    """``GatherBlockQuantized``'s initializers of an embedding table ``w`` (V rows, D)::

        data:         uint8 [V, D * b / 8]   each row's codes, packed low bits first
        scales:       float32 [V, D / g]     per block of g = ``ran.group_size`` along D
        zero_points:  uint8 [V, ceil(D / g * b / 8)]  asymmetric only, packed the same way;
                                             symmetric: the kernel's default 2^(b-1), codes
                                             stored as q + 2^(b-1)

    so ``(data - z) * s`` is the notes' ``x' = (Q(x) - z) * s`` of the row, bit for bit.
    """
    v, d = w.shape
    bits = ran.w_bits
    grouped, qp = weight_qparams(
        torch.tensor(w), bits, ran.granularity, ran.group_size, ran.symmetric
    )
    codes = quantize(grouped, qp).reshape(v, d).numpy()
    scale = qp.scale.reshape(v, -1).numpy().astype(np.float32)
    zero = qp.zero_point.reshape(v, -1).numpy()
    if ran.symmetric:
        codes = codes + 2 ** (bits - 1)
    out = [
        numpy_helper.from_array(_pack(codes.astype(np.uint8), bits), f"{name}_gbq_data"),
        numpy_helper.from_array(scale, f"{name}_gbq_scales"),
    ]
    if not ran.symmetric:
        zp = _pack(zero.astype(np.uint8), bits)
        out.append(numpy_helper.from_array(zp, f"{name}_gbq_zero_points"))
    return out


def replace_gathers(model: onnx.ModelProto, choices: dict[str, LayerChoice]) -> None:
    """In place: each ``Gather`` of an embedding table named in ``choices`` (initializer name
    -> the choice that runs: per group along D) becomes ``GatherBlockQuantized`` (domain
    ``com.microsoft``), so the file stores the table at its bits; the float table goes."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    written: dict[str, list[onnx.TensorProto]] = {}  # a table read by several Gathers: once
    nodes = []
    for node in graph.node:
        table = node.input[0] if node.op_type == "Gather" else None
        if table not in choices:
            nodes.append(node)
            continue
        ran = choices[table]
        if table not in written:
            w = numpy_helper.to_array(inits[table]).astype(np.float32)
            written[table] = gather_tensors(w, ran, table)
            graph.initializer.extend(written[table])
        tensors = written[table]
        nodes.append(
            helper.make_node(
                "GatherBlockQuantized",
                [tensors[0].name, node.input[1], *(t.name for t in tensors[1:])],
                list(node.output),
                name=f"{node.name or node.output[0]}_Q{ran.w_bits}",
                domain="com.microsoft",
                gather_axis=0,
                quantize_axis=1,
                block_size=ran.group_size,
                bits=ran.w_bits,
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


def prune_initializers(model: onnx.ModelProto) -> None:
    """In place: drop every initializer no node (nor a subgraph's node) reads and no graph
    output names -- the float weights a rewrite replaced -- so the file's bytes are what runs."""

    def used_by(graph: onnx.GraphProto) -> set[str]:
        names = {o.name for o in graph.output}
        for node in graph.node:
            names.update(node.input)
            for attr in node.attribute:
                for sub in [attr.g, *attr.graphs] if attr.type in (5, 10) else []:
                    names |= used_by(sub)
        return names

    used = used_by(model.graph)
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# Bytes of what ships: the initializers the graph uses, and the packing formula per kernel.


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

    ``MatMulNBits`` (N output rows, K inputs, blocks of g = the choice's group or 32,
    ``nb = ceil(K / g)`` blocks per row: K is padded to whole blocks, zero points are packed
    per row)::

        N * nb * g * b / 8  +  4 * N * nb  +  (asymmetric) N * ceil(nb * b / 8)

    ``QLinearConv``: 8-bit weights, a float32 scale and an 8-bit zero point per output channel,
    and the input and output activation scale (float32) and zero point (uint8):
    ``n + 5 * C_out + 2 * (4 + 1)``.
    ``GatherBlockQuantized`` (V rows, D, ``g`` per block): ``V * ceil(D b / 8) + 4 * V * D / g
    + (asymmetric) V * ceil(D / g * b / 8)``.
    ``DEQUANT`` (weight-only, dequantized at load; G groups of the choice, c =
    ``container_bits(b)``): ``ceil(n * c / 8) + 4 * G + (asymmetric) G``.
    Layers in float: ``evaluators.size``.
    """
    if kernel.startswith("MatMulNBits"):
        k = layer.reduction_size
        block = block_of(ran)
        n_rows, blocks, b = layer.num_params // k, math.ceil(k / block), ran.w_bits
        zero = 0 if ran.symmetric else n_rows * math.ceil(blocks * b / 8)
        return n_rows * blocks * block * b // 8 + 4 * n_rows * blocks + zero
    if kernel.startswith("MatMul float32 (int"):  # DEQUANT
        groups = 1 if ran.granularity == "per_tensor" else layer.shape[0]
        if ran.granularity == "per_group":
            groups *= layer.reduction_size // (ran.group_size or layer.reduction_size)
        codes = math.ceil(layer.num_params * container_bits(ran.w_bits) / 8)
        return codes + 4 * groups + (0 if ran.symmetric else groups)
    if kernel.startswith("QLinearConv"):
        return layer.num_params + 5 * layer.shape[0] + 2 * (4 + 1)
    if kernel.startswith("GatherBlockQuantized"):
        v, d, b = layer.shape[0], layer.reduction_size, ran.w_bits
        blocks = d // (ran.group_size or d)
        zero = 0 if ran.symmetric else v * math.ceil(blocks * b / 8)
        return v * math.ceil(d * b / 8) + 4 * v * blocks + zero
    return layer_size_bytes(layer, ran)


@functools.cache
def int8_input_runs(bits: int) -> bool:
    """Whether ``MatMulNBits`` at ``bits`` with ``accuracy_level=4`` really quantizes its input
    to int8 on this CPU (ONNX Runtime quietly computes in float where MLAS has no such kernel).

    Probed once per process: one row whose first input is 1 and the others 0.004 makes the
    per-block int8 result (1.372) and the float one (1.252) differ; weights all 1 (exact).
    """
    import onnxruntime as ort

    k = 64
    a = np.full((1, k), 0.004, np.float32)
    a[0, 0] = 1.0
    x = helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [1, k])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1])
    node = helper.make_node("MatMul", ["a", "w"], ["y"], name="probe")
    graph = helper.make_graph([node], "probe", [x], [y])
    graph.initializer.append(numpy_helper.from_array(np.ones((k, 1), np.float32), "w"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    ran = LayerChoice(w_bits=bits, granularity="per_group", group_size=BLOCK)
    replace_matmuls(model, {"probe": (ran, 4)})
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    got = float(session.run(None, {"a": a})[0].reshape(-1)[0])
    blocks = a.reshape(-1, BLOCK)
    scale = np.abs(blocks).max(1, keepdims=True) / 127
    int8 = float((np.round(blocks / scale) * scale).sum())
    return abs(got - int8) < abs(got - float(a.sum()))
