from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mpq.evaluators.pack import PackedWeight, pack_bits, pack_weight, unpack_bits, unpack_weight
from mpq.evaluators.quantize import fake_quantize_weight


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_round_trip_and_length(bits: int) -> None:
    rng = np.random.default_rng(bits)
    values = rng.integers(0, 2**bits, size=1001)
    packed = pack_bits(values, bits)
    assert packed.dtype == np.uint8 and packed.size == math.ceil(1001 * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, 1001), values)


def test_two_4bit_values_per_byte() -> None:
    assert pack_bits(np.array([0x3, 0xA]), 4).tolist() == [0xA3]


def test_value_too_wide_is_an_error() -> None:
    with pytest.raises(ValueError, match="value 16 does not fit in 4 bits"):
        pack_bits(np.array([16]), 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(
    "granularity,group", [("per_tensor", None), ("per_channel", None), ("per_group", 16)]
)
@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_weight_equals_simulated(
    bits: int, granularity: str, group: int | None, symmetric: bool
) -> None:
    w = torch.randn(12, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    p = pack_weight(w, bits, granularity, group, symmetric)
    restored = unpack_weight(PackedWeight.from_state(p.to_state()))
    assert torch.equal(restored, fake_quantize_weight(w, bits, granularity, group, symmetric))  # type: ignore[arg-type]


def test_a_symmetric_2bit_weight_is_ternary_in_the_matmulnbits_codes() -> None:
    """The notes' symmetric scale ``s = max|w| / (2^(b-1) - 1)`` is ``max|w|`` at 2 bits, so
    ``round(w / s)`` is -1, 0 or +1: ternary weights, which ``MatMulNBits`` runs as 2-bit codes
    ``q + 2`` (never code 0, the format's -2)."""
    from onnx import numpy_helper

    from mpq.evaluators.backends.onnx_nbits import nbits_tensors
    from mpq.spaces.space import LayerChoice

    w = torch.randn(8, 96, generator=torch.Generator().manual_seed(0))
    ran = LayerChoice(w_bits=2, granularity="per_group", group_size=32, symmetric=True)
    tensors, n, k = nbits_tensors(w.numpy(), ran, "w")
    assert len(tensors) == 2  # symmetric: no zero points (the kernel's default 2)
    packed = numpy_helper.to_array(tensors[0])  # [N, blocks, 32 * 2 / 8]
    codes = unpack_bits(packed.reshape(-1), 2, n * k).reshape(n, k)
    assert set(np.unique(codes).tolist()) == {1, 2, 3}
    scales = numpy_helper.to_array(tensors[1]).reshape(n, k // 32)
    weights = (codes.reshape(n, k // 32, 32) - 2.0) * scales[..., None]
    simulated = fake_quantize_weight(w, 2, "per_group", 32, True).reshape(n, k // 32, 32)
    np.testing.assert_array_equal(weights.astype(np.float32), simulated.numpy())
    for block in simulated.reshape(-1, 32):  # three levels: -s, 0, +s
        assert len(torch.unique(block)) <= 3
