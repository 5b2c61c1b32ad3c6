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

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from mpq.evaluators.quantize import quantize, weight_qparams
from mpq.spaces.space import LayerChoice

BLOCK = 32


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
    bits, nb = ran.w_bits, -(-k // BLOCK)
    grouped, qp = weight_qparams(
        torch.from_numpy(w), bits, ran.granularity, ran.group_size, ran.symmetric
    )
    codes = quantize(grouped, qp).reshape(n, k).numpy()
    scale = qp.scale.reshape(n, -1).numpy().astype(np.float32)  # (N, groups) groups: nb or 1
    zero = qp.zero_point.reshape(n, -1).numpy()
    if ran.symmetric:
        offset = 2 ** (bits - 1)
        codes, zero = codes + offset, np.full_like(zero, offset)
    if scale.shape[1] != nb:  # per channel: the row's scale and zero point in every block
        scale, zero = np.repeat(scale, nb, 1), np.repeat(zero, nb, 1)
    padded = np.concatenate([codes, np.repeat(zero[:, -1:], nb * BLOCK - k, 1)], 1)
    blocks = padded.reshape(n, nb, BLOCK).astype(np.uint8)
    out = [
        numpy_helper.from_array(_pack(blocks, bits), f"{name}_nbits_B"),
        numpy_helper.from_array(scale.reshape(-1), f"{name}_nbits_scales"),
    ]
    if not ran.symmetric:
        zp = _pack(zero.astype(np.uint8), bits).reshape(-1)
        out.append(numpy_helper.from_array(zp, f"{name}_nbits_zero_points"))
    return out, n, k


def replace_matmuls(model: onnx.ModelProto, choices: dict[str, tuple[LayerChoice, int]]) -> None:
    """In place: each ``MatMul`` node named in ``choices`` (node name -> (the choice that runs,
    accuracy level)) becomes ``MatMulNBits`` with the notes' codes; the float weight goes."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    dropped: set[str] = set()
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.name not in choices:
            nodes.append(node)
            continue
        ran, level = choices[node.name]
        w_t = numpy_helper.to_array(inits[node.input[1]])  # (K, N)
        tensors, n, k = nbits_tensors(np.ascontiguousarray(w_t.T, np.float32), ran, node.name)
        graph.initializer.extend(tensors)
        dropped.add(node.input[1])
        nodes.append(
            helper.make_node(
                "MatMulNBits",
                [node.input[0], *(t.name for t in tensors)],
                list(node.output),
                name=f"{node.name}_Q{ran.w_bits}",
                domain="com.microsoft",
                K=k,
                N=n,
                bits=ran.w_bits,
                block_size=BLOCK,
                accuracy_level=level,
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = {i for node in graph.node for i in node.input}
    keep = [i for i in graph.initializer if i.name not in dropped or i.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
