from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpq.evaluators.quantize import (
    choose_qparams,
    dequantize,
    fake_quantize_activation,
    fake_quantize_weight,
    quantize,
    weight_qparams,
)


def test_asymmetric_hand_computed() -> None:
    # min=-1, max=2, b=2: s = 3/3 = 1, z = round(1/1) = 1, Q in [0, 3]
    qp = choose_qparams(torch.tensor(-1.0), torch.tensor(2.0), bits=2, symmetric=False)
    assert float(qp.scale) == 1.0 and float(qp.zero_point) == 1.0
    x = torch.tensor([-1.0, -0.4, 0.0, 0.6, 2.0, 5.0])
    q = quantize(x, qp)
    assert q.tolist() == [0, 1, 1, 2, 3, 3]  # round(x/s)+z, clamped at 2^b-1
    assert dequantize(q, qp).tolist() == [-1.0, 0.0, 0.0, 1.0, 2.0, 2.0]


def test_asymmetric_8bit_scale_and_zero() -> None:
    # s = (max-min)/(2^8-1) = 5.1/255 = 0.02, z = round(0.1/0.02) = 5
    qp = choose_qparams(torch.tensor(-0.1), torch.tensor(5.0), bits=8, symmetric=False)
    assert float(qp.scale) == pytest.approx(0.02)
    assert float(qp.zero_point) == 5.0


def test_symmetric_hand_computed() -> None:
    # max|x| = 3, b=3: s = 3 / (2^2 - 1) = 1, z = 0, signed range [-4, 3]
    qp = choose_qparams(torch.tensor(-3.0), torch.tensor(1.0), bits=3, symmetric=True)
    assert float(qp.scale) == 1.0 and float(qp.zero_point) == 0.0
    assert quantize(torch.tensor([-3.0, -1.4, 0.0, 0.6, 1.0]), qp).tolist() == [-3, -1, 0, 1, 1]


def test_constant_tensor_has_no_division_by_zero() -> None:
    w = torch.zeros(4, 8)
    for sym in (True, False):
        out = fake_quantize_weight(w, 4, "per_channel", None, sym)
        assert torch.equal(out, w)
    w = torch.full((4, 8), 0.7)
    out = fake_quantize_weight(w, 4, "per_channel", None, False)
    assert torch.allclose(out, w, atol=0.7 / 15 / 2 + 1e-6)


def test_nan_in_weights_is_an_error() -> None:
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="weight: 1 NaN/Inf values of 32"):
        fake_quantize_weight(w, 4, "per_tensor", None, True)


@pytest.mark.parametrize(
    "granularity,group,shape",
    [
        ("per_tensor", None, (1, 1)),
        ("per_channel", None, (6, 1)),
        ("per_group", 4, (6, 2, 1)),
    ],
)
def test_granularity_gives_one_scale_per_group(
    granularity: str, group: int | None, shape: tuple
) -> None:
    _, qp = weight_qparams(torch.randn(6, 8), 4, granularity, group, False)  # type: ignore[arg-type]
    assert tuple(qp.scale.shape) == shape


def test_embedding_rows_are_channels() -> None:
    w = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))  # not the global RNG
    w[3] *= 100  # one loud row must not coarsen the others
    err = (fake_quantize_weight(w, 4, "per_channel", None, True) - w).abs()
    assert float(err[0].max()) < float(err[3].max()) / 10


finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(finite, min_size=2, max_size=64), st.sampled_from([2, 3, 4, 5, 6, 8]), st.booleans()
)
def test_properties(values: list[float], bits: int, symmetric: bool) -> None:
    x = torch.tensor(values)
    qp = choose_qparams(x.min(), x.max(), bits, symmetric)
    q = quantize(x, qp)
    assert int(q.min()) >= qp.qmin and int(q.max()) <= qp.qmax  # Q stays in range
    err = (dequantize(q, qp) - x).abs()
    assert float(err.max()) <= float(qp.scale) / 2 * (1 + 1e-4) + 1e-6  # within s/2
    if symmetric:
        assert float(dequantize(quantize(torch.tensor(0.0), qp), qp)) == 0.0  # zero maps to zero


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000))
def test_8bit_beats_4bit(seed: int) -> None:
    x = torch.randn(64, generator=torch.Generator().manual_seed(seed))
    e8 = (fake_quantize_activation(x, 8, False) - x).pow(2).mean()
    e4 = (fake_quantize_activation(x, 4, False) - x).pow(2).mean()
    assert float(e8) < float(e4)


def test_dynamic_per_token_ranges() -> None:
    x = torch.stack([torch.linspace(-1, 1, 16), torch.linspace(-100, 100, 16)])
    per_token = fake_quantize_activation(x, 8, False, per_token=True)
    per_tensor = fake_quantize_activation(x, 8, False)
    assert float((per_token[0] - x[0]).abs().max()) < float((per_tensor[0] - x[0]).abs().max())
