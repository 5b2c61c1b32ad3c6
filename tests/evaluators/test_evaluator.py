"""The evaluator: what ran is recorded with its size, and fallback can be refused per trial."""

from __future__ import annotations

import pytest
import torch

from mpq.evaluators.backends.base import FallbackError
from mpq.evaluators.evaluator import EvalSpec, Evaluator
from mpq.evaluators.size import config_size
from mpq.spaces.space import LayerChoice, QuantConfig

SPEC = EvalSpec(
    model="tests.models:build_convnet",
    task="tests.models:convnet_task",
    calibration="tests.models:convnet_calibration",
    latency_warmup=1,
    latency_runs=3,
)


def test_latency_records_what_ran_and_its_size() -> None:
    from mpq.evaluators.backends.onnx_nbits import int8_input_runs

    ev = Evaluator(SPEC)
    config = QuantConfig.uniform(ev.layers, LayerChoice(w_bits=3, a_bits=8))
    out = ev.latency(config)
    if int8_input_runs(4):  # MatMulNBits has 2/4/8 bits: 3 runs as 4
        assert out["fallbacks"]["fc"] == "w3 per_channel -> int4 per_channel"
        assert out["ran_config"]["layers"]["fc"]["w_bits"] == 4
    else:  # weight-only, dequantized at load: 3-bit codes as asked, float activations
        assert out["fallbacks"]["fc"].startswith("a8 -> a32: MatMulNBits int4 has no int8-input")
        assert out["ran_config"]["layers"]["fc"]["w_bits"] == 3
    assert out["ran_config"]["layers"]["conv1"]["w_bits"] == 8  # QLinearConv int8
    asked_bytes = config_size(ev.model, ev.layers, config).total_bytes
    assert out["latency_ms"] > 0 and out["ran_size_bytes"] > asked_bytes  # 3 -> 4 bits, convs


def test_fallback_disabled_fails_the_measurement_with_the_reason() -> None:
    import dataclasses

    ev = Evaluator(dataclasses.replace(SPEC, allow_fallback=False))
    config = QuantConfig.uniform(ev.layers, LayerChoice(w_bits=4))
    with pytest.raises(
        FallbackError,
        match=r"^layer 'conv1': backend 'onnxruntime' cannot run it as asked \(w4 -> float32: "
        r"QLinearConv needs a_bits 8 \(no weight-only\)\) and latency.allow_fallback is false$",
    ):
        ev.latency(config)


def test_a_trial_measures_the_artifact_that_ships() -> None:
    """Size is the deployable file's bytes, success is that of what runs (3 bits asked, 4 ran),
    and the latency was timed on that same lowering."""
    from mpq.evaluators.task import run_task

    ev = Evaluator(SPEC)
    config = QuantConfig.uniform(ev.layers, LayerChoice(w_bits=3, a_bits=8))
    out = ev.screen(config)
    lowered = ev.lower(config)
    assert out["artifact"] == "onnx" and lowered.artifact is not None
    assert out["size_bytes"] == len(lowered.artifact)
    assert out["asked_size_bytes"] == config_size(ev.model, ev.layers, config).total_bytes
    ran = ev.as_ran(config)
    assert ran == lowered.ran_config and ran != config
    assert out["ran_config"] == ran.model_dump(mode="json", exclude_none=True)
    asked_model = ev.quantized(config)  # 3-bit codes: not what runs
    assert ev.success(config, 64) == run_task(ev.task, ev.quantized(ran), 64)
    assert not torch.equal(asked_model.fc.weight, ev.quantized(ran).fc.weight)
    assert out["speedup_lo"] <= out["speedup"] <= out["speedup_hi"]
