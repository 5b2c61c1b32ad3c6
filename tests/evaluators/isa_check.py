"""Run in a subprocess under an ISA cap: the torch backend's int8 Linear kernels against the
simulated model of what ran. Prints one JSON line per case (see ``test_isa_caps.py``)."""

from __future__ import annotations

import json

import torch

from mpq.evaluators.apply import apply_config
from mpq.evaluators.backends import get_backend
from mpq.evaluators.backends.torch_backend import int8_dynamic_exact
from mpq.evaluators.cpu_isa import isa_summary
from mpq.evaluators.proxy import first_tensor
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig
from tests.models import WideInput, example_inputs


def main() -> None:
    torch.manual_seed(0)
    model = WideInput().eval()
    layers = discover_layers(model)
    x = example_inputs(model, batch=1)
    backend = get_backend("torch")
    for w_bits in (8, 4):
        config = QuantConfig.uniform(layers, LayerChoice(w_bits=w_bits, a_bits=8))
        lowered = backend.lower(model, layers, config, x)
        with torch.inference_mode():
            out = first_tensor(lowered.run()).float()
            sim = first_tensor(apply_config(model, lowered.ran_config, [x], layers=layers)(*x))
            ref = first_tensor(model(*x)).float()
        print(
            json.dumps(
                {
                    "w_bits": w_bits,
                    "isa": isa_summary(),
                    "exact": int8_dynamic_exact(),
                    "kernels": sorted(set(lowered.kernels.values())),
                    "fallbacks": lowered.fallbacks,
                    "error": float((out - sim.float()).abs().max() / ref.abs().max()),
                }
            )
        )


if __name__ == "__main__":
    main()
