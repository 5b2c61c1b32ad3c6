from __future__ import annotations

import re
from pathlib import Path

import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution

from mpq.search import rules
from mpq.search import study as study_mod
from mpq.search.config import SearchConfig, load_search_config
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerOptions, Override, SearchSpace
from tests.models import ConvNet
from tests.search.helpers import conv_config

LAYERS = discover_layers(ConvNet())


def _resolved():  # type: ignore[no-untyped-def]
    space = SearchSpace(
        defaults=LayerOptions(w_bits=(4, 8, 32), a_bits=(8, 32)),
        overrides=(Override(match="fc", w_bits=(8,), a_bits=(32,)),),
    )
    return space.resolve(LAYERS)


def test_fixed_dimensions_are_not_searched_and_bits_are_ordered() -> None:
    dists = study_mod.distributions(_resolved())
    assert "fc.w_bits_rank" not in dists and "fc.a_bits_rank" not in dists
    assert dists["conv1.w_bits_rank"] == IntDistribution(0, 2)  # ranks of (4, 8, 32)
    assert set(dists) == {
        f"{n}.{d}_rank" for n in ("conv1", "conv2", "conv1d") for d in ("w_bits", "a_bits")
    }


def test_unordered_dimensions_are_categories() -> None:
    space = SearchSpace(defaults=LayerOptions(w_bits=(8,), symmetric=(True, False)))
    dists = study_mod.distributions(space.resolve(LAYERS))
    assert dists["conv1.symmetric"] == CategoricalDistribution([True, False])


def test_params_and_config_round_trip() -> None:
    resolved = _resolved()
    params = {k: d.high for k, d in study_mod.distributions(resolved).items()}
    config = study_mod.config_from_params(resolved, params)
    config.check(LAYERS)
    assert config.layers["fc"].w_bits == 8 and config.layers["conv1"].w_bits == 32
    assert config.layers["conv1"].a_bits == 32
    assert study_mod.params_from_config(resolved, config) == params
    low = study_mod.config_from_params(resolved, {k: 0 for k in params})
    assert low.layers["conv1"].w_bits == 4 and low.layers["conv1"].a_bits == 8


def test_a_seed_outside_the_space_is_refused() -> None:
    resolved = _resolved()
    config = study_mod.config_from_params(resolved, {})
    bad = config.model_copy(
        update={
            "layers": {
                **config.layers,
                "conv1": config.layers["conv1"].model_copy(update={"w_bits": 6}),
            }
        }
    )
    with pytest.raises(ValueError, match=r"layers\['conv1'\].w_bits=6 not in the space"):
        study_mod.params_from_config(resolved, bad)


def test_constraints_are_named_and_signed() -> None:
    cfg = SearchConfig.model_validate(
        {
            "name": "c",
            "model": "m:f",
            "task": "m:t",
            "calibration": "m:c",
            "constraints": {
                "max_success_drop": 0.05,
                "max_size_bytes": 1000,
                "max_latency_ms": 2.0,
            },
        }
    )
    values = rules.constraint_values(
        cfg, {"success": 0.9, "size_bytes": 1200, "latency_ms": 1.0}, 1.0
    )
    assert values == pytest.approx(
        {"success_drop": 0.05, "size_budget": 200, "latency_budget": -1.0}
    )


@pytest.mark.parametrize("sampler", ["nsga2", "tpe", "random", "gp"])
def test_samplers_by_name(sampler: str, tmp_path: Path) -> None:
    cfg = conv_config(tmp_path, sampler=sampler)
    study = study_mod.open_study(cfg, resume=False)
    assert type(study.sampler).__name__.lower().startswith(sampler[:3])
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE", "MINIMIZE"]


def test_objective_mismatch_on_resume(tmp_path: Path) -> None:
    study_mod.open_study(conv_config(tmp_path), resume=False)
    other = conv_config(tmp_path, objectives=["success", "size_bytes"])
    with pytest.raises(ValueError, match="has objectives"):
        study_mod.open_study(other, resume=True)


@pytest.mark.parametrize(
    "yaml_text,message",
    [
        (
            "name: x\nmodel: m:f\ntask: m:t\ncalibration: m:c\nobjectives: [success, speed]\n",
            "objectives.1: Input should be 'success', 'size_bytes' or 'latency_ms'",
        ),
        (
            "name: x\nmodel: m:f\ntask: m:t\ncalibration: m:c\nsampler: cmaes\n",
            "sampler: Input should be",
        ),
        (
            "name: x\nmodel: m:f\ntask: m:t\ncalibration: m:c\nbogus: 1\n",
            "bogus: Extra inputs are not permitted",
        ),
        (
            "name: x\nmodel: m:f\ntask: m:t\ncalibration: m:c\ntask_budget: 5\nscreen_budget: 5\n",
            "screen_budget=5 must be < task_budget=5",
        ),
        ("model: m:f\ntask: m:t\ncalibration: m:c\n", "name: Field required"),
        (
            "name: x\nmodel: m:f\ntask: m:t\ncalibration: m:c\nlatency: {backend: tensorrt}\n",
            "latency.backend: backend='tensorrt' not in ['onnxruntime', 'torch',",
        ),
        (
            "name: x\nmodel: m:f\ntask: m:t\ncalibration: m:c\nlatency: {backend: torch-cuda}\n",
            "latency.backend 'torch-cuda' runs on a GPU: set ray.gpus_per_trial > 0",
        ),
    ],
)
def test_bad_search_configs(tmp_path: Path, yaml_text: str, message: str) -> None:
    p = tmp_path / "search.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_search_config(p)


def test_group_sizes_are_an_ordered_dimension_where_groups_apply() -> None:
    """``group_size: [32, 128]`` with per_group is searched by rank; sizes that do not divide
    a layer's reduction axis are dropped for it, and without per_group it is no choice."""
    space = SearchSpace(
        defaults=LayerOptions(w_bits=(4, 8), granularity=("per_group",), group_size=(16, 32, 128)),
        overrides=(Override(match="fc", granularity=("per_channel",)),),
    )
    resolved = space.resolve(LAYERS)
    assert resolved["conv1d"].group_size == (16,)  # reduction 16: only 16 divides it
    assert resolved["fc"].group_size == (16,)  # no groups, no choice
    dists = study_mod.distributions(resolved)
    assert "conv1d.group_size_rank" not in dists and "fc.group_size_rank" not in dists
    config = study_mod.config_from_params(resolved, {})
    assert config.layers["fc"].group_size is None and config.layers["conv1d"].group_size == 16
    params = study_mod.params_from_config(resolved, config)
    assert study_mod.config_from_params(resolved, params) == config


def test_float_weights_do_not_multiply_by_group_sizes() -> None:
    """A float (w32) choice under per_group is one choice whatever the group sizes: no two
    keys, no second evaluation, for the same model."""
    options = LayerOptions(w_bits=(4, 32), granularity=("per_group",), group_size=(16, 32))
    keys = {c.key() if hasattr(c, "key") else c for c in options.choices()}
    assert len(options.choices()) == 3  # w4 g16, w4 g32, w32
    assert len(keys) == 3
    assert options.first(w_bits=32, group_size=32) == options.first(w_bits=32)


def test_a_fused_group_is_one_decision() -> None:
    space = SearchSpace(defaults=LayerOptions(w_bits=(4, 8, 32)), groups=(("conv1", "conv2"),))
    resolved = space.resolve(LAYERS)
    dists = study_mod.distributions(resolved)
    assert "conv1.w_bits_rank" in dists and not any(k.startswith("conv2.") for k in dists)
    config = study_mod.config_from_params(resolved, {"conv1.w_bits_rank": 0, "fc.w_bits_rank": 2})
    assert config.layers["conv2"] == config.layers["conv1"] and config.layers["conv1"].w_bits == 4
    assert (
        study_mod.config_from_params(resolved, study_mod.params_from_config(resolved, config))
        == config
    )
    split = config.model_copy(update={"layers": {**config.layers, "conv2": config.layers["fc"]}})
    with pytest.raises(
        ValueError,
        match=r"^seed config: layers\['conv2'\] differs from layers\['conv1'\], the first layer "
        r"of its fused group \(one decision\)$",
    ):
        study_mod.params_from_config(resolved, split)


def test_more_workers_than_cpus_are_capped_and_said(tmp_path: Path) -> None:
    import os

    from mpq.search.cluster import capped_workers

    cfg = conv_config(tmp_path, ray={"workers": 1000})
    capped, note = capped_workers(cfg)
    cpus = os.cpu_count() or 1
    assert capped.ray.workers == cpus
    assert note == (
        f"ray.workers=1000 but this machine has {cpus} CPUs (1 per trial): running {cpus} "
        "trials at a time"
    )
    assert capped_workers(conv_config(tmp_path, ray={"workers": 1})) == (
        conv_config(tmp_path, ray={"workers": 1}),
        None,
    )


def test_constraints_nothing_can_meet_are_refused_before_the_search(tmp_path: Path) -> None:
    from mpq.search.runner import preflight

    with pytest.raises(ValueError, match=r"max_success_drop\n?.*greater than or equal to 0"):
        conv_config(tmp_path, constraints={"max_success_drop": -0.1})
    cfg = conv_config(tmp_path, constraints={"max_size_bytes": 100})
    with pytest.raises(
        ValueError,
        match=r"^s: constraints.max_size_bytes=100: the smallest configuration of the space "
        r"has [\d,]+ bytes; nothing can meet it$",
    ):
        preflight(cfg, "s")


def test_a_bad_override_speaks_the_same_one_line_dialect() -> None:
    space = SearchSpace(overrides=(Override(match="*", w_bits=(1,)),))
    with pytest.raises(
        ValueError, match=r"^s: overrides\[0\]: w_bits: w_bits=1 not in \(2, 3, 4, 5, 6, 8, 16"
    ):
        space.resolve(LAYERS, "s")


def test_a_database_password_is_masked_wherever_the_url_is_shown(tmp_path: Path) -> None:
    from mpq.search.config import masked_url

    url = "postgresql://mpq:s3cret@db.example:5432/studies"
    assert masked_url(url) == "postgresql://mpq:***@db.example:5432/studies"
    cfg = conv_config(tmp_path, storage=url)
    assert "s3cret" not in cfg.storage_shown()
    assert masked_url("sqlite:////tmp/x/study.db") == "sqlite:////tmp/x/study.db"


def test_lost_seeds_are_requeued_once_and_failed_ones_are_not(tmp_path: Path) -> None:
    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState, create_trial

    from mpq.search.study_setup import requeue_lost_seeds

    study = study_mod.open_study(conv_config(tmp_path), resume=False)
    dist = {"fc.w_bits_rank": IntDistribution(0, 4)}
    for rank, label, reason in (
        (0, "uniform-8bit", "stale: the process running it stopped (no heartbeat)"),
        (1, "uniform-4bit", "task 'm:t' returned success=nan, not a finite number"),
        (2, None, "interrupted (SIGINT)"),
        (3, "greedy-50pct", "interrupted (SIGINT)"),
    ):
        attrs = {"fail_reason": reason} | ({"seed": label} if label else {})
        study.add_trial(
            create_trial(
                state=TrialState.FAIL,
                params={"fc.w_bits_rank": rank},
                distributions=dist,
                user_attrs=attrs,
            )
        )
    assert requeue_lost_seeds(study) == ["uniform-8bit", "greedy-50pct"]
    assert requeue_lost_seeds(study) == []  # waiting already: not twice
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert [t.user_attrs["seed"] for t in waiting] == ["uniform-8bit", "greedy-50pct"]
