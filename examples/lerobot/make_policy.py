"""Make a tiny trained LeRobot policy and dataset the LeRobot way, to search with mpq.

Run in your LeRobot environment (lerobot 0.4.x, Python 3.10+; mpq installed beside it with
``pip install mpq`` -- or ``pip install -e .`` from a checkout):

    python examples/lerobot/make_policy.py --out lerobot-demo --policy act
    mpq search lerobot-demo/search.yaml --resume

It writes, with lerobot's own API and nothing downloaded:

- ``lerobot-demo/dataset``: a LeRobotDataset (v3 layout) of a point-reaching task: an
  ``observation.state`` (position, goal), an ``observation.image`` (32x32, the point and the goal
  drawn), the expert's ``action`` (a step of at most 0.1 towards a goal moving on a circle), 12
  episodes of 40 frames at 10 fps;
- ``lerobot-demo/policy``: a small ACT (or Diffusion Policy) trained on it for a few hundred
  steps, saved with ``save_pretrained`` (``config.json``, ``model.safetensors``) and its
  pre/post-processors (the normalization statistics);
- ``lerobot-demo/search.yaml``: an mpq search of that policy, with calibration frames from the
  dataset's first episodes and the offline task (action error against the float policy on the
  held-out episodes).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np
import torch

FPS, EPISODES, FRAMES, SIZE = 10, 12, 40, 32


def _features() -> dict:
    return {
        "observation.state": {"dtype": "float32", "shape": (4,), "names": None},
        "observation.image": {
            "dtype": "image",
            "shape": (3, SIZE, SIZE),
            "names": ["channels", "height", "width"],
        },
        "action": {"dtype": "float32", "shape": (2,), "names": None},
    }


def _image(pos: np.ndarray, goal: np.ndarray) -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    for (x, y), channel in ((pos, 0), (goal, 1)):
        i, j = (np.clip((np.array([y, x]) + 1) / 2 * (SIZE - 1), 0, SIZE - 1)).astype(int)
        img[max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2, channel] = 255
    return img


def make_dataset(root: Path) -> object:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset

    ds = LeRobotDataset.create(
        "mpq/point-reach", FPS, _features(), root=root, use_videos=False, robot_type="point"
    )
    rng = np.random.default_rng(0)
    for _ in range(EPISODES):  # the goal moves on a circle: the expert never stops
        pos, phase, turn = rng.uniform(-1, 1, 2), rng.uniform(0, 2 * np.pi), rng.choice([-1, 1])
        for t in range(FRAMES):
            angle = phase + turn * 0.15 * t
            goal = 0.6 * np.array([np.cos(angle), np.sin(angle)])
            action = np.clip(goal - pos, -0.1, 0.1) + rng.normal(0, 0.005, 2)
            ds.add_frame(
                {
                    "observation.state": np.concatenate([pos, goal]).astype(np.float32),
                    "observation.image": _image(pos, goal),
                    "action": action.astype(np.float32),
                    "task": "reach the goal",
                }
            )
            pos = np.clip(pos + action, -1, 1)
        ds.save_episode()
    ds.finalize()
    return ds


def make_config(kind: str, ds: object) -> object:
    from lerobot.configs.types import FeatureType
    from lerobot.datasets.utils import dataset_to_policy_features
    from lerobot.policies.factory import make_policy_config

    features = dataset_to_policy_features(ds.meta.features)
    outputs = {k: f for k, f in features.items() if f.type is FeatureType.ACTION}
    inputs = {k: f for k, f in features.items() if k not in outputs}
    if kind == "act":
        return make_policy_config(
            "act",
            input_features=inputs,
            output_features=outputs,
            chunk_size=8,
            n_action_steps=8,
            dim_model=64,
            n_heads=4,
            dim_feedforward=128,
            n_encoder_layers=2,
            n_decoder_layers=1,
            n_vae_encoder_layers=1,
            pretrained_backbone_weights=None,  # nothing downloaded
            device="cpu",
        )
    return make_policy_config(
        "diffusion",
        input_features=inputs,
        output_features=outputs,
        n_obs_steps=2,
        horizon=8,
        n_action_steps=4,
        crop_shape=None,
        down_dims=(32, 64),
        diffusion_step_embed_dim=32,
        kernel_size=3,
        n_groups=4,
        spatial_softmax_num_keypoints=16,
        pretrained_backbone_weights=None,
        use_group_norm=True,
        num_inference_steps=10,
        device="cpu",
    )


def train(kind: str, ds: object, out: Path, steps: int) -> None:
    from lerobot.datasets.lerobot_dataset import LeRobotDataset
    from lerobot.policies.factory import get_policy_class, make_pre_post_processors

    cfg = make_config(kind, ds)
    deltas = {"action": [i / FPS for i in range(cfg.chunk_size if kind == "act" else cfg.horizon)]}
    if kind == "diffusion":
        deltas["action"] = [
            i / FPS for i in range(1 - cfg.n_obs_steps, cfg.horizon - cfg.n_obs_steps + 1)
        ]
        for key in ("observation.state", "observation.image"):
            deltas[key] = [i / FPS for i in range(1 - cfg.n_obs_steps, 1)]
    data = LeRobotDataset("mpq/point-reach", root=ds.root, delta_timestamps=deltas)
    policy = get_policy_class(kind)(cfg)
    pre, post = make_pre_post_processors(cfg, dataset_stats=data.meta.stats)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True, drop_last=True)
    optim = torch.optim.AdamW(policy.parameters(), lr=3e-4)
    policy.train()
    step, start = 0, time.time()
    while step < steps:
        for batch in loader:
            loss, _ = policy.forward(pre(batch))
            optim.zero_grad()
            loss.backward()
            optim.step()
            step += 1
            if step % 50 == 0 or step == steps:
                print(f"step {step}/{steps} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
            if step >= steps:
                break
    policy.eval()
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)


SEARCH = """\
# mpq search of a LeRobot policy (made by examples/lerobot/make_policy.py)
name: lerobot-{kind}
model: lerobot:{policy}
calibration: lerobot:{dataset}          # frames of the dataset's first episodes (raw)
example_inputs: lerobot:{dataset}       # one frame, batch 1: what latency is measured on
task: lerobot:{dataset}                 # offline: the held-out episodes' frames whose action
                                        # chunk stays within tolerance of the float policy's
objectives: [success, size_bytes, latency_ms]
constraints:
  max_success_drop: 0.05
trials: {trials}
task_budget: 160                        # held-out frames
output_dir: {runs}
space:
  defaults:
    w_bits: [2, 4, 8, 32]
    a_bits: [8, 32]
ray:
  workers: 2
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("lerobot-demo"))
    parser.add_argument("--policy", choices=("act", "diffusion"), default="act")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()
    torch.manual_seed(0)
    root = args.out / "dataset"
    if root.exists():
        shutil.rmtree(root)
    ds = make_dataset(root)
    policy = args.out / f"policy-{args.policy}"
    train(args.policy, ds, policy, args.steps)
    yaml = args.out / f"search-{args.policy}.yaml"
    yaml.write_text(
        SEARCH.format(
            kind=args.policy,
            policy=policy.resolve(),
            dataset=root.resolve(),
            trials=args.trials,
            runs=(args.out / f"runs-{args.policy}").resolve(),
        )
    )
    print(f"policy: {policy}\nsearch: mpq search {yaml} --resume")


if __name__ == "__main__":
    main()
