"""Latency of real kernels at batch 1 against float, and stored bytes against predicted bytes.

    python benchmarks/kernels.py [--threads 1] [--runs 200] [--models mlp-4x1024 ...]
        [--backends onnxruntime torch torch-eager]

Models: a 4-layer MLP (1024 wide), a ~10M-parameter stack of transformer blocks, a small
convolutional image encoder (4 Conv2d, 96x96 input) and the shipped BabyAI policy.
Configurations: uniform W8A8, W4A8, W8 and W4 (float activations), W2A8 and a mixed one (first
half of the layers 8-bit, second half 4-bit). Speed-up is against torch eager float and against
ONNX Runtime float (both reported); the float model compiled by the ``torch`` backend is a row of
its own. "bytes" is evaluators.size's prediction for the configuration; "packed" the byte count
of the artifact mpq packs (they must agree); "stored / formula" the bytes of the weights the
lowered model really holds for what ran (e.g. 3 -> 4 bits, block padding, int8 zero points) and
the backend's packing formula for it (they must agree too).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from mpq.evaluators.artifact import pack_state, payload_bytes
from mpq.evaluators.backends import get_backend
from mpq.evaluators.latency import cpu_model, kernel_versions, measure_latency
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


def models() -> dict[str, tuple[nn.Module, tuple[torch.Tensor, ...]]]:
    from mpq.zoo.babyai import build_policy, example_inputs

    torch.manual_seed(0)
    return {
        "mlp-4x1024": (MLP().eval(), (torch.randn(1, 1024),)),
        "transformer-6x384": (Transformer().eval(), (torch.randn(1, 16, 384),)),
        "conv-encoder-96px": (ConvEncoder().eval(), (torch.rand(1, 3, 96, 96),)),
        "babyai-policy": (build_policy(), example_inputs()),
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--models", nargs="*", help="model names (default: all)")
    p.add_argument("--backends", nargs="*", default=["onnxruntime", "torch", "torch-eager"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"CPU: {cpu_model()}; {kernel_versions()}; {args.threads} thread(s), batch 1, "
        f"median of {args.runs} runs\n"
    )
    header = (
        "| model | config | backend | ms | x torch float | x ORT float | bytes | packed | "
        "x smaller | stored / formula |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, (model, x) in models().items():
        if args.models and name not in args.models:
            continue
        layers = discover_layers(model)
        keep = QuantConfig.uniform(layers, LayerChoice())
        torch_float = measure_latency(lambda m=model, x=x: m(*x), 10, args.runs, args.threads)
        ort_float_lowered = get_backend("onnxruntime").lower(model, layers, keep, x, args.threads)
        ort_float = measure_latency(ort_float_lowered.run, 10, args.runs, args.threads)
        fb = float_size_bytes(model)
        print(
            f"| {name} | float32 | torch eager | {torch_float.median_ms:.3f} | 1.00 | "
            f"{ort_float.median_ms / torch_float.median_ms:.2f} | {fb:,} | {fb:,} | 1.00 | |"
        )
        print(
            f"| {name} | float32 | onnxruntime | {ort_float.median_ms:.3f} | "
            f"{torch_float.median_ms / ort_float.median_ms:.2f} | 1.00 | {fb:,} | {fb:,} | 1.00 | "
            f"{ort_float_lowered.stored_bytes:,} / {ort_float_lowered.predicted_bytes:,} |"
        )
        if "torch" in args.backends:
            compiled = get_backend("torch").lower(model, layers, keep, x, args.threads)
            ms = measure_latency(compiled.run, 10, args.runs, args.threads).median_ms
            print(
                f"| {name} | float32 | torch (compiled) | {ms:.3f} | "
                f"{torch_float.median_ms / ms:.2f} | {ort_float.median_ms / ms:.2f} | {fb:,} | "
                f"{fb:,} | 1.00 | {compiled.stored_bytes:,} / {compiled.predicted_bytes:,} |"
            )
        for label, config in configs(layers).items():
            predicted = config_size(model, layers, config).total_bytes
            packed = payload_bytes(pack_state(model, layers, config))
            for backend in args.backends:
                lowered = get_backend(backend).lower(
                    model, layers, config, x, args.threads, calibration=[x]
                )
                ms = measure_latency(lowered.run, 10, args.runs, args.threads).median_ms
                stored = (
                    f"{lowered.stored_bytes:,} / {lowered.predicted_bytes:,}"
                    if lowered.stored_bytes is not None
                    else ""
                )
                print(
                    f"| {name} | {label} | {backend} | {ms:.3f} | "
                    f"{torch_float.median_ms / ms:.2f} | {ort_float.median_ms / ms:.2f} | "
                    f"{predicted:,} | {packed:,} | {fb / predicted:.2f} | {stored} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
