"""The latency protocol (visit pairs on fresh runners, random order, an interval) and the
node's exclusive timing slot."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mpq.evaluators import timing_slot
from mpq.evaluators.latency import log_ratio_interval, paired_speedup


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_every_visit_gets_a_fresh_runner_in_random_order() -> None:
    made: list[str] = []

    def factory(name: str, cost_s: float):  # type: ignore[no-untyped-def]
        def new() -> object:
            made.append(name)
            return lambda: _spin(cost_s)

        return new

    result = paired_speedup(factory("float", 4e-4), factory("cand", 1e-4), visits=8, runs=5)
    assert made.count("float") == made.count("cand") == 8  # one fresh runner per visit
    firsts = {made[2 * i] for i in range(8)}
    assert firsts == {"float", "cand"}  # both orders occur (seeded shuffle per pair)
    assert result.visits == 8 and result.runs == 5
    assert result.speedup_lo <= result.speedup <= result.speedup_hi
    assert result.speedup > 1.5  # 4x less work per call: a margin no machine's noise closes
    assert result.isa and result.cpu


def test_interval_of_log_ratios() -> None:
    est, lo, hi = log_ratio_interval([0.0, 0.0, 0.0])
    assert (est, lo, hi) == (1.0, 1.0, 1.0)
    est, lo, hi = log_ratio_interval([0.1, -0.1, 0.05, -0.05])
    assert est == pytest.approx(1.0) and lo < 1.0 < hi


def test_protocol_arguments() -> None:
    with pytest.raises(ValueError, match="latency visits=1 must be >= 2 for an interval"):
        paired_speedup(lambda: lambda: None, lambda: lambda: None, visits=1)


CHILD = textwrap.dedent(
    """
    import sys, time
    from mpq.evaluators import timing_slot
    log = open(sys.argv[1], "a", buffering=1)
    with timing_slot.compute():
        log.write("child in\\n")
        for i in range(40):
            time.sleep(0.02)
            log.write(f"step {i}\\n")
            timing_slot.yield_point()
        log.write("child out\\n")
    """
)


def test_timing_excludes_compute_and_a_yield_point_lets_it_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timer waits for another process's compute section to yield, runs with no compute step
    beside it, and gets in at a yield point, before the section ends."""
    monkeypatch.setenv("MPQ_SLOT_DIR", str(tmp_path))
    log = tmp_path / "log.txt"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(log)],
        env={**os.environ, "MPQ_SLOT_DIR": str(tmp_path)},
    )
    while "child in" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.01)
    with timing_slot.exclusive(), open(log, "a", buffering=1) as f:
        f.write("timer in\n")
        time.sleep(0.2)
        f.write("timer out\n")
    assert child.wait(30) == 0
    lines = log.read_text().splitlines()
    start, end = lines.index("timer in"), lines.index("timer out")
    assert end == start + 1  # no compute step ran while the timer held the node
    assert start < lines.index("child out")  # it got in at a yield point, not at the end


def test_sections_nest_and_timing_inside_compute_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A compute section inside another is part of it (the task lowering its model); timing
    inside one would wait for itself, so it is an error; after both, timing goes through."""
    monkeypatch.setenv("MPQ_SLOT_DIR", str(tmp_path))
    with timing_slot.compute():
        with timing_slot.compute():
            timing_slot.yield_point()
        with (
            pytest.raises(RuntimeError, match=r"exclusive\(\) inside compute\(\)"),
            timing_slot.exclusive(),
        ):
            pass
    with timing_slot.exclusive():
        pass
    timing_slot.yield_point()  # outside a section: nothing to give up
