"""The ``torch`` backend's CPU int4 kernel holds the design notes' codes, not torchao's own."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mpq.evaluators.quantize import fake_quantize_weight, weight_qparams

pytest.importorskip("torchao")


def _kernel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The weight the int4 kernel multiplies by: its output on the identity, transposed."""
    from mpq.evaluators.backends.torch_kernels import notes_int4_weight

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(torch.bfloat16)
    linear.weight = nn.Parameter(notes_int4_weight(weight), requires_grad=False)
    with torch.no_grad():
        return linear(torch.eye(weight.shape[1], dtype=torch.bfloat16)).float().T


def _torchao_weight(weight: torch.Tensor) -> torch.Tensor:
    """The same, with torchao's own codes (``from_hp``)."""
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import quantize_

    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(weight)
    quantize_(linear, PrototypeInt4WeightOnlyConfig(group_size=32, set_inductor_config=False))
    with torch.no_grad():
        return linear(torch.eye(weight.shape[1], dtype=torch.bfloat16)).float().T


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_cpu_int4_kernel_multiplies_by_the_notes_dequantized_weight(seed: int) -> None:
    """``x' = (Q - z) s`` with ``s = (max - min) / 15`` per group of 32, to within the kernel's
    three bfloat16 roundings (each at most 2^-8 of its value: the output, up to 15 s; the
    scale, times |Q - 8| <= 8; the zero point, up to 8 s): under ``s / 8``. torchao's own codes
    (the group's min and max as the grid's ends, an unrounded zero) are further off."""
    torch.manual_seed(seed)
    weight = torch.randn(48, 96) * torch.rand(48, 1) + 0.3 * torch.randn(48, 1)
    want = fake_quantize_weight(weight, 4, "per_group", 32, symmetric=False)
    _, qp = weight_qparams(weight, 4, "per_group", 32, symmetric=False)
    step = qp.scale.expand(-1, -1, 32).reshape(weight.shape)
    assert float(((_kernel_weight(weight) - want).abs() / step).max()) < 1 / 8
    assert float(((_torchao_weight(weight) - want).abs() / step).max()) > 1 / 4
