"""Latency of a runnable model, measured the way a robot runs it: batch 1, fixed threads.

Warm up, then time ``runs`` calls one by one under ``torch.inference_mode()`` and report the
median and the interquartile range in milliseconds, with the thread count, the CPU model and the
kernel library versions that produced them (a figure without them cannot be compared). On a
GPU backend ``run`` synchronises the device, so a call's time is its kernels' time; the GPU's
name is recorded in ``device``.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch


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
            for _ in range(warmup):
                run()
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                run()
                times.append((time.perf_counter() - start) * 1000)
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
