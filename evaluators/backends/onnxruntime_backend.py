"""The ``onnxruntime`` backend (default on CPU): one ONNX model with per-node precision.

Export (TorchScript exporter, batch-1 example inputs), then for each Linear / attention
projection whose weight asks for <= 8 bits with ``a_bits`` 8, ``MatMulNBits`` at 2, 4 or 8 bits
with ``accuracy_level=4`` (the kernel quantizes its input to int8, symmetric per block of 32:
recorded as ``per_block``, which the simulated model of what ran reproduces) and a scale per
block, holding the design notes' codes (``onnx_nbits``: the simulated model's weights bit for
bit); every other MatMul left alone.

Weight-only (``a_bits`` 32 or 16, or 8 where this CPU's ``MatMulNBits`` has no int8-input
kernel):
the weights ship at their bits and the graph dequantizes them (``onnx_dequant``),
which ONNX Runtime folds into a float32 weight when the session loads, so the layer runs the
float MatMul: exactly the asked codes (any bits, granularity, group, symmetry), float speed,
low-bit bytes. NOTE: ``MatMulNBits`` at accuracy level 1 (its weight-only mode, float input)
ran 12-14x slower than float at 2 and 8 bits on an AVX2 CPU (no fast kernel there), and at 4
bits 3-14% faster on the flagship's large memory-bound layers and up to 2.2x slower on small
ones: it is a candidate of the kernel autotune (``candidates``), never the default.

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

import contextlib
import copy
import io
import warnings
from collections import OrderedDict
from collections.abc import Collection, Iterator, Mapping
from typing import Any

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
from mpq.evaluators.backends.onnx_dequant import replace_with_dequant
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
    block_of,
    packed_layer_bytes,
    prune_initializers,
    replace_gathers,
    replace_matmuls,
    stored_bytes,
    untranspose_tied_tables,
)
from mpq.evaluators.backends.onnx_plan import (  # noqa: F401  (re-exported for tests)
    CONV_RAN,
    FLOAT32,
    MATMUL_KINDS,
    NBITS,
    QLINEARCONV,
    QLINEARCONV_U8,
    STEPWISE_PARAMS,
    accuracy_level,
    conv_plan,
    dequant_plan,
    gather_plan,
    int8_input,
    keep_float,
    matmul_reason,
    nbits_for,
    nbits_weight_only,
    on_matmul,
    qlinearconv_kernel,
    ran_choice,
)
from mpq.evaluators.inputs import Inputs, input_names, session_feeds
from mpq.evaluators.recurrent import rewritable, sequence_lengths, with_stepwise
from mpq.evaluators.size import config_size
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, KEEP, LayerChoice, QuantConfig


@contextlib.contextmanager
def plain_outputs(model: nn.Module) -> Iterator[None]:
    """For the export only: a model with a ``transformers``-style config runs without a cache
    (``use_cache`` off: a ``DynamicCache`` cannot be traced, and one step of the deployed
    policy needs none); restored after."""
    config = getattr(model, "config", None)
    saved = {k: getattr(config, k) for k in ("use_cache",) if hasattr(config, k)}
    for k in saved:
        setattr(config, k, False)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(config, k, v)


_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
)


def export_onnx(model: nn.Module, example_inputs: Inputs) -> onnx.ModelProto:
    """The graph of ``model`` on ``example_inputs``; keyword inputs become the graph's inputs
    under their names, and every other argument keeps its Python default (passed as keywords
    to the exporter instead, ``transformers``' ``logits_to_keep=0`` would be traced as a tensor
    input, which changes what the model computes: the last position's logits only)."""
    buf = io.BytesIO()
    exported, args = model, example_inputs
    if isinstance(example_inputs, dict):
        names = list(example_inputs)
        exported = copy.copy(model)  # the same modules and parameter names, another forward
        exported.forward = lambda *xs: model(**dict(zip(names, xs, strict=True)))  # type: ignore[method-assign]
        for hooks in _HOOK_DICTS:  # model(...) runs the model's hooks (an output selection)
            setattr(exported, hooks, OrderedDict())
        args = tuple(example_inputs.values())
    with warnings.catch_warnings(), plain_outputs(model):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            exported,
            args,
            buf,
            dynamo=False,
            input_names=input_names(example_inputs),
            opset_version=17,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


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
        return keep_float(f"w{asked.w_bits} -> float32: {why}")

    def plan_layer(self, layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
        """What runs, from the kind and the choice (given a node found in the export and
        calibration data for static convs: ``plan`` checks those): of the ``candidates``, the
        one the kernel autotune measured fastest on this layer, else the default."""
        return self.fastest(layer, self.candidates(layer, choice))

    def candidates(self, layer: LayerInfo, choice: LayerChoice) -> tuple[LayerPlan, ...]:
        """The default plan, then the kernels with the same numerics: a weight-only choice
        dequantized at load (float MatMul) can also run on ``MatMulNBits`` at accuracy level
        1 (float input, the codes unpacked in the kernel) where its bits, block and K fit
        (``nbits_weight_only``). Measured on an AVX2 CPU at 4 bits: 3-14% faster than the float
        MatMul on the flagship's large layers, up to 2.2x slower on small ones; at 2 and 8
        bits 12-14x slower."""
        default = self.default_plan(layer, choice)
        other = nbits_weight_only(layer, default)
        return (default,) if other is None else (default, other)

    def default_plan(self, layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
        """What runs without an autotune table (see ``plan_layer``)."""
        if choice.w_bits == KEEP:
            return keep_float()
        if layer.kind in QDQ_CONV and choice.w_bits <= INT_BITS_MAX:
            return conv_plan(choice)
        if layer.kind == "embedding" and choice.w_bits <= INT_BITS_MAX:
            return gather_plan(layer, choice)
        if layer.kind in RECURRENT_KINDS and layer.param not in STEPWISE_PARAMS:
            why = "only a single-layer, one-direction recurrent module runs as MatMuls"
            return keep_float(f"w{choice.w_bits} -> float32: {why}")
        if layer.kind not in (*MATMUL_KINDS, *RECURRENT_KINDS):
            return keep_float(
                f"w{choice.w_bits} -> float32: no low-bit kernel wired for {layer.kind}"
            )
        if choice.w_bits > INT_BITS_MAX:
            return keep_float(f"w{choice.w_bits} -> float32: float16 has no faster CPU kernel")
        if not int8_input(choice):  # weight-only: the codes as asked, dequantized at load
            return dequant_plan(layer, choice)
        ran = ran_choice(choice, layer)
        kernel = f"MatMulNBits int{ran.w_bits} block{block_of(ran)} acc4"
        return LayerPlan(kernel, ran, matmul_reason(choice, ran))

    def plan(self, model: nn.Module, layers: tuple[LayerInfo, ...], config: QuantConfig) -> Plan:
        """``plan_layer`` per layer: ONNX Runtime lowers each weight on its own (a recurrent
        module's two products too, and a Linear inside ``nn.MultiheadAttention`` as its MatMul
        node), so no module-level rule applies; what only the export tells is
        ``plan_export``'s."""
        config.check(layers)
        return Plan({la.name: self.plan_layer(la, config.layers[la.name]) for la in layers})

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
            if on_matmul(plan.kernel) and la.kind in RECURRENT_KINDS and t != 1:
                plan = keep_float(
                    f"w{c.w_bits} -> float32: the {la.kind} runs {t} steps per call here; as "
                    "MatMuls they would unroll (slower than the fused float node)"
                )
            elif on_matmul(plan.kernel) and la.name not in matmuls:
                plan = keep_float(f"w{c.w_bits} -> float32: no MatMul node in the export")
            elif plan.kernel.startswith("QLinearConv") and la.name not in convs:
                plan = keep_float(f"w{c.w_bits} -> float32: no Conv node in the export")
            elif plan.kernel.startswith("QLinearConv") and not calibrated:
                plan = keep_float(
                    f"w{c.w_bits} -> float32: static int8 conv needs calibration data"
                )
            elif plan.kernel.startswith("GatherBlockQuantized") and la.name not in tables:
                plan = keep_float(f"w{c.w_bits} -> float32: no Gather alone reads its table")
            out[la.name] = plan
        return Plan(out)

    def lower(
        self,
        model: nn.Module,
        layers: tuple[LayerInfo, ...],
        config: QuantConfig,
        example_inputs: Inputs,
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
        untranspose_tied_tables(proto)
        matmuls = matmul_nodes(proto, layers, gemm_to_matmul(proto))
        convs = conv_nodes(proto, layers)
        tables = gather_tables(proto, layers)
        plan = self.plan_export(layers, config, matmuls, convs, bool(calibration), tables, steps)
        qdq = [la for la in layers if plan.layers[la.name].kernel.startswith("QLinearConv")]
        if qdq:
            ran = plan.ran_config  # upstream layers quantized as they will run
            found = static_ranges(model, ran, calibration or [], observer, layers)
            _replace_convs(proto, {la.name: convs[la.name] for la in qdq}, found, layers)
        nbits = {  # MatMul node -> (what runs, accuracy level: 4 int8 input, 1 float input)
            node: (p.ran, accuracy_level(p.kernel))
            for name, p in _planned(plan, "MatMulNBits")
            for node in matmuls[name]
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
            and on_matmul(self.plan_layer(la, config.layers[la.name]).kernel)
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
    convs: dict[str, list[onnx.NodeProto]],
    found: dict[str, dict[str, tuple[float, float]]],
    layers: tuple[LayerInfo, ...],
) -> None:
    """Each static int8 conv's ``Conv`` nodes become their QDQ form, with the calibrated input
    and output ranges of its module (one range over all its calls, as the simulated model
    calibrates it) and one int8 copy of its weight that every node reads."""
    module_of = {la.name: la.module for la in layers}
    replaced = {}
    for name, nodes in convs.items():
        r = found[module_of[name]]
        ranges = (*r["input"], *r["output"])
        for node in nodes:
            replaced[node.output[0]] = qdq_conv(
                proto, node, ranges, not signed_conv_exact(), weights=f"{name}_int8"
            )
    new_nodes = []
    for n in proto.graph.node:
        new_nodes.extend(replaced.get(n.output[0], [n]) if n.op_type == "Conv" else [n])
    del proto.graph.node[:]
    proto.graph.node.extend(new_nodes)


def _sessions(model_bytes: bytes, example_inputs: Inputs, threads: int) -> Any:
    """``(run, session, fresh)``: one step on a session of ``model_bytes``, and a factory of
    runners on new sessions (their own packed weights, cold caches: the latency visits)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    feeds = session_feeds(session, example_inputs)

    def fresh() -> Any:
        new = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        return lambda: new.run(None, feeds)

    def run() -> Any:
        return session.run(None, feeds)

    return run, session, fresh
