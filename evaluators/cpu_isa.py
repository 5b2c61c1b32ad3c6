"""What the CPU's integer kernels can do here: its SIMD extensions, and the caps set on them.

Integer numerics depend on the instruction set, not only on the code: without VNNI (AVX2, plain
AVX-512) a ``u8 x s8`` multiply-add (``vpmaddubsw``) sums pairs of products in 16 bits and
saturates when both operands use their full range (``2 * 255 * 127 > 32767``): the reason
fbgemm's ``reduce_range`` exists. VNNI (``vpdpbusd``, AVX512-VNNI or AVX-VNNI) and AMX
accumulate in 32 bits and are exact. oneDNN and ATen can be capped below what the CPU has
(``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``), so a figure records both the CPU's flags and
the caps in force.
"""

from __future__ import annotations

import functools
import os

_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_tile", "amx_int8")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The ``flags`` of the first processor in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def isa_caps() -> dict[str, str]:
    """The caps on the kernel libraries' instruction sets set in this process's environment."""
    names = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
    return {n: os.environ[n] for n in names if os.environ.get(n)}


def isa_summary() -> str:
    """``avx2 avx512f avx512_vnni amx_int8 (ONEDNN_MAX_CPU_ISA=AVX2)``: what a figure ran on."""
    flags = cpu_flags()
    have = [f for f in _FEATURES if f in flags] or ["no avx2"]
    caps = isa_caps()
    capped = f" ({', '.join(f'{k}={v}' for k, v in caps.items())})" if caps else ""
    return " ".join(have) + capped
