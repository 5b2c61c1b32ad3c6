"""The MLflow UI, served by a real ``mlflow server`` on 127.0.0.1, opened in headless Chromium:
what a person needs to see must be on the page: the runs table with every trial and its
objectives, the study's run, the Pareto plot rendered in the artifact view. Screenshots go to
test-output/ (mlflow_ui.png, mlflow_ui_study.png, mlflow_ui_pareto.png)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from mpq.search.runner import Runner
from mpq.search.tracking import Tracker
from tests.mlflow_server import MlflowServer
from tests.search.helpers import conv_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
OUT = Path(__file__).resolve().parents[1] / "test-output"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=20000",
    "--window-size=1400,900",
]

pytestmark = pytest.mark.slow


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_mlflow_ui_shows_the_study(ray_local: None, tmp_path: Path) -> None:
    server = MlflowServer(tmp_path / "mlflow").start()
    try:
        cfg = conv_config(
            tmp_path, name="ui-study", trials=4, tracking={"enabled": True, "uri": server.uri}
        )
        tracker = Tracker(cfg)
        runner = Runner(cfg, on_trial=tracker.on_trial)
        runner.prepare()
        tracker.start(runner.study)
        tracker.finish(runner.run().study)
        runs_url = f"{server.uri}/#/experiments/{tracker.experiment_id}/runs"
        study_url = f"{runs_url}/{tracker.parent_id}"
        plot_url = f"{study_url}/artifacts/pareto_front.png"
        profile = tmp_path / "chrome-profile"

        def dom(url: str) -> str:
            args = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", url]
            return subprocess.run(args, capture_output=True, text=True, timeout=120).stdout

        table = dom(runs_url)  # the experiment opens on its runs table (model development)
        assert "ui-study" in table
        # every trial is a row of its own, in view (not folded under the study's run), with
        # the objectives as columns
        assert all(f"trial-{i}" in table for i in range(4)), "trial runs not in the table"
        trial = dom(f"{runs_url}/{tracker.runs[0]}")  # a trial's run: its objectives
        assert all(m in trial for m in ("success", "size_bytes", "latency_ms", "speedup"))
        page = dom(study_url)  # the study's run: the float reference and the hypervolume
        assert "float.success" in page and "hypervolume" in page
        viewer = dom(plot_url)  # the Pareto plot renders as an image in the artifact view
        import re

        srcs = re.findall(r'<img[^>]+src="([^"]+)"', viewer)
        # the viewer fetches the artifact and shows it as an image (a blob: URL of its bytes)
        assert "pareto_front.png" in viewer and any(s.startswith("blob:") for s in srcs), srcs
        OUT.mkdir(exist_ok=True)
        for name, url in (
            ("mlflow_ui.png", runs_url),
            ("mlflow_ui_study.png", study_url),
            ("mlflow_ui_pareto.png", plot_url),
        ):
            shot = OUT / name
            subprocess.run(
                [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={shot}", url],
                capture_output=True,
                timeout=120,
            )
            assert shot.exists() and shot.stat().st_size > 10_000
    finally:
        server.stop()
