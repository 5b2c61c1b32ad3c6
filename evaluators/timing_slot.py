"""The node's exclusive timing slot: while a latency is timed, no other mpq work runs on the node.

Pairing a candidate with float in the same worker does not cancel a neighbour: another Ray
worker playing episodes on the same cores shares the caches, the memory bus and the clock
(measured on a 2-core EPYC: speed-ups of 0.95-1.05 for float against itself). So the work of a
trial is split in two kinds of section, both taken through ``flock`` on files of the node:

- ``compute()``: simulated models, proxies, episodes -- shared: any number at once;
- ``exclusive()``: timing -- alone: it waits until every compute section has ended, and while
  it waits no new one starts (a turnstile, so a stream of compute sections cannot starve it).
  A long compute section (a task's episode loop) calls ``yield_point()`` between steps, so a
  timer waits for one step, not for a whole evaluation.

The lock files live in ``MPQ_SLOT_DIR`` (default: the system's temp folder), one set per node,
which is what a Ray cluster's per-node ``/tmp`` gives. A compute section inside another is
part of it; timing inside a compute section is refused (it would wait for itself).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO


def _dir() -> Path:
    path = Path(os.environ.get("MPQ_SLOT_DIR") or tempfile.gettempdir()) / "mpq-slot"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def _locked(name: str, mode: int) -> Iterator[None]:
    with open(_dir() / name, "a") as f:
        fcntl.flock(f, mode)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_held: list[IO[str]] = []  # the slot file of this process's open compute section


def _enter_shared(f: IO[str]) -> None:
    with _locked("turnstile", fcntl.LOCK_EX):  # passes at once unless a timer is waiting
        pass
    fcntl.flock(f, fcntl.LOCK_SH)


@contextlib.contextmanager
def compute() -> Iterator[None]:
    """A section of CPU work that may run beside others, never beside timing. Re-entrant: a
    section opened inside another (the task lowering its model) is part of it."""
    if _held:
        yield
        return
    with open(_dir() / "slot", "a") as f:
        _enter_shared(f)
        _held.append(f)
        try:
            yield
        finally:
            _held.remove(f)
            fcntl.flock(f, fcntl.LOCK_UN)


def yield_point() -> None:
    """Inside a long compute section (a task's episode loop): let a waiting timer have the node
    now rather than at the section's end. Two ``flock`` calls when no one waits; a no-op
    outside a compute section."""
    if _held:
        f = _held[-1]
        fcntl.flock(f, fcntl.LOCK_UN)
        _enter_shared(f)


@contextlib.contextmanager
def exclusive() -> Iterator[float]:
    """The node to itself: yields the seconds spent waiting for it.

    Raises:
        RuntimeError: called inside a compute section of this process (it would wait for
            itself forever).
    """
    if _held:
        raise RuntimeError("timing_slot.exclusive() inside compute(): it would wait for itself")
    start = time.perf_counter()
    with _locked("turnstile", fcntl.LOCK_EX), _locked("slot", fcntl.LOCK_EX):
        yield time.perf_counter() - start
