"""Quantization-aware training (量化训练) and progressive quantization (渐进式量化) of one
configuration, as the backend runs it.

What trains is a float shadow of the model: every parameter stays float32. In the forward
pass each quantized layer's weight goes through the design notes' quantizer with the
configuration's choice *as the backend runs it* (``Evaluator.as_ran``: a 3-bit choice that runs
as 4-bit trains as 4-bit)::

    s = (max - min) / (2^b - 1)    z = round(-min / s)    x' = (clamp(round(x / s) + z) - z) * s

and the activations through the simulated model's own hooks (static ranges calibrated at the
start of each stage, dynamic ones per call). ``round`` has no gradient: the straight-through
estimator (Bengio et al. 2013) passes it through, ``x + (x' - x).detach()`` is ``x'`` forward
and the identity backward.

With min-max ranges the trained weights quantize after training exactly as in the last step,
so the export (the same packing and lowering as post-training quantization) ships what was
trained, with its exact size. ``lsq``: learnable ranges in the style of LSQ (Esser et al.
2020): per group a clipping range inside ``[min, max]`` (``[-a, a]`` when symmetric), trained
with LSQ's gradient scaled by ``1 / sqrt(N * qmax)``; the weights are clipped to it in the
forward pass, and at the end the shadow's weights are clamped to it, so the notes' min-max
formula gives the learned scale: the exported codes still follow the formula.

Loss, by default: distillation from the float model on the calibration inputs (never the
evaluation episodes), ``KL(softmax(float) || softmax(student))`` on the first output tensor
(the policy's action logits) or its ``mse``. A user step ``module:function`` called as
``step(student, batch) -> scalar loss tensor`` replaces it (behaviour cloning on demos, a task
loss); ``student(*batch)`` runs the quantized forward pass.

On-policy distillation (``record``, ``rounds``), for a policy whose inputs depend on its own
actions: a quantized policy drifts to states its float teacher and the demos never visit, and
its errors compound there (the reason DAgger, Ross et al. 2011, records the learner's own
states). ``rounds`` times, evenly spaced from the first step, the shadow quantized at the
current stage's widths (``apply_config`` with min-max ranges: under ``progressive`` the
stage's, not yet the target's; under ``lsq`` without the learned clipping, applied only at
the end) is handed to the user's ``record(model, round) -> batches``, which rolls it out in
the task on its own seeds (never the evaluation seeds) and returns the inputs it met; they
join the data, labelled by the float model like every batch.

Progressive quantization: the layers below 8 bits start at 8 and step down through 6, 4, 3
and 2 to their own width, in stages of equal steps (``progressive: true``); one-step QAT
trains at the target widths for all steps.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.func import functional_call

from mpq.evaluators.apply import apply_config, straight_through
from mpq.evaluators.inputs import as_inputs, call
from mpq.evaluators.proxy import first_tensor
from mpq.evaluators.quantize import check_finite, fake_quantize_weight, group_view, int_range
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, KEEP, LayerChoice, QuantConfig

LEVELS = (8, 6, 4, 3, 2)  # progressive: the widths a layer steps down through


class QatSettings(BaseModel):
    """How one configuration is fine-tuned (``qat:`` in a search config)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    steps: int = Field(200, ge=1, description="optimizer steps (one calibration batch each)")
    lr: float = Field(1e-4, gt=0, description="Adam learning rate")
    progressive: bool = Field(
        False, description="step the bits down 8 -> 6 -> 4 -> 3 -> 2 to each layer's width"
    )
    lsq: bool = Field(False, description="learnable clipping ranges (LSQ-style)")
    loss: Literal["kl", "mse"] = Field(
        "kl", description="distillation from the float model on the first output"
    )
    step: str | None = Field(
        None, description="module:function (student, batch) -> loss; replaces distillation"
    )
    data: str | None = Field(
        None, description="module:function -> batches to train on (default: calibration)"
    )
    record: str | None = Field(
        None,
        description="module:function (model, round) -> batches: inputs the quantized model "
        "meets in its own rollouts (never the evaluation seeds), distilled from the float model",
    )
    rounds: int = Field(
        0, ge=0, description="times to record (evenly spaced from step 0; needs record)"
    )
    seed: int = Field(0, description="order of the batches")
    when: Literal["never", "infeasible"] = Field(
        "never",
        description="in the search: never, or for a trial whose post-training success misses "
        "the constraint while its size and latency would reach the front (a QAT stage)",
    )

    @model_validator(mode="after")
    def _record_needs_rounds(self) -> QatSettings:
        if (self.record is None) != (self.rounds == 0):
            raise ValueError("qat.record and qat.rounds >= 1 go together: set both or neither")
        if self.rounds > self.steps:
            raise ValueError(
                f"qat.rounds ({self.rounds}) must not exceed qat.steps ({self.steps})"
            )
        if self.record is not None and self.step is not None:
            raise ValueError(
                "qat.record's states are labelled by the float model (distillation); "
                "qat.step replaces distillation: use one of them"
            )
        return self

    def record_steps(self) -> list[int]:
        """The steps before which the student's states are recorded: 0 and evenly after."""
        return sorted({self.steps * r // self.rounds for r in range(self.rounds)})


@dataclass
class QatResult:
    """A fine-tuned float shadow and how it got there."""

    model: nn.Module
    losses: list[float]
    stages: list[dict[str, Any]] = field(default_factory=list)  # bits per stage and its steps
    seconds: float = 0.0


def stage_configs(config: QuantConfig, progressive: bool) -> list[QuantConfig]:
    """The configurations trained in turn: ``config`` alone, or (progressive) one per level of
    ``LEVELS`` that some layer below 8 bits passes through, each layer at ``max(level, its
    width)``, ending at ``config``."""
    low = [c.w_bits for c in config.layers.values() if c.w_bits < INT_BITS_MAX]
    if not progressive or not low:
        return [config]
    out = []
    for level in (b for b in LEVELS if b > min(low)):  # then the target widths themselves
        layers = {
            n: c.model_copy(update={"w_bits": max(level, c.w_bits)})
            if c.w_bits < INT_BITS_MAX
            else c
            for n, c in config.layers.items()
        }
        out.append(QuantConfig(layers=layers))
    return [*out, config]


def ste_weight(w: torch.Tensor, choice: LayerChoice) -> torch.Tensor:
    """``w`` through the notes' quantizer forward, the identity backward."""
    if choice.w_bits == KEEP:
        return w
    if choice.w_bits == 16:
        target = w.detach().half().to(w.dtype)
    else:
        target = fake_quantize_weight(
            w.detach(), choice.w_bits, choice.granularity, choice.group_size, choice.symmetric
        )
    return straight_through(w, target)


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def _grad_scaled(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``x`` forward, its gradient times ``scale`` backward (LSQ's step-size gradient scale)."""
    return x * scale + (x - x * scale).detach()


class LsqRange(nn.Module):
    """Learnable clipping range of one weight, one per group (LSQ-style); never wider than the
    weight's own min-max range, so clamping the weight to it reproduces it exactly."""

    def __init__(self, w: torch.Tensor, choice: LayerChoice) -> None:
        super().__init__()
        self.choice = choice
        grouped = group_view(w.detach().float(), choice.granularity, choice.group_size)
        if choice.symmetric:
            self.hi = nn.Parameter(grouped.abs().amax(-1, keepdim=True).clone())
            self.lo = None
        else:
            self.hi = nn.Parameter(grouped.amax(-1, keepdim=True).clamp(min=0).clone())
            self.lo = nn.Parameter(grouped.amin(-1, keepdim=True).clamp(max=0).clone())
        qmin, qmax = int_range(choice.w_bits, choice.symmetric)
        self.grad_scale = 1.0 / math.sqrt(grouped.shape[-1] * qmax)

    def bounds(self, grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The effective ``(lo, hi)``: the learned range within the weight's min-max range,
        widened to include 0 as ``choose_qparams`` does."""
        hi = _grad_scaled(self.hi, self.grad_scale)
        if self.lo is None:
            hi = torch.minimum(hi, grouped.detach().abs().amax(-1, keepdim=True))
            return -hi, hi
        lo = _grad_scaled(self.lo, self.grad_scale)
        hi = torch.minimum(hi, grouped.detach().amax(-1, keepdim=True)).clamp(min=0)
        lo = torch.maximum(lo, grouped.detach().amin(-1, keepdim=True)).clamp(max=0)
        return lo, hi

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        c = self.choice
        grouped = group_view(w, c.granularity, c.group_size)
        lo, hi = self.bounds(grouped)
        qmin, qmax = int_range(c.w_bits, c.symmetric)
        clipped = torch.minimum(torch.maximum(grouped, lo), hi)
        if c.symmetric:
            s = hi / (2 ** (c.w_bits - 1) - 1)
            s = torch.where(s > 0, s, torch.ones_like(s))
            q = torch.clamp(_round_ste(clipped / s), qmin, qmax)
            return (q * s).reshape(w.shape)
        s = (hi - lo) / (2**c.w_bits - 1)
        s = torch.where(s > 0, s, torch.ones_like(s))
        z = torch.clamp(torch.round(-lo.detach() / s.detach()), qmin, qmax)
        q = torch.clamp(_round_ste(clipped / s) + z, qmin, qmax)
        return ((q - z) * s).reshape(w.shape)

    @torch.no_grad()
    def clamp_(self, w: torch.Tensor) -> None:
        """In place: ``w`` clamped to the learned range (its min-max is then that range)."""
        c = self.choice
        grouped = group_view(w, c.granularity, c.group_size)
        lo, hi = self.bounds(grouped)
        w.copy_(torch.minimum(torch.maximum(grouped, lo), hi).reshape(w.shape))


def _sim_name(sim_names: set[str], layer: LayerInfo) -> str:
    """The simulated model's name of ``layer``'s weight: the same, or the product Linear of a
    recurrent layer computed step by step (``memory_gru.weight_ih_l0.weight``)."""
    plain = f"{layer.module}.{layer.param}" if layer.module else layer.param
    if plain in sim_names:
        return plain
    product = f"{layer.name}.weight"
    if product in sim_names:
        return product
    raise ValueError(f"QAT: layer {layer.name!r} has no weight in the simulated model")


def _param_map(shadow: nn.Module, sim: nn.Module) -> dict[str, str]:
    """Simulated-model parameter name -> the shadow's (the same, or a recurrent product's
    ``weight``/``bias`` -> ``weight_ih_l0``/``bias_ih_l0`` of its module)."""
    # shared (tied) tensors once, by their first name: functional_call(tie_weights=True) gives
    # every alias the tensor passed for that name
    shadow_names = {n for n, _ in shadow.named_parameters()}
    out = {}
    for name, _ in sim.named_parameters():
        if name in shadow_names:
            out[name] = name
            continue
        module, _, leaf = name.rpartition(".")  # memory_gru.weight_ih_l0 . weight
        parent, _, product = module.rpartition(".")  # memory_gru . weight_ih_l0
        suffix = product.removeprefix("weight_")  # ih_l0
        mapped = f"{parent}.{product}" if leaf == "weight" else f"{parent}.bias_{suffix}"
        mapped = mapped.lstrip(".")
        if mapped not in shadow_names:
            raise ValueError(f"QAT: parameter {name!r} of the simulated model has no source")
        out[name] = mapped
    return out


class _Student(nn.Module):
    """The quantized forward pass of the shadow's current parameters (what a user step calls):
    the simulated model run on them, each quantized weight through the quantizer (min-max with
    the straight-through estimator, or a learned range)."""

    def __init__(
        self,
        sim: nn.Module,
        names: dict[str, str],
        params: dict[str, nn.Parameter],
        quantized: dict[str, LayerChoice],
        ranges: dict[str, LsqRange],
    ) -> None:
        super().__init__()
        self.sim = sim
        self.names, self.params, self.quantized, self.ranges = names, params, quantized, ranges

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        weights = {}
        for s, src in self.names.items():
            w = self.params[src]
            if s in self.ranges:
                w = self.ranges[s](w)
            elif s in self.quantized:
                w = ste_weight(w, self.quantized[s])
            weights[s] = w
        return functional_call(self.sim, weights, args, kwargs, tie_weights=True)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """``KL(softmax(teacher) || softmax(student))`` averaged over positions (last axis: the
    actions), or the mean squared error."""
    if kind == "mse":
        return torch.mean((student.float() - teacher) ** 2)
    logp_t, logp_s = teacher.log_softmax(-1), student.float().log_softmax(-1)
    return (logp_t.exp() * (logp_t - logp_s)).sum(-1).mean()


def _call(model: Callable[..., Any], batch: Any) -> Any:
    return call(model, as_inputs(batch))


def finetune(
    model: nn.Module,
    layers: tuple[LayerInfo, ...],
    config: QuantConfig,
    batches: Sequence[Any],
    settings: QatSettings,
    observer: str = "minmax",
    step: Callable[[nn.Module, Any], Any] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    calibration: Sequence[Any] | None = None,
    record: Callable[[nn.Module, int], Sequence[Any]] | None = None,
) -> QatResult:
    """Fine-tune a float copy of ``model`` for ``config`` (as the backend runs it).

    Args:
        batches: model inputs to train on (the calibration inputs, or the user's data).
        step: the user's ``(student, batch) -> loss``; None: distillation from ``model``.
        on_step: called with (step, loss) after each optimizer step (progress, tracking).
        calibration: model inputs for the static activation ranges (default: ``batches``;
            needed where a user step's batches are not model inputs, such as (x, label)).
        record: ``(quantized model, round) -> batches`` of its own rollouts, called at
            ``settings.record_steps()`` (needed where ``settings.rounds`` > 0).

    Raises:
        ValueError: no batch, nothing quantized to an integer format, a loss that is not a
            finite scalar tensor (the step named), or a layer the simulated model does not
            hold.
    """
    if not batches:
        raise ValueError("QAT: no batch to train on")
    if all(c.w_bits > INT_BITS_MAX and c.a_bits > INT_BITS_MAX for c in config.layers.values()):
        raise ValueError(
            "QAT: the configuration (as it runs) has no integer weight or activation: "
            "nothing for quantization-aware training to recover"
        )
    if settings.rounds and record is None:
        raise ValueError("QAT: qat.rounds is set but no record function was given")
    start = time.perf_counter()
    config.check(layers)
    trainer = _Trainer(model, batches, settings, step, on_step)
    stages = stage_configs(config, settings.progressive)
    per_stage = [settings.steps // len(stages)] * len(stages)
    per_stage[-1] += settings.steps - sum(per_stage)
    marks = settings.record_steps() if record is not None else []
    log: list[dict[str, Any]] = []
    student = None
    for stage, steps in zip(stages, per_stage, strict=True):
        quantized = _Quantized(trainer.shadow, stage, calibration or batches, observer, layers)
        student = trainer.student(quantized().eval(), stage, layers)  # eval: deployed forward
        opt = trainer.optimizer(student)
        end = len(trainer.losses) + steps
        while len(trainer.losses) < end:
            done = len(trainer.losses)
            if record is not None and done in marks:
                trainer.add(_recorded(record, quantized, marks.index(done)))
            upcoming = [m for m in marks if done < m < end]
            trainer.train(student, opt, min([*upcoming, end]) - done)
        log.append({"w_bits": _bits_summary(stage), "steps": steps})
    assert student is not None
    with torch.no_grad():
        for s, r in student.ranges.items():  # the learned ranges become the weights' min-max
            r.clamp_(trainer.params[student.names[s]])
        for name, p in trainer.params.items():
            check_finite(p, f"QAT: parameter {name}")
    return QatResult(trainer.shadow.eval(), trainer.losses, log, time.perf_counter() - start)


@dataclass
class _Quantized:
    """The shadow quantized as ``stage`` deploys, at its current weights (each call a fresh
    copy, static ranges calibrated on them)."""

    shadow: nn.Module
    stage: QuantConfig
    calibration: Sequence[Any]
    observer: str
    layers: tuple[LayerInfo, ...]

    def __call__(self) -> nn.Module:
        with torch.no_grad():
            self.shadow.eval()
            return apply_config(
                self.shadow, self.stage, self.calibration, self.observer, self.layers
            )


def _recorded(
    record: Callable[[nn.Module, int], Sequence[Any]], quantized: _Quantized, round_: int
) -> list[Any]:
    """One round of the student's own states, checked: at least one batch."""
    with torch.no_grad():
        batches = list(record(quantized().eval(), round_))
    if not batches:
        raise ValueError(f"QAT: qat.record returned no batch in round {round_}")
    return batches


class _Trainer:
    """The float shadow, its optimizer steps and their losses, over one or more stages."""

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        settings: QatSettings,
        step: Callable[[nn.Module, Any], Any] | None,
        on_step: Callable[[int, float], None] | None,
    ) -> None:
        self.teacher = model.eval()
        self.shadow = copy.deepcopy(model).float()
        self.params = dict(self.shadow.named_parameters())
        self.batches, self.settings, self.step, self.on_step = batches, settings, step, on_step
        self.generator = torch.Generator().manual_seed(settings.seed)
        self._shuffle()
        self.losses: list[float] = []

    def _shuffle(self) -> None:
        order = torch.randperm(len(self.batches), generator=self.generator).tolist()
        self.order = itertools.cycle(order)

    def add(self, batches: Sequence[Any]) -> None:
        """More data (a round of recorded states): every batch, in a new order."""
        self.batches = [*self.batches, *batches]
        self._shuffle()

    def student(
        self, sim: nn.Module, stage: QuantConfig, layers: tuple[LayerInfo, ...]
    ) -> _Student:
        """The quantized forward pass of ``stage`` on the shadow's parameters (new learned
        ranges per stage, where asked: the widths change)."""
        names = _param_map(self.shadow, sim)
        quantized = {
            _sim_name(set(names), la): stage.layers[la.name]
            for la in layers
            if stage.layers[la.name].w_bits != KEEP
        }
        ranges = {}
        if self.settings.lsq:
            ranges = {
                s: LsqRange(self.params[names[s]], c)
                for s, c in quantized.items()
                if c.w_bits <= INT_BITS_MAX
            }
        return _Student(sim, names, self.params, quantized, ranges)

    def optimizer(self, student: _Student) -> torch.optim.Optimizer:
        """One stage's Adam: the shadow's parameters and the stage's learned ranges."""
        trainable = list(self.params.values())
        trainable += [p for r in student.ranges.values() for p in r.parameters()]
        return torch.optim.Adam(trainable, lr=self.settings.lr)

    def train(self, student: _Student, opt: torch.optim.Optimizer, steps: int) -> None:
        for _ in range(steps):
            loss = self._loss(student, self.batches[next(self.order)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            self.losses.append(float(loss.detach()))
            if self.on_step is not None:
                self.on_step(len(self.losses), self.losses[-1])

    def _loss(self, student: _Student, batch: Any) -> torch.Tensor:
        """The step's loss, checked: a finite scalar tensor."""
        n = len(self.losses)
        if self.step is not None:
            loss, what = self.step(student, batch), "the training step"
        else:
            with torch.no_grad():
                target = first_tensor(_call(self.teacher, batch)).float()
            kind = self.settings.loss
            loss = distill_loss(first_tensor(_call(student, batch)), target, kind)
            what = f"the {kind} distillation loss"
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"QAT step {n}: {what} returned {type(loss).__name__}, not a scalar tensor"
            )
        if not torch.isfinite(loss):
            raise ValueError(f"QAT step {n}: {what} is {float(loss.detach())} (not finite)")
        return loss


def _bits_summary(config: QuantConfig) -> dict[int, int]:
    """Layers per weight width."""
    out: dict[int, int] = {}
    for c in config.layers.values():
        out[c.w_bits] = out.get(c.w_bits, 0) + 1
    return dict(sorted(out.items()))
