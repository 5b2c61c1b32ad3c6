"""A cheap proxy of task success: how closely a quantized model's outputs follow the float model's.

On the calibration inputs, for the first output tensor (the policy's action logits), with the
last axis taken as the action/class axis:

- ``agreement``: share of positions where ``argmax`` is the same (the action the robot takes);
- ``kl``: mean ``KL(softmax(float) || softmax(quantized))`` over positions.

No episodes are run, so it costs one forward pass per calibration batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from mpq.evaluators import inputs


def first_tensor(output: Any) -> torch.Tensor:
    """The policy's main output: the first tensor of a tuple or list, the ``logits`` of a
    mapping (``transformers``' ``ModelOutput`` is one), else its first tensor value."""
    while not isinstance(output, torch.Tensor):
        if isinstance(output, tuple | list) and output:
            output = output[0]
        elif isinstance(output, Mapping) and output:
            tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
            if "logits" in output:
                output = output["logits"]
            elif tensors:
                output = tensors[0]
            else:
                break
        else:
            break
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"model output {type(output).__name__} holds no tensor")
    return output


def call(model: nn.Module, batch: Any) -> torch.Tensor:
    """The first tensor of ``model`` on ``batch`` (positional or keyword inputs)."""
    return first_tensor(inputs.call(model, inputs.as_inputs(batch)))


@torch.inference_mode()
def reference_outputs(model: nn.Module, batches: Iterable[Any]) -> list[torch.Tensor]:
    return [call(model, b).float() for b in batches]


@torch.inference_mode()
def output_agreement(
    model: nn.Module, batches: Iterable[Any], reference: list[torch.Tensor]
) -> dict[str, float]:
    """``{"agreement": ..., "kl": ...}`` of ``model`` against the float ``reference`` outputs."""
    agree = total = 0
    kl_sum = 0.0
    for batch, ref in zip(batches, reference, strict=True):
        out = call(model, batch).float()
        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
        total += ref[..., 0].numel()
        logp_ref, logp = ref.log_softmax(-1), out.log_softmax(-1)
        kl_sum += float((logp_ref.exp() * (logp_ref - logp)).sum(-1).sum())
    if total == 0:
        raise ValueError("calibration data is empty: the proxy needs at least one batch")
    return {"agreement": agree / total, "kl": kl_sum / total}
