"""The single choke point every fusednn kernel launch goes through.

It skips empty launches, counts launches and the bytes each kernel must read and write (the sum of the
sizes of its tensor arguments), and lets tools observe launches (stats, DEBUG=2 summaries, AOT builds)
or suppress execution (`recording(execute=False)`: collect what would run, run nothing).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch


@dataclass(slots=True)
class Launch:
    """One recorded kernel launch: the kernel object, its grid, arguments and meta-parameters."""

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict
    bytes: int
    tag: str = ""


@dataclass(eq=False)  # recorders are removed by identity: two empty ones must not compare equal
class _Recorder:
    execute: bool
    launches: list[Launch] = field(default_factory=list)


_recorders: list[_Recorder] = []
_tags: list[str] = []


def kernel_name(kernel: Any) -> str:
    """The Python name of a @triton.jit function (works for JIT and interpreted kernels)."""
    fn = getattr(kernel, "fn", kernel)
    return getattr(fn, "__name__", repr(kernel))


def tensor_bytes(args: tuple) -> int:
    """Bytes a kernel must move: every tensor argument read or written once."""
    return sum(a.numel() * a.element_size() for a in args if isinstance(a, torch.Tensor))


def launch(kernel: Any, grid: tuple, *args: Any, nbytes: int | None = None, **meta: Any) -> None:
    """Launch `kernel[grid](*args, **meta)` unless the grid is empty; record it for observers.

    nbytes: the bytes the kernel must move, when the tensor arguments do not say it (e.g. a multi-tensor
    kernel that receives a table of addresses); by default the sum of the tensor arguments' sizes.
    """
    grid = tuple(int(g) for g in grid)
    if any(g <= 0 for g in grid):
        return
    moved = tensor_bytes(args) if nbytes is None else int(nbytes)
    rec = Launch(kernel, grid, args, meta, moved, _tags[-1] if _tags else "")
    execute = True
    for r in _recorders:
        r.launches.append(rec)
        execute = execute and r.execute
    if execute:
        kernel[grid](*args, **meta)


def executing() -> bool:
    """False inside `recording(execute=False)`: launches are collected, none runs."""
    return all(r.execute for r in _recorders)


@contextlib.contextmanager
def recording(execute: bool = True) -> Iterator[list[Launch]]:
    """Collect every launch made inside the block; with execute=False nothing actually runs."""
    r = _Recorder(execute)
    _recorders.append(r)
    try:
        yield r.launches
    finally:
        _recorders.remove(r)


@contextlib.contextmanager
def tagged(tag: str) -> Iterator[None]:
    """Label the launches made inside the block (e.g. with the IR group they implement)."""
    _tags.append(tag)
    try:
        yield
    finally:
        _tags.pop()


Observer = Callable[[Launch], None]
