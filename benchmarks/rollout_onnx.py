"""An independent rollout of an exported BabyAI policy: ``model.onnx`` on plain onnxruntime.

    python benchmarks/rollout_onnx.py mpq-runs/babyai-flagship-v1/best [--episodes 100]

Plays each level's evaluation episodes (the search's own seeds) one at a time at batch 1, as a
robot runs the policy -- the instruction tokenised once (the flagship's: encoded once per
episode by its frozen float sentence encoder, which ships with the policy and is not part of
the step's file), the memory carried from step to step -- through an
``onnxruntime.InferenceSession`` of the exported file, never through mpq's simulated model or
its batched task loop, and prints success per level.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def episode_context(inputs: int, mission: str) -> tuple[np.ndarray, ...]:
    """What the step takes besides image and memory: the tiny policy's tokens (3 inputs), or
    the flagship's encoded instruction (4 inputs: words, instr)."""
    from mpq.zoo.babyai.policy import tokenize

    if inputs == 3:
        return (tokenize([mission]).numpy(),)
    from mpq.zoo.babyai.flagship import shipped_encoder

    return tuple(t.numpy() for t in shipped_encoder().encode([mission]))


def rollout(session, level: str, seeds: list[int]) -> np.ndarray:  # type: ignore[no-untyped-def]
    from mpq.zoo.babyai.demos import make_env, quiet_reset

    names = [i.name for i in session.get_inputs()]
    ok = np.zeros(len(seeds), dtype=bool)
    for n, seed in enumerate(seeds):
        env = make_env(level)
        obs, _ = quiet_reset(env, seed)
        context = episode_context(len(names), obs["mission"])
        memory = np.zeros((1, 1, 256), np.float32)
        while True:
            image = obs["image"][None, None].astype(np.uint8)
            feeds = dict(zip(names, (image, *context, memory), strict=True))
            logits, memory = session.run(None, feeds)
            obs, reward, terminated, truncated, _ = env.step(int(logits[0, -1].argmax()))
            if terminated or truncated:
                ok[n] = reward > 0
                break
    return ok


def main() -> None:
    import onnxruntime as ort

    from mpq.evaluators.stats import wilson_interval
    from mpq.zoo.babyai.demos import EVAL_SEED_BASE, level_seed
    from mpq.zoo.babyai.policy import LEVELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("export", type=Path, help="an export folder holding model.onnx")
    p.add_argument("--episodes", type=int, default=100, help="per level (the search's budget)")
    args = p.parse_args()
    spec = json.loads((args.export / "io.json").read_text())
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(args.export / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    print(f"{args.export / 'model.onnx'}: inputs {[i['name'] for i in spec['inputs']]}")
    print("| level | success (95% interval), onnxruntime, batch 1 |")
    print("|---|---|")
    total = 0
    for li, level in enumerate(LEVELS):
        seeds = [level_seed(EVAL_SEED_BASE, li, i) for i in range(args.episodes)]
        ok = rollout(session, level, seeds)
        total += int(ok.sum())
        lo, hi = wilson_interval(int(ok.sum()), len(ok))
        print(f"| {level} | {ok.mean():.3f} ({lo:.3f}-{hi:.3f}) |", flush=True)
    n = args.episodes * len(LEVELS)
    lo, hi = wilson_interval(total, n)
    print(f"| all | {total / n:.3f} ({lo:.3f}-{hi:.3f}) |")


if __name__ == "__main__":
    main()
