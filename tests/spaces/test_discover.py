from __future__ import annotations

import pytest
from torch import nn

from mpq.spaces.discover import discover_layers
from mpq.zoo.babyai import BabyAIVLAPolicy
from tests.models import ConvNet, RecurrentPolicy, TiedLM, TinyTransformer


def _kinds(model: nn.Module) -> dict[str, str]:
    return {la.name: la.kind for la in discover_layers(model)}


def test_convnet_conv_and_linear() -> None:
    assert _kinds(ConvNet()) == {
        "conv1": "conv2d",
        "conv2": "conv2d",
        "conv1d": "conv1d",
        "fc": "linear",
    }
    conv2 = discover_layers(ConvNet())[1]
    assert conv2.shape == (16, 8, 3, 3) and conv2.reduction_size == 72 and conv2.num_params == 1152


def test_recurrent_weights_and_embedding() -> None:
    kinds = _kinds(RecurrentPolicy())
    assert kinds == {
        "embed": "embedding",
        "gru.weight_ih_l0": "gru",
        "gru.weight_hh_l0": "gru",
        "lstm.weight_ih_l0": "lstm",
        "lstm.weight_hh_l0": "lstm",
        "head": "linear",
    }
    embed = discover_layers(RecurrentPolicy())[0]
    assert not embed.takes_activations


def test_attention_projections() -> None:
    kinds = _kinds(TinyTransformer())
    assert kinds["attn.in_proj_weight"] == "attention_in_proj"
    assert kinds["attn.out_proj"] == "linear"
    assert set(kinds) == {"attn.in_proj_weight", "attn.out_proj", "ff1", "ff2"}


def test_tied_weights_are_one_layer() -> None:
    layers = discover_layers(TiedLM())
    assert [la.name for la in layers] == ["embed", "proj"]
    assert layers[0].tied == ("out.weight",)


def test_rnn_and_conv3d() -> None:
    model = nn.Sequential(nn.RNN(4, 4), nn.Conv3d(2, 2, 1))
    assert _kinds(model) == {"0.weight_ih_l0": "rnn", "0.weight_hh_l0": "rnn", "1": "conv3d"}


def test_embedded_policy_has_every_kind() -> None:
    kinds = set(_kinds(BabyAIVLAPolicy()).values())
    assert kinds == {"embedding", "gru", "conv2d", "linear", "attention_in_proj"}


def test_no_quantizable_layer_is_an_error() -> None:
    with pytest.raises(ValueError, match="LayerNorm: no quantizable layer found"):
        discover_layers(nn.LayerNorm(4))
