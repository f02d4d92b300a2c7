"""`fusednn.compile`: wrap a module or function; trace, transform and build one specialisation per input
signature, cached.

A compiled module *is* the user's module as far as torch is concerned: it shares the original's
parameter, buffer and submodule dictionaries, so `state_dict()` keys are the original's, optimizers see
the same Parameter objects and `train()`/`eval()` reach the same submodules.
"""
from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from fusednn.compiler import passes
from fusednn.compiler.ir import Graph
from fusednn.compiler.trace import trace
from fusednn.errors import CompileError, InputMismatchError

log = logging.getLogger("fusednn")

BACKENDS = ("triton", "reference")
PRECISIONS = ("ieee", "tf32")


def debug_level() -> int:
    """FUSEDNN_DEBUG: 1 = IR after each pass, 2 = per-kernel launch summary, 4 = generated source."""
    try:
        return int(os.environ.get("FUSEDNN_DEBUG", "0"))
    except ValueError:
        return 0


@dataclass(frozen=True, slots=True)
class Options:
    """Compile options (see `fusednn.compile`)."""

    fuse: bool = True
    backend: str = "triton"
    precision: str = "ieee"
    max_specializations: int = 8


class Specialization:
    """One compiled input signature: the traced graph, the transformed graph and its executable."""

    def __init__(self, fn: Callable, example: tuple, options: Options, modules: list[torch.nn.Module]):
        self.traced = trace(fn, *example)
        g = passes.run(copy.deepcopy(self.traced, {id(self.traced.out_spec): self.traced.out_spec}), passes.pipeline(options.fuse), debug=debug_level() >= 1)
        self.graph: Graph = g
        self.options = options
        if options.backend == "reference":
            from fusednn.reference import ReferenceExecutable

            self.executable = ReferenceExecutable(g)
        else:
            from fusednn.runtime import TritonExecutable

            self.executable = TritonExecutable(g, options)
        self.calls = 0

    def run(self, tensors: dict[str, torch.Tensor], args: tuple) -> Any:
        self.calls += 1
        user = [a for a in args if isinstance(a, torch.Tensor)]
        flat = self.executable(user, tensors)
        return pytree.tree_unflatten(flat, self.graph.out_spec)


def _signature(args: tuple, modules: list[torch.nn.Module]) -> tuple:
    sig = []
    for a in args:
        if isinstance(a, torch.Tensor):
            sig.append(("T", tuple(a.shape), a.dtype, a.device, a.requires_grad, a.is_contiguous()))
        else:
            sig.append(("C", repr(a)))
    modes = tuple(m.training for root in modules for m in root.modules())
    return tuple(sig) + (modes,)


def _describe_change(old: tuple, new: tuple, names: list[str]) -> str:
    parts = []
    for i, (o, n) in enumerate(zip(old, new)):
        if o != n and i < len(names) and o[0] == "T" and n[0] == "T":
            fields = ("shape", "dtype", "device", "requires_grad", "contiguous")
            for f, a, b in zip(fields, o[1:], n[1:]):
                if a != b:
                    fmt = (lambda s: "[" + ",".join(map(str, s)) + "]") if f == "shape" else str
                    parts.append(f"{names[i]}: {f} {fmt(a)} -> {fmt(b)}")
        elif o != n:
            parts.append(f"argument {i} changed" if i < len(names) else "train/eval mode changed")
    return "; ".join(parts) or "new signature"


class _Compiled:
    """What compiled modules and functions share: the specialisation cache and inspection."""

    def _fnn_init(self, fn: Callable, options: Options, modules: list[torch.nn.Module]) -> None:
        if options.backend not in BACKENDS:
            raise ValueError(f"fusednn.compile: backend must be one of {BACKENDS}, got {options.backend!r}")
        if options.precision not in PRECISIONS:
            raise ValueError(f"fusednn.compile: precision must be one of {PRECISIONS}, got {options.precision!r}")
        self.__dict__["_fnn_fn"] = fn
        self.__dict__["_fnn_options"] = options
        self.__dict__["_fnn_modules"] = modules
        self.__dict__["_fnn_cache"] = {}
        self.__dict__["_fnn_last"] = None
        self.__dict__["_fnn_last_sig"] = None
        self.__dict__["trace_count"] = 0

    def _fnn_call(self, args: tuple) -> Any:
        sig = _signature(args, self._fnn_modules)
        spec = self._fnn_cache.get(sig)
        if spec is None:
            from fusednn.compiler.trace import input_names

            names = input_names(self._fnn_fn, len(args))
            if self._fnn_last_sig is not None:
                log.info("fusednn: compiling a new specialisation (%s)", _describe_change(self._fnn_last_sig, sig, names))
            if len(self._fnn_cache) >= self._fnn_options.max_specializations:
                log.warning("fusednn: %d specialisations compiled for %s; the input signature keeps changing (%s). "
                            "Pad inputs to fixed shapes or raise max_specializations.",
                            len(self._fnn_cache) + 1, type(self._fnn_fn).__name__,
                            _describe_change(self._fnn_last_sig, sig, names))
            self._check_devices(args)
            spec = Specialization(self._fnn_fn, args, self._fnn_options, self._fnn_modules)
            self._fnn_cache[sig] = spec
            self.__dict__["trace_count"] = self.trace_count + 1
        self.__dict__["_fnn_last"] = spec
        self.__dict__["_fnn_last_sig"] = sig
        return spec.run(self._tensors(), args)

    def _check_devices(self, args: tuple) -> None:
        devs = {a.device for a in args if isinstance(a, torch.Tensor)}
        for m in self._fnn_modules:
            devs |= {p.device for p in m.parameters()}
        if len(devs) > 1:
            raise InputMismatchError(f"fusednn: inputs and parameters are on different devices {sorted(map(str, devs))}; "
                                     "move them to one device")

    def _tensors(self) -> dict[str, torch.Tensor]:
        """The live parameters and buffers by the names the graph uses (read at every call)."""
        out: dict[str, torch.Tensor] = {}
        for m in self._fnn_modules:
            prefix = self._fnn_prefix.get(id(m), "")
            for name, t in list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False)):
                out[prefix + name] = t
        return out

    # -- inspection ---------------------------------------------------------------------------
    def _last(self) -> Specialization:
        if self._fnn_last is None:
            raise CompileError("nothing compiled yet: call the compiled model once on an input first")
        return self._fnn_last

    @property
    def graph(self) -> Graph:
        """The traced IR of the most recent specialisation (before any pass)."""
        return self._last().traced

    @property
    def fused_graph(self) -> Graph:
        """The IR after the pass pipeline (fused unless compiled with fuse=False)."""
        return self._last().graph

    def kernels(self) -> dict[str, str]:
        """The generated kernel sources of the most recent specialisation, by kernel name."""
        steps = getattr(self._last().executable, "steps", [])
        return {s.kernel.name: s.kernel.source for s in steps if s.kernel is not None}

    @property
    def specializations(self) -> int:
        return len(self._fnn_cache)

    def stats(self) -> dict:
        """Groups, launches per forward/backward and bytes each kernel must move, for the last signature."""
        return self._last().executable.stats()

    def dump(self, directory: str, aot: bool = True) -> list[str]:
        """Write IR before/after fusion, kernel sources, backward plan, stats, a graph picture and (aot=True)
        each kernel's TTIR, PTX and sm_90 resource report; returns the paths written (see fusednn/dump.py)."""
        from fusednn.dump import dump

        return dump(self._last(), directory, self._tensors(), aot=aot)


class CompiledModule(_Compiled, torch.nn.Module):
    """An nn.Module that runs the user's module through fusednn, sharing its parameters and buffers."""

    def __init__(self, model: torch.nn.Module, options: Options) -> None:
        torch.nn.Module.__init__(self)
        # Share the original's dicts: same Parameters, same state_dict keys (no prefix), same submodules.
        self.__dict__["_parameters"] = model._parameters
        self.__dict__["_buffers"] = model._buffers
        self.__dict__["_modules"] = model._modules
        self.__dict__["_non_persistent_buffers_set"] = model._non_persistent_buffers_set
        self.__dict__["_fnn_prefix"] = {}
        self.__dict__["original"] = model
        self.training = model.training
        self._fnn_init(model, options, [model])

    def train(self, mode: bool = True) -> "CompiledModule":
        self.original.train(mode)
        self.training = mode
        return self

    def forward(self, *args: Any) -> Any:
        return self._fnn_call(args)

    def extra_repr(self) -> str:
        o = self._fnn_options
        return f"fusednn(fuse={o.fuse}, backend={o.backend!r}, precision={o.precision!r})"


class CompiledFunction(_Compiled):
    """A compiled plain function of tensors (e.g. a model followed by its loss)."""

    def __init__(self, fn: Callable, options: Options) -> None:
        from fusednn.compiler.trace import _modules_of

        found = _modules_of(fn)
        self.__dict__["_fnn_prefix"] = {id(m): name + "." for name, m in found}
        self._fnn_init(fn, options, [m for _, m in found])

    def __call__(self, *args: Any) -> Any:
        return self._fnn_call(args)


def compile(model: Any, *, fuse: bool = True, backend: str = "triton", precision: str = "ieee",
            max_specializations: int = 8) -> Any:
    """Compile an nn.Module (returns a CompiledModule) or a function of tensors (returns a callable).

    Args:
        fuse: fuse conv+bias+act+pool and linear+bias+act chains; False runs every op as its own kernel.
        backend: "triton" (generated forward kernels, hand-written backward) or "reference" (the registry's
            torch implementations, for checking).
        precision: "ieee" (exact fp32 dots, torch's default) or "tf32" (tensor cores on NVIDIA GPUs).
        max_specializations: past this many input signatures a warning says what keeps changing.
    """
    options = Options(fuse, backend, precision, max_specializations)
    if isinstance(model, torch.nn.Module):
        return CompiledModule(model, options)
    if callable(model):
        return CompiledFunction(model, options)
    raise TypeError(f"fusednn.compile expects an nn.Module or a function, got {type(model).__name__}")
