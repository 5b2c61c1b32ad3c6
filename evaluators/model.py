"""Load a user's model: a ``module:function`` builder plus an optional ``state_dict`` checkpoint.

Checkpoints load with ``torch.load(weights_only=True)``: a file that holds pickled code is
refused, and only a mapping of tensors is accepted. Short names of the shipped models are
resolved before (``mpq.zoo.resolve_model``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from mpq.evaluators.callables import call_user, load_callable
from mpq.evaluators.outputs import OutputSpec, select_output


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, loaded without executing code.

    Raises:
        ValueError: the file is missing, holds pickled code, or is not a mapping of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  torch raises UnpicklingError, RuntimeError, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"checkpoint {str(path)!r}: refused by weights_only=True ({first})"
        ) from None
    if (
        isinstance(state, Mapping)
        and "state_dict" in state
        and isinstance(state["state_dict"], Mapping)
    ):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise ValueError(f"checkpoint {str(path)!r}: not a state_dict (a mapping of tensors)")
    return dict(state)


def build_model(
    spec: str, checkpoint: str | Path | None = None, output: OutputSpec | None = None
) -> nn.Module:
    """Call the builder named by ``spec`` and, if given, load ``checkpoint`` into it strictly;
    with ``output``, the model returns the output(s) it names (``outputs.select_output``).

    Raises:
        ValueError: the builder does not import or does not return an ``nn.Module``; the
            checkpoint does not load or does not match the model's parameters.
    """
    builder = load_callable(spec, "model")
    model = call_user(builder, spec, "model")
    if not isinstance(model, nn.Module):
        raise ValueError(f"model {spec!r}: builder returned {type(model).__name__}, not nn.Module")
    if checkpoint is not None:
        state = load_state_dict(checkpoint)
        missing, unexpected = _mismatch(model, state)
        if missing or unexpected:  # a checkpoint saved from the built (folded) form
            folded = fold_batchnorm(linear_form(model.eval()))
            if not any(_mismatch(folded, state)):
                model, missing, unexpected = folded, [], []
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} does not match model {spec!r}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            line = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), "")
            raise ValueError(
                f"checkpoint {str(checkpoint)!r} does not match model {spec!r}: "
                f"{line or 'shape mismatch'}"
            ) from None
    return select_output(fold_batchnorm(linear_form(model.eval())), output)


_BATCHNORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """In place, in eval mode: each BatchNorm that directly follows a convolution (its only
    user) is folded into it (``torch.nn.utils.fusion.fuse_conv_bn_eval``: ``W' = W g / s``,
    ``b' = (b - m) g / s + beta``) and becomes ``nn.Identity``. What ships is then the folded
    weight, quantized as such: the exporter would fold it anyway and rename the weight, and the
    convolution would not be found in the export. The model keeps its class and methods; the
    outputs are equal up to float rounding. torchvision's ``FrozenBatchNorm2d`` (a ResNet
    backbone's, LeRobot ACT's) folds the same way. A model that ``torch.fx`` cannot trace is
    left as it is (its parent's forward may reach inside a traceable part: only the caller
    knows which part is called as a whole, e.g. ``lerobot_policy`` folds a policy's
    backbone)."""
    if model.training or not any(_is_batchnorm(m) for m in model.modules()):
        return model
    try:
        graph = _BatchNormLeaves().trace(model)
    except Exception:  # noqa: BLE001  dynamic control flow: nothing folded, nothing changed
        return model
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    read = {str(n.target).rsplit(".", 1)[0] for n in graph.nodes if n.op == "get_attr"}
    for node in graph.nodes:
        if node.op != "call_module" or not _is_batchnorm(modules.get(node.target)):
            continue
        src = node.args[0] if node.args else None
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        conv, bn = modules.get(src.target), modules[node.target]
        if not isinstance(conv, _CONV) or bn.running_mean is None:
            continue
        # only a pair each called once, whose parameters the forward does not read itself,
        # with no parametrization or hook that a weight copy would bypass
        once = calls.get(str(src.target)) == 1 and calls.get(str(node.target)) == 1
        plain = not any(
            getattr(m, "parametrizations", None) or m._forward_hooks or m._forward_pre_hooks
            for m in (conv, bn)
        )
        if not once or not plain or {str(src.target), str(node.target)} & read:
            continue
        fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
        with torch.no_grad():
            conv.weight.copy_(fused.weight)
            if conv.bias is None:
                conv.bias = nn.Parameter(fused.bias.detach().clone())
            else:
                conv.bias.copy_(fused.bias)
        parent_name, _, child = str(node.target).rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, nn.Identity())
    return model


class _BatchNormLeaves(torch.fx.Tracer):
    """fx keeps ``torch.nn``'s modules as calls; torchvision's ``FrozenBatchNorm2d`` too."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_batchnorm(m) or super().is_leaf_module(m, module_qualified_name)


_FROZEN_FIELDS = ("weight", "bias", "running_mean", "running_var", "eps")


def _is_batchnorm(module: nn.Module | None) -> bool:
    """A BatchNorm, or torchvision's ``FrozenBatchNorm2d`` (by name: torchvision may not
    import) with what folding reads (a copy elsewhere may hard-code ``eps``: left alone)."""
    if isinstance(module, _BATCHNORM):
        return True
    frozen = type(module).__name__ == "FrozenBatchNorm2d"
    return frozen and all(hasattr(module, f) for f in _FROZEN_FIELDS)


def linear_form(model: nn.Module) -> nn.Module:
    """In place: each transposed linear layer (``transformers``' ``Conv1D`` in GPT-2: ``y = x @
    W + b`` with ``W`` of shape (in, out)) becomes the ``nn.Linear`` it is (weight ``W^T``), so
    discovery, quantization (per output channel, groups along the input), packing and every
    backend's kernels treat it as one; the outputs are equal. Returns the model (itself where
    it is such a layer)."""
    if _is_transposed_linear(model):
        return _to_linear(model)
    for name, module in list(model.named_modules()):
        if name and _is_transposed_linear(module):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, _to_linear(module))
    return model


def _is_transposed_linear(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


def _to_linear(module: nn.Module) -> nn.Linear:
    w = module.weight  # (in, out)
    bias = getattr(module, "bias", None)
    linear = nn.Linear(
        w.shape[0], w.shape[1], bias=bias is not None, device=w.device, dtype=w.dtype
    )
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if bias is not None:
            linear.bias.copy_(bias)
    return linear


def _mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    own = set(model.state_dict())
    return sorted(own - set(state)), sorted(set(state) - own)
