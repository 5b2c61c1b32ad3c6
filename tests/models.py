"""Small models built in the tests, one per family of layer kinds the space covers."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv1d = nn.Conv1d(16, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 8, 8)
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))  # (B, 16, 8, 8)
        x = self.conv1d(x.flatten(2)).mean(-1)  # (B, 16)
        return self.fc(x)


class RecurrentPolicy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.gru = nn.GRU(16, 32, batch_first=True)
        self.lstm = nn.LSTM(32, 32, batch_first=True)
        self.head = nn.Linear(32, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: (B, T)
        h, _ = self.gru(self.embed(tokens))
        h, _ = self.lstm(h)
        return self.head(h[:, -1])


class TinyTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff1 = nn.Linear(32, 64)
        self.ff2 = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 32)
        a, _ = self.attn(x, x, x, need_weights=False)
        x = self.norm(x + a)
        return x + self.ff2(torch.relu(self.ff1(x)))


class Stacked(nn.Module):
    """Two TinyTransformers in a Sequential: nested module names, 3-D inputs to every Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(TinyTransformer(), TinyTransformer())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, 32)
        return self.blocks(x)


class WideInput(nn.Module):
    """K = 1024 with 36 rows: CUDA's tinygemm int4 pads the rows to 40 and still stores fewer
    bytes than int8 (K is already a multiple of its 1024), the CPU's int4 wants rows % 16."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(1024, 36)
        self.fc2 = nn.Linear(36, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1024)
        return self.fc2(torch.relu(self.fc1(x)))


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 50, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(self.embed(tokens))))


class Mlp(nn.Module):
    """A classifier whose logits are peaked (like a trained one): 2-bit post-training
    quantization loses a good share of its decisions, quantization-aware training wins some
    back (the QAT tests)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 10)
        with torch.no_grad():
            self.head.weight.mul_(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 16)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def build_mlp() -> nn.Module:
    torch.manual_seed(0)
    return Mlp().eval()


def mlp_calibration() -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(64, 16, generator=g),) for _ in range(16)]


def mlp_task(model: nn.Module, budget: int) -> dict[str, float]:
    """'Success' = share of ``budget`` held-out inputs where the class equals the float one's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(budget, 16, generator=g)
    with torch.inference_mode():
        agree = (model(x).argmax(-1) == build_mlp()(x).argmax(-1)).float()
    return {"success": float(agree.mean()), "n": float(budget)}


def example_inputs(model: nn.Module, batch: int = 2) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    if isinstance(model, ConvNet):
        return (torch.randn(batch, 3, 8, 8, generator=g),)
    if isinstance(model, RecurrentPolicy):
        return (torch.randint(0, 20, (batch, 5), generator=g),)
    if isinstance(model, TinyTransformer | Stacked):
        return (torch.randn(batch, 6, 32, generator=g),)
    if isinstance(model, Mlp):
        return (torch.randn(batch, 16, generator=g),)
    if isinstance(model, WideInput):
        return (torch.randn(batch, 1024, generator=g),)
    return (torch.randint(0, 50, (batch, 5), generator=g),)


ALL_MODELS = (ConvNet, RecurrentPolicy, TinyTransformer, TiedLM)


def build_convnet() -> nn.Module:
    torch.manual_seed(0)
    return ConvNet().eval()


def convnet_calibration() -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(8, 3, 8, 8, generator=g),) for _ in range(2)]


def convnet_task(model: nn.Module, budget: int) -> dict[str, float]:
    """'Success' = share of ``budget`` fixed inputs where the class equals the float one's."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(budget, 3, 8, 8, generator=g)
    with torch.inference_mode():
        agree = (model(x).argmax(-1) == build_convnet()(x).argmax(-1)).float()
    return {"success": float(agree.mean()), "n": float(budget)}


def capped_task(model: nn.Module, budget: int) -> dict[str, float]:
    """``convnet_task`` on up to 16 inputs; more raises (a close call's larger run fails)."""
    if budget > 16:
        raise RuntimeError(f"no more than 16 inputs, asked for {budget}")
    return convnet_task(model, budget)


def _weight_levels(model: nn.Module) -> int:
    return int(torch.unique(model.fc.weight[0]).numel())


def _on_3_or_4bit_grid(model: nn.Module) -> bool:
    """``fc``'s first row is symmetric 3- or 4-bit codes: multiples of max|w| / 3 or / 7."""
    row = model.fc.weight[0].detach()
    for levels in (3, 7):
        ratio = row / (row.abs().max() / levels)
        if torch.allclose(ratio, ratio.round(), atol=1e-3):
            return True
    return False


def flaky_task(model: nn.Module, budget: int) -> dict[str, float]:
    """Raises for a 2-bit ``fc`` (at most 4 levels per row), returns NaN for a 3- or 4-bit
    one (a 3-bit choice runs as 4 bits on ``MatMulNBits``, as 3 bits weight-only; success is
    measured on what runs)."""
    if _weight_levels(model) <= 4:
        raise RuntimeError("injected: fc at 2 bits")
    if _on_3_or_4bit_grid(model):
        return {"success": float("nan")}
    return convnet_task(model, budget)


def slow_task(model: nn.Module, budget: int) -> dict[str, float]:
    """Hangs for a 2-bit ``fc``: exercises the trial time limit."""
    import time

    if _weight_levels(model) <= 4:
        time.sleep(120)
    return convnet_task(model, budget)


def dying_task(model: nn.Module, budget: int) -> dict[str, float]:
    """Kills its own worker process for a 2-bit ``fc``: a worker lost mid-trial."""
    import os

    if _weight_levels(model) <= 4:
        os._exit(1)
    return convnet_task(model, budget)


def paced_task(model: nn.Module, budget: int) -> dict[str, float]:
    """``convnet_task`` that takes about a second, so a kill lands mid-search."""
    import time

    time.sleep(1.0)
    return convnet_task(model, budget)


def hungry_task(model: nn.Module, budget: int) -> dict[str, float]:
    """Allocates 4 GiB for a 2-bit ``fc``: exercises the per-trial memory limit."""
    if _weight_levels(model) <= 4:
        block = torch.ones(1024, 1024, 1024, dtype=torch.float32)  # 4 GiB
        return {"success": float(block[0, 0, 0])}
    return convnet_task(model, budget)


def raising_builder() -> nn.Module:
    raise RuntimeError("boom\nsecond line of the user's message")


def stringly_task(model: nn.Module, budget: int) -> dict[str, object]:
    return {"success": "high"}


def nan_step(student: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """A QAT step whose loss is NaN (the QAT stage must fail without losing the trial)."""
    return student(*batch).sum() * float("nan")
