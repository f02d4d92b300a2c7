"""Standalone repro scripts, one per kernel of a training step: `repro/<kernel>.py` in a dump.

A training step (forward, backward, one fusednn.optim.SGD step, recorded separately) is recorded with
`launch.recording(execute=False)` and the GPU's launch configs, as aot.py does. While it is recorded every
tensor the step knows is named: IR values (`%4`), extra tensors (`mean:%3`), gradients (`d:%4`), so each
tensor argument of a launch gets a role by its address. Per kernel, the first launch becomes a script that

  * imports only torch, triton and the kernel's source file copied beside it (fusednn imports rewritten:
    `fusednn.kernels.X` -> the copied `X.py`; launcher helpers, which the kernel does not use, -> None);
  * builds every argument with the recorded shape, dtype and strides (views of a shared buffer as views);
    leaf inputs are random, saved outputs and extra tensors (argmax, batch statistics) come from running the
    torch reference forward on them, so they are consistent;
  * launches with the recorded grid and meta-parameters;
  * checks what the kernel wrote against a float64 torch reference of the IR nodes it implements (for a
    backward kernel, torch autograd's gradient of them; split-K partial sums by their sum over the split);
  * prints the maximum error and, on a GPU, the median µs of 100 launches; exits 1 above tolerance.
"""
from __future__ import annotations

import inspect
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusednn import launch
from fusednn.launch import Launch, kernel_name


@dataclass
class Unit:
    """What one group of launches implements: IR nodes (or a gradient sum / the optimizer step)."""

    kind: str  # "forward" | "backward" | "grad_sum" | "sgd"
    label: str  # "%3 conv_relu_pool"
    nodes: list = field(default_factory=list)  # IR nodes, in forward order
    names: dict[int, str] = field(default_factory=dict)  # id(tensor) -> role, during recording
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # role -> tensor
    outputs: list[str] = field(default_factory=list)
    launches: list[Launch] = field(default_factory=list)
    module: str = ""
    source: str = ""


# -- recording a training step, every tensor named --------------------------------------------------------
def _val(v: Any) -> str:
    return "%" + v.name


def example(v: Any, named: dict[str, torch.Tensor]) -> torch.Tensor:
    """A tensor for graph input v: the named parameter or buffer itself (cloned), else random of its type."""
    if v.kind != "input":
        return named[v.name].detach().clone()
    shape, dtype = v.type.shape, v.type.dtype
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=dtype)
    return torch.zeros(shape, dtype=dtype)


def record_step(spec: Any, named: dict[str, torch.Tensor], with_sgd: bool = True) -> list[Unit]:
    """Forward, backward and (with_sgd) one fusednn.optim.SGD step of `spec`, recorded (not run) with GPU
    launch configs."""
    from fusednn.compiler import autodiff, configs
    from fusednn.compiler.ops import REGISTRY

    exe, graph = spec.executable, spec.graph
    units: list[Unit] = []
    with torch.random.fork_rng(devices=[]), launch.recording(execute=False) as rec, configs.use_target("gpu"):
        ins = [example(v, named) for v in graph.inputs]
        env_vals = dict(zip(graph.inputs, ins))
        from fusednn.compiler.ir import Env
        env = Env(env_vals)
        for step in exe.steps:
            start = len(rec)
            step.run(env)
            n = step.node
            u = Unit("forward", n.label(), [*step.also, n], module=n.module, source=n.source)
            u.launches = rec[start:]
            for v in [*(v for a in step.also for v in (*a.inputs, a.out)), *n.inputs, n.out]:
                if v is not None and v in env.values:
                    u.tensors[_val(v)] = env.values[v]
            u.outputs = [_val(a.inputs[0]) for a in step.also]  # a batch counter, counted in place
            for (v, key), t in env.extra.items():
                if (v is n.out or (v, key) in step.extra_reads) and isinstance(t, torch.Tensor):
                    u.tensors[f"{key}:{_val(v)}"] = t
            u.outputs += [k for k in u.tensors if k == _val(n.out) or k.endswith(":" + _val(n.out))]
            if n.op in ("batch_norm", "batch_norm_act") and n.attrs["training"] and n.inputs[1] is not None:
                u.outputs += [_val(n.inputs[1]), _val(n.inputs[2])]  # running statistics, in place
            units.append(u)
        # backward: the plan's walk (autodiff.BackwardPlan.run), a fused pointwise chain op by op as its VJP does
        needs_in = tuple(t.is_floating_point() for t in ins)
        need = exe.plan.requires_grad(needs_in)
        grads: dict[Any, torch.Tensor] = {v: torch.randn(v.type.shape) for v in graph.outputs
                                          if v.type.dtype.is_floating_point}
        inside: set = set()
        for n in reversed(graph.nodes):
            if not autodiff.differentiable(n):
                continue
            chain = REGISTRY[n.op].backward == "pointwise"
            for a in (reversed(n.absorbed) if chain else [n]):
                dy = grads.pop(a.out, None)
                if dy is None or not (need.get(a.out, False) or a.out in inside):
                    continue
                needs = [v is not None and (need.get(v, False) or (chain and v in {b.out for b in n.absorbed}))
                         for v in a.inputs]
                start = len(rec)
                outs = autodiff.rule(a).vjp(a, env, dy.contiguous(), needs, exe.precision)
                u = Unit("backward", a.label(), [a], module=a.module or n.module, source=a.source or n.source)
                u.launches = rec[start:]
                u.tensors["d:" + _val(a.out)] = dy
                for v in [*a.inputs, a.out]:
                    if v is not None:  # a chain's intermediate is not in memory: its role has a shape only
                        u.tensors[_val(v)] = env.values.get(v, torch.empty(v.type.shape, dtype=v.type.dtype))
                for (v, key), t in env.extra.items():
                    if v is a.out and isinstance(t, torch.Tensor):
                        u.tensors[f"{key}:{_val(v)}"] = t
                for v, g in zip(a.inputs, outs):
                    if v is not None and g is not None and needs[a.inputs.index(v)]:
                        u.tensors["d:" + _val(v)] = g
                        u.outputs.append("d:" + _val(v))
                        _grad_sum(units, rec, grads, v, g)
                if chain:
                    inside |= {b.out for b in n.absorbed}
                units.append(u)
        if with_sgd:
            units.append(_sgd_unit(rec, [grads.get(v) for v in graph.inputs], ins))
    return units


def _grad_sum(units: list[Unit], rec: list[Launch], grads: dict, v: Any, g: torch.Tensor) -> None:
    """GradSum.add's launches as a unit of their own (a + b, or a += b in place)."""
    from fusednn.kernels.activation import add

    prev = grads.get(v)
    if prev is None:
        grads[v] = g
        return
    start = len(rec)
    out = add(prev.contiguous(), g.contiguous())
    u = Unit("grad_sum", f"d{_val(v)} sum", [], tensors={"a": prev, "b": g, "sum": out}, outputs=["sum"])
    u.launches = rec[start:]
    units.append(u)
    grads[v] = out


def _sgd_unit(rec: list[Launch], grads: list, ins: list[torch.Tensor]) -> Unit:
    """One fusednn.optim.SGD step (lr 0.1, momentum 0.9, first step) over the parameters with a gradient."""
    from fusednn.optim import SGD

    params = [torch.nn.Parameter(t.detach().clone()) for t, g in zip(ins, grads) if g is not None]
    params = params[1:]  # the first graph input is the user's input, not a parameter
    for p, g in zip(params, [g for g in grads if g is not None][1:]):
        p.grad = torch.randn(p.shape)
    start = len(rec)
    SGD(params, lr=0.1, momentum=0.9).step()
    u = Unit("sgd", "fusednn.optim.SGD(lr=0.1, momentum=0.9) step", [])
    u.launches = rec[start:]
    u.tensors = {"numels": torch.tensor([p.numel() for p in params])}
    return u


# -- describing one launch as data ----------------------------------------------------------------------
def _span(t: torch.Tensor) -> tuple[int, int]:
    lo = t.data_ptr()
    return lo, lo + t.numel() * t.element_size()


def _inside(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return b[0] <= a[0] and a[1] <= b[1]


def describe(u: Unit, rec: Launch, seen: set[int]) -> list[dict]:
    """Each argument of `rec` as plain data: a value, or a tensor with its layout, role and direction.

    seen: data pointers an earlier launch of the unit wrote (those are inputs here, not outputs)."""
    args = list(rec.args)
    roles = {r: t for r, t in u.tensors.items() if t.numel() > 0}
    out = []
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            out.append({"value": a if not isinstance(a, torch.dtype) else str(a)})
            continue
        d = {"shape": list(a.shape), "stride": list(a.stride()), "dtype": str(a.dtype).replace("torch.", ""),
             "role": None, "view": None, "inside": [], "written": False}
        if a.numel() == 0:
            out.append(d)
            continue
        span = _span(a)
        d["role"] = next((r for r, t in roles.items() if _span(t) == span), None)
        base = next((j for j, b in enumerate(args[:i]) if isinstance(b, torch.Tensor) and b.numel()
                     and _inside(span, _span(b))), None)
        base = base if base is not None else next(
            (j for j, b in enumerate(args) if j > i and isinstance(b, torch.Tensor) and b.numel()
             and _inside(span, _span(b)) and _span(b) != span), None)
        if base is not None:
            d["view"] = [base, (a.data_ptr() - args[base].data_ptr()) // a.element_size()]
        d["inside"] = [[r, (t.data_ptr() - a.data_ptr()) // t.element_size(), list(t.shape)]
                       for r, t in roles.items() if r != d["role"] and _inside(_span(t), span)]
        d["written"] = a.data_ptr() not in seen and (d["role"] in u.outputs or d["role"] is None
                                                     or any(r in u.outputs for r, _, _ in d["inside"]))
        out.append(d)
    return out


def _ref_source(op: str) -> str:
    """The registry's torch reference of `op` as a plain function named `ref_<op>`."""
    from fusednn.compiler.ops import REGISTRY

    src = textwrap.dedent(inspect.getsource(REGISTRY[op].ref))
    src = src[src.index("def "):]
    return re.sub(r"^def \w+\(", f"def ref_{op}(", src, count=1)


def _nodes(u: Unit) -> list[tuple]:
    flat = [a for n in u.nodes for a in (n.absorbed or (n,))]
    return [(a.op, [None if v is None else _val(v) for v in a.inputs],
             {k: v for k, v in a.attrs.items()}, _val(a.out)) for a in flat]


# -- kernel sources, made importable without fusednn -----------------------------------------------------
_IMPORT = re.compile(r"^from (fusednn\.[\w.]+) import (.+)$", re.M)


def copy_source(path: Path, out_dir: Path, done: set[str]) -> str:
    """Copy a kernel's file into out_dir with its fusednn imports rewritten; returns its module name there."""
    path = path.resolve()
    module = "src_" + re.sub(r"_[0-9a-f]{16}$", "", path.stem)  # generated files carry a content hash
    if module in done:
        return module
    done.add(module)

    def rewrite(m: re.Match) -> str:
        origin, names = m.group(1), m.group(2)
        if origin.startswith("fusednn.kernels."):
            import importlib

            dep = copy_source(Path(importlib.import_module(origin).__file__), out_dir, done)
            return f"from {dep} import {names}"
        bound = [n.split(" as ")[-1].strip() for n in names.strip("()").split(",") if n.strip()]
        return (f"{' = '.join(bound)} = _HostSide()  # was: from {origin} import {names} "
                "(host-side helpers, unused by the kernel)")

    text = _IMPORT.sub(rewrite, path.read_text())
    future = "from __future__ import annotations\n"
    at = text.index(future) + len(future) if future in text else 0  # __future__ imports must come first
    (out_dir / f"{module}.py").write_text(text[:at] + "\n" + _HOST_SIDE + text[at:])
    return module


# What a copied kernel file gets for fusednn's host-side modules (launch configs, the launch choke point):
# decorators pass through (`@configs.memo`), anything called at run time fails by name.
_HOST_SIDE = """class _HostSide:
    \"\"\"Stands in for a fusednn host-side module: the repro script launches the kernel itself.\"\"\"

    def __getattr__(self, name):
        if name in ("memo", "per_target"):
            return lambda fn: fn
        raise RuntimeError(f"repro: fusednn's host-side {name} is not available here; launch the kernel directly")


"""


# -- the scripts ----------------------------------------------------------------------------------------
def _literal(x: Any) -> str:
    text = repr(x)
    return text.replace("torch.", "torch.")


def write(units: list[Unit], out_dir: str | Path) -> list[str]:
    """repro/<kernel>.py for the first launch of every kernel in `units`, plus the copied kernel files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done: set[str] = set()
    written: list[str] = []
    scripts: set[str] = set()
    for u in units:
        seen: set[int] = set()
        for rec in u.launches:
            name = kernel_name(rec.kernel)
            desc = describe(u, rec, seen)
            seen |= {a.data_ptr() for a, d in zip(rec.args, desc) if isinstance(a, torch.Tensor) and d.get("written")}
            if name in scripts:
                continue
            scripts.add(name)
            fn = getattr(rec.kernel, "fn", rec.kernel)
            module = copy_source(Path(inspect.getsourcefile(fn)), out, done)
            ops = sorted({op for op, *_ in _nodes(u)})
            spec = {
                "kernel": name, "module": module, "kind": u.kind, "implements": u.label,
                "where": " ".join(w for w in (u.module, u.source) if w), "grid": list(rec.grid),
                "meta": rec.meta, "args": desc, "nodes": _nodes(u), "outputs": u.outputs,
                "roles": {r: [list(t.shape), str(t.dtype).replace("torch.", "")] for r, t in u.tensors.items()},
            }
            if u.kind == "sgd":
                spec["sgd_rows"] = [a.tolist() for a in rec.args[:7]]
                spec["hyper"] = {"lr": 0.1, "momentum": 0.9}
            refs = "\n\n".join(_ref_source(op) for op in ops)
            path = out / f"{name}.py"
            path.write_text(_TEMPLATE.replace("@SPEC@", repr(spec)).replace("@REFS@", refs)
                            .replace("@TITLE@", f"{name}: {u.kind} of {u.label}"))
            written.append(str(path))
    written += [str(out / f"{m}.py") for m in sorted(done)]
    return written


def kernel_files(units: list[Unit]) -> dict[str, str]:
    """kernel name -> its source file:first line of the kernel (for the kernels table)."""
    out = {}
    for u in units:
        for rec in u.launches:
            fn = getattr(rec.kernel, "fn", rec.kernel)
            out.setdefault(kernel_name(rec.kernel), f"{inspect.getsourcefile(fn)}:{fn.__code__.co_firstlineno}")
    return out


_TEMPLATE = r'''"""Standalone repro of @TITLE@, written by fusednn (fusednn/tools/repro.py).

Builds the launch's arguments with the recorded shapes, dtypes and strides, launches the kernel with the
recorded grid and meta-parameters, and checks what it wrote against a float64 torch reference of the IR nodes
it implements. Needs only torch, triton and the kernel file beside this script. Exit 1: error above tolerance.
    python THIS.py            (on a machine without a GPU: TRITON_INTERPRET=1 python THIS.py)
"""
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import triton  # noqa: E402

SPEC = @SPEC@
TOL = 1e-5  # ||out - ref|| / ||ref|| against float64; integer outputs (argmax) must match exactly
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


# -- the torch references of the IR ops (fusednn/compiler/ops.py) --------------------------------------------
@REFS@


def extra(key, node, env, shape):
    """An extra tensor a kernel writes next to a node's output, from the reference forward."""
    op, ins, a, out = node
    if key == "stats":  # per-tile partial statistics of a conv's output [N, K, ...] (conv.py `stats`) or of a
        # batch norm's input (batch_norm.py `tile_stats`)
        y = env[ins[0] if op in ("batch_norm", "batch_norm_act") else out].detach()
        flat = y.transpose(0, 1).reshape(y.shape[1], -1)  # [K, M], rows in (n, h, w) order
        m = flat.shape[1]
        tiles = shape[0] // (2 * flat.shape[0] + 1)
        # the kernel's own tiles, else any tiling of the same count
        rows = SPEC["meta"].get("BLOCK_M", 0) or SPEC["meta"].get("BLOCK_R", 0)
        rows = rows if rows and -(-m // rows) == tiles else -(-m // tiles)
        parts = [flat[:, t * rows:(t + 1) * rows] for t in range(tiles)]
        mean = torch.stack([p.mean(1) if p.shape[1] else torch.zeros(p.shape[0]) for p in parts])
        m2 = torch.stack([((p - p.mean(1, keepdim=True)) ** 2).sum(1) if p.shape[1] else torch.zeros(p.shape[0])
                          for p in parts])
        counts = torch.tensor([float(p.shape[1]) for p in parts], dtype=torch.float64)
        return torch.cat([mean.flatten(), m2.flatten(), counts])
    if op == "batch_norm" and key in ("mean", "invstd"):
        if not a["training"] and ins[1] is not None:  # eval: the running statistics it normalises with
            return env[ins[1]] if key == "mean" else 1 / torch.sqrt(env[ins[2]] + a["eps"])
        x = env[ins[0]]
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        return flat.mean(1) if key == "mean" else 1 / torch.sqrt(flat.var(1, unbiased=False) + a["eps"])
    if key == "act":  # what a fused conv or linear saves for act' (conv.py `save_act`, linear.py `save_input`):
        # act(z) before a conv's avg pool, or z itself for an activation whose act' needs its input
        # (kernels/activation.saves_input)
        act = next(n for n in SPEC["nodes"] if n[0] not in ("conv2d", "linear", "max_pool2d", "avg_pool2d"))
        return env[act[3] if act[0] in ("relu", "leaky_relu", "sigmoid", "tanh") else act[1][0]].detach()
    if op == "max_pool2d" and key == "idx":
        k = a["kernel"][0]
        z = env[ins[0]]
        _, flat = F.max_pool2d(z, a["kernel"], a["stride"], a.get("padding", 0), a.get("dilation", 1),
                               a.get("ceil_mode", False), return_indices=True)
        if not any(n[0] == "conv2d" for n in SPEC["nodes"]):  # a pool kernel's own: torch's flat h * W + w
            return flat
        ih, iw = flat // z.shape[-1], flat % z.shape[-1]  # a fused conv's 1-byte window offset of the maximum
        return ((ih % k) * k + iw % k).to(torch.uint8)
    raise NotImplementedError(f"no reference for the extra tensor {key!r} of {op}")


def forward(env):
    """Run SPEC's nodes on env (role -> tensor) with the references; add every extra tensor role."""
    nodes = SPEC["nodes"]
    for node in nodes:
        op, ins, a, out = node
        env[out] = globals()["ref_" + op]([None if v is None else env[v] for v in ins], a)
    for role in SPEC["roles"]:
        if ":" in role and not role.startswith("d:"):
            key, owner = role.split(":")
            # a fused group's extras belong to the node that makes them: its pool, its batch norm (which
            # also owns the partial statistics of its input in a unit that has one: made by its statistics
            # kernel, or read from the conv before it)
            maker = {"idx": "max_pool2d", "mean": "batch_norm", "invstd": "batch_norm"}.get(key)
            if key == "stats" and any(n[0] in ("batch_norm", "batch_norm_act") for n in nodes):
                maker = next(n[0] for n in nodes if n[0] in ("batch_norm", "batch_norm_act"))
            node = next((n for n in nodes if (n[0] == maker if maker else n[3] == owner)), (None, [], {}, owner))
            env[role] = extra(key, node, env, SPEC["roles"][role][0])
    return env


def random_role(role, shape, dtype, nodes):
    for op, ins, a, out in nodes:
        if op == "batch_norm" and role == ins[2]:
            return torch.rand(shape, dtype=torch.float64) + 0.5  # a variance
    if dtype.startswith("float"):
        return torch.randn(shape, dtype=torch.float64)
    return torch.zeros(shape, dtype=getattr(torch, dtype))


def reference():
    """(inputs, expected): role -> float64 tensor for every role, and the roles the unit writes."""
    nodes, roles, kind = SPEC["nodes"], SPEC["roles"], SPEC["kind"]
    made = {out for *_, out in nodes}
    if kind == "grad_sum":
        ins = {r: torch.randn(s, dtype=torch.float64) for r, (s, _) in roles.items() if r != "sum"}
        return ins, {"sum": ins["a"] + ins["b"]}
    leaves = {r: random_role(r, s, d, nodes) for r, (s, d) in roles.items()
              if r not in made and ":" not in r}
    if kind == "forward":
        env = forward({r: t.clone() for r, t in leaves.items()})
        # extra tensors the unit reads (a batch norm: its input conv's partial statistics), as the reference made them
        reads = {r: env[r] for r in roles if ":" in r and not r.startswith("d:") and r not in SPEC["outputs"]}
        return {**leaves, **reads}, {r: env[r] for r in SPEC["outputs"]}
    # backward: saved outputs and extras from the reference forward; the gradient by torch autograd
    wrt = [r for r in leaves if "d:" + r in SPEC["outputs"]]
    env = {r: t.clone().requires_grad_(r in wrt) for r, t in leaves.items()}
    forward(env)
    out = nodes[-1][3]
    dy = torch.randn(env[out].shape, dtype=torch.float64)
    grads = torch.autograd.grad(env[out], [env[r] for r in wrt], dy)
    inputs = {r: t.detach() for r, t in env.items()}
    inputs["d:" + out] = dy
    return inputs, {"d:" + r: g for r, g in zip(wrt, grads)}


def partial_target(row, expected):
    """The gradient(s) a split-K partial buffer of `row` elements per split sums to: one, or dw and db packed."""
    grads = [expected[r].flatten() for r in SPEC["outputs"] if r in expected]
    for i in range(len(grads)):
        for j in range(i + 1, len(grads) + 1):
            if sum(g.numel() for g in grads[i:j]) == row:
                return torch.cat(grads[i:j])
    raise SystemExit(f"cannot tell what a scratch buffer of {row} elements per split holds")


def build(inputs, expected):
    """The launch's arguments, and [(name, tensor view, expected)] of what the kernel must write (a callable in
    the view's place: what to compare, read after the launch)."""
    args, checks = [], []
    known = {**inputs, **expected}
    for i, d in enumerate(SPEC["args"]):
        if "value" in d:
            args.append(d["value"])
            continue
        dtype = getattr(torch, d["dtype"])
        if d["view"] is not None and d["view"][0] < i:
            base = args[d["view"][0]]
            t = base.as_strided(d["shape"], d["stride"], base.storage_offset() + d["view"][1])
        else:
            t = torch.empty_strided(d["shape"], d["stride"], dtype=dtype, device=DEVICE)
            t.fill_(float("nan") if dtype.is_floating_point else 0)
        args.append(t)
    for i, d in enumerate(SPEC["args"]):  # values, once every buffer exists (a view may precede its base)
        if "value" in d:
            continue
        t = args[i]
        if d["view"] is not None and d["view"][0] > i:
            base = args[d["view"][0]]
            t = args[i] = base.as_strided(d["shape"], d["stride"], base.storage_offset() + d["view"][1])
        regions = [(d["role"], t)] + [(r, t.reshape(-1)[off:off + math.prod(s)].view(s)) for r, off, s in d["inside"]]
        for role, view in regions:
            if role is None:
                continue
            if role in inputs:  # an input, or an output written in place (running statistics) at its input value
                view.copy_(inputs[role].reshape(view.shape))
            elif role in known and not d["written"]:
                view.copy_(known[role].reshape(view.shape))
            if d["written"] and role in expected:
                checks.append((role, view, expected[role]))
        if d["role"] is None and not d["inside"] and t.numel():  # split-K partial sums over dim 0
            target = partial_target(t[0].numel(), expected)
            if d["written"]:
                # read after the launch: the sum over the splits, in float64
                checks.append((f"arg {i} summed over its {t.shape[0]} splits",
                               lambda t=t: t.double().reshape(t.shape[0], -1).sum(0), target))
            else:
                parts = torch.randn(t.shape, dtype=torch.float64).reshape(t.shape[0], -1)
                parts[-1] = target - parts[:-1].sum(0)
                t.copy_(parts.reshape(t.shape))
    return args, checks


def sgd():
    """The optimizer step: params, grads and momentum buffers through the address tables, vs torch.optim.SGD."""
    rows = SPEC["sgd_rows"]
    numels = [n for n in rows[3] if n > 0]
    block = SPEC["meta"]["BLOCK"]
    # each tensor padded to whole blocks: Triton's interpreter may touch masked-off lanes of raw addresses
    pad = lambda n, f: f(-(-n // block) * block, device=DEVICE)[:n]  # noqa: E731
    ps = [pad(n, torch.randn) for n in numels]
    gs = [pad(n, torch.randn) for n in numels]
    bufs = [pad(n, torch.zeros) for n in numels]
    ref = [p.double().clone().requires_grad_() for p in ps]
    for r, g in zip(ref, gs):
        r.grad = g.double()
    torch.optim.SGD(ref, **SPEC["hyper"]).step()
    pad = [0] * (len(rows[0]) - len(numels))
    addr = [[t.data_ptr() for t in ts] + pad for ts in (ps, gs, bufs)]
    tables = [torch.tensor(r, dtype=torch.int64, device=DEVICE) for r in addr + rows[3:]]
    args = tables + [d["value"] for d in SPEC["args"][7:]]
    _ALIVE.extend(gs + bufs)  # the tables hold raw addresses: their tensors must outlive the launch
    return args, [(f"param {i}", p, r.detach()) for i, (p, r) in enumerate(zip(ps, ref))]


_ALIVE: list = []


def main():
    torch.manual_seed(int(os.environ.get("SEED", "0")))
    import importlib

    kernel = getattr(importlib.import_module(SPEC["module"]), SPEC["kernel"])
    if SPEC["kind"] == "sgd":
        args, checks = sgd()
    else:
        args, checks = build(*reference())
    if not checks:
        raise SystemExit("nothing to check: no argument of this launch is an output")
    kernel[tuple(SPEC["grid"])](*args, **SPEC["meta"])
    worst, failed = 0.0, False
    for name, out, ref in checks:
        out = out() if callable(out) else out  # split-K partials: their sum
        out, ref = out.detach().cpu().double().reshape(ref.shape), ref.detach().cpu().double()
        err = (out - ref).abs().max().item() if out.numel() else 0.0
        rel = ((out - ref).norm() / ref.norm()).item() if ref.norm() > 0 else (out - ref).norm().item()
        exact = str(ref.dtype).startswith("torch.int") or name.startswith("idx:")
        bad = not (err == 0 if exact else rel <= TOL)
        failed |= bad
        worst = max(worst, err)
        print(f"{name:<40} max abs error {err:.3e}  rel {rel:.3e}{'  FAIL' if bad else ''}")
    print(f"{SPEC['kernel']}: max error {worst:.3e} ({'FAIL' if failed else 'ok'}, tolerance {TOL} relative)")
    if DEVICE == "cuda":
        from triton.testing import do_bench

        us = 1e3 * do_bench(lambda: kernel[tuple(SPEC["grid"])](*args, **SPEC["meta"]), rep=100,
                            return_mode="median")
        print(f"{SPEC['kernel']}: median {us:.1f} us per launch")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
'''
