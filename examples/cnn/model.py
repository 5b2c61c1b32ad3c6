"""A CNN a user has, in torchvision's styles: conv -> BatchNorm -> ReLU, inverted residual
blocks (depthwise-separable, squeeze-excite, residual), as in MobileNetV3. Run from the
repository root:

    mpq search examples/cnn/search.yaml --resume

Trained on first use (about 20 s on 2 cores) on the classifier example's synthetic shapes
(drawn at 32x32 in 3 channels, so no download), then loaded from ``cnn.pt`` with
``weights_only=True`` as a user's checkpoint would be; torchvision itself does not import beside
the CPU torch. mpq folds each BatchNorm into its convolution first, exactly, so the folded
weights are what is quantized and sized. The task: accuracy on held-out images.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from examples.classifier.model import accuracy, fit, make_images

CHECKPOINT = Path(__file__).resolve().parent / "cnn.pt"


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, squeezed: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))
        return x * torch.sigmoid(self.fc2(s))


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise -> squeeze-excite -> 1x1 project (+ the input)."""

    def __init__(self, cin: int, expand: int, cout: int, stride: int) -> None:
        super().__init__()
        self.expand = conv_bn(cin, expand, 1)
        self.depthwise = conv_bn(expand, expand, 3, stride, groups=expand)
        self.se = SqueezeExcite(expand, max(8, expand // 4))
        self.project = nn.Sequential(nn.Conv2d(expand, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class SmallMobileNet(nn.Module):
    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = conv_bn(3, 16, 3, 2)
        self.blocks = nn.Sequential(
            InvertedResidual(16, 64, 24, 2),
            InvertedResidual(24, 96, 24, 1),
            InvertedResidual(24, 96, 40, 2),
            InvertedResidual(40, 160, 40, 1),
        )
        self.head = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, 3, 32, 32)
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier example's four shapes, drawn at 32x32 in 3 channels."""
    x, y = make_images(n, seed)
    x = nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    return x.repeat(1, 3, 1, 1), y


def train(steps: int = 300) -> SmallMobileNet:
    torch.manual_seed(0)
    return fit(SmallMobileNet(), *images(4000, seed=0), steps=steps, batch=64)  # type: ignore[return-value]


def build_model() -> SmallMobileNet:
    """The builder: load the checkpoint (weights_only=True), training it once if missing."""
    if not CHECKPOINT.exists():
        torch.save(train().state_dict(), CHECKPOINT)
    model = SmallMobileNet()
    model.load_state_dict(torch.load(CHECKPOINT, map_location="cpu", weights_only=True))
    return model.eval()


def accuracy_task(model: nn.Module, budget: int) -> dict[str, float]:
    """Accuracy on ``budget`` held-out images (seed 1, never used for training)."""
    return accuracy(model, *images(budget, seed=1))


def calibration() -> list[tuple[torch.Tensor]]:
    """Calibration inputs from a third seed (neither training nor evaluation data)."""
    x, _ = images(256, seed=2)
    return [(x[i : i + 64],) for i in range(0, 256, 64)]


def example_inputs() -> tuple[torch.Tensor]:
    return (images(1, seed=3)[0],)
