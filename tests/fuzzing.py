"""Generated bad input at scale (issue: bad input at scale), shared by ``benchmarks/fuzz.py``
(10,000+ cases) and the suite (a few hundred): a search config, a space inside it, a
configuration file and a checkpoint, each mutated at random from a valid one.

Every case must end in success or in one line in the CLI's error dialect (a ``ValueError``
without a newline): never another exception, a hang or a partly written output folder.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

VALID: dict[str, Any] = {
    "name": "fuzz",
    "model": "tests.models:build_convnet",
    "task": "tests.models:convnet_task",
    "calibration": "tests.models:convnet_calibration",
    "task_budget": 8,
    "trials": 2,
    "space": {"defaults": {"w_bits": [4, 8, 32], "a_bits": [8, 32]}},
    "latency": {"runs": 3, "warmup": 1},
    "ray": {"workers": 1},
    "tracking": {"enabled": False},
}
LAYERS = ("conv1", "conv2", "conv1d", "fc")
ODD = [
    None,
    0,
    -1,
    1,
    2,
    3,
    7,
    1000,
    10**12,
    -(10**12),
    0.5,
    -0.5,
    1.5,
    math.nan,
    math.inf,
    "",
    "x",
    "8",
    "conv*",
    "*",
    "tests.models:nope",
    "nope:f",
    "tests.models:raising_builder",
    "tests.models:stringly_task",
    [],
    [1],
    [8, 8],
    ["a"],
    {},
    {"a": 1},
    True,
    False,
]
PLAUSIBLE: dict[tuple[str, str], list[Any]] = {  # values of the right type, often valid
    ("top", "trials"): [1, 3, 50],
    ("top", "task_budget"): [1, 4, 64],
    ("top", "screen_budget"): [0, 2, 7, 64],
    ("top", "sampler"): ["nsga2", "tpe", "random", "gp", "mpq", "cmaes"],
    ("top", "objectives"): [["success", "size_bytes"], ["success"], ["latency_ms"], []],
    ("top", "observer"): ["minmax", "percentile", "mse", "kl"],
    ("top", "example_inputs"): ["tests.models:convnet_calibration", None],
    ("constraints", "max_success_drop"): [0.0, 0.05, 1.0, 1.01],
    ("constraints", "max_size_bytes"): [1, 2000, 10**9],
    ("latency", "backend"): ["onnxruntime", "torch", "torch-eager", "tensorrt"],
    ("sensitivity", "budgets"): [[0.5], [0.25, 0.75], [1.5], []],
    ("sensitivity", "uniform_bits"): [[8], [4, 8], [3], [64]],
    ("space.defaults", "w_bits"): [[2], [4, 8], [2, 3, 4, 5, 6, 8, 16, 32], [9], [32]],
    ("space.defaults", "a_bits"): [[8], [32], [4, 8, 32], [16]],
    ("space.defaults", "granularity"): [["per_tensor"], ["per_channel", "per_group"], ["x"]],
    ("space.defaults", "group_size"): [[8], [16, 32], [5], [0]],
    ("space.defaults", "symmetric"): [[True], [False], [True, False]],
    ("space.defaults", "act_mode"): [["static"], ["dynamic"], ["static", "dynamic"], ["x"]],
}
KEYS = {  # where a value goes: top-level and nested fields, real and made up
    "top": [
        "name",
        "model",
        "task",
        "calibration",
        "task_budget",
        "screen_budget",
        "trials",
        "sampler",
        "seed",
        "objectives",
        "observer",
        "output_dir",
        "storage",
        "bogus",
        "checkpoint",
        "example_inputs",
        "population_size",
        "trial_timeout_s",
        "confirm_budget",
    ],
    "constraints": ["max_success_drop", "max_size_bytes", "max_latency_ms", "bogus"],
    "latency": ["backend", "threads", "runs", "visits", "warmup", "enabled", "autotune"],
    "ray": ["workers", "cpus_per_trial", "address", "max_retries"],
    "qat": ["steps", "lr", "when", "loss", "progressive", "step"],
    "sensitivity": ["enabled", "budgets", "ilp_budgets", "uniform_bits"],
    "space.defaults": [
        "w_bits",
        "a_bits",
        "granularity",
        "group_size",
        "symmetric",
        "act_mode",
        "fused_with",
    ],
}


@dataclass
class Case:
    kind: str  # "config", "config-text", "quant-config", "checkpoint"
    text: str | bytes
    what: str  # the mutation, for the report


def _set(data: dict[str, Any], where: str, key: str, value: Any) -> None:
    node = data
    for part in [] if where == "top" else where.split("."):
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[key] = value


def _list(data: dict[str, Any], key: str) -> list[Any]:
    """``data["space"][key]`` as a list to append to (an earlier mutation may have removed the
    space or set it, or the list, to an odd value)."""
    if not isinstance(data.get("space"), dict):
        data["space"] = {}
    if not isinstance(data["space"].get(key), list):
        data["space"][key] = []
    return data["space"][key]


def config_case(rng: random.Random) -> Case:
    """The valid config with one to three fields set to odd values, removed, or an odd
    override or fused group added to its space."""
    data = yaml.safe_load(yaml.safe_dump(VALID))
    what = []
    for _ in range(rng.randint(1, 3)):
        roll = rng.random()
        if roll < 0.35:  # a value of the right type: the case gets past the config's schema
            where, key = rng.choice(list(PLAUSIBLE))
            value = rng.choice(PLAUSIBLE[(where, key)])
            _set(data, where, key, value)
            what.append(f"{where}.{key}={value!r}")
        elif roll < 0.6:
            where = rng.choice(list(KEYS))
            key = rng.choice(KEYS[where])
            value = rng.choice(ODD)
            _set(data, where, key, value)
            what.append(f"{where}.{key}={value!r}")
        elif roll < 0.75:
            key = rng.choice(["name", "model", "task", "calibration", "space"])
            data.pop(key, None)
            what.append(f"-{key}")
        elif roll < 0.9:
            override = {"match": rng.choice([*LAYERS, "conv*", "*", "nope", "", 3])}
            for field in rng.sample(["w_bits", "a_bits", "group_size", "granularity"], 2):
                plausible = PLAUSIBLE[("space.defaults", field)]
                override[field] = rng.choice(
                    [[rng.randint(-2, 40)], rng.choice(ODD), rng.choice(plausible)]
                )
            _list(data, "overrides").append(override)
            what.append(f"override {override!r}")
        else:
            group = rng.sample([*LAYERS, "conv*", "nope"], rng.randint(1, 3))
            _list(data, "groups").append(group)
            what.append(f"group {group!r}")
    return Case("config", yaml.safe_dump(data), "; ".join(what))


def config_text_case(rng: random.Random) -> Case:
    """The valid config's YAML text, cut, with a tab, a stray character or a Python tag."""
    text = yaml.safe_dump(VALID)
    roll = rng.random()
    if roll < 0.3:
        cut = rng.randint(0, len(text))
        return Case("config-text", text[:cut], f"cut at {cut}")
    if roll < 0.5:
        return Case("config-text", "!!python/object/apply:os.system ['true']\n", "python tag")
    if roll < 0.7:
        i = rng.randint(0, len(text))
        return Case(
            "config-text",
            text[:i] + rng.choice(["\t", ":", "[", "{", "- "]) + text[i:],
            "stray character",
        )
    return Case("config-text", rng.choice(["", "[]", "42", "null", "- a\n- b\n"]), "not a mapping")


def quant_config_case(rng: random.Random) -> Case:
    """A configuration file for the ConvNet with odd layers and choices."""
    layers: dict[str, Any] = {}
    for name in rng.sample([*LAYERS, "nope"], rng.randint(0, 5)):
        choice: dict[str, Any] = {"w_bits": rng.choice([2, 3, 4, 8, 32, 1, 9, "x", None])}
        if rng.random() < 0.5:
            choice["a_bits"] = rng.choice([8, 16, 32, 4, None])
        if rng.random() < 0.3:
            choice["granularity"] = rng.choice(["per_group", "per_tensor", "odd"])
            choice["group_size"] = rng.choice([2, 3, 16, 27, 0, None])
        layers[name] = choice
    data: Any = {"layers": layers} if rng.random() < 0.9 else rng.choice([[], "x", {"l": 1}])
    return Case("quant-config", yaml.safe_dump(data), f"{data!r}"[:200])


def checkpoint_case(rng: random.Random) -> Case:
    """A checkpoint file: random bytes, a pickled object, tensors of the wrong shapes or
    names, or a valid state dict."""
    from tests.models import build_convnet

    state = build_convnet().state_dict()
    roll = rng.random()
    buf = io.BytesIO()
    if roll < 0.2:
        return Case(
            "checkpoint",
            bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))),
            "random bytes",
        )
    if roll < 0.35:
        torch.save({"obj": Path("x")}, buf)  # a pickled object weights_only refuses
        what = "pickled object"
    elif roll < 0.55:
        key = rng.choice(list(state))
        state[key] = torch.zeros(3, 3)
        torch.save(state, buf)
        what = f"wrong shape for {key}"
    elif roll < 0.7:
        state.pop(rng.choice(list(state)))
        torch.save(state, buf)
        what = "missing tensor"
    elif roll < 0.8:
        torch.save([1, 2, 3], buf)
        what = "not a mapping"
    else:
        torch.save(state, buf)
        what = "valid"
    return Case("checkpoint", buf.getvalue(), what)


GENERATORS = (config_case, config_text_case, quant_config_case, checkpoint_case)


def run_case(case: Case, folder: Path) -> str:
    """``ok`` or ``one line``; raises AssertionError for anything else (another exception, a
    message of several lines, a partly written output folder)."""
    from mpq.evaluators.model import build_model
    from mpq.search.runner import preflight
    from mpq.search.session import build_config, check_output_dir
    from mpq.spaces.discover import discover_layers
    from mpq.spaces.io import load_config

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "out"
    path = folder / ("case.pt" if case.kind == "checkpoint" else "case.yaml")
    path.write_bytes(case.text if isinstance(case.text, bytes) else case.text.encode())
    try:
        if case.kind.startswith("config"):
            cfg = build_config(path, output_dir=str(out))
            preflight(cfg, str(path))
            check_output_dir(cfg.output_dir)
        elif case.kind == "quant-config":
            config = load_config(path)
            config.check(discover_layers(build_model("tests.models:build_convnet")), str(path))
        else:
            build_model("tests.models:build_convnet", path)
    except ValueError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"{case.what}: not one line: {message!r}"
        assert not out.exists(), f"{case.what}: an output folder after a refusal"
        return "one line"
    return "ok"
