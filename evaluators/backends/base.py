"""The backend interface and its registry (``@register_backend("name")``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from mpq.spaces.discover import LayerInfo
from mpq.spaces.space import LayerChoice, QuantConfig


@dataclass(frozen=True)
class Lowered:
    """A lowered model: ``run()`` executes it once on the example inputs.

    ``kernels`` maps each layer to the kernel that really ran; ``fallbacks`` maps the layers
    whose asked choice had no kernel to the reason and what ran instead; ``ran_config`` is what
    ran, as a configuration, so the simulated model of it is the reference for the outputs.
    """

    run: Callable[[], Any]
    module: Any
    kernels: dict[str, str]
    fallbacks: dict[str, str] = field(default_factory=dict)
    ran_config: QuantConfig | None = None  # what really ran, as a configuration
    stored_bytes: int | None = None  # bytes of the weights the artifact stores, as it packs them
    predicted_bytes: int | None = None  # the same from the backend's packing formula
    # A new runner on a freshly created session of the same artifact (the latency protocol's
    # visits); None where a backend has one compiled module only (``run`` is reused).
    fresh: Callable[[], Callable[[], Any]] | None = None
    # The deployable file (its bytes) that runs without mpq, and what it is ("onnx"); None for
    # a measure-only backend (its lowered module needs mpq and torch to run).
    artifact: bytes | None = None
    artifact_kind: str = "measure-only"

    def new_runner(self) -> Callable[[], Any]:
        return self.fresh() if self.fresh is not None else self.run


class Backend(Protocol):
    name: str

    def supported_w_bits(self, layer: LayerInfo) -> tuple[int, ...]:
        """Weight bit-widths this backend has a real kernel for on ``layer``."""
        ...

    def kernel_for(self, layer: LayerInfo, choice: LayerChoice) -> str:
        """The kernel ``choice`` runs on for ``layer``, without lowering (latency tables)."""
        ...

    def fallback_reason(self, layer: LayerInfo, choice: LayerChoice) -> str | None:
        """Why ``choice`` on ``layer`` would not run as asked (and what runs), or None.

        Decided from the layer's kind and the choice alone, so a space can be checked before
        any trial; ``lower()`` records the same reasons (plus any found only at export).
        """
        ...

    def lower(
        self,
        model: nn.Module,
        layers: tuple[LayerInfo, ...],
        config: QuantConfig,
        example_inputs: tuple[Any, ...],
        threads: int = 1,
        calibration: list[tuple[Any, ...]] | None = None,
        observer: str = "minmax",
    ) -> Lowered:
        """The model with ``config`` on this backend's kernels, runnable on ``example_inputs``.

        ``calibration`` (batches of model inputs) sets the ranges of static int8 activations,
        with ``observer`` (as the simulated model calibrates them).
        """
        ...


BACKENDS: dict[str, Callable[[], Backend]] = {}


def register_backend(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        cls.name = name  # type: ignore[attr-defined]
        BACKENDS[name] = cls
        return cls

    return wrap


class FallbackError(ValueError):
    """A choice the backend cannot run as asked, with fallback disabled."""


def check_no_fallback(
    backend: Backend,
    layers: tuple[LayerInfo, ...],
    choices: dict[str, tuple[LayerChoice, ...]],
    where: str,
) -> None:
    """Raise ``FallbackError`` on the first (layer, choice) the backend would lower.

    Args:
        choices: per layer name, the choices that may be asked of it (a resolved space's options
            or one configuration's choice).
        where: the file/field prefix of the message.
    """
    for la in layers:
        for choice in choices.get(la.name, ()):
            reason = backend.fallback_reason(la, choice)
            if reason is not None:
                raise FallbackError(
                    f"{where}: layer {la.name!r} {describe(choice)}: backend {backend.name!r} "
                    f"cannot run it as asked ({reason}) and latency.allow_fallback is false"
                )


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} not in {sorted(BACKENDS)}")
    return BACKENDS[name]()


def describe(choice: LayerChoice) -> str:
    w = (
        "float32"
        if choice.w_bits == 32
        else ("float16" if choice.w_bits == 16 else f"int{choice.w_bits}")
    )
    return f"w:{w} a:{'float' if choice.a_bits == 32 else choice.a_bits}"
