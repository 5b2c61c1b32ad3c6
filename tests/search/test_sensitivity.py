from __future__ import annotations

from pathlib import Path

from mpq.evaluators.evaluator import EvalSpec, Evaluator
from mpq.evaluators.size import config_size
from mpq.search.sensitivity import greedy_allocation, measure_sensitivity, uniform_config
from mpq.spaces.space import LayerOptions, SearchSpace

SPEC = EvalSpec(
    model="tests.models:build_convnet",
    task="tests.models:convnet_task",
    calibration="tests.models:convnet_calibration",
    measure_latency=False,
)


def test_sensitivity_falls_with_bits_and_is_cached(tmp_path: Path) -> None:
    ev = Evaluator(SPEC)
    resolved = SearchSpace(defaults=LayerOptions(w_bits=(2, 4, 8, 32))).resolve(ev.layers)
    s = measure_sensitivity(ev, resolved, tmp_path)
    assert set(s) == {"conv1", "conv2", "conv1d", "fc"}
    for per_bits in s.values():
        assert per_bits[2] > per_bits[8]
    cached = list(tmp_path.glob("sensitivity-*.json"))
    assert len(cached) == 1
    assert measure_sensitivity(ev, resolved, tmp_path) == s


def test_greedy_allocation_meets_the_budget(tmp_path: Path) -> None:
    ev = Evaluator(SPEC)
    resolved = SearchSpace(defaults=LayerOptions(w_bits=(2, 4, 8, 32))).resolve(ev.layers)
    s = measure_sensitivity(ev, resolved)
    size8 = config_size(ev.model, ev.layers, uniform_config(resolved, 8)).total_bytes
    sizes = []
    for frac in (0.9, 0.6, 0.4):
        config = greedy_allocation(ev, resolved, s, int(size8 * frac))
        size = config_size(ev.model, ev.layers, config).total_bytes
        assert size <= size8 * frac
        sizes.append(size)
    assert sizes == sorted(sizes, reverse=True)
