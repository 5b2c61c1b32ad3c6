"""The latency table: fitted to whole-model timings on real kernels, keyed by target."""

from __future__ import annotations

import pytest
import torch

from mpq.evaluators.latency_table import (
    LatencyTable,
    build_latency_table,
    reuse_or_build,
    target_key,
)
from mpq.spaces.space import LayerChoice, LayerOptions, QuantConfig
from tests.evaluators.helpers import bare_evaluator
from tests.models import TinyTransformer


def _evaluator():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    return bare_evaluator(TinyTransformer(), "tiny")


def test_table_covers_the_space_predicts_and_round_trips() -> None:
    ev = _evaluator()
    options = {la.name: LayerOptions(w_bits=(4, 8, 32), a_bits=(8,)) for la in ev.layers}
    table = build_latency_table(ev, options, runs=5, warmup=1, samples=6)
    assert table.covers(ev.backend.kernel_for, ev.layers, options)
    assert set(table.delta_ms) == {la.name for la in ev.layers}
    assert table.float_ms > 0
    again = LatencyTable.from_json(table.to_json())
    assert again == table
    keep = QuantConfig.uniform(ev.layers, LayerChoice())
    assert table.predict_ms(ev.backend.kernel_for, ev.layers, keep) == table.float_ms
    w4 = QuantConfig.uniform(ev.layers, LayerChoice(w_bits=4, a_bits=8))
    expected = table.float_ms + sum(
        table.delta_ms[la.name]["MatMulNBits int4 block32 acc4"] for la in ev.layers
    )
    assert table.predict_ms(ev.backend.kernel_for, ev.layers, w4) == pytest.approx(expected)
    assert table.matches(target_key("onnxruntime", 1))
    assert not table.matches(target_key("onnxruntime", 4))


def test_a_kernel_outside_the_table_is_named() -> None:
    ev = _evaluator()
    options = {la.name: LayerOptions(w_bits=(8, 32), a_bits=(8,)) for la in ev.layers}
    table = build_latency_table(ev, options, runs=3, warmup=1, samples=2)
    w2 = QuantConfig.uniform(ev.layers, LayerChoice(w_bits=2, a_bits=8))
    with pytest.raises(KeyError, match="latency table has no 'MatMulNBits int2 block32 acc4'"):
        table.predict_ms(ev.backend.kernel_for, ev.layers, w2)


def test_a_cached_table_is_reused_only_on_its_own_target() -> None:
    ev = _evaluator()
    options = {la.name: LayerOptions(w_bits=(8, 32), a_bits=(8,)) for la in ev.layers}
    table = build_latency_table(ev, options, runs=3, warmup=1, samples=2)
    assert reuse_or_build(table.to_json(), ev, options) is not table
    assert reuse_or_build(table.to_json(), ev, options) == table  # reused as is
    elsewhere = LatencyTable({**table.target, "cpu": "another CPU"}, 1.0, table.delta_ms)
    rebuilt = reuse_or_build(elsewhere.to_json(), ev, options)
    assert rebuilt.matches(target_key("onnxruntime", 1)) and rebuilt.float_ms != 1.0
    wider = {la.name: LayerOptions(w_bits=(2, 8, 32), a_bits=(8,)) for la in ev.layers}
    assert reuse_or_build(table.to_json(), ev, wider).covers(
        ev.backend.kernel_for, ev.layers, wider
    )


def test_the_table_times_as_the_trials_do(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without explicit ``runs``/``warmup`` the table uses the config's ``latency.runs`` and
    ``latency.warmup`` (it ignored them once, timing 30 runs whatever the config said)."""
    from mpq.evaluators import latency_table as lt

    ev = _evaluator()
    options = {la.name: LayerOptions(w_bits=(8, 32), a_bits=(32,)) for la in ev.layers}
    seen: list[tuple[int, int]] = []
    real = lt.measure_latency

    def spy(run, warmup, runs, threads, device):  # type: ignore[no-untyped-def]
        seen.append((warmup, runs))
        return real(run, warmup, runs, threads, device)

    monkeypatch.setattr(lt, "measure_latency", spy)
    lt.build_latency_table(ev, options, samples=1)
    assert seen and set(seen) == {(1, 3)}
