from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from mpq.evaluators.evaluator import EvalSpec, Evaluator
from mpq.evaluators.size import config_size
from mpq.search.sensitivity import (
    base_choice,
    greedy_allocation,
    measure_sensitivity,
    uniform_config,
)
from mpq.spaces.space import LayerOptions, QuantConfig, SearchSpace

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


def _brute_force(ev, resolved, s, budget):  # type: ignore[no-untyped-def]
    """The least summed sensitivity within ``budget`` over every allocation (float allowed)."""
    import itertools

    from mpq.search.sensitivity import base_choice
    from mpq.spaces.space import QuantConfig

    names = list(s)
    best = None
    for bits in itertools.product(*(sorted(resolved[n].w_bits) for n in names)):
        config = QuantConfig(
            layers={n: base_choice(resolved[n], b) for n, b in zip(names, bits, strict=True)}
        )
        if config_size(ev.model, ev.layers, config).total_bytes > budget:
            continue
        cost = sum(s[n].get(b, 0.0) for n, b in zip(names, bits, strict=True))
        best = cost if best is None else min(best, cost)
    return best


def test_ilp_allocation_is_the_exact_optimum_and_beats_greedy() -> None:
    from mpq.search.sensitivity import ilp_allocation, summed_sensitivity

    ev = Evaluator(SPEC)
    resolved = SearchSpace(defaults=LayerOptions(w_bits=(2, 4, 8, 32))).resolve(ev.layers)
    s = measure_sensitivity(ev, resolved)
    size8 = config_size(ev.model, ev.layers, uniform_config(resolved, 8)).total_bytes
    for frac in (1.0, 0.6, 0.4):
        budget = int(size8 * frac)
        ilp = ilp_allocation(ev, resolved, s, budget)
        assert config_size(ev.model, ev.layers, ilp).total_bytes <= budget
        optimum = _brute_force(ev, resolved, s, budget)
        assert summed_sensitivity(s, ilp) == pytest.approx(optimum, rel=1e-9, abs=0)
        greedy = greedy_allocation(ev, resolved, s, budget)
        assert summed_sensitivity(s, ilp) <= summed_sensitivity(s, greedy) + 1e-12


def test_ilp_keeps_a_sensitive_small_layer_float_and_pays_with_a_big_one() -> None:
    """Greedy walks down from 8 bits and never reaches float; the ILP may, where it pays."""
    from mpq.search.sensitivity import ilp_allocation

    ev = Evaluator(SPEC)
    resolved = SearchSpace(defaults=LayerOptions(w_bits=(2, 4, 8, 32))).resolve(ev.layers)
    big = max(ev.layers, key=lambda la: la.num_params).name
    small = min(ev.layers, key=lambda la: la.num_params).name
    s = {la.name: {2: 1.0, 4: 0.5, 8: 0.1} for la in ev.layers}
    s[big] = {2: 0.001, 4: 0.0005, 8: 0.0}  # robust
    s[small] = {2: 50.0, 4: 20.0, 8: 10.0}  # only float is safe
    size8 = config_size(ev.model, ev.layers, uniform_config(resolved, 8)).total_bytes
    ilp = ilp_allocation(ev, resolved, s, size8)
    assert ilp.layers[small].w_bits == 32 and ilp.layers[big].w_bits < 8
    assert greedy_allocation(ev, resolved, s, size8).layers[small].w_bits == 8


def test_an_unreachable_budget_gives_the_smallest_allocation() -> None:
    from mpq.search.sensitivity import ilp_allocation

    ev = Evaluator(SPEC)
    resolved = SearchSpace(defaults=LayerOptions(w_bits=(2, 4, 8, 32))).resolve(ev.layers)
    s = measure_sensitivity(ev, resolved)
    ilp = ilp_allocation(ev, resolved, s, 1)
    assert {c.w_bits for c in ilp.layers.values()} == {2}


def test_allocation_at_names_bad_input() -> None:
    from mpq.search.sensitivity import allocation_at

    ev = Evaluator(SPEC)
    resolved = SearchSpace(defaults=LayerOptions(w_bits=(2, 8))).resolve(ev.layers)
    with pytest.raises(
        ValueError, match=r"^allocation method 'knapsack' not in \['greedy', 'ilp'\]$"
    ):
        allocation_at(ev, resolved, {}, "knapsack", 0.5)
    with pytest.raises(ValueError, match=r"^budget 1.5 must be a fraction of the 8-bit size"):
        allocation_at(ev, resolved, {}, "ilp", 1.5)


def test_ilp_seeds_are_labelled_and_no_worse_than_greedy_at_their_budget(tmp_path: Path) -> None:
    from mpq.evaluators.evaluator import get_evaluator
    from mpq.search.runner import preflight
    from mpq.search.sensitivity import summed_sensitivity
    from mpq.search.study_setup import seed_configs
    from mpq.search.worker import eval_spec
    from tests.search.helpers import conv_config

    cfg = conv_config(tmp_path, sensitivity={"budgets": [0.5], "ilp_budgets": [0.5]})
    resolved = preflight(cfg, "test")
    seeds, s = seed_configs(cfg, get_evaluator(eval_spec(cfg)), resolved)
    by_label = dict(seeds)
    assert {"uniform-8bit", "uniform-4bit", "greedy-50pct", "ilp-50pct"} == set(by_label)
    ilp, greedy = by_label["ilp-50pct"], by_label["greedy-50pct"]
    assert summed_sensitivity(s, ilp) <= summed_sensitivity(s, greedy) + 1e-12


def test_the_allocators_keep_a_fused_group_one_decision() -> None:
    """Greedy and ILP lower a group's layers together, and the ILP is still the exact optimum
    over the configurations that keep the group together."""
    from mpq.search.sensitivity import ilp_allocation, summed_sensitivity

    ev = Evaluator(SPEC)
    space = SearchSpace(defaults=LayerOptions(w_bits=(2, 4, 8)), groups=(("conv1", "conv2"),))
    resolved = space.resolve(ev.layers)
    s = measure_sensitivity(ev, resolved)
    size8 = config_size(ev.model, ev.layers, uniform_config(resolved, 8)).total_bytes
    for frac in (0.8, 0.5):
        budget = int(size8 * frac)
        ilp = ilp_allocation(ev, resolved, s, budget)
        greedy = greedy_allocation(ev, resolved, s, budget)
        for config in (ilp, greedy):
            assert config.layers["conv1"] == config.layers["conv2"]
            assert config_size(ev.model, ev.layers, config).total_bytes <= budget
        best = None
        for combo in itertools.product((2, 4, 8), repeat=len(ev.layers) - 1):
            bits = dict(
                zip([la.name for la in ev.layers if la.name != "conv2"], combo, strict=True)
            )
            bits["conv2"] = bits["conv1"]
            c = QuantConfig(layers={n: base_choice(resolved[n], b) for n, b in bits.items()})
            if config_size(ev.model, ev.layers, c).total_bytes <= budget:
                cost = summed_sensitivity(s, c)
                best = cost if best is None else min(best, cost)
        assert summed_sensitivity(s, ilp) == pytest.approx(best, rel=1e-9, abs=0)
