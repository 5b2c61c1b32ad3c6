"""The kernel autotune: per layer, the fastest measured of the kernels with the same numerics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from mpq.evaluators.apply import apply_config
from mpq.evaluators.backends import get_backend
from mpq.evaluators.backends.onnx_plan import accuracy_level
from mpq.evaluators.kernel_tune import (
    KernelTable,
    alternatives,
    reuse_or_tune,
    tune_kernels,
)
from mpq.evaluators.proxy import first_tensor
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, LayerOptions, QuantConfig
from tests.evaluators.helpers import bare_evaluator
from tests.models import WideInput

W4 = LayerChoice(w_bits=4, granularity="per_group", group_size=32)
DEQUANT4 = "MatMul float32 (int4 weights, dequantized at load)"
ACC1 = "MatMulNBits int4 block32 acc1"


def _evaluator():  # type: ignore[no-untyped-def]
    return bare_evaluator(WideInput(), "wide")  # fc1 1024 -> 36, fc2 36 -> 16


def test_a_weight_only_choice_has_two_kernels_with_the_same_numerics() -> None:
    backend = get_backend("onnxruntime")
    fc1, fc2 = discover_layers(WideInput())
    plans = backend.candidates(fc1, W4)
    assert [p.kernel for p in plans] == [DEQUANT4, ACC1]
    assert plans[0].ran == plans[1].ran == W4
    # no float-input MatMulNBits for 3 bits (it would run 4), per channel, or K % block != 0
    assert len(backend.candidates(fc1, W4.model_copy(update={"w_bits": 3}))) == 1
    per_channel = LayerChoice(w_bits=4, granularity="per_channel")
    assert len(backend.candidates(fc1, per_channel)) == 1
    assert len(backend.candidates(fc2, W4)) == 1  # K = 36: per channel, one kernel
    assert len(backend.candidates(fc1, LayerChoice())) == 1


def test_the_tuned_backend_runs_the_fastest_measured_kernel_and_says_why() -> None:
    backend = get_backend("onnxruntime")
    fc1, _ = discover_layers(WideInput())
    assert backend.plan_layer(fc1, W4).kernel == DEQUANT4  # no table: the default
    fast = backend.tuned({"fc1": {DEQUANT4: 30.0, ACC1: 20.0}}).plan_layer(fc1, W4)
    assert fast.kernel == ACC1 and fast.ran == W4 and fast.reason is None
    assert fast.note == (f"fastest measured here: 20.0 us per step (vs {DEQUANT4} 30.0 us)")
    slow = backend.tuned({"fc1": {DEQUANT4: 20.0, ACC1: 30.0}}).plan_layer(fc1, W4)
    assert slow.kernel == DEQUANT4 and slow.note is not None
    # a kernel measured on another layer, or not against the default, is never picked
    assert backend.tuned({"fc2": {ACC1: 1.0}}).plan_layer(fc1, W4).kernel == DEQUANT4
    assert backend.tuned({"fc1": {ACC1: 1.0}}).plan_layer(fc1, W4).kernel == DEQUANT4
    assert backend.kernel_us == {}  # tuned() copies; the registry's backend is untouched


def test_the_float_input_nbits_kernel_runs_the_simulated_model_of_what_ran() -> None:
    ev = _evaluator()
    config = QuantConfig(layers={"fc1": W4, "fc2": LayerChoice()})
    lowered = ev.backend.pinned({"fc1": ACC1}).lower(
        ev.model, ev.layers, config, ev.example_inputs
    )
    assert lowered.kernels["fc1"] == ACC1 and accuracy_level(ACC1) == 1
    nodes = [n for n in onnx.load_from_string(lowered.artifact).graph.node]
    (nbits,) = [n for n in nodes if n.op_type == "MatMulNBits"]
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in nbits.attribute}
    assert attrs["accuracy_level"] == 1 and attrs["bits"] == 4 and attrs["block_size"] == 32
    assert lowered.stored_bytes == lowered.predicted_bytes
    x = ev.example_inputs
    with torch.inference_mode():
        sim = first_tensor(apply_config(ev.model, lowered.ran_config, [x], layers=ev.layers)(*x))
    out = torch.from_numpy(np.asarray(lowered.run()[0]))
    assert float((out - sim).abs().max()) <= 1e-5 * float(sim.abs().max())


def test_tune_measures_every_candidate_in_the_whole_model() -> None:
    ev = _evaluator()
    options = {
        "fc1": LayerOptions(w_bits=(4, 8), a_bits=(32,), granularity=("per_group",)),
        "fc2": LayerOptions(w_bits=(4,), a_bits=(32,)),
    }
    alts = alternatives(ev.base_backend, ev.layers, options)
    assert set(alts) == {"fc1"} and len(alts["fc1"]) == 2  # fc2 (K = 36) has one kernel
    table = tune_kernels(ev, options, runs=5)
    row = table.kernel_us["fc1"]
    assert set(row) == {
        DEQUANT4,
        ACC1,
        "MatMul float32 (int8 weights, dequantized at load)",
        "MatMulNBits int8 block32 acc1",
    }
    assert all(us >= 0 for us in row.values())  # whole microseconds: a tiny layer can be 0
    assert table.covers(alts) and KernelTable.from_json(table.to_json()) == table
    picked = ev.base_backend.tuned(table.kernel_us).plan_layer(ev.layers[0], W4)
    assert picked.kernel == min((DEQUANT4, ACC1), key=row.__getitem__)
    # a pick off the default was checked end to end, and kept only beyond the interval
    for check in table.checks.values():
        assert check["speedup_lo"] <= check["speedup"] <= check["speedup_hi"]
    assert not table.unmeasured  # every candidate ran and was timed
    runs = ev.base_backend.tuned(table.usable()).plan_layer(ev.layers[0], W4)
    w4_check = table.checks.get(W4.describe())
    if w4_check is None or not w4_check["kept"]:
        assert runs.kernel == DEQUANT4
    else:
        assert runs.kernel == picked.kernel == ACC1


def test_rejected_kernels_are_not_run() -> None:
    fc1, _ = discover_layers(WideInput())
    table = KernelTable(
        {"cpu": "x"},
        {"fc1": {DEQUANT4: 30.0, ACC1: 20.0}},
        {W4.describe(): {"speedup": 1.01, "speedup_lo": 0.97, "speedup_hi": 1.05, "kept": False}},
        {"fc1": [ACC1]},
    )
    assert KernelTable.from_json(table.to_json()) == table
    assert table.usable() == {"fc1": {DEQUANT4: 30.0}}
    backend = get_backend("onnxruntime").tuned(table.usable())
    assert backend.plan_layer(fc1, W4).kernel == DEQUANT4


def test_a_table_is_reused_only_on_its_target_and_space(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    ev = _evaluator()
    options = {
        "fc1": LayerOptions(w_bits=(4,), a_bits=(32,), granularity=("per_group",)),
        "fc2": LayerOptions(w_bits=(32,)),
    }
    table = tune_kernels(ev, options, runs=3)
    calls = []
    import mpq.evaluators.kernel_tune as kt

    monkeypatch.setattr(kt, "tune_kernels", lambda *a, **k: calls.append(1) or table)
    assert reuse_or_tune(table.to_json(), ev, options) == table and not calls
    other = KernelTable({**table.target, "threads": 4}, table.kernel_us)
    reuse_or_tune(other.to_json(), ev, options)
    assert calls == [1]  # another target: measured again
    wider = {
        **options,
        "fc1": LayerOptions(w_bits=(2, 4), a_bits=(32,), granularity=("per_group",)),
    }
    reuse_or_tune(table.to_json(), ev, wider)
    assert calls == [1, 1]  # a space with kernels the table lacks: measured again
    # a candidate tried and found not to run is not tried again on resume
    tried = KernelTable(table.target, {"fc1": {DEQUANT4: 1.0}}, unmeasured={"fc1": [ACC1]})
    assert reuse_or_tune(tried.to_json(), ev, options) == tried and calls == [1, 1]
    no_alternatives = {n: LayerOptions(w_bits=(4, 8), a_bits=(8,)) for n in ("fc1", "fc2")}
    empty = reuse_or_tune(None, ev, no_alternatives)
    assert empty.kernel_us == {} and calls == [1, 1]  # nothing to choose: nothing measured


@pytest.mark.parametrize("target_threads", [1, 4])
def test_the_evaluator_uses_a_table_of_its_own_target_only(target_threads) -> None:  # type: ignore[no-untyped-def]
    from mpq.evaluators.evaluator import Evaluator
    from mpq.evaluators.latency_table import model_target

    ev = Evaluator.__new__(Evaluator)
    base = _evaluator()
    ev.spec, ev.base_backend, ev.backend = base.spec, base.base_backend, base.base_backend
    ev._lowered, ev._float_lowered = {}, None
    target = {**model_target(ev), "threads": target_threads}
    ev.use_kernels(KernelTable(target, {"fc1": {ACC1: 1.0, DEQUANT4: 2.0}}).to_json())
    expected = ACC1 if target_threads == 1 else DEQUANT4
    assert ev.backend.plan_layer(base.layers[0], W4).kernel == expected
    ev.use_kernels(None)
    assert ev.backend.plan_layer(base.layers[0], W4).kernel == DEQUANT4
