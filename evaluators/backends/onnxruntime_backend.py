"""The ``onnxruntime`` backend (default on CPU): one ONNX model with per-node precision.

Export (TorchScript exporter, batch-1 example inputs), then for each Linear / attention
projection whose weight asks for <= 8 bits with ``a_bits`` 8, ``MatMulNBits`` at 2, 4 or 8 bits
with ``accuracy_level=4`` (the kernel quantizes its input to int8, symmetric per block of 32:
recorded as ``per_block``, which the simulated model of what ran reproduces) and a scale per
block, holding the design notes' codes (``onnx_nbits``: the simulated model's weights bit for
bit); every other MatMul left alone.

Weight-only (``a_bits`` 32, or 8 where this CPU's ``MatMulNBits`` has no int8-input kernel):
the weights ship at their bits and the graph dequantizes them (``onnx_nbits.dequant_graph``),
which ONNX Runtime folds into a float32 weight when the session loads, so the layer runs the
float MatMul: exactly the asked codes (any bits, granularity, group, symmetry), float speed,
low-bit bytes. NOTE: ``MatMulNBits`` at accuracy level 1 (its weight-only mode) ran 4-8x
slower than float on an AVX2 CPU (uniform W8A32 0.25x end to end), so it is not used.

Lowering that is recorded per layer, never hidden:

- On ``MatMulNBits``: 3 bits runs as 4, 5 and 6 bits as 8 (the kernel has 2, 4 and 8);
  per-tensor scales run as block-32 scales (finer, the kernel's only layout), per-channel ones
  too where 32 divides K.
- Conv1d/Conv2d with ``w_bits`` <= 8 and ``a_bits`` 8: static QDQ int8 -- ``QuantizeLinear``/
  ``DequantizeLinear`` around the ``Conv`` (input and output ranges calibrated on the project's
  calibration batches with the notes' min-max formula, uint8 asymmetric per tensor; weights
  int8 symmetric per output channel), which ONNX Runtime fuses into ``QLinearConv``. Narrower
  weights run as int8, dynamic activation ranges as calibrated static ones (ORT's dynamic int8
  conv is slow); without calibration data the conv runs in float32. All recorded.
- Embedding with ``w_bits`` <= 8: ``GatherBlockQuantized`` (com.microsoft) with the notes'
  codes at 2, 4 or 8 bits per block of 32 (16 where the embedding dimension is no multiple of
  32) along the embedding dimension, so the file stores the table at its bits (size, not
  speed: a gather is cheap either way); a table tied to an output layer stays float32.
- GRU/LSTM/RNN (single layer, one direction) that the example inputs run one step per call (a
  policy's memory at T = 1): rewritten as their two products plus gates (``recurrent``: exact in
  float), so ``weight_ih``/``weight_hh`` run on ``MatMulNBits`` like a Linear's weight. A
  recurrent module run over several steps per call stays ONNX Runtime's fused float node (an
  unrolled sequence is slower than it), said per layer.
- Conv3d runs in float32 here (no low-bit kernel wired for it).
- NOTE: the exporter emits ``Gemm`` for a Linear on 2-D input, which ``MatMulNBits`` skips; such
  nodes are rewritten to ``MatMul`` + ``Add`` first.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from mpq.evaluators.apply import static_ranges
from mpq.evaluators.backends.base import (
    RECURRENT_KINDS,
    LayerPlan,
    Lowered,
    Plan,
    PlannedBackend,
    register_backend,
)
from mpq.evaluators.backends.onnx_graph import (  # noqa: F401  (re-exported for tests)
    QDQ_CONV,
    conv_nodes,
    gather_tables,
    gemm_to_matmul,
    matmul_nodes,
    qdq_conv,
    signed_conv_exact,
)
from mpq.evaluators.backends.onnx_nbits import (
    BLOCK,
    BLOCKS,
    DEQUANT,
    block_of,
    int8_input_runs,
    packed_layer_bytes,
    prune_initializers,
    replace_gathers,
    replace_matmuls,
    replace_with_dequant,
    stored_bytes,
)
from mpq.evaluators.recurrent import rewritable, sequence_lengths, with_stepwise
from mpq.evaluators.size import config_size
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


def _int8_input(choice: LayerChoice) -> bool:
    """a8 asked, and this CPU's MatMulNBits at that width really has the int8-input kernel."""
    return choice.a_bits == 8 and int8_input_runs(nbits_for(choice.w_bits))


def _asked_block(choice: LayerChoice, size: int) -> int | None:
    """The asked group size where the kernels have it (``BLOCKS``) and it divides ``size``."""
    g = choice.group_size if choice.granularity == "per_group" else None
    return g if g in BLOCKS and size % g == 0 else None


def _ran_choice(choice: LayerChoice, layer: LayerInfo) -> LayerChoice:
    """What ``MatMulNBits`` runs: codes at 2/4/8 bits per block along K -- the asked group size
    where the kernel has it, else 32 (per channel where K is no multiple of 32: the row's
    scale in every block); accuracy level 4 quantizes its input to int8 per block of 32,
    symmetric (``per_block``; the kernel's input blocks are its weight blocks, so an int8
    input keeps blocks of 32), level 1 keeps it float32."""
    int8_input = _int8_input(choice)
    k = layer.reduction_size
    block = (None if int8_input else _asked_block(choice, k)) or BLOCK
    gran = "per_group" if k % block == 0 else "per_channel"
    return LayerChoice(
        w_bits=nbits_for(choice.w_bits),
        a_bits=8 if int8_input else 32,
        granularity=gran,
        group_size=block if gran == "per_group" else None,
        symmetric=choice.symmetric,
        act_granularity="per_block" if int8_input else "per_tensor",
    )


MATMUL_KINDS = ("linear", "attention_in_proj")
# the weights of a single-layer, one-direction recurrent module: they can run as MatMuls
STEPWISE_PARAMS = ("weight_ih_l0", "weight_hh_l0")


def _float(why: str | None = None) -> LayerPlan:
    return LayerPlan(FLOAT32, LayerChoice(), why)


def _conv_plan(choice: LayerChoice) -> LayerPlan:
    """Static int8 ``QLinearConv``: a8 asked; weights int8 per channel, ranges static."""
    if choice.a_bits != 8:
        return _float(f"w{choice.w_bits} -> float32: QLinearConv needs a_bits 8 (no weight-only)")
    c = CONV_RAN
    asked = (choice.w_bits, choice.granularity, choice.symmetric, choice.act_mode)
    if asked == (c.w_bits, c.granularity, c.symmetric, c.act_mode):
        return LayerPlan(qlinearconv_kernel(), CONV_RAN)
    why = (
        f"w{choice.w_bits} {choice.granularity} a8 {choice.act_mode} -> int8 per_channel a8 "
        "static (QLinearConv)"
    )
    return LayerPlan(qlinearconv_kernel(), CONV_RAN, why)


def _layout_reason(choice: LayerChoice, ran: LayerChoice) -> str | None:
    """Why the weights run at other bits or blocks than asked (None: as asked)."""
    if (ran.w_bits, ran.granularity, ran.group_size) != (
        choice.w_bits,
        choice.granularity,
        choice.group_size,
    ):
        layout = f"block{ran.group_size}" if ran.granularity == "per_group" else ran.granularity
        asked = choice.granularity + (str(choice.group_size) if choice.group_size else "")
        why = ""
        if ran.a_bits == 8 and choice.group_size in BLOCKS and choice.group_size != BLOCK:
            why = f" (the int8 input is quantized per block of {BLOCK}, the weights' block)"
        return f"w{choice.w_bits} {asked} -> int{ran.w_bits} {layout}{why}"
    return None


def _gather_plan(layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
    """``GatherBlockQuantized``: the table at 2/4/8 bits per block of 32 (or 16) along D."""
    w, d = choice.w_bits, layer.reduction_size
    if layer.tied:
        return _float(f"w{w} -> float32: the table is shared with {layer.tied[0]!r}")
    block = _asked_block(choice, d) or next((b for b in (BLOCK, 16) if d % b == 0), None)
    if block is None:
        why = f"w{w} -> float32: embedding dim {d} is no multiple of 16 (the smallest block)"
        return _float(why)
    ran = LayerChoice(
        w_bits=nbits_for(w), granularity="per_group", group_size=block, symmetric=choice.symmetric
    )
    kernel = f"GatherBlockQuantized int{ran.w_bits} block{block}"
    return LayerPlan(kernel, ran, _layout_reason(choice, ran))


def _dequant_plan(layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
    """Weight-only (``DEQUANT``): the asked codes, float activations; a group that does not
    divide K runs per channel."""
    ran = choice.model_copy(update={"a_bits": KEEP, "act_granularity": "per_tensor"})
    g = choice.group_size if choice.granularity == "per_group" else None
    if g and layer.reduction_size % g:
        ran = ran.model_copy(update={"granularity": "per_channel", "group_size": None})
    why = [_layout_reason(choice, ran)]
    if choice.a_bits == 8:
        why.append(
            f"a8 -> a32: MatMulNBits int{nbits_for(choice.w_bits)} has no int8-input kernel on "
            "this CPU (accuracy level 4 computes in float32 here)"
        )
    elif choice.a_bits == 16:
        why.append("a16 -> float32 activations")
    reason = "; ".join(w for w in why if w) or None
    return LayerPlan(DEQUANT.format(bits=choice.w_bits), ran, reason)


def _on_matmul(kernel: str) -> bool:
    """Whether ``kernel`` replaces an exported MatMul (``MatMulNBits`` or ``DEQUANT``)."""
    return kernel.startswith(("MatMulNBits", "MatMul float32 (int"))


def _matmul_reason(choice: LayerChoice, ran: LayerChoice) -> str | None:
    """Why ``MatMulNBits`` runs ``ran`` for the asked ``choice`` (None: as asked)."""
    layout = _layout_reason(choice, ran)
    if layout is not None:
        return layout
    if choice.a_bits == 8 and (choice.act_mode, choice.act_granularity) != (
        "dynamic",
        "per_block",
    ):
        return (
            f"a8 {choice.act_mode} {choice.act_granularity} -> a8 dynamic symmetric per "
            f"block of {BLOCK} (MatMulNBits accuracy level 4)"
        )
    return None


@register_backend("onnxruntime")
class OnnxRuntimeBackend(PlannedBackend):
    """ONNX Runtime's CPU kernels on an exported graph (see the module docstring)."""

    def __init__(self, name: str = "onnxruntime", device: str = "cpu") -> None:
        self.name = name
        self.device = device

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        kinds = (*MATMUL_KINDS, *RECURRENT_KINDS, "embedding")
        return (*NBITS, 32) if layer.kind in kinds else (32,)

    def float_plan(self, layer: LayerInfo, asked: LayerChoice, why: str) -> LayerPlan:
        return _float(f"w{asked.w_bits} -> float32: {why}")

    def plan_layer(self, layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
        """What runs, from the kind and the choice (given a node found in the export and
        calibration data for static convs: ``plan`` checks those)."""
        if choice.w_bits == KEEP:
            return _float()
        if layer.kind in QDQ_CONV and choice.w_bits <= INT_BITS_MAX:
            return _conv_plan(choice)
        if layer.kind == "embedding" and choice.w_bits <= INT_BITS_MAX:
            return _gather_plan(layer, choice)
        if layer.kind in RECURRENT_KINDS and layer.param not in STEPWISE_PARAMS:
            why = "only a single-layer, one-direction recurrent module runs as MatMuls"
            return _float(f"w{choice.w_bits} -> float32: {why}")
        if layer.kind not in (*MATMUL_KINDS, *RECURRENT_KINDS):
            return _float(f"w{choice.w_bits} -> float32: no low-bit kernel wired for {layer.kind}")
        if choice.w_bits > INT_BITS_MAX:
            return _float(f"w{choice.w_bits} -> float32: float16 has no faster CPU kernel")
        if not _int8_input(choice):  # weight-only: the codes as asked, dequantized at load
            return _dequant_plan(layer, choice)
        ran = _ran_choice(choice, layer)
        kernel = f"MatMulNBits int{ran.w_bits} block{block_of(ran)} acc4"
        return LayerPlan(kernel, ran, _matmul_reason(choice, ran))

    def plan_export(
        self,
        layers: tuple[LayerInfo, ...],
        config: QuantConfig,
        matmuls: Collection[str],
        convs: Collection[str],
        calibrated: bool,
        tables: Collection[str] = (),
        steps: Mapping[str, int] | None = None,
    ) -> Plan:
        """``plan_layer`` per layer, then what the export tells: a layer whose MatMul, Conv or
        Gather node is not in the graph, or a static conv without calibration data, runs
        float; ``steps`` (recurrent module -> steps per call on the example inputs) says why a
        recurrent layer has no MatMul."""
        config.check(layers)
        out = {}
        for la in layers:
            c = config.layers[la.name]
            plan = self.plan_layer(la, c)
            t = (steps or {}).get(la.module, 1)
            if _on_matmul(plan.kernel) and la.kind in RECURRENT_KINDS and t != 1:
                plan = _float(
                    f"w{c.w_bits} -> float32: the {la.kind} runs {t} steps per call here; as "
                    "MatMuls they would unroll (slower than the fused float node)"
                )
            elif _on_matmul(plan.kernel) and la.name not in matmuls:
                plan = _float(f"w{c.w_bits} -> float32: no MatMul node in the export")
            elif plan.kernel.startswith("QLinearConv") and la.name not in convs:
                plan = _float(f"w{c.w_bits} -> float32: no Conv node in the export")
            elif plan.kernel.startswith("QLinearConv") and not calibrated:
                plan = _float(f"w{c.w_bits} -> float32: static int8 conv needs calibration data")
            elif plan.kernel.startswith("GatherBlockQuantized") and la.name not in tables:
                plan = _float(f"w{c.w_bits} -> float32: no Gather alone reads its table")
            out[la.name] = plan
        return Plan(out)

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
        """Execute the plan on the exported graph: static convs as QDQ (ranges calibrated on
        the simulated model of what will run), MatMuls as ``MatMulNBits``, then a session."""
        steps = sequence_lengths(model, example_inputs)
        stepwise = self._stepwise(model, layers, config, steps)
        exported = with_stepwise(model, stepwise) if stepwise else model
        proto = export_onnx(exported.eval(), example_inputs)
        matmuls = matmul_nodes(proto, layers, gemm_to_matmul(proto))
        convs = conv_nodes(proto, layers)
        tables = gather_tables(proto, layers)
        plan = self.plan_export(layers, config, matmuls, convs, bool(calibration), tables, steps)
        qdq = [la for la in layers if plan.layers[la.name].kernel.startswith("QLinearConv")]
        if qdq:
            ran = plan.ran_config  # upstream layers quantized as they will run
            found = static_ranges(model, ran, calibration or [], observer, layers)
            _replace_convs(proto, {la.name: convs[la.name] for la in qdq}, found, layers)
        nbits = {  # MatMul node -> (what runs, accuracy level 4: int8 input)
            node: (p.ran, 4) for name, p in _planned(plan, "MatMulNBits") for node in matmuls[name]
        }
        replace_matmuls(proto, nbits)
        dequant = {
            node: p.ran
            for name, p in _planned(plan, "MatMul float32 (int")
            for node in matmuls[name]
        }
        replace_with_dequant(proto, dequant)
        replace_gathers(proto, {tables[n]: p.ran for n, p in _planned(plan, "GatherBlock")})
        prune_initializers(proto)  # the float weights rewrites replaced: not in what ships
        model_bytes = proto.SerializeToString()
        run, session, fresh = _sessions(model_bytes, example_inputs, threads)
        predicted = _predicted_bytes(model, layers, plan)
        return Lowered(
            run, session, plan, stored_bytes(proto), predicted, fresh, model_bytes, "onnx"
        )

    def _stepwise(
        self,
        model: nn.Module,
        layers: tuple[LayerInfo, ...],
        config: QuantConfig,
        steps: Mapping[str, int],
    ) -> set[str]:
        """Recurrent modules to export as their products: one step per call, rewritable, and
        a weight of theirs asked on a low-bit MatMul kernel."""
        return {
            la.module
            for la in layers
            if la.kind in RECURRENT_KINDS
            and steps.get(la.module) == 1
            and rewritable(model.get_submodule(la.module)) is None
            and _on_matmul(self.plan_layer(la, config.layers[la.name]).kernel)
        }


def _planned(plan: Plan, prefix: str) -> list[tuple[str, LayerPlan]]:
    """The layers whose kernel name starts with ``prefix``."""
    return [(name, p) for name, p in plan.layers.items() if p.kernel.startswith(prefix)]


def _predicted_bytes(model: nn.Module, layers: tuple[LayerInfo, ...], plan: Plan) -> int:
    """The packing formula of what runs: ``packed_layer_bytes`` per layer, the rest float."""
    rest = config_size(model, layers, plan.ran_config).other_bytes
    return rest + sum(
        packed_layer_bytes(la, plan.layers[la.name].kernel, plan.layers[la.name].ran)
        for la in layers
    )


def _replace_convs(
    proto: onnx.ModelProto,
    convs: dict[str, onnx.NodeProto],
    found: dict[str, dict[str, tuple[float, float]]],
    layers: tuple[LayerInfo, ...],
) -> None:
    """Each static int8 conv's ``Conv`` node becomes its QDQ form, with the calibrated input
    and output ranges of its module."""
    module_of = {la.name: la.module for la in layers}
    replaced = {}
    for name, node in convs.items():
        r = found[module_of[name]]
        ranges = (*r["input"], *r["output"])
        replaced[node.output[0]] = qdq_conv(proto, node, ranges, not signed_conv_exact())
    new_nodes = []
    for n in proto.graph.node:
        new_nodes.extend(replaced.get(n.output[0], [n]) if n.op_type == "Conv" else [n])
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)


def _sessions(model_bytes: bytes, example_inputs: tuple[Any, ...], threads: int) -> Any:
    """``(run, session, fresh)``: one step on a session of ``model_bytes``, and a factory of
    runners on new sessions (their own packed weights, cold caches: the latency visits)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {
        f"input_{i}": (t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t))
        for i, t in enumerate(example_inputs)
    }
    feeds = {k: v for k, v in feeds.items() if k in names}

    def fresh() -> Any:
        new = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        return lambda: new.run(None, feeds)

    def run() -> Any:
        return session.run(None, feeds)

    return run, session, fresh
