"""Observers that calibrate activation ranges over calibration batches (static quantization).

- ``minmax`` (the design notes): the running min and max.
- ``percentile``: the 0.01% / 99.99% quantiles of a sample of the values, which ignores rare
  outliers that would otherwise stretch ``s`` for every other value.
- ``mse``: the clipping ratio ``r`` of the min-max range that minimises
  ``mean((x - Q^-1(Q(x)))^2)`` on the sample; it matters at 4 bits and below.

Calibration batches are tuples of positional model inputs (a dict is taken as keyword inputs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from mpq.evaluators.quantize import check_finite, fake_quantize_activation

_SAMPLE_PER_CALL = 4096
_MSE_RATIOS = tuple(1.0 - 0.05 * i for i in range(11))  # 1.0 .. 0.5


class MinMaxObserver:
    def __init__(self, bits: int = 8) -> None:
        self.bits = bits
        self.lo = torch.tensor(float("inf"))
        self.hi = torch.tensor(float("-inf"))
        self.samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        check_finite(x, "calibration activation")
        self.lo = torch.minimum(self.lo, x.min())
        self.hi = torch.maximum(self.hi, x.max())
        flat = x.reshape(-1)
        if flat.numel() > _SAMPLE_PER_CALL:
            idx = torch.randint(
                0,
                flat.numel(),
                (_SAMPLE_PER_CALL,),
                generator=torch.Generator().manual_seed(flat.numel()),
            )
            flat = flat[idx]
        self.samples.append(flat)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.isfinite(self.lo):
            raise ValueError("observer saw no calibration data")
        return self.lo, self.hi


class PercentileObserver(MinMaxObserver):
    def __init__(self, bits: int = 8, percentile: float = 99.99) -> None:
        super().__init__(bits)
        self.q = percentile / 100

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        super().range()
        sample = torch.cat(self.samples)
        return torch.quantile(sample, 1 - self.q), torch.quantile(sample, self.q)


class MSEObserver(MinMaxObserver):
    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = super().range()
        sample = torch.cat(self.samples)
        best, best_err = (lo, hi), float("inf")
        for r in _MSE_RATIOS:
            err = float(
                (
                    (sample - fake_quantize_activation(sample, self.bits, False, lo * r, hi * r))
                    ** 2
                ).mean()
            )
            if err < best_err:
                best, best_err = (lo * r, hi * r), err
        return best


OBSERVERS: dict[str, Callable[[int], MinMaxObserver]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
}


def make_observer(name: str, bits: int) -> MinMaxObserver:
    if name not in OBSERVERS:
        raise ValueError(f"observer={name!r} not in {sorted(OBSERVERS)}")
    return OBSERVERS[name](bits)


def run_batches(model: torch.nn.Module, batches: Sequence[Any] | Iterable[Any]) -> int:
    """Feed every calibration batch to ``model``; returns the count.

    Raises:
        ValueError: no batch at all, or a batch holds NaN/Inf.
    """
    count = 0
    with torch.inference_mode():
        for batch in batches:
            args, kwargs = (batch, {}) if not isinstance(batch, dict) else ((), batch)
            args = args if isinstance(args, tuple | list) else (args,)
            for i, a in enumerate([*args, *kwargs.values()]):
                if isinstance(a, torch.Tensor) and a.is_floating_point():
                    check_finite(a, f"calibration batch {count} input {i}")
            model(*args, **kwargs)
            count += 1
    if count == 0:
        raise ValueError("calibration data is empty: static activations need at least one batch")
    return count
