"""The torch backend is correct whatever the CPU's integer instruction set: the int8 kernels are
run in subprocesses under oneDNN/ATen caps (AVX2, AVX-512 VNNI, uncapped), so one machine checks
every ISA up to its own, whichever CPU CI lands on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.evaluators.test_backends import tolerance

ROOT = Path(__file__).resolve().parents[2]
CAPS = {
    "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
    "avx512-vnni": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
    "uncapped": {},
}


@pytest.mark.parametrize("cap", sorted(CAPS))
def test_int8_linear_matches_simulated_under_isa_cap(cap: str) -> None:
    from mpq.evaluators.cpu_isa import cpu_flags

    if cap == "avx512-vnni" and "avx512_vnni" not in cpu_flags():
        pytest.skip("no AVX-512 VNNI here: capped there, this CPU runs what 'uncapped' runs")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
    }
    env.update(CAPS[cap])
    proc = subprocess.run(
        [sys.executable, "-m", "tests.evaluators.isa_check"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cases = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [c["w_bits"] for c in cases] == [8, 4]
    for case in cases:
        assert case["error"] <= tolerance("torch", case["w_bits"]), case
        dynamic = any("int8 x int8" in k for k in case["kernels"])
        assert dynamic == case["exact"], case  # the inexact kernel never runs
        if not case["exact"]:  # and what ran instead says why, naming the ISA
            assert all("inexact on this CPU" in r for r in case["fallbacks"].values()), case
