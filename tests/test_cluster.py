"""A real multi-node Ray cluster started on this machine with ``ray start --head`` and
``ray start --address=...`` (each node its own raylet and its own custom resource), driven by
``mpq search --ray-address``: trials land on both nodes, a custom resource pins them to the node
that has it, and stopping a node mid-search loses no trial."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from tests.search.helpers import conv_config

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """``ray start --block`` processes, each in its own process group (killable as a node)."""

    def __init__(self, tmp: Path) -> None:
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.tmp = tmp
        # `ray start --head` turns token authentication on; a joining node must be told.
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "PYTHONPATH": str(ROOT)}
        self.nodes: dict[str, subprocess.Popen[bytes]] = {}

    def start_head(self) -> None:
        self._start(
            "head_node",
            "--head",
            f"--port={self.port}",
            f"--ray-client-server-port={_free_port()}",
            "--include-dashboard=false",
        )

    def add_node(self, resource: str) -> None:
        self._start(resource, f"--address={self.address}")

    def _start(self, resource: str, *args: str) -> None:
        log = open(self.tmp / f"{resource}.log", "wb")  # noqa: SIM115  closed with the process
        self.nodes[resource] = subprocess.Popen(
            [
                RAY,
                "start",
                *args,
                "--num-cpus=1",
                f"--resources={json.dumps({resource: 1})}",
                "--node-ip-address=127.0.0.1",
                "--disable-usage-stats",
                "--block",
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_for(resource)

    def node_ids(self) -> dict[str, str]:
        """Custom resource name -> node id, for the nodes alive now."""
        code = (
            f"import json, ray; ray.init(address={self.address!r}, logging_level='ERROR');"
            "print(json.dumps([[n['NodeID'], list(n['Resources'])] for n in ray.nodes()"
            " if n['Alive']]))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            return {}
        rows = json.loads(out.stdout.strip().splitlines()[-1])
        return {r: node for node, resources in rows for r in resources if r in self.nodes}

    def wait_for(self, resource: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.nodes[resource].poll() is not None:
                log = (self.tmp / f"{resource}.log").read_text()[-2000:]
                raise RuntimeError(f"ray start for {resource} exited:\n{log}")
            if resource in self.node_ids():
                return
            time.sleep(1)
        raise TimeoutError(f"node {resource} did not join in {timeout_s}s")

    def kill(self, resource: str) -> None:
        """SIGKILL the node's whole process group: raylet, its workers, all at once."""
        os.killpg(self.nodes[resource].pid, signal.SIGKILL)
        self.nodes[resource].wait()

    def stop(self) -> None:
        for proc in reversed(list(self.nodes.values())):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_head()
        c.add_node("worker_node")
        yield c
    finally:
        c.stop()


def _search(cluster: Cluster, tmp_path: Path, **changes: object) -> optuna.Study:
    """``mpq search --ray-address`` in a fresh process (RAY_AUTH_MODE unset, as for a user)."""
    cfg = conv_config(tmp_path, name="cluster", task="tests.models:paced_task", **changes)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run(
        [sys.executable, "-m", "mpq.cli", "search", str(path), "--ray-address", cluster.address],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return optuna.load_study(study_name="cluster", storage=f"sqlite:///{tmp_path}/out/study.db")


def test_trials_run_on_both_nodes(cluster: Cluster, tmp_path: Path) -> None:
    study = _search(cluster, tmp_path, trials=6, ray={"workers": 2})
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 6
    nodes = cluster.node_ids()
    used = {t.user_attrs["node"] for t in done}
    assert used == {nodes["head_node"], nodes["worker_node"]}


def test_custom_resource_pins_trials_to_its_node(cluster: Cluster, tmp_path: Path) -> None:
    study = _search(
        cluster, tmp_path, trials=4, ray={"workers": 2, "resources_per_trial": {"worker_node": 1}}
    )
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 4
    assert {t.user_attrs["node"] for t in done} == {cluster.node_ids()["worker_node"]}


def test_a_node_stopped_mid_search_loses_no_trial(cluster: Cluster, tmp_path: Path) -> None:
    cluster.add_node("spare_node")
    spare = cluster.node_ids()["spare_node"]
    cfg = conv_config(tmp_path, name="cluster", task="tests.models:paced_task", trials=9)
    cfg_path = tmp_path / "search.yaml"
    data = cfg.model_dump(mode="json", exclude_none=True)
    data["ray"]["workers"] = 3
    cfg_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mpq.cli",
            "search",
            str(cfg_path),
            "--ray-address",
            cluster.address,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"sqlite:///{tmp_path}/out/study.db"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # stop the spare node once it has finished a trial
        try:
            trials = optuna.load_study(study_name="cluster", storage=url).trials
        except Exception:  # noqa: BLE001  the study is not created yet
            trials = []
        if any(t.user_attrs.get("node") == spare for t in trials):
            break
        time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("no trial ran on the spare node")
    cluster.kill("spare_node")
    output, _ = proc.communicate(timeout=400)
    assert proc.returncode == 0, output[-3000:]

    trials = optuna.load_study(study_name="cluster", storage=url).trials
    finished = [t for t in trials if t.state.is_finished()]
    assert len(finished) == 9
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    for t in trials:  # a trial lost with the node is retried elsewhere or failed with the reason
        if t.state == TrialState.FAIL:
            assert t.user_attrs.get("fail_reason"), t.number
    survivors = [t for t in finished if t.state == TrialState.COMPLETE]
    assert [t for t in survivors if t.user_attrs["node"] != spare], (
        "no trial completed on the surviving nodes"
    )
