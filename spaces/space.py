"""The search space and a configuration (one point of it), as frozen, typed, versioned data.

Bit-widths are integers: weights 2, 3, 4, 5, 6, 8 (integer, quantized with the seed's formulas),
16 (stored as float16) or 32 (kept at the original float32, "keep"); activations 8, 16 (float16)
or 32 (keep). A ``SearchSpace`` gives the options per dimension: defaults, per-layer overrides
(exact name beats glob, then the first matching glob wins, as torchao's ``FqnToConfig``) and
layers to skip (kept in float). ``SearchSpace.resolve`` turns it into one ``LayerOptions`` per
discovered layer; a ``QuantConfig`` picks one ``LayerChoice`` for every layer.
"""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from mpq.spaces.discover import LayerInfo
from mpq.spaces.errors import validation_error_line
from mpq.spaces.groups import fuse_groups
from mpq.spaces.names import is_glob, unknown_name_error

SCHEMA_VERSION = 1
W_BITS: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 16, 32)
A_BITS: tuple[int, ...] = (8, 16, 32)
INT_BITS_MAX = 8  # widths up to this are integer; 16 and 32 are float formats
KEEP = 32
Granularity = Literal["per_tensor", "per_channel", "per_group"]
ActMode = Literal["static", "dynamic"]
ActGranularity = Literal["per_tensor", "per_token", "per_block"]
ACT_BLOCK = 32  # per_block: symmetric int8 over blocks of 32 along the input's last axis
_FROZEN = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True, slots=True)
class Dimension:
    """One searched per-layer dimension: a field of ``LayerChoice`` (one value) and of
    ``LayerOptions`` (the tuple of options). ``ordered``: its options have an order (bits) that
    a sampler should see, so the search encodes them by rank rather than as unordered labels."""

    name: str
    ordered: bool


# NOTE: the one list of searched dimensions; the search's parameters, the overrides, MLflow's
# per-layer params and the sensitivity seeds all iterate over it. Adding a dimension: a field in
# LayerChoice and in LayerOptions, and an entry here.
DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("w_bits", ordered=True),
    Dimension("a_bits", ordered=True),
    Dimension("granularity", ordered=False),
    Dimension("group_size", ordered=True),  # with per_group only (else None in a choice)
    Dimension("symmetric", ordered=False),
    Dimension("act_mode", ordered=False),
)


class LayerChoice(BaseModel):
    """What one layer gets.

    ``w_bits`` <= 8: ``Q(w) = clamp(round(w/s) + z)`` at that width with ``granularity`` (per
    output channel; per group of ``group_size`` along the reduction axis); ``symmetric`` gives
    ``z = 0``. ``a_bits`` = 8 quantizes the layer's input activation, with ranges calibrated once
    (``static``) or computed on every call (``dynamic``, per tensor or per token; ``per_block``:
    symmetric int8 scales ``s = max|x| / 127`` per block of ``ACT_BLOCK`` along the input's last
    axis, what ``MatMulNBits`` accuracy level 4 does to its input -- a kernel's choice, recorded
    in what ran, not offered to the search).
    """

    model_config = _FROZEN
    w_bits: int = KEEP
    a_bits: int = KEEP
    granularity: Granularity = "per_channel"
    group_size: int | None = None
    symmetric: bool = True
    act_mode: ActMode = "dynamic"
    act_granularity: ActGranularity = "per_tensor"
    out_bits: int = KEEP  # 8: the output is quantized too, static (a kernel's choice: QLinearConv)

    @field_validator("w_bits")
    @classmethod
    def _w_bits(cls, v: int) -> int:
        if v not in W_BITS:
            raise ValueError(f"w_bits={v} not in {W_BITS}")
        return v

    @field_validator("a_bits")
    @classmethod
    def _a_bits(cls, v: int) -> int:
        if v not in A_BITS:
            raise ValueError(f"a_bits={v} not in {A_BITS}")
        return v

    @model_validator(mode="after")
    def _group(self) -> LayerChoice:
        if self.granularity == "per_group":
            if self.group_size is None or self.group_size < 2:
                raise ValueError(
                    f"granularity=per_group needs group_size >= 2, got {self.group_size}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only valid with granularity=per_group"
            )
        if self.out_bits not in (8, KEEP):
            raise ValueError(f"out_bits={self.out_bits} not in (8, {KEEP})")
        if self.out_bits == 8 and (self.a_bits, self.act_mode) != (8, "static"):
            raise ValueError("out_bits=8 needs a_bits=8 and act_mode=static")
        if self.act_granularity != "per_tensor" and self.act_mode != "dynamic":
            raise ValueError(f"act_granularity={self.act_granularity} needs act_mode=dynamic")
        return self

    @property
    def weight_is_int(self) -> bool:
        return self.w_bits <= INT_BITS_MAX

    def describe(self) -> str:
        """``w4 per_group32 asym a16``: the choice in a few words (what computes differs)."""
        parts = [f"w{self.w_bits}"]
        if self.weight_is_int:
            gran = self.granularity + (str(self.group_size) if self.group_size else "")
            parts += [gran, "sym" if self.symmetric else "asym"]
        parts.append(f"a{self.a_bits}")
        if self.a_bits <= INT_BITS_MAX:
            parts += [self.act_mode, self.act_granularity]
        return " ".join(parts)


def check_choice(layer: LayerInfo, choice: LayerChoice) -> str | None:
    """Why ``layer`` cannot take ``choice`` (one phrase), or None when it can."""
    if choice.granularity == "per_group" and choice.weight_is_int:
        g = choice.group_size or 0
        if layer.reduction_size % g:
            return f"group_size={g} does not divide {layer.reduction_size} (the reduction axis)"
    if choice.a_bits != KEEP and not layer.takes_activations:
        return f"a_bits={choice.a_bits} but a {layer.kind} takes no float activation (use 32)"
    return None


class LayerOptions(BaseModel):
    """The options for each dimension of one layer's choice; a single option fixes it."""

    model_config = _FROZEN
    w_bits: tuple[int, ...] = Field(
        (2, 3, 4, 6, 8, KEEP), description=f"weight bits to choose from, each in {W_BITS}"
    )
    a_bits: tuple[int, ...] = Field((KEEP,), description=f"activation bits, each in {A_BITS}")
    granularity: tuple[Granularity, ...] = Field(
        ("per_channel",), description="per_tensor, per_channel, per_group"
    )
    group_size: tuple[int, ...] = Field(
        (32,),
        description="group (block) sizes to choose from when per_group, each dividing the "
        "layer's reduction axis (a larger group: fewer scales, fewer bytes)",
    )
    symmetric: tuple[bool, ...] = Field((True,), description="symmetric (z=0) and/or asymmetric")
    act_mode: tuple[ActMode, ...] = Field(
        ("dynamic",), description="static (calibrated) and/or dynamic activation ranges"
    )
    fused_with: str | None = Field(
        None,
        description="set by the space's groups, not by hand: the first layer of this layer's "
        "fused group, whose decision it follows",
    )

    @field_validator("group_size", mode="before")
    @classmethod
    def _one_size(cls, v: object) -> object:
        return (v,) if isinstance(v, int) else v  # ``group_size: 32`` is one option

    @field_validator(*(d.name for d in DIMENSIONS))
    @classmethod
    def _non_empty(cls, v: tuple[object, ...]) -> tuple[object, ...]:
        if not v:
            raise ValueError("needs at least one option")
        if len(set(v)) != len(v):
            raise ValueError(f"repeated options {list(v)}")
        return v

    @model_validator(mode="after")
    def _bits(self) -> LayerOptions:
        LayerChoice(w_bits=max(self.w_bits), a_bits=max(self.a_bits))
        for b in self.w_bits:
            LayerChoice(w_bits=b)
        for b in self.a_bits:
            LayerChoice(a_bits=b)
        for g in self.group_size:
            if g < 2:
                raise ValueError(f"group_size={g} must be >= 2")
        return self

    def choices(self) -> tuple[LayerChoice, ...]:
        """Every distinct combination of the dimensions' options, in a fixed order."""
        names = [d.name for d in DIMENSIONS]
        out: dict[LayerChoice, None] = {}
        for values in itertools.product(*(getattr(self, n) for n in names)):
            out[self.first(**dict(zip(names, values, strict=True)))] = None
        return tuple(out)

    def first(self, **picks: Any) -> LayerChoice:
        """The choice with the first option of every dimension, except those in ``picks``
        (``group_size`` goes with ``per_group`` only)."""
        pick = {d.name: getattr(self, d.name)[0] for d in DIMENSIONS} | picks
        if pick["granularity"] != "per_group":
            pick["group_size"] = None
        elif pick["w_bits"] > INT_BITS_MAX:  # float weights: one group size stands for all
            pick["group_size"] = self.group_size[0]
        return LayerChoice(**pick)

    @property
    def is_fixed(self) -> bool:
        return len(self.choices()) == 1


class _OverrideBase(BaseModel):
    model_config = _FROZEN
    match: str = Field(..., description="a layer name, or a glob such as 'memory_gru.*'")

    @model_validator(mode="before")
    @classmethod
    def _one_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("group_size"), int):
            return {**data, "group_size": (data["group_size"],)}  # one option
        return data

    def apply(self, base: LayerOptions) -> LayerOptions:
        changes = self.model_dump(exclude={"match"}, exclude_none=True)
        return LayerOptions(**{**base.model_dump(), **changes})


# Options for the layers whose name equals ``match`` or matches it as a glob: any subset of
# ``LayerOptions``' fields (None = from the defaults), made from them so the two cannot drift.
Override = create_model(  # type: ignore[call-overload]
    "Override",
    __base__=_OverrideBase,
    __doc__="Options for the layers whose name equals ``match`` or matches it as a glob.",
    **{
        name: (f.annotation | None, Field(None, description=f.description))
        for name, f in LayerOptions.model_fields.items()
        if name != "fused_with"
    },
)


class SearchSpace(BaseModel):
    """What can be chosen, per layer; a file (YAML/JSON), never code."""

    model_config = _FROZEN
    schema_version: Literal[1] = SCHEMA_VERSION
    defaults: LayerOptions = Field(default_factory=LayerOptions)
    overrides: tuple[Override, ...] = Field((), description="per-layer options, see below")
    skip: tuple[str, ...] = Field((), description="layer names or globs kept in float")
    groups: tuple[tuple[str, ...], ...] = Field(
        (),
        description="fused groups: each a list of layer names or globs that a backend runs as "
        "one kernel (Q, K and V of one attention), searched as one decision; the layers of a "
        "group must have the same options",
    )

    @field_validator("defaults")
    @classmethod
    def _no_fused_defaults(cls, v: LayerOptions) -> LayerOptions:
        if v.fused_with is not None:
            raise ValueError("fused_with is set by groups, not in defaults")
        return v

    def resolve(
        self, layers: tuple[LayerInfo, ...], source: str = "space"
    ) -> dict[str, LayerOptions]:
        """One ``LayerOptions`` per layer, in model order.

        Defaults are narrowed to what each layer can take (an Embedding gets no activation
        bits, a group size that does not divide the layer drops ``per_group``); an exact-name
        override that asks for something the layer cannot take is an error.

        Raises:
            ValueError: an override or skip names no layer (closest names suggested), or an
                exact override is impossible for its layer.
        """
        by_name = {layer.name: layer for layer in layers}
        known = list(by_name)
        exact = {o.match: o for o in self.overrides if not is_glob(o.match)}
        globs = [o for o in self.overrides if is_glob(o.match)]
        for i, o in enumerate(self.overrides):
            hit = (
                o.match in by_name
                if not is_glob(o.match)
                else any(fnmatch.fnmatchcase(n, o.match) for n in known)
            )
            if not hit:
                raise unknown_name_error(f"{source}: overrides[{i}].match", o.match, known)
        for i, pattern in enumerate(self.skip):
            if not any(fnmatch.fnmatchcase(n, pattern) for n in known):
                raise unknown_name_error(f"{source}: skip[{i}]", pattern, known)
        resolved: dict[str, LayerOptions] = {}
        for layer in layers:
            if any(fnmatch.fnmatchcase(layer.name, p) for p in self.skip):
                resolved[layer.name] = LayerOptions(w_bits=(KEEP,), a_bits=(KEEP,))
                continue
            override = exact.get(layer.name) or next(
                (o for o in globs if fnmatch.fnmatchcase(layer.name, o.match)), None
            )
            try:
                options = override.apply(self.defaults) if override else self.defaults
            except ValidationError as exc:  # the same one-line dialect as the file's own
                where = f"{source}: overrides[{self.overrides.index(override)}]"
                raise validation_error_line(where, exc) from None
            explicit: set[str] = set()  # fields the exact override set (None = not set)
            if override is not None and override.match == layer.name:
                explicit = {
                    f for f in override.model_fields_set if getattr(override, f) is not None
                }
            resolved[layer.name] = _narrow(layer, options, explicit, source)
        return fuse_groups(resolved, self.groups, source)


def _narrow(
    layer: LayerInfo, options: LayerOptions, explicit: set[str], source: str
) -> LayerOptions:
    """Drop the options ``layer`` cannot take; an exact override that asked for them errors."""
    a_bits = options.a_bits if layer.takes_activations else (KEEP,)
    granularity, sizes = options.granularity, options.group_size
    if min(options.w_bits) <= INT_BITS_MAX:
        sizes = tuple(g for g in options.group_size if layer.reduction_size % g == 0)
    else:  # float-only weights have no groups: one size stands for all
        sizes = options.group_size[:1]
    if not sizes and "per_group" in granularity:
        granularity = tuple(g for g in granularity if g != "per_group") or ("per_channel",)
    if a_bits != options.a_bits and "a_bits" in explicit:
        probe = LayerChoice(a_bits=min(b for b in options.a_bits if b != KEEP))
        raise ValueError(f"{source}: overrides[{layer.name!r}]: {check_choice(layer, probe)}")
    if granularity != options.granularity and explicit & {"granularity", "group_size"}:
        probe = LayerChoice(
            w_bits=min(options.w_bits), granularity="per_group", group_size=options.group_size[0]
        )
        raise ValueError(f"{source}: overrides[{layer.name!r}]: {check_choice(layer, probe)}")
    if "per_group" not in granularity or not sizes:  # a group size without groups is no choice
        sizes = options.group_size[:1]
    changes = {"a_bits": a_bits, "granularity": granularity, "group_size": sizes}
    return LayerOptions(**{**options.model_dump(), **changes})


class QuantConfig(BaseModel):
    """One point of the space: a ``LayerChoice`` for every layer, keyed by layer name."""

    model_config = _FROZEN
    schema_version: Literal[1] = SCHEMA_VERSION
    layers: dict[str, LayerChoice]

    def canonical_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))

    @property
    def mean_w_bits(self) -> float | None:
        """Mean weight bit-width over the layers (None for no layer)."""
        if not self.layers:
            return None
        return sum(c.w_bits for c in self.layers.values()) / len(self.layers)

    def key(self) -> str:
        """Canonical hash (sha256 of the sorted JSON, 16 hex digits): equal configs, equal keys."""
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()[:16]

    def check(self, layers: tuple[LayerInfo, ...], source: str = "config") -> None:
        """Raise a one-line ``ValueError`` unless this covers exactly ``layers`` and each fits."""
        by_name = {layer.name: layer for layer in layers}
        for name, choice in self.layers.items():
            if name not in by_name:
                raise unknown_name_error(f"{source}: layers", name, list(by_name))
            why = check_choice(by_name[name], choice)
            if why:
                raise ValueError(f"{source}: layers[{name!r}]: {why}")
        missing = [n for n in by_name if n not in self.layers]
        if missing:
            raise ValueError(f"{source}: does not cover layers {missing}")

    @classmethod
    def uniform(cls, layers: tuple[LayerInfo, ...], choice: LayerChoice) -> QuantConfig:
        """Every layer gets ``choice`` where it fits; activations stay float where they cannot."""
        out = {}
        for layer in layers:
            c = choice
            if not layer.takes_activations and c.a_bits != KEEP:
                c = c.model_copy(update={"a_bits": KEEP})
            if check_choice(layer, c):
                c = c.model_copy(update={"granularity": "per_channel", "group_size": None})
            out[layer.name] = c
        return cls(layers=out)
