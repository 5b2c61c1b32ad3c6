"""The shipped VLA policy, its task, its calibration data and its training script."""

from __future__ import annotations

from pathlib import Path

import torch

from mpq.evaluators.task import run_task
from mpq.zoo.babyai import (
    LEVELS,
    build_policy,
    calibration_batches,
    evaluate_episodes,
    example_inputs,
    tokenize,
    training_batches,
)
from mpq.zoo.babyai.demos import EVAL_SEED_BASE, HELDOUT_SEED_BASE, LEVEL_STRIDE, TRAIN_SEED_BASE
from mpq.zoo.babyai.policy import MAX_TOKENS


def test_shipped_checkpoint_loads_and_succeeds() -> None:
    policy = build_policy()
    metrics = run_task(evaluate_episodes, policy, 20)
    assert metrics["success"] >= 0.85  # model card: ~0.97 over 500 episodes per level
    assert {f"success/{lv.removeprefix('BabyAI-').removesuffix('-v0')}" for lv in LEVELS} <= set(
        metrics
    )
    assert metrics["success_lo"] <= metrics["success"] <= metrics["success_hi"]
    outcomes = metrics["outcomes"]  # each episode, level by level: the success, unpooled
    assert len(outcomes) == 20 * len(LEVELS) and set(outcomes) <= {"0", "1"}
    assert outcomes.count("1") / len(outcomes) == metrics["success"]
    assert (
        Path(build_policy.__code__.co_filename).parent.joinpath("babyai_vla.pt").stat().st_size
        < 20e6
    )


def test_episodes_are_paired_across_calls() -> None:
    policy = build_policy()
    assert evaluate_episodes(policy, 5) | {"episodes_per_s": 0} == evaluate_episodes(policy, 5) | {
        "episodes_per_s": 0
    }


def test_quantization_matters_on_the_task() -> None:
    from mpq.evaluators.apply import apply_config
    from mpq.spaces.discover import discover_layers
    from mpq.spaces.space import LayerChoice, QuantConfig

    policy = build_policy()
    layers = discover_layers(policy)
    two_bit = apply_config(policy, QuantConfig.uniform(layers, LayerChoice(w_bits=2)))
    assert (
        evaluate_episodes(two_bit, 10)["success"] < evaluate_episodes(policy, 10)["success"] - 0.3
    )


def test_seed_ranges_are_disjoint() -> None:
    bases = sorted([TRAIN_SEED_BASE, HELDOUT_SEED_BASE, EVAL_SEED_BASE])
    span = LEVEL_STRIDE * len(LEVELS)
    assert all(b - a >= span for a, b in zip(bases, bases[1:], strict=False))


def test_calibration_and_example_inputs() -> None:
    batches = calibration_batches(episodes_per_level=2)
    assert batches and all(
        b[0].dtype == torch.uint8 and b[0].shape[2:] == (56, 56, 3) for b in batches
    )
    image, tokens, memory = example_inputs()
    assert (
        image.shape == (1, 1, 56, 56, 3)
        and tokens.shape == (1, MAX_TOKENS)
        and memory.shape == (1, 1, 256)
    )
    logits, new_memory = build_policy()(image, tokens, memory)
    assert logits.shape == (1, 1, 7) and new_memory.shape == memory.shape


def test_qat_data_is_demos_on_the_training_seeds() -> None:
    """``qat.data`` for the shipped policies: bot demos on the training seeds, never the
    held-out (calibration) or evaluation ones."""
    from mpq.zoo.babyai.demos import collect_demos

    batches = training_batches(episodes_per_level=1)
    images = {bytes(b[0][i, 0].numpy()) for b in batches for i in range(len(b[0]))}
    first = {bytes(ep.images[0]) for ep in collect_demos(LEVELS, 1, TRAIN_SEED_BASE)}
    held_out = {bytes(ep.images[0]) for ep in collect_demos(LEVELS, 1, HELDOUT_SEED_BASE)}
    assert images == first and not images & held_out


def test_recorded_states_are_the_models_own_rollouts_on_new_training_seeds() -> None:
    from mpq.zoo.babyai.demos import level_seed, make_env, quiet_reset
    from mpq.zoo.babyai.task import RECORD_OFFSET, record_states, rollout_level

    policy = build_policy()
    batches = record_states(policy, 1, episodes_per_level=2)
    assert sum(len(b[0]) for b in batches) == 2 * len(LEVELS)
    first = {bytes(b[0][i, 0].numpy()) for b in batches for i in range(len(b[0]))}
    seeds = [(li, level_seed(TRAIN_SEED_BASE, li, RECORD_OFFSET + 2 + i)) for li in range(4)
             for i in range(2)]  # fmt: skip
    want = {bytes(quiet_reset(make_env(LEVELS[li]), s)[0]["image"]) for li, s in seeds}
    assert first == want  # round 1: the seeds after round 0's
    _, length = rollout_level(policy, LEVELS[0], [seeds[0][1]])
    assert int(length[0]) in {b[0].shape[1] for b in batches}  # the policy's own episode
    image, tokens, memory = batches[0]
    assert image.shape[2:] == (56, 56, 3) and tokens.shape[1] == MAX_TOKENS
    assert memory.shape == (1, len(image), 256) and not image.is_inference()


def test_tokenize_left_pads_and_maps_unknown_words() -> None:
    t = tokenize(["go to the red ball", "fly to the moon"])
    assert t[0, :5].tolist() == [0] * 5 and t[0, -1] != 0
    assert t[1, -4].item() == 1  # 'fly' -> <unk>


def test_training_script_runs(tmp_path: Path) -> None:
    from mpq.zoo.babyai.train import main

    out = tmp_path / "tiny.pt"
    main(
        [
            "--out",
            str(out),
            "--demos-per-level",
            "3",
            "--steps",
            "4",
            "--dagger-rounds",
            "1",
            "--dagger-episodes",
            "1",
            "--eval-episodes",
            "1",
            "--batch-size",
            "4",
            "--workers",
            "1",
            "--threads",
            "1",
        ]
    )
    policy = build_policy(out)  # loads with weights_only=True
    assert sum(p.numel() for p in policy.parameters()) > 1_000_000
    assert out.with_suffix(".train.json").exists()


def test_batched_episodes_equal_batch_one_episodes() -> None:
    """Dynamic activation ranges are per episode: N episodes played in one batch give exactly
    the N episodes played alone at batch 1, as a robot plays them, under the main job's
    dynamic W4A8."""
    import numpy as np

    from mpq.evaluators.apply import apply_config
    from mpq.spaces.discover import discover_layers
    from mpq.spaces.space import LayerChoice, QuantConfig
    from mpq.zoo.babyai.demos import level_seed
    from mpq.zoo.babyai.task import rollout_level

    policy = build_policy()
    layers = discover_layers(policy)
    choice = {
        la.name: LayerChoice(w_bits=4, a_bits=8 if la.takes_activations else 32) for la in layers
    }
    q = apply_config(policy, QuantConfig(layers=choice), calibration_batches(1), layers=layers)
    for li, level in enumerate(LEVELS):
        seeds = [level_seed(EVAL_SEED_BASE, li, i) for i in range(6)]
        ok, length = rollout_level(q, level, seeds)
        alone = [rollout_level(q, level, [s]) for s in seeds]
        assert np.array_equal(ok, np.concatenate([a[0] for a in alone])), level
        assert np.array_equal(length, np.concatenate([a[1] for a in alone])), level
