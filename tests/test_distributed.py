"""A distributed search job on real services, and their faults.

All real, on this machine: a PostgreSQL server (the study database, and the MLflow server's
backend store), an MLflow tracking server, a Ray cluster of a head and two worker nodes with
custom resources, and ``mpq search --ray-address ... --tracking-uri ...`` processes started as
users start them (the database password in the config's ``storage`` URL). After each job and
each fault: every finished trial exactly once in PostgreSQL and in MLflow, none left RUNNING,
MLflow's front (``on_front`` tags) equal to a recomputation from the database, and the password
nowhere in the output, MLflow or the output folder. Each fault test prints its recovery figure
(``pytest -s``): the figures of docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from tests.mlflow_server import MlflowServer
from tests.postgres_server import PostgresServer, binaries
from tests.ray_cluster import Cluster
from tests.search.helpers import conv_config

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(binaries() is None, reason="no PostgreSQL (apt-get install postgresql)"),
]


@pytest.fixture(scope="module")
def studies(pg: PostgresServer) -> str:
    """The study database's URL (with the password: what a user's config holds)."""
    return pg.create_database("mpq_studies")


@pytest.fixture(scope="module")
def mlflow(pg: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    backend = pg.create_database("mlflow")
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), backend_uri=backend)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start_head()
        c.add_node("node_a")
        c.add_node("node_b")
        yield c
    finally:
        c.stop()


class Job:
    """One ``mpq search`` on the cluster, the PostgreSQL study and the MLflow server."""

    def __init__(
        self, tmp_path: Path, cluster: Cluster, studies: str, mlflow: MlflowServer, name: str,
        **changes: object,
    ) -> None:  # fmt: skip
        self.name, self.studies, self.mlflow, self.cluster = name, studies, mlflow, cluster
        self.out_dir = tmp_path / "out"
        changes = {"trials": 8, "sensitivity": {"enabled": False}, **changes}
        changes["tracking"] = {"enabled": True}
        changes["ray"] = {"workers": 3, **changes.get("ray", {})}  # type: ignore[dict-item]
        cfg = conv_config(
            tmp_path, name=name, task="tests.models:paced_task", storage=studies, **changes
        )
        self.config = tmp_path / "search.yaml"
        self.config.write_text(yaml.safe_dump(cfg.model_dump(mode="json", exclude_none=True)))
        self.outputs: list[str] = []

    def start(self, *extra: str) -> subprocess.Popen[str]:
        env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # as for a user
        env |= {"PYTHONPATH": str(ROOT), "COLUMNS": "200"}
        env |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        cmd = [sys.executable, "-m", "mpq.cli", "search", str(self.config), "--resume"]
        cmd += ["--ray-address", self.cluster.address, "--tracking-uri", self.mlflow.uri]
        return subprocess.Popen(
            [*cmd, *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip

    def finish(self, proc: subprocess.Popen[str], ok: bool = True) -> str:
        out, _ = proc.communicate(timeout=400)
        self.outputs.append(out)
        if ok:
            assert proc.returncode == 0, out[-4000:]
        return out

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.studies)

    def wait(self, done: Callable[[list[FrozenTrial]], bool], timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if done(self.study().trials):
                    return
            except KeyError:  # the study is not created yet
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{self.name}: not reached in {timeout_s}s")

    def wait_complete(self, n: int) -> None:
        self.wait(lambda ts: sum(t.state == TrialState.COMPLETE for t in ts) >= n)

    def check(self) -> optuna.Study:
        """Every finished trial once in PostgreSQL and in MLflow, none RUNNING, the same
        front in both, and the password nowhere."""
        study = self.study()
        assert not [t.number for t in study.trials if t.state == TrialState.RUNNING]
        finished = sorted(t.number for t in study.trials if t.state.is_finished())
        assert [t.number for t in study.trials] == list(range(len(study.trials)))
        for t in study.trials:
            if t.state == TrialState.FAIL:
                assert t.user_attrs.get("fail_reason"), t.number
        client = MlflowClient(self.mlflow.uri)
        exp = client.get_experiment_by_name(self.name)
        assert exp is not None
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        trial_runs = [r for r in runs if r.data.tags.get("mpq_kind") == "trial"]
        assert sorted(int(r.data.tags["mpq_trial"]) for r in trial_runs) == finished
        front = [r for r in trial_runs if r.data.tags.get("on_front") == "true"]
        on_front = {int(r.data.tags["mpq_trial"]) for r in front}
        assert on_front == recomputed_front(study)
        password = str(self.studies.split(":")[2].split("@")[0])
        assert len(password) >= 8
        for text in self.outputs:
            assert password not in text
        for r in runs:
            assert password not in repr(r.data.params) + repr(r.data.tags)
        for path in self.out_dir.rglob("*"):
            if path.is_file() and path.suffix in {".md", ".json", ".yaml", ".csv", ".txt", ".log"}:
                assert password not in path.read_text(errors="replace"), path
        return study


def recomputed_front(study: optuna.Study) -> set[int]:
    """The feasible non-dominated complete trials, recomputed from the stored values and
    constraints (not through Optuna's or mpq's Pareto code)."""
    signs = [1 if d == StudyDirection.MINIMIZE else -1 for d in study.directions]
    rows = {}
    for t in study.trials:
        if t.state == TrialState.COMPLETE and all(
            c <= 0 for c in t.system_attrs.get("constraints", [])
        ):
            rows[t.number] = [s * v for s, v in zip(signs, t.values, strict=True)]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x <= y for x, y in zip(a, b, strict=True)) and a != b

    return {n for n, a in rows.items() if not any(dominates(b, a) for b in rows.values())}


def completed_after(study: optuna.Study, wall: float) -> list[float]:
    """Seconds after ``wall`` (time.time()) at which trials completed, in order."""
    times = [
        t.datetime_complete.timestamp() - wall
        for t in study.trials
        if t.state == TrialState.COMPLETE and t.datetime_complete
    ]
    return sorted(x for x in times if x > 0)


def test_two_users_search_one_postgres_study_on_both_nodes(
    tmp_path: Path, cluster: Cluster, studies: str, mlflow: MlflowServer
) -> None:
    job = Job(tmp_path, cluster, studies, mlflow, "dist_two", trials=8)
    first, second = job.start(), job.start()  # two shells at once: they race to create it
    job.finish(first)
    job.finish(second)
    study = job.check()
    finished = [t for t in study.trials if t.state.is_finished()]
    assert 8 <= len(finished) <= 8 + 2 * 3  # each stops at the budget
    nodes = cluster.node_ids()
    used = {t.user_attrs["node"] for t in finished if t.state == TrialState.COMPLETE}
    assert {nodes["node_a"], nodes["node_b"]} <= used


def test_custom_resource_pins_trials_to_its_node(
    tmp_path: Path, cluster: Cluster, studies: str, mlflow: MlflowServer
) -> None:
    job = Job(
        tmp_path, cluster, studies, mlflow, "dist_pinned", trials=3,
        ray={"workers": 2, "resources_per_trial": {"node_b": 1}},
    )  # fmt: skip
    job.finish(job.start())
    study = job.check()
    nodes = {t.user_attrs["node"] for t in study.trials if t.state == TrialState.COMPLETE}
    assert nodes == {cluster.node_ids()["node_b"]}


def test_mlflow_server_stopped_and_restarted(
    tmp_path: Path, cluster: Cluster, studies: str, mlflow: MlflowServer
) -> None:
    job = Job(tmp_path, cluster, studies, mlflow, "dist_mlflow", trials=10)
    proc = job.start()
    job.wait_complete(2)
    mlflow.stop()
    down_at = time.time()
    job.wait(lambda ts: sum(t.state.is_finished() for t in ts) >= 4)  # the search goes on
    mlflow.start()
    down_s = time.time() - down_at
    out = job.finish(proc)
    assert out.count("tracking unavailable") == 1, out[-3000:]  # said once
    during = "tracking back" in out  # back before the search ended: it back-filled itself
    if not during:  # else, as the message says, `mpq sync` does (from anywhere)
        uri = mlflow.uri
        sync = subprocess.run(
            [sys.executable, "-m", "mpq.cli", "sync", str(job.config), "--tracking-uri", uri],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert sync.returncode == 0, sync.stdout + sync.stderr
        job.outputs.append(sync.stdout + sync.stderr)
    job.check()  # every trial in MLflow once
    by = "the search itself" if during else "mpq sync"
    print(f"\nFIGURE mlflow restart: down {down_s:.1f} s, every trial back-filled by {by}")


def test_postgres_restarted_mid_search(
    tmp_path: Path, cluster: Cluster, studies: str, mlflow: MlflowServer, pg: PostgresServer
) -> None:
    job = Job(tmp_path, cluster, studies, mlflow, "dist_pg", trials=8)
    proc = job.start()
    job.wait_complete(3)
    pg.stop()
    down_at = time.time()
    time.sleep(6)
    pg.start()
    back_at = time.time()
    out = job.finish(proc)
    assert out.count("unavailable (") >= 1 and out.count("storage back after") == 1, out[-3000:]
    assert out.count("retrying for up to") == 1  # said once
    study = job.check()
    after = completed_after(study, back_at)
    assert after, "no trial completed after PostgreSQL came back"
    print(
        f"\nFIGURE postgres restart: down {back_at - down_at:.1f} s, first trial completed "
        f"{after[0]:.1f} s after it was back"
    )


def test_driver_killed_and_resumed(
    tmp_path: Path, cluster: Cluster, studies: str, mlflow: MlflowServer
) -> None:
    job = Job(
        tmp_path, cluster, studies, mlflow, "dist_driver", trials=8,
        sensitivity={"enabled": True},  # seeds: one lost to the kill is run again
    )  # fmt: skip
    proc = job.start()
    job.wait_complete(3)
    os.killpg(proc.pid, signal.SIGKILL)
    killed_at = time.time()
    job.finish(proc, ok=False)
    before = {t.number: t.values for t in job.study().trials if t.state == TrialState.COMPLETE}
    resumed_at = time.time()
    job.finish(job.start())
    study = job.check()
    for number, values in before.items():  # every finished trial: still there, same values
        assert study.trials[number].state == TrialState.COMPLETE
        assert study.trials[number].values == values
    assert len([t for t in study.trials if t.state.is_finished()]) >= 8
    for t in study.trials:  # a seed lost to the kill ran again after the resume
        if t.state == TrialState.FAIL and t.user_attrs.get("seed"):
            again = [u for u in study.trials if u.params == t.params and u.number > t.number]
            assert any(u.state == TrialState.COMPLETE for u in again), t.user_attrs
    first = completed_after(study, resumed_at)
    print(
        f"\nFIGURE driver SIGKILL: resumed {resumed_at - killed_at:.1f} s after the kill, "
        f"first new trial completed {first[0]:.1f} s after the resume"
    )


def test_worker_node_killed_mid_trial(
    tmp_path: Path, cluster: Cluster, studies: str, mlflow: MlflowServer
) -> None:
    job = Job(tmp_path, cluster, studies, mlflow, "dist_node", trials=8)
    proc = job.start()
    node_b = cluster.node_ids()["node_b"]
    job.wait(lambda ts: any(t.user_attrs.get("node") == node_b for t in ts))
    cluster.kill("node_b")  # mid-search: it was given its next trial at once
    killed_at = time.time()
    job.finish(proc)
    study = job.check()
    assert len([t for t in study.trials if t.state.is_finished()]) >= 8
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert [t for t in complete if t.user_attrs["node"] != node_b]  # the survivors went on
    lost = [t for t in study.trials if t.state == TrialState.FAIL]
    after = completed_after(study, killed_at)
    print(
        f"\nFIGURE worker node SIGKILL: {len(lost)} trial(s) failed with the reason "
        f"({[t.user_attrs['fail_reason'][:60] for t in lost]}), next trial completed "
        f"{after[0]:.1f} s after the kill"
    )
