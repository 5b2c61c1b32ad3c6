"""Find the quantizable layers of any ``torch.nn.Module``.

A *layer* here is one weight tensor that a configuration assigns a choice to. Its name is the
dotted name of the weight without a trailing ``.weight``: ``fuse`` for a Linear, ``memory_gru.
weight_ih_l0`` for a GRU's input-hidden weight, ``cross_attn.in_proj_weight`` for the packed
q/k/v projection of ``nn.MultiheadAttention`` (its ``out_proj`` is a Linear of its own).
Weights shared by several modules (tied embeddings) are one layer; ``tied`` lists the aliases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

# Kinds, and whether the layer's input activation is a float tensor that can be quantized.
_RECURRENT = {nn.GRU: "gru", nn.LSTM: "lstm", nn.RNN: "rnn"}
_CONV = {nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d"}
KINDS: tuple[str, ...] = (
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "embedding",
    "gru",
    "lstm",
    "rnn",
    "attention_in_proj",
)


@dataclass(frozen=True, slots=True)
class LayerInfo:
    """One quantizable weight.

    Attributes:
        name: the layer's name in spaces and configurations.
        kind: one of ``KINDS``.
        module: dotted name of the module holding the weight.
        param: attribute name of the weight on that module.
        shape: the weight's shape; dim 0 is the output channel (for Embedding, the row).
        reduction_size: elements per output channel (``prod(shape[1:])``), the axis that
            per-group quantization splits; a group size must divide it.
        num_params: element count.
        takes_activations: False for Embedding, whose input is indices, not floats.
        tied: other parameter names that share this tensor.
    """

    name: str
    kind: str
    module: str
    param: str
    shape: tuple[int, ...]
    reduction_size: int
    num_params: int
    takes_activations: bool = True
    tied: tuple[str, ...] = ()


def _kind(module: nn.Module, param: str) -> str | None:
    if isinstance(module, nn.Linear) and param == "weight":
        return "linear"
    for cls, kind in _CONV.items():
        if isinstance(module, cls) and param == "weight":
            return kind
    if isinstance(module, nn.Embedding) and param == "weight":
        return "embedding"
    for cls, kind in _RECURRENT.items():
        if isinstance(module, cls) and param.startswith(("weight_ih_l", "weight_hh_l")):
            return kind
    if isinstance(module, nn.MultiheadAttention) and param in (
        "in_proj_weight",
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
    ):
        return "attention_in_proj"
    return None


def layer_name(module: str, param: str) -> str:
    """``module`` for a plain ``weight``; ``module.param`` otherwise (recurrent, attention)."""
    if param == "weight":
        return module
    return f"{module}.{param}" if module else param


def discover_layers(model: nn.Module) -> tuple[LayerInfo, ...]:
    """All quantizable weights of ``model`` in module order, tied weights listed once.

    Raises:
        ValueError: the model has no quantizable layer.
    """
    seen: dict[int, int] = {}  # id(tensor) -> index in found
    found: list[LayerInfo] = []
    aliases: dict[int, list[str]] = {}
    for module_name, module in model.named_modules():
        for param_name, tensor in module.named_parameters(recurse=False, remove_duplicate=False):
            kind = _kind(module, param_name)
            full = f"{module_name}.{param_name}" if module_name else param_name
            key = id(tensor)
            if key in seen:
                aliases.setdefault(key, []).append(full)
                continue
            if kind is None:
                continue
            seen[key] = len(found)
            shape = tuple(int(s) for s in tensor.shape)
            found.append(
                LayerInfo(
                    name=layer_name(module_name, param_name),
                    kind=kind,
                    module=module_name,
                    param=param_name,
                    shape=shape,
                    reduction_size=math.prod(shape[1:]) if len(shape) > 1 else 1,
                    num_params=tensor.numel(),
                    takes_activations=kind != "embedding",
                )
            )
    if not found:
        raise ValueError(f"{type(model).__name__}: no quantizable layer found (kinds: {KINDS})")
    for key, names in aliases.items():
        i = seen[key]
        info = found[i]
        found[i] = LayerInfo(**{**_asdict(info), "tied": tuple(names)})
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Coverage:
    """How much of a model the space covers: parameters in quantizable layers out of all, and
    the weight matrices (2-D or more) left out, by name and shape (reported, never silently
    skipped)."""

    covered_params: int
    total_params: int
    uncovered: tuple[tuple[str, tuple[int, ...]], ...]

    def line(self) -> str:
        share = self.covered_params / max(self.total_params, 1)
        text = (
            f"the space covers {self.covered_params:,} of {self.total_params:,} parameters "
            f"({100 * share:.1f}%)"
        )
        if self.uncovered:
            names = ", ".join(f"{n} {list(s)}" for n, s in self.uncovered[:4])
            more = f" and {len(self.uncovered) - 4} more" if len(self.uncovered) > 4 else ""
            text += f"; weight matrices not covered: {names}{more}"
        return text


def coverage(model: nn.Module, layers: tuple[LayerInfo, ...]) -> Coverage:
    """``Coverage`` of ``layers`` over ``model``'s parameters (shared tensors counted once)."""
    covered = {f"{la.module}.{la.param}".lstrip(".") for la in layers}
    covered |= {alias for la in layers for alias in la.tied}
    total = inside = 0
    left: list[tuple[str, tuple[int, ...]]] = []
    for name, p in model.named_parameters():  # shared tensors once
        total += p.numel()
        if name in covered:
            inside += p.numel()
        elif p.dim() >= 2:
            left.append((name, tuple(int(s) for s in p.shape)))
    return Coverage(inside, total, tuple(left))


def _asdict(info: LayerInfo) -> dict[str, object]:
    return {f: getattr(info, f) for f in LayerInfo.__slots__}
