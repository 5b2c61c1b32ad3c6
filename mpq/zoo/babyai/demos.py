"""Expert demonstrations from minigrid's BabyAI bot, with fixed and disjoint seed ranges.

Seed ranges (per level, ``seed = base + level_index * LEVEL_STRIDE + i``) keep training data,
held-out calibration data and evaluation episodes apart:

- ``TRAIN_SEED_BASE``: behaviour-cloning demonstrations.
- ``HELDOUT_SEED_BASE``: held-out demos, the source of calibration inputs and of the proxy.
- ``EVAL_SEED_BASE``: the episodes whose success rate is reported; never used for training.
- ``CONFIRM_SEED_BASE``: held-out episodes that export confirms a chosen model on; the search
  never sees them.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np

TRAIN_SEED_BASE = 1_000_000
HELDOUT_SEED_BASE = 5_000_000
EVAL_SEED_BASE = 9_000_000
CONFIRM_SEED_BASE = 13_000_000
LEVEL_STRIDE = 100_000


def make_env(level: str):  # type: ignore[no-untyped-def]
    """A BabyAI level with 56x56 RGB egocentric observations (tile size 8)."""
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            import gymnasium as gym
            import minigrid  # noqa: F401  (importing registers the BabyAI levels)
            from minigrid.wrappers import RGBImgPartialObsWrapper
        except ImportError as exc:
            raise ValueError(
                f"the BabyAI simulator is not installed ({exc.name}): pip install 'mpq[babyai]'"
            ) from None

        return RGBImgPartialObsWrapper(gym.make(level), tile_size=8)


def quiet_reset(env, seed: int):  # type: ignore[no-untyped-def]
    """``env.reset`` with the level generator's "Sampling rejected" chatter silenced."""
    with contextlib.redirect_stdout(io.StringIO()):
        return env.reset(seed=seed)


def level_seed(base: int, level_index: int, i: int) -> int:
    return base + level_index * LEVEL_STRIDE + i


@dataclass(frozen=True, slots=True)
class Episode:
    """One demonstration: images (T, 56, 56, 3) uint8, actions (T,) int64, the mission."""

    level: str
    seed: int
    mission: str
    images: np.ndarray
    actions: np.ndarray


def bot_episode(level: str, seed: int) -> Episode | None:
    """Roll out the expert bot on one seed; ``None`` if the bot fails (rare)."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    env = make_env(level)
    obs, _ = quiet_reset(env, seed)
    bot = BabyAIBot(env.unwrapped)
    images, actions = [], []
    reward, done = 0.0, False
    try:
        while not done:
            action = int(bot.replan())
            images.append(obs["image"])
            actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            done = terminated or truncated
    except Exception:  # noqa: BLE001  the bot raises on the odd unsolvable layout; skip it
        return None
    if reward <= 0:
        return None
    return Episode(level, seed, obs["mission"], np.stack(images), np.asarray(actions))


def _bot_episodes(args: tuple[str, list[int]]) -> list[Episode]:
    level, seeds = args
    return [ep for s in seeds if (ep := bot_episode(level, s)) is not None]


def collect_demos(
    levels: tuple[str, ...], per_level: int, base: int, workers: int = 1
) -> list[Episode]:
    """``per_level`` bot demonstrations of each level from seeds ``base + ...``, in order."""
    jobs = []
    for li, level in enumerate(levels):
        seeds = [level_seed(base, li, i) for i in range(per_level)]
        chunk = max(1, len(seeds) // (workers * 4))
        jobs += [(level, seeds[k : k + chunk]) for k in range(0, len(seeds), chunk)]
    if workers <= 1:
        results = [_bot_episodes(j) for j in jobs]
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_bot_episodes, jobs)
    return [ep for chunk_eps in results for ep in chunk_eps]
