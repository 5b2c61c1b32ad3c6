"""The ``torch`` backends' int4 kernels (CPU and CUDA tinygemm) hold the design notes' codes,
not torchao's own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpq.evaluators.quantize import fake_quantize_weight, weight_qparams

pytest.importorskip("torchao")


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
            reason="no CUDA device with tensor cores (tinygemm)",
        ),
    ),
]


def _identity_output(linear: nn.Linear, device: str) -> torch.Tensor:
    eye = torch.eye(linear.in_features, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        return linear(eye).float().T.cpu()


def _kernel_weight(weight: torch.Tensor, device: str) -> torch.Tensor:
    """The weight the int4 kernel multiplies by: its output on the identity, transposed."""
    from mpq.evaluators.backends.torch_kernels import notes_int4_weight

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear = linear.to(device=device, dtype=torch.bfloat16)
    linear.weight = nn.Parameter(notes_int4_weight(weight.to(device)), requires_grad=False)
    return _identity_output(linear, device)


def _torchao_weight(weight: torch.Tensor, device: str) -> torch.Tensor:
    """The same, with torchao's own codes (``from_hp``)."""
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear = linear.to(device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    if device == "cpu":
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        config: object = PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False)
    else:
        config = Int4WeightOnlyConfig(
            group_size=32, int4_packing_format="tile_packed_to_4d", set_inductor_config=False
        )
    quantize_(linear, config)
    return _identity_output(linear, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_int4_kernel_multiplies_by_the_notes_dequantized_weight(
    seed: int, device: str
) -> None:
    """``x' = (Q - z) s`` with ``s = (max - min) / 15`` per group of 32, to within the kernel's
    three bfloat16 roundings (each at most 2^-8 of its value: the output, up to 15 s; the
    scale, times |Q - 8| <= 8; the zero point, up to 8 s): under ``s / 8``. torchao's own codes
    (the group's min and max as the grid's ends, an unrounded zero) are further off."""
    torch.manual_seed(seed)
    # 44 rows: CUDA pads them to 48 (and K to 1024); the CPU kernel needs 16 | rows
    rows = 48 if device == "cpu" else 44
    weight = torch.randn(rows, 96) * torch.rand(rows, 1) + 0.3 * torch.randn(rows, 1)
    want = fake_quantize_weight(weight, 4, "per_group", 32, symmetric=False)
    _, qp = weight_qparams(weight, 4, "per_group", 32, symmetric=False)
    step = qp.scale.expand(-1, -1, 32).reshape(weight.shape)
    assert float(((_kernel_weight(weight, device) - want).abs() / step).max()) < 1 / 8
    assert float(((_torchao_weight(weight, device) - want).abs() / step).max()) > 1 / 4
