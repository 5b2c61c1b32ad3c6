"""Exact size: the formula of evaluators/size.py against bytes packed by evaluators/pack.py."""

from __future__ import annotations

import random

import pytest
import torch

from mpq.evaluators.artifact import pack_state, payload_bytes
from mpq.evaluators.size import config_size, float_size_bytes
from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, QuantConfig, check_choice
from mpq.zoo.babyai import BabyAIVLAPolicy
from tests.models import ALL_MODELS


def _random_config(layers, rng: random.Random) -> QuantConfig:  # type: ignore[no-untyped-def]
    out = {}
    for la in layers:
        while True:
            gran = rng.choice(["per_tensor", "per_channel", "per_group"])
            c = LayerChoice(
                w_bits=rng.choice([2, 3, 4, 5, 6, 8, 16, 32]),
                granularity=gran,
                group_size=rng.choice([2, 4, 8, 16]) if gran == "per_group" else None,
                symmetric=rng.random() < 0.5,
            )
            if check_choice(la, c) is None:
                out[la.name] = c
                break
    return QuantConfig(layers=out)


@pytest.mark.parametrize("model_cls", [*ALL_MODELS, BabyAIVLAPolicy])
@pytest.mark.parametrize("seed", range(4))
def test_formula_equals_packed_bytes(model_cls: type, seed: int) -> None:
    torch.manual_seed(seed)
    model = model_cls()
    layers = discover_layers(model)
    config = _random_config(layers, random.Random(seed))
    assert config_size(model, layers, config).total_bytes == payload_bytes(
        pack_state(model, layers, config)
    )


def test_keep_everything_is_the_float_size() -> None:
    model = BabyAIVLAPolicy()
    layers = discover_layers(model)
    keep = QuantConfig.uniform(layers, LayerChoice())
    assert config_size(model, layers, keep).total_bytes == float_size_bytes(model)


def test_hand_computed_layer_bytes() -> None:
    # fc: 10x16 weights at 3 bits per channel, asymmetric: ceil(160*3/8)=60 + 10*4 + ceil(10*3/8)=4
    from tests.models import ConvNet

    model = ConvNet()
    layers = discover_layers(model)
    config = QuantConfig.uniform(layers, LayerChoice(w_bits=3, symmetric=False))
    assert config_size(model, layers, config).layer_bytes["fc"] == 60 + 40 + 4


def test_tied_weight_counted_once() -> None:
    from tests.models import TiedLM

    model = TiedLM()
    layers = discover_layers(model)
    report = config_size(model, layers, QuantConfig.uniform(layers, LayerChoice()))
    assert report.total_bytes == float_size_bytes(model) == (50 * 16 + 16 * 16 + 16) * 4
