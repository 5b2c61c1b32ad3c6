"""A trial is one typed record, from ``study.ask()`` to MLflow and export.

Optuna's RDB storage is the one place a trial lives: its objective values, its constraints and
its user attributes. ``TrialRecord`` reads a ``FrozenTrial`` into one typed value (the
configuration as asked and as ran, the measurements with their units, stage, state and reason,
feasibility, who proposed it); the runner, tracking, the front, the plots and the export all
read trials through it. The attribute names below are the only spelling of those keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from mpq.spaces.space import QuantConfig


class TrialAttr(StrEnum):
    """Keys of a trial's Optuna user attributes (besides the measurements themselves)."""

    CONFIG = "config"  # the configuration as asked (QuantConfig, JSON)
    RAN_CONFIG = "ran_config"  # as it ran on the backend's kernels, where that differs
    CONFIG_KEY = "config_key"  # QuantConfig.key() of the asked configuration
    PROPOSED_BY = "seed"  # the one-shot strategy that proposed a seed trial (absent: SEARCH)
    STAGE = "stage"  # the last stage the trial ran: Stage
    FAIL_REASON = "fail_reason"
    CONSTRAINTS = "constraints"  # values in the config's order; <= 0 is satisfied
    DUPLICATE_OF = "duplicate_of"  # number of the trial whose figures a duplicate reuses
    KERNELS = "kernels"  # layer -> kernel that ran
    FALLBACKS = "fallbacks"  # layer -> why it ran otherwise than asked
    LATENCY_INFO = "latency_info"  # how the latency was measured (CPU, threads, visits)
    QAT = "qat"  # the QAT stage: PTQ success before it, steps, seconds, checkpoint (relative)
    REFINED = "refined"  # a close call measured again: the full budget's success before it


class StudyAttr(StrEnum):
    """Keys of a study's Optuna user attributes."""

    FLOAT_REFERENCE = "float_reference"  # the float model's measurements
    OBJECTIVES = "objectives"  # objective names, in the order of the study's directions
    LAYERS = "layers"
    SENSITIVITY = "sensitivity"
    LATENCY_TABLE = "latency_table"
    KERNEL_TABLE = "kernel_table"  # the kernel autotune's measurements (kernel_tune)
    FINGERPRINT = "fingerprint"


class Stage(StrEnum):
    """What a trial ran: the cheap screening stage, the full task budget, a close call's
    larger budget, or QAT."""

    SCREEN = "screen"
    FULL = "full"
    QAT = "qat"  # fine-tuned (quantization-aware training), then the full task budget
    REFINE = "refine"  # a close call: task_budget + refine_budget episodes decide it


SEARCH = "search"  # proposed_by of a trial the sampler proposed
# system attribute: the model-based sampler's predicted objectives for the trial it proposed
PREDICTED = "mpq:predicted"


def loss_signs(directions: Sequence[StudyDirection | str]) -> list[float]:
    """+1 for an objective to minimise, -1 to maximise: ``sign * value`` is a loss."""
    out = []
    for d in directions:
        name = d.name if isinstance(d, StudyDirection) else str(d).upper()
        out.append(1.0 if name == "MINIMIZE" else -1.0)
    return out


def feasible(constraints: Sequence[float]) -> bool:
    """Optuna's rule: every constraint value <= 0 (no constraint: feasible)."""
    return all(c <= 0 for c in constraints)


def jsonable(data: Mapping[str, Any]) -> dict[str, Any]:
    """``data`` as Optuna's JSON user attributes store it (anything else as its ``str``)."""
    return dict(json.loads(json.dumps(dict(data), default=str)))


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v)


_COUNTS = ("size_bytes", "asked_size_bytes", "episodes")  # whole numbers


@dataclass(frozen=True, slots=True)
class Measurements:
    """A trial's figures, with units in their names; ``extra``: every other numeric figure
    (per-level success ``success/<level>``, proxy KL, ...)."""

    success: float | None = None
    success_lo: float | None = None
    success_hi: float | None = None
    size_bytes: int | None = None
    asked_size_bytes: int | None = None
    latency_ms: float | None = None
    speedup: float | None = None
    speedup_lo: float | None = None
    speedup_hi: float | None = None
    episodes: int | None = None
    eval_s: float | None = None
    extra: Mapping[str, float] = field(default_factory=dict)

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> Measurements:
        named = {f for f in cls.__slots__ if f != "extra"}  # type: ignore[attr-defined]
        values: dict[str, Any] = {}
        for name in named:
            v = _number(attrs.get(name))
            if v is not None:
                values[name] = int(v) if name in _COUNTS else v
        extra = {
            k: n
            for k, v in attrs.items()
            if k not in named and k != TrialAttr.DUPLICATE_OF and (n := _number(v)) is not None
        }
        return cls(**values, extra=extra)

    def as_metrics(self) -> dict[str, float]:
        """Every figure by name (``extra`` included), finite values only."""
        out = {
            f: float(getattr(self, f))
            for f in self.__slots__  # type: ignore[attr-defined]
            if f != "extra" and getattr(self, f) is not None
        }
        out.update(self.extra)
        return {k: v for k, v in out.items() if math.isfinite(v)}

    def compression(self, float_size_bytes: float | None) -> float | None:
        """``float_size_bytes / size_bytes``: how many times smaller than the float model."""
        if not self.size_bytes or not float_size_bytes:
            return None
        return float(float_size_bytes) / float(self.size_bytes)


@dataclass(frozen=True, slots=True)
class TrialRecord:
    """One trial, typed: read from Optuna's ``FrozenTrial`` with ``from_frozen``."""

    number: int
    state: TrialState
    config: QuantConfig | None
    ran_config: QuantConfig | None
    measurements: Measurements
    values: tuple[float, ...] | None
    constraints: tuple[float, ...]
    stage: Stage | None
    fail_reason: str | None
    proposed_by: str
    duplicate_of: int | None
    kernels: Mapping[str, str]
    fallbacks: Mapping[str, str]
    latency_info: Mapping[str, Any]
    attrs: Mapping[str, Any]  # the raw user attributes, for what has no typed field
    predicted: Mapping[str, float] = field(default_factory=dict)  # the sampler's, if any
    qat: Mapping[str, Any] = field(default_factory=dict)  # the QAT stage, if it ran
    refined: Mapping[str, Any] = field(default_factory=dict)  # a close call's REFINE stage

    @classmethod
    def from_frozen(cls, t: FrozenTrial) -> TrialRecord:
        a = t.user_attrs
        config = a.get(TrialAttr.CONFIG)
        ran = a.get(TrialAttr.RAN_CONFIG)
        stage = a.get(TrialAttr.STAGE)
        dup = a.get(TrialAttr.DUPLICATE_OF)
        return cls(
            number=t.number,
            state=t.state,
            config=QuantConfig.model_validate(config) if config else None,
            ran_config=QuantConfig.model_validate(ran) if ran else None,
            measurements=Measurements.from_attrs(a),
            values=tuple(t.values) if t.values is not None else None,
            constraints=tuple(float(c) for c in a.get(TrialAttr.CONSTRAINTS, ())),
            stage=Stage(stage) if stage else None,
            fail_reason=a.get(TrialAttr.FAIL_REASON),
            proposed_by=str(a.get(TrialAttr.PROPOSED_BY) or SEARCH),
            duplicate_of=int(dup) if dup is not None else None,
            kernels=dict(a.get(TrialAttr.KERNELS, {})),
            fallbacks=dict(a.get(TrialAttr.FALLBACKS, {})),
            latency_info=dict(a.get(TrialAttr.LATENCY_INFO, {})),
            attrs=dict(a),
            predicted=dict(t.system_attrs.get(PREDICTED, {})),
            qat=dict(a.get(TrialAttr.QAT, {})),
            refined=dict(a.get(TrialAttr.REFINED, {})),
        )

    @property
    def feasible(self) -> bool:
        return feasible(self.constraints)

    @property
    def complete(self) -> bool:
        return self.state == TrialState.COMPLETE

    @property
    def config_as_ran(self) -> QuantConfig | None:
        """What ran on the kernels: ``ran_config``, else the asked one (nothing changed)."""
        return self.ran_config or self.config

    def mean_w_bits(self, ran: bool = True) -> float | None:
        """Mean weight bit-width over the layers, of what ran (or of what was asked)."""
        config = self.config_as_ran if ran else self.config
        return config.mean_w_bits if config is not None else None


def float_reference(study_attrs: Mapping[str, Any]) -> Measurements:
    """The float model's measurements, from the study's user attributes."""
    return Measurements.from_attrs(study_attrs.get(StudyAttr.FLOAT_REFERENCE, {}))
