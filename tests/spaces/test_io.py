from __future__ import annotations

from pathlib import Path

import pytest

from mpq.spaces.discover import discover_layers
from mpq.spaces.io import load_config, load_space, save
from mpq.spaces.space import LayerChoice, LayerOptions, Override, QuantConfig, SearchSpace
from tests.models import RecurrentPolicy


def _config() -> QuantConfig:
    layers = discover_layers(RecurrentPolicy())
    c = QuantConfig.uniform(layers, LayerChoice(w_bits=4, a_bits=8, act_mode="static"))
    return QuantConfig(
        layers={
            **c.layers,
            "head": LayerChoice(
                w_bits=3, granularity="per_group", group_size=8, symmetric=False, a_bits=16
            ),
        }
    )


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_config_round_trip_is_lossless(tmp_path: Path, suffix: str) -> None:
    config = _config()
    path = save(config, tmp_path / f"c{suffix}")
    loaded = load_config(path)
    assert loaded == config and loaded.key() == config.key()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_space_round_trip(tmp_path: Path, suffix: str) -> None:
    space = SearchSpace(
        defaults=LayerOptions(w_bits=(2, 4, 8), a_bits=(8, 32)),
        overrides=(Override(match="gru.*", w_bits=(8, 32)),),
        skip=("head",),
    )
    assert load_space(save(space, tmp_path / f"s{suffix}")) == space


def test_malformed_yaml(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("defaults:\n  w_bits: [2, 4\n")
    with pytest.raises(ValueError, match=r"s.yaml: malformed YAML at line \d+"):
        load_space(p)


def test_malformed_json(tmp_path: Path) -> None:
    p = tmp_path / "c.json"
    p.write_text('{"layers": {')
    with pytest.raises(ValueError, match="c.json: malformed JSON at line 1"):
        load_config(p)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text("defaults: {}\nsampler: nsga2\n")
    with pytest.raises(ValueError, match="s.yaml: sampler: Extra inputs are not permitted"):
        load_space(p)


def test_bits_out_of_range_names_file_and_field(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("layers:\n  head: {w_bits: 9}\n")
    with pytest.raises(ValueError, match=r"c.yaml: layers.head.w_bits: w_bits=9 not in"):
        load_config(p)


def test_wrong_schema_version(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("schema_version: 2\nlayers: {}\n")
    with pytest.raises(ValueError, match="c.yaml: schema_version: Input should be 1"):
        load_config(p)


def test_yaml_python_tags_are_not_executed(tmp_path: Path) -> None:
    p = tmp_path / "evil.yaml"
    marker = tmp_path / "pwned"
    p.write_text(f"layers: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError, match="evil.yaml: malformed YAML"):
        load_config(p)
    assert not marker.exists()


def test_unknown_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"unknown file type '.toml'"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ValueError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping at the top, got list"):
        load_config(p)
