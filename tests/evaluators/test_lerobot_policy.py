"""The LeRobot adapter's parts that need no lerobot: the policy folder, lerobot's normalization,
history, the offline task's measure, and what the exporter does to a wrapped policy. The
lerobot-dependent path (building the policy class, reading a dataset) is run by
``examples/lerobot/make_policy.py`` in a LeRobot environment (README)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from mpq.evaluators import lerobot_policy as lr
from mpq.evaluators.callables import load_callable

CONFIG = {
    "type": "act",
    "n_obs_steps": 1,
    "input_features": {
        "observation.state": {"type": "STATE", "shape": [4]},
        "observation.image": {"type": "VISUAL", "shape": [3, 8, 8]},
    },
    "output_features": {"action": {"type": "ACTION", "shape": [2]}},
    "normalization_mapping": {"VISUAL": "MEAN_STD", "STATE": "MIN_MAX", "ACTION": "MEAN_STD"},
}


def _folder(tmp_path: Path, config: dict = CONFIG, weights: bool = True) -> Path:
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    if weights:
        save_file({"w": torch.zeros(1)}, str(folder / "model.safetensors"))
    return folder


def test_a_policy_folder_is_read_from_its_config(tmp_path: Path) -> None:
    info = lr.PolicyInfo.read(_folder(tmp_path))
    assert info.type == "act" and info.n_obs_steps == 1
    assert info.inputs["observation.image"] == ("VISUAL", (3, 8, 8))
    assert info.norm["STATE"] == "MIN_MAX"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"weights": False}, r"no model.safetensors \(weights load from safetensors only"),
        ({"config": {**CONFIG, "type": "pi0"}}, "policy type 'pi0' is not supported"),
    ],
)
def test_a_bad_policy_folder_is_one_line(tmp_path: Path, change: dict, message: str) -> None:
    folder = _folder(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        load_callable(f"lerobot:{folder}", "model")
    with pytest.raises(ValueError, match=r"lerobot:/nowhere'\: no such folder"):
        load_callable("lerobot:/nowhere", "model")


@pytest.mark.skipif(importlib.util.find_spec("lerobot") is not None, reason="lerobot installed")
def test_without_lerobot_a_policy_says_what_to_install(tmp_path: Path) -> None:
    from mpq.evaluators.model import build_model

    with pytest.raises(ValueError, match=r"needs lerobot installed here .*pip install lerobot"):
        build_model(f"lerobot:{_folder(tmp_path)}")


def test_a_dataset_spec_needs_a_lerobot_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"calibration 'lerobot:.*': not a LeRobotDataset folder"):
        load_callable(f"lerobot:{tmp_path}", "calibration")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text("{}")
    with pytest.raises(ValueError, match=r"a lerobot dataset serves \['calibration'"):
        load_callable(f"lerobot:{tmp_path}", "confirm_task")
    assert callable(load_callable(f"lerobot:{tmp_path}", "task"))


@pytest.mark.parametrize(
    ("query", "what", "message"),
    [
        ("tolerance_std=0", "task", "tolerance_std must be a finite number > 0, not '0'"),
        ("tolerance_std=wide", "task", "must be a finite number > 0, not 'wide'"),
        ("tolerance_std=nan", "task", "must be a finite number > 0, not 'nan'"),
        ("tolerance_std=inf", "task", "must be a finite number > 0, not 'inf'"),
        ("tol=0.2", "task", r"only a task takes an option, '\?tolerance_std=X'"),
        ("tolerance_std=0.2", "calibration", r"only a task takes an option"),
    ],
)
def test_a_bad_task_option_is_one_line(
    tmp_path: Path, query: str, what: str, message: str
) -> None:
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text("{}")
    with pytest.raises(ValueError, match=message):
        load_callable(f"lerobot:{tmp_path}?{query}", what)


def test_the_task_tolerance_is_an_option_of_the_dataset_spec(tmp_path: Path) -> None:
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "info.json").write_text("{}")
    task = load_callable(f"lerobot:{tmp_path}?tolerance_std=0.25", "task")
    assert task.keywords == {"tolerance_std": 0.25}
    assert load_callable(f"lerobot:{tmp_path}", "task").keywords == {}


def _stats() -> dict[str, torch.Tensor]:
    return {
        "observation.state.min": torch.tensor([-1.0, 0.0, 2.0, 2.0]),
        "observation.state.max": torch.tensor([1.0, 4.0, 2.0, 6.0]),
        "observation.image.mean": torch.full((3, 1, 1), 0.5),
        "observation.image.std": torch.full((3, 1, 1), 0.25),
        "action.mean": torch.tensor([1.0, -1.0]),
        "action.std": torch.tensor([2.0, 0.5]),
        "action.q01": torch.tensor([-3.0, -1.0]),
        "action.q99": torch.tensor([5.0, 1.0]),
    }


def test_normalization_follows_lerobots_formulas() -> None:
    stats = _stats()
    x = torch.tensor([[0.0, 1.0, 2.0, 4.0]])
    got = lr.Normalize("MIN_MAX", stats, "observation.state", False)(x)
    d = torch.tensor([2.0, 4.0, 1e-8, 4.0])  # max - min, eps where 0 (as lerobot does)
    torch.testing.assert_close(got, 2 * (x - stats["observation.state.min"]) / d - 1)
    img = torch.rand(1, 3, 8, 8)
    got = lr.Normalize("MEAN_STD", stats, "observation.image", False)(img)
    torch.testing.assert_close(got, (img - 0.5) / (0.25 + 1e-8))
    a = torch.randn(1, 8, 2)
    for mode in ("MEAN_STD", "QUANTILES"):  # the postprocessor's inverse undoes the forward
        fwd = lr.Normalize(mode, stats, "action", False)
        inv = lr.Normalize(mode, stats, "action", True)
        torch.testing.assert_close(inv(fwd(a)), a, rtol=1e-5, atol=1e-5)
    assert torch.equal(lr.Normalize("IDENTITY", stats, "action", False)(a), a)
    assert torch.equal(lr.Normalize("MEAN_STD", {}, "action", False)(a), a)  # none: as lerobot
    with pytest.raises(
        ValueError,
        match=r"action is normalized MEAN_STD but its processor holds "
        r"no action.std",
    ):
        lr.Normalize("MEAN_STD", {"action.mean": torch.zeros(2)}, "action", False)


def test_saved_processor_statistics_are_read_from_safetensors(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    save_file(
        _stats(), str(folder / "policy_preprocessor_step_3_normalizer_processor.safetensors")
    )
    post = {"action.mean": torch.ones(2)}
    save_file(post, str(folder / "policy_postprocessor_step_0_unnormalizer_processor.safetensors"))
    assert set(lr.normalization_stats(folder, "preprocessor")) == set(_stats())
    assert set(lr.normalization_stats(folder, "postprocessor")) == {"action.mean"}


class _Act(nn.Module):
    """Stands in for lerobot's ACT network (``policy.model``): a batch dict of normalized
    observations, images as a list, -> (action chunk, extra)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 + 4, 8 * 2)

    def forward(self, batch: dict) -> tuple[torch.Tensor, None]:
        img = self.conv(batch["observation.images"][0]).mean((2, 3))
        x = torch.cat([img, batch["observation.state"]], -1)
        return self.head(x).view(-1, 8, 2), None


def _wrapped(network: nn.Module) -> tuple[lr.LeRobotPolicy, nn.Module]:
    """``network`` as an ACT policy's ``model``, wrapped as mpq wraps a LeRobot policy."""
    info = lr.PolicyInfo(
        "act",
        {k: (f["type"], tuple(f["shape"])) for k, f in CONFIG["input_features"].items()},
        {"action": ("ACTION", (2,))},
        CONFIG["normalization_mapping"],
        1,
    )
    policy = nn.Module()
    policy.model = network
    return lr.LeRobotPolicy(policy, info, _stats(), _stats(), "/p").eval(), policy


def test_the_wrapped_policy_maps_raw_observations_to_raw_actions() -> None:
    wrapped, policy = _wrapped(_Act())
    obs = {"observation.state": torch.randn(2, 4), "observation.image": torch.rand(2, 3, 8, 8)}
    with torch.no_grad():
        got = wrapped(**obs)
        norm_img = (obs["observation.image"] - 0.5) / (0.25 + 1e-8)
        d = torch.tensor([2.0, 4.0, 1e-8, 4.0])
        norm_state = 2 * (obs["observation.state"] - _stats()["observation.state.min"]) / d - 1
        chunk = policy.model({"observation.state": norm_state, "observation.images": [norm_img]})
        want = chunk[0] * torch.tensor([2.0, 0.5]) + torch.tensor([1.0, -1.0])
    torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match=r"inputs \['observation.image'\] missing"):
        wrapped(**{"observation.state": obs["observation.state"]})


def test_a_frame_is_repeated_over_the_policys_history() -> None:
    info = lr.PolicyInfo("diffusion", {"s": ("STATE", (4,))}, {}, {}, 2)
    x = torch.randn(3, 4)
    out = lr.with_history({"s": x}, info)["s"]
    assert out.shape == (3, 2, 4) and torch.equal(out[:, 0], x) and torch.equal(out[:, 1], x)
    stacked = torch.randn(3, 2, 4)
    assert lr.with_history({"s": stacked}, info)["s"] is stacked


def test_episodes_split_and_the_tolerance_is_per_dimension_in_std() -> None:
    assert lr.split_episodes(12) == (list(range(6)), list(range(6, 12)))
    assert lr.split_episodes(2) == ([0], [1])
    assert lr.spread(10, 4) == [0, 3, 6, 9] and lr.spread(3, 10) == [0, 1, 2]
    with pytest.raises(ValueError, match="at least 2 episodes"):
        lr.split_episodes(1)
    ref = torch.zeros(3, 8, 2)
    actions = ref.clone()
    actions[1, 5, 0] = 0.21  # 0.105 std of 2.0: out
    actions[2, :, 1] = 0.049  # 0.098 std of 0.5: in
    ok = lr.within_tolerance(actions, ref, torch.tensor([2.0, 0.5]), 0.1)
    assert ok.tolist() == [True, False, True]


class FrozenBatchNorm2d(nn.Module):
    """torchvision's (which does not import beside the CPU torch): fixed statistics."""

    def __init__(self, n: int) -> None:
        super().__init__()
        for name, value in (("weight", 1.5), ("bias", 0.2), ("running_mean", 0.1)):
            self.register_buffer(name, torch.full((n,), value) + 0.1 * torch.randn(n))
        self.register_buffer("running_var", torch.rand(n) + 0.5)
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)


class _Backbone(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = FrozenBatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class _ActWithBackbone(_Act):
    """ACT's layout: a vision ``backbone`` the network calls as a whole."""

    def __init__(self) -> None:
        super().__init__()
        del self.conv
        self.backbone = _Backbone()

    def forward(self, batch: dict) -> tuple[torch.Tensor, None]:
        img = self.backbone(batch["observation.images"][0]).mean((2, 3))
        return self.head(torch.cat([img, batch["observation.state"]], -1)).view(-1, 8, 2), None


def test_a_wrapped_policy_is_folded_found_in_the_export_and_lowered_as_simulated() -> None:
    """The wrapper calls ``policy.model`` directly, so the exporter's scopes leave ``policy``
    out; its backbone's frozen BatchNorm folds (the adapter folds each backbone: the wrapper
    itself does not trace, and folding inside what does not trace is refused)."""
    import numpy as np

    from mpq.evaluators.apply import apply_config
    from mpq.evaluators.backends import get_backend
    from mpq.evaluators.model import fold_batchnorm
    from mpq.spaces.discover import discover_layers
    from mpq.spaces.space import LayerChoice, QuantConfig

    torch.manual_seed(0)
    model, policy = _wrapped(_ActWithBackbone())
    obs = {"observation.state": torch.randn(1, 4), "observation.image": torch.rand(1, 3, 8, 8)}
    with torch.no_grad():
        before = model(**obs)
        fold_batchnorm(model)  # the policy does not trace: nothing folded, nothing changed
        assert isinstance(policy.model.backbone.bn, FrozenBatchNorm2d)
        for backbone in lr.backbones(policy, model.info):
            fold_batchnorm(backbone)
        after = model(**obs)
    assert isinstance(policy.model.backbone.bn, nn.Identity)  # folded into its convolution
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    layers = discover_layers(model)
    config = QuantConfig(
        layers={
            la.name: LayerChoice(w_bits=8, a_bits=8, act_mode="static")
            if la.kind == "conv2d"
            else LayerChoice(w_bits=4, a_bits=8, granularity="per_group", group_size=8)
            for la in layers
        }
    )
    calibration = [
        {"observation.state": torch.randn(8, 4), "observation.image": torch.rand(8, 3, 8, 8)}
    ]
    lowered = get_backend("onnxruntime").lower(model, layers, config, obs, 1, calibration)
    assert set(lowered.kernels) == {la.name for la in layers}
    assert all(k.startswith(("MatMulNBits", "QLinearConv")) for k in lowered.kernels.values()), (
        lowered.fallbacks
    )  # none "no MatMul node in the export"
    simulated = apply_config(model, lowered.ran_config, calibration, layers=layers)
    with torch.no_grad():
        want = simulated(**obs).numpy()
    feeds = {i.name: obs[i.name].numpy() for i in lowered.module.get_inputs()}
    got = lowered.module.run(None, feeds)[0]
    assert float(np.abs(got - want).max()) <= 2e-3 * float(np.abs(want).max())
    assert lowered.stored_bytes == lowered.predicted_bytes
