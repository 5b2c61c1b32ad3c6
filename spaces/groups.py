"""Fused groups: layers that a backend runs as one kernel (Q, K and V of one attention), one
decision of the search. ``fuse_groups`` marks each group's layers ``fused_with`` its first
layer (in model order); the study's parameters and the allocators follow that mark."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mpq.spaces.names import unknown_name_error

if TYPE_CHECKING:
    from mpq.spaces.space import LayerOptions


def fuse_groups(
    resolved: dict[str, LayerOptions], groups: Sequence[Sequence[str]], source: str
) -> dict[str, LayerOptions]:
    """Mark each group's layers ``fused_with`` its first layer (in model order).

    Raises:
        ValueError: a pattern matches no layer, a group has fewer than two layers, a layer
            is in two groups, or two layers of a group have different options.
    """
    known = list(resolved)
    taken: dict[str, int] = {}
    out = dict(resolved)
    for i, group in enumerate(groups):
        members: list[str] = []
        for j, pattern in enumerate(group):
            hits = [n for n in known if n == pattern or fnmatch.fnmatchcase(n, pattern)]
            if not hits:
                raise unknown_name_error(f"{source}: groups[{i}][{j}]", pattern, known)
            members += [n for n in hits if n not in members]
        members.sort(key=known.index)
        if len(members) < 2:
            raise ValueError(f"{source}: groups[{i}] needs two or more layers, got {members}")
        for name in members:
            if name in taken:
                raise ValueError(
                    f"{source}: groups[{i}]: layer {name!r} is in groups[{taken[name]}] too"
                )
            taken[name] = i
            if resolved[name] != resolved[members[0]]:
                a, b = resolved[members[0]].model_dump(), resolved[name].model_dump()
                dim = next(k for k in a if a[k] != b[k])
                raise ValueError(
                    f"{source}: groups[{i}]: {members[0]!r} and {name!r} have different "
                    f"{dim} options ({list(a[dim])} vs {list(b[dim])}); a fused group is "
                    "one decision"
                )
        for name in members:
            out[name] = resolved[name].model_copy(update={"fused_with": members[0]})
    return out
