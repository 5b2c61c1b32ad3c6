"""Safe by default: servers mpq starts bind 127.0.0.1; checkpoints load with weights_only=True;
YAML loads with safe_load; exports are plain data (those three are pinned in their own tests:
tests/evaluators/test_model.py, tests/spaces/test_io.py, tests/search/test_export.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.mlflow_server import free_port

ROOT = Path(__file__).resolve().parents[1]


def _listening_hosts(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp writes them) listening on ``port``."""
    hosts = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, port_hex = local.rsplit(":", 1)
            if int(port_hex, 16) == port and state == "0A":  # 0A = LISTEN
                hosts.add(addr)
    return hosts


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux /proc/net/tcp")
def test_mpq_ui_binds_loopback_only_and_stops_its_server_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "search.yaml"
    config.write_text(
        f"name: ui\nmodel: m:f\ntask: m:t\ncalibration: m:c\noutput_dir: {tmp_path}\n"
    )
    port = free_port()
    cmd = [sys.executable, "-m", "mpq.cli", "ui", str(config), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("mpq ui did not answer on 127.0.0.1")
        assert _listening_hosts(port) == {"0100007F"}  # 127.0.0.1, not 0.0.0.0 or ::
        proc.send_signal(signal.SIGTERM)  # to mpq alone, as a service manager would
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 10
        while _listening_hosts(port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _listening_hosts(port), "mpq ui left its server listening after SIGTERM"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the test's group
        proc.wait(timeout=30)
