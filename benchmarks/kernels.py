"""Latency of real kernels at batch 1 against float, and stored bytes against predicted bytes.

    python benchmarks/kernels.py [--threads 1] [--runs 200] [--batch 1] [--models mlp-4x1024 ...]
        [--configs W8A8 W4 ...]
        [--backends onnxruntime torch torch-eager]
    python benchmarks/kernels.py --device cuda    # torch-cuda and torch-cuda-fp8 on the GPU

Models: a 4-layer MLP (1024 wide), a ~10M-parameter stack of transformer blocks, a small
convolutional image encoder (4 Conv2d, 96x96 input) and the two shipped BabyAI policies.
Configurations: uniform W8A8, W4A8, W8 and W4 (float activations), W2A8 and a mixed one (first
half of the layers 8-bit, second half 4-bit). Speed-up is against torch eager float and against
ONNX Runtime float (both reported); the float model compiled by the ``torch`` backend is a row of
its own. With ``--device cuda`` the baseline is torch eager float on the GPU and ORT (a CPU
runtime here) is left out. "bytes" is evaluators.size's prediction for the configuration;
"packed" the byte count of the artifact mpq packs (they must agree); "stored / formula" the
bytes of the weights the lowered model really holds for what ran (e.g. 3 -> 4 bits, block
padding, int8 zero points) and the backend's packing formula for it (they must agree too).
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
from torch import nn

from mpq.evaluators.artifact import pack_state, payload_bytes
from mpq.evaluators.backends import get_backend
from mpq.evaluators.latency import cpu_model, device_name, kernel_versions, measure_latency
from mpq.evaluators.size import config_size, float_size_bytes
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig


class MLP(nn.Module):
    def __init__(self, width: int = 1024, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


class Block(nn.Module):
    def __init__(self, d: int = 384, heads: int = 6) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ff1, self.ff2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.ff2(torch.relu(self.ff1(self.norm2(x))))


class Transformer(nn.Module):
    def __init__(self, depth: int = 6) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[Block() for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ConvEncoder(nn.Module):
    """A small image encoder: 4 Conv2d (3x3, stride 2 after the first) -> pooled features."""

    def __init__(self) -> None:
        super().__init__()
        widths = (3, 32, 64, 128, 128)
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1)
            for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = torch.relu(conv(x))
        return x.mean((2, 3))


def models(batch: int = 1) -> dict[str, Any]:
    """Name -> a function that builds ``(model, inputs)`` (only the models asked for are built)."""

    def policy() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        from mpq.zoo.babyai import build_policy, example_inputs

        x = tuple(t.expand(batch, *t.shape[1:]).contiguous() for t in example_inputs())
        return build_policy(), x

    def flagship() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        from mpq.zoo.babyai import build_flagship
        from mpq.zoo.babyai.task import flagship_example_inputs

        x = tuple(t.expand(batch, *t.shape[1:]).contiguous() for t in flagship_example_inputs())
        return build_flagship(), x

    return {
        "mlp-4x1024": lambda: (MLP().eval(), (torch.randn(batch, 1024),)),
        "transformer-6x384": lambda: (Transformer().eval(), (torch.randn(batch, 16, 384),)),
        "conv-encoder-96px": lambda: (ConvEncoder().eval(), (torch.rand(batch, 3, 96, 96),)),
        "babyai-policy": policy,
        "babyai-flagship": flagship,
    }


def configs(layers) -> dict[str, QuantConfig]:  # type: ignore[no-untyped-def]
    half = len(layers) // 2
    mixed = {
        la.name: LayerChoice(w_bits=8 if i < half else 4, a_bits=8 if la.takes_activations else 32)
        for i, la in enumerate(layers)
    }
    return {
        "W8A8": QuantConfig.uniform(layers, LayerChoice(w_bits=8, a_bits=8)),
        "W4A8": QuantConfig.uniform(layers, LayerChoice(w_bits=4, a_bits=8)),
        "W8": QuantConfig.uniform(layers, LayerChoice(w_bits=8)),
        "W4": QuantConfig.uniform(layers, LayerChoice(w_bits=4)),
        "W2A8": QuantConfig.uniform(layers, LayerChoice(w_bits=2, a_bits=8)),
        "mixed 8/4": QuantConfig(layers=mixed),
    }


def _eager(model: nn.Module, x: tuple[torch.Tensor, ...], device: str) -> Any:
    """The float model, eager, on ``device`` (synchronised there, as the backends' ``run``)."""
    model = copy.deepcopy(model).to(device)
    x = tuple(t.to(device) for t in x)

    def run() -> Any:
        out = model(*x)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    return run


def _stored(lowered: Any) -> str:
    if lowered.stored_bytes is None:
        return ""
    return f"{lowered.stored_bytes:,} / {lowered.predicted_bytes:,}"


def _row(base: dict[str, Any], config: str, backend: str, ms: float, predicted: int, stored: str):
    x_ort = f"{base['ort'] / ms:.2f}" if base["ort"] else ""
    print(
        f"| {base['name']} | {config} | {backend} | {ms:.3f} | {base['torch'] / ms:.2f} | "
        f"{x_ort} | {predicted:,} | {base['packed']:,} | {base['fb'] / predicted:.2f} | "
        f"{stored} |",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--models", nargs="*", help="model names (default: all)")
    p.add_argument("--configs", nargs="*", help="configuration labels (default: all)")
    p.add_argument(
        "--backends",
        nargs="*",
        help="default: onnxruntime torch torch-eager (cpu), torch-cuda torch-cuda-fp8 (cuda)",
    )
    args = p.parse_args()
    cuda = args.device == "cuda"
    backends = args.backends or (
        ["torch-cuda", "torch-cuda-fp8"] if cuda else ["onnxruntime", "torch", "torch-eager"]
    )
    compiled_float = "torch-cuda" if cuda else "torch"
    torch.set_num_threads(args.threads)
    where = device_name(args.device) if cuda else f"CPU: {cpu_model()}"
    print(
        f"{where}; {kernel_versions()}; {args.threads} thread(s), batch {args.batch}, "
        f"median of {args.runs} runs\n"
    )
    header = (
        "| model | config | backend | ms | x torch float | x ORT float | bytes | packed | "
        "x smaller | stored / formula |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|---|---|")

    def time_ms(run: Any) -> float:
        return measure_latency(run, 10, args.runs, args.threads, args.device).median_ms

    for name, build in models(args.batch).items():
        if args.models and name not in args.models:
            continue
        torch.manual_seed(0)
        model, x = build()
        layers = discover_layers(model)
        keep = QuantConfig.uniform(layers, LayerChoice())
        fb = float_size_bytes(model)
        base = {"name": name, "torch": time_ms(_eager(model, x, args.device)), "ort": None}
        base.update(fb=fb, packed=fb)
        _row(base, "float32", "torch eager", base["torch"], fb, "")
        if not cuda:
            ort_lowered = get_backend("onnxruntime").lower(model, layers, keep, x, args.threads)
            base["ort"] = time_ms(ort_lowered.run)
            _row(base, "float32", "onnxruntime", base["ort"], fb, _stored(ort_lowered))
        if compiled_float in backends:
            lowered = get_backend(compiled_float).lower(model, layers, keep, x, args.threads)
            ms = time_ms(lowered.run)
            _row(base, "float32", f"{compiled_float} (compiled)", ms, fb, _stored(lowered))
        for label, config in configs(layers).items():
            if args.configs and label not in args.configs:
                continue
            predicted = config_size(model, layers, config).total_bytes
            base["packed"] = payload_bytes(pack_state(model, layers, config))
            for backend in backends:
                try:
                    lowered = get_backend(backend).lower(
                        model, layers, config, x, args.threads, calibration=[x]
                    )
                    ms = time_ms(lowered.run)
                except Exception as e:  # a row that failed says so; the others still run
                    print(f"| {name} | {label} | {backend} | failed: {str(e)[:200]!r} |")
                    continue
                _row(base, label, backend, ms, predicted, _stored(lowered))


if __name__ == "__main__":
    main()
