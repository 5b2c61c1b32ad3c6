"""``mpq agent``: latency timed on a target that runs neither Ray, MLflow nor torch.

In-process: the protocol, the token, what is refused, an agent that is gone. Then for real
(slow): the agent in a virtual environment of its own (numpy and onnxruntime only) on a second
"host" made with a network namespace and a veth pair, a search timing its trials there, and
the agent killed mid-search (those trials fail with the reason, the search goes on).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from mpq.agent import make_server, t975
from mpq.evaluators.agent_client import time_on_agent
from mpq.evaluators.backends import get_backend
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig
from tests.models import ConvNet, example_inputs

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "a-shared-token-of-the-test-0123"


def _models() -> tuple[bytes, bytes, dict[str, np.ndarray]]:
    """The ConvNet's float and W8A8 deployable files (ONNX Runtime), and one step's inputs."""
    model = ConvNet().eval()
    layers = discover_layers(model)
    x = example_inputs(model, batch=1)
    backend = get_backend("onnxruntime")
    keep = QuantConfig.uniform(layers, LayerChoice())
    w8 = QuantConfig.uniform(layers, LayerChoice(w_bits=8, a_bits=8, act_mode="static"))
    ref = backend.lower(model, layers, keep, x, 1, calibration=[x]).artifact
    cand = backend.lower(model, layers, w8, x, 1, calibration=[x]).artifact
    assert ref is not None and cand is not None
    return ref, cand, {"input_0": x[0].numpy()}


@contextlib.contextmanager
def _agent_thread(token: str = TOKEN) -> Iterator[str]:
    server = make_server("127.0.0.1", 0, token)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def test_the_agent_times_the_pair_with_the_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPQ_AGENT_TOKEN", TOKEN)
    ref, cand, inputs = _models()
    with _agent_thread() as url:
        got = time_on_agent(url, ref, cand, inputs, visits=3, runs=5, warmup=1, threads=1)
        aa = time_on_agent(url, ref, ref, inputs, visits=3, runs=5, warmup=1, threads=1)
    assert got["speedup_lo"] <= got["speedup"] <= got["speedup_hi"]
    assert got["latency_ms"] > 0 and got["float_latency_ms"] > 0
    assert "cores" in got["cpu"] and "onnxruntime" in got["versions"]
    assert aa["speedup_lo"] <= 1.0 <= aa["speedup_hi"] or abs(aa["speedup"] - 1) < 0.5


def test_the_agent_refuses_a_wrong_token_anything_but_models_and_bad_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref, cand, inputs = _models()
    with _agent_thread() as url:
        monkeypatch.setenv("MPQ_AGENT_TOKEN", "not-the-token")
        with pytest.raises(ValueError, match=r"refused \(401\): missing or wrong token$"):
            time_on_agent(url, ref, cand, inputs, 2, 3, 0, 1)
        monkeypatch.setenv("MPQ_AGENT_TOKEN", TOKEN)
        with pytest.raises(ValueError, match=r"refused \(400\): candidate is not an ONNX model"):
            time_on_agent(url, ref, b"#!/bin/sh\nrm -rf /\n", inputs, 2, 3, 0, 1)
        with pytest.raises(ValueError, match=r"refused \(400\): visits, runs, warmup or threads"):
            time_on_agent(url, ref, cand, inputs, 1, 3, 0, 1)
    monkeypatch.delenv("MPQ_AGENT_TOKEN")
    with pytest.raises(ValueError, match=r"^latency.agent http://x: set MPQ_AGENT_TOKEN"):
        time_on_agent("http://x", ref, cand, inputs, 2, 3, 0, 1)


def test_an_agent_that_is_gone_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.mlflow_server import free_port

    monkeypatch.setenv("MPQ_AGENT_TOKEN", TOKEN)
    ref, cand, inputs = _models()
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ValueError, match=rf"^latency agent {url} did not answer: "):
        time_on_agent(url, ref, cand, inputs, 2, 3, 0, 1)


def test_student_t_quantiles() -> None:
    from scipy import stats

    for df in (1, 2, 5, 7, 19, 30):
        assert t975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=2e-3)
    assert t975(23) >= stats.t.ppf(0.975, 23)  # the table's lower entry: never too narrow


# -- the agent on a second host, in a virtual environment of its own -----------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@contextlib.contextmanager
def _second_host() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (namespace, its address)."""
    tag = f"mpq{os.getpid() % 10000}"
    ns, host_if, ns_if = f"{tag}ns", f"{tag}a", f"{tag}b"
    try:
        _ip("netns", "add", ns)
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", ns)
        _ip("addr", "add", "10.251.0.1/24", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("netns", "exec", ns, "ip", "addr", "add", "10.251.0.2/24", "dev", ns_if)
        _ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield ns, "10.251.0.2"
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _can_make_namespaces() -> bool:
    if shutil.which("ip") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["ip", "netns", "add", "mpqprobe"], capture_output=True)
    subprocess.run(["ip", "netns", "del", "mpqprobe"], capture_output=True)
    return probe.returncode == 0


@pytest.fixture(scope="module")
def agent_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtual environment with only the agent's dependencies: numpy and onnxruntime."""
    if not _can_make_namespaces():
        pytest.skip("needs root and ip netns (a second host on this machine)")
    venv = tmp_path_factory.mktemp("agent-venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "numpy", "onnxruntime"]
    installed = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    if installed.returncode != 0:
        pytest.skip(f"no package registry for the agent's venv: {installed.stderr[-300:]}")
    return venv


@pytest.mark.slow
def test_a_search_timed_by_an_agent_on_a_second_host_that_dies_mid_search(
    agent_venv: Path, ray_local: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optuna.trial import TrialState

    from mpq.search.runner import Runner
    from tests.search.helpers import conv_config

    python = str(agent_venv / "bin" / "python")
    no_torch = subprocess.run([python, "-c", "import torch"], capture_output=True)
    assert no_torch.returncode != 0  # the agent's environment has no torch, no mpq stack
    monkeypatch.setenv("MPQ_AGENT_TOKEN", TOKEN)
    with _second_host() as (ns, address):
        env = {"MPQ_AGENT_TOKEN": TOKEN, "PYTHONPATH": str(ROOT), "PATH": os.environ["PATH"]}
        log = tmp_path / "agent.log"
        with open(log, "w") as out:  # a file: the agent's log never fills a pipe
            command = ["ip", "netns", "exec", ns, python, "-m", "mpq.agent"]
            agent = subprocess.Popen(
                [*command, "--host", address, "--port", "8787"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 60
            while "mpq agent on" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert f"mpq agent on http://{address}:8787" in log.read_text(), log.read_text()
            url = f"http://{address}:8787"
            ref, cand, inputs = _models()
            got = time_on_agent(url, ref, cand, inputs, visits=2, runs=5, warmup=1, threads=1)
            assert got["speedup"] > 0 and "cores" in got["cpu"]
            cfg = conv_config(
                tmp_path,
                trials=6,
                latency={"agent": url, "runs": 5, "visits": 2, "autotune": False},
            )

            def kill_after_the_first(study: object, trial: object) -> None:
                if getattr(trial, "state", None) == TrialState.COMPLETE:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(agent.pid, signal.SIGKILL)  # the target dies mid-search

            runner = Runner(cfg, on_trial=kill_after_the_first)
            runner.prepare()  # the float reference, timed on the agent (A/A)
            assert runner.float_reference["latency_info"]["target"] == f"mpq agent {url}"
            study = runner.run().study
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(timeout=30)
    states = [t.state for t in study.trials]
    assert len([s for s in states if s.is_finished()]) == 6  # the search went on
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert failed and all(
        f"latency agent {url} did not answer" in t.user_attrs["fail_reason"] for t in failed
    )
    timed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    for t in timed:
        assert t.user_attrs["latency_info"]["target"] == f"mpq agent {url}"
