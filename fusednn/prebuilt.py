"""Prebuilt launches: a step's launches recorded once per batch and replayed as a list.

A forward step or a node's backward (VJP) of the general path reads its tensors, allocates its results,
and calls launchers that check shapes, pick launch configs, compute grids and hand everything to
`fusednn.launch.launch`: 10-20 us of Python per launch. At a fixed batch, all of it but the tensors is the
same on every call. So the first call records what a step does (`Capture`), and later calls replay it
(`Prebuilt.run`): allocate what it allocated, fill the tensor slots of each recorded launch, launch, hand
back its results. Nothing else runs.

A capture is kept only where a replay is exactly the general path:
  - the step computes nothing outside its launches: a TorchDispatchMode watches every aten op it issues
    (outside the kernels themselves) and allows allocations (`empty`, `empty_strided`, `empty_like`...)
    and views, and one computing op, a number added in place to a tensor the step read (a batch norm's
    `num_batches_tracked.add_(1)`: replayed in its place between the launches); nothing else (a `zero_()`,
    a `.contiguous()` copy, a random seed drawn with torch or read with `.item()` all keep the general
    path);
  - it reads tensors only: a number it reads (a dropout's seed) may change from call to call. A number the
    step reads out of a tensor through torch (`.item()`) is an aten op and refused as above; one read
    around torch (`.tolist()`, `.numpy()`) is not seen, which is why a step must declare itself;
  - every tensor a launch receives or the step returns lies inside one of the tensors it read or one it
    allocated, at an element offset with the same dtype: on replay it is that tensor, or a view of it at
    the same offset, shape and strides (an empty tensor a launch receives, a buffer its kernel variant never
    touches, is passed again as recorded: it has no memory);
  - two tensors it read overlap only where the graph makes them overlap on every call: views of one value
    (a flattened activation and the activation), which the caller says by giving both reads one alias class.
    Anything else that overlaps (the caller passed one tensor for two inputs, or a view of one input beside
    another, or an output as its own gradient) may not on a later call, and which one a launch read could
    not be told apart then: the record refuses itself.
The step's own code declares that it keeps no other host state (`codegen.Step.replayable`; a VJP reads
what it saves). Replays run only when nothing observes launches (no counting, no recording): an observer
sees the general path, with its labels and arguments.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from fusednn import launch

_ALLOCATE = frozenset(("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"))
# The one computing op a record replays: adding a number in place to a tensor the step read (a batch norm's
# `num_batches_tracked.add_(1)`, between the launches of a training forward). It reads nothing from the host
# and makes no tensor; anything else that computes refuses the record.
_ADD_ = torch.ops.aten.add_.Tensor
_FREE = frozenset(("detach", "alias"))  # no computation, no new memory (`lift_fresh` brings host data in)
class _Watch(TorchDispatchMode):
    """Sees every aten op a recorded step issues outside the kernels: allocations and in-place number adds
    go to the capture (`Capture._allocated`, `Capture._added`), the names of other computing ops to
    `computed`."""

    def __init__(self, capture: "Capture") -> None:
        super().__init__()
        self.capture = capture
        self.computed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE:
            return out
        if name in _ALLOCATE:
            self.capture._allocated(out)
        elif (func is _ADD_ and not kwargs and len(args) == 2 and type(args[1]) in (int, float)
              and isinstance(args[0], torch.Tensor)):
            self.capture._added(args[0], args[1])
        else:
            self.computed.append(name)
        return out


class _Desc(NamedTuple):
    """Where a tensor of a record lies: in root (an index into the step's reads, then its allocations), at
    an element offset, with a shape and strides; exact: it is the root itself, no view to build."""

    root: int
    offset: int
    shape: tuple
    strides: tuple
    exact: bool


@dataclass(slots=True)
class _Launch:
    kernel: Any
    grid: tuple
    args: list  # the recorded arguments, tensors replaced by None and filled on every replay
    fills: tuple  # (position, _Desc); a launch needs only the address and dtype: offset 0 is the root
    meta: dict
    allocate: tuple = ()  # (root, shape, strides, dtype, device): allocations first used by this launch
    adds: tuple = ()  # (root, number): in-place adds to tensors read, made before this launch
    release: tuple = ()  # roots last used by this launch and not a result: freed after it, as the general
    # path frees a temporary (a split-K partial, an intermediate gradient) once nothing refers to it
    # What a replay runs, prepared from the above once (`_prepare`): allocate as (root, new, shape, strides)
    # with `new` a prototype's new_empty_strided; fills at offset 0 as (position, root), the others as
    # (position, _Desc); the launcher kernel[grid].
    make: tuple = ()
    direct: tuple = ()
    views: tuple = ()
    launcher: Any = None

    def _prepare(self, protos: dict) -> None:
        self.make = tuple((i, _new(protos, dtype, device), shape, strides)
                          for i, shape, strides, dtype, device in self.allocate)
        self.direct = tuple((pos, d.root) for pos, d in self.fills if d.offset == 0)
        self.views = tuple((pos, d) for pos, d in self.fills if d.offset != 0)
        self.launcher = self.kernel[self.grid]


def _new(protos: dict, dtype: torch.dtype, device: torch.device) -> Any:
    """An allocator of uninitialised tensors of dtype on device: `new(shape, strides)` (a prototype's
    new_empty_strided: ~0.2 us less a call than torch.empty_strided with its keyword arguments)."""
    key = (dtype, device)
    if key not in protos:
        protos[key] = torch.empty(0, dtype=dtype, device=device)
    return protos[key].new_empty_strided


@dataclass(slots=True)
class Prebuilt:
    """One step's allocations, launches and results at one batch."""

    n_roots: int  # reads + allocations
    launches: tuple  # _Launch
    results: tuple  # _Desc or None per result
    allocate_last: tuple = ()  # allocations no launch uses (results only)
    adds_last: tuple = ()  # in-place adds made after the last launch

    def run(self, reads: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """The step's results, computed by its recorded launches on `reads` (what it read, in order)."""
        roots: list = reads + [None] * (self.n_roots - len(reads))
        execute = not launch._suppressed[0]
        for ln in self.launches:
            for i, number in ln.adds:
                roots[i].add_(number)
            for i, new, shape, strides in ln.make:
                roots[i] = new(shape, strides)
            args = ln.args.copy()
            for pos, i in ln.direct:
                args[pos] = roots[i]
            for pos, d in ln.views:
                args[pos] = _view(roots, d)
            if execute:
                ln.launcher(*args, **ln.meta)
            for i in ln.release:
                roots[i] = None
        for i, number in self.adds_last:
            roots[i].add_(number)
        for i, shape, strides, dtype, device in self.allocate_last:
            roots[i] = torch.empty_strided(shape, strides, dtype=dtype, device=device)
        return [None if d is None else roots[d.root] if d.exact else _view(roots, d) for d in self.results]


def _contiguous(shape: tuple) -> tuple:
    """The strides of a contiguous tensor of this shape."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def _view(roots: list[torch.Tensor], d: _Desc) -> torch.Tensor:
    root = roots[d.root]
    return root.as_strided(d.shape, d.strides, root.storage_offset() + d.offset)


def _span(t: torch.Tensor) -> int:
    """Bytes from t's first element to past its last."""
    if t.numel() == 0:
        return 0
    return (1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))) * t.element_size()


def _root(t: torch.Tensor, i: int) -> tuple:
    """A read or an allocation as `Capture._describe` places tensors in it; it holds no reference to t."""
    return (t.data_ptr(), t.data_ptr() + _span(t), i, t.dtype, tuple(t.shape), tuple(t.stride()),
            StorageWeakRef(t.untyped_storage()))


class Capture:
    """Record a step: `with Capture(reads, classes) as cap: <the step>`, then `cap.build(results)`.

    Each tensor is described where it appears (an allocation, a launch argument, an in-place add), by
    address, inside a read or an allocation so far of the same memory (storage, held by weak reference)
    and dtype; the capture keeps descriptions, never the tensors, so the recording call frees its
    temporaries as the general path does, and a freed allocation's memory, reused by another tensor, is
    never taken for it. The caller keeps the reads alive until `build`. classes: per read, its alias class:
    reads may overlap only within one class (views of one value, on every call); default: each read its
    own."""

    def __init__(self, reads: list[Any], classes: list[Any] | None = None) -> None:
        self.n = len(reads)
        self.ok = all(isinstance(t, torch.Tensor) for t in reads)  # a number read refuses the record
        # (address, end, root, dtype, shape, strides, storage): the reads, then each allocation as it is
        # made (root n + k); storage: a weak reference to its memory, which a freed allocation gives back
        self._roots: list[tuple] = []
        self._allocations: list[tuple] = []  # (root, shape, strides, dtype, device)
        self._launches: list[_Launch] = []
        self._adds: list[tuple[int, int, int | float]] = []  # (launches before it, root, number)
        if self.ok:
            classes = classes if classes is not None else list(range(len(reads)))
            spans = sorted((t.data_ptr(), t.data_ptr() + _span(t), i) for i, t in enumerate(reads) if t.numel() > 0)
            for k, (lo, hi, i) in enumerate(spans):  # every overlapping pair of reads: one class
                for lo2, _, j in spans[k + 1:]:
                    if lo2 >= hi:
                        break
                    if classes[i] != classes[j]:
                        self.ok = False
            self._roots = [_root(t, i) for i, t in enumerate(reads)]
        self._watch = _Watch(self)
        self._observer = launch._Recorder(True, self._launched)

    def __enter__(self) -> "Capture":
        launch._recorders.append(self._observer)
        launch._bare[0] += 1  # the kernels run outside the watch
        self._watch.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._watch.__exit__(*exc)
        launch._bare[0] -= 1
        launch._recorders.remove(self._observer)

    def _describe(self, t: torch.Tensor) -> _Desc | None:
        """Where t lies: inside a read or an allocation of the same memory (storage) and dtype; None:
        nowhere (memory the watch did not see made, or a view of it with another dtype)."""
        p, end, size = t.data_ptr(), t.data_ptr() + _span(t), t.element_size()
        storage = StorageWeakRef(t.untyped_storage()).cdata
        for lo, hi, i, dtype, shape, strides, ref in self._roots:
            if (ref.cdata == storage and not ref.expired() and lo <= p and end <= hi and dtype == t.dtype
                    and (p - lo) % size == 0):
                off = (p - lo) // size
                exact = off == 0 and tuple(t.shape) == shape and tuple(t.stride()) == strides
                return _Desc(i, off, tuple(t.shape), tuple(t.stride()), exact)
        return None

    def _allocated(self, t: torch.Tensor) -> None:
        i = self.n + len(self._allocations)
        self._roots.append(_root(t, i))
        self._allocations.append((i, tuple(t.shape), tuple(t.stride()), t.dtype, t.device))

    def _added(self, t: torch.Tensor, number: int | float) -> None:
        d = self._describe(t) if t.numel() > 0 else None
        if d is None or d.root >= self.n or not d.exact:
            self.ok = False  # an add to anything but a tensor the step read, as it was read
        else:
            self._adds.append((len(self._launches), d.root, number))

    def _launched(self, rec: launch.Launch) -> None:
        args, fills = list(rec.args), []
        for pos, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.numel() > 0:  # an empty one is kept: no memory to read
                d = self._describe(a)
                if d is None:
                    self.ok = False
                    return
                fills.append((pos, d))
                args[pos] = None
        self._launches.append(_Launch(rec.kernel, rec.grid, args, tuple(fills), dict(rec.meta)))

    def build(self, results: list[Any]) -> Prebuilt | None:
        """The Prebuilt of the step just recorded, which produced `results` (tensors or None), or None where a
        replay would not be exactly what it did (see the module docstring)."""
        if not self.ok or self._watch.computed:
            return None
        descs = []
        for t in results:
            if t is not None and not isinstance(t, torch.Tensor):
                return None
            d = None if t is None else self._describe(t) if t.numel() > 0 else None
            if t is not None and d is None:
                return None
            descs.append(d)
        built = self._launches
        # A result that is a whole allocation seen with another shape (a weight gradient written as [1, K, CRS]
        # and handed back as [K, C, R, S]) is allocated with its shape: the same memory, and no view to build.
        allocations = self._allocations
        taken = {d.root for d in descs if d is not None and d.exact}  # roots some result is exactly: as they are
        for k, d in enumerate(descs):
            if d is not None and not d.exact and d.offset == 0 and d.root >= self.n and d.root not in taken:
                i, shape, strides, dtype, device = allocations[d.root - self.n]
                if (math.prod(shape) == math.prod(d.shape) and strides == _contiguous(shape)
                        and d.strides == _contiguous(d.shape)):
                    allocations[d.root - self.n] = (i, d.shape, d.strides, dtype, device)
                    descs[k] = d._replace(exact=True)
                    taken.add(d.root)
        # Allocate each allocation before the launch that first uses it; free it after the last one that
        # does unless a result lies in it.
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for j, ln in enumerate(built):
            for _, d in ln.fills:
                first.setdefault(d.root, j)
                last[d.root] = j
        kept = {d.root for d in descs if d is not None}
        # An empty allocation (a placeholder for an argument a kernel variant never reads) is not made again:
        # no result lies in it and a launch that received it keeps it as recorded.
        made = [a for a in self._allocations if 0 not in a[1]]
        for j, ln in enumerate(built):
            ln.allocate = tuple(a for a in made if first.get(a[0]) == j)
            ln.release = tuple(a[0] for a in made if last.get(a[0]) == j and a[0] not in kept)
        adds: list[list] = [[] for _ in range(len(built) + 1)]
        for j, root, number in self._adds:
            adds[j].append((root, number))
        protos: dict = {}
        for j, ln in enumerate(built):
            ln.adds = tuple(adds[j])
            ln._prepare(protos)
        return Prebuilt(self.n + len(self._allocations), tuple(built), tuple(descs),
                        tuple(a for a in made if a[0] not in first), tuple(adds[-1]))
