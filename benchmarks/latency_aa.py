"""The A/A check of the latency protocol: the float policy timed against a fresh copy of itself.

    python benchmarks/latency_aa.py [--repeats 20] [--runs 100] [--visits 6] [--no-search]

Prints the distribution of the speed-up over ``--repeats`` repeats (it must read 1.00), for:

- ``before``: the protocol trials used until figures version 2 -- float then candidate, 30 runs
  each, back to back on one live session each, in the worker, with no slot;
- ``alone``: the latency protocol (``evaluators.latency.paired_speedup``: visit pairs on fresh
  sessions, random order, 95% interval) in the node's exclusive slot on a quiet machine;
- ``during a search``: the same while the main job (``examples/babyai/search.yaml``, 2 Ray
  workers, tracking off, in a temporary folder) runs beside it, each repeat taking the
  exclusive slot as a trial does. ``before`` is repeated there too.

The shipped BabyAI policy on the ``onnxruntime`` backend, batch 1, 1 thread.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _aa_before(float_a, float_b, runs: int = 30) -> float:  # type: ignore[no-untyped-def]
    from mpq.evaluators.latency import measure_latency

    base = measure_latency(float_a.run, 5, runs, 1)
    cand = measure_latency(float_b.run, 5, runs, 1)
    return base.median_ms / cand.median_ms


def _aa_protocol(float_a, float_b, runs: int, visits: int, seed: int):  # type: ignore[no-untyped-def]
    from mpq.evaluators import timing_slot
    from mpq.evaluators.latency import paired_speedup

    with timing_slot.exclusive() as wait_s:
        paired = paired_speedup(
            float_a.new_runner, float_b.new_runner, visits, runs, 10, 1, seed=seed
        )
    return paired, wait_s


def _row(name: str, values: list[float], widths: list[float] | None = None) -> str:
    inside = sum(abs(v - 1.0) <= 0.015 for v in values) / len(values)
    q = statistics.quantiles(values, n=20)
    width = f"{statistics.median(widths):.3f}" if widths else "-"
    return (
        f"| {name} | {len(values)} | {min(values):.3f} | {q[0]:.3f} | "
        f"{statistics.median(values):.3f} | {q[-1]:.3f} | {max(values):.3f} | "
        f"{inside:.0%} | {width} |"
    )


def _start_search(out: Path) -> subprocess.Popen[bytes]:
    import yaml

    cfg = yaml.safe_load((ROOT / "examples/babyai/search.yaml").read_text())
    cfg["output_dir"] = str(out / "run")
    cfg["name"] = "babyai-vla-aa"
    cfg["trials"] = 200  # runs for as long as the benchmark needs it
    path = out / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.Popen(
        [sys.executable, "-m", "mpq.cli", "search", str(path), "--no-tracking"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for_trials(out: Path, timeout_s: float = 600) -> None:
    """Until the search's first trial has been told (its workers are busy from then on)."""
    import optuna

    db = out / "run" / "study.db"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(5)
        if not db.exists():
            continue
        try:
            study = optuna.load_study(study_name="babyai-vla-aa", storage=f"sqlite:///{db}")
        except Exception:  # noqa: BLE001  the study is created a little after the file
            continue
        if any(t.state.is_finished() for t in study.get_trials(deepcopy=False)):
            return
    raise RuntimeError(f"the search wrote no finished trial in {timeout_s:.0f}s")


def main() -> None:
    from mpq.evaluators.backends import get_backend
    from mpq.evaluators.cpu_isa import isa_summary
    from mpq.evaluators.latency import cpu_model, kernel_versions
    from mpq.spaces.discover import discover_layers
    from mpq.spaces.space import LayerChoice, QuantConfig
    from mpq.zoo.babyai import build_policy
    from mpq.zoo.babyai.task import example_inputs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--runs", type=int, default=100)
    p.add_argument("--visits", type=int, default=8)
    p.add_argument("--no-search", action="store_true", help="only the quiet-machine rows")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    policy = build_policy()
    layers = discover_layers(policy)
    keep = QuantConfig.uniform(layers, LayerChoice())
    backend = get_backend("onnxruntime")
    x = example_inputs()
    float_a = backend.lower(policy, layers, keep, x)
    float_b = backend.lower(policy, layers, keep, x)  # a fresh copy of float

    print(f"CPU: {cpu_model()} [{isa_summary()}]; {kernel_versions()}")
    print(
        f"A/A: the shipped BabyAI policy, onnxruntime, batch 1, 1 thread; protocol: "
        f"{args.visits} visit pairs x {args.runs} runs; {args.repeats} repeats per row\n"
    )
    print(
        "| protocol | repeats | min | p5 | median | p95 | max | within 1.00 +- 0.015 | "
        "median 95% interval width |"
    )
    print("|---|---|---|---|---|---|---|---|---|")

    def rows(where: str) -> None:
        before = [_aa_before(float_a, float_b) for _ in range(args.repeats)]
        print(_row(f"before (30 + 30 runs, live sessions), {where}", before), flush=True)
        results = [
            _aa_protocol(float_a, float_b, args.runs, args.visits, seed)
            for seed in range(args.repeats)
        ]
        values = [r.speedup for r, _ in results]
        widths = [r.speedup_hi - r.speedup_lo for r, _ in results]
        covered = sum(r.speedup_lo <= 1.0 <= r.speedup_hi for r, _ in results)
        waits = [w for _, w in results]
        print(_row(f"protocol, {where}", values, widths), flush=True)
        print(
            f"|   ({where}: interval covers 1.00 in {covered}/{len(results)}; median wait "
            f"for the slot {statistics.median(waits):.2f} s) |||||||||",
            flush=True,
        )

    rows("alone")
    if args.no_search:
        return
    with tempfile.TemporaryDirectory() as tmp:
        search = _start_search(Path(tmp))
        try:
            _wait_for_trials(Path(tmp))
            rows("during a 2-worker search")
        finally:
            os.killpg(search.pid, signal.SIGINT)
            try:
                search.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(search.pid, signal.SIGKILL)


if __name__ == "__main__":
    main()
