"""`fusednn.compile`: wrap a module or function; trace, transform and build one specialisation per input
signature, cached.

A compiled module *is* the user's module as far as torch is concerned: it shares the original's
parameter, buffer and submodule dictionaries, so `state_dict()` keys are the original's, optimizers see
the same Parameter objects and `train()`/`eval()` reach the same submodules. Parameters and buffers are
looked up by name at every call, so `load_state_dict`, in-place edits and `.to()` reach the next call.

A specialisation's key (`_signature`) is every input's and parameter's shape, dtype, device,
requires_grad and layout (contiguous, channels_last or the strides), other arguments by repr, and each
submodule's train/eval mode and settings (`extra_repr`: a stride or slope changed after compile).
The batch (dim 0 of the inputs that share the first input's dim 0) is looked up as a wildcard first: a
specialisation whose graph follows the batch alone (compiler/batch.py, decided at compile time by tracing
at other batch sizes too) serves every batch size >= its `min_batch`; any other keeps the batch in its key.
A new key compiles once, logged at INFO with what changed; past `max_specializations` a warning lists
what keeps changing.
"""
from __future__ import annotations

import copy
import logging
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from fusednn._backend import debug_level
from fusednn.checks import dict_version, tensor_guards
from fusednn.compiler import batch as batching
from fusednn.compiler import passes
from fusednn.compiler.codegen import where
from fusednn.compiler.ir import Graph
from fusednn.compiler.trace import trace
from fusednn.errors import CompileError, InputMismatchError, UnsupportedOpError

log = logging.getLogger("fusednn")

BACKENDS = ("triton", "reference")
PRECISIONS = ("ieee", "tf32")


@dataclass(frozen=True, slots=True)
class Options:
    """Compile options (see `fusednn.compile`)."""

    fuse: bool = True
    backend: str = "triton"
    precision: str = "ieee"
    max_specializations: int = 8
    strict: bool = True


class Specialization:
    """One compiled input signature: the traced graph, the transformed graph and its executable.

    With the Triton backend, a batch of at least 2 in `positions` (the inputs whose dim 0 is the batch) is
    traced again at batch + 1 and at 1: when the graphs follow the batch alone, this specialisation may
    serve every batch >= `min_batch` (1, or 2 when batch 1 traces differently), else `min_batch` is None.
    It serves a batch it has not traced at only once a trace there (on meta tensors) gives the same graphs
    (`serves`): a forward may branch on sizes the check traces did not cross.
    """

    def __init__(self, fn: Callable, example: tuple, options: Options, tensors: dict[str, torch.Tensor],
                 positions: tuple[int, ...] = (), autocast: tuple[str, torch.dtype] | None = None,
                 grad: bool = True):
        self.autocast = autocast  # the (device type, dtype) of the torch.autocast its calls run under, or None
        self.grad = grad  # the grad mode its calls run under (torch.is_grad_enabled()): a forward may branch on it
        self.device = next((a.device.type for a in example if isinstance(a, torch.Tensor)), "cpu")
        self.traced = trace(fn, *example, strict=options.strict, autocast=autocast, device=self.device, grad=grad)
        _check_devices(self.traced, [a for a in example if isinstance(a, torch.Tensor)], tensors, options.backend)
        g = _transform(self.traced, options)
        self.min_batch: int | None = None
        batch = example[positions[0]].shape[0] if positions else 0
        self._fn, self._batch = fn, batch
        self.batches: dict[int, bool] = {batch: True}  # batch -> whether it traces to these graphs
        if options.backend == "triton" and batch >= 2:
            self.min_batch = self._find_polymorphism(fn, example, options, positions, batch, g)
        self.graph: Graph = g
        self.options = options
        if options.backend == "reference":
            from fusednn.reference import ReferenceExecutable

            self.executable = ReferenceExecutable(g)
        else:
            from fusednn.runtime import TritonExecutable

            self.executable = TritonExecutable(g, options, inference=self._inference_executable)
        self.calls = 0
        self._leaf = g.out_spec is not None and g.out_spec.is_leaf() and len(g.outputs) == 1

    def _find_polymorphism(self, fn: Callable, example: tuple, options: Options, positions: tuple[int, ...],
                           batch: int, g: Graph) -> int | None:
        """Mark the values that follow the batch (traced and transformed graphs); the least batch served."""
        traced: dict[int, Graph] = {batch: self.traced}
        fused: dict[int, Graph] = {batch: g}

        def build(which: dict[int, Graph], make: Callable[[int], Graph]) -> Callable[[int], Graph]:
            return lambda b: which[b] if b in which else which.setdefault(b, make(b))

        def trace_at(b: int) -> Graph:
            return trace(fn, *batching.at_batch(example, positions, b), strict=options.strict, autocast=self.autocast,
                         device=self.device, grad=self.grad)

        for sizes, least in (([batch, batch + 1, 1], 1), ([batch, batch + 1], 2)):
            dyn_t = batching.polymorphic(build(traced, trace_at), sizes)
            dyn_f = batching.polymorphic(
                build(fused, lambda b: _transform(build(traced, trace_at)(b), options, debug=False)),
                sizes) if dyn_t is not None else None
            if dyn_t is not None and dyn_f is not None:
                self.traced.dynamic, g.dynamic = dyn_t, dyn_f
                self.batches.update(dict.fromkeys(sizes, True))
                return least
        return None

    def serves(self, args: tuple, positions: tuple[int, ...], batch: int) -> bool:
        """Whether this batch-polymorphic specialisation computes what the function does at `batch`: a batch
        it traced at, or one where a trace on meta tensors (milliseconds, once per batch) and its pass
        pipeline give the same graphs with the same values following the batch."""
        known = self.batches.get(batch)
        if known is None:
            try:
                at = trace(self._fn, *batching.at_batch(args, positions, batch), strict=self.options.strict,
                           autocast=self.autocast, device=self.device, grad=self.grad)
                fused = _transform(at, self.options, debug=False)
                known = (batching.dynamic_values([(self._batch, self.traced), (batch, at)]) == self.traced.dynamic
                         and batching.dynamic_values([(self._batch, self.graph), (batch, fused)]) == self.graph.dynamic)
            except Exception:  # noqa: BLE001 - a function that cannot trace at this batch is not served by it
                known = False
            if not known:
                log.info("fusednn: %s traces differently at batch %d than at %d: a specialisation of its own",
                         getattr(self._fn, "__qualname__", "the function"), batch, self._batch)
            self.batches[batch] = known
        return known

    def _inference_executable(self) -> Any:
        """The executable of calls autograd does not record, where its graph differs (a batch norm in eval
        mode folds into the conv before it; a linear saves nothing for its activation's backward); built on
        the first such call."""
        from fusednn.runtime import TritonExecutable

        if not self.options.fuse:
            return None
        g = _transform(self.traced, self.options, inference=True)
        if not any(n.op == "conv_infer" or n.attrs.get("save_input") is False for n in g.nodes):
            return None
        # the same values as the traced graph's (fused nodes keep their last value's name): the same batch
        g.dynamic = self.traced.dynamic if self.min_batch is not None else frozenset()
        return TritonExecutable(g, self.options)

    def run(self, tensors: dict[str, torch.Tensor], args: tuple, checked: bool = False) -> Any:
        """Run on a call's arguments and the live parameters/buffers; `checked`: by the steady-state guard."""
        self.calls += 1
        user = [a for a in args if isinstance(a, torch.Tensor)]
        return self._unflatten(self.executable(user, tensors, checked))

    def run_inputs(self, inputs: list[torch.Tensor], requires_grad: bool) -> Any:
        """Run on the graph's inputs in order (the call's tensors, then parameters and buffers), as checked
        by the steady-state guard (`_Guard.order`); requires_grad: whether any of them does."""
        self.calls += 1
        return self._unflatten(self.executable.run_inputs(inputs, requires_grad))

    def _unflatten(self, flat: list[torch.Tensor]) -> Any:
        if self._leaf:  # one tensor out (a loss, logits): no tree to rebuild
            return flat[0]
        return pytree.tree_unflatten(flat, self.graph.out_spec)


def _transform(traced: Graph, options: Options, debug: bool = True, inference: bool = False) -> Graph:
    """The pass pipeline on a copy of the traced graph (`inference`: the pipeline of calls autograd does
    not record)."""
    return passes.run(copy.deepcopy(traced, {id(traced.out_spec): traced.out_spec}),
                      passes.pipeline(options.fuse, inference), debug=debug and debug_level() >= 1)


def _check_devices(graph: Graph, user: list[torch.Tensor], tensors: dict[str, torch.Tensor], backend: str) -> None:
    """Every op reads tensors on one device, and (Triton) a device its kernels can run on."""
    dev: dict[Any, torch.device] = dict(zip(graph.user_inputs, (t.device for t in user)))
    dev.update((v, tensors[v.name].device) for v in graph.inputs if v.kind != "input")
    for n in graph.nodes:
        ins = [v for v in n.inputs if v is not None and v in dev]
        devices = {dev[v] for v in ins}
        if len(devices) > 1:
            ops = ", ".join(f"%{v.name} : {v.type} on {dev[v]}" for v in ins)
            raise InputMismatchError(f"{where(n)}: operands on different devices ({ops}); "
                                     "move the model and its inputs to one device (model.to(device), x.to(device))")
        if devices:
            dev[n.out] = devices.pop()
    if backend == "triton":
        from fusednn import launch
        from fusednn._backend import interpreting

        # CPU tensors need the interpreter, unless nothing will run (recording for an ahead-of-time build).
        ok = {"cuda"} | ({"cpu"} if interpreting() or not launch.executing() else set())
        for v, d in dev.items():
            if d.type not in ok:
                raise InputMismatchError(f"%{v.name} : {v.type} is on {d}; fusednn's Triton kernels run on "
                                         f"{' or '.join(sorted(ok))} here")


# -- the specialisation key -------------------------------------------------------------------------
_FIELDS = ("shape", "dtype", "device", "requires_grad", "layout")


def layout(t: torch.Tensor) -> str:
    """contiguous, channels_last, or the strides (expanded dims show stride 0)."""
    if t.is_contiguous():
        return "contiguous"
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return "channels_last"
    return "strides [" + ",".join(map(str, t.stride())) + "]"


def _tensor_key(t: torch.Tensor) -> tuple:
    return (tuple(t.shape), t.dtype, t.device, t.requires_grad, layout(t))


_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
            torch.memory_format, torch.layout)
# What nn.Module keeps in every instance's __dict__ and the key covers otherwise (tensors by name, children
# by their own entries, the mode) or a forward never reads (state-dict hooks).
_MODULE_INTERNALS = frozenset(("training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                               "_load_state_dict_post_hooks"))


def _plain(v: Any) -> bool:
    """Data a trace can bake in as constants and that is compared by value: scalars, callables (by
    identity), and lists, tuples, sets and dicts of them."""
    if isinstance(v, _SCALARS) or (callable(v) and not isinstance(v, (torch.nn.Module, torch.Tensor))):
        return True
    if isinstance(v, (list, tuple, set, frozenset)):
        return all(_plain(e) for e in v)
    if isinstance(v, dict):
        return all(_plain(k) and _plain(e) for k, e in v.items())
    return False


def _fingerprint(v: Any) -> str:
    """A value as the key compares it: scalars and containers of them by value, callables and any other
    object by identity (its type and address: a forward that reads an object's own state is not tracked)."""
    if isinstance(v, _SCALARS):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return f"{type(v).__name__}(" + ", ".join(map(_fingerprint, v)) + ")"
    if isinstance(v, (set, frozenset)):
        return "{" + ", ".join(sorted(map(_fingerprint, v))) + "}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_fingerprint(k)}: {_fingerprint(e)}" for k, e in v.items()) + "}"
    name = getattr(v, "__qualname__", None) or type(v).__name__
    return f"<{name} at {id(v):#x}>"


def _attributes(m: torch.nn.Module, shown: str) -> str:
    """A module's attributes a forward may read and a trace bakes in (numbers, flags, callables, hooks,
    containers of them), those its extra_repr (`shown`) does not already show; tensors and children are
    covered by their own key entries."""
    parts = [f"{k}={_fingerprint(v)}" for k, v in m.__dict__.items()
             if k not in _MODULE_INTERNALS and not isinstance(v, (torch.Tensor, torch.nn.Module)) and f"{k}=" not in shown
             and not (isinstance(v, dict) and not v)]
    return ", ".join(parts)


def _module_key(m: torch.nn.Module) -> tuple[str, str, str]:
    shown = m.extra_repr()
    return ("train" if m.training else "eval", shown, _attributes(m, shown))


def _signature(args: tuple, tensors: dict[str, torch.Tensor], modules: list[tuple[str, torch.nn.Module]],
               batch_at: tuple[int, ...] = (), autocast: tuple[str, torch.dtype] | None = None,
               grad: bool = True) -> tuple:
    """What a specialisation is compiled for: every input's and parameter's shape, dtype, device,
    requires_grad and layout, other arguments by repr, each submodule's mode, settings (extra_repr)
    and other attributes (`_attributes`), the torch.autocast (device type, dtype) of the call (an entry
    only under autocast) and its grad mode (a forward may branch on `torch.is_grad_enabled()`; a second
    specialisation of the same graph generates the same kernel files, so it loads what the first compiled). The arguments at `batch_at` show dim 0 as None (the batch wildcard; `_with_batch` puts it
    back)."""
    sig: list[tuple] = [(i, _tensor_key(a) if isinstance(a, torch.Tensor) else ("value", repr(a)))
                        for i, a in enumerate(args)]
    for i in batch_at:
        shape, *rest = sig[i][1]
        sig[i] = (i, ((None, *shape[1:]), *rest))
    sig += [(name, _tensor_key(t)) for name, t in tensors.items()]
    sig += [(("module", name), _module_key(m)) for name, m in modules]
    if autocast is not None:
        sig.append(("torch.autocast", ("value", f"{autocast[0]} {str(autocast[1]).replace('torch.', '')}")))
    sig.append(("torch.is_grad_enabled()", ("value", str(grad))))
    return tuple(sig)


def _with_batch(sig: tuple, batch_at: tuple[int, ...], batch: int) -> tuple:
    """The signature with the batch wildcard replaced by `batch`: the exact key of one batch size."""
    out = list(sig)
    for i in batch_at:
        shape, *rest = sig[i][1]
        out[i] = (i, ((batch, *shape[1:]), *rest))
    return tuple(out)


def _fmt(field: str, v: Any) -> str:
    if field == "shape":
        return "[" + ",".join(map(str, v)) + "]"
    if field == "dtype":
        return str(v).replace("torch.", "")
    return str(v)


def _label(key: Any, names: list[str]) -> str:
    if isinstance(key, int):
        return names[key] if key < len(names) else f"argument {key}"
    if isinstance(key, tuple):
        return f"module '{key[1]}'" if key[1] else "the module"
    return key


def _field_changes(key: Any, old: tuple, new: tuple) -> list[str]:
    """The changed fields of one signature entry: ["shape [4,3] -> [2,3]", ...]."""
    if isinstance(key, tuple):  # a module: mode, settings (its extra_repr), other attributes
        out = [f"mode {old[0]} -> {new[0]}"] if old[0] != new[0] else []
        out += [f"{a or '-'} -> {b or '-'}" for a, b in zip(old[1:], new[1:]) if a != b]
        return out
    if old[0] == "value" or new[0] == "value":
        return [f"{old[-1]} -> {new[-1]}"]
    return [f"{f} {_fmt(f, a)} -> {_fmt(f, b)}" for f, a, b in zip(_FIELDS, old, new) if a != b]


def _describe_change(old: tuple | None, new: tuple, names: list[str]) -> str:
    """What differs between two signatures: `x: shape [64,1,32,32] -> [16,1,32,32]; x: layout ...`; entries
    with the same change are listed together (`conv1.weight, conv1.bias and 4 more: dtype ...`)."""
    if old is None:
        return "first call"
    a, b = dict(old), dict(new)
    by_change: dict[str, list[str]] = {}
    for key, fields in b.items():
        changes = ["new"] if key not in a else _field_changes(key, a[key], fields) if a[key] != fields else []
        for ch in changes:
            by_change.setdefault(ch, []).append(_label(key, names))
    for key in a:
        if key not in b:
            by_change.setdefault("gone", []).append(_label(key, names))
    parts = []
    for ch, labels in by_change.items():
        who = ", ".join(labels) if len(labels) <= 3 else f"{', '.join(labels[:2])} and {len(labels) - 2} more"
        parts.append(f"{who}: {ch}")
    return "; ".join(parts) or "new signature"


def _what_varies(sigs: list[tuple], names: list[str], most: int = 4) -> str:
    """Across signatures: each input/parameter field that took more than one value, with the values."""
    values: dict[tuple, list] = {}
    for sig in sigs:
        for key, fields in sig:
            if isinstance(key, tuple):
                per = [("mode", fields[0]), ("settings", fields[1]), ("attributes", fields[2])]
            elif fields[0] == "value":
                per = [("value", fields[1])]
            else:
                per = [(f, _fmt(f, v)) for f, v in zip(_FIELDS, fields)]
            for f, v in per:
                seen = values.setdefault((_label(key, names), f), [])
                if v not in seen:
                    seen.append(v)
    parts = []
    for (label, f), vs in values.items():
        if len(vs) > 1:
            shown = ", ".join(map(str, vs[-most:]))
            parts.append(f"{label}: {f} took {len(vs)} values ({'..., ' if len(vs) > most else ''}{shown})")
    return "; ".join(parts) or "parameters or modules were added or removed"


_DICT_OF = operator.attrgetter("__dict__")
_CONTAINERS = (list, tuple, dict, set, frozenset)


def _flat_dict(v: Any) -> bool:
    """A plain dict whose values are no containers: its version tag then changes whenever what it holds does
    (not an OrderedDict: `move_to_end` reorders one and leaves its tag)."""
    return type(v) is dict and not any(isinstance(e, _CONTAINERS) for e in v.values())


class _Guard:
    """The steady-state key check: what the last call's full key (`_signature`) read, re-read cheaply.

    The full key costs ~35 us a call (walking the module tree, `extra_repr` of every submodule). Once a
    call has chosen a specialisation, the guard keeps what that key was computed from and accepts a later
    call only when none of it changed: the same module tree (each submodule's attribute dict equal to a
    snapshot, so mode and settings; the same children; the same parameter and buffer names, the same
    ones None), every parameter and buffer read live from its owner's dict with the shape, dtype, device
    and requires_grad it had and still contiguous where it was, and the arguments alike (dim 0 free at
    the batch positions when the specialisation serves every batch). Anything else, or anything the guard
    cannot compare, takes the full key, which then builds a new guard: the guard can only be stricter than
    the key, never looser.
    """

    __slots__ = ("spec", "modules", "entries", "checks", "args", "batch_at", "native", "names",
                 "dicts", "versions", "empty", "containers", "order", "fixed0", "subs", "attrs", "requires_grad",
                 "owners", "keys")

    @staticmethod
    def _tensor_state(t: torch.Tensor) -> tuple:
        """What the key reads of a tensor besides its shape, and its contiguity, in one comparable tuple."""
        return (t.dtype, t.device, t.requires_grad, t.is_contiguous())

    @classmethod
    def build(cls, owner: "_Compiled", spec: Specialization, args: tuple, tensors: dict[str, torch.Tensor],
              sig: tuple, batch_at: tuple[int, ...]) -> "_Guard | None":
        """A guard for `spec` as chosen by this call, or None where the call has something the guard does
        not handle (a non-contiguous tensor, a non-tensor argument, a module tree it cannot re-derive)."""
        if any(not isinstance(a, torch.Tensor) or not a.is_contiguous() for a in args):
            return None
        g = cls()
        g.spec, g.batch_at = spec, batch_at
        # dim 0 of the other arguments with a dim (fixed: the checks compare their shapes): a batch equal to
        # one would make it a batch position too (batching.batch_of), which the full key must then see
        g.fixed0 = {a.shape[0] for i, a in enumerate(args) if i not in batch_at and a.dim() > 0}
        g.modules, g.entries, g.dicts, g.empty, g.containers, g.subs, g.attrs = [], [], [], [], [], [], []
        params, buffers = [], []
        for m in owner._fnn_modules:
            prefix = owner._fnn_prefix.get(id(m), "")
            for path, sub in m.named_modules(remove_duplicate=False):
                at = prefix + path + "." if path else prefix
                # One snapshot of the attribute dict, with copies of the children, parameter and buffer dicts:
                # a single comparison then sees a changed setting, child, name or None, or a replaced tensor.
                snap = {k: copy.deepcopy(v) if isinstance(v, (list, dict, set)) and _plain(v) else v
                        for k, v in sub.__dict__.items()}
                for k in ("_modules", "_parameters", "_buffers"):
                    snap[k] = dict(sub.__dict__[k])
                g.modules.append((sub, snap))
                attrs = sub.__dict__
                g.subs.append(sub)
                g.attrs.append(attrs)
                mutable = [(k, v) for k, v in attrs.items() if isinstance(v, (list, dict, set))]
                g.empty += [v for _, v in mutable if not v]  # most hook dicts: checked still empty
                g.dicts += [attrs, *(v for _, v in mutable if v and _flat_dict(v))]  # compared by version tag
                g.containers += [(attrs, k, snap[k]) for k, v in mutable if v and not _flat_dict(v) and _plain(v)]
                params += [(at + k, sub._parameters, k) for k, v in sub._parameters.items() if v is not None]
                buffers += [(at + k, sub._buffers, k) for k, v in sub._buffers.items() if v is not None]
        g.entries = params + buffers
        if [e[0] for e in g.entries] != list(tensors) or any(d[k] is not tensors[n] for n, d, k in g.entries):
            return None  # a module that names its parameters its own way: the full key each call
        if any(not t.is_contiguous() for t in tensors.values()):
            return None
        g.checks = [(t.shape, cls._tensor_state(t)) for t in tensors.values()]
        g.args = [(a.shape[1:] if i in batch_at else a.shape, cls._tensor_state(a)) for i, a in enumerate(args)]
        g.names = [e[0] for e in g.entries]
        g.owners, g.keys = [e[1] for e in g.entries], [e[2] for e in g.entries]  # live: owners[i][keys[i]]
        g.versions = None if dict_version is None else list(map(dict_version, g.dicts))
        # The live tensors' positions in the graph's inputs after the call's (a Triton executable's order)
        at = {n: i for i, n in enumerate(g.names)}
        order = getattr(spec.executable, "_param_names", None)
        g.order = [at[n] for n in order] if order is not None and all(n in at for n in order) else None
        # the checks fix every tensor's requires_grad: whether any the graph reads does (autograd records it)
        g.requires_grad = any(t.requires_grad for t in args) or (
            g.order is not None and any(tensors[n].requires_grad for n in order))
        # The same reads, and stricter (strides, dispatch keys), in one C++ call where torch has it
        g.native = tensor_guards([*args, *tensors.values()], set(batch_at))
        return g

    def tensors(self, args: tuple) -> dict[str, torch.Tensor] | None:
        """The live parameters and buffers by name when nothing the key reads has changed, else None."""
        live = self.live(args)
        return None if live is None else dict(zip(self.names, live))

    def live(self, args: tuple) -> list[torch.Tensor] | None:
        """The live parameters and buffers (in `names` order) when nothing the key reads has changed, else None."""
        if len(args) != len(self.args):
            return None
        try:
            # Every attribute dict the same object, it and each flat dict in it unchanged since the snapshot (by
            # version tag, or still empty), the other containers equal to theirs; else the slower comparison
            # of each whole snapshot.
            if self.versions is None or any(map(operator.is_not, map(_DICT_OF, self.subs), self.attrs)) or \
                    list(map(dict_version, self.dicts)) != self.versions or any(self.empty) or \
                    any(attrs[k] != snap for attrs, k, snap in self.containers):
                for sub, snap in self.modules:
                    if sub.__dict__ != snap:
                        return None
        except Exception:  # an attribute whose == raises (a tensor attribute or parameter replaced): the full key
            return None
        if self.native is not None:
            live = list(map(dict.__getitem__, self.owners, self.keys))
            if not self.native.check(*args, *live):
                return None
            if self.batch_at:
                batch = args[self.batch_at[0]].shape[0]
                # the positions batching.batch_of would find: the same first one (dims are checked), all
                # of one batch, no other argument of that dim 0
                if any(args[i].shape[0] != batch for i in self.batch_at) or not self.spec.batches.get(batch) or \
                        batch in self.fixed0:
                    return None
            return live
        state = self._tensor_state
        batch = None
        for i, (a, (shape, st)) in enumerate(zip(args, self.args)):
            if not isinstance(a, torch.Tensor) or state(a) != st:
                return None
            if i in self.batch_at:
                if a.dim() == 0 or a.shape[1:] != shape:
                    return None
                if batch is None:
                    batch = a.shape[0]
                elif a.shape[0] != batch:
                    return None
            elif a.shape != shape:
                return None
        if self.batch_at:
            # the batch positions must be exactly those the full key would find (batching.batch_of)
            if not self.spec.batches.get(batch) or batching.batch_of(args) != (batch, self.batch_at):
                return None
        out = []
        for (name, d, k), (shape, st) in zip(self.entries, self.checks):
            t = d[k]  # _tensor_state, inlined: this loop runs for every parameter on every call
            if t.shape != shape or (t.dtype, t.device, t.requires_grad, t.is_contiguous()) != st:
                return None
            out.append(t)
        return out


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
        self.__dict__["_fnn_cache"] = {}  # exact signature -> Specialization (every one compiled)
        self.__dict__["_fnn_poly"] = {}  # signature with the batch wildcard -> its batch-polymorphic ones
        self.__dict__["_fnn_last"] = None
        self.__dict__["_fnn_last_key"] = None  # (wildcard signature, batch positions, batch) of the last call
        self.__dict__["_fnn_guard"] = None  # the steady-state check (_Guard) of the last call's specialisation
        self.__dict__["trace_count"] = 0

    def _fnn_call(self, args: tuple) -> Any:
        amp = self._autocast(args) if torch._C._is_any_autocast_enabled() else None  # ~0.1 us: one C call
        guard = self._fnn_guard
        grad = torch.is_grad_enabled()
        if guard is not None and guard.spec.autocast == amp and guard.spec.grad is grad:
            live = guard.live(args)
            if live is not None:  # nothing the key reads has changed since the last call
                if guard.order is not None:
                    return guard.spec.run_inputs([*args, *[live[i] for i in guard.order]], guard.requires_grad)
                return guard.spec.run(dict(zip(guard.names, live)), args, checked=True)
        tensors = self._tensors()
        batch, batch_at = batching.batch_of(args)
        wild = _signature(args, tensors, self._fnn_named_modules(), batch_at, amp, grad)
        spec = next((s for s in self._fnn_poly.get(wild, ()) if batch >= s.min_batch and s.serves(args, batch_at, batch)),
                    None)
        prev = self._fnn_last_key
        self.__dict__["_fnn_last_key"] = (wild, batch_at, batch)
        self.__dict__["_fnn_guard"] = None  # a new one once this call has run (its checks passed)
        if spec is not None:
            self.__dict__["_fnn_last"] = spec
            guard = _Guard.build(self, spec, args, tensors, wild, batch_at)
            out = spec.run(tensors, args)
            self.__dict__["_fnn_guard"] = guard
            return out
        sig = _with_batch(wild, batch_at, batch)
        spec = self._fnn_cache.get(sig)
        if spec is None:
            from fusednn.compiler.trace import input_names

            names = input_names(self._fnn_fn, len(args))
            what = self._fnn_name()
            log.info("fusednn: compiling a new specialisation of %s (%s)", what,
                     _describe_change(None if prev is None else _with_batch(*prev), sig, names))
            cap = self._fnn_options.max_specializations
            if len(self._fnn_cache) >= cap:
                log.warning("fusednn: %s has now compiled %d specialisations (max_specializations=%d); the input "
                            "signature keeps changing: %s. Each one traces and generates kernels again: pad inputs "
                            "to fixed shapes, keep one dtype/layout (x.contiguous()), or raise max_specializations.",
                            what, len(self._fnn_cache) + 1, cap, _what_varies([*self._fnn_cache, sig], names))
            spec = Specialization(self._fnn_fn, args, self._fnn_options, tensors, batch_at, amp, grad)
            self._warn_eager(spec)
            self._fnn_cache[sig] = spec
            if spec.min_batch is not None:
                self._fnn_poly.setdefault(wild, []).append(spec)
            self.__dict__["trace_count"] = self.trace_count + 1
        self.__dict__["_fnn_last"] = spec
        guard = _Guard.build(self, spec, args, tensors, sig, batch_at if spec.min_batch else ())
        out = spec.run(tensors, args)
        self.__dict__["_fnn_guard"] = guard
        return out

    def _autocast(self, args: tuple) -> tuple[str, torch.dtype] | None:
        """The (device type, dtype) of the torch.autocast this call runs under, for its inputs' device type
        (None: none).

        Under it conv2d and linear compute in that dtype and losses in float32, as in eager (the trace
        applies autocast's op lists: trace.AUTOCAST_LOWER, AUTOCAST_FP32); it is part of the
        specialisation key. float16 and bfloat16; the reference backend, which would not follow autocast,
        refuses it."""
        device = next((a.device.type for a in pytree.tree_leaves(args) if isinstance(a, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(device):
            return None
        dtype = torch.get_autocast_dtype(device)
        if dtype not in (torch.float16, torch.bfloat16) or self._fnn_options.backend != "triton":
            why = ("fusednn follows autocast in float16 and bfloat16" if self._fnn_options.backend == "triton"
                   else "backend='reference' does not follow autocast")
            raise UnsupportedOpError(
                f"{self._fnn_name()} called under torch.autocast({device!r}, dtype={dtype}): {why}. Use "
                "backend='triton' with float16 or bfloat16, or call it outside autocast "
                f"(torch.autocast({device!r}, enabled=False) around the call)")
        return device, dtype

    def _warn_eager(self, spec: Specialization) -> None:
        """strict=False: one warning per compiled model naming the calls torch runs inside the graph."""
        eager = [n for n in spec.traced.nodes if n.op == "eager"]
        if eager and not self.__dict__.get("_fnn_warned_eager"):
            self.__dict__["_fnn_warned_eager"] = True
            calls = ", ".join(f"{n.attrs['call']}{f' in module {n.module!r}' if n.module else ''} ({n.source})"
                              for n in eager)
            log.warning("fusednn: strict=False: %s runs %d unsupported call(s) in torch eager inside the graph: %s. "
                        "Each one ends fusion around it, saves its inputs for backward and runs again there "
                        "under torch autograd.", self._fnn_name(), len(eager), calls)

    def _fnn_name(self) -> str:
        fn = self._fnn_fn
        return type(fn).__name__ if isinstance(fn, torch.nn.Module) else getattr(fn, "__name__", "function")

    def _fnn_named_modules(self) -> list[tuple[str, torch.nn.Module]]:
        out = []
        for m in self._fnn_modules:
            prefix = self._fnn_prefix.get(id(m), "")
            out += [((prefix + name).rstrip("."), sub) for name, sub in m.named_modules()]
        return out

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
        """The generated kernel sources of the most recent specialisation, by kernel name: the training
        graph's, then (once a call autograd did not record has built it) the inference graph's."""
        exe = self._last().executable
        steps = list(getattr(exe, "steps", []))
        inference = getattr(exe, "_inference", None)
        if inference is not None:
            steps += inference.steps
        return {s.kernel.name: s.kernel.source for s in steps if s.kernel is not None}

    @property
    def inference_graph(self) -> Graph | None:
        """The IR calls autograd does not record run (conv epilogues folded: passes.fuse_conv_inference), once
        such a call has built it; None where it would be the fused graph."""
        inference = getattr(self._last().executable, "_inference", None)
        return None if inference is None else inference.graph

    @property
    def specializations(self) -> int:
        return len(self._fnn_cache)

    def stats(self) -> dict:
        """Groups, launches per forward/backward and bytes each kernel must move, for the last signature."""
        return self._last().executable.stats()

    def dump(self, directory: str, aot: bool = True) -> list[str]:
        """Write IR before/after fusion, kernel sources, backward plan, stats, a graph picture and (aot=True)
        each kernel's TTIR, PTX and sm_90 resource report; returns the paths written (see fusednn/tools/dump.py)."""
        from fusednn.tools.dump import dump

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
            max_specializations: int = 8, strict: bool = True) -> Any:
    """Compile an nn.Module (returns a CompiledModule) or a function of tensors (returns a callable).

    Args:
        fuse: fuse conv+bias+act+pool and linear+bias+act chains; False runs every op as its own kernel.
        backend: "triton" (generated forward kernels, hand-written backward) or "reference" (the registry's
            torch implementations, for checking).
        precision: "ieee" (exact fp32 dots, torch's default) or "tf32" (tensor cores on NVIDIA GPUs).
        max_specializations: past this many input signatures a warning says what keeps changing.
        strict: True raises UnsupportedOpError on a torch call fusednn has no op for; False runs such a call
            (out of place, one tensor out) in torch eager inside the graph, with one warning.
    """
    options = Options(fuse, backend, precision, max_specializations, strict)
    if isinstance(model, torch.nn.Module):
        return CompiledModule(model, options)
    if callable(model):
        return CompiledFunction(model, options)
    raise TypeError(f"fusednn.compile expects an nn.Module or a function, got {type(model).__name__}")
