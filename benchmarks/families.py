"""Model families users have, per backend: what the space covers, what lowers, how exactly, and
whether low bits pay at batch 1.

    python benchmarks/families.py [--size bench|test] [--families gpt2 bert vit cnn]
        [--backends onnxruntime torch] [--visits 6] [--runs 100]

Families (``mpq.zoo.families``, built from configs, no download): GPT-2, BERT and ViT
(``transformers``), a CNN in torchvision's styles (BatchNorm folded first). At ``--size bench``:
width 192 (ViT-tiny's), 4 layers, 32 tokens / 32x32 images, the CNN at 64x64.

Per family: parameters covered by the space (share of all), then per configuration and backend:

- layers on a low-bit kernel, left float (with why, counted), and "not found in the export";
- max |lowered - simulated| over the simulated model of what ran, as a share of the output's
  scale (max |output|), on the example input: the contract holds at <= 2e-3 on ONNX Runtime;
- stored bytes of what ships / the backend's packing formula (they must agree);
- speed-up against the family's float model at batch 1, by the latency protocol (fresh
  sessions visited in pairs, 95% interval): a CPU backend against ONNX Runtime's float model
  on one thread, a CUDA backend against its own float32 model on the same GPU.

Configurations: uniform W8A8, uniform W4A8 (blocks of 32 where they divide; convolutions static
int8, embeddings weight-only), and the contract's mixed one (linears in turn 4-bit blocks with
int8 inputs, 8-bit, 2-bit weight-only, float; convolutions static int8; 4-bit embeddings).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from mpq.evaluators.apply import apply_config
from mpq.evaluators.backends import get_backend
from mpq.evaluators.inputs import call
from mpq.evaluators.latency import cpu_model, kernel_versions, paired_speedup
from mpq.evaluators.proxy import first_tensor
from mpq.spaces.discover import coverage, discover_layers
from mpq.spaces.space import KEEP, LayerChoice, QuantConfig
from mpq.zoo import families


def _error(model: torch.nn.Module, lowered: Any, example: dict, calibration: list) -> float:
    """max |lowered - simulated| / max |simulated| on the example input."""
    simulated = apply_config(model, lowered.ran_config, calibration)
    with torch.no_grad():
        want = first_tensor(call(simulated, example)).float().numpy()
        out = lowered.run()
    got = out[0] if isinstance(out, list) else first_tensor(out).float().cpu().numpy()
    return float(np.abs(np.asarray(got) - want).max() / max(np.abs(want).max(), 1e-12))


def _kernels(lowered: Any) -> tuple[int, int, int]:
    """(layers on a low-bit kernel, layers left float, of which "not found")."""
    floats = [k for k, v in lowered.kernels.items() if "float32" in v or "bfloat16" in v]
    found = [k for k in floats if "not found" in lowered.fallbacks.get(k, "")]
    return len(lowered.kernels) - len(floats), len(floats), len(found)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(families.SIZES), default="bench")
    p.add_argument("--families", nargs="*", default=list(families.FAMILIES))
    p.add_argument("--backends", nargs="*", default=["onnxruntime", "torch"])
    p.add_argument("--visits", type=int, default=6)
    p.add_argument("--runs", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {cpu_model()}; {kernel_versions()}; 1 thread, batch 1, size {args.size}\n")
    print(
        "| family | params (covered) | config | backend | low-bit / float layers (not found) "
        "| max error | stored / formula bytes | speed-up vs float (95%) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for family in args.families:
        model, example, calibration = families.build(family, args.size)
        layers = discover_layers(model)
        cov = coverage(model, layers)
        params = f"{cov.total_params:,} ({cov.covered_params / cov.total_params:.1%})"
        keep = QuantConfig.uniform(layers, LayerChoice(w_bits=KEEP))
        floats = {"cpu": get_backend("onnxruntime").lower(model, layers, keep, example, 1)}
        configs = {
            "W8A8": families.uniform(layers, 8),
            "W4A8": families.uniform(layers, 4),
            "mixed": families.mixed(layers),
        }
        for label, config in configs.items():
            for backend in args.backends:
                try:
                    lowered = get_backend(backend).lower(
                        model, layers, config, example, 1, calibration=calibration
                    )
                    err = _error(model, lowered, example, calibration)
                    device = "cuda" if "cuda" in backend else "cpu"
                    if device not in floats:
                        floats[device] = get_backend(backend).lower(
                            model, layers, keep, example, 1
                        )
                    speed = paired_speedup(
                        floats[device].new_runner, lowered.new_runner, args.visits, args.runs
                    )
                except Exception as exc:  # a row that failed says so; the others still run
                    print(f"| {family} | {params} | {label} | {backend} | failed: {exc!s:.160} |")
                    continue
                low, flt, missing = _kernels(lowered)
                print(
                    f"| {family} | {params} | {label} | {backend} | {low} / {flt} ({missing}) | "
                    f"{err:.1e} | {lowered.stored_bytes:,} / {lowered.predicted_bytes:,} | "
                    f"{speed.speedup:.2f}x [{speed.speedup_lo:.2f}, {speed.speedup_hi:.2f}] |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
