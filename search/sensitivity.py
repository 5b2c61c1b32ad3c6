"""Per-layer sensitivity and the greedy allocations that sensitivity-ordered tools hand a user.

Sensitivity of layer ``l`` at ``b`` bits: the proxy KL (``evaluators.proxy``) of the policy's
action distribution when only ``l`` is quantized to ``b`` bits and every other layer stays
float, over the calibration inputs. It is measured once and cached on disk, keyed by the model,
checkpoint bytes, calibration data and space.

The greedy allocation (HAWQ-V2/V3- and AIMET-AMP-style): start every searched layer at its
highest integer width, then repeatedly lower the layer whose next step down costs the least
sensitivity per byte saved, ``(S_l(b_next) - S_l(b)) / (bytes_l(b) - bytes_l(b_next))``, until
the model fits the size budget.

The ILP allocation (HAWQ-V3- and ModelOpt-AutoQuantize-style): one choice per layer that
minimises the summed sensitivity subject to the size budget, solved exactly::

    minimise    sum_l sum_k S_l(k) x_lk
    subject to  sum_k x_lk = 1                          (one choice per layer)
                sum_l sum_k bytes_l(k) x_lk <= budget - bytes of the layers not searched
                x_lk in {0, 1}

over each layer's integer widths and, where the space offers it, float (``S = 0``): unlike the
greedy walk down from 8 bits it can keep a sensitive small layer in float and pay for it with
a big robust one at 2 bits. ``scipy.optimize.milp`` (HiGHS branch and bound) solves it; a tie
in sensitivity goes to the smaller model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from mpq.evaluators.evaluator import Evaluator
from mpq.evaluators.proxy import output_agreement
from mpq.evaluators.size import config_size, layer_size_bytes
from mpq.files import write_atomic
from mpq.spaces.space import INT_BITS_MAX, LayerChoice, LayerOptions, QuantConfig

Sensitivity = dict[str, dict[int, float]]  # layer -> bits -> KL


def base_choice(options: LayerOptions, w_bits: int) -> LayerChoice:
    """The choice with ``w_bits``, the narrowest activation bits offered (W8A8-style, as the
    sensitivity-ordered tools allocate) and the first option of every other dimension."""
    return options.first(w_bits=w_bits, a_bits=min(options.a_bits))


def _int_bits(options: LayerOptions) -> list[int]:
    return sorted((b for b in options.w_bits if b <= INT_BITS_MAX), reverse=True)


def cache_key(evaluator: Evaluator, resolved: dict[str, LayerOptions]) -> str:
    h = hashlib.sha256()
    h.update(evaluator.spec.model.encode())
    for name, t in evaluator.model.state_dict().items():
        h.update(name.encode())
        h.update(
            t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            if t.numel()
            else b""
        )
    for batch in evaluator.calibration:
        for t in batch if isinstance(batch, tuple | list) else (batch,):
            if isinstance(t, torch.Tensor):
                h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update(
        json.dumps(
            {k: v.model_dump(mode="json") for k, v in resolved.items()}, sort_keys=True
        ).encode()
    )
    h.update(evaluator.spec.observer.encode())
    return h.hexdigest()[:20]


def measure_sensitivity(
    evaluator: Evaluator, resolved: dict[str, LayerOptions], cache_dir: Path | None = None
) -> Sensitivity:
    """KL per searched layer per integer bit-width (see the module docstring); disk-cached."""
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"sensitivity-{cache_key(evaluator, resolved)}.json"
        if path.is_file():
            raw = json.loads(path.read_text())
            return {k: {int(b): float(v) for b, v in d.items()} for k, d in raw.items()}
    keep = QuantConfig.uniform(evaluator.layers, LayerChoice())
    out: Sensitivity = {}
    for name, options in resolved.items():
        if options.is_fixed:
            continue
        out[name] = {}
        for bits in _int_bits(options):
            config = QuantConfig(layers={**keep.layers, name: base_choice(options, bits)})
            qmodel = evaluator.quantized(config)
            proxy = output_agreement(qmodel, evaluator.calibration, evaluator.reference)
            out[name][bits] = proxy["kl"]
    if path is not None:
        write_atomic(path, json.dumps(out, indent=1))
    return out


def greedy_allocation(
    evaluator: Evaluator,
    resolved: dict[str, LayerOptions],
    sensitivity: Sensitivity,
    budget_bytes: int,
) -> QuantConfig:
    """The sensitivity-ordered greedy allocation that fits ``budget_bytes`` (or gets closest)."""
    layers = {la.name: la for la in evaluator.layers}
    bits = {n: (_int_bits(o)[0] if _int_bits(o) else max(o.w_bits)) for n, o in resolved.items()}

    def config() -> QuantConfig:
        return QuantConfig(layers={n: base_choice(resolved[n], b) for n, b in bits.items()})

    size = config_size(evaluator.model, evaluator.layers, config()).total_bytes
    units = fused_units(resolved, sensitivity)
    while size > budget_bytes:
        best: tuple[float, str, int] | None = None
        for lead, members in units.items():
            lower = [b for b in _int_bits(resolved[lead]) if b < bits[lead]]
            if not lower:
                continue
            nxt, now = lower[0], bits[lead]
            saved = sum(
                layer_size_bytes(layers[m], base_choice(resolved[m], now))
                - layer_size_bytes(layers[m], base_choice(resolved[m], nxt))
                for m in members
            )
            more_kl = sum(sensitivity[m][nxt] - sensitivity[m].get(now, 0.0) for m in members)
            cost = more_kl / max(saved, 1)
            if best is None or cost < best[0]:
                best = (cost, lead, nxt)
        if best is None:
            break
        for m in units[best[1]]:
            bits[m] = best[2]
        size = config_size(evaluator.model, evaluator.layers, config()).total_bytes
    return config()


def fused_units(
    resolved: dict[str, LayerOptions], sensitivity: Sensitivity
) -> dict[str, list[str]]:
    """The allocators' decisions: each measured layer alone, or a fused group (the space's
    ``groups``) as one, keyed by its first layer; a group's sensitivity is its layers' sum."""
    units: dict[str, list[str]] = {}
    for name in sensitivity:
        units.setdefault(resolved[name].fused_with or name, []).append(name)
    return units


def ilp_allocation(
    evaluator: Evaluator,
    resolved: dict[str, LayerOptions],
    sensitivity: Sensitivity,
    budget_bytes: int,
) -> QuantConfig:
    """The allocation of least summed sensitivity that fits ``budget_bytes`` (see the module
    docstring); where nothing fits, the smallest allocation (as the greedy one gets closest)."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    layers = {la.name: la for la in evaluator.layers}
    fixed = {n: o.first() for n, o in resolved.items() if n not in sensitivity}
    units = fused_units(resolved, sensitivity)
    summed = {  # a fused group: one decision whose sensitivity is its layers' sum
        lead: {b: sum(sensitivity[m][b] for m in members) for b in sensitivity[lead]}
        for lead, members in units.items()
    }
    options = {n: _ilp_options(resolved[n], summed[n]) for n in units}

    def unit_bytes(lead: str, choice: LayerChoice) -> int:
        return sum(layer_size_bytes(layers[m], choice) for m in units[lead])

    columns = [(n, c, kl) for n, opts in options.items() for c, kl in opts]
    sizes = np.array([unit_bytes(n, c) for n, c, _ in columns], float)
    first = {m: opts[0][0] for n, opts in options.items() for m in units[n]}
    base = QuantConfig(layers={**fixed, **first})
    searched_base = sum(unit_bytes(n, opts[0][0]) for n, opts in options.items())
    other = config_size(evaluator.model, evaluator.layers, base).total_bytes - searched_base
    # KL spans orders of magnitude (1e-8 at 8 bits to 1e-1 at 2): scaled so the smallest
    # positive cost is 1, the solver's absolute gap (1e-6) cannot pass a worse allocation off
    cost = np.array([kl for _, _, kl in columns], float)
    positive = cost[cost > 0]
    # floored at 1e-9 of the largest: a KL of float noise (1e-15) would span 1e14 otherwise
    scale = max(positive.min(), positive.max() * 1e-9) if positive.size else 1.0
    cost = np.where(cost > 0, np.maximum(cost / scale, 1.0), 0.0)
    tie = 1e-6 / max(float(sizes.sum()), 1.0)  # below any difference in sensitivity
    one = np.array([[1.0 if col[0] == n else 0.0 for col in columns] for n in options])
    result = milp(
        cost + tie * sizes,
        options={"mip_rel_gap": 0.0},
        constraints=[
            LinearConstraint(one, 1, 1),
            LinearConstraint(sizes[None, :], -np.inf, budget_bytes - other),
        ],
        integrality=np.ones(len(columns)),
        bounds=Bounds(0, 1),
    )
    if result.status != 0 or result.x is None:  # nothing fits: the smallest allocation
        pick = {n: min(opts, key=lambda o: unit_bytes(n, o[0]))[0] for n, opts in options.items()}
    else:
        pick = {n: c for (n, c, _), x in zip(columns, result.x, strict=True) if x > 0.5}
    return QuantConfig(layers={**fixed, **{m: pick[n] for n in units for m in units[n]}})


def _ilp_options(options: LayerOptions, s: dict[int, float]) -> list[tuple[LayerChoice, float]]:
    """A layer's choices for the ILP with their sensitivity: each integer width measured, and
    float (sensitivity 0) where the space offers it."""
    out = [(base_choice(options, b), s[b]) for b in _int_bits(options) if b in s]
    if any(b > INT_BITS_MAX for b in options.w_bits):
        out.append((base_choice(options, max(options.w_bits)), 0.0))
    return out


ALLOCATORS = {"greedy": greedy_allocation, "ilp": ilp_allocation}


def check_allocation(method: str, fraction: float) -> None:
    """Raises ValueError, one line, for an unknown method or a fraction outside (0, 1]."""
    if method not in ALLOCATORS:
        raise ValueError(f"allocation method {method!r} not in {sorted(ALLOCATORS)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"budget {fraction} must be a fraction of the 8-bit size in (0, 1]")


def allocation_at(
    evaluator: Evaluator,
    resolved: dict[str, LayerOptions],
    sensitivity: Sensitivity,
    method: str,
    fraction: float,
) -> QuantConfig:
    """``method``'s allocation (``ALLOCATORS``) within ``fraction`` of the uniform 8-bit size.

    Raises:
        ValueError: an unknown method or a fraction outside (0, 1].
    """
    check_allocation(method, fraction)
    uniform8 = uniform_config(resolved, 8)
    size8 = config_size(evaluator.model, evaluator.layers, uniform8).total_bytes
    return ALLOCATORS[method](evaluator, resolved, sensitivity, int(size8 * fraction))


def summed_sensitivity(sensitivity: Sensitivity, config: QuantConfig) -> float:
    """What the allocators minimise: the layers' sensitivities at their widths summed."""
    return sum(
        s.get(config.layers[name].w_bits, 0.0)
        for name, s in sensitivity.items()
        if name in config.layers
    )


def uniform_config(resolved: dict[str, LayerOptions], w_bits: int) -> QuantConfig:
    """Every searched layer at ``w_bits`` where its options allow, else its nearest option."""
    out = {}
    for name, options in resolved.items():
        nearest = min(options.w_bits, key=lambda b: (abs(b - w_bits), -b))
        out[name] = base_choice(options, nearest)
    return QuantConfig(layers=out)
