from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One real local Ray runtime (2 CPUs) shared by the search tests."""
    import ray

    pythonpath = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
        _node_ip_address="127.0.0.1",
    )
    yield
    ray.shutdown()
