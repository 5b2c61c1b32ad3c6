"""A real multi-node Ray cluster on this machine for the tests: ``ray start --head`` and
``ray start --address=...``, each node its own raylet, its own process group (killable as a
node) and its own custom resource (its name), so a test knows where each trial ran."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


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
        deadline = time.monotonic() + 5  # a test cluster: nothing to save, no long wait
        for proc in self.nodes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
