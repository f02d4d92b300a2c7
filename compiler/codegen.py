"""Code generation: lower each node of a (fused) graph to one generated Triton kernel and its launch.

For every node, a template in `compiler/templates/` turns a spec (concrete shapes and attributes) into
the text of one kernel file with a header that names the IR nodes it implements and its backward file;
the text is written to the content-hashed cache and imported (`compiler.source.load`). A `Step` holds
the kernel and a closure that runs it on the tensors of one call. Reshapes of contiguous tensors are
views and BatchNorm's num_batches_tracked counter is bookkeeping: neither launches a kernel. Kernel
inputs are made contiguous here (`_c`: a no-op for contiguous tensors, so parameters are read in place).

Before any template runs, `check` refuses what the kernels cannot take, on IR types alone: a value of
2**31 elements or more (32-bit offsets) and dtypes other than float32. A node with nothing to compute
(batch 0) launches nothing (`empty_node`).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

import torch

from fusednn.compiler import source
from fusednn.compiler.autodiff import saved_values
from fusednn.compiler.ir import Env, Graph, Node, Value
from fusednn.compiler.ops import REGISTRY, empty_node, softmax_dims
from fusednn.compiler.templates import (batch_norm, conv, dropout, linear, losses, pointwise, pool, softmax)
from fusednn.errors import CompileError, InputMismatchError, UnsupportedOpError
from fusednn.kernels.plan import bytes_once

log = logging.getLogger("fusednn")

@dataclass
class Kernel:
    """One generated kernel file: its name, source text and the imported module (with `launch`)."""

    name: str
    source: str
    module: ModuleType


@dataclass
class Step:
    """One node's forward: the kernel it launches (None for views) and how to run it on an Env."""

    node: Node
    kernel: Kernel | None
    run: Callable[[Env], None]


def _numel(shape) -> int:
    return math.prod(shape)


def _labels(n: Node) -> tuple[str, ...]:
    return tuple(a.label() for a in (n.absorbed or (n,)))


def _modules(n: Node) -> list[str]:
    return [a.module or a.op for a in (n.absorbed or (n,))]


def _emit(n: Node, gen: Callable[..., str], spec_cls: type, **fields: Any) -> Kernel:
    name = f"fnn_{n.op}_{n.out.name}"
    header = source.header(name, list(_labels(n)), _modules(n), REGISTRY[n.op].backward_file)
    text = gen(spec_cls(name=name, header=header, labels=_labels(n), **fields))
    return Kernel(name, text, source.load(text, name))


def _empty(env: Env, v: Value, like: torch.Tensor) -> torch.Tensor:
    """A fresh tensor for v at this call's shape (its batch, when the graph is batch-polymorphic)."""
    return torch.empty(env.shape(v), dtype=v.type.dtype, device=like.device)


def _moved(cache: dict, batch: int | None, *tensors: torch.Tensor | None) -> int:
    """The bytes a step's launch moves, measured once per batch size (kernels/plan.py)."""
    return bytes_once(cache, batch, tensors)


def _as4d(t: torch.Tensor) -> torch.Tensor:
    """Unbatched [C, H, W] inputs run as a batch of one."""
    return t if t.dim() == 4 else t.unsqueeze(0)


def _c(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


# -- one lowering per kernel family --------------------------------------------------------------------
def _lower_conv(n: Node, precision: str) -> Step:
    x, w, b = n.inputs
    N, C, H, W = (1,) * (4 - len(x.type.shape)) + x.type.shape
    K, _, R, S = w.type.shape
    a = n.attrs
    act, pool_kind, pool_k = a.get("act", "none"), a.get("pool", "none"), a.get("pool_k", 1)
    save_act = pool_kind == "avg" and act != "none"
    act_value = n.absorbed[1].out if save_act else None
    k = _emit(n, conv.generate, conv.ConvSpec, N=N, C=C, H=H, W=W, K=K, R=R, S=S, stride=a["stride"],
              padding=a["padding"], dilation=a["dilation"], groups=a["groups"], bias=b is not None, act=act,
              act_param=a.get("act_param", 0.0), pool=pool_kind, pool_k=pool_k, save_act=save_act,
              precision=precision)

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _as4d(_c(env.values[x]))
        y = _empty(env, n.out, xt)
        idx = aout = None
        if pool_kind == "max":
            idx = torch.empty(_as4d(y).shape, dtype=torch.uint8, device=xt.device)
            env.extra[(n.out, "idx")] = idx
        if save_act:  # the activation before the pool: the absorbed activation node's shape
            act_shape = env.shape(act_value)
            aout = torch.empty((1,) * (4 - len(act_shape)) + act_shape, dtype=y.dtype, device=y.device)
            env.extra[(n.out, "act")] = aout
        args = (xt, _c(env.values[w]), _c(env.values.get(b)) if b is not None else None, _as4d(y), idx, aout)
        k.module.launch(*args, nbytes=_moved(moved, env.batch, *args))
        env.values[n.out] = y

    return Step(n, k, run)


def _lower_linear(n: Node, precision: str) -> Step:
    x, w, b = n.inputs
    Nout, K = w.type.shape
    M = _numel(x.type.shape[:-1])
    k = _emit(n, linear.generate, linear.LinearSpec, M=M, N=Nout, K=K, bias=b is not None,
              act=n.attrs.get("act", "none"), act_param=n.attrs.get("act_param", 0.0), precision=precision)

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _c(env.values[x]).reshape(-1, K)  # [M, K]; M follows the batch
        y = _empty(env, n.out, xt)
        args = (xt, _c(env.values[w]), _c(env.values[b]) if b is not None else None, y.view(-1, Nout))
        k.module.launch(*args, nbytes=_moved(moved, env.batch, *args))
        env.values[n.out] = y

    return Step(n, k, run)


def _lower_pointwise(n: Node, precision: str) -> Step:
    """One elementwise node, or a fused group of them (`pointwise`), as one 1-D kernel."""
    chain = n.absorbed or (n,)
    inside = {a.out for a in chain}
    names: dict[Value, str] = {}

    def name(v: Value) -> str:
        if v in inside:
            return f"v{v.name}"
        if v not in names:
            names[v] = "x" if not names else f"x{len(names)}"
        return names[v]

    steps = []
    for a in chain:
        shape = a.out.type.shape
        args: list[Any] = [name(a.inputs[0])]
        channels = inner = 1
        if a.op == "prelu":
            args.append(name(a.inputs[1]))
            channels = a.inputs[1].type.numel
            inner = _numel(shape[2:]) if len(shape) > 1 else 1
        elif a.op == "rsub":  # number - alpha * x
            alpha = a.attrs.get("alpha", 1.0)
            if alpha != 1.0:
                steps.append(pointwise.PwStep(f"{a.label()} (alpha)", f"v{a.out.name}_alpha", "mul", (args[0], float(alpha))))
                args[0] = f"v{a.out.name}_alpha"
            steps.append(pointwise.PwStep(a.label(), f"v{a.out.name}", "sub", (float(a.attrs["scalar"]), args[0])))
            continue
        elif a.op in ("add", "sub", "mul"):
            other = a.inputs[1]
            _check_broadcast(a)
            args.append(name(other) if other is not None else float(a.attrs["scalar"]))
            alpha = a.attrs.get("alpha", 1.0)
            if alpha != 1.0 and other is not None:
                steps.append(pointwise.PwStep(f"{a.label()} (alpha)", f"v{a.out.name}_alpha", "mul", (args[1], float(alpha))))
                args[1] = f"v{a.out.name}_alpha"
            elif alpha != 1.0:
                args[1] = float(args[1]) * alpha
        steps.append(pointwise.PwStep(a.label(), f"v{a.out.name}", a.op, tuple(args),
                                      a.attrs.get("negative_slope", 0.0), channels, inner))
    # Written to memory: the result, and the intermediates the chain's backward reads.
    saved = {v for a in chain for v in saved_values(a)}
    keep = [a.out for a in chain[:-1] if a.out in saved] + [n.out]
    kname = f"fnn_{n.op}_{n.out.name}"
    header = source.header(kname, list(_labels(n)), _modules(n),
                           ", ".join(dict.fromkeys(REGISTRY[a.op].backward_file for a in chain)))
    out_shape = n.out.type.shape
    index = tuple((nm, pointwise.broadcast_index(v.type.shape, out_shape)) for v, nm in names.items()
                  if v.type.shape != out_shape and not _is_prelu_weight(v, chain))
    spec = pointwise.PointwiseSpec(name=kname, header=header, numel=n.out.type.numel, inputs=tuple(names.values()),
                                   steps=tuple(steps), outputs=tuple(f"v{v.name}" for v in keep), index=index)
    text = pointwise.generate(spec)
    k = Kernel(kname, text, source.load(text, kname))
    tensor_inputs = list(names)

    moved: dict = {}

    def run(env: Env) -> None:
        ins = [_c(env.values[v]) for v in tensor_inputs]
        outs = [_empty(env, v, ins[0]) for v in keep]
        k.module.launch(*ins, *outs, nbytes=_moved(moved, env.batch, *ins, *outs))
        env.values.update(zip(keep, outs))

    return Step(n, k, run)


def _is_prelu_weight(v: Value, chain: tuple[Node, ...]) -> bool:
    return any(a.op == "prelu" and a.inputs[1] is v for a in chain)


def _check_broadcast(n: Node) -> None:
    """A broadcast operand's gradient is summed by kernels/broadcast.py over at most MAX_DIMS merged dims."""
    from fusednn.kernels.broadcast import MAX_DIMS, coalesce

    x, y = n.inputs
    out = n.out.type.shape
    for v, other in ((x, y), (y, x)):
        if v is None or v.type.shape == out:
            continue
        o = None if n.op != "mul" or other is None else other.type.shape
        if len(coalesce(out, v.type.shape, o)) > MAX_DIMS:
            raise UnsupportedOpError(
                f"{where(n)}: broadcasting {list(v.type.shape)} to {list(out)} alternates kept and broadcast dims "
                f"more than {MAX_DIMS} times after merging, more than fusednn's broadcast gradient takes; "
                "reshape the operands to fewer dims")


def _lower_pool(n: Node, precision: str) -> Step:
    x = n.inputs[0]
    N, C, H, W = (1,) * (4 - len(x.type.shape)) + x.type.shape
    OH, OW = n.out.type.shape[-2:]
    kind = "max" if "max" in n.op else "avg"
    if n.op.startswith("adaptive"):
        k = _emit(n, pool.generate, pool.AdaptivePoolSpec, kind=kind, N=N, C=C, H=H, W=W, OH=OH, OW=OW)
    else:
        a = n.attrs
        k = _emit(n, pool.generate, pool.PoolSpec, kind=kind, N=N, C=C, H=H, W=W, OH=OH, OW=OW,
                  kernel=a["kernel"], stride=a["stride"], padding=a["padding"], dilation=a.get("dilation", (1, 1)),
                  ceil_mode=a["ceil_mode"], count_include_pad=a.get("count_include_pad", False),
                  divisor_override=a.get("divisor_override"))

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _as4d(_c(env.values[x]))
        y = _empty(env, n.out, xt)
        idx = None
        if kind == "max":
            idx = torch.empty(_as4d(y).shape, dtype=torch.int32, device=xt.device)
            env.extra[(n.out, "idx")] = idx
        y4 = _as4d(y)
        k.module.launch(xt, y4, idx, nbytes=_moved(moved, env.batch, xt, y4, idx))
        env.values[n.out] = y

    return Step(n, k, run)


def _lower_softmax(n: Node, precision: str) -> Step:
    x = n.inputs[0]
    outer, D, inner = softmax_dims(x.type.shape, n.attrs["dim"])
    k = _emit(n, softmax.generate, softmax.SoftmaxSpec, outer=outer, D=D, inner=inner, log=n.op == "log_softmax")

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _c(env.values[x])
        y = _empty(env, n.out, xt)
        k.module.launch(xt, y, nbytes=_moved(moved, env.batch, xt, y))
        env.values[n.out] = y

    return Step(n, k, run)


def _lower_loss(n: Node, precision: str) -> Step:
    x, t = n.inputs
    red = n.attrs["reduction"]
    if n.op == "cross_entropy":
        N, C = x.type.shape
        k = _emit(n, losses.generate, losses.CrossEntropySpec, N=N, C=C, reduction=red,
                  ignore_index=n.attrs["ignore_index"])
    else:
        k = _emit(n, losses.generate, losses.PointLossSpec, numel=x.type.numel,
                  kind="mse" if n.op == "mse_loss" else "l1", reduction=red)

    moved: dict = {}

    def run(env: Env) -> None:
        xt, tt = _c(env.values[x]), _c(env.values[t])
        loss = _empty(env, n.out, xt)
        if n.op == "cross_entropy":
            lse = torch.empty(xt.shape[0], dtype=torch.float32, device=xt.device)
            env.extra[(n.out, "lse")] = lse
            k.module.launch(xt, tt, loss, lse, nbytes=_moved(moved, env.batch, xt, tt, loss, lse))
        else:
            k.module.launch(xt, tt, loss, nbytes=_moved(moved, env.batch, xt, tt, loss))
        env.values[n.out] = loss

    return Step(n, k, run)


def _lower_batch_norm(n: Node, precision: str) -> Step:
    x, rm, rv, w, b = n.inputs
    if (w is None) != (b is None):
        raise UnsupportedOpError(f"{where(n)}: batch_norm with a weight but no bias (or the reverse) is not "
                                 "supported; pass both (nn.BatchNorm2d(affine=True) does) or neither")
    shape = x.type.shape
    N, C, inner = shape[0], shape[1], _numel(shape[2:])
    training = n.attrs["training"] or rm is None
    k = _emit(n, batch_norm.generate, batch_norm.BatchNormSpec, N=N, C=C, inner=inner, training=training,
              momentum=n.attrs["momentum"], eps=n.attrs["eps"], affine=w is not None,
              track_running_stats=rm is not None)

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _c(env.values[x])
        y = _empty(env, n.out, xt)
        mean = torch.empty(C, dtype=torch.float32, device=xt.device)
        invstd = torch.empty_like(mean)
        env.extra[(n.out, "mean")], env.extra[(n.out, "invstd")] = mean, invstd
        get = lambda v: None if v is None else env.values[v]  # noqa: E731
        # The kernel updates the running statistics in place: a strided buffer is updated through a
        # contiguous copy that is written back, so the user's buffer object keeps the new values.
        stats = [get(rm), get(rv)]
        work = [_c(t) for t in stats]
        args = (xt, _c(get(w)), _c(get(b)), *work, y, mean, invstd)
        k.module.launch(*args, nbytes=_moved(moved, env.batch, *args))
        for t, c in zip(stats, work):
            if c is not t:
                t.copy_(c)
        env.values[n.out] = y

    return Step(n, k, run)


def _lower_dropout(n: Node, precision: str) -> Step:
    x = n.inputs[0]
    k = _emit(n, dropout.generate, dropout.DropoutSpec, numel=x.type.numel, p=n.attrs["p"])

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _c(env.values[x])
        y = _empty(env, n.out, xt)
        # The mask is a function of (seed, index): draw the seed from torch's CPU RNG, so
        # torch.manual_seed makes runs repeatable, and keep it for the backward.
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        env.extra[(n.out, "seed")] = seed
        k.module.launch(xt, y, seed, nbytes=_moved(moved, env.batch, xt, y))
        env.values[n.out] = y

    return Step(n, k, run)


def _lower_reshape(n: Node, precision: str) -> Step:
    def run(env: Env) -> None:
        # The traced target shape, with this call's batch where it follows the batch; a view when contiguous.
        env.values[n.out] = env.values[n.inputs[0]].reshape(env.shape(n.out))

    return Step(n, None, run)


def _lower_eager(n: Node, precision: str) -> Step:
    """A call the registry does not know (strict=False): torch runs it, no kernel."""
    call = n.attrs["call"]

    def run(env: Env) -> None:
        with torch.no_grad():
            env.values[n.out] = call([env.values[v] for v in n.inputs])

    return Step(n, None, run)


def _lower_counter(n: Node, precision: str) -> Step:
    def run(env: Env) -> None:
        env.values[n.out] = env.values[n.inputs[0]].add_(n.attrs["by"])  # BatchNorm's batch counter

    return Step(n, None, run)


# The lowering of each codegen family (the registry row's `lower`).
LOWER: dict[str, Callable[[Node, str], Step]] = {
    "conv": _lower_conv, "linear": _lower_linear, "pointwise": _lower_pointwise, "pool": _lower_pool,
    "softmax": _lower_softmax, "loss": _lower_loss, "batch_norm": _lower_batch_norm, "dropout": _lower_dropout,
    "reshape": _lower_reshape, "counter": _lower_counter, "eager": _lower_eager,
}


# -- what the kernels cannot take: checked on IR types before any template runs ------------------------
MAX_NUMEL = 2**31 - 1  # kernels index with 32-bit offsets


def where(n: Node) -> str:
    """`conv2d in module 'conv1' (net.py:12)`: how error messages name a node (a fused node by its head)."""
    head = n.absorbed[0] if n.absorbed else n
    mod = f" in module '{head.module}'" if head.module else " at the top level"
    return f"{head.op}{mod}" + (f" ({head.source})" if head.source else "")


def check_batch(graph: Graph, batch: int) -> None:
    """A batch-polymorphic graph called at a new batch: every value that follows it still fits 32-bit
    offsets (`check` saw the nominal batch)."""
    for v in [*graph.inputs, *(a.out for n in graph.nodes for a in (*n.absorbed, n))]:
        if v.name in graph.dynamic and v.type.shape and batch * (v.type.numel // v.type.shape[0]) > MAX_NUMEL:
            raise CompileError(
                f"%{v.name} : {v.type} would have {batch * (v.type.numel // v.type.shape[0])} elements at batch "
                f"{batch}; fusednn's kernels use 32-bit offsets, so a tensor may have at most 2**31 - 1 elements: "
                "split the batch")


def check(graph: Graph) -> None:
    """Raise before code generation when a value does not fit the kernels: 2**31 elements or more
    (CompileError: 32-bit offsets) or a dtype other than float32 (InputMismatchError)."""
    for n in graph.nodes:
        for v in [v for v in n.inputs if v is not None] + [a.out for a in n.absorbed or (n,)]:
            if v.type.numel > MAX_NUMEL:
                role = "read" if v in n.inputs else "produced"
                raise CompileError(
                    f"%{v.name} : {v.type} has {v.type.numel} elements (shape {list(v.type.shape)}), {role} by "
                    f"{where(n)}; fusednn's kernels use 32-bit offsets, so a tensor may have at most 2**31 - 1 "
                    "elements: split the batch or the input")
        if n.op == "eager":  # torch runs it: any dtype, any size
            continue
        if not empty_node(n) and any(v is not None and v.type.numel == 0 for v in n.inputs):
            raise CompileError(f"{where(n)} reduces over an empty operand ({', '.join(map(str, n.inputs))} : "
                               f"{', '.join(str(v.type) for v in n.inputs if v is not None)}) to a non-empty "
                               f"{n.out.type}; fusednn does not support this")
        if n.op in ("reshape",):
            continue
        for i, v in enumerate(n.inputs):
            if v is None or i in REGISTRY[n.op].int_operands or v.type.dtype == torch.float32:
                continue
            raise InputMismatchError(
                f"{where(n)}: fusednn's Triton kernels compute in float32, but its operand %{v.name} is {v.type}. "
                "Convert the model and its inputs with .float(), or compile with backend='reference'")


def _lower_empty(n: Node, precision: str) -> Step:
    """Zero elements to compute: an empty result, or what torch gives for an empty reduction (a loss is
    nan for 'mean', 0 for 'sum'), from the registry's reference on the empty operands. No kernel."""
    from fusednn.reference import run_node

    def run(env: Env) -> None:
        vals = {v: env.values[v] for v in n.inputs if v is not None}
        with torch.no_grad():
            env.values[n.out] = run_node(n, vals)

    return Step(n, None, run)


def lower(graph: Graph, precision: str, debug: int = 0) -> list[Step]:
    """One Step per node, generating and loading each node's kernel (after `check`)."""
    check(graph)
    steps = []
    for n in graph.nodes:
        lower_node = _lower_empty if empty_node(n) and not REGISTRY[n.op].side_effect else LOWER[REGISTRY[n.op].lower]
        step = lower_node(n, precision)
        if step.kernel is not None and debug >= 4:
            log.warning("fusednn: generated %s:\n%s", step.kernel.name, step.kernel.source)
        steps.append(step)
    return steps
