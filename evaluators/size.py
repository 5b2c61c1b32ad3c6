"""Exact model size of a configuration, in bytes, from the formula (no packing needed).

For a layer at ``b <= 8`` bits with ``n`` weights in ``G`` quantization groups (1 per tensor,
``C_out`` per channel, ``C_out * R / g`` per group)::

    bytes = ceil(n * b / 8)            packed integers
          + 4 * G                      float32 scales
          + ceil(G * b / 8)            packed zero points (asymmetric only)

At 16 bits a weight is float16 (``2 n``); at 32 it keeps its own dtype. Every other parameter and
buffer (biases, norms, skipped layers) counts at its own dtype, shared tensors once (persistent
buffers only: a non-persistent one is not stored). Activation
bits change no stored byte. ``tests/evaluators/test_size.py`` checks this against the byte
length of tensors really packed by ``evaluators.pack``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, LayerChoice, QuantConfig

SCALE_BYTES = 4


def num_groups(layer: LayerInfo, choice: LayerChoice) -> int:
    if choice.granularity == "per_tensor":
        return 1
    channels = layer.shape[0] if len(layer.shape) > 1 else 1
    if choice.granularity == "per_channel":
        return channels
    return channels * (layer.reduction_size // (choice.group_size or 1))


def layer_size_bytes(layer: LayerInfo, choice: LayerChoice, float_bytes: int = 4) -> int:
    """Stored bytes of one layer's weight under ``choice`` (formula in the module docstring)."""
    n, b = layer.num_params, choice.w_bits
    if b > INT_BITS_MAX:
        return n * (2 if b == 16 else float_bytes)
    groups = num_groups(layer, choice)
    zero_bytes = 0 if choice.symmetric else math.ceil(groups * b / 8)
    return math.ceil(n * b / 8) + SCALE_BYTES * groups + zero_bytes


@dataclass(frozen=True, slots=True)
class SizeReport:
    total_bytes: int
    layer_bytes: dict[str, int]
    other_bytes: int  # parameters and buffers outside the quantizable layers

    def ratio_to(self, float_bytes: int) -> float:
        return float_bytes / self.total_bytes


def _other_bytes(model: nn.Module, layers: tuple[LayerInfo, ...]) -> tuple[int, dict[str, int]]:
    quantized = {f"{la.module}.{la.param}" if la.module else la.param for la in layers}
    quantized |= {alias for la in layers for alias in la.tied}
    seen: set[int] = set()
    other = 0
    float_bytes = {}
    named = [*model.named_parameters(remove_duplicate=False), *persistent_buffers(model)]
    for name, tensor in named:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if name in quantized:
            float_bytes[name] = tensor.element_size()
        else:
            other += tensor.numel() * tensor.element_size()
    return other, float_bytes


def config_size(
    model: nn.Module, layers: tuple[LayerInfo, ...], config: QuantConfig
) -> SizeReport:
    """Exact stored size of ``model`` quantized with ``config``."""
    other, elem = _other_bytes(model, layers)
    per_layer = {}
    for la in layers:
        full = f"{la.module}.{la.param}" if la.module else la.param
        per_layer[la.name] = layer_size_bytes(la, config.layers[la.name], elem.get(full, 4))
    return SizeReport(sum(per_layer.values()) + other, per_layer, other)


def persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers a checkpoint holds (``state_dict``): a non-persistent one (``transformers``'
    ``position_ids``, an ``arange`` made at construction) is not stored, and the exporter folds
    it into the graph as a constant of the shapes it ran, not as a weight."""
    kept = set(model.state_dict(keep_vars=True))
    return [(n, b) for n, b in model.named_buffers() if n in kept]


def float_size_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer as they are, shared tensors once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *(b for _, b in persistent_buffers(model))]:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
