"""Task success of a BabyAI policy over simulated episodes, batched across episodes.

Every configuration is scored on the same recorded evaluation seeds (``EVAL_SEED_BASE``), so two
configurations are compared on the same episodes (a paired comparison).
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from mpq.evaluators import timing_slot
from mpq.evaluators.stats import wilson_interval
from mpq.zoo.babyai.demos import EVAL_SEED_BASE, level_seed, make_env, quiet_reset
from mpq.zoo.babyai.policy import LEVELS, tokenize


@torch.inference_mode()
def rollout_level(
    model: nn.Module, level: str, seeds: list[int], greedy: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Run one episode per seed, all in lockstep with one batched forward per step.

    Returns:
        (success (N,) bool, episode length (N,) int).
    """
    envs = [make_env(level) for _ in seeds]
    obs = [quiet_reset(env, s)[0] for env, s in zip(envs, seeds, strict=True)]
    tokens = tokenize([o["mission"] for o in obs])
    memory = torch.zeros(1, len(seeds), model.memory_gru.hidden_size)  # type: ignore[union-attr]
    success = np.zeros(len(seeds), dtype=bool)
    length = np.zeros(len(seeds), dtype=np.int64)
    active = np.arange(len(seeds))
    while active.size:
        timing_slot.yield_point()  # a trial waiting to time its latency gets the node now
        image = torch.from_numpy(np.stack([obs[i]["image"] for i in active]))[:, None]
        logits, new_memory = model(image, tokens[active], memory[:, active])
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
) -> dict[str, float]:
    """The task: ``budget`` episodes of each level; success per level and overall.

    Returns metrics ``success`` (all episodes pooled), ``success_lo``/``success_hi`` (95%
    Wilson), ``success/<level>`` with its interval, ``mean_episode_length`` and
    ``episodes_per_s``.
    """
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    total_ok, total_n, lengths = 0, 0, []
    for li, level in enumerate(levels):
        seeds = [level_seed(seed_base, li, i) for i in range(budget)]
        ok, length = rollout_level(model, level, seeds)
        lo, hi = wilson_interval(int(ok.sum()), len(ok))
        short = level.removeprefix("BabyAI-").removesuffix("-v0")
        metrics[f"success/{short}"] = float(ok.mean())
        metrics[f"success_lo/{short}"], metrics[f"success_hi/{short}"] = lo, hi
        total_ok, total_n = total_ok + int(ok.sum()), total_n + len(ok)
        lengths.append(length)
    metrics["success"] = total_ok / total_n
    metrics["success_lo"], metrics["success_hi"] = wilson_interval(total_ok, total_n)
    metrics["mean_episode_length"] = float(np.concatenate(lengths).mean())
    metrics["episodes_per_s"] = total_n / (time.perf_counter() - start)
    return metrics


def confirm_episodes(model: nn.Module, budget: int) -> dict[str, float]:
    """``evaluate_episodes`` on the confirmation seeds (``CONFIRM_SEED_BASE``), which the search
    never plays: an unbiased success for the configuration export picks."""
    from mpq.zoo.babyai.demos import CONFIRM_SEED_BASE

    return evaluate_episodes(model, budget, seed_base=CONFIRM_SEED_BASE)


def calibration_batches(episodes_per_level: int = 16) -> list[tuple[torch.Tensor, ...]]:
    """Calibration inputs from held-out bot demos (never the evaluation seeds).

    Whole episodes are fed as sequences from an empty memory, so every input is one the policy
    really sees; episodes of equal length share a batch: (image (B, T, 56, 56, 3), tokens (B, L),
    memory (1, B, 256)).
    """
    from mpq.zoo.babyai.demos import HELDOUT_SEED_BASE, collect_demos

    demos = collect_demos(LEVELS, episodes_per_level, HELDOUT_SEED_BASE)
    by_length: dict[int, list] = {}
    for ep in demos:
        by_length.setdefault(len(ep.actions), []).append(ep)
    batches = []
    for length in sorted(by_length):
        eps = by_length[length]
        images = torch.from_numpy(np.stack([e.images for e in eps]))
        memory = torch.zeros(1, len(eps), 256)
        batches.append((images, tokenize([e.mission for e in eps]), memory))
    return batches


def example_inputs() -> tuple[torch.Tensor, ...]:
    """One control step at batch 1, as a robot runs the policy: the latency inputs."""
    batch = calibration_batches(episodes_per_level=1)[0]
    image, tokens, _ = batch
    return image[:1, :1].contiguous(), tokens[:1], torch.zeros(1, 1, 256)
