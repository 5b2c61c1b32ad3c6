from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.postgres_server import PostgresServer, binaries, wait_until_up

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


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """A real PostgreSQL server: ``.ci/run``'s (``MPQ_TEST_POSTGRES_URL``), else one of the
    session's own; skipped only where no PostgreSQL is installed."""
    if PostgresServer.from_env() is None and binaries() is None:
        pytest.skip("no PostgreSQL (apt-get install postgresql)")
    server = PostgresServer.from_env()
    own = server is None
    if server is None:
        server = PostgresServer.fresh()  # under /tmp: pytest's folders are 0700 to postgres
    wait_until_up(server)
    yield server
    if own:
        server.stop()
    elif not server.running():  # a failed restart test must not leave CI's server down
        server.start()
