"""The tracer: run a module or function once on meta tensors and record every torch call into a Graph.

Recording happens under a `TorchFunctionMode`, so ordinary Python in `forward` (a loop over `x.size()[1:]`,
`x.view(-1, n)`) runs as written with concrete shapes. Parameters and buffers are swapped for meta
tensors for the duration of the trace (torch's `_reparametrize_module`), recognised by identity, and
become named graph inputs; nothing of the user's module is changed, no real compute runs, no RNG is used
and no running statistic moves.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import sys
from typing import Any, Callable

import torch
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from fusednn.compiler import ops
from fusednn.compiler.ir import Graph, Node, TensorType, Value
from fusednn.errors import CompileError, InputMismatchError, UnsupportedOpError

_SKIP_DIRS = tuple(
    os.path.dirname(os.path.abspath(m.__file__)) + os.sep
    for m in (torch, sys.modules["fusednn"], sys.modules["fusednn.compiler"], sys.modules["fusednn.compiler.ops"])
) + (os.path.dirname(contextlib.__file__) + os.sep + "contextlib.py",)


def user_location() -> str:
    """file:line of the innermost stack frame outside torch and fusednn: the user's call."""
    f = sys._getframe(1)
    while f is not None:
        fname = f.f_code.co_filename
        if not fname.startswith(_SKIP_DIRS) and not fname.startswith("<frozen"):
            return f"{os.path.basename(fname)}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _op_phrase(name: str, module: str, where: str) -> str:
    m = f" in module '{module}'" if module else " at the top level"
    return f"{name}{m} ({where})"


def _shapes(args: Any) -> str:
    """The shapes of the tensors among a call's arguments, for error messages: "[2, 3, 8, 8], [4, 3, 3, 3]"."""
    return ", ".join(str(list(t.shape)) for t in pytree.tree_leaves(args) if isinstance(t, torch.Tensor)) or "-"


# Where torch keeps what users reach as torch.*, Tensor.* and F.*: error messages name the latter.
_PUBLIC = {"TensorBase": "Tensor", "_VariableFunctionsClass": "torch", "_TensorBase": "Tensor",
           "torch._C._nn": "F", "torch.nn.functional": "F", "torch._C._linalg": "torch.linalg",
           "torch._C._fft": "torch.fft", "torch._C._special": "torch.special"}


def user_name(func: Any) -> str:
    """A torch callable as users write it: `Tensor.mean` (not TensorBase.mean), `torch.cat` (not
    _VariableFunctionsClass.cat), `F.gelu` (not torch._C._nn.gelu), `Tensor.mT` (not its getter's __get__)."""
    if getattr(func, "__name__", None) == "__get__" and hasattr(func, "__self__"):
        func = func.__self__  # a property's getter: the descriptor is named as users write it
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    owner, _, attr = qual.rpartition(".")
    if owner:  # a method: TensorBase.mean, _VariableFunctionsClass.cat
        return f"{_PUBLIC.get(owner, owner)}.{attr}"
    module = getattr(func, "__module__", None) or ""
    if module in _PUBLIC:
        public = _PUBLIC[module]
        sub = public.rpartition(".")[2] + "_"  # torch._C._linalg.linalg_norm is torch.linalg.norm
        return f"{public}.{qual[len(sub):] if qual.startswith(sub) else qual}"
    return f"{module}.{qual}" if module.startswith("torch") else qual


# torch.autocast's op lists (torch.amp docs, "Autocast Op Reference"), for the ops fusednn traces: these run in
# the autocast dtype (their floating operands cast to it), these in float32, per device type; every other op
# runs in the dtype it is given (mixed operands promote, as without autocast).
AUTOCAST_LOWER = frozenset({"conv2d", "linear", "prelu"})
_LOSSES = frozenset({"cross_entropy", "nll_loss", "mse_loss", "l1_loss"})
AUTOCAST_FP32 = {"cpu": _LOSSES,
                 "cuda": _LOSSES | {"softmax", "log_softmax", "layer_norm", "group_norm", "sum", "softplus"}}


def _autocast_state(device: str, forced: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype of the torch.autocast in force for `device` where the traced code now runs (None: none);
    `forced`: the state to assume where torch cannot turn autocast on (CUDA's lists traced without CUDA)."""
    try:
        on = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know (meta): none
        return forced
    return torch.get_autocast_dtype(device) if on else forced


def _cast_floats(tree: Any, dtype: torch.dtype, back: dict[int, torch.Tensor]) -> Any:
    """tree with its floating tensors cast to dtype; back maps each cast tensor's id to the original."""
    def cast(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype:
            return t
        c = t.to(dtype)
        back[id(c)] = t
        return c

    return pytree.tree_map(cast, tree)


class _Recorder(TorchFunctionMode):
    """Records registered torch calls as Nodes; everything returning non-tensors passes through.

    device: the device type of the traced call's tensors. The meta tensors the trace runs on escape
    torch.autocast, so for each call the recorder reads the autocast state in force for that device type
    (the caller's, or a `with torch.autocast` inside the traced code) and applies its op lists itself: a
    node's result has the dtype eager would give it, and its operands keep theirs (the kernel casts as it
    loads)."""

    def __init__(self, values: dict[int, Value], keep: list[Any], strict: bool = True, device: str = "cpu",
                 forced: torch.dtype | None = None):
        super().__init__()
        self.values = values
        self.keep = keep  # keeps traced tensors alive so their ids stay unique
        self.strict = strict
        self.device, self.forced = device, forced
        self.nodes: list[Node] = []
        self.module_stack: list[str] = []
        # BatchNorm(momentum=None) reads its batch counter as a Python float: float(num_batches_tracked)
        # returns a stand-in S, and the batch_norm whose momentum is 1.0 / S reads the counter on the device
        self.cma: dict[float, torch.Tensor] = {}

    def value_of(self, t: Any, opname: str, where: str) -> Value | None:
        if t is None:
            return None
        v = self.values.get(id(t))
        if v is None:
            raise UnsupportedOpError(
                f"{_op_phrase(opname, self.module, where)} reads a tensor that is neither an input, a parameter, "
                "a buffer nor the result of a traced op (e.g. a tensor created inside forward, or a parameter of a "
                "module fusednn did not see); pass it as an input or register it as a buffer")
        return v

    def _record_eager(self, func: Any, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        """An `eager` node: the call replayed by torch at run time on the traced tensors it read."""
        where = user_location()
        if _autocast_state(self.device, self.forced) is not None:
            raise UnsupportedOpError(
                f"{name}{' in module ' + repr(self.module) if self.module else ''} ({where}) is a call fusednn does "
                "not trace (strict=False runs it in torch) inside torch.autocast: fusednn cannot give it autocast's "
                "casts. Call it outside autocast, or trace the model without strict=False")
        leaves, spec = pytree.tree_flatten((args, kwargs))
        ins: list[Value] = []
        slots: list[int | None] = []
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                slots.append(len(ins))
                ins.append(self.value_of(leaf, name, where))  # a tensor made inside forward is refused here
            else:
                slots.append(None)
        call = ops.EagerCall(func, name.split(".")[-1], spec,
                             tuple(None if isinstance(x, torch.Tensor) else x for x in leaves), tuple(slots))
        result = Value("?", TensorType(tuple(out.shape), out.dtype))
        self.nodes.append(Node("eager", tuple(ins), {"call": call}, result, module=self.module, source=where))
        self.values[id(out)] = result
        self.keep.append(out)
        return out

    @property
    def module(self) -> str:
        return self.module_stack[-1] if self.module_stack else ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in ops.ALIASES:
            out = func(*args, **kwargs)
            if id(args[0]) in self.values:
                self.values[id(out)] = self.values[id(args[0])]
                self.keep.append(out)
            return out
        if func is torch.Tensor.__float__ and self._is_counter(args[0]):
            stand_in = 2.0**70 + len(self.cma) * 2.0**20
            self.cma[1.0 / stand_in] = args[0]
            return stand_in
        d = ops.lookup(func)
        if d is None:
            out = func(*args, **kwargs)
            touches = any(isinstance(a, torch.Tensor) and id(a) in self.values for a in pytree.tree_leaves((args, kwargs)))
            if touches and any(isinstance(o, torch.Tensor) for o in pytree.tree_leaves(out)):
                name = user_name(func)
                if self.strict or not _replayable(func, name, (args, kwargs), out):
                    why = "" if self.strict else " (strict=False runs in torch only out-of-place calls returning one new tensor)"
                    raise UnsupportedOpError(
                        f"unsupported op {name}{' in module ' + repr(self.module) if self.module else ''} "
                        f"({user_location()}){why}. fusednn traces these ops (docs/IR.md):\n{ops.supported_ops()}")
                return self._record_eager(func, name, args, kwargs, out)
            return out
        where = user_location()
        shapes = _shapes((args, kwargs))
        back: dict[int, torch.Tensor] = {}  # a cast operand -> the traced tensor it stands for
        amp = _autocast_state(self.device, self.forced)
        if amp is not None:
            fp32 = AUTOCAST_FP32.get(self.device, _LOSSES)
            to = amp if d.name in AUTOCAST_LOWER else torch.float32 if d.name in fp32 else None
            if to is not None:
                args, kwargs = _cast_floats(args, to, back), _cast_floats(kwargs, to, back)
        try:
            tensors, attrs = d.parse(*args, **kwargs)
        except (CompileError, ValueError, TypeError) as e:
            raise type(e)(f"{_op_phrase(d.name, self.module, where)} with inputs of shape {shapes}: {e}") from None
        tensors = [back.get(id(t), t) for t in tensors]  # the node reads the operands, the kernel casts
        if d.name == "batch_norm" and attrs["momentum"] in self.cma:  # momentum=None: 1 / the counter
            tensors.append(self.cma.pop(attrs["momentum"]))
            attrs["momentum"] = None
        ins = tuple(self.value_of(t, d.name, where) for t in tensors)  # before running: names a stray tensor
        try:
            out = func(*args, **kwargs)
        except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:
            raise InputMismatchError(f"{_op_phrase(d.name, self.module, where)} with inputs of shape {shapes}: {e}") from None
        opname = attrs.pop("_op", d.name)  # a parse may name a sibling op: torch.sub(2, x) is rsub
        outputs = attrs.pop("_outputs", None)
        if outputs is not None:  # several results: one node each, the later ones reading the first
            return self._record_tuple(outputs, ins, attrs, out, where)
        if d.name == "add" and self._counts(ins[0], tensors, out):
            opname, attrs = "count_", {"by": int(attrs.get("scalar", 1) * attrs.get("alpha", 1))}
            ins = ins[:1]
        if d.kind == "view":
            attrs = {"shape": tuple(out.shape)}
        in_place = opname != "count_" and _writes_in_place(d, tensors, attrs, out)
        if in_place:
            self._check_writable(out, d.name, where)
        result = Value("?", TensorType(tuple(out.shape), out.dtype))
        self.nodes.append(Node(opname, ins, attrs, result, module=self.module, source=where))
        self.values[id(out)] = result
        self.keep.append(out)
        if in_place:
            self._rebind_aliases(out, result, where)
        return out

    def _counts(self, v: Value | None, tensors: list[Any], out: Any) -> bool:
        """Whether an add is a batch counter's in-place step (`num_batches_tracked.add_(1)`): into an integer
        buffer, or into what an earlier step of one returned (a BatchNorm called twice counts twice)."""
        if v is None or v.type.dtype.is_floating_point or not tensors or out is not tensors[0]:
            return False
        return v.kind == "buffer" or any(n.out is v and n.op == "count_" for n in self.nodes)

    def _is_counter(self, t: Any) -> bool:
        """Whether t is an integer buffer's value after a traced count_ (BatchNorm's num_batches_tracked)."""
        v = self.values.get(id(t))
        return v is not None and any(n.out is v and n.op == "count_" for n in self.nodes)

    def _record_tuple(self, ops_: tuple[str, ...], ins: tuple, attrs: dict, out: tuple, where: str) -> tuple:
        """A call returning a tuple (max_pool2d with indices): node i computes result i; nodes after the first
        read the call's first input and the first node's result (its kernel wrote what they hand out)."""
        first: Value | None = None
        for opname, t in zip(ops_, out):
            result = Value("?", TensorType(tuple(t.shape), t.dtype))
            node_ins = ins if first is None else (ins[0], first)
            self.nodes.append(Node(opname, node_ins, dict(attrs), result, module=self.module, source=where))
            self.values[id(t)] = result
            self.keep.append(t)
            first = first or result
        return out

    def _aliases(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Traced tensors other than t that share t's memory (views made by reshape, flatten, squeeze, ...)."""
        seen, out = {id(t)}, []
        for u in self.keep:
            if id(u) not in seen and id(u) in self.values and torch._C._is_alias_of(u, t):
                seen.add(id(u))
                out.append(u)
        return out

    def _check_writable(self, t: torch.Tensor, opname: str, where: str) -> None:
        """An in-place op may write only memory the traced code made itself: an input, parameter or buffer
        (or a view of one) would be changed for the caller, which fusednn's graph never does."""
        for u in [t, *self._aliases(t)]:
            v = self.values.get(id(u))
            if v is not None and v.kind != "node":
                raise UnsupportedOpError(
                    f"{_op_phrase(opname + '_ (in place)', self.module, where)} writes into {v.kind} '{v.name}'"
                    f"{'' if u is t else ' through a view'}; fusednn does not change its inputs, parameters or "
                    "buffers: use the out-of-place form (e.g. x = x + 1, F.relu(x)) or clone first")

    def _rebind_aliases(self, t: torch.Tensor, result: Value, where: str) -> None:
        """After an in-place op on t, every view of t's memory reads the new value, reshaped to its shape."""
        for u in self._aliases(t):
            alias = Value("?", TensorType(tuple(u.shape), u.dtype))
            self.nodes.append(Node("reshape", (result,), {"shape": tuple(u.shape)}, alias, module=self.module,
                                   source=where))
            self.values[id(u)] = alias


def _writes_in_place(d: ops.OpDef, tensors: list[Any], attrs: dict[str, Any], out: Any) -> bool:
    """Whether a traced call wrote its result into its first operand (x.add_(1), F.relu(x, inplace=True),
    x += y). Eval-mode or p=0 dropout also returns its operand itself, but writes nothing."""
    if not tensors or out is not tensors[0] or d.kind == "view":
        return False
    return d.kind != "dropout" or (attrs["training"] and attrs["p"] > 0.0)


def _replayable(func: Any, name: str, args: tuple, out: Any) -> bool:
    """Whether torch can replay the call at run time as a graph node: one new tensor out, nothing in place."""
    base = name.split(".")[-1]
    in_place = (base.endswith("_") and not base.endswith("__")) or base in _INPLACE_DUNDERS
    return isinstance(out, torch.Tensor) and not in_place and not any(out is a for a in pytree.tree_leaves(args))


_INPLACE_DUNDERS = {f"__i{op}__" for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "and", "or",
                                             "xor", "lshift", "rshift", "matmul")}


def _modules_of(fn: Callable) -> list[tuple[str, torch.nn.Module]]:
    """nn.Modules a plain function closes over or names as globals, with the names it uses for them."""
    found: list[tuple[str, torch.nn.Module]] = []
    code = getattr(fn, "__code__", None)
    if code is None:
        return found
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        try:
            obj = cell.cell_contents
        except ValueError:
            continue
        if isinstance(obj, torch.nn.Module):
            found.append((name, obj))
    for name in code.co_names:
        obj = fn.__globals__.get(name)
        if isinstance(obj, torch.nn.Module):
            found.append((name, obj))
    seen, unique = set(), []
    for name, m in found:
        if id(m) not in seen:
            seen.add(id(m))
            unique.append((name, m))
    return unique


def input_names(fn: Callable, n: int) -> list[str]:
    """Names for the n positional inputs: the forward's/function's parameter names where it has them."""
    target = fn.forward if isinstance(fn, torch.nn.Module) else fn
    try:
        params = [p for p in inspect.signature(target).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    names = [p.name for p in params[:n]]
    return names + [f"x{i}" for i in range(len(names), n)]


def trace(fn: Callable, *example_inputs: Any, name: str | None = None, strict: bool = True,
          autocast: tuple[str, torch.dtype] | None = None, device: str | None = None, grad: bool = False) -> Graph:
    """Trace a module or function on example inputs (only their shapes and dtypes are used) into a Graph.

    strict=False records a torch call the registry does not know as an `eager` node (torch runs it)
    instead of raising UnsupportedOpError. The trace follows the torch.autocast in force where it runs for
    the example inputs' device type; autocast: (device type, dtype): trace as under
    torch.autocast(device type, dtype=dtype) as well. device: the device type the traced call runs on (by
    default the example inputs', which may be meta stand-ins). grad: the grad mode the traced code sees
    (`torch.is_grad_enabled()`): that of the call the graph will run for, since a forward may branch on it.
    Nothing the trace computes requires grad either way (its stand-ins do not), so autograd records nothing.
    """
    if isinstance(fn, torch.nn.Module):
        mods = [("", fn)]
        gname = name or type(fn).__name__
    else:
        mods = _modules_of(fn)
        gname = name or (fn.__name__ if getattr(fn, "__name__", "<lambda>") != "<lambda>" else "fn")

    values: dict[int, Value] = {}
    keep: list[Any] = []
    graph_inputs: list[Value] = []
    meta_inputs = []
    for nm, x in zip(input_names(fn, len(example_inputs)), example_inputs):
        if isinstance(x, torch.Tensor):
            m = torch.empty(x.shape, dtype=x.dtype, device="meta")
            v = Value(nm, TensorType(tuple(x.shape), x.dtype), "input")
            values[id(m)] = v
            keep.append(m)
            graph_inputs.append(v)
            meta_inputs.append(m)
        else:
            meta_inputs.append(x)

    # Meta stand-ins for every parameter and buffer, under their qualified names.
    params: list[Value] = []
    replacements: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []
    names_of: dict[int, str] = {}
    for prefix, mod in mods:
        pre = prefix + "." if prefix else ""
        for mname, sub in mod.named_modules(remove_duplicate=False):
            names_of.setdefault(id(sub), (pre + mname).rstrip("."))
        swap: dict[str, torch.Tensor] = {}
        by_id: dict[int, torch.Tensor] = {}
        for kind, items in (("param", mod.named_parameters(remove_duplicate=False)),
                            ("buffer", mod.named_buffers(remove_duplicate=False))):
            for pname, t in items:
                if t is None:
                    continue
                if id(t) not in by_id:
                    m = torch.empty(t.shape, dtype=t.dtype, device="meta")
                    by_id[id(t)] = m
                    v = Value(pre + pname, TensorType(tuple(t.shape), t.dtype), kind)
                    values[id(m)] = v
                    keep.append(m)
                    params.append(v)
                swap[pname] = by_id[id(t)]
        replacements.append((mod, swap))

    if device is None:
        real = [x.device.type for x in pytree.tree_leaves(example_inputs) if isinstance(x, torch.Tensor) and not x.is_meta]
        device = autocast[0] if autocast is not None else real[0] if real else "cpu"
    # torch turns autocast off (with a warning) for a device type it cannot run: assume it then
    can_enter = autocast is not None and (autocast[0] != "cuda" or torch.cuda.is_available())
    rec = _Recorder(values, keep, strict, device, autocast[1] if autocast is not None and not can_enter else None)

    def pre_hook(module, _inputs):
        rec.module_stack.append(names_of.get(id(module), type(module).__name__))

    def post_hook(module, _inputs, _output):
        rec.module_stack.pop()

    hooks = [torch.nn.modules.module.register_module_forward_pre_hook(pre_hook),
             torch.nn.modules.module.register_module_forward_hook(post_hook)]
    try:
        with contextlib.ExitStack() as stack:
            for mod, swap in replacements:
                stack.enter_context(_reparametrize_module(mod, swap))
            stack.enter_context(torch.set_grad_enabled(grad))
            stack.enter_context(torch.random.fork_rng(devices=[]))  # meta dropout still draws a seed
            if can_enter:
                stack.enter_context(torch.autocast(autocast[0], dtype=autocast[1]))
            stack.enter_context(rec)
            out = fn(*meta_inputs)
    finally:
        for h in hooks:
            h.remove()

    if rec.cma:
        raise UnsupportedOpError(f"{gname} reads a batch counter (num_batches_tracked) as a Python number other "
                                 "than as BatchNorm's momentum=None factor; fusednn cannot trace that")
    leaves, spec = pytree.tree_flatten(out)
    outputs = []
    for leaf in leaves:
        if not isinstance(leaf, torch.Tensor) or id(leaf) not in values:
            raise UnsupportedOpError(f"{gname} returns {type(leaf).__name__} that fusednn did not trace; "
                                     "outputs must be tensors computed from the inputs")
        outputs.append(values[id(leaf)])
    used = {id(v) for n in rec.nodes for v in n.inputs if v is not None} | {id(v) for v in outputs}
    graph = Graph(gname, graph_inputs + [p for p in params if id(p) in used], rec.nodes, outputs, spec)
    for i, n in enumerate(graph.nodes, 1):
        n.out.name = str(i)
    return graph
