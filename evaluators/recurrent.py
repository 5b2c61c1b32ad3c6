"""Recurrent layers as their matrix products, so those run on the same low-bit kernels as Linear.

A GRU step (PyTorch's gate order r, z, n)::

    gi = W_ih x + b_ih,   gh = W_hh h + b_hh          (the two products: MatMul nodes)
    r = sigmoid(gi_r + gh_r),  z = sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n),  h' = (1 - z) * n + z * h = (h - n) * z + n

an LSTM step ``i, f, g, o = split(gi + gh)``, ``c' = sig(f) c + sig(i) tanh(g)``,
``h' = sig(o) tanh(c')``, an Elman RNN ``h' = tanh(gi + gh)`` (or relu). ``StepwiseRecurrent``
computes exactly these with two ``nn.Linear`` children named after the weights they hold
(``weight_ih_l0``, ``weight_hh_l0``), so an export names each product's node by its layer.

NOTE: where it pays. A policy run one control step at a time calls its memory GRU with T = 1:
there the step is two MatMuls and a few elementwise nodes, and the MatMuls can be low-bit. Over
T tokens the export unrolls T steps (a GRU over 24 instruction tokens multiplied the node count
by 4 and ran slower than ONNX Runtime's fused float GRU), so only modules the example inputs
call with T = 1 are rewritten (``sequence_lengths``).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mpq.evaluators.inputs import Inputs, call


def rewritable(module: nn.Module) -> str | None:
    """Why ``module`` cannot be rewritten (None: it can): one layer, one direction, no
    projection."""
    if not isinstance(module, nn.RNNBase):
        return "not a recurrent module"
    if module.num_layers != 1 or module.bidirectional:
        return "only a single-layer, one-direction recurrent module is rewritten"
    if getattr(module, "proj_size", 0):
        return "an LSTM with proj_size is not rewritten"
    return None


class StepwiseRecurrent(nn.Module):
    """A single-layer, unidirectional ``nn.GRU``/``nn.LSTM``/``nn.RNN`` computed step by step
    from its two products (same weights, same outputs, same argument layout)."""

    def __init__(self, rnn: nn.RNNBase) -> None:
        super().__init__()
        why = rewritable(rnn)
        if why is not None:
            raise ValueError(f"{type(rnn).__name__}: {why}")
        self.mode = rnn.mode  # "GRU", "LSTM", "RNN_TANH", "RNN_RELU"
        self.batch_first = rnn.batch_first
        self.hidden_size = rnn.hidden_size
        gates, width = rnn.weight_ih_l0.shape
        like = {"device": rnn.weight_ih_l0.device, "dtype": rnn.weight_ih_l0.dtype}
        self.weight_ih_l0 = nn.Linear(width, gates, bias=rnn.bias, **like)
        self.weight_hh_l0 = nn.Linear(rnn.hidden_size, gates, bias=rnn.bias, **like)
        with torch.no_grad():
            self.weight_ih_l0.weight.copy_(rnn.weight_ih_l0)
            self.weight_hh_l0.weight.copy_(rnn.weight_hh_l0)
            if rnn.bias:
                self.weight_ih_l0.bias.copy_(rnn.bias_ih_l0)  # type: ignore[union-attr]
                self.weight_hh_l0.bias.copy_(rnn.bias_hh_l0)  # type: ignore[union-attr]

    def _step(self, x: torch.Tensor, h: torch.Tensor, c: torch.Tensor | None) -> tuple[Any, ...]:
        gi, gh = self.weight_ih_l0(x), self.weight_hh_l0(h)
        if self.mode == "GRU":
            ir, iz, i_n = gi.chunk(3, dim=-1)
            hr, hz, h_n = gh.chunk(3, dim=-1)
            r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
            n = torch.tanh(i_n + r * h_n)
            return (h - n) * z + n, None  # = (1 - z) n + z h, in ATen's order of operations
        if self.mode == "LSTM":
            i, f, g, o = (gi + gh).chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            return torch.sigmoid(o) * torch.tanh(c), c
        pre = gi + gh
        return (torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)), None

    def forward(self, x: torch.Tensor, hx: Any = None) -> tuple[torch.Tensor, Any]:
        unbatched = x.dim() == 2
        if unbatched:  # (T, D): one sequence
            x = x.unsqueeze(0 if self.batch_first else 1)
            hx = None if hx is None else tuple_map(hx, lambda t: t.unsqueeze(1))
        seq = x if self.batch_first else x.transpose(0, 1)  # (B, T, D)
        b = seq.shape[0]
        zeros = seq.new_zeros(b, 1, self.hidden_size)
        if self.mode == "LSTM":
            h, c = (zeros, zeros) if hx is None else (hx[0].transpose(0, 1), hx[1].transpose(0, 1))
        else:
            h, c = (zeros if hx is None else hx.transpose(0, 1)), None
        outs = []
        for t in range(seq.shape[1]):
            h, c = self._step(seq[:, t : t + 1], h, c)
            outs.append(h)
        out = torch.cat(outs, dim=1)  # (B, T, H)
        out = out if self.batch_first else out.transpose(0, 1)
        state: Any = h.transpose(0, 1) if c is None else (h.transpose(0, 1), c.transpose(0, 1))
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
            state = tuple_map(state, lambda t: t.squeeze(1))
        return out, state


def tuple_map(value: Any, fn: Any) -> Any:
    return tuple(fn(v) for v in value) if isinstance(value, tuple) else fn(value)


def sequence_lengths(model: nn.Module, example_inputs: Inputs) -> dict[str, int]:
    """Module name -> the number of steps each recurrent module runs on ``example_inputs``
    (the most seen, where it is called more than once)."""
    seen: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.RNNBase):
            continue

        def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor):  # a PackedSequence or a keyword call: unknown
                seen[name] = max(seen.get(name, 0), 2)  # never rewritten
                return
            steps = x.shape[0] if x.dim() == 2 else x.shape[1 if mod.batch_first else 0]
            seen[name] = max(seen.get(name, 0), int(steps))

        handles.append(module.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            call(model, example_inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def replace_stepwise(model: nn.Module, names: set[str]) -> nn.Module:
    """In place: the recurrent modules ``names`` of ``model`` become ``StepwiseRecurrent``;
    returns the model (a new one where ``model`` itself is named, as ``""``)."""
    if "" in names:  # the model is the recurrent module
        return StepwiseRecurrent(model)  # type: ignore[arg-type]
    for name in sorted(names):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, StepwiseRecurrent(getattr(parent, child)))
    return model


def with_stepwise(model: nn.Module, names: set[str]) -> nn.Module:
    """A copy of ``model`` with the recurrent modules ``names`` replaced by ``StepwiseRecurrent``
    (the model itself is untouched)."""
    return replace_stepwise(copy.deepcopy(model), names)
