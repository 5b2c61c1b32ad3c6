"""mpq: mixed-precision quantization search."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load(path: str | Path) -> Any:
    """The quantized model of an export folder (``mpq export``, ``best/``) as a PyTorch
    module: the packed weights unpacked to the values that ran, activations quantized as
    searched. See ``mpq.search.export.load_export``."""
    from mpq.search.export import load_export

    return load_export(path)
