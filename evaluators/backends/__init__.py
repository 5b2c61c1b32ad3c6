"""Real-kernel backends, registered by name: lower a model + configuration to something runnable.

Each backend reports, per layer, what was asked and the kernel that really ran; a choice it has
no kernel for is lowered to the nearest format it has, and that is recorded, never hidden.
"""

from __future__ import annotations

from mpq.evaluators.backends import onnxruntime_backend as _ort_backend  # noqa: F401
from mpq.evaluators.backends import torch_backend as _torch_backend  # noqa: F401  (registers)
from mpq.evaluators.backends import torch_eager_backend as _eager  # noqa: F401
from mpq.evaluators.backends.base import BACKENDS, Backend, Lowered, get_backend, register_backend

__all__ = ["BACKENDS", "Backend", "Lowered", "get_backend", "register_backend"]
