"""The single choke point every fusednn kernel launch goes through.

It skips empty launches, and lets observers see each launch: `counting()` keeps launches and bytes per
kernel (what the runtime's `stats()` reports; it holds no tensor), `recording()` keeps every launch with its
arguments for tools that need them (AOT builds, dumps, benchmarks, tests), `recording(execute=False)`
collects what would run and runs nothing. Bytes are the sizes of the distinct memory ranges a launch is
given, each counted once (see `tensor_bytes`), unless the launcher says better (`nbytes=`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import _disable_current_modes


@dataclass(slots=True)
class Launch:
    """One recorded kernel launch: the kernel object, its grid, arguments and meta-parameters."""

    kernel: Any
    grid: tuple
    args: tuple
    meta: dict
    bytes: int
    tag: str = ""


@dataclass(slots=True)
class LaunchCounts:
    """Launches and bytes, in total and per kernel: what a list of launches adds up to, without holding
    the launches' arguments (so the runtime can keep it between steps without pinning any tensor)."""

    launches: int = 0
    bytes: int = 0
    per_kernel: dict[str, dict] = field(default_factory=dict)

    def add(self, rec: Launch) -> None:
        name = kernel_name(rec.kernel)
        e = self.per_kernel.get(name)
        if e is None:
            e = self.per_kernel[name] = {"launches": 0, "bytes": 0, "implements": rec.tag}
        e["launches"] += 1
        e["bytes"] += rec.bytes
        self.launches += 1
        self.bytes += rec.bytes

    def as_dict(self) -> dict:
        """{"launches", "bytes", "per_kernel": {name: {"launches", "bytes", "implements"}}}, a copy."""
        per = {k: dict(v) for k, v in self.per_kernel.items()}
        return {"launches": self.launches, "bytes": self.bytes, "per_kernel": per}


@dataclass(eq=False)  # recorders are removed by identity: two empty ones must not compare equal
class _Recorder:
    execute: bool
    sink: Callable[[Launch], None]


_recorders: list[_Recorder] = []
_tags: list[str] = []
_suppressed = [0]  # > 0 inside `suppressed()`: launches are counted as usual, none runs
# > 0 while a prebuilt.Capture watches a step's aten ops: kernels run with Python dispatch modes set aside
# (what Triton's interpreter does with tensors inside a kernel is not the step's)
_bare = [0]


def kernel_name(kernel: Any) -> str:
    """The Python name of a @triton.jit function (works for JIT and interpreted kernels)."""
    fn = getattr(kernel, "fn", kernel)
    name = getattr(fn, "__name__", None)
    return repr(kernel) if name is None else name


def tensor_bytes(args: tuple) -> int:
    """Bytes a kernel must move: the memory its tensor arguments span, each byte counted once.

    A tensor passed twice, or a view passed next to its base (a [dw | db] buffer and its db slice), is
    counted once: ranges [data_ptr, data_ptr + numel * element_size) on one device are merged. A buffer the
    kernel does not read must not be passed at all (pass None): it would be counted.
    """
    spans: dict[torch.device, list[tuple[int, int]]] = {}
    total = 0
    for a in args:
        if not isinstance(a, torch.Tensor):
            continue
        n = a.nbytes
        if n == 0:
            continue
        if a.is_meta:  # no addresses to compare
            total += n
            continue
        ptr = a.data_ptr()
        spans.setdefault(a.device, []).append((ptr, ptr + n))
    for ranges in spans.values():
        end = None
        for lo, hi in sorted(ranges):
            if end is None or lo >= end:
                total += hi - lo
                end = hi
            elif hi > end:
                total += hi - end
                end = hi
    return total


def launch(kernel: Any, grid: tuple, *args: Any, nbytes: int | None = None, **meta: Any) -> None:
    """Launch `kernel[grid](*args, **meta)` unless the grid is empty; record it for observers.

    nbytes: the bytes the kernel must move, when the tensor arguments do not say it (e.g. a multi-tensor
    kernel that receives a table of addresses); by default the sum of the tensor arguments' sizes.
    """
    grid = tuple(map(int, grid))
    for g in grid:
        if g <= 0:
            return
    execute = True
    if _recorders:
        moved = tensor_bytes(args) if nbytes is None else int(nbytes)
        rec = Launch(kernel, grid, args, meta, moved, _tags[-1] if _tags else "")
        for r in _recorders:
            r.sink(rec)
            execute = execute and r.execute
    if execute and not _suppressed[0]:
        if _bare[0]:
            with _disable_current_modes():
                kernel[grid](*args, **meta)
        else:
            kernel[grid](*args, **meta)


def observed() -> bool:
    """Whether anything observes launches now (`counting()`, `recording()`)."""
    return bool(_recorders)


def executing() -> bool:
    """False inside `recording(execute=False)` or `suppressed()`: launches are collected, none runs."""
    return not _suppressed[0] and all(r.execute for r in _recorders)


class suppressed:
    """Run nothing inside the block, observe as usual: every launch goes through fusednn's Python (configs,
    observers, the runtime's counting) and returns before Triton's launcher. For timing fusednn's own host
    cost (benchmarks/host_cost.py) without the overhead of recording every launch."""

    __slots__ = ()

    def __enter__(self) -> None:
        _suppressed[0] += 1

    def __exit__(self, *exc: object) -> None:
        _suppressed[0] -= 1


@contextlib.contextmanager
def _observing(r: _Recorder) -> Iterator[None]:
    _recorders.append(r)
    try:
        yield
    finally:
        _recorders.remove(r)


@contextlib.contextmanager
def recording(execute: bool = True) -> Iterator[list[Launch]]:
    """Collect every launch made inside the block, with its arguments (so the list keeps every tensor it
    saw alive until dropped); with execute=False nothing actually runs."""
    launches: list[Launch] = []
    with _observing(_Recorder(execute, launches.append)):
        yield launches


class counting:
    """Count the launches and bytes of the block, per kernel, keeping no argument (`with counting() as c`).

    A class, not a generator context manager: the runtime enters one per forward and backward."""

    __slots__ = ("counts", "_r")

    def __init__(self) -> None:
        self.counts = LaunchCounts()
        self._r = _Recorder(True, self.counts.add)

    def __enter__(self) -> LaunchCounts:
        _recorders.append(self._r)
        return self.counts

    def __exit__(self, *exc: object) -> None:
        _recorders.remove(self._r)


class tagged:
    """Label the launches made inside the block (e.g. with the IR group they implement).

    A class, not a generator context manager: the runtime enters one per step, and this costs ~0.3 us
    where @contextlib.contextmanager costs ~1.5 us."""

    __slots__ = ("tag",)

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __enter__(self) -> None:
        _tags.append(self.tag)

    def __exit__(self, *exc: object) -> None:
        _tags.pop()

