"""The design notes' quantizer, exactly, as pure functions.

Asymmetric (``b`` bits, unsigned range ``[0, 2^b - 1]``)::

    s = (max - min) / (2^b - 1)        z = round(-min / s)
    Q(x) = clamp(round(x / s) + z, 0, 2^b - 1)
    x' = (Q(x) - z) * s

Symmetric (signed range ``[-2^(b-1), 2^(b-1) - 1]``)::

    s = max|x| / (2^(b-1) - 1)         z = 0

NOTE: the calibrated range is widened to include 0 (``min <= 0 <= max``), as PyTorch's observers
do, so that zero (padding, ReLU outputs) is exact and ``z`` fits in ``[0, 2^b - 1]``; for a range
that already straddles zero this is the notes' formula unchanged. A constant tensor (``max ==
min == 0``) would give ``s = 0``: there ``s = 1`` so nothing divides by zero and every value
dequantizes to exactly 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Granularity = Literal["per_tensor", "per_channel", "per_group"]


@dataclass(frozen=True, slots=True)
class QParams:
    """Scale and zero point, broadcastable against the grouped tensor; the integer range."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    qmin: int
    qmax: int
    bits: int
    symmetric: bool


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    if not 1 <= bits <= 16:
        raise ValueError(f"bits={bits} must be in [1, 16] for an integer format")
    if symmetric:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise ``ValueError`` naming ``what`` if ``x`` holds NaN or Inf."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{what}: {bad} NaN/Inf values of {x.numel()}")


def choose_qparams(
    x_min: torch.Tensor, x_max: torch.Tensor, bits: int, symmetric: bool
) -> QParams:
    """Scale and zero point from a calibrated range (formulas in the module docstring)."""
    qmin, qmax = int_range(bits, symmetric)
    x_min = torch.clamp(x_min.float(), max=0.0)
    x_max = torch.clamp(x_max.float(), min=0.0)
    if symmetric:
        scale = torch.maximum(-x_min, x_max) / (2 ** (bits - 1) - 1) if bits > 1 else x_max
        zero = torch.zeros_like(scale)
    else:
        scale = (x_max - x_min) / (2**bits - 1)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if not symmetric:
        zero = torch.clamp(torch.round(-x_min / scale), qmin, qmax)
    return QParams(scale, zero, qmin, qmax, bits, symmetric)


def quantize(x: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``Q(x) = clamp(round(x / s) + z, qmin, qmax)`` as int32 (round half to even)."""
    q = torch.round(x / qp.scale) + qp.zero_point
    return torch.clamp(q, qp.qmin, qp.qmax).to(torch.int32)


def dequantize(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``x' = (Q(x) - z) * s``."""
    return (q.float() - qp.zero_point) * qp.scale


def group_view(w: torch.Tensor, granularity: Granularity, group_size: int | None) -> torch.Tensor:
    """Reshape a weight so that each row of the last axis shares one (scale, zero point).

    Returns (1, N) per tensor, (C_out, R) per channel, (C_out, R / g, g) per group, where
    ``R = prod(shape[1:])`` is the reduction axis (for Embedding: one row's features).
    """
    if granularity == "per_tensor":
        return w.reshape(1, -1)
    rows = w.reshape(w.shape[0], -1) if w.dim() > 1 else w.reshape(1, -1)
    if granularity == "per_channel":
        return rows
    if group_size is None or rows.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide {rows.shape[1]}")
    return rows.reshape(rows.shape[0], rows.shape[1] // group_size, group_size)


def weight_qparams(
    w: torch.Tensor, bits: int, granularity: Granularity, group_size: int | None, symmetric: bool
) -> tuple[torch.Tensor, QParams]:
    """Grouped view of ``w`` and its min-max qparams (one per group, ``keepdim`` shaped)."""
    check_finite(w, "weight")
    grouped = group_view(w.detach().float(), granularity, group_size)
    qp = choose_qparams(
        grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True), bits, symmetric
    )
    return grouped, qp


def fake_quantize_weight(
    w: torch.Tensor, bits: int, granularity: Granularity, group_size: int | None, symmetric: bool
) -> torch.Tensor:
    """``x' = dequantize(quantize(w))`` in the original shape and dtype."""
    grouped, qp = weight_qparams(w, bits, granularity, group_size, symmetric)
    return dequantize(quantize(grouped, qp), qp).reshape(w.shape).to(w.dtype)


def fake_quantize_activation(
    x: torch.Tensor,
    bits: int,
    symmetric: bool,
    x_min: torch.Tensor | None = None,
    x_max: torch.Tensor | None = None,
    per_token: bool = False,
    batch_axis: int | None = None,
) -> torch.Tensor:
    """Quantize-dequantize an activation with a calibrated range (static) or its own (dynamic).

    Dynamic ranges are per tensor, or per token (one range per row of the last axis). With
    ``batch_axis``, a per-tensor range is taken per sample (over every other axis): a batch of N
    then quantizes as N batch-1 calls would, as a robot runs the policy, and one episode's
    activations never set another's scale.
    """
    if x_min is None or x_max is None:
        if per_token:
            x_min, x_max = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
        elif batch_axis is not None and x.dim() > 1:
            others = tuple(d for d in range(x.dim()) if d != batch_axis % x.dim())
            x_min, x_max = x.amin(others, keepdim=True), x.amax(others, keepdim=True)
        else:
            x_min, x_max = x.min(), x.max()
    qp = choose_qparams(x_min, x_max, bits, symmetric)
    return dequantize(quantize(x, qp), qp).to(x.dtype)


def fake_quantize_blocks(x: torch.Tensor, bits: int = 8, block: int = 32) -> torch.Tensor:
    """Symmetric quantize-dequantize per block of ``block`` values along the last axis:
    ``s = max|x_block| / (2^(b-1) - 1)``, ``Q = clamp(round(x / s))`` (as ``MatMulNBits``
    accuracy level 4 quantizes its input; a last partial block is its own block)."""
    k = x.shape[-1]
    pad = (-k) % block
    padded = torch.nn.functional.pad(x.float(), (0, pad)) if pad else x.float()
    blocks = padded.reshape(*padded.shape[:-1], -1, block)
    amax = blocks.abs().amax(-1, keepdim=True)
    qp = choose_qparams(-amax, amax, bits, symmetric=True)
    out = dequantize(quantize(blocks, qp), qp).reshape(padded.shape)
    return out[..., :k].to(x.dtype)
