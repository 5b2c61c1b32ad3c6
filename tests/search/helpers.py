"""Search configs for the tests: the ConvNet with a real task, real storage, tiny budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpq.search.config import SearchConfig


def conv_config(tmp_path: Path, **overrides: Any) -> SearchConfig:
    data: dict[str, Any] = {
        "name": "conv",
        "model": "tests.models:build_convnet",
        "task": "tests.models:convnet_task",
        "calibration": "tests.models:convnet_calibration",
        "task_budget": 32,
        "trials": 8,
        "output_dir": str(tmp_path / "out"),
        "space": {"defaults": {"w_bits": [2, 3, 4, 8, 32]}},
        "latency": {"runs": 5, "warmup": 1},
        "ray": {"workers": 2},
        "tracking": {"enabled": False},
        "sensitivity": {"budgets": [0.5]},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return SearchConfig.model_validate(data)
