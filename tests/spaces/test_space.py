from __future__ import annotations

import pytest
from pydantic import ValidationError

from mpq.spaces.discover import discover_layers
from mpq.spaces.space import LayerChoice, LayerOptions, Override, QuantConfig, SearchSpace
from tests.models import ConvNet, RecurrentPolicy

CONV = discover_layers(ConvNet())
REC = discover_layers(RecurrentPolicy())


def test_exact_name_beats_glob_and_first_glob_wins() -> None:
    space = SearchSpace(
        overrides=(
            Override(match="conv*", w_bits=(4,)),
            Override(match="conv?", w_bits=(6,)),
            Override(match="conv2", w_bits=(8,)),
        )
    )
    r = space.resolve(CONV)
    assert r["conv1"].w_bits == (4,)  # first glob
    assert r["conv2"].w_bits == (8,)  # exact
    assert r["fc"].w_bits == LayerOptions().w_bits  # defaults


def test_skip_keeps_float_and_is_fixed() -> None:
    r = SearchSpace(skip=("fc",)).resolve(CONV)
    assert r["fc"].w_bits == (32,) and r["fc"].is_fixed
    assert not r["conv1"].is_fixed


def test_unknown_override_suggests_closest_names() -> None:
    with pytest.raises(
        ValueError, match=r"overrides\[0\].match: unknown layer 'conv_2'; closest: \['conv2'"
    ):
        SearchSpace(overrides=(Override(match="conv_2", w_bits=(8,)),)).resolve(CONV)


def test_unknown_skip_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"skip\[0\]: unknown layer 'nope\*'"):
        SearchSpace(skip=("nope*",)).resolve(CONV)


@pytest.mark.parametrize("bits", [1, 7, 9, 64])
def test_bits_out_of_range(bits: int) -> None:
    with pytest.raises(ValidationError, match=f"w_bits={bits} not in"):
        LayerChoice(w_bits=bits)
    with pytest.raises(ValidationError, match=f"w_bits={bits} not in"):
        LayerOptions(w_bits=(4, bits))


def test_activation_bits_out_of_range() -> None:
    with pytest.raises(ValidationError, match="a_bits=4 not in"):
        LayerChoice(a_bits=4)


def test_group_size_rules() -> None:
    with pytest.raises(ValidationError, match="per_group needs group_size >= 2"):
        LayerChoice(w_bits=4, granularity="per_group")
    with pytest.raises(
        ValidationError, match="group_size=8 is only valid with granularity=per_group"
    ):
        LayerChoice(w_bits=4, group_size=8)


def test_defaults_narrow_to_what_a_layer_takes() -> None:
    space = SearchSpace(
        defaults=LayerOptions(a_bits=(8, 32), granularity=("per_group",), group_size=16)
    )
    r = space.resolve(REC)
    assert r["embed"].a_bits == (32,)  # an Embedding takes indices
    assert r["head"].granularity == ("per_group",)  # 32 % 16 == 0
    r2 = SearchSpace(
        defaults=LayerOptions(granularity=("per_channel", "per_group"), group_size=64)
    ).resolve(CONV)
    assert r2["conv1"].granularity == ("per_channel",)  # 27 % 64 != 0


def test_exact_override_the_layer_cannot_take_is_an_error() -> None:
    space = SearchSpace(
        overrides=(Override(match="conv1", granularity=("per_group",), group_size=16),)
    )
    with pytest.raises(
        ValueError, match=r"overrides\['conv1'\]: group_size=16 does not divide 27"
    ):
        space.resolve(CONV)
    space = SearchSpace(overrides=(Override(match="embed", a_bits=(8,)),))
    with pytest.raises(ValueError, match="a_bits=8 but a embedding takes no float activation"):
        space.resolve(REC)


def test_config_must_cover_the_model() -> None:
    config = QuantConfig(layers={"conv1": LayerChoice(w_bits=4)})
    with pytest.raises(ValueError, match=r"does not cover layers \['conv2', 'conv1d', 'fc'\]"):
        config.check(CONV)


def test_config_unknown_layer_and_impossible_choice() -> None:
    full = QuantConfig.uniform(CONV, LayerChoice(w_bits=4))
    bad = QuantConfig(layers={**full.layers, "fc2": LayerChoice()})
    with pytest.raises(ValueError, match=r"unknown layer 'fc2'; closest: \['fc'"):
        bad.check(CONV)
    bad = QuantConfig(
        layers={
            **full.layers,
            "conv1": LayerChoice(w_bits=4, granularity="per_group", group_size=4),
        }
    )
    with pytest.raises(ValueError, match=r"layers\['conv1'\]: group_size=4 does not divide 27"):
        bad.check(CONV)


def test_uniform_respects_layer_limits_and_key_is_canonical() -> None:
    c = QuantConfig.uniform(REC, LayerChoice(w_bits=4, a_bits=8))
    c.check(REC)
    assert c.layers["embed"].a_bits == 32 and c.layers["head"].a_bits == 8
    reordered = QuantConfig(layers=dict(reversed(list(c.layers.items()))))
    assert reordered.key() == c.key()
    assert QuantConfig.uniform(REC, LayerChoice(w_bits=8)).key() != c.key()


def test_choices_enumerate_the_product() -> None:
    opts = LayerOptions(w_bits=(4, 8), a_bits=(8, 32), granularity=("per_channel", "per_group"))
    choices = opts.choices()
    assert len(choices) == 8 and len(set(choices)) == 8
    assert all(c.group_size == 32 for c in choices if c.granularity == "per_group")


def test_configs_are_frozen() -> None:
    c = LayerChoice(w_bits=4)
    with pytest.raises(ValidationError, match="frozen"):
        c.w_bits = 8  # type: ignore[misc]


def test_a_round_tripped_space_resolves_the_same() -> None:
    space = SearchSpace(
        defaults=LayerOptions(a_bits=(8, 32)), overrides=(Override(match="embed", w_bits=(4, 8)),)
    )
    again = SearchSpace.model_validate(space.model_dump())  # None fields now explicitly set
    assert again.resolve(REC) == space.resolve(REC)
    assert again.resolve(REC)["embed"].a_bits == (32,)


def test_a_fused_group_marks_its_layers_with_its_first() -> None:
    space = SearchSpace(groups=(("conv2", "conv1"),))
    resolved = space.resolve(CONV)
    assert resolved["conv1"].fused_with == "conv1" and resolved["conv2"].fused_with == "conv1"
    assert resolved["fc"].fused_with is None
    globbed = SearchSpace(groups=(("conv?",),)).resolve(CONV)
    assert globbed["conv2"].fused_with == "conv1"


@pytest.mark.parametrize(
    ("space", "message"),
    [
        (
            SearchSpace(groups=(("conv1", "convx"),)),
            r"^s: groups\[0\]\[1\]: unknown layer 'convx'",
        ),
        (
            SearchSpace(groups=(("conv1",),)),
            r"^s: groups\[0\] needs two or more layers, got \['conv1'\]$",
        ),
        (
            SearchSpace(groups=(("conv1", "conv2"), ("conv2", "fc"))),
            r"^s: groups\[1\]: layer 'conv2' is in groups\[0\] too$",
        ),
        (
            SearchSpace(overrides=(Override(match="conv2", w_bits=(4, 8)),), groups=(("conv*",),)),
            r"^s: groups\[0\]: 'conv1' and 'conv2' have different w_bits options "
            r"\(\[2, 3, 4, 6, 8, 32\] vs \[4, 8\]\); a fused group is one decision$",
        ),
    ],
)
def test_a_bad_fused_group_is_one_line(space: SearchSpace, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        space.resolve(CONV, "s")


def test_fused_with_is_not_set_by_hand() -> None:
    with pytest.raises(ValidationError, match="fused_with is set by groups"):
        SearchSpace.model_validate({"defaults": {"fused_with": "conv1"}})
    with pytest.raises(ValidationError, match="fused_with"):
        Override.model_validate({"match": "conv1", "fused_with": "conv2"})
