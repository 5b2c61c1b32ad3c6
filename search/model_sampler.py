"""mpq's own proposal strategy (``sampler: mpq``): predict every candidate's objectives, run
the one whose predicted point adds the most hypervolume to the measured front.

Before anything runs, three models predict a configuration ``c`` of the space, fitted on the
study's measured trials each time a trial is proposed (the study is the only state: resumable,
and the same in every process):

    size_bytes(c)  = F(c) + o                    F(c): the packing formula of the choices as
                                                 they run (``r(c)``, the backend's plan: 3 bits
                                                 run as 4 on ``MatMulNBits``, so they cost the
                                                 same bytes; ``evaluators.size``); o: the
                                                 median over the trials of their deployable
                                                 bytes beyond F (graph, names, scales)
    log latency(c) = w0 + w1 * f(c) + sum_l v_l * f_l(c)
                                                 f_l: layer l's bytes over its float bytes, f
                                                 their mean; ridge regression on the measured
                                                 trials and the float reference (strong on the
                                                 per-layer v_l, so few trials give the
                                                 bytes-proportional model)
    success(c)     = s_float - k * sum_l S_l(b_l) - u . x(c)
                                                 S_l(b): the per-layer sensitivity measured
                                                 before the search (KL of the action
                                                 distribution, at the bits that run); k >= 0 by
                                                 least squares on the trials' success drops
                                                 (screened ones too; each weighted by 1 /
                                                 width^2 of its success interval);
                                                 u: ridge regression of what is left on x(c),
                                                 the one-hot choices, its strength by
                                                 leave-one-out error (none when none helps);
                                                 sigma: that leave-one-out error

The candidates: random configurations of the space and neighbours of the front (one to three
layers moved one option along an ordered dimension), never one that runs as a configuration
already asked (an asked 3-bit layer that runs as 4 bits is the 4-bit trial again). Each is scored
by the hypervolume improvement (``search.pareto``'s normalisation and reference, Optuna's
hypervolume) of its predicted point, success taken optimistically at ``+ sigma / 2`` and
required to meet ``constraints.max_success_drop``, over the measured front plus the predicted
points of the trials still running (so parallel workers get different proposals). (The
expectation over ``N(predicted, sigma)`` instead measured worse on the exhaustive benchmark:
README.) With the QAT stage on (``qat.when: infeasible``), a candidate whose optimistic
success misses the constraint is judged on its success after fine-tuning instead
(``QatPlan``: the share of the drop the study's QAT stages won back), its gain divided by what
a fine-tuned trial costs in wall time over a post-training one. Each proposal records its
prediction (system attribute ``mpq:predicted``; ``ptq_success`` too where it plans on a QAT
stage) for the predicted vs measured comparison. With fewer than two measured trials, or
unbound (no model in this process), it samples at random.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from mpq.search.pareto import REFERENCE, _compute_hypervolume, feasible_complete
from mpq.search.record import PREDICTED, StudyAttr, TrialAttr
from mpq.search.study import config_from_params, distributions, params_from_config
from mpq.spaces.space import LayerChoice, LayerOptions, QuantConfig

__all__ = ["PREDICTED", "ModelBasedSampler", "QatPlan"]
RIDGE_GRID = (0.1, 1.0, 10.0, 100.0)  # the residual model's ridge strengths (by LOO error)
QAT_PRIOR_RECOVERED = 0.5  # the share of a PTQ drop a QAT stage is taken to win back at first
QAT_PRIOR_COST = 2.0  # a fine-tuned trial's wall time over a post-training one's, at first


class ModelBasedSampler(optuna.samplers.BaseSampler):
    """See the module docstring. ``bind`` gives it the space and the size formula;
    ``residual=False``: the success model without its ridge correction (sensitivity only, as
    measured against it in the README); ``qat=True``: the search fine-tunes the trials that
    miss the success constraint (``qat.when: infeasible``), so candidates only fine-tuning
    could make feasible are proposed too, at their cost (``QatPlan``)."""

    def __init__(
        self,
        seed: int = 0,
        max_success_drop: float | None = None,
        candidates: int = 600,
        max_size_bytes: int | None = None,
        max_latency_ms: float | None = None,
        residual: bool = True,
        qat: bool = False,
    ) -> None:
        self._residual = residual
        self._qat = qat
        self._rng = np.random.default_rng(seed)
        self._random = optuna.samplers.RandomSampler(seed=seed)
        self._max_drop = max_success_drop
        self._limits = {"size_bytes": max_size_bytes, "latency_ms": max_latency_ms}
        self._n = candidates
        self._resolved: dict[str, LayerOptions] | None = None
        self._bytes: Callable[[QuantConfig], dict[str, int]] | None = None
        self._as_ran: Callable[[QuantConfig], QuantConfig] = lambda c: c
        self._ran_cache: dict[str, QuantConfig] = {}
        self._dists: dict[str, BaseDistribution] = {}

    def bind(
        self,
        resolved: dict[str, LayerOptions],
        layer_bytes: Callable[[QuantConfig], dict[str, int]],
        as_ran: Callable[[QuantConfig], QuantConfig] | None = None,
    ) -> None:
        """The space, ``layer_bytes(config)`` (the packing formula per layer, with ``"other"``
        for the bytes outside the searched layers) and ``as_ran(config)`` (what the backend's
        plan runs for it; default: as asked)."""
        self._resolved = resolved
        self._bytes = layer_bytes
        self._as_ran = as_ran or (lambda c: c)
        self._ran_cache = {}
        self._dists = distributions(resolved)

    # -- Optuna's sampler interface --------------------------------------------------------
    def reseed_rng(self) -> None:
        self._random.reseed_rng()

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return dict(self._dists)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        if not search_space or self._resolved is None or "fixed_params" in trial.system_attrs:
            return {}
        measured = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(measured) < 2 or StudyAttr.FLOAT_REFERENCE not in study.user_attrs:
            return {}
        best = self._propose(study, trial)
        if best is None:
            return {}
        config, predicted = best
        objectives = study.user_attrs.get(StudyAttr.OBJECTIVES, [])
        kept = (
            [*objectives, "success", "ptq_success"] if "ptq_success" in predicted else objectives
        )
        recorded = {k: v for k, v in predicted.items() if k in kept}
        study._storage.set_trial_system_attr(trial._trial_id, PREDICTED, recorded)
        return params_from_config(self._resolved, config)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._random.sample_independent(study, trial, param_name, param_distribution)

    # -- the model -------------------------------------------------------------------------
    def _propose(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> tuple[QuantConfig, dict[str, float]] | None:
        assert self._resolved is not None
        self._ran_cache = {}  # per proposal: the candidates change every time
        objectives = list(study.user_attrs.get(StudyAttr.OBJECTIVES, []))
        ref = study.user_attrs[StudyAttr.FLOAT_REFERENCE]
        sens = {
            name: {int(b): float(v) for b, v in per.items()}
            for name, per in study.user_attrs.get(StudyAttr.SENSITIVITY, {}).items()
        }
        trials = study.get_trials(deepcopy=False)
        asked = {
            self.ran(QuantConfig.model_validate(t.user_attrs[TrialAttr.CONFIG])).key()
            for t in trials
            if TrialAttr.CONFIG in t.user_attrs
        }
        asked |= {  # running trials whose configuration is not recorded yet
            self.ran(config_from_params(self._resolved, t.params)).key()
            for t in trials
            if t.state == TrialState.RUNNING and t.params and t.number != trial.number
        }
        done = [
            t
            for t in trials
            if t.state == TrialState.COMPLETE
            and t.values is not None
            and TrialAttr.CONFIG in t.user_attrs
        ]
        screened = [  # pruned after screening: their success on fewer episodes still counts
            t for t in trials if t.state == TrialState.PRUNED and TrialAttr.CONFIG in t.user_attrs
        ]
        model = _Model(self, objectives, ref, sens, done, screened, residual=self._residual)
        pool = self._candidates(study, asked)
        if not pool:
            return None
        front = [model.losses_of_trial(t) for t in feasible_complete(done)]
        front += [
            model.losses(self._running_point(model, t))
            for t in trials
            if t.state == TrialState.RUNNING and t.number != trial.number and t.params
        ]
        reference = np.asarray(
            [-REFERENCE[o] if o == "success" else REFERENCE[o] for o in objectives]
        )
        base = _hv(front, reference)
        s_float = float(ref.get("success", 1.0))
        plan = QatPlan.of(trials, s_float) if self._qat else None
        best, best_gain = None, -1.0
        for config in pool:
            predicted = model.predict(config)
            optimistic = dict(predicted)
            optimistic["success"] = min(s_float, predicted["success"] + model.sigma / 2)
            cost = 1.0
            if not self._may_be_feasible(optimistic, s_float):
                if plan is None:
                    continue
                # only a QAT stage could make it feasible: judged on its figures after one,
                # its gain per unit of time (a fine-tuned trial costs plan.cost_ratio trials)
                optimistic["success"] = plan.after(optimistic["success"], s_float)
                if not self._may_be_feasible(optimistic, s_float):
                    continue
                ptq = predicted["success"]
                predicted = {**predicted, "success": plan.after(ptq, s_float), "ptq_success": ptq}
                cost = plan.cost_ratio
            gain = _hv([*front, model.losses(optimistic)], reference) - base
            if cost > 1.0 and gain <= 0.0:
                continue  # a fine-tuning that adds nothing is never worth its time
            gain = gain / cost + 1e-9 * self._rng.random()  # ties broken at random
            if gain > best_gain:
                best, best_gain = (config, predicted), gain
        return best

    def _running_point(self, model: _Model, t: FrozenTrial) -> dict[str, float]:
        """A running trial's predicted figures; its success as recorded where its proposal
        planned on a QAT stage (the success after it)."""
        assert self._resolved is not None
        point = model.predict(config_from_params(self._resolved, t.params))
        recorded = t.system_attrs.get(PREDICTED) or {}
        if "ptq_success" in recorded and "success" in recorded:
            point["success"] = float(recorded["success"])
        return point

    def _may_be_feasible(self, predicted: dict[str, float], float_success: float) -> bool:
        """The config's constraints, on the (optimistic) prediction."""
        drop = self._max_drop
        if drop is not None and predicted.get("success", float_success) < float_success - drop:
            return False
        return all(
            limit is None or predicted.get(key, 0.0) <= limit
            for key, limit in self._limits.items()
        )

    def _candidates(self, study: optuna.Study, asked: set[Any]) -> list[QuantConfig]:
        """Random configurations and neighbours of the measured front, none asked before."""
        assert self._resolved is not None
        out: dict[str, QuantConfig] = {}
        names = list(self._dists)
        for _ in range(self._n):
            params = {n: _draw(self._dists[n], self._rng) for n in names}
            c = config_from_params(self._resolved, params)
            out.setdefault(c.key(), c)
        front = study.best_trials if len(study.directions) > 1 else []
        for t in front:
            for _ in range(self._n // max(len(front), 1)):
                params = dict(t.params)
                for n in self._rng.choice(
                    names, size=min(len(names), 1 + int(self._rng.integers(3))), replace=False
                ):
                    params[n] = _step(self._dists[n], params.get(n), self._rng)
                c = config_from_params(self._resolved, params)
                out.setdefault(c.key(), c)
        return [c for c in out.values() if self.ran(c).key() not in asked]

    def ran(self, config: QuantConfig) -> QuantConfig:
        """``config`` as the backend's plan runs it (cached per configuration)."""
        key = config.key()
        if key not in self._ran_cache:
            self._ran_cache[key] = self._as_ran(config)
        return self._ran_cache[key]


class _Model:
    """The three predictors of one proposal, fitted on the measured trials."""

    def __init__(
        self,
        sampler: ModelBasedSampler,
        objectives: list[str],
        ref: dict[str, Any],
        sens: dict[str, dict[int, float]],
        done: list[FrozenTrial],
        screened: Sequence[FrozenTrial] = (),
        residual: bool = True,
    ) -> None:
        assert sampler._resolved is not None and sampler._bytes is not None
        self._residual = residual
        self.objectives = objectives
        self.ref = ref
        self.sens = sens
        self._bytes = sampler._bytes
        self._ran = sampler.ran
        resolved = self._resolved = sampler._resolved
        self._names = [n for n in resolved if not resolved[n].is_fixed]
        self._slots = {  # one-hot slots of the searched parameters' values
            (name, v): i
            for i, (name, v) in enumerate(
                (name, v) for name, d in sampler._dists.items() for v in _values(d)
            )
        }
        self._float_bytes = self._bytes(QuantConfig(layers={n: LayerChoice() for n in resolved}))
        configs = [QuantConfig.model_validate(t.user_attrs[TrialAttr.CONFIG]) for t in done]
        values = [dict(zip(objectives, t.values or [], strict=True)) for t in done]
        self._fit_size(configs, values)
        self._fit_latency(configs, values)
        screen_configs = [
            QuantConfig.model_validate(t.user_attrs[TrialAttr.CONFIG]) for t in screened
        ]
        measured = [
            (c, *_ptq_success(t, v.get("success")))
            for c, t, v in zip(configs, done, values, strict=True)
        ]
        measured += [(c, *_ptq_success(t)) for c, t in zip(screen_configs, screened, strict=True)]
        measured = [m for m in measured if m[1] is not None]
        self._fit_success(
            [m[0] for m in measured], [m[1] for m in measured], [m[2] for m in measured]
        )

    # features
    def _fractions(self, config: QuantConfig) -> tuple[float, np.ndarray, int]:
        per = self._bytes(self._ran(config))
        f = np.asarray([per[n] / max(self._float_bytes[n], 1) for n in self._names], float)
        return float(f.mean()) if f.size else 1.0, f, int(sum(per.values()))

    def _kl(self, config: QuantConfig) -> float:
        config = self._ran(config)
        return sum(
            s.get(config.layers[n].w_bits, 0.0) for n, s in self.sens.items() if n in config.layers
        )

    # fits
    def _fit_size(self, configs: list[QuantConfig], values: list[dict[str, float]]) -> None:
        """The file's bytes beyond the formula (graph, names, scales): their median over the
        trials (a fitted slope extrapolated below zero from three close points)."""
        over = [
            v["size_bytes"] - self._fractions(c)[2]
            for c, v in zip(configs, values, strict=True)
            if "size_bytes" in v
        ]
        self.size_over = float(np.median(over)) if over else 0.0

    def _fit_latency(self, configs: list[QuantConfig], values: list[dict[str, float]]) -> None:
        self.lat_w: np.ndarray | None = None
        if "latency_ms" not in self.objectives:
            return
        rows, ys = [], []
        float_ms = self.ref.get("latency_ms")
        if float_ms:
            rows.append(np.concatenate([[1.0, 1.0], np.ones(len(self._names))]))
            ys.append(math.log(float(float_ms)))
        for c, v in zip(configs, values, strict=True):
            if v.get("latency_ms"):
                mean, f, _ = self._fractions(c)
                rows.append(np.concatenate([[1.0, mean], f]))
                ys.append(math.log(v["latency_ms"]))
        if len(rows) < 2:
            return
        x, y = np.asarray(rows), np.asarray(ys)
        penalty = np.diag([0.0, 1e-3, *([1.0] * len(self._names))])
        self.lat_w = np.linalg.solve(x.T @ x + penalty, x.T @ y)

    def _features(self, config: QuantConfig) -> np.ndarray:
        """One-hot of each searched parameter's value in ``config`` (none for a configuration
        outside the space: a seed of an older space)."""
        x = np.zeros(len(self._slots))
        try:
            params = params_from_config(self._resolved, config)
        except (ValueError, KeyError):
            return x
        for name, value in params.items():
            i = self._slots.get((name, value))
            if i is not None:
                x[i] = 1.0
        return x

    def _fit_success(
        self, configs: list[QuantConfig], successes: list[float], weights: list[float]
    ) -> None:
        """``drop = k * KL + u . x``, each trial weighted by the inverse square of its success
        interval's width (about its episodes: a screened one's success is noisier). ``k >= 0``
        by least squares on the sensitivity's KL; then the residuals by ridge regression on
        the one-hot choices ``x`` (what the sensitivity misses: an activation width, a block
        size, layers that interact), its strength chosen by leave-one-out error from
        ``RIDGE_GRID``, or none where no strength beats no correction; ``sigma`` is that
        leave-one-out error, so the spread the acquisition uses is out of sample."""
        s_float = float(self.ref.get("success", 1.0))
        kl = np.asarray([self._kl(c) for c in configs], float)
        drop = np.asarray([max(0.0, s_float - v) for v in successes], float)
        w = np.asarray(weights, float) / max(weights, default=1.0)
        wkl = w * kl
        self.k = float(max(0.0, (wkl @ drop) / (wkl @ kl))) if kl.size and wkl @ kl > 0 else 0.0
        resid = drop - self.k * kl
        self.u: np.ndarray | None = None
        if not resid.size:
            self.sigma = 0.05
            return
        best = float(np.sqrt(np.average(resid**2, weights=w)))  # no correction: nothing left out
        if self._residual and len(resid) >= 3:
            root = np.sqrt(w)[:, None]
            x = np.stack([self._features(c) for c in configs]) * root  # weighted rows
            r = resid * root[:, 0]
            for lam in RIDGE_GRID:
                u, loo = ridge_loo(x, r, lam)
                err = float(np.sqrt(np.sum(loo**2) / np.sum(w)))
                if err < best:
                    best, self.u = err, u
        self.sigma = float(max(0.01, best))

    # predictions
    def predict(self, config: QuantConfig) -> dict[str, float]:
        mean, f, formula = self._fractions(config)
        out = {"size_bytes": max(1.0, formula + self.size_over)}
        s_float = float(self.ref.get("success", 1.0))
        drop = self.k * self._kl(config)
        if self.u is not None:
            drop += float(self.u @ self._features(config))
        out["success"] = min(s_float, max(0.0, s_float - drop))  # a correction may be < 0
        if self.lat_w is not None:
            out["latency_ms"] = float(math.exp(self.lat_w @ np.concatenate([[1.0, mean], f])))
        elif "latency_ms" in self.objectives:
            out["latency_ms"] = float(self.ref.get("latency_ms") or 1.0)
        return out  # every figure: constraints may be on one that is no objective

    def losses(self, values: dict[str, float]) -> list[float]:
        """``search.pareto``'s normalised losses of one point."""
        return [
            -values[o] if o == "success" else values[o] / float(self.ref.get(o) or 1.0)
            for o in self.objectives
        ]

    def losses_of_trial(self, t: FrozenTrial) -> list[float]:
        return self.losses(dict(zip(self.objectives, t.values or [], strict=True)))


@dataclass(frozen=True)
class QatPlan:
    """What a QAT stage is worth to the search, from the study's fine-tuned trials:

        success after QAT = s_ptq + recovered * (s_float - s_ptq)

    ``recovered``: the mean share of the PTQ drop the study's QAT stages won back (each
    ``(s_qat - s_ptq) / (s_float - s_ptq)`` clipped to [0, 1]; a failed stage: 0), with
    ``QAT_PRIOR_RECOVERED`` counted as one more stage; ``cost_ratio``: the median wall time of
    a fine-tuned trial over that of a complete post-training one (``QAT_PRIOR_COST`` until both
    are timed; at least 1), by which a fine-tuning candidate's hypervolume gain is divided:
    the search compares gains per unit of time. Duplicates (answered from an earlier trial)
    count for neither. (A trial sent to QAT straight from screening was picked for its low
    screened success, so its share leans high: regression to the mean, left uncorrected.)"""

    recovered: float = QAT_PRIOR_RECOVERED
    cost_ratio: float = QAT_PRIOR_COST

    def after(self, ptq_success: float, float_success: float) -> float:
        return ptq_success + self.recovered * max(0.0, float_success - ptq_success)

    @classmethod
    def of(cls, trials: Sequence[FrozenTrial], float_success: float) -> QatPlan:
        shares, qat_seconds, ptq_seconds = [QAT_PRIOR_RECOVERED], [], []
        for t in trials:
            if t.state not in (TrialState.COMPLETE, TrialState.PRUNED):
                continue
            if TrialAttr.DUPLICATE_OF in t.user_attrs:  # answered from another: no time spent
                continue
            qat = t.user_attrs.get(TrialAttr.QAT) or {}
            seconds = t.duration.total_seconds() if t.duration is not None else None
            if qat.get("failed"):
                shares.append(0.0)
            elif qat.get("steps"):
                before, after = qat.get("ptq_success"), t.user_attrs.get("success")
                if _finite(before) and _finite(after) and float_success > before:
                    shares.append(min(1.0, max(0.0, (after - before) / (float_success - before))))
            elif t.state == TrialState.COMPLETE and seconds is not None:
                ptq_seconds.append(seconds)
                continue
            if qat and seconds is not None:
                qat_seconds.append(seconds)
        cost = QAT_PRIOR_COST
        if qat_seconds and ptq_seconds and np.median(ptq_seconds) > 0:
            cost = max(1.0, float(np.median(qat_seconds) / np.median(ptq_seconds)))
        return cls(float(np.mean(shares)), cost)


def _finite(v: Any) -> bool:
    """A recorded figure that is a finite number (not None, NaN or a string)."""
    return isinstance(v, (int, float)) and math.isfinite(v)


def _hv(points: list[list[float]], reference: np.ndarray) -> float:
    inside = [p for p in points if all(a < b for a, b in zip(p, reference, strict=True))]
    if not inside:
        return 0.0
    return _compute_hypervolume(np.asarray(inside, float), reference)


def _draw(dist: BaseDistribution, rng: np.random.Generator) -> Any:
    if isinstance(dist, optuna.distributions.IntDistribution):
        return int(rng.integers(dist.low, dist.high + 1))
    assert isinstance(dist, optuna.distributions.CategoricalDistribution)
    return dist.choices[int(rng.integers(len(dist.choices)))]


def ridge_loo(x: np.ndarray, r: np.ndarray, lam: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge regression ``u = (X'X + lam I)^-1 X'r`` and its leave-one-out residuals, exact
    without refitting: ``(r_i - x_i u) / (1 - h_ii)``, ``h_ii`` the hat matrix's diagonal."""
    inv = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    u = inv @ x.T @ r
    hat = np.einsum("ij,jk,ik->i", x, inv, x)
    return u, (r - x @ u) / np.clip(1.0 - hat, 1e-9, None)


def _ptq_success(t: FrozenTrial, objective: float | None = None) -> tuple[float | None, float]:
    """The success post-training quantization reached (what the model predicts; after a QAT
    stage, the one recorded before it; else the trial's own, or its ``objective`` value) and
    its weight, ``1 / width^2`` of its interval (1 without one); None where there is no
    finite success."""
    a = t.user_attrs
    qat = a.get(TrialAttr.QAT) or {}
    key = "ptq_success" if qat.get("steps") else "success"
    src = qat if qat.get("steps") else a
    success = src.get(key, objective)
    if not _finite(success):
        return None, 0.0
    lo, hi = src.get(f"{key}_lo"), src.get(f"{key}_hi")
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and hi > lo:
        return float(success), 1.0 / (hi - lo) ** 2
    return float(success), 1.0


def _values(dist: BaseDistribution) -> list[Any]:
    if isinstance(dist, optuna.distributions.IntDistribution):
        return list(range(dist.low, dist.high + 1, dist.step))
    assert isinstance(dist, optuna.distributions.CategoricalDistribution)
    return list(dist.choices)


def _step(dist: BaseDistribution, value: Any, rng: np.random.Generator) -> Any:
    """One option along an ordered dimension, or another category."""
    if isinstance(dist, optuna.distributions.IntDistribution):
        v = int(value if value is not None else dist.low) + int(rng.choice([-1, 1]))
        return min(dist.high, max(dist.low, v))
    return _draw(dist, rng)
