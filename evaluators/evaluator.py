"""One configuration -> measurements: exact size, real-kernel latency, proxy, task success.

``EvalSpec`` is plain data (it travels to Ray workers); ``Evaluator`` loads the model, task,
calibration data and example inputs once per process and measures any number of configurations.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mpq.evaluators import timing_slot
from mpq.evaluators.apply import apply_config
from mpq.evaluators.backends import get_backend
from mpq.evaluators.backends.base import FallbackError, Lowered
from mpq.evaluators.callables import call_user, load_callable
from mpq.evaluators.inputs import as_inputs, session_feeds
from mpq.evaluators.kernel_tune import KernelTable
from mpq.evaluators.latency import paired_speedup
from mpq.evaluators.latency_table import LatencyTable, model_target
from mpq.evaluators.model import build_model
from mpq.evaluators.proxy import output_agreement, reference_outputs
from mpq.evaluators.qat import QatResult, QatSettings, finetune
from mpq.evaluators.size import config_size, float_size_bytes
from mpq.evaluators.task import run_task
from mpq.spaces.discover import LayerInfo, discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig


@dataclass(frozen=True, slots=True)
class EvalSpec:
    """What to measure with: references to the user's callables, and measurement settings."""

    model: str
    task: str
    calibration: str
    checkpoint: str | None = None
    output: str | tuple[str, ...] | None = None  # the output(s) that matter (``outputs``)
    example_inputs: str | None = None
    backend: str = "onnxruntime"
    observer: str = "minmax"
    latency_threads: int = 1
    latency_warmup: int = 5
    latency_runs: int = 100
    latency_visits: int = 8
    measure_latency: bool = True
    allow_fallback: bool = True
    latency_agent: str | None = None  # an ``mpq agent`` on the target times the models
    # its token, read where the search starts (Ray's workers, on any node, may not have the
    # environment variable); never shown
    latency_agent_token: str | None = field(default=None, repr=False)
    latency_agent_timeout_s: float = 900.0


class Evaluator:
    """Measures configurations of one model on one task."""

    def __init__(self, spec: EvalSpec) -> None:
        self.spec = spec
        self.model: nn.Module = build_model(spec.model, spec.checkpoint, spec.output)
        self.layers: tuple[LayerInfo, ...] = discover_layers(self.model)
        self.task = load_callable(spec.task, "task")
        calibration = load_callable(spec.calibration, "calibration")
        batches = list(call_user(calibration, spec.calibration, "calibration"))
        if not batches:
            raise ValueError(f"calibration {spec.calibration!r} returned no batch")
        self.calibration = batches
        if spec.example_inputs:
            example = load_callable(spec.example_inputs, "example_inputs")
            self.example_inputs = as_inputs(
                call_user(example, spec.example_inputs, "example_inputs")
            )
        else:
            self.example_inputs = as_inputs(batches[0])
        self.reference = reference_outputs(self.model, self.calibration)
        self.base_backend = get_backend(spec.backend)
        self.backend = self.base_backend  # tuned by ``use_kernels``
        self.float_bytes = float_size_bytes(self.model)
        self._float_lowered: Lowered | None = None
        self._lowered: dict[str, Lowered] = {}

    def use_kernels(self, table_json: str | None) -> None:
        """Run each layer on the kernel the autotune measured fastest on this target
        (``kernel_tune``); a table of another target or model, or None, leaves the default
        kernels."""
        kernel_us: dict[str, dict[str, float]] = {}
        if table_json:
            table = KernelTable.from_json(table_json)
            if table.matches(model_target(self)):
                kernel_us = table.usable()  # the kernels the end-to-end check kept
        if kernel_us != getattr(self.backend, "kernel_us", {}):
            self.backend = self.base_backend.tuned(kernel_us)
            self._lowered.clear()
            self._float_lowered = None

    def pin_kernels(self, kernels: dict[str, str]) -> None:
        """Run each layer on the kernel named (a trial's record: its export lowers what the
        trial ran, whatever this machine's autotune would pick); a kernel that is not a
        candidate of the layer's choice leaves the default."""
        self.backend = self.base_backend.pinned(kernels)
        self._lowered.clear()
        self._float_lowered = None

    def with_model(self, model: nn.Module) -> Evaluator:
        """This evaluator measuring ``model`` (a fine-tuned float shadow of the same
        architecture) instead: the same task, calibration, float reference outputs and float
        latency reference (the original float model's)."""
        if self.spec.measure_latency:
            self._float()
        other = copy.copy(self)
        other.model = model
        other._lowered = {}
        return other

    def finetuned(
        self,
        config: QuantConfig,
        settings: QatSettings,
        on_step: Callable[[int, float], None] | None = None,
    ) -> tuple[Evaluator, QatResult]:
        """Quantization-aware training of ``config`` as the backend runs it (``as_ran``): the
        evaluator of the fine-tuned model, and how training went (``evaluators.qat``).

        Raises:
            ValueError: a user callable that does not load or returns no data, or training
                that fails (a loss that is not a finite scalar).
        """
        ran = self.as_ran(config)
        step = None
        if settings.step:
            user_step, name = load_callable(settings.step, "qat.step"), settings.step

            def step(student: nn.Module, batch: Any) -> Any:
                return call_user(user_step, name, "qat.step", student, batch)

        record = None
        if settings.record:
            recorder, source = load_callable(settings.record, "qat.record"), settings.record

            def record(model: nn.Module, round_: int) -> list[Any]:
                return list(call_user(recorder, source, "qat.record", model, round_))

        def each_step(n: int, loss: float) -> None:
            timing_slot.yield_point()  # a neighbour's latency timer waits one step at most
            if on_step is not None:
                on_step(n, loss)

        with timing_slot.compute():  # loading the data is compute too (a simulator's demos)
            data = self.calibration
            if settings.data:
                loader = load_callable(settings.data, "qat.data")
                data = list(call_user(loader, settings.data, "qat.data"))
                if not data:
                    raise ValueError(f"qat.data {settings.data!r} returned no batch")
            result = finetune(
                self.model,
                self.layers,
                ran,
                data,
                settings,
                self.spec.observer,
                step,
                each_step,
                calibration=self.calibration,
                record=record,
            )
        return self.with_model(result.model), result

    def quantized(self, config: QuantConfig) -> nn.Module:
        return apply_config(self.model, config, self.calibration, self.spec.observer, self.layers)

    def lower(self, config: QuantConfig) -> Lowered:
        """``config`` on the backend's kernels (the last one kept: screening, latency and the
        task of one trial share it)."""
        key = config.key()
        if key not in self._lowered:
            self._lowered.clear()
            with timing_slot.compute():  # export, calibration: never beside a timer
                self._lowered[key] = self._lower_now(config)
        return self._lowered[key]

    def _lower_now(self, config: QuantConfig) -> Lowered:
        return self.backend.lower(
            self.model,
            self.layers,
            config,
            self.example_inputs,
            self.spec.latency_threads,
            calibration=self.calibration,
            observer=self.spec.observer,
        )

    def as_ran(self, config: QuantConfig) -> QuantConfig:
        """The configuration that really runs on the backend (its simulated model equals the
        lowered one: the contract suite), or ``config`` itself where no backend measures."""
        if not self.spec.measure_latency:
            return config
        return self.lower(config).ran_config

    def artifact(self, config: QuantConfig) -> dict[str, Any]:
        """What ships: ``size_bytes`` = the bytes of the backend's deployable artifact (ONNX
        Runtime: the ``.onnx`` file); a measure-only backend (no file that runs without mpq)
        gives its packing formula of what ran, said in ``artifact``."""
        asked = config_size(self.model, self.layers, config).total_bytes
        if not self.spec.measure_latency:
            return {"size_bytes": asked, "asked_size_bytes": asked, "artifact": "none"}
        lowered = self.lower(config)
        if lowered.artifact is not None:
            size, kind = len(lowered.artifact), lowered.artifact_kind
        elif lowered.predicted_bytes is not None:  # the backend's packing formula of what ran
            size, kind = int(lowered.predicted_bytes), "measure-only"
        else:
            ran = lowered.ran_config
            size = config_size(self.model, self.layers, ran).total_bytes
            kind = "measure-only"
        return {"size_bytes": size, "asked_size_bytes": asked, "artifact": kind}

    def latency(self, config: QuantConfig) -> dict[str, Any]:
        """Latency on the backend's real kernels, paired with float, with what ran per layer.

        The latency protocol (``paired_speedup``) in the node's exclusive timing slot: float
        and the candidate interleave over fresh sessions, so ``speedup`` (float / candidate,
        with its 95% interval ``speedup_lo``/``speedup_hi``) is not skewed by other trials.
        """
        s = self.spec
        float_lowered, lowered = self._float(), self.lower(config)
        if not s.allow_fallback and lowered.fallbacks:
            name, reason = next(iter(lowered.fallbacks.items()))
            raise FallbackError(
                f"layer {name!r}: backend {s.backend!r} cannot run it as asked ({reason}) and "
                "latency.allow_fallback is false"
            )
        if s.latency_agent:
            return self._latency_on_agent(float_lowered, lowered)
        with timing_slot.compute(), torch.inference_mode():  # first calls compile (torch)
            float_lowered.run()
            lowered.run()
        with timing_slot.exclusive() as wait_s:
            paired = paired_speedup(
                float_lowered.new_runner,
                lowered.new_runner,
                s.latency_visits,
                s.latency_runs,
                s.latency_warmup,
                s.latency_threads,
                self.backend.device,
            )
        out: dict[str, Any] = {
            "latency_ms": paired.latency_ms,
            "latency_measured_ms": paired.latency_ms,
            "latency_iqr_ms": paired.iqr_ms,
            "float_latency_ms_paired": paired.float_latency_ms,
            "speedup": paired.speedup,
            "speedup_lo": paired.speedup_lo,
            "speedup_hi": paired.speedup_hi,
            "latency_info": {
                **paired.as_dict(),
                "wait_s": wait_s,
                "backend": s.backend,
                "kernel_choice": lowered.plan.notes,  # why a kernel among several: measured
            },
        }
        return out | self._what_ran(lowered)

    def _latency_on_agent(self, float_lowered: Lowered, lowered: Lowered) -> dict[str, Any]:
        """The latency protocol run by the ``mpq agent`` on the target (``spec.latency_agent``)
        on the two deployable files, with the agent's CPU recorded.

        Raises:
            ValueError: the backend has no deployable file, or the agent did not answer.
        """

        from mpq.evaluators.agent_client import time_on_agent

        s = self.spec
        if lowered.artifact is None or float_lowered.artifact is None:
            raise ValueError(
                f"latency.agent needs a backend with a deployable file, not {s.backend!r}"
            )
        inputs = session_feeds(lowered.module, self.example_inputs)
        got = time_on_agent(
            s.latency_agent or "",
            float_lowered.artifact,
            lowered.artifact,
            inputs,
            s.latency_visits,
            s.latency_runs,
            s.latency_warmup,
            s.latency_threads,
            timeout_s=s.latency_agent_timeout_s,
            token=s.latency_agent_token,
        )
        out: dict[str, Any] = {
            "latency_ms": got["latency_ms"],
            "latency_measured_ms": got["latency_ms"],
            "float_latency_ms_paired": got["float_latency_ms"],
            "speedup": got["speedup"],
            "speedup_lo": got["speedup_lo"],
            "speedup_hi": got["speedup_hi"],
            "latency_info": {
                **got,
                "target": f"mpq agent {s.latency_agent}",
                "backend": s.backend,
            },
        }
        return out | self._what_ran(lowered)

    def _float(self) -> Lowered:
        """The float model on the backend (lowered once): the latency protocol's reference."""
        if self._float_lowered is None:
            keep = QuantConfig.uniform(self.layers, LayerChoice())
            with timing_slot.compute():
                self._float_lowered = self._lower_now(keep)
        return self._float_lowered

    def _what_ran(self, lowered: Lowered) -> dict[str, Any]:
        """Kernels, fallbacks, the configuration that ran and its exact size (3 -> 4 bits)."""
        ran = lowered.ran_config
        return {
            "kernels": lowered.kernels,
            "backend_stored_bytes": lowered.stored_bytes,
            "fallbacks": lowered.fallbacks,
            "ran_config": ran.model_dump(mode="json", exclude_none=True),
            "ran_size_bytes": config_size(self.model, self.layers, ran).total_bytes,
        }

    def screen(self, config: QuantConfig, table: LatencyTable | None = None) -> dict[str, Any]:
        """The cheap part: size, proxy agreement with the float model and latency, all of the
        deployable artifact; with ``table``, a cheaper screen without lowering: the asked
        configuration's formula size and simulation, and the table's predicted latency (the
        full stage then measures the artifact)."""
        if self.spec.measure_latency and table is not None:
            asked = config_size(self.model, self.layers, config).total_bytes
            out: dict[str, Any] = {"size_bytes": asked, "asked_size_bytes": asked}
            with timing_slot.compute():
                qmodel = self.quantized(config)
                out.update(output_agreement(qmodel, self.calibration, self.reference))
            out["latency_ms"] = table.predict_ms(self.backend.kernel_for, self.layers, config)
            out["latency_source"] = "predicted"
            return out
        out = self.artifact(config)
        with timing_slot.compute():
            qmodel = self.quantized(self.as_ran(config))
            out.update(output_agreement(qmodel, self.calibration, self.reference))
        if self.spec.measure_latency:
            out.update(self.latency(config))
            out["latency_source"] = "measured"
        return out

    def success(self, config: QuantConfig | None, budget: int) -> dict[str, float]:
        """Task metrics of the configuration as it runs on the backend (``as_ran``), or of the
        float model when ``config`` is None."""
        with timing_slot.compute():
            model = self.model if config is None else self.quantized(self.as_ran(config))
            return run_task(self.task, model, budget, self.spec.task)

    def float_reference(self, budget: int) -> dict[str, Any]:
        keep = QuantConfig.uniform(self.layers, LayerChoice())
        out = self.screen(keep)
        out.update(self.success(None, budget))
        if out.get("artifact") == "none":
            out["size_bytes"] = self.float_bytes
        if "speedup" in out:  # float against a fresh copy of itself: the A/A check, ~1.00
            for key in ("speedup", "speedup_lo", "speedup_hi"):
                out[f"aa_{key}"] = out.pop(key)
            out["latency_ms"] = out["float_latency_ms_paired"]
        return out


@functools.lru_cache(maxsize=2)
def get_evaluator(spec: EvalSpec) -> Evaluator:
    """One ``Evaluator`` per spec per process (Ray reuses worker processes between trials)."""
    torch.set_num_threads(max(1, spec.latency_threads))
    return Evaluator(spec)


def finite_or_error(metrics: dict[str, Any], keys: tuple[str, ...]) -> None:
    bad = [
        k
        for k in keys
        if not isinstance(metrics.get(k), int | float) or not math.isfinite(metrics[k])
    ]
    if bad:
        raise ValueError(f"measurement returned non-finite {bad}")
