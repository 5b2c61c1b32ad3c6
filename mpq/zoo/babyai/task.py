"""Task success of a BabyAI policy over simulated episodes, batched across episodes.

Every configuration is scored on the same recorded evaluation seeds (``EVAL_SEED_BASE``), so two
configurations are compared on the same episodes (a paired comparison).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from mpq.evaluators import timing_slot
from mpq.evaluators.stats import wilson_interval
from mpq.zoo.babyai.demos import EVAL_SEED_BASE, level_seed, make_env, quiet_reset
from mpq.zoo.babyai.policy import LEVELS, tokenize

MEMORY_DIM = 256  # both shipped policies' GRU memory


def episode_context(model: nn.Module, missions: list[str]) -> tuple[torch.Tensor, ...]:
    """The inputs computed once per episode: the model's own ``episode_context`` (the flagship's
    frozen sentence encoder) or, for a policy that encodes the instruction every step, the
    tokens."""
    encode = getattr(model, "episode_context", None)
    return tuple(encode(missions)) if encode is not None else (tokenize(missions),)


@torch.inference_mode()
def rollout_level(
    model: nn.Module,
    level: str,
    seeds: list[int],
    greedy: bool = True,
    episodes: list[tuple[str, list[np.ndarray]]] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run one episode per seed, all in lockstep with one batched forward per step.

    Args:
        episodes: where given, filled with each episode's mission and the images the model
            saw, one per seed (``qat.record``'s states).

    Returns:
        (success (N,) bool, episode length (N,) int).
    """
    envs = [make_env(level) for _ in seeds]
    obs = [quiet_reset(env, s)[0] for env, s in zip(envs, seeds, strict=True)]
    context = episode_context(model, [o["mission"] for o in obs])
    memory = torch.zeros(1, len(seeds), model.memory_gru.hidden_size)  # type: ignore[union-attr]
    success = np.zeros(len(seeds), dtype=bool)
    length = np.zeros(len(seeds), dtype=np.int64)
    active = np.arange(len(seeds))
    if episodes is not None:
        episodes[:] = [(o["mission"], []) for o in obs]
    while active.size:
        timing_slot.yield_point()  # a trial waiting to time its latency gets the node now
        if episodes is not None:
            for i in active:
                episodes[i][1].append(obs[i]["image"])
        image = torch.from_numpy(np.stack([obs[i]["image"] for i in active]))[:, None]
        logits, new_memory = model(image, *(c[active] for c in context), memory[:, active])
        memory[:, active] = new_memory
        logits = logits[:, -1]
        actions = (
            logits.argmax(-1)
            if greedy
            else torch.distributions.Categorical(logits=logits).sample()
        )
        still = []
        for i, action in zip(active, actions.tolist(), strict=True):
            obs[i], reward, terminated, truncated, _ = envs[i].step(action)
            length[i] += 1
            if terminated or truncated:
                success[i] = reward > 0
            else:
                still.append(i)
        active = np.asarray(still, dtype=np.int64)
    return success, length


def evaluate_episodes(
    model: nn.Module,
    budget: int,
    levels: tuple[str, ...] = LEVELS,
    seed_base: int = EVAL_SEED_BASE,
) -> dict[str, Any]:
    """The task: ``budget`` episodes of each level; success per level and overall.

    Returns metrics ``success`` (all episodes pooled), ``success_lo``/``success_hi`` (95%
    Wilson), ``success/<level>`` with its interval, ``mean_episode_length``,
    ``episodes_per_s`` and ``outcomes`` (each episode's 0/1, level by level, seed order: two
    configurations compare on the same episodes).
    """
    start = time.perf_counter()
    metrics: dict[str, Any] = {}
    total_ok, total_n, lengths, outcomes = 0, 0, [], []
    for li, level in enumerate(levels):
        seeds = [level_seed(seed_base, li, i) for i in range(budget)]
        ok, length = rollout_level(model, level, seeds)
        lo, hi = wilson_interval(int(ok.sum()), len(ok))
        short = level.removeprefix("BabyAI-").removesuffix("-v0")
        metrics[f"success/{short}"] = float(ok.mean())
        metrics[f"success_lo/{short}"], metrics[f"success_hi/{short}"] = lo, hi
        total_ok, total_n = total_ok + int(ok.sum()), total_n + len(ok)
        lengths.append(length)
        outcomes.append("".join("1" if x else "0" for x in ok))
    metrics["success"] = total_ok / total_n
    metrics["success_lo"], metrics["success_hi"] = wilson_interval(total_ok, total_n)
    metrics["mean_episode_length"] = float(np.concatenate(lengths).mean())
    metrics["episodes_per_s"] = total_n / (time.perf_counter() - start)
    return {**metrics, "outcomes": "".join(outcomes)}  # per episode, level by level


def confirm_episodes(model: nn.Module, budget: int) -> dict[str, Any]:
    """``evaluate_episodes`` on the confirmation seeds (``CONFIRM_SEED_BASE``), which the search
    never plays: an unbiased success for the configuration export picks."""
    from mpq.zoo.babyai.demos import CONFIRM_SEED_BASE

    return evaluate_episodes(model, budget, seed_base=CONFIRM_SEED_BASE)


def _demo_batches(
    episodes_per_level: int,
    context: Callable[[list[str]], tuple[torch.Tensor, ...]],
    seed_base: int | None = None,
) -> list[tuple[torch.Tensor, ...]]:
    """Bot demos (never the evaluation seeds; by default the held-out ones) as whole episodes
    from an empty memory, episodes of equal length in one batch: (image (B, T, 56, 56, 3),
    *context(missions), memory (1, B, 256))."""
    from mpq.zoo.babyai.demos import HELDOUT_SEED_BASE, collect_demos

    base = HELDOUT_SEED_BASE if seed_base is None else seed_base
    demos = collect_demos(LEVELS, episodes_per_level, base)
    by_length: dict[int, list] = {}
    for ep in demos:
        by_length.setdefault(len(ep.actions), []).append(ep)
    batches = []
    for length in sorted(by_length):
        eps = by_length[length]
        images = torch.from_numpy(np.stack([e.images for e in eps]))
        memory = torch.zeros(1, len(eps), MEMORY_DIM)
        batches.append((images, *context([e.mission for e in eps]), memory))
    return batches


def _first_step(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """One control step at batch 1 of a calibration batch, as a robot runs the policy."""
    image, *context, _ = batch
    return (
        image[:1, :1].contiguous(),
        *(c[:1].contiguous() for c in context),
        torch.zeros(1, 1, MEMORY_DIM),
    )


def calibration_batches(episodes_per_level: int = 16) -> list[tuple[torch.Tensor, ...]]:
    """The tiny policy's calibration inputs: (image, tokens (B, L), memory) per batch."""
    return _demo_batches(episodes_per_level, lambda missions: (tokenize(missions),))


def training_batches(episodes_per_level: int = 256) -> list[tuple[torch.Tensor, ...]]:
    """The tiny policy's QAT data (``qat.data``): bot demos on the policy's own training seeds
    (``TRAIN_SEED_BASE``; never the evaluation or held-out ones), 16 times the calibration set:
    at 2 bits, 1000 steps on 16 episodes per level reach 0.882, on 64 0.943, on 256 0.955
    (float 0.975; README). The bot's 1,024 episodes take minutes on one core, so a process
    collects them once (about 240 MB of frames, kept; the batches are only read)."""
    return list(_training_demos(episodes_per_level, flagship=False))


def flagship_training_batches(episodes_per_level: int = 256) -> list[tuple[torch.Tensor, ...]]:
    """The flagship's QAT data: as ``training_batches``, with its sentence encoder."""
    return list(_training_demos(episodes_per_level, flagship=True))


@functools.cache
def _training_demos(
    episodes_per_level: int, flagship: bool
) -> tuple[tuple[torch.Tensor, ...], ...]:
    from mpq.zoo.babyai.demos import TRAIN_SEED_BASE

    if flagship:
        from mpq.zoo.babyai.flagship import shipped_encoder

        context = shipped_encoder().encode
    else:
        context = lambda missions: (tokenize(missions),)  # noqa: E731
    return tuple(_demo_batches(episodes_per_level, context, TRAIN_SEED_BASE))


RECORD_OFFSET = 50_000  # recorded rollouts' seeds: training seeds the demos do not use


def record_states(
    model: nn.Module, round_: int, episodes_per_level: int = 16
) -> list[tuple[torch.Tensor, ...]]:
    """``qat.record`` for both shipped policies: the inputs ``model`` (the quantized policy
    being fine-tuned) meets in its own greedy rollouts, ``episodes_per_level`` of each level
    on new training seeds each round (``TRAIN_SEED_BASE``, from ``RECORD_OFFSET``; never the
    evaluation, held-out or confirmation seeds). Batched like the demos: whole episodes from an
    empty memory, equal lengths together, the context as the model computes it."""
    from mpq.zoo.babyai.demos import TRAIN_SEED_BASE

    first = RECORD_OFFSET + round_ * episodes_per_level
    by_length: dict[int, list[tuple[np.ndarray, str]]] = {}
    for li, level in enumerate(LEVELS):
        seeds = [level_seed(TRAIN_SEED_BASE, li, first + i) for i in range(episodes_per_level)]
        episodes: list[tuple[str, list[np.ndarray]]] = []
        rollout_level(model, level, seeds, episodes=episodes)
        for mission, images in episodes:
            by_length.setdefault(len(images), []).append((np.stack(images), mission))
    batches = []
    with torch.inference_mode():
        for length in sorted(by_length):
            images, missions = zip(*by_length[length], strict=True)
            context = episode_context(model, list(missions))
            memory = torch.zeros(1, len(images), model.memory_gru.hidden_size)  # type: ignore[union-attr]
            batches.append((torch.from_numpy(np.stack(images)), *context, memory))
    return [tuple(t.clone() for t in b) for b in batches]  # out of inference mode


def example_inputs() -> tuple[torch.Tensor, ...]:
    """The tiny policy's latency inputs: one control step at batch 1."""
    return _first_step(calibration_batches(episodes_per_level=1)[0])


def flagship_calibration_batches(episodes_per_level: int = 16) -> list[tuple[torch.Tensor, ...]]:
    """The flagship's calibration inputs: (image, words (B, L, d), instr (B, d), memory), the
    instruction encoded once per episode by the shipped sentence encoder."""
    from mpq.zoo.babyai.flagship import shipped_encoder

    return _demo_batches(episodes_per_level, shipped_encoder().encode)


def flagship_example_inputs() -> tuple[torch.Tensor, ...]:
    """The flagship's latency inputs: one control step at batch 1 (the encoder ran before)."""
    return _first_step(flagship_calibration_batches(episodes_per_level=1)[0])
