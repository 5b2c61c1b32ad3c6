"""Recurrent layers as their two products: equal to PyTorch's modules, and lowered to
``MatMulNBits`` by onnxruntime only where the policy runs one step per call."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from mpq.evaluators.apply import apply_config
from mpq.evaluators.backends import get_backend
from mpq.evaluators.proxy import first_tensor
from mpq.evaluators.recurrent import (
    StepwiseRecurrent,
    sequence_lengths,
    with_stepwise,
)
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig
from mpq.zoo.babyai import build_untrained_policy, tokenize

RECURRENT = [
    (nn.GRU, {}),
    (nn.LSTM, {}),
    (nn.RNN, {}),
    (nn.RNN, {"nonlinearity": "relu"}),
]


def _state(cls: type, batch: int) -> object:
    h = torch.randn(1, batch, 32)
    return (h, torch.randn_like(h)) if cls is nn.LSTM else h


def _flat(out: tuple) -> list[torch.Tensor]:  # type: ignore[type-arg]
    seq, state = out
    return [seq, *(state if isinstance(state, tuple) else (state,))]


@pytest.mark.parametrize(("cls", "kwargs"), RECURRENT)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("steps", [1, 5])
def test_stepwise_equals_the_module(
    cls: type, kwargs: dict, batch_first: bool, steps: int
) -> None:  # type: ignore[type-arg]
    torch.manual_seed(0)
    rnn = cls(16, 32, batch_first=batch_first, **kwargs).eval()
    step = StepwiseRecurrent(rnn)
    x = torch.randn(3, steps, 16) if batch_first else torch.randn(steps, 3, 16)
    hx = _state(cls, 3)
    with torch.no_grad():
        want, got = _flat(rnn(x, hx)), _flat(step(x, hx))
        no_state = _flat(rnn(x)), _flat(step(x))
    for a, b in [*zip(want, got, strict=True), *zip(*no_state, strict=True)]:
        assert a.shape == b.shape
        if cls is nn.GRU and steps == 1:  # ATen's GRU cell, operation for operation
            assert torch.equal(a, b)
        else:  # the fused sequence kernels sum in another order: float rounding only
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_unbatched_input_keeps_its_layout() -> None:
    rnn = nn.GRU(16, 32).eval()
    x, h = torch.randn(4, 16), torch.randn(1, 32)
    with torch.no_grad():
        for a, b in zip(_flat(rnn(x, h)), _flat(StepwiseRecurrent(rnn)(x, h)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("rnn", "message"),
    [
        (nn.GRU(4, 4, num_layers=2), "GRU: only a single-layer, one-direction"),
        (nn.LSTM(4, 4, bidirectional=True), "LSTM: only a single-layer, one-direction"),
        (nn.LSTM(4, 4, proj_size=2), "LSTM: an LSTM with proj_size is not rewritten"),
    ],
)
def test_what_cannot_be_rewritten_is_refused(rnn: nn.RNNBase, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StepwiseRecurrent(rnn)


def _policy_inputs() -> tuple[torch.Tensor, ...]:
    image = torch.randint(0, 255, (1, 1, 56, 56, 3), dtype=torch.uint8)
    return image, tokenize(["go to the red ball"]), torch.zeros(1, 1, 256)


def test_sequence_lengths_and_copy() -> None:
    model = build_untrained_policy()
    x = _policy_inputs()
    assert sequence_lengths(model, x) == {"instruction_gru": 24, "memory_gru": 1}
    copied = with_stepwise(model, {"memory_gru"})
    assert isinstance(copied.memory_gru, StepwiseRecurrent)
    assert isinstance(model.memory_gru, nn.GRU)  # the model itself is untouched
    with torch.no_grad():
        for a, b in zip(model(*x), copied(*x), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("a_bits", [8, 32])
def test_memory_gru_runs_on_low_bit_matmuls_and_the_sequence_gru_stays_fused(a_bits: int) -> None:
    torch.manual_seed(0)
    model = build_untrained_policy()
    layers = discover_layers(model)
    x = _policy_inputs()
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=4, a_bits=a_bits))
    # the static int8 convs' rounding (u8 x u8 where u8 x s8 is inexact) is not under test here
    convs = {la.name: LayerChoice() for la in layers if la.kind == "conv2d"}
    config = config.model_copy(update={"layers": {**config.layers, **convs}})
    lowered = get_backend("onnxruntime").lower(model, layers, config, x, calibration=[x])
    from mpq.evaluators.backends.onnx_nbits import int8_input_runs

    want = (  # int8 inputs where this CPU's MatMulNBits has them, else weight-only
        "MatMulNBits int4 block32 acc4"
        if a_bits == 8 and int8_input_runs(4)
        else "MatMul float32 (int4 weights, dequantized at load)"
    )
    for name in ("memory_gru.weight_ih_l0", "memory_gru.weight_hh_l0"):
        assert lowered.kernels[name] == want
    for name in ("instruction_gru.weight_ih_l0", "instruction_gru.weight_hh_l0"):
        assert lowered.kernels[name] == "float32 (onnxruntime)"
        assert "runs 24 steps per call" in lowered.fallbacks[name]
    graph = onnx.load_from_string(lowered.artifact)
    assert [n.op_type for n in graph.graph.node].count("GRU") == 1  # the instruction's only
    with torch.inference_mode():
        out = torch.as_tensor(lowered.run()[0])
        sim = first_tensor(apply_config(model, lowered.ran_config, [x], layers=layers)(*x))
        ref = first_tensor(model(*x))
    assert float((out - sim).abs().max()) <= 2e-3 * float(ref.abs().max()) + 1e-5
