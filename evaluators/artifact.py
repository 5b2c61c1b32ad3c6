"""The deployable artifact: a flat dict of tensors holding packed low-bit weights.

Keys: ``<param>`` for a tensor stored as is (float32, or float16 for 16-bit layers), and
``<param>::data``, ``<param>::scale``, ``<param>::zero_point``, ``<param>::meta`` for a packed
layer. Only tensors, so ``torch.load(weights_only=True)`` reads it. ``payload_bytes`` counts the
stored weights, scales and zero points; ``::meta`` rows (shapes, bit-width) are bookkeeping and
not counted, matching ``evaluators.size``.
"""

from __future__ import annotations

import torch
from torch import nn

from mpq.evaluators.pack import PackedWeight, pack_weight, unpack_weight
from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import INT_BITS_MAX, QuantConfig

SEP = "::"


def _param_name(layer: LayerInfo) -> str:
    return f"{layer.module}.{layer.param}" if layer.module else layer.param


def pack_state(
    model: nn.Module, layers: tuple[LayerInfo, ...], config: QuantConfig
) -> dict[str, torch.Tensor]:
    """The model's ``state_dict`` with every quantized weight packed (shared tensors once)."""
    by_param = {_param_name(la): la for la in layers}
    aliases = {alias for la in layers for alias in la.tied}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        if name in aliases:
            continue
        layer = by_param.get(name)
        choice = config.layers[layer.name] if layer else None
        if choice is None or choice.w_bits == 32:
            state[name] = tensor.detach().clone()
        elif choice.w_bits > INT_BITS_MAX:
            state[name] = tensor.detach().to(torch.float16)
        else:
            packed = pack_weight(
                tensor.detach(),
                choice.w_bits,
                choice.granularity,
                choice.group_size,
                choice.symmetric,
            )
            state.update({f"{name}{SEP}{k}": v for k, v in packed.to_state().items()})
    return state


def payload_bytes(state: dict[str, torch.Tensor]) -> int:
    """Stored bytes of an artifact: every tensor except the ``::meta`` bookkeeping."""
    return sum(
        t.numel() * t.element_size() for k, t in state.items() if not k.endswith(f"{SEP}meta")
    )


def unpack_state(
    state: dict[str, torch.Tensor], layers: tuple[LayerInfo, ...] = ()
) -> dict[str, torch.Tensor]:
    """A float32 ``state_dict`` (dequantized weights) that ``load_state_dict`` accepts."""
    out: dict[str, torch.Tensor] = {}
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        if SEP in key:
            name, part = key.split(SEP, 1)
            grouped.setdefault(name, {})[part] = t
        else:
            out[key] = t.float() if t.dtype == torch.float16 else t
    for name, parts in grouped.items():
        out[name] = unpack_weight(PackedWeight.from_state(parts))
    for la in layers:
        for alias in la.tied:
            out[alias] = out[_param_name(la)]
    return out
