"""Per-layer sensitivity and the greedy allocations that sensitivity-ordered tools hand a user.

Sensitivity of layer ``l`` at ``b`` bits: the proxy KL (``evaluators.proxy``) of the policy's
action distribution when only ``l`` is quantized to ``b`` bits and every other layer stays
float, over the calibration inputs. It is measured once and cached on disk, keyed by the model,
checkpoint bytes, calibration data and space.

The greedy allocation (HAWQ-V2/V3- and AIMET-AMP-style): start every searched layer at its
highest integer width, then repeatedly lower the layer whose next step down costs the least
sensitivity per byte saved, ``(S_l(b_next) - S_l(b)) / (bytes_l(b) - bytes_l(b_next))``, until
the model fits the size budget.
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
    while size > budget_bytes:
        best: tuple[float, str, int] | None = None
        for name, s in sensitivity.items():
            lower = [b for b in _int_bits(resolved[name]) if b < bits[name]]
            if not lower:
                continue
            nxt = lower[0]
            la, opts = layers[name], resolved[name]
            saved = layer_size_bytes(la, base_choice(opts, bits[name])) - layer_size_bytes(
                la, base_choice(opts, nxt)
            )
            cost = (s[nxt] - s.get(bits[name], 0.0)) / max(saved, 1)
            if best is None or cost < best[0]:
                best = (cost, name, nxt)
        if best is None:
            break
        bits[best[1]] = best[2]
        size = config_size(evaluator.model, evaluator.layers, config()).total_bytes
    return config()


def uniform_config(resolved: dict[str, LayerOptions], w_bits: int) -> QuantConfig:
    """Every searched layer at ``w_bits`` where its options allow, else its nearest option."""
    out = {}
    for name, options in resolved.items():
        nearest = min(options.w_bits, key=lambda b: (abs(b - w_bits), -b))
        out[name] = base_choice(options, nearest)
    return QuantConfig(layers=out)
