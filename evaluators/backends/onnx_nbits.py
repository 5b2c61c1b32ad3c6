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


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
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
        numpy_helper.from_array(pack_codes(blocks, bits), f"{name}_nbits_B"),
        numpy_helper.from_array(scale.reshape(-1), f"{name}_nbits_scales"),
    ]
    if not ran.symmetric:
        zp = pack_codes(zero.astype(np.uint8), bits).reshape(-1)
        out.append(numpy_helper.from_array(zp, f"{name}_nbits_zero_points"))
    return out, n, k


def rewrite_matmuls(
    model: onnx.ModelProto,
    names: set[str],
    rewrite: Callable[[onnx.NodeProto, np.ndarray, str], tuple[list, list[onnx.NodeProto]]],
    choice_of: Callable[[onnx.NodeProto], object] = lambda node: None,
) -> None:
    """In place: each ``MatMul`` node in ``names`` becomes ``rewrite(node, W, prefix)`` (``W``:
    its float weight, N rows x K; ``prefix``: the name its new tensors take, that of the first
    node reading the weight: a scope path, where the weight's own name may be the exporter's
    running number, which shifts with anything traced before it) ->
    (new initializers, nodes that replace it); the float weight goes unless another node still
    reads it. Several nodes reading one weight (a module run at every step of an unrolled loop)
    share its new tensors and the nodes that make them from those: written once, where they
    run the same choice (``choice_of``; the exporter also merges equal weights of different
    layers into one initializer, which may run other choices: tensors of their own)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    dropped: set[str] = set()
    written: set[str] = set()  # tensors and node outputs already in the graph
    prefixes: dict[tuple[str, str], str] = {}  # (weight, choice) -> first reader's node name
    nodes = []
    for node in graph.node:
        if node.op_type != "MatMul" or node.name not in names:
            nodes.append(node)
            continue
        w_t = numpy_helper.to_array(inits[node.input[1]])  # (K, N)
        prefix = prefixes.setdefault((node.input[1], repr(choice_of(node))), node.name)
        tensors, new_nodes = rewrite(node, np.ascontiguousarray(w_t.T, np.float32), prefix)
        graph.initializer.extend(t for t in tensors if t.name not in written)
        written |= {t.name for t in tensors}
        new_nodes = [n for n in new_nodes if not set(n.output) & written]
        written |= {o for n in new_nodes for o in n.output if o not in node.output}
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

    def rewrite(
        node: onnx.NodeProto, w: np.ndarray, prefix: str
    ) -> tuple[list, list[onnx.NodeProto]]:
        ran, level = choices[node.name]
        tensors, n, k = nbits_tensors(w, ran, prefix)
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

    rewrite_matmuls(model, set(choices), rewrite, lambda node: choices[node.name])
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


DEQUANT = "MatMul float32 (int{bits} weights, dequantized at load)"


def container_bits(bits: int) -> int:
    """The packing width of ``bits``-bit codes in the dequantized-at-load layout (2, 4 or 8)."""
    return next(c for c in (2, 4, 8) if c >= bits)


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
        numpy_helper.from_array(pack_codes(codes.astype(np.uint8), bits), f"{name}_gbq_data"),
        numpy_helper.from_array(scale, f"{name}_gbq_scales"),
    ]
    if not ran.symmetric:
        zp = pack_codes(zero.astype(np.uint8), bits)
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


def untranspose_tied_tables(model: onnx.ModelProto) -> None:
    """In place: an embedding table tied to an output projection (GPT-2's ``wte`` and
    ``lm_head``) is exported twice, the table for its ``Gather`` and the exporter's constant-
    folded transpose for the ``MatMul``; the copy becomes a ``Transpose`` node of the table
    (folded again by ONNX Runtime when the session loads: the file ships the table once, as
    the size formula counts it)."""
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    tables = {
        n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in inits
    }
    nodes = []
    for table in tables:
        a = numpy_helper.to_array(inits[table])
        if a.ndim != 2:
            continue
        for name, init in list(inits.items()):
            if name == table or tuple(init.dims) != (a.shape[1], a.shape[0]):
                continue
            if (
                init.data_type == inits[table].data_type
                and (numpy_helper.to_array(init) == a.T).all()
            ):
                nodes.append(helper.make_node("Transpose", [table], [name], perm=[1, 0]))
                del inits[name]
    if nodes:
        keep = [i for i in model.graph.initializer if i.name in inits]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
        for node in reversed(nodes):  # first: the graph stays topologically sorted
            model.graph.node.insert(0, node)


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
    # IR 8 (what opset 17 needs): the installed onnx would stamp its newest, which an older
    # onnxruntime refuses ("Unsupported model IR version: 14, max supported IR version: 13")
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
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
