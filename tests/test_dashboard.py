"""optuna-dashboard on a study's own storage URL: it opens the study with mpq's attributes,
objectives named (``optuna-dashboard sqlite:///<output_dir>/study.db``, README)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig
from tests.mlflow_server import free_port
from tests.models import build_convnet
from tests.search.helpers import conv_config, measured_study


@pytest.mark.slow
def test_optuna_dashboard_opens_the_study(tmp_path: Path) -> None:
    cfg = conv_config(tmp_path)
    layers = discover_layers(build_convnet())
    measured_study(cfg, [QuantConfig.uniform(layers, LayerChoice(w_bits=4, a_bits=8))])
    from mpq.search.study import open_study

    open_study(cfg, resume=True)  # as a resumed search leaves it
    port = free_port()
    script = Path(sys.executable).with_name("optuna-dashboard")  # its console script
    cmd = [str(script), cfg.storage_url(), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline, body = time.monotonic() + 60, None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/studies", timeout=2
                ) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.5)
        assert body is not None, "optuna-dashboard did not answer"
        (summary,) = body["study_summaries"]
        url = f"http://127.0.0.1:{port}/api/studies/{summary['study_id']}"
        with urllib.request.urlopen(url, timeout=10) as r:
            detail = json.loads(r.read())
        assert detail["objective_names"] == ["success", "size_bytes", "latency_ms"]
        assert len(detail["trials"]) == 1 and detail["trials"][0]["state"] == "Complete"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
