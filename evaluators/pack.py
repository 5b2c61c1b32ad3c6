"""Pack quantized weights into bytes: the stored form that exact size counts and export writes.

A b-bit integer tensor of n values becomes ``ceil(n * b / 8)`` bytes: values are offset to
unsigned (``q - qmin``) and written as a little-endian bit stream (two 4-bit values per byte,
eight 1-bit values, a 3-bit value may straddle two bytes). Scales are float32; zero points
(asymmetric only) are packed at the same b bits, since ``0 <= z <= 2^b - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mpq.evaluators.quantize import QParams, dequantize, int_range, quantize, weight_qparams

SCALE_DTYPE = torch.float32


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ints in ``[0, 2^bits)`` -> uint8 array of ``ceil(n * bits / 8)`` bytes."""
    v = np.ascontiguousarray(values, dtype=np.uint32).reshape(-1)
    if v.size and int(v.max()) >= 2**bits:
        raise ValueError(f"pack_bits: value {int(v.max())} does not fit in {bits} bits")
    stream = ((v[:, None] >> np.arange(bits, dtype=np.uint32)) & 1).astype(np.uint8)
    return np.packbits(stream.reshape(-1), bitorder="little")


def unpack_bits(data: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``count`` values, as int64."""
    stream = np.unpackbits(np.asarray(data, dtype=np.uint8), count=count * bits, bitorder="little")
    weights = 1 << np.arange(bits, dtype=np.int64)
    return stream.reshape(count, bits).astype(np.int64) @ weights


@dataclass(frozen=True, slots=True)
class PackedWeight:
    """One quantized weight in its stored form (all tensors, so ``torch.save`` needs no pickle)."""

    data: torch.Tensor  # uint8, ceil(n * bits / 8)
    scale: torch.Tensor  # float32, one per group
    zero_point: torch.Tensor | None  # uint8 packed at `bits`, one per group; None if symmetric
    bits: int
    symmetric: bool
    shape: tuple[int, ...]
    grouped_shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        zp = 0 if self.zero_point is None else self.zero_point.numel()
        return self.data.numel() + self.scale.numel() * self.scale.element_size() + zp

    def to_state(self) -> dict[str, torch.Tensor]:
        """Plain tensors only, loadable with ``torch.load(weights_only=True)``."""
        state = {
            "data": self.data,
            "scale": self.scale,
            "meta": torch.tensor(
                [
                    self.bits,
                    int(self.symmetric),
                    len(self.shape),
                    *self.shape,
                    len(self.grouped_shape),
                    *self.grouped_shape,
                ]
            ),
        }
        if self.zero_point is not None:
            state["zero_point"] = self.zero_point
        return state

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> PackedWeight:
        meta = [int(v) for v in state["meta"].tolist()]
        bits, symmetric, nd = meta[0], bool(meta[1]), meta[2]
        shape = tuple(meta[3 : 3 + nd])
        ng = meta[3 + nd]
        grouped = tuple(meta[4 + nd : 4 + nd + ng])
        return cls(
            state["data"], state["scale"], state.get("zero_point"), bits, symmetric, shape, grouped
        )


def pack_weight(
    w: torch.Tensor, bits: int, granularity: str, group_size: int | None, symmetric: bool
) -> PackedWeight:
    """Quantize ``w`` with the seed's formulas and pack it."""
    grouped, qp = weight_qparams(w, bits, granularity, group_size, symmetric)  # type: ignore[arg-type]
    q = quantize(grouped, qp)
    data = pack_bits((q - qp.qmin).numpy(), bits)
    zp = None
    if not symmetric:
        zp = torch.from_numpy(pack_bits(qp.zero_point.to(torch.int64).numpy(), bits))
    return PackedWeight(
        data=torch.from_numpy(data),
        scale=qp.scale.to(SCALE_DTYPE).reshape(-1).clone(),
        zero_point=zp,
        bits=bits,
        symmetric=symmetric,
        shape=tuple(w.shape),
        grouped_shape=tuple(grouped.shape),
    )


def unpack_weight(p: PackedWeight) -> torch.Tensor:
    """Dequantized float32 weight ``(Q - z) * s`` in its original shape."""
    n = int(np.prod(p.grouped_shape))
    qmin, qmax = int_range(p.bits, p.symmetric)
    q = torch.from_numpy(unpack_bits(p.data.numpy(), p.bits, n) + qmin).reshape(p.grouped_shape)
    scale_shape = (*p.grouped_shape[:-1], 1)
    scale = p.scale.float().reshape(scale_shape)
    if p.zero_point is None:
        zero = torch.zeros_like(scale)
    else:
        count = p.scale.numel()
        zero = torch.from_numpy(unpack_bits(p.zero_point.numpy(), p.bits, count)).float()
        zero = zero.reshape(scale_shape)
    qp = QParams(scale, zero, qmin, qmax, p.bits, p.symmetric)
    return dequantize(q, qp).reshape(p.shape)
