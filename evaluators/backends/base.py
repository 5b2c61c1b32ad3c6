"""The backend interface and its registry (``@register_backend("name")``)."""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from mpq.evaluators.inputs import Inputs
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import LayerChoice, QuantConfig

RECURRENT_KINDS = ("gru", "lstm", "rnn")


def inside_attention(model: nn.Module, module_name: str) -> bool:
    """Whether ``module_name`` is a child of ``nn.MultiheadAttention``, which reads its
    ``out_proj.weight`` directly: a kernel swapped in for that Linear would never be called."""
    parent = module_name.rpartition(".")[0]
    return isinstance(model.get_submodule(parent), nn.MultiheadAttention)


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """What one layer runs on a backend: the kernel, the choice that runs (its simulated model
    equals the kernel's output: the contract suite), why that differs from the asked choice
    (None: it runs as asked), and why this kernel where several run the same numerics
    (``note``: the kernel autotune's measurement; None: the only or the default one)."""

    kernel: str
    ran: LayerChoice
    reason: str | None = None
    note: str | None = None


@dataclass(frozen=True)
class Plan:
    """Per layer, what runs: a backend's plan for one configuration, before anything runs."""

    layers: dict[str, LayerPlan]

    @property
    def kernels(self) -> dict[str, str]:
        return {name: p.kernel for name, p in self.layers.items()}

    @property
    def fallbacks(self) -> dict[str, str]:
        return {name: p.reason for name, p in self.layers.items() if p.reason is not None}

    @property
    def ran_config(self) -> QuantConfig:
        return QuantConfig(layers={name: p.ran for name, p in self.layers.items()})

    @property
    def notes(self) -> dict[str, str]:
        """Layer -> why its kernel was chosen among several (the autotune's measurement)."""
        return {name: p.note for name, p in self.layers.items() if p.note is not None}

    def replace(self, name: str, plan: LayerPlan) -> Plan:
        return Plan({**self.layers, name: plan})


def module_fallbacks(
    model: nn.Module,
    layers: tuple[LayerInfo, ...],
    plan: Plan,
    config: QuantConfig,
    float_plan: Callable[[LayerInfo, LayerChoice, str], LayerPlan],
) -> Plan:
    """What only the model tells, on a plan made from the layers' kinds: a Linear inside
    ``nn.MultiheadAttention`` (its weight read directly) and a recurrent module whose weights
    would run on different kernels (it is quantized whole) run on ``float_plan`` instead."""
    by_module: dict[str, list[LayerInfo]] = {}
    for la in layers:
        by_module.setdefault(la.module, []).append(la)
    for module_name, group in by_module.items():
        why = None
        if group[0].kind == "linear" and inside_attention(model, module_name):
            why = "nn.MultiheadAttention reads out_proj.weight directly"
        elif group[0].kind in RECURRENT_KINDS:
            if len({plan.layers[la.name].kernel for la in group}) > 1:
                why = "a recurrent module quantizes whole; a sibling weight stays float"
        if why is None:
            continue
        for la in group:
            fallback = float_plan(la, config.layers[la.name], why)
            if plan.layers[la.name].kernel != fallback.kernel:
                plan = plan.replace(la.name, fallback)
    return plan


@dataclass(frozen=True)
class Lowered:
    """A lowered model: ``run()`` executes it once on the example inputs; ``plan`` says per
    layer which kernel ran, the choice that ran and why it differs from the asked one."""

    run: Callable[[], Any]
    module: Any
    plan: Plan
    stored_bytes: int | None = None  # bytes of the weights the artifact stores, as it packs them
    predicted_bytes: int | None = None  # the same from the backend's packing formula
    # A new runner on a freshly created session of the same artifact (the latency protocol's
    # visits); None where a backend has one compiled module only (``run`` is reused).
    fresh: Callable[[], Callable[[], Any]] | None = None
    # The deployable file (its bytes) that runs without mpq, and what it is ("onnx"); None for
    # a measure-only backend (its lowered module needs mpq and torch to run).
    artifact: bytes | None = None
    artifact_kind: str = "measure-only"

    @property
    def kernels(self) -> dict[str, str]:
        return self.plan.kernels

    @property
    def fallbacks(self) -> dict[str, str]:
        return self.plan.fallbacks

    @property
    def ran_config(self) -> QuantConfig:
        return self.plan.ran_config

    def new_runner(self) -> Callable[[], Any]:
        return self.fresh() if self.fresh is not None else self.run


class Backend(Protocol):
    """A target's kernels: a pure plan per layer (``plan_layer``), and ``lower`` that executes
    the plan for a whole model with kernel handlers registered by kernel name."""

    name: str
    device: str  # "cpu" or "cuda": where ``lower``'s model runs and is timed

    def plan_layer(self, layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
        """What ``choice`` on ``layer`` runs, from the layer's kind and the choice alone (so a
        space is checked before any trial); ``lower`` adds what only the model tells."""
        ...

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        """Weight bit-widths this backend has a real kernel for on ``layer``."""
        ...

    def candidates(self, layer: LayerInfo, choice: LayerChoice) -> tuple[LayerPlan, ...]:
        """Every real kernel that runs ``choice`` on ``layer`` with the same numerics, the
        default first (``plan_layer`` runs the fastest the autotune measured)."""
        ...

    def tuned(self, kernel_us: Mapping[str, Mapping[str, float]]) -> Backend:
        """A copy that runs, per layer, the fastest kernel of ``kernel_us`` (layer -> kernel
        -> us per step measured in the whole model on this target)."""
        ...

    def pinned(self, kernels: Mapping[str, str]) -> Backend:
        """A copy that runs ``kernels`` (layer -> kernel) where each is a candidate."""
        ...

    def kernel_for(self, layer: LayerInfo, choice: LayerChoice) -> str:
        """``plan_layer(...).kernel``: the latency table's key."""
        ...

    def fallback_reason(self, layer: LayerInfo, choice: LayerChoice) -> str | None:
        """``plan_layer(...).reason``: why ``choice`` would not run as asked, or None."""
        ...

    def lower(
        self,
        model: nn.Module,
        layers: tuple[LayerInfo, ...],
        config: QuantConfig,
        example_inputs: Inputs,
        threads: int = 1,
        calibration: list[tuple[Any, ...]] | None = None,
        observer: str = "minmax",
    ) -> Lowered:
        """The model with ``config`` on this backend's kernels, runnable on ``example_inputs``.

        ``calibration`` (batches of model inputs) sets the ranges of static int8 activations,
        with ``observer`` (as the simulated model calibrates them).
        """
        ...


class PlannedBackend:
    """``kernel_for`` and ``fallback_reason`` read the backend's ``plan_layer``.

    Where several real kernels run the same numerics for a choice (``candidates``, the default
    first), ``plan_layer`` runs the one measured fastest for that layer on this target: the
    kernel autotune's table (``tuned``; ``evaluators/kernel_tune.py``), layer -> kernel -> us
    per step in the whole model. A kernel not measured for a layer is never picked over the
    default; without a table the default runs.
    """

    name: str = ""
    device: str = "cpu"
    kernel_us: Mapping[str, Mapping[str, float]] = {}
    kernel_pins: Mapping[str, str] = {}  # layer -> a kernel to run where it is a candidate

    def plan_layer(self, layer: LayerInfo, choice: LayerChoice) -> LayerPlan:
        raise NotImplementedError

    def candidates(self, layer: LayerInfo, choice: LayerChoice) -> tuple[LayerPlan, ...]:
        """Every real kernel that runs ``choice`` on ``layer`` with the same numerics (the same
        ``ran`` choice), the default first."""
        return (self.plan_layer(layer, choice),)

    def tuned(self, kernel_us: Mapping[str, Mapping[str, float]]) -> PlannedBackend:
        """A copy of this backend that runs, per layer, the fastest of ``kernel_us``."""
        out = copy.copy(self)
        out.kernel_us = {layer: dict(row) for layer, row in kernel_us.items()}
        return out

    def pinned(self, kernels: Mapping[str, str]) -> PlannedBackend:
        """A copy of this backend that runs ``kernels`` (layer -> kernel) where each is a
        candidate of the layer's choice: the autotune's forced lowerings, and an export that
        lowers what its trial ran."""
        out = copy.copy(self)
        out.kernel_pins = dict(kernels)
        return out

    def fastest(self, layer: LayerInfo, plans: tuple[LayerPlan, ...]) -> LayerPlan:
        """The pinned plan of ``plans``, else the one measured fastest on ``layer``
        (``kernel_us``), said in its ``note``; the first (the default) where it is not
        measured itself."""
        pin = self.kernel_pins.get(layer.name)
        for p in plans:
            if p.kernel == pin:
                return p
        row = self.kernel_us.get(layer.name, {})
        timed = [p for p in plans if p.kernel in row]
        if len(plans) < 2 or plans[0].kernel not in row:  # the default, unless compared to it
            return plans[0]
        best = min(timed, key=lambda p: row[p.kernel])
        others = ", ".join(f"{p.kernel} {row[p.kernel]:.1f} us" for p in timed if p is not best)
        if not others:  # only the default measured: nothing to say
            return best
        note = f"fastest measured here: {row[best.kernel]:.1f} us per step (vs {others})"
        return LayerPlan(best.kernel, best.ran, best.reason, note)

    def kernel_for(self, layer: LayerInfo, choice: LayerChoice) -> str:
        return self.plan_layer(layer, choice).kernel

    def fallback_reason(self, layer: LayerInfo, choice: LayerChoice) -> str | None:
        return self.plan_layer(layer, choice).reason

    def float_plan(self, layer: LayerInfo, asked: LayerChoice, why: str) -> LayerPlan:
        """What runs when the model rules the planned kernel out (``why``): float."""
        raise NotImplementedError

    def plan(self, model: nn.Module, layers: tuple[LayerInfo, ...], config: QuantConfig) -> Plan:
        """``plan_layer`` per layer, then what only the model tells (``module_fallbacks``).

        Raises:
            ValueError: ``config`` does not cover exactly ``layers``, or a choice cannot fit.
        """
        config.check(layers)
        plan = Plan({la.name: self.plan_layer(la, config.layers[la.name]) for la in layers})
        return module_fallbacks(model, layers, plan, config, self.float_plan)


BACKENDS: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str, **settings: Any) -> Callable[[type], type]:
    """Register ``cls(name=name, **settings)`` under ``name``: one class may serve several
    configured backends (``torch``, ``torch-cuda``, ``torch-cuda-fp8``)."""

    def wrap(cls: type) -> type:
        BACKENDS[name] = functools.partial(cls, name=name, **settings)
        return cls

    return wrap


class FallbackError(ValueError):
    """A choice the backend cannot run as asked, with fallback disabled."""


def check_no_fallback(
    backend: Backend,
    layers: tuple[LayerInfo, ...],
    choices: dict[str, tuple[LayerChoice, ...]],
    where: str,
) -> None:
    """Raise ``FallbackError`` on the first (layer, choice) the backend would lower.

    Args:
        choices: per layer name, the choices that may be asked of it (a resolved space's options
            or one configuration's choice).
        where: the file/field prefix of the message.
    """
    for la in layers:
        for choice in choices.get(la.name, ()):
            reason = backend.fallback_reason(la, choice)
            if reason is not None:
                raise FallbackError(
                    f"{where}: layer {la.name!r} {choice.describe()}: backend {backend.name!r} "
                    f"cannot run it as asked ({reason}) and latency.allow_fallback is false"
                )


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} not in {sorted(BACKENDS)}")
    return BACKENDS[name]()
