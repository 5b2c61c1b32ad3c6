"""Model families users have, built from configs (no download): the contract tests' models and
``benchmarks/families.py``'s.

``build(family, size)`` gives the model (``transformers``' ``Conv1D`` read as ``nn.Linear``,
BatchNorm folded, as ``build_model`` does for a user's model), its batch-1 example inputs and
calibration batches. ``size="test"`` is small enough for CI; ``"bench"`` is the size the
benchmark times (ViT-tiny's width, a 4-layer GPT-2 and BERT, a CNN at 64x64), where one can see
whether low bits pay. Weights are random but trained-looking (no run of equal values that the
exporter would store once), with a fixed seed.

GPT-2, BERT and ViT need ``transformers``; the CNN is written here in torchvision's styles
(conv -> BatchNorm -> ReLU stem, depthwise-separable block, residual block, squeeze-excite,
linear head): torchvision from PyPI does not import beside the CPU torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mpq.evaluators.model import fold_batchnorm, linear_form
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import LayerChoice, QuantConfig

FAMILIES = ("gpt2", "bert", "vit", "cnn")
SIZES = {
    "test": {"width": 32, "layers": 2, "vocab": 100, "tokens": 8, "image": 16, "cnn": 16},
    "bench": {"width": 192, "layers": 4, "vocab": 1000, "tokens": 32, "image": 32, "cnn": 64},
}


def build(family: str, size: str = "test") -> tuple[nn.Module, dict[str, Any], list[Any]]:
    """``(model, example_inputs, calibration)`` of ``family`` at ``size``.

    Raises:
        ValueError: an unknown family or size.
    """
    if family not in FAMILIES or size not in SIZES:
        raise ValueError(f"family {family!r} at {size!r}: one of {FAMILIES} at {list(SIZES)}")
    s = SIZES[size]
    torch.manual_seed(0)
    model, example = _BUILDERS[family](s)
    _trained_looking(model)
    model = fold_batchnorm(linear_form(model.eval()))
    return model, example, calibration(example, s["vocab"])


def _gpt2(s: dict[str, int]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers

    config = transformers.GPT2Config(
        n_layer=s["layers"],
        n_embd=s["width"],
        n_head=2 if s["width"] < 64 else 4,
        vocab_size=s["vocab"],
        n_positions=2 * s["tokens"],
        bos_token_id=0,
        eos_token_id=0,
    )
    ids = _ids(s)
    # the mask as an input: without it GPT-2 builds it with aten::diff, which ONNX cannot trace
    return transformers.GPT2LMHeadModel(config), {"input_ids": ids, "attention_mask": ids * 0 + 1}


def _bert(s: dict[str, int]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers

    config = transformers.BertConfig(
        num_hidden_layers=s["layers"],
        hidden_size=s["width"],
        num_attention_heads=2 if s["width"] < 64 else 4,
        intermediate_size=2 * s["width"],
        vocab_size=s["vocab"],
        max_position_embeddings=2 * s["tokens"],
    )
    ids = _ids(s)
    # the segment ids as an input, as users call BERT: left out, they are a constant that the
    # exporter folds together with the segment table (not the table that was sized)
    model = transformers.BertForSequenceClassification(config)
    return model, {"input_ids": ids, "token_type_ids": torch.zeros_like(ids)}


def _vit(s: dict[str, int]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    import transformers

    config = transformers.ViTConfig(
        num_hidden_layers=s["layers"],
        hidden_size=s["width"],
        num_attention_heads=2 if s["width"] < 64 else 3,
        intermediate_size=2 * s["width"],
        image_size=s["image"],
        patch_size=4,
        num_labels=5,
    )
    x = torch.randn(1, 3, s["image"], s["image"], generator=torch.Generator().manual_seed(2))
    return transformers.ViTForImageClassification(config), {"pixel_values": x}


def _ids(s: dict[str, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return torch.randint(0, s["vocab"], (1, s["tokens"]), generator=g)


class ConvBnRelu(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, c // 4, 1), nn.Conv2d(c // 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.relu(self.reduce(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.expand(w))


class SmallCnn(nn.Module):
    """torchvision's styles in small: conv-BN-ReLU stem, a depthwise-separable block with
    squeeze-excite, a residual block, a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = ConvBnRelu(3, width, stride=2)
        self.dw = ConvBnRelu(width, width, groups=width)
        self.pw = nn.Sequential(
            nn.Conv2d(width, 2 * width, 1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU()
        )
        self.se = SqueezeExcite(2 * width)
        self.res = ConvBnRelu(2 * width, 2 * width)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.pw(self.dw(self.stem(x))))
        x = x + self.res(x)
        return self.head(x.mean((2, 3)))


def _cnn(s: dict[str, int]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    x = torch.randn(1, 3, s["cnn"], s["cnn"], generator=torch.Generator().manual_seed(2))
    return SmallCnn(s["width"] // 2), {"x": x}


_BUILDERS = {"gpt2": _gpt2, "bert": _bert, "vit": _vit, "cnn": _cnn}


@torch.no_grad()
def _trained_looking(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1, generator=g)
            m.running_var.uniform_(0.5, 2, generator=g)


def calibration(example: dict[str, torch.Tensor], vocab: int) -> list[dict[str, torch.Tensor]]:
    """Two batches of 4 like ``example``: images random, token ids in the vocabulary, masks
    ones, segment ids zeros."""
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(2):
        batch = {}
        for k, v in example.items():
            shape = (4, *v.shape[1:])
            if v.is_floating_point():
                batch[k] = torch.randn(shape, generator=g)
            elif k == "attention_mask":
                batch[k] = torch.ones(shape, dtype=v.dtype)
            elif k == "token_type_ids":
                batch[k] = torch.zeros(shape, dtype=v.dtype)
            else:
                batch[k] = torch.randint(0, vocab, shape, generator=g)
        batches.append(batch)
    return batches


def mixed(layers: tuple[LayerInfo, ...]) -> QuantConfig:
    """Per kind, the kernels' formats in turn: linears at 4-bit blocks with int8 inputs, 8-bit,
    2-bit weight-only and float; static int8 convolutions; 4-bit embedding blocks."""
    linear = [
        LayerChoice(w_bits=4, a_bits=8, granularity="per_group", group_size=32),
        LayerChoice(w_bits=8, a_bits=8),
        LayerChoice(w_bits=2, granularity="per_group", group_size=32),
        LayerChoice(),
    ]
    choices = {}
    for i, la in enumerate(layers):
        if la.kind == "embedding":
            choices[la.name] = LayerChoice(w_bits=4, granularity="per_group", group_size=16)
        elif la.kind.startswith("conv"):
            choices[la.name] = LayerChoice(w_bits=8, a_bits=8, act_mode="static")
        else:
            choices[la.name] = linear[i % len(linear)]
    return QuantConfig(layers=choices)


def uniform(layers: tuple[LayerInfo, ...], w_bits: int) -> QuantConfig:
    """Every layer at ``w_bits`` with int8 inputs (4 bits in blocks of 32 where they divide),
    static for convolutions; embeddings weight-only."""
    choices = {}
    for la in layers:
        grouped = w_bits < 8 and la.reduction_size % 32 == 0
        gran = {"granularity": "per_group", "group_size": 32} if grouped else {}
        if la.kind == "embedding":
            choices[la.name] = LayerChoice(w_bits=w_bits, **gran)
        elif la.kind.startswith("conv"):
            choices[la.name] = LayerChoice(w_bits=8, a_bits=8, act_mode="static")
        else:
            choices[la.name] = LayerChoice(w_bits=w_bits if grouped else 8, a_bits=8, **gran)
    return QuantConfig(layers=choices)
