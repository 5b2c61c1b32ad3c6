"""The ``onnxruntime`` backend (default on CPU): one ONNX model with per-node precision.

Export (TorchScript exporter, batch-1 example inputs), then for each Linear / attention
projection whose weight asks for <= 8 bits, ``MatMulNBits`` at 2, 4 or 8 bits with block-32
scales (``MatMulNBitsQuantizer``, one pass per (bits, symmetry, accuracy level) group, every other
node excluded). ``a_bits`` 8 selects ``accuracy_level=4`` (int8 activations inside the kernel),
``a_bits`` 32 keeps float activations (``accuracy_level=1``).

Lowering that is recorded per layer, never hidden:

- 3 bits runs as 4, 5 and 6 bits as 8 (the kernel has 2, 4 and 8); per-channel and per-tensor
  scales run as block-32 scales (finer, the kernel's only layout).
- Conv, GRU/LSTM/RNN and Embedding run in float32 here (no low-bit kernel wired for them yet).
- NOTE: the exporter emits ``Gemm`` for a Linear on 2-D input, which ``MatMulNBits`` skips; such
  nodes are rewritten to ``MatMul`` + ``Add`` first.
"""

from __future__ import annotations

import io
import logging
import warnings
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from mpq.evaluators.backends.base import Lowered, register_backend
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
    """Layer name -> the MatMul node names that multiply by its weight."""
    inits = {i.name for i in model.graph.initializer}
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
        la = by_module.get(scope)
        if la is not None:
            out.setdefault(la.name, []).append(node.name)
    return out


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

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        return (*NBITS, 32) if layer.kind in ("linear", "attention_in_proj") else (32,)

    def fallback_reason(self, layer: LayerInfo, choice: LayerChoice) -> str | None:
        if choice.w_bits == KEEP:
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
    ) -> Lowered:
        import onnxruntime as ort
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        config.check(layers)
        proto = export_onnx(model.eval(), example_inputs)
        renamed = gemm_to_matmul(proto)
        nodes = matmul_nodes(proto, layers, renamed)
        all_mm = {n for names in nodes.values() for n in names}
        kernels: dict[str, str] = {}
        fallbacks: dict[str, str] = {}
        groups: dict[tuple[int, bool, int], list[str]] = {}
        ran: dict[str, LayerChoice] = {}
        for la in layers:
            c = config.layers[la.name]
            if la.name in nodes and c.w_bits <= INT_BITS_MAX:
                bits, level = nbits_for(c.w_bits), 4 if c.a_bits == 8 else 1
                groups.setdefault((bits, c.symmetric, level), []).extend(nodes[la.name])
                kernels[la.name] = f"MatMulNBits int{bits} block{BLOCK} acc{level}"
                ran[la.name] = _ran_choice(c, la)
                reason = self.fallback_reason(la, c)
                if reason is not None:
                    fallbacks[la.name] = reason
            else:
                kernels[la.name] = "float32 (onnxruntime)"
                ran[la.name] = LayerChoice()
                if c.w_bits != KEEP:
                    fallbacks[la.name] = (
                        f"w{c.w_bits} -> float32: no MatMul node found for it in the export"
                        if la.kind in ("linear", "attention_in_proj") and la.name not in nodes
                        else str(self.fallback_reason(la, c))
                    )
        for (bits, symmetric, level), names in sorted(groups.items()):
            q = MatMulNBitsQuantizer(
                proto,
                bits=bits,
                block_size=BLOCK,
                is_symmetric=symmetric,
                accuracy_level=level,
                nodes_to_exclude=sorted(all_mm - set(names)),
            )
            q.process()
            proto = q.model.model
            all_mm -= set(names)
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

        return Lowered(run, session, kernels, fallbacks, QuantConfig(layers=ran))
