"""Model families users have, built from small configs (no downloads): what works so far.

GPT-2 (``transformers``): its ``Conv1D`` layers (transposed linears) become ``nn.Linear``
(exactly), so every weight matrix is in the space; a ``ModelOutput`` is read for its logits.
"""

from __future__ import annotations

import pytest
import torch

from mpq.evaluators.apply import apply_config
from mpq.evaluators.model import linear_form
from mpq.evaluators.proxy import first_tensor
from mpq.spaces.discover import coverage, discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig

transformers = pytest.importorskip("transformers")


def _gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        vocab_size=100,
        n_positions=16,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_conv1d_layers_are_linears_and_every_weight_matrix_is_covered() -> None:
    model = _gpt2()
    x = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        before = model(x).logits
        linear_form(model)
        after = model(x).logits
    assert torch.equal(before, after)  # the same layer, written as nn.Linear
    layers = discover_layers(model)
    assert sum(la.kind == "linear" for la in layers) == 8  # c_attn, c_proj, c_fc, c_proj x 2
    cov = coverage(model, layers)
    assert cov.uncovered == ()  # every 2-D weight is in the space (the rest: norms, biases)
    assert cov.covered_params / cov.total_params > 0.95
    assert "lm_head.weight" in next(la for la in layers if la.name == "transformer.wte").tied


def test_gpt2_quantizes_and_its_output_is_read_for_logits() -> None:
    model = linear_form(_gpt2())
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=4, a_bits=8))
    x = torch.randint(0, 100, (2, 8))
    q = apply_config(model, config, [(x,)], layers=layers)
    with torch.no_grad():
        out, ref = first_tensor(q(x)), first_tensor(model(x))
    assert out.shape == ref.shape == (2, 8, 100)
    assert 0 < (out - ref).abs().max() < ref.abs().max()  # quantized, and still close


def test_a_mapping_without_logits_gives_its_first_tensor_and_none_is_one_line() -> None:
    t = torch.ones(2)
    assert first_tensor({"hidden": t, "n": 3}) is t
    with pytest.raises(ValueError, match="model output dict holds no tensor"):
        first_tensor({"n": 3})
