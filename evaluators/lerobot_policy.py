"""LeRobot policies: ``model: lerobot:POLICY_DIR``, data and an offline task from a dataset folder.

A LeRobot policy folder (what ``policy.save_pretrained`` and ``lerobot-train`` write):
``config.json`` (the policy's type and features), ``model.safetensors`` (its weights) and the
pre/post-processors' normalization statistics (``policy_preprocessor_step_*_normalizer_
processor.safetensors``, ``policy_postprocessor_step_*_unnormalizer_processor.safetensors``).
Everything loads from safetensors (no pickle, no code): a folder without ``model.safetensors``
is refused.

What mpq quantizes and deploys is the policy between the robot's raw observations and its
raw actions (``LeRobotPolicy``): normalize the observations with the preprocessor's statistics
(lerobot's formulas: MEAN_STD, MIN_MAX, QUANTILES, QUANTILE10, IDENTITY), run the network once
(ACT: one action chunk; Diffusion Policy: the whole denoising loop from a fixed noise, so two
runs of one model agree and the exported graph computes what PyTorch does), and unnormalize the
action chunk. The queues ``select_action`` keeps between control steps are the robot loop's,
not the network's: a policy with a history of ``n_obs_steps`` takes observations with that time
axis, or, given one frame, repeats it (what lerobot does at an episode's first step).

Data and task, ``lerobot:DATASET_DIR`` (a LeRobotDataset folder the user has, read with
lerobot's own reader): calibration frames from the first ``CALIBRATION_SHARE`` of the episodes,
example inputs one of those frames at batch 1, and the task on the other episodes (held out:
never calibrated on). The task is an offline proxy, said in each result (``proxy``): the share of
held-out frames whose action chunk stays within ``TOLERANCE`` of the float policy's (per action
dimension, in units of the dataset's action standard deviation; ``lerobot:DIR?tolerance_std=0.25``
sets another). Episodes in the policy's gym environment are a user task (``module:function``)
where its package is installed.

Only the parts that need lerobot itself (building the policy class, reading a dataset) import
it; ``pip install lerobot`` is the user's (its torch pins stay out of mpq's requirements).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpq.evaluators.model import fold_batchnorm

SCHEME = "lerobot:"
TYPES = ("act", "diffusion")  # the policy types whose single forward is wired (``_chunk``)
CALIBRATION_SHARE = 0.5  # episodes calibrated on; the rest are the task's held-out frames
CALIBRATION_FRAMES = 64
TOLERANCE = 0.1  # action error allowed, in action standard deviations
NORM_STATS = {
    "MEAN_STD": ("mean", "std"),
    "MIN_MAX": ("min", "max"),
    "QUANTILES": ("q01", "q99"),
    "QUANTILE10": ("q10", "q90"),
}
EPS = 1e-8  # lerobot's NormalizerProcessorStep default


@dataclass(frozen=True)
class PolicyInfo:
    """What ``config.json`` says of a policy (no lerobot needed to read it)."""

    type: str
    inputs: dict[str, tuple[str, tuple[int, ...]]]  # key -> (feature type, shape)
    outputs: dict[str, tuple[str, tuple[int, ...]]]
    norm: dict[str, str]  # feature type -> mode
    n_obs_steps: int

    @classmethod
    def read(cls, folder: str | Path) -> PolicyInfo:
        """Raises ValueError: no folder, no or unreadable ``config.json``, no safetensors."""
        folder = Path(folder)
        where = f"model 'lerobot:{folder}'"
        if not folder.is_dir():
            raise ValueError(f"{where}: no such folder (a policy saved with save_pretrained)")
        try:
            cfg = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: config.json does not read ({exc})") from None
        if not (folder / "model.safetensors").is_file():
            raise ValueError(
                f"{where}: no model.safetensors (weights load from safetensors only, never "
                "from a pickle)"
            )

        def features(key: str) -> dict[str, tuple[str, tuple[int, ...]]]:
            return {k: (f["type"], tuple(f["shape"])) for k, f in cfg.get(key, {}).items()}

        kind = cfg.get("type")
        if kind not in TYPES:
            raise ValueError(f"{where}: policy type {kind!r} is not supported (one of {TYPES})")
        return cls(
            kind,
            features("input_features"),
            features("output_features"),
            dict(cfg.get("normalization_mapping", {})),
            int(cfg.get("n_obs_steps", 1)),
        )


def normalization_stats(folder: str | Path, which: str) -> dict[str, torch.Tensor]:
    """The statistics a saved pre- (``which="preprocessor"``) or post-processor normalizes
    with, ``{"observation.state.mean": ...}`` (safetensors; empty when it has none)."""
    from safetensors.torch import load_file

    stats: dict[str, torch.Tensor] = {}
    for path in sorted(
        Path(folder).glob(f"policy_{which}_step_*normalizer_processor.safetensors")
    ):
        stats |= load_file(path)
    return stats


class Normalize(nn.Module):
    """lerobot's normalization of one feature, as buffers that ship with the model:

    - ``MEAN_STD``: ``(x - mean) / (std + eps)``, inverse ``x std + mean``;
    - ``MIN_MAX`` (and the quantile modes with ``q01/q99``, ``q10/q90``): ``2 (x - lo) / d -
      1`` with ``d = hi - lo`` (``eps`` where 0), inverse ``(x + 1) d / 2 + lo``;
    - ``IDENTITY``, or no statistics at all for the key: ``x`` (as lerobot does); some of a
      mode's statistics without the others is an error (as in lerobot).
    """

    def __init__(self, mode: str, stats: Mapping[str, torch.Tensor], key: str, inverse: bool):
        super().__init__()
        names = NORM_STATS.get(mode)
        if names is None and mode != "IDENTITY":
            raise ValueError(f"lerobot policy: {key}: normalization mode {mode!r} is not known")
        missing = [f"{key}.{n}" for n in names or () if f"{key}.{n}" not in stats]
        if missing and not any(k.startswith(f"{key}.") for k in stats):
            names = None  # no statistics for this key: lerobot passes it through as it is
        elif missing:
            raise ValueError(
                f"lerobot policy: {key} is normalized {mode} but its processor holds no "
                f"{', '.join(missing)} (saved without dataset statistics?)"
            )
        self.mode, self.inverse = mode, inverse
        self.identity = names is None
        if names is not None:
            lo, hi = (stats[f"{key}.{n}"].float() for n in names)  # type: ignore[union-attr]
            self.register_buffer("a", lo)
            self.register_buffer("b", hi)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        a, b = self.a, self.b
        if self.mode == "MEAN_STD":
            return x * b + a if self.inverse else (x - a) / (b + EPS)
        d = torch.where(b - a == 0, torch.full_like(b, EPS), b - a)
        return (x + 1) * d / 2 + a if self.inverse else 2 * (x - a) / d - 1


class LeRobotPolicy(nn.Module):
    """Raw observations (keyword inputs named after the features) -> raw action chunk."""

    def __init__(self, policy: nn.Module, info: PolicyInfo, stats: dict, post: dict, source: str):
        super().__init__()
        self.policy = policy
        self.info = info
        self.source = source  # the float policy's folder: the offline task's reference
        self.keys = list(info.inputs)
        self.norm = nn.ModuleDict(
            {
                _module_key(k): Normalize(info.norm.get(t, "IDENTITY"), stats, k, False)
                for k, (t, _) in info.inputs.items()
            }
        )
        (self.action_key, (action_type, _)), *_ = info.outputs.items()
        self.unnorm = Normalize(
            info.norm.get(action_type, "IDENTITY"), post, self.action_key, True
        )
        if info.type == "diffusion":  # the denoising loop's starting noise, fixed
            cfg = policy.config
            shape = (1, cfg.horizon, info.outputs[self.action_key][1][0])
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
            self.register_buffer("noise", noise, persistent=False)

    def forward(self, **observations: torch.Tensor) -> torch.Tensor:
        missing = [k for k in self.keys if k not in observations]
        if missing:
            raise ValueError(
                f"lerobot policy: inputs {missing} missing (it reads {self.keys}; got "
                f"{list(observations)})"
            )
        batch = {k: self.norm[_module_key(k)](observations[k]) for k in self.keys}
        return self.unnorm(_chunk(self, with_history(batch, self.info)))


def _module_key(feature: str) -> str:
    return feature.replace(".", "__")  # a module name has no dots


def with_history(batch: dict[str, torch.Tensor], info: PolicyInfo) -> dict[str, torch.Tensor]:
    """Observations with the policy's time axis (``n_obs_steps`` > 1): a frame without one is
    repeated, as lerobot's queues are filled at an episode's first step."""
    if info.n_obs_steps == 1:
        return batch
    out = {}
    for k, x in batch.items():
        single = x.dim() == len(info.inputs[k][1]) + 1
        out[k] = x.unsqueeze(1).expand(-1, info.n_obs_steps, *x.shape[1:]) if single else x
    return out


def _chunk(model: LeRobotPolicy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One action chunk (normalized) from normalized observations, by the policy's own
    modules (lerobot's ``predict_action_chunk`` without its queues and randomness)."""
    policy, info = model.policy, model.info
    images = [k for k, (t, _) in info.inputs.items() if t == "VISUAL"]
    if info.type == "act":
        if images:
            batch = {**batch, "observation.images": [batch[k] for k in images]}
        return policy.model(batch)[0]
    if images:
        batch = {**batch, "observation.images": torch.stack([batch[k] for k in images], dim=-4)}
    noise = model.noise.expand(next(iter(batch.values())).shape[0], -1, -1)
    return policy.diffusion.generate_actions(batch, noise=noise)


def _lerobot() -> Any:
    try:
        from lerobot.policies.factory import get_policy_class
    except ImportError as exc:
        raise ValueError(
            f"a lerobot: model or data needs lerobot installed here ({exc}); install it in "
            "your policy's environment (pip install lerobot), mpq beside it"
        ) from None
    return get_policy_class


def load_policy(folder: str | Path) -> LeRobotPolicy:
    """The float policy of a LeRobot folder, between raw observations and raw actions.

    Raises:
        ValueError: see ``PolicyInfo.read``; lerobot missing; the weights do not load.
    """
    info = PolicyInfo.read(folder)
    policy_class = _lerobot()(info.type)
    from lerobot.configs.policies import PreTrainedConfig

    try:
        config = PreTrainedConfig.from_pretrained(str(folder))
        # the backbone's pretrained weights would be downloaded (and unpickled by torch.hub)
        # before model.safetensors overwrites them: never fetched
        if hasattr(config, "pretrained_backbone_weights"):
            config.pretrained_backbone_weights = None
        policy = policy_class.from_pretrained(str(folder), config=config, strict=True)
    except Exception as exc:  # noqa: BLE001  lerobot raises many kinds
        raise ValueError(f"model 'lerobot:{folder}': does not load ({exc})") from None
    pre, post = (
        normalization_stats(folder, "preprocessor"),
        normalization_stats(folder, "postprocessor"),
    )
    drop_training_only(policy, info)
    deterministic_sampling(policy, info)
    for backbone in backbones(policy, info):  # called whole by lerobot: its BatchNorms fold
        fold_batchnorm(backbone.eval())
    return LeRobotPolicy(policy.eval(), info, pre, post, str(Path(folder).resolve())).eval()


def backbones(policy: nn.Module, info: PolicyInfo) -> list[nn.Module]:
    """The vision backbones a policy calls as a whole (their BatchNorms fold into their
    convolutions; the policy itself does not trace with ``torch.fx``)."""
    net = policy.model if info.type == "act" else policy.diffusion  # type: ignore[attr-defined]
    encoder = getattr(net, "rgb_encoder", net)
    encoders = encoder if isinstance(encoder, nn.ModuleList) else [encoder]
    return [e.backbone for e in encoders if isinstance(getattr(e, "backbone", None), nn.Module)]


def deterministic_sampling(policy: nn.Module, info: PolicyInfo) -> bool:
    """In place: a Diffusion Policy trained with DDPM samples with DDIM (``eta`` 0) over the
    same schedule and ``num_inference_steps``. DDPM draws fresh noise at every denoising step,
    so no two runs of one model (nor the exported graph and PyTorch) would compute the same
    actions, and no quantization error could be told from sampling noise; DDIM runs the same
    trained network deterministically. Returns whether the scheduler changed."""
    if info.type != "diffusion":
        return False
    from diffusers import DDIMScheduler, DDPMScheduler

    net = policy.diffusion  # type: ignore[attr-defined]
    if not isinstance(net.noise_scheduler, DDPMScheduler):
        return False
    net.noise_scheduler = DDIMScheduler.from_config(net.noise_scheduler.config)
    return True


def drop_training_only(policy: nn.Module, info: PolicyInfo) -> list[str]:
    """In place: the modules inference never runs leave the deployed policy (ACT's VAE encoder
    reads the demonstration's actions, in training only), so they are neither searched nor
    counted in its size. Returns their names."""
    if info.type != "act":
        return []
    net = policy.model  # type: ignore[attr-defined]
    children = [n for n, _ in net.named_children() if n.startswith("vae_encoder")]
    buffers = [n for n, _ in net.named_buffers(recurse=False) if n.startswith("vae_encoder")]
    for name in children + buffers:
        delattr(net, name)
    return children + buffers


# -- data and the offline task: lerobot:DATASET_DIR ------------------------------------------


def split_episodes(n: int, share: float = CALIBRATION_SHARE) -> tuple[list[int], list[int]]:
    """Episodes ``0..n-1`` into calibration (the first ``share``, at least one) and held-out
    (the rest, at least one)."""
    if n < 2:
        raise ValueError(
            f"a lerobot dataset needs at least 2 episodes (calibration, task); got {n}"
        )
    k = min(max(1, round(n * share)), n - 1)
    return list(range(k)), list(range(k, n))


def spread(n: int, count: int) -> list[int]:
    """``count`` indices evenly spread over ``0..n-1`` (all of them where ``count >= n``)."""
    return torch.linspace(0, n - 1, min(count, n)).round().long().unique().tolist()


@cache
def _frames(
    folder: str, held_out: bool, count: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The observation features of ``count`` frames evenly spread over a dataset's calibration
    or held-out episodes (only those are decoded: a camera dataset holds many), and the
    dataset's action std."""
    _lerobot()
    from lerobot.datasets.lerobot_dataset import LeRobotDataset, LeRobotDatasetMetadata

    meta = LeRobotDatasetMetadata("local", root=folder)
    calibration, rest = split_episodes(meta.total_episodes)
    ds = LeRobotDataset("local", root=folder, episodes=rest if held_out else calibration)
    keys = [k for k in meta.features if k.startswith("observation.")]
    rows = [ds[i] for i in spread(len(ds), count)]
    frames = {k: torch.stack([r[k] for r in rows]).float() for k in keys}
    std = torch.as_tensor(meta.stats["action"]["std"]).float()
    return frames, std


def calibration(folder: str) -> list[dict[str, torch.Tensor]]:
    """Up to ``CALIBRATION_FRAMES`` frames of the calibration episodes, in batches of 16."""
    frames, _ = _frames(folder, False, CALIBRATION_FRAMES)
    n = len(next(iter(frames.values())))
    return [{k: v[i : i + 16] for k, v in frames.items()} for i in range(0, n, 16)]


def example_inputs(folder: str) -> dict[str, torch.Tensor]:
    return {k: v[:1] for k, v in calibration(folder)[0].items()}


def within_tolerance(
    actions: torch.Tensor, reference: torch.Tensor, std: torch.Tensor, tolerance: float
) -> torch.Tensor:
    """Per frame: every action of its chunk within ``tolerance`` standard deviations of the
    reference, per dimension (a bool per frame)."""
    err = (actions - reference).abs() / std.clamp_min(EPS)
    return (err <= tolerance).flatten(1).all(1)


def _batched(model: nn.Module, frames: dict[str, torch.Tensor], size: int = 64) -> torch.Tensor:
    n = len(next(iter(frames.values())))
    with torch.inference_mode():
        chunks = [
            model(**{k: v[i : i + size] for k, v in frames.items()}) for i in range(0, n, size)
        ]
    return torch.cat(chunks)


@cache
def _reference(source: str, folder: str, count: int) -> torch.Tensor:
    return _batched(load_policy(source), _frames(folder, True, count)[0])


def offline_task(
    folder: str, model: nn.Module, budget: int, tolerance_std: float = TOLERANCE
) -> dict[str, Any]:
    """The offline proxy on ``budget`` held-out frames (evenly spread): success is the share
    whose action chunk stays within ``tolerance_std`` of the float policy's; outcomes per frame."""
    source = getattr(_unwrap(model), "source", None)
    if source is None:
        raise ValueError("task 'lerobot:...' measures a model loaded as 'lerobot:POLICY_DIR'")
    frames, std = _frames(folder, True, budget)
    actions = _batched(model, frames)
    ok = within_tolerance(actions, _reference(source, folder, budget), std, tolerance_std)
    return {  # recorded with the trial: what this success is
        "success": float(ok.float().mean()),
        "outcomes": [bool(x) for x in ok],
        "offline_proxy": 1.0,  # frames against the float policy, not episodes in a simulator
        "tolerance_std": tolerance_std,
        "frames": float(len(ok)),
    }


def _unwrap(model: nn.Module) -> nn.Module:
    return model if isinstance(model, LeRobotPolicy) else getattr(model, "module", model)


def scheme_callable(spec: str, what: str) -> Callable[..., Any]:
    """``lerobot:POLICY_DIR`` as a ``model``; ``lerobot:DATASET_DIR`` as a ``calibration``,
    ``example_inputs`` or ``task`` (``lerobot:DATASET_DIR?tolerance_std=0.25``: the task's
    tolerance, in action standard deviations)."""
    folder, _, query = spec[len(SCHEME) :].partition("?")
    options = _task_options(spec, what, query)
    if what == "model":
        PolicyInfo.read(folder)  # a bad folder says so before anything imports lerobot
        return partial(load_policy, folder)
    if not Path(folder, "meta", "info.json").is_file():
        raise ValueError(f"{what} {spec!r}: not a LeRobotDataset folder (no meta/info.json)")
    fns = {"calibration": calibration, "example_inputs": example_inputs, "task": offline_task}
    if what not in fns:
        raise ValueError(f"{what} {spec!r}: a lerobot dataset serves {sorted(fns)}")
    return partial(fns[what], folder, **options)


def _task_options(spec: str, what: str, query: str) -> dict[str, float]:
    """``tolerance_std=X`` (X > 0), for a task only; anything else is one line."""
    if not query:
        return {}
    key, _, value = query.partition("=")
    if what != "task" or key != "tolerance_std":
        raise ValueError(f"{what} {spec!r}: only a task takes an option, '?tolerance_std=X'")
    try:
        tolerance = float(value)
    except ValueError:
        tolerance = float("nan")
    if not 0 < tolerance < float("inf"):
        raise ValueError(
            f"{what} {spec!r}: tolerance_std must be a finite number > 0, not {value!r}"
        )
    return {"tolerance_std": tolerance}
