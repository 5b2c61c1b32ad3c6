"""Weight-only layers stored at their bits and dequantized by the graph, folded by ONNX Runtime
into a float32 weight when the session loads: low-bit bytes in the file, the float MatMul's
speed, exactly the asked codes (``DEQUANT``; ``onnxruntime_backend`` says when it is used)."""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from mpq.evaluators.backends.onnx_nbits import container_bits, pack_codes, rewrite_matmuls
from mpq.evaluators.quantize import quantize, weight_qparams
from mpq.spaces.space import LayerChoice


def _const(name: str, value: np.ndarray) -> onnx.NodeProto:
    """A ``Constant`` node: graph structure (shapes, shifts), not a stored weight."""
    return helper.make_node(
        "Constant", [], [name], name=name, value=numpy_helper.from_array(value, name)
    )


def _unpack_nodes(packed: str, c: int, count: int, p: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes that unpack ``count`` codes of ``c`` bits from the uint8 tensor ``packed`` (low
    bits first: code ``j`` of a byte is ``(byte >> j c) mod 2^c``); returns (nodes, the flat
    uint8 codes' name)."""
    if c == 8:
        return [], packed
    nodes, parts = [], []
    for j in range(8 // c):
        nodes += [
            _const(f"{p}_shift{j}", np.array([j * c], np.uint8)),
            helper.make_node(
                "BitShift", [packed, f"{p}_shift{j}"], [f"{p}_s{j}"], direction="RIGHT"
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
        _const(f"{p}_end", np.array([count], np.int64)),
        helper.make_node("Slice", [f"{p}_padded", f"{p}_start", f"{p}_end"], [f"{p}_flat"]),
    ]
    return nodes, f"{p}_flat"


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
    packed = pack_codes((codes + offset).astype(np.uint8)[None, :], c).reshape(-1)
    inits = [
        numpy_helper.from_array(packed, f"{name}_dq_codes"),
        numpy_helper.from_array(qp.scale.numpy().astype(np.float32), f"{name}_dq_scales"),
    ]
    p = f"{name}_dq"
    nodes, flat = _unpack_nodes(inits[0].name, c, codes.size, p)
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

    def rewrite(
        node: onnx.NodeProto, w: np.ndarray, prefix: str
    ) -> tuple[list, list[onnx.NodeProto]]:
        tensors, dq_nodes, weight = dequant_graph(w, choices[node.name], prefix)
        matmul = helper.make_node(
            "MatMul", [node.input[0], weight], list(node.output), name=node.name
        )
        return tensors, [*dq_nodes, matmul]

    rewrite_matmuls(model, set(choices), rewrite, lambda node: choices[node.name])
