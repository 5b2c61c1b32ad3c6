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
