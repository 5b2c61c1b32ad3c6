"""Latency of a runnable model, measured the way a robot runs it: batch 1, fixed threads.

Warm up, then time ``runs`` calls one by one under ``torch.inference_mode()`` and report the
median and the interquartile range in milliseconds, with the thread count, the CPU model and the
kernel library versions that produced them (a figure without them cannot be compared). On a
GPU backend ``run`` synchronises the device, so a call's time is its kernels' time; the GPU's
name is recorded in ``device``.
"""

from __future__ import annotations

import math
import platform
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mpq.evaluators.cpu_isa import isa_summary


@dataclass(frozen=True, slots=True)
class LatencyStats:
    median_ms: float
    iqr_ms: float
    runs: int
    threads: int
    cpu: str
    versions: str
    device: str = "cpu"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def kernel_versions() -> str:
    import importlib.metadata

    parts = [f"torch {torch.__version__}"]
    for package in ("torchao", "onnxruntime"):
        try:
            parts.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    if torch.version.cuda and torch.cuda.is_available():
        parts.append(f"CUDA {torch.version.cuda}")
    return ", ".join(parts)


def device_name(device: str) -> str:
    """``cpu``, or the CUDA device's name (``cuda: NVIDIA H100 80GB HBM3``)."""
    if device.startswith("cuda"):
        return f"cuda: {torch.cuda.get_device_name(torch.device(device))}"
    return device


def _timed(run: Callable[[], Any], warmup: int, runs: int) -> list[float]:
    """``warmup`` untimed calls, then the times of ``runs`` calls in ms."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return times


def measure_latency(
    run: Callable[[], Any],
    warmup: int = 10,
    runs: int = 50,
    threads: int = 1,
    device: str = "cpu",
) -> LatencyStats:
    """Median and IQR (ms) of ``runs`` timed calls of ``run`` after ``warmup`` calls.

    Raises:
        ValueError: ``runs`` < 3 or ``threads`` < 1.
    """
    if runs < 3:
        raise ValueError(f"latency runs={runs} must be >= 3 for a median and IQR")
    if threads < 1:
        raise ValueError(f"latency threads={threads} must be >= 1")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            times = _timed(run, warmup, runs)
    finally:
        torch.set_num_threads(previous)
    q1, _, q3 = statistics.quantiles(times, n=4)
    return LatencyStats(
        statistics.median(times),
        q3 - q1,
        runs,
        threads,
        cpu_model(),
        kernel_versions(),
        device_name(device),
    )


@dataclass(frozen=True, slots=True)
class PairedLatency:
    """A candidate timed against float in one exclusive slot (``paired_speedup``).

    ``speedup`` = float / candidate (geometric mean over visit pairs) with its 95% interval;
    the latencies are medians of the visits' medians.
    """

    speedup: float
    speedup_lo: float
    speedup_hi: float
    latency_ms: float
    float_latency_ms: float
    iqr_ms: float
    visits: int
    runs: int
    threads: int
    cpu: str
    isa: str
    versions: str
    device: str = "cpu"
    wait_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _visit(new_runner: Callable[[], Callable[[], Any]], warmup: int, runs: int) -> list[float]:
    """Times ``runs`` calls of a freshly created runner after ``warmup`` calls (ms)."""
    return _timed(new_runner(), warmup, runs)  # the runner (its session) goes after the visit


def log_ratio_interval(logs: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``exp`` of the mean of ``logs`` and of its Student-t interval: (estimate, lo, hi)."""
    from scipy import stats

    mean = statistics.fmean(logs)
    if len(logs) < 2:
        return math.exp(mean), 0.0, math.inf
    half = stats.t.ppf(0.5 + confidence / 2, len(logs) - 1) * statistics.stdev(logs)
    half /= math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def _interleaved(
    reference: Callable[[], Callable[[], Any]],
    candidate: Callable[[], Callable[[], Any]],
    visits: int,
    runs: int,
    warmup: int,
    threads: int,
    seed: int,
) -> tuple[dict[str, list[float]], list[float]]:
    """Per visit pair, in a random order, each side's median; and every candidate time."""
    rng = random.Random(seed)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    medians: dict[str, list[float]] = {"float": [], "candidate": []}
    cand_times: list[float] = []
    try:
        with torch.inference_mode():
            for _ in range(visits):
                order = [("float", reference), ("candidate", candidate)]
                rng.shuffle(order)
                for name, factory in order:
                    times = _visit(factory, warmup, runs)
                    medians[name].append(statistics.median(times))
                    if name == "candidate":
                        cand_times += times
    finally:
        torch.set_num_threads(previous)
    return medians, cand_times


def paired_speedup(
    reference: Callable[[], Callable[[], Any]],
    candidate: Callable[[], Callable[[], Any]],
    visits: int = 6,
    runs: int = 100,
    warmup: int = 10,
    threads: int = 1,
    device: str = "cpu",
    seed: int = 0,
) -> PairedLatency:
    """The latency protocol: float and candidate interleaved over fresh sessions.

    ``visits`` pairs; in each, the two are visited in a random order (``seed``), each visit
    creating a fresh runner (``reference()``/``candidate()``: a new inference session, so two
    live sessions never evict each other from the caches), warming it up and timing ``runs``
    calls. Per pair ``r_i = log(median_float_i / median_candidate_i)``; the speed-up is
    ``exp(mean r)`` with the 95% Student-t interval over pairs. Call it inside the node's
    exclusive slot (``evaluators.timing_slot``), where nothing else runs.

    Raises:
        ValueError: ``runs`` < 3, ``visits`` < 2 or ``threads`` < 1.
    """
    if runs < 3:
        raise ValueError(f"latency runs={runs} must be >= 3 for a median and IQR")
    if visits < 2:
        raise ValueError(f"latency visits={visits} must be >= 2 for an interval")
    if threads < 1:
        raise ValueError(f"latency threads={threads} must be >= 1")
    medians, cand_times = _interleaved(reference, candidate, visits, runs, warmup, threads, seed)
    logs = [math.log(f / c) for f, c in zip(medians["float"], medians["candidate"], strict=True)]
    speedup, lo, hi = log_ratio_interval(logs)
    q1, _, q3 = statistics.quantiles(cand_times, n=4)
    return PairedLatency(
        speedup=speedup,
        speedup_lo=lo,
        speedup_hi=hi,
        latency_ms=statistics.median(medians["candidate"]),
        float_latency_ms=statistics.median(medians["float"]),
        iqr_ms=q3 - q1,
        visits=visits,
        runs=runs,
        threads=threads,
        cpu=cpu_model(),
        isa=isa_summary(),
        versions=kernel_versions(),
        device=device_name(device),
    )
