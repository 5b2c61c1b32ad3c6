"""Train the flagship BabyAI policy: distillation from the tiny policy plus the bot, then DAgger.

    python -m mpq.zoo.babyai.train_flagship --out mpq/zoo/babyai/babyai_flagship.pt

Why this recipe fits 2 CPU cores in about an hour: the stem and the sentence encoder are the tiny
policy's trained layers, transferred and frozen (as RT-1 starts from a pretrained image network
and a frozen sentence encoder), so each training frame's stem features (49 x 64) are computed
once and stored (float16); only the 21M-parameter fuse, trunk, memory and head train, on those
features. The loss per frame is ``CE(bot action) + KL(tiny policy || flagship)``: the bot says
what is right, the tiny policy's logits say how sure to be (Hinton et al., 2015). DAgger rounds
(Ross et al., 2011) run the flagship on fresh training seeds in lockstep batches and label every
visited state with the bot's action (``BabyAIBot.replan(action_taken)``) and the tiny policy's
logits. Deterministic for a given seed and thread count.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
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
from mpq.zoo.babyai.flagship import (
    ENCODER_MODULES,
    STEM_MODULES,
    BabyAIFlagshipPolicy,
    flagship_state,
)
from mpq.zoo.babyai.policy import LEVELS, BabyAIVLAPolicy, build_policy, tokenize
from mpq.zoo.babyai.task import evaluate_episodes
from mpq.zoo.babyai.train import VALIDATION_SEED_BASE


@dataclass(frozen=True, slots=True)
class FeatureEpisode:
    """One episode as the trunk sees it: stem features (T, 3136) float16, the bot's actions
    (T,) and the tiny policy's logits (T, 7)."""

    features: torch.Tensor
    actions: torch.Tensor
    teacher: torch.Tensor


def transfer(flagship: BabyAIFlagshipPolicy, tiny: BabyAIVLAPolicy) -> None:
    """Copy the tiny policy's stem and instruction encoder into the flagship and freeze them."""
    tiny_state = tiny.state_dict()
    for name in STEM_MODULES:
        module = getattr(flagship, name)
        module.load_state_dict(
            {
                k.removeprefix(name + "."): v
                for k, v in tiny_state.items()
                if k.startswith(name + ".")
            }
        )
        module.requires_grad_(False)
    for name in ENCODER_MODULES:
        getattr(flagship.encoder, name).load_state_dict(getattr(tiny, name).state_dict())
    flagship.encoder.requires_grad_(False)  # type: ignore[union-attr]


@torch.inference_mode()
def featurize(
    flagship: BabyAIFlagshipPolicy, tiny: BabyAIVLAPolicy, episodes: list[Episode], batch: int = 32
) -> list[FeatureEpisode]:
    """Stem features and teacher logits of whole episodes (padded at the end: every layer is
    per-frame or causal, so padding changes no real frame)."""
    episodes = sorted(episodes, key=lambda e: len(e.actions))
    out = []
    for lo in range(0, len(episodes), batch):
        eps = episodes[lo : lo + batch]
        t_max = max(len(e.actions) for e in eps)
        images = np.zeros((len(eps), t_max, 56, 56, 3), dtype=np.uint8)
        for row, e in enumerate(eps):
            images[row, : len(e.actions)] = e.images
        image = torch.from_numpy(images)
        tokens = tokenize([e.mission for e in eps])
        words, instr = flagship.encoder(tokens)  # type: ignore[operator]
        features = flagship.perceive(image, words, instr).half()
        teacher, _ = tiny(image, tokens, tiny.initial_memory(len(eps)))
        for row, e in enumerate(eps):
            n = len(e.actions)
            out.append(
                FeatureEpisode(
                    features[row, :n].clone(),
                    torch.from_numpy(e.actions).long(),
                    teacher[row, :n].clone(),
                )
            )
    return out


@torch.inference_mode()
def dagger_level(
    flagship: BabyAIFlagshipPolicy, tiny: BabyAIVLAPolicy, level: str, seeds: list[int]
) -> list[FeatureEpisode]:
    """Run the flagship on ``seeds`` in lockstep; label each visited state with the bot's action
    and the tiny policy's logits (episodes where the bot cannot replan are dropped)."""
    from minigrid.utils.baby_ai_bot import BabyAIBot

    envs = [make_env(level) for _ in seeds]
    obs = [quiet_reset(env, s)[0] for env, s in zip(envs, seeds, strict=True)]
    bots = [BabyAIBot(env.unwrapped) for env in envs]
    missions = [o["mission"] for o in obs]
    tokens = tokenize(missions)
    words, instr = flagship.episode_context(missions)
    memory = flagship.initial_memory(len(seeds))
    tiny_memory = tiny.initial_memory(len(seeds))
    feats: list[list[torch.Tensor]] = [[] for _ in seeds]
    labels: list[list[int]] = [[] for _ in seeds]
    teach: list[list[torch.Tensor]] = [[] for _ in seeds]
    taken: list[int | None] = [None] * len(seeds)
    broken: set[int] = set()
    active = np.arange(len(seeds))
    while active.size:
        for i in active:
            try:
                labels[i].append(int(bots[i].replan(taken[i])))
            except Exception:  # noqa: BLE001  the bot cannot always replan from an odd state
                broken.add(int(i))
                labels[i].append(0)
        image = torch.from_numpy(np.stack([obs[i]["image"] for i in active]))[:, None]
        f = flagship.perceive(image, words[active], instr[active])
        logits, new_memory = flagship.act(f, memory[:, active])
        memory[:, active] = new_memory
        t_logits, t_memory = tiny(image, tokens[active], tiny_memory[:, active])
        tiny_memory[:, active] = t_memory
        still = []
        for row, (i, action) in enumerate(
            zip(active, logits[:, -1].argmax(-1).tolist(), strict=True)
        ):
            feats[i].append(f[row, 0].half())
            teach[i].append(t_logits[row, 0])
            taken[i] = action
            obs[i], _, terminated, truncated, _ = envs[i].step(action)
            if not (terminated or truncated or i in broken):
                still.append(i)
        active = np.asarray(still, dtype=np.int64)
    return [
        FeatureEpisode(torch.stack(feats[i]), torch.tensor(labels[i]), torch.stack(teach[i]))
        for i in range(len(seeds))
        if i not in broken
    ]


def batch_of(
    data: list[FeatureEpisode], rng: np.random.Generator, size: int
) -> tuple[torch.Tensor, ...]:
    """Episodes of similar length (a random window of the length-sorted list), padded."""
    window = min(len(data), 4 * size)
    lo = int(rng.integers(0, len(data) - window + 1))
    eps = [data[lo + int(i)] for i in rng.choice(window, size=min(size, window), replace=False)]
    t_max = max(len(e.actions) for e in eps)
    width = eps[0].features.shape[1]
    features = torch.zeros(len(eps), t_max, width)
    actions = torch.zeros(len(eps), t_max, dtype=torch.long)
    teacher = torch.zeros(len(eps), t_max, eps[0].teacher.shape[1])
    mask = torch.zeros(len(eps), t_max, dtype=torch.bool)
    for row, e in enumerate(eps):
        n = len(e.actions)
        features[row, :n], actions[row, :n], teacher[row, :n], mask[row, :n] = (
            e.features.float(),
            e.actions,
            e.teacher,
            True,
        )
    return features, actions, teacher, mask


def train_steps(
    policy: BabyAIFlagshipPolicy,
    data: list[FeatureEpisode],
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    steps: int,
    batch_size: int,
) -> float:
    policy.train()
    loss_sum = 0.0
    for _ in range(steps):
        features, actions, teacher, mask = batch_of(data, rng, batch_size)
        logits, _ = policy.act(features, policy.initial_memory(features.shape[0]))
        student = logits[mask]
        loss = nn.functional.cross_entropy(student, actions[mask]) + nn.functional.kl_div(
            student.log_softmax(-1),
            teacher[mask].log_softmax(-1),
            log_target=True,
            reduction="batchmean",
        )
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
    p.add_argument("--demos-per-level", type=int, default=5000)
    p.add_argument("--steps", type=int, default=2400, help="optimizer steps in all")
    p.add_argument("--dagger-rounds", type=int, default=2)
    p.add_argument("--dagger-episodes", type=int, default=500, help="per level per round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2, help="processes for bot demos")
    p.add_argument("--eval-episodes", type=int, default=100, help="validation, per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher", type=Path, default=None, help="tiny policy (default: shipped)")
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    tiny = build_policy(args.teacher)
    policy = BabyAIFlagshipPolicy()
    transfer(policy, tiny)
    policy.eval()
    demos = collect_demos(LEVELS, args.demos_per_level, TRAIN_SEED_BASE, args.workers)
    demo_s = time.perf_counter() - start
    data = featurize(policy, tiny, demos)
    del demos
    data.sort(key=lambda e: len(e.actions))
    print(
        f"{len(data)} demos ({sum(len(e.actions) for e in data)} frames) in {demo_s:.0f}s, "
        f"featurized by {(time.perf_counter() - start):.0f}s",
        flush=True,
    )
    trainable = [q for q in policy.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            min(1.0, (s + 1) / 50)
            * 0.5
            * (1 + math.cos(math.pi * min(s, args.steps) / args.steps))
        ),
    )
    phases = args.dagger_rounds + 1
    next_seed = args.demos_per_level
    history = []
    for phase in range(phases):
        loss = train_steps(
            policy, data, optimizer, schedule, rng, args.steps // phases, args.batch_size
        )
        val = evaluate_episodes(policy, args.eval_episodes, seed_base=VALIDATION_SEED_BASE)
        row = {
            "phase": phase,
            "loss": loss,
            "episodes": len(data),
            "minutes": (time.perf_counter() - start) / 60,
            **{k: v for k, v in val.items() if k.startswith("success/")},
        }
        history.append(row)
        print(json.dumps(row), flush=True)
        torch.save(flagship_state(policy, torch.float16), args.out)
        if phase == phases - 1:
            break
        for li, level in enumerate(LEVELS):
            seeds = [
                level_seed(TRAIN_SEED_BASE, li, i)
                for i in range(next_seed, next_seed + args.dagger_episodes)
            ]
            data += dagger_level(policy, tiny, level, seeds)
        next_seed += args.dagger_episodes
        data.sort(key=lambda e: len(e.actions))
    report = {
        "levels": list(LEVELS),
        "args": {k: str(v) for k, v in vars(args).items()},
        "demo_seconds": demo_s,
        "train_minutes": (time.perf_counter() - start) / 60,
        "trainable_parameters": sum(q.numel() for q in trainable),
        "history": history,
    }
    args.out.with_suffix(".train.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
