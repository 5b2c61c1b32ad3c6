"""A user's own model and task, the generic path: a small image classifier and its accuracy.

Everything mpq needs from a user is three ``module:function`` references in the search config:

- ``model``: a builder returning an ``nn.Module`` (here trained on first use, then loaded from
  ``classifier.pt`` with ``weights_only=True``, as a user's checkpoint would be);
- ``task``: ``(model, budget) -> {"success": ...}``; here accuracy on ``budget`` held-out images;
- ``calibration``: ``() -> list of input batches`` for static activation ranges and the proxy.

The data are synthetic 12x12 images of four shapes with noise, made from a fixed seed, so the
example needs no download.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
CHECKPOINT = HERE / "classifier.pt"


def make_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n noisy 1x12x12 images of 4 classes: horizontal bar, vertical bar, square, cross."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    images = 0.6 * torch.randn(n, 1, 12, 12, generator=g)
    pos = torch.randint(2, 10, (n, 2), generator=g)
    for i in range(n):
        r, c = int(pos[i, 0]), int(pos[i, 1])
        k = int(labels[i])
        if k == 0:
            images[i, 0, r, :] += 2.0
        elif k == 1:
            images[i, 0, :, c] += 2.0
        elif k == 2:
            images[i, 0, r - 2 : r + 1, c - 2 : c + 1] += 2.0
        else:
            images[i, 0, r, :] += 1.5
            images[i, 0, :, c] += 1.5
    return images, labels


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 3 * 3, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 1, 12, 12)
        x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)  # (B, 16, 6, 6)
        x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)  # (B, 32, 3, 3)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> nn.Module:
    """Cross-entropy with Adam on random batches of (x, y), reproducibly; the model in eval."""
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(steps):
        idx = torch.randint(0, len(x), (batch,), generator=torch.Generator().manual_seed(step))
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def train(steps: int = 300) -> SmallCNN:
    torch.manual_seed(0)
    return fit(SmallCNN(), *make_images(4000, seed=0), steps=steps, batch=128)  # type: ignore[return-value]


def build_model() -> SmallCNN:
    """The builder: load the checkpoint (weights_only=True), training it once if missing."""
    if not CHECKPOINT.exists():
        torch.save(train().state_dict(), CHECKPOINT)
    model = SmallCNN()
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return model.eval()


def accuracy_task(model: nn.Module, budget: int) -> dict[str, float]:
    """Accuracy on ``budget`` held-out images (seed 1, never used for training)."""
    return accuracy(model, *make_images(budget, seed=1))


@torch.inference_mode()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Accuracy with its Wilson interval, and the per-image outcomes (paired comparisons)."""
    return scored(model(x).argmax(-1) == y)


def scored(right: torch.Tensor) -> dict[str, float]:
    """The task's metrics from each input's right/wrong: the share right with its Wilson
    interval, and the per-input outcomes in their fixed order (paired comparisons)."""
    from mpq.evaluators.stats import wilson_interval

    budget = len(right)
    correct = int(right.sum())
    lo, hi = wilson_interval(correct, budget)
    outcomes = "".join("1" if r else "0" for r in right.tolist())
    return {"success": correct / budget, "success_lo": lo, "success_hi": hi, "outcomes": outcomes}


def calibration() -> list[tuple[torch.Tensor]]:
    """Calibration inputs from a third seed (neither training nor evaluation data)."""
    x, _ = make_images(256, seed=2)
    return [(x[i : i + 64],) for i in range(0, 256, 64)]


def example_inputs() -> tuple[torch.Tensor]:
    return (make_images(1, seed=3)[0],)


def train_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Labelled images for quantization-aware training (``qat.data``): the training seed,
    never the evaluation one."""
    x, y = make_images(2048, seed=0)
    return [(x[i : i + 64], y[i : i + 64]) for i in range(0, 2048, 64)]


def train_step(student: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``qat.step``: the task loss on labels (cross-entropy), through the quantized forward."""
    x, y = batch
    return nn.functional.cross_entropy(student(x), y)
