"""What ONNX Runtime runs for one layer's choice: the kernel, the choice that runs (its simulated
model equals the kernel's output) and why it differs from the asked one. Pure functions of the
layer and the choice; ``onnxruntime_backend`` adds what only the exported graph tells."""

from __future__ import annotations

from mpq.evaluators.backends.base import LayerPlan
from mpq.evaluators.backends.onnx_graph import signed_conv_exact
from mpq.evaluators.backends.onnx_nbits import BLOCK, BLOCKS, DEQUANT, int8_input_runs
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import KEEP, LayerChoice

NBITS = (2, 4, 8)


def nbits_for(w_bits: int) -> int:
    """The narrowest MatMulNBits width that holds ``w_bits`` (3 -> 4, 5 and 6 -> 8)."""
    return next(b for b in NBITS if b >= w_bits)


QLINEARCONV = "QLinearConv int8 (static QDQ)"
QLINEARCONV_U8 = "QLinearConv u8 x u8 (static QDQ; u8 x s8 inexact here)"


def qlinearconv_kernel() -> str:
    """The static int8 conv kernel that is exact on this CPU (``signed_conv_exact``)."""
    return QLINEARCONV if signed_conv_exact() else QLINEARCONV_U8


FLOAT32 = "float32 (onnxruntime)"
CONV_RAN = LayerChoice(
    w_bits=8, a_bits=8, granularity="per_channel", act_mode="static", out_bits=8
)


def int8_input(choice: LayerChoice) -> bool:
    """a8 asked, and this CPU's MatMulNBits at that width really has the int8-input kernel."""
    return choice.a_bits == 8 and int8_input_runs(nbits_for(choice.w_bits))


def asked_block(choice: LayerChoice, size: int) -> int | None:
    """The asked group size where the kernels have it (``BLOCKS``) and it divides ``size``."""
    g = choice.group_size if choice.granularity == "per_group" else None
    return g if g in BLOCKS and size % g == 0 else None


def ran_choice(choice: LayerChoice, layer: LayerInfo) -> LayerChoice:
    """What ``MatMulNBits`` runs for an int8-input choice: codes at 2/4/8 bits per block of 32
    along K (per channel where K is no multiple of 32: the row's scale in every block); accuracy
    level 4 quantizes its input to int8 per block of 32, symmetric (``per_block``; the kernel's
    input blocks are its weight blocks, so an int8 input keeps blocks of 32)."""
    gran = "per_group" if layer.reduction_size % BLOCK == 0 else "per_channel"
    return LayerChoice(
        w_bits=nbits_for(choice.w_bits),
        a_bits=8,
        granularity=gran,
        group_size=BLOCK if gran == "per_group" else None,
        symmetric=choice.symmetric,
        act_granularity="per_block",
    )


MATMUL_KINDS = ("linear", "attention_in_proj")
# the weights of a single-layer, one-direction recurrent module: they can run as MatMuls
STEPWISE_PARAMS = ("weight_ih_l0", "weight_hh_l0")


def keep_float(why: str | None = None) -> LayerPlan:
    return LayerPlan(FLOAT32, LayerChoice(), why)


def conv_plan(choice: LayerChoice) -> LayerPlan:
    """Static int8 ``QLinearConv``: a8 asked; weights int8 per channel, ranges static."""
    if choice.a_bits != 8:
        return keep_float(
            f"w{choice.w_bits} -> float32: QLinearConv needs a_bits 8 (no weight-only)"
        )
    c = CONV_RAN
    asked = (choice.w_bits, choice.granularity, choice.symmetric, choice.act_mode)
    if asked == (c.w_bits, c.granularity, c.symmetric, c.act_mode):
        return LayerPlan(qlinearconv_kernel(), CONV_RAN)
    why = (
        f"w{choice.w_bits} {choice.granularity} a8 {choice.act_mode} -> int8 per_channel a8 "
        "static (QLinearConv)"
    )
    return LayerPlan(qlinearconv_kernel(), CONV_RAN, why)


def layout_reason(choice: LayerChoice, ran: LayerChoice) -> str | None:
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


def gather_plan(layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
    """``GatherBlockQuantized``: the table at 2/4/8 bits per block of 32 (or 16) along D."""
    w, d = choice.w_bits, layer.reduction_size
    if layer.tied:
        return keep_float(f"w{w} -> float32: the table is shared with {layer.tied[0]!r}")
    block = asked_block(choice, d) or next((b for b in (BLOCK, 16) if d % b == 0), None)
    if block is None:
        why = f"w{w} -> float32: embedding dim {d} is no multiple of 16 (the smallest block)"
        return keep_float(why)
    ran = LayerChoice(
        w_bits=nbits_for(w), granularity="per_group", group_size=block, symmetric=choice.symmetric
    )
    kernel = f"GatherBlockQuantized int{ran.w_bits} block{block}"
    return LayerPlan(kernel, ran, layout_reason(choice, ran))


def dequant_plan(layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
    """Weight-only (``DEQUANT``): the asked codes, float activations; a group that does not
    divide K runs per channel."""
    ran = choice.model_copy(update={"a_bits": KEEP, "act_granularity": "per_tensor"})
    g = choice.group_size if choice.granularity == "per_group" else None
    # a group that does not divide K, or one scale for a packed q/k/v projection that the
    # export may split into several MatMuls (each would get its own): one scale per row
    split = layer.kind == "attention_in_proj" and choice.granularity == "per_tensor"
    if (g and layer.reduction_size % g) or split:
        ran = ran.model_copy(update={"granularity": "per_channel", "group_size": None})
    why = [layout_reason(choice, ran)]
    if choice.a_bits == 8:
        why.append(
            f"a8 -> a32: MatMulNBits int{nbits_for(choice.w_bits)} has no int8-input kernel on "
            "this CPU (accuracy level 4 computes in float32 here)"
        )
    elif choice.a_bits == 16:
        why.append("a16 -> float32 activations")
    reason = "; ".join(w for w in why if w) or None
    return LayerPlan(DEQUANT.format(bits=choice.w_bits), ran, reason)


def nbits_weight_only(layer: LayerInfo, default: LayerPlan) -> LayerPlan | None:
    """The same weight-only numerics as a ``DEQUANT`` plan on ``MatMulNBits`` at accuracy
    level 1 (float input): where the codes' bits are the kernel's (2, 4, 8) and they are
    blocks the kernel has (``BLOCKS``) dividing K; else None."""
    ran = default.ran
    if not default.kernel.startswith("MatMul float32 (int") or ran.w_bits not in NBITS:
        return None
    if ran.granularity != "per_group" or ran.group_size not in BLOCKS:
        return None
    if layer.reduction_size % ran.group_size:
        return None
    kernel = f"MatMulNBits int{ran.w_bits} block{ran.group_size} acc1"
    return LayerPlan(kernel, ran, default.reason)


def accuracy_level(kernel: str) -> int:
    """A ``MatMulNBits`` kernel name's accuracy level (``... acc4``: int8 input; ``acc1``:
    float input)."""
    return int(kernel.rpartition(" acc")[2])


def on_matmul(kernel: str) -> bool:
    """Whether ``kernel`` replaces an exported MatMul (``MatMulNBits`` or ``DEQUANT``)."""
    return kernel.startswith(("MatMulNBits", "MatMul float32 (int"))


def matmul_reason(choice: LayerChoice, ran: LayerChoice) -> str | None:
    """Why ``MatMulNBits`` runs ``ran`` for the asked ``choice`` (None: as asked)."""
    layout = layout_reason(choice, ran)
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
