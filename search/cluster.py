"""Ray: start or attach, run the workers' functions as tasks, wait, cancel, shut down.

This module and ``search/runner.py`` (through ``TrialTasks``) are the only ones that drive Ray;
``search/worker.py`` holds what runs on a worker, free of Ray.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray

from mpq.evaluators.evaluator import EvalSpec
from mpq.search import worker
from mpq.search.config import SearchConfig

POLL_S = 0.5


def _on_node(*args: Any) -> dict[str, Any]:
    """``worker.evaluate_trial`` on a Ray worker, with the node it ran on."""
    out = worker.evaluate_trial(*args)
    out["node"] = ray.get_runtime_context().get_node_id()
    return out


def _qat_on_node(*args: Any) -> dict[str, Any]:
    """``worker.qat_trial`` on a Ray worker, with the node it ran on."""
    out = worker.qat_trial(*args)
    out["node"] = ray.get_runtime_context().get_node_id()
    return out


class TrialTasks:
    """The trials' Ray tasks, with the resources a trial asks of the cluster."""

    def __init__(self, cfg: SearchConfig, spec: EvalSpec) -> None:
        self.cfg = cfg
        self.spec = spec
        resources = {
            "num_cpus": cfg.ray.cpus_per_trial,
            "num_gpus": cfg.ray.gpus_per_trial,
            "resources": dict(cfg.ray.resources_per_trial),
        }
        self._evaluate = ray.remote(_on_node).options(
            **resources, max_retries=cfg.ray.max_retries, retry_exceptions=False
        )
        self._qat = ray.remote(_qat_on_node).options(
            **resources, max_retries=cfg.ray.max_retries, retry_exceptions=False
        )
        self._table = ray.remote(worker.build_table).options(**resources)
        self._tune = ray.remote(worker.tune_table).options(**resources)
        self.kernel_table: str | None = None  # the autotune's, sent with every trial

    def submit(
        self,
        config_json: str,
        artifact: worker.ArtifactFigures,
        episodes: int,
        latency_table: str | None,
        qat: bool = False,
    ) -> Any:
        """Start one worker call of a trial (``qat``: its QAT stage, ``worker.qat_trial``);
        returns its reference."""
        if qat:
            return self._qat.remote(
                self.spec,
                config_json,
                artifact,
                episodes,
                self.cfg.qat.model_dump_json(),
                self.cfg.trial_memory_mb,
                latency_table,
                self.kernel_table,
            )
        return self._evaluate.remote(
            self.spec,
            config_json,
            artifact,
            episodes,
            self.cfg.trial_memory_mb,
            latency_table,
            self.kernel_table,
        )

    def build_table(self, options_json: str, cached_json: str | None) -> str:
        """The latency table, built on a worker with the trials' resources (the target), on
        the kernels the autotune chose."""
        ref = self._table.remote(self.spec, options_json, cached_json, self.kernel_table)
        return str(ray.get(ref))

    def tune_kernels(self, options_json: str, cached_json: str | None) -> str:
        """The kernel autotune's table, measured on a worker with the trials' resources (the
        target); every later trial runs on the kernels it chose."""
        self.kernel_table = str(ray.get(self._tune.remote(self.spec, options_json, cached_json)))
        return self.kernel_table

    @staticmethod
    def ready(refs: list[Any]) -> set[Any]:
        """The references among ``refs`` whose result is in (waits at most ``POLL_S``)."""
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=POLL_S)
        return set(done)

    @staticmethod
    def result(ref: Any) -> dict[str, Any]:
        """The worker's result; raises what the worker raised (or Ray's error for a lost one)."""
        return dict(ray.get(ref))

    @staticmethod
    def cancel(ref: Any) -> None:
        ray.cancel(ref, force=True)


def _check_answers(address: str, timeout_s: float = 3.0) -> None:
    """Fail fast on a ``host:port`` that refuses connections (Ray itself waits minutes)."""
    if address == "auto" or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except (OSError, ValueError) as exc:
        raise ValueError(f"ray.address={address!r} does not answer: {exc}") from None


def _use_cluster_token() -> None:
    """Turn on Ray's token authentication for an attach when a token is at hand.

    ``ray start --head`` (Ray >= 2.5x) enables token authentication and writes
    ``~/.ray/auth_token``, but a process that merely connects stays in mode ``disabled`` and is
    refused ("InvalidAuthToken"). With ``RAY_AUTH_MODE`` unset and a token in
    ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``, attach in token mode,
    as ``ray start --address`` must be told to.
    """
    if "RAY_AUTH_MODE" in os.environ:
        return
    token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not (os.environ.get("RAY_AUTH_TOKEN") or token_file.is_file()):
        return
    # NOTE: Ray reads its auth mode from the environment only; this is the one place mpq
    # writes os.environ, for the attach it is about to make.
    os.environ["RAY_AUTH_MODE"] = "token"
    try:  # Ray caches its config at import: refresh it, as Ray's own `ray start` path does
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError):  # a Ray without token authentication
        pass


def _runtime_env() -> dict[str, Any]:
    """Workers import the user's modules from where mpq runs, like the driver does."""
    pythonpath = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    return {"env_vars": {"PYTHONPATH": pythonpath, "PYTHONWARNINGS": "ignore"}}


def _attach(address: str) -> None:
    _use_cluster_token()
    try:
        ray.init(
            address=address,
            runtime_env=_runtime_env(),
            log_to_driver=False,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        text = f"{exc} {exc.__cause__ or ''}"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "AuthToken" in text or "Authentication" in text:
            raise ValueError(
                f"ray.address={address!r} refused this process's token: put the "
                "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token"
            ) from None
        raise ValueError(f"ray.address={address!r} does not answer: {first}") from None


def init_ray(cfg: SearchConfig) -> bool:
    """Attach to ``cfg.ray.address`` or start a local Ray; returns True if we started it.

    Raises:
        ValueError: the address does not answer, or refuses this process's token.
    """
    if cfg.ray.address:
        _check_answers(cfg.ray.address)
    if ray.is_initialized():
        return False
    if cfg.ray.address:
        _attach(cfg.ray.address)
        return False
    ray.init(
        address="local",  # always a fresh runtime, never a `ray start` cluster found on disk
        num_cpus=max(1, math.ceil(cfg.ray.workers * cfg.ray.cpus_per_trial)),
        include_dashboard=False,
        runtime_env=_runtime_env(),
        log_to_driver=False,
        configure_logging=False,
        _node_ip_address="127.0.0.1",
    )
    return True


def capped_workers(cfg: SearchConfig) -> tuple[SearchConfig, str | None]:
    """``cfg`` with ``ray.workers`` capped at the trials the CPUs can run at once (this
    machine's for a local Ray, the cluster's once attached), and the line that says so (None
    when nothing changed): more would only queue, each trial's time limit running."""
    per = cfg.ray.cpus_per_trial
    if cfg.ray.address is None:  # a local search: this machine, whoever started Ray
        cpus, where = float(os.cpu_count() or 1), "this machine has"
    elif ray.is_initialized():
        cpus, where = float(ray.cluster_resources().get("CPU", 0)), "the cluster has"
    else:
        return cfg, None
    fits = max(1, math.floor(cpus / per)) if per > 0 else cfg.ray.workers
    if cfg.ray.workers <= fits:
        return cfg, None
    note = (
        f"ray.workers={cfg.ray.workers} but {where} {cpus:g} CPUs ({per:g} per trial): "
        f"running {fits} trials at a time"
    )
    return cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"workers": fits})}), note


def shutdown_ray() -> None:
    ray.shutdown()


@contextlib.contextmanager
def ray_session(cfg: SearchConfig) -> Iterator[None]:
    """Ray for the block: started (and shut down after) unless one is already up."""
    started = init_ray(cfg)
    try:
        yield
    finally:
        if started:
            shutdown_ray()
