from __future__ import annotations

import pytest
import torch

from mpq.evaluators.apply import apply_config
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig
from tests.models import ALL_MODELS, ConvNet, TiedLM, TinyTransformer, example_inputs


@pytest.mark.parametrize("model_cls", ALL_MODELS)
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_apply_leaves_original_untouched_and_tracks_bits(model_cls: type, mode: str) -> None:
    torch.manual_seed(0)
    model = model_cls().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = example_inputs(model)
    ref = model(*x)
    layers = discover_layers(model)
    errors = {}
    for bits in (8, 4, 2):
        config = QuantConfig.uniform(layers, LayerChoice(w_bits=bits, a_bits=8, act_mode=mode))
        q = apply_config(model, config, calibration=[x])
        errors[bits] = float((q(*x) - ref).abs().mean())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert errors[8] < errors[4] < errors[2]
    assert errors[8] < 0.05 * float(ref.abs().mean()) + 1e-3


def test_keep_config_is_identity() -> None:
    model = TinyTransformer().eval()
    x = example_inputs(model)
    layers = discover_layers(model)
    q = apply_config(model, QuantConfig.uniform(layers, LayerChoice()))
    assert torch.equal(q(*x), model(*x))


def test_static_activations_need_calibration() -> None:
    model = ConvNet().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=8, a_bits=8, act_mode="static"))
    with pytest.raises(ValueError, match="static activations need calibration data"):
        apply_config(model, config)
    with pytest.raises(ValueError, match="calibration data is empty"):
        apply_config(model, config, calibration=[])
    bad = torch.randn(2, 3, 8, 8)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="calibration batch 0 input 0: 1 NaN/Inf"):
        apply_config(model, config, calibration=[(bad,)])


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_observers(observer: str) -> None:
    model = ConvNet().eval()
    x = example_inputs(model, batch=8)
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=8, a_bits=8, act_mode="static"))
    q = apply_config(model, config, calibration=[x], observer=observer)
    assert torch.allclose(q(*x), model(*x), atol=0.05)


def test_unknown_observer() -> None:
    model = ConvNet().eval()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=8, a_bits=8, act_mode="static"))
    with pytest.raises(
        ValueError, match=r"observer='kl' not in \['minmax', 'mse', 'percentile'\]"
    ):
        apply_config(model, config, calibration=[example_inputs(model)], observer="kl")


def test_tied_weights_stay_tied() -> None:
    model = TiedLM().eval()
    layers = discover_layers(model)
    q = apply_config(model, QuantConfig.uniform(layers, LayerChoice(w_bits=4)))
    assert q.out.weight is q.embed.weight
    assert not torch.equal(q.embed.weight, model.embed.weight)


def test_config_that_does_not_fit_is_refused() -> None:
    model = ConvNet().eval()
    with pytest.raises(ValueError, match="does not cover layers"):
        apply_config(model, QuantConfig(layers={"fc": LayerChoice(w_bits=4)}))
