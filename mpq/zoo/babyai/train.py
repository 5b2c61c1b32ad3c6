"""Train the embedded BabyAI VLA policy: behaviour cloning on bot demos, then DAgger rounds.

    python -m mpq.zoo.babyai.train --out mpq/zoo/babyai/babyai_vla.pt

Deterministic for a given seed and thread count. DAgger (Ross et al., 2011; as in the BabyAI
paper) runs the policy on fresh training seeds, asks the bot what it would have done in each
visited state (``BabyAIBot.replan(action_taken)`` keeps the bot's plan in step with the policy's
actions) and adds those labelled states to the data, which fixes the states BC never visits.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mpq.zoo.babyai.demos import (
    TRAIN_SEED_BASE,
    Episode,
    collect_demos,
    level_seed,
    make_env,
    quiet_reset,
)
from mpq.zoo.babyai.policy import LEVELS, BabyAIVLAPolicy, tokenize
from mpq.zoo.babyai.task import evaluate_episodes

VALIDATION_SEED_BASE = 7_000_000  # disjoint from training, held-out and evaluation seeds


class EpisodeBuffer:
    """Episodes as flat arrays: images (S, 56, 56, 3) uint8, actions (S,), offsets per episode."""

    def __init__(self) -> None:
        self.episodes: list[Episode] = []

    def add(self, episodes: list[Episode]) -> None:
        self.episodes += episodes
        self.episodes.sort(key=lambda e: len(e.actions))

    def batch(self, rng: np.random.Generator, size: int) -> tuple[torch.Tensor, ...]:
        # NOTE: episodes of similar length together (a random window of the length-sorted list,
        # then a random subset of it), so padding to the longest wastes little compute.
        window = min(len(self.episodes), 4 * size)
        lo = int(rng.integers(0, len(self.episodes) - window + 1))
        picks = lo + rng.choice(window, size=min(size, window), replace=False)
        eps = [self.episodes[i] for i in picks]
        size = len(eps)
        t_max = max(len(e.actions) for e in eps)
        images = np.zeros((size, t_max, 56, 56, 3), dtype=np.uint8)
        actions = np.zeros((size, t_max), dtype=np.int64)
        mask = np.zeros((size, t_max), dtype=bool)
        for row, e in enumerate(eps):
            n = len(e.actions)
            images[row, :n], actions[row, :n], mask[row, :n] = e.images, e.actions, True
        tokens = tokenize([e.mission for e in eps])
        return torch.from_numpy(images), tokens, torch.from_numpy(actions), torch.from_numpy(mask)


def dagger_episode(policy: BabyAIVLAPolicy, level: str, seed: int) -> Episode | None:
    """Run the policy on one seed, labelling every visited state with the bot's action."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    env = make_env(level)
    obs, _ = quiet_reset(env, seed)
    bot = BabyAIBot(env.unwrapped)
    tokens = tokenize([obs["mission"]])
    memory = policy.initial_memory(1)
    images, labels = [], []
    taken: int | None = None
    done = False
    try:
        with torch.inference_mode():
            while not done:
                labels.append(int(bot.replan(taken)))
                images.append(obs["image"])
                image = torch.from_numpy(obs["image"])[None, None]
                logits, memory = policy(image, tokens, memory)
                taken = int(logits[0, -1].argmax())
                obs, _, terminated, truncated, _ = env.step(taken)
                done = terminated or truncated
    except Exception:  # noqa: BLE001  the bot cannot always replan from an odd state; skip it
        return None
    return Episode(level, seed, obs["mission"], np.stack(images), np.asarray(labels))


def train_steps(
    policy: BabyAIVLAPolicy,
    buffer: EpisodeBuffer,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    steps: int,
    batch_size: int,
) -> float:
    policy.train()
    loss_sum = 0.0
    for _ in range(steps):
        images, tokens, actions, mask = buffer.batch(rng, batch_size)
        logits, _ = policy(images, tokens, policy.initial_memory(images.shape[0]))
        loss = nn.functional.cross_entropy(logits[mask], actions[mask])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_sum += loss.item()
    policy.eval()
    return loss_sum / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--demos-per-level", type=int, default=12000)
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps in all")
    p.add_argument("--dagger-rounds", type=int, default=3)
    p.add_argument("--dagger-episodes", type=int, default=1500, help="per level per round")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes for bot demos")
    p.add_argument("--eval-episodes", type=int, default=100, help="validation, per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--init", type=Path, default=None, help="start from this state_dict (fine-tuning)"
    )
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    buffer = EpisodeBuffer()
    buffer.add(collect_demos(LEVELS, args.demos_per_level, TRAIN_SEED_BASE, args.workers))
    demo_s = time.perf_counter() - start
    print(f"{len(buffer.episodes)} demos in {demo_s:.0f}s", flush=True)

    policy = BabyAIVLAPolicy()
    if args.init is not None:
        policy.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
    )
    phases = args.dagger_rounds + 1
    next_seed = args.demos_per_level
    history = []
    for phase in range(phases):
        loss = train_steps(
            policy, buffer, optimizer, schedule, rng, args.steps // phases, args.batch_size
        )
        val = evaluate_episodes(policy, args.eval_episodes, seed_base=VALIDATION_SEED_BASE)
        row = {
            "phase": phase,
            "loss": loss,
            "episodes": len(buffer.episodes),
            "minutes": (time.perf_counter() - start) / 60,
            **{k: v for k, v in val.items() if k.startswith("success/")},
        }
        history.append(row)
        print(json.dumps(row), flush=True)
        torch.save(policy.state_dict(), args.out)
        if phase == phases - 1:
            break
        new = []
        for li, level in enumerate(LEVELS):
            for i in range(next_seed, next_seed + args.dagger_episodes):
                ep = dagger_episode(policy, level, level_seed(TRAIN_SEED_BASE, li, i))
                if ep is not None:
                    new.append(ep)
        next_seed += args.dagger_episodes
        buffer.add(new)
    report = {
        "levels": list(LEVELS),
        "args": {k: str(v) for k, v in vars(args).items()},
        "demo_seconds": demo_s,
        "train_minutes": (time.perf_counter() - start) / 60,
        "history": history,
    }
    if args.init is not None:  # fine-tuned: keep how the starting checkpoint was trained
        init_json = args.init.with_suffix(".train.json")
        if init_json.is_file():
            report["init_from"] = json.loads(init_json.read_text())
    args.out.with_suffix(".train.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
