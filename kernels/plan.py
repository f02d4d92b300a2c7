"""Steady-state launches: the bytes a launch moves, measured once per launch site and shapes.

`launch.tensor_bytes` walks a launch's arguments and merges their address ranges so that memory shared by
several arguments counts once; that costs ~5 us a launch, more than the rest of fusednn's Python for it.
A launch site with given shapes passes arguments whose sharing is fixed by the graph (a [dw | db] buffer
and its db slice, the same value read twice), so the figure measured on its first launch holds for every
later one and is passed as `nbytes=`. (The exception: a user passing one tensor for two inputs of a
compiled function that were distinct on its first call, or the reverse, gets bytes counted as then.)
"""
from __future__ import annotations

from typing import Any, Hashable

from fusednn.launch import tensor_bytes


def bytes_once(cache: dict, key: Hashable, args: tuple[Any, ...]) -> int:
    """tensor_bytes(args) on the first launch of `key` (a launch site at given shapes), then that figure."""
    nb = cache.get(key)
    if nb is None:
        nb = cache[key] = tensor_bytes(args)
    return nb


class MeasuredBytes:
    """What a backward launcher's plan (a dataclass with an `nbytes: dict` field, one per shapes and batch)
    shares: the bytes each of its launches moves, measured on the first one."""

    nbytes: dict

    def moved(self, which: str, args: tuple) -> int:
        """The bytes launch `which` moves (`bytes_once`)."""
        return bytes_once(self.nbytes, which, args)
