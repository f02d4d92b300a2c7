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

from fusednn._backend import interpreting
from fusednn.compiler import source
from fusednn.compiler.autodiff import saved_values
from fusednn.compiler.ir import Env, Graph, Node, Value
from fusednn.compiler.ops import REGISTRY, cat_dim, empty_node, norm_geometry, softmax_dims
from fusednn.compiler.templates import (batch_norm, cat, conv, dropout, linear, losses, norm, pointwise, pool,
                                        reduce, softmax)
from fusednn.errors import CompileError, InputMismatchError, UnsupportedOpError
from fusednn.kernels.conv_relu_pool import conv_saves_act
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
    # run reads Env values, allocates its results with torch.empty and launches, nothing else (no host
    # state, no torch op): its launches can be recorded once per batch and replayed (fusednn/prebuilt.py)
    replayable: bool = False
    extra_reads: tuple = ()  # the env.extra keys run reads (another step's side outputs)
    also: tuple = ()  # other nodes its kernel implements, before `node` (a batch counter: `_counters_in_kernels`)


def _numel(shape) -> int:
    return math.prod(shape)


def _labels(n: Node) -> tuple[str, ...]:
    return tuple(a.label() for a in (n.absorbed or (n,)))


def _modules(n: Node) -> list[str]:
    return [a.module or a.op for a in (n.absorbed or (n,))]


def _emit(n: Node, gen: Callable[..., str], spec_cls: type, suffix: str = "", **fields: Any) -> Kernel:
    """The kernel of node n: `fnn_<op>_<value>` (+ suffix: a variant of the same node in the inference graph
    whose source differs, so that kernels() and a dump show both)."""
    name = f"fnn_{n.op}_{n.out.name}{suffix}"
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
    """conv2d, conv_relu_pool, and conv_infer (inputs x, w, b, then the batch norm's running mean and
    variance, weight and bias, then the residual; no backward, so nothing saved)."""
    x, w, b = n.inputs[:3]
    inference = n.op == "conv_infer"
    rm, rv, bn_w, bn_b, res = n.inputs[3:] if inference else (None,) * 5
    N, C, H, W = (1,) * (4 - len(x.type.shape)) + x.type.shape
    K, _, R, S = w.type.shape
    a = n.attrs
    act, pool_kind, pool_k = a.get("act", "none"), a.get("pool", "none"), a.get("pool_k", 1)
    save_act = conv_saves_act(act, pool_kind) and not inference  # what act' is read from, full-size
    act_value = n.absorbed[1].out if save_act else None
    k = _emit(n, conv.generate, conv.ConvSpec, N=N, C=C, H=H, W=W, K=K, R=R, S=S, stride=a["stride"],
              padding=a["padding"], dilation=a["dilation"], groups=a["groups"], bias=b is not None, act=act,
              act_param=a.get("act_param", 0.0), pool=pool_kind, pool_k=pool_k, save_act=save_act,
              bn=rm is not None, bn_weight=bn_w is not None, bn_bias=bn_b is not None,
              bn_eps=a.get("bn_eps", 1e-5), residual=res is not None, bn_after_pool=a.get("bn_after_pool", False),
              inference=inference, act_params=a.get("act_params", ()), stats=a.get("stats", False),
              precision=precision, compute=_compute_dtype(n))
    bn_values = (rm, rv, bn_w, bn_b)
    stats = a.get("stats", False)

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _as4d(_c(env.values[x]))
        y = _empty(env, n.out, xt)
        idx = aout = None
        if pool_kind == "max" and not inference:  # the argmax, for backward
            idx = torch.empty(_as4d(y).shape, dtype=torch.uint8, device=xt.device)
            env.extra[(n.out, "idx")] = idx
        if save_act:  # act(z) before the pool, or z: the absorbed activation node's shape
            act_shape = env.shape(act_value)
            aout = torch.empty((1,) * (4 - len(act_shape)) + act_shape, dtype=y.dtype, device=y.device)
            env.extra[(n.out, "act")] = aout
        args = (xt, _c(env.values[w]), _c(env.values.get(b)) if b is not None else None, _as4d(y), idx, aout)
        if inference:
            args += tuple(_c(_get(env, v)) for v in bn_values) + (_as4d(_c(_get(env, res))) if res is not None else None,)
        if stats:  # the per-tile statistics the training batch norm of y combines (passes.conv_batch_stats)
            st = torch.empty(k.module.stats_size(xt.shape[0]), dtype=torch.float32, device=xt.device)
            env.extra[(n.out, "stats")] = st
            k.module.launch(*args, st=st, nbytes=_moved(moved, env.batch, *args, st))
        else:
            k.module.launch(*args, nbytes=_moved(moved, env.batch, *args))
        env.values[n.out] = y

    return Step(n, k, run, replayable=True)


def _compute_dtype(n: Node) -> str:
    """The dtype of a fused conv's own result where the kernel's output has another ("" where not): under
    CUDA autocast an absorbed op of autocast's float32 list makes the output float32, the conv stays half."""
    own, out = (n.absorbed[0].out if n.absorbed else n.out).type.dtype, n.out.type.dtype
    return "" if own == out else str(own).replace("torch.", "")


def _lower_linear(n: Node, precision: str) -> Step:
    x, w, b = n.inputs
    Nout, K = w.type.shape
    M = _numel(x.type.shape[:-1])
    # a linear that saves z in training saves nothing in the inference graph (passes.fuse_inference)
    suffix = "_infer" if n.attrs.get("save_input") is False else ""
    k = _emit(n, linear.generate, linear.LinearSpec, suffix=suffix, M=M, N=Nout, K=K, bias=b is not None,
              act=n.attrs.get("act", "none"), act_param=n.attrs.get("act_param", 0.0), precision=precision,
              save_input=n.attrs.get("save_input", False))
    save = n.attrs.get("save_input", False)

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _c(env.values[x]).reshape(-1, K)  # [M, K]; M follows the batch
        y = _empty(env, n.out, xt)
        args = (xt, _c(env.values[w]), _c(env.values[b]) if b is not None else None, y.view(-1, Nout))
        if save:  # z, the result before the activation, for act' (kernels/activation.saves_input)
            z = env.extra[(n.out, "act")] = torch.empty_like(y)
            args += (z.view(-1, Nout),)
        k.module.launch(*args, nbytes=_moved(moved, env.batch, *args))
        env.values[n.out] = y

    return Step(n, k, run, replayable=True)


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
        op, params = a.op, ()
        if REGISTRY[a.op].kernel_act is not None:  # an activation: the kernel formula and its parameters
            op, params = REGISTRY[a.op].kernel_act(a.attrs)
        steps.append(pointwise.PwStep(a.label(), f"v{a.out.name}", op, tuple(args), params, channels, inner))
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

    return Step(n, k, run, replayable=True)


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
    kind = "max" if "max" in n.op else "lp" if n.op == "lp_pool2d" else "avg"
    if n.op.startswith("adaptive"):
        k = _emit(n, pool.generate, pool.AdaptivePoolSpec, kind=kind, N=N, C=C, H=H, W=W, OH=OH, OW=OW)
    else:
        a = n.attrs
        k = _emit(n, pool.generate, pool.PoolSpec, kind=kind, N=N, C=C, H=H, W=W, OH=OH, OW=OW,
                  kernel=a["kernel"], stride=a["stride"], padding=a.get("padding", (0, 0)),
                  dilation=a.get("dilation", (1, 1)), ceil_mode=a["ceil_mode"],
                  count_include_pad=a.get("count_include_pad", kind == "lp"),
                  divisor_override=a.get("divisor_override"), norm_type=a.get("norm_type", 0.0))

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _as4d(_c(env.values[x]))
        y = _empty(env, n.out, xt)
        idx = None
        if kind == "max":  # int64 when the indices are a result (return_indices=True), as torch's
            idx = torch.empty(_as4d(y).shape, dtype=torch.int64 if n.attrs.get("indices") else torch.int32,
                              device=xt.device)
            env.extra[(n.out, "idx")] = idx
        y4 = _as4d(y)
        k.module.launch(xt, y4, idx, nbytes=_moved(moved, env.batch, xt, y4, idx))
        env.values[n.out] = y

    return Step(n, k, run, replayable=True)


def _lower_pool_indices(n: Node, precision: str) -> Step:
    """max_pool2d(return_indices=True)'s indices: the int64 argmax its pool node's kernel wrote; no kernel."""
    pool = n.inputs[1]

    def run(env: Env) -> None:
        env.values[n.out] = env.extra[(pool, "idx")].view(env.shape(n.out))

    return Step(n, None, run)


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

    return Step(n, k, run, replayable=True)


def _lower_loss(n: Node, precision: str) -> Step:
    red = n.attrs["reduction"]
    if n.op in ("cross_entropy", "nll_loss"):
        return _lower_class_loss(n)
    x, t = n.inputs
    k = _emit(n, losses.generate, losses.PointLossSpec, numel=x.type.numel,
              kind="mse" if n.op == "mse_loss" else "l1", reduction=red)

    moved: dict = {}

    def run(env: Env) -> None:
        xt, tt = _c(env.values[x]), _c(env.values[t])
        loss = _empty(env, n.out, xt)
        k.module.launch(xt, tt, loss, nbytes=_moved(moved, env.batch, xt, tt, loss))
        env.values[n.out] = loss

    return Step(n, k, run, replayable=True)


def _lower_class_loss(n: Node) -> Step:
    """cross_entropy / nll_loss over logits [C], [N, C] or [N, C, d...]: rows are (n, d...), classes dim 1."""
    x, t, w = n.inputs
    shape = x.type.shape
    C = shape[1] if len(shape) > 1 else shape[0]
    nll, mean = n.op == "nll_loss", n.attrs["reduction"] == "mean"
    k = _emit(n, losses.generate, losses.CrossEntropySpec, N=shape[0] if len(shape) > 1 else 1, C=C,
              reduction=n.attrs["reduction"], ignore_index=n.attrs["ignore_index"], inner=_numel(shape[2:]),
              label_smoothing=n.attrs.get("label_smoothing", 0.0), prob=t.type.dtype.is_floating_point,
              weight=w is not None, nll=nll)
    moved: dict = {}

    def run(env: Env) -> None:
        xt, tt = _c(env.values[x]), _c(env.values[t])
        loss = _empty(env, n.out, xt)
        lse = den = None
        if not nll:
            lse = torch.empty(xt.numel() // C, dtype=torch.float32, device=xt.device)
            env.extra[(n.out, "lse")] = lse
        if mean:
            den = torch.empty(1, dtype=torch.float32, device=xt.device)
            env.extra[(n.out, "den")] = den
        args = (xt, tt, _c(env.values[w]) if w is not None else None, loss, lse, den)
        k.module.launch(*args, nbytes=_moved(moved, env.batch, *args))
        env.values[n.out] = loss

    return Step(n, k, run, replayable=True)


def _lower_reduce(n: Node, precision: str) -> Step:
    """sum / mean / amax over any dims: one kernel over x's dims merged into kept and reduced runs."""
    from fusednn.kernels.reduce import reduce_layout

    x = n.inputs[0]
    try:
        reduce_layout(x.type.shape, n.attrs["dim"])
    except ValueError as e:
        raise UnsupportedOpError(f"{where(n)}: {e}; reshape the input to fewer dims first") from None
    k = _emit(n, reduce.generate, reduce.ReduceSpec, kind=n.op, dims=n.attrs["dim"])

    def run(env: Env) -> None:
        xt = _c(env.values[x])
        y = _empty(env, n.out, xt)
        k.module.launch(xt, y)
        env.values[n.out] = y

    return Step(n, k, run, replayable=True)


def _lower_cat(n: Node, precision: str) -> Step:
    """torch.cat: one copy launch per input into its slice of the result."""
    dim = cat_dim([v.type.shape for v in n.inputs], n.attrs["dim"])
    k = _emit(n, cat.generate, cat.CatSpec, n_inputs=len(n.inputs), dim=dim)

    def run(env: Env) -> None:
        xs = [_c(env.values[v]) for v in n.inputs]
        y = _empty(env, n.out, xs[0])
        k.module.launch(xs, y)
        env.values[n.out] = y

    return Step(n, k, run)


def _lower_batch_norm(n: Node, precision: str, counts: Node | None = None) -> Step:
    """batch_norm, and batch_norm_act: inputs x, running mean and variance, weight, bias, then
    num_batches_tracked (momentum=None) and, for batch_norm_act, the residual; each may be None.
    counts: the batch counter's step (`count_`) this kernel makes (`_counters_in_kernels`)."""
    x, rm, rv, w, b = n.inputs[:5]
    counter = n.inputs[5] if len(n.inputs) > 5 else None  # momentum=None: num_batches_tracked
    residual = n.inputs[6] if len(n.inputs) > 6 else None
    count = 0
    if counts is not None:
        counter, count = counts.inputs[0], counts.attrs["by"]
    step = _batch_norm_step(n, x, rm, rv, w, b, counter, training=n.attrs["training"] or rm is None,
                            momentum=n.attrs["momentum"], residual=residual, count=count)
    if counts is not None:
        step.also = (counts,)
    return step


def _counters_in_kernels(graph: Graph) -> dict[Node, Node]:
    """{training batch norm: the batch counter step it makes}. A BatchNorm's `num_batches_tracked.add_(1)` is
    made by the next training batch norm's kernel that updates running statistics at a momentum, once, in
    program (0, 0): no host op and no extra launch per batch norm. Only for a one-element counter nothing
    in the graph reads but its counts (no view, no momentum=None batch norm, no output, no op run in torch
    that could hold it), so no read can tell where the count was made; any other counter stays a host
    `add_`."""
    if any(REGISTRY[n.op].lower == "eager" for n in graph.nodes):
        return {}
    counter: dict[Value, Value] = {}  # a value that is a buffer's memory -> that buffer
    for n in graph.nodes:
        if n.op == "count_" or REGISTRY[n.op].lower == "reshape":
            counter[n.out] = counter.get(n.inputs[0], n.inputs[0])
    read = {counter.get(v, v) for n in graph.nodes if n.op != "count_" for v in n.inputs if v is not None}
    read |= {counter.get(v, v) for v in graph.outputs}
    made: dict[Node, Node] = {}
    for i, c in enumerate(graph.nodes):
        if c.op != "count_" or counter[c.out] in read or c.inputs[0].type.numel != 1:
            continue  # (the kernel counts one element: num_batches_tracked's)
        for m in graph.nodes[i + 1:]:
            if (REGISTRY[m.op].lower == "batch_norm" and m.attrs["training"] and m.inputs[1] is not None
                    and m.attrs["momentum"] is not None and m not in made and not empty_node(m)):
                made[m] = c
                break
    return made


def _batch_norm_step(n: Node, x: Value, rm: Value | None, rv: Value | None, w: Value | None, b: Value | None,
                     counter: Value | None, *, training: bool, momentum: float | None,
                     residual: Value | None = None, count: int = 0) -> Step:
    """batch norm's kernel for node n (a batch_norm, a batch_norm_act, or an instance_norm with running
    statistics); count: what it adds to the batch counter `counter` (0: the counter, if any, is read)."""
    shape = x.type.shape
    N, C, inner = shape[0], shape[1], _numel(shape[2:])
    k = _emit(n, batch_norm.generate, batch_norm.BatchNormSpec, N=N, C=C, inner=inner, training=training,
              momentum=momentum, eps=n.attrs["eps"], weight=w is not None, bias=b is not None,
              track_running_stats=rm is not None, act=n.attrs.get("act", "none"),
              act_params=tuple(n.attrs.get("act_params", ())), residual=residual is not None,
              partials=n.attrs.get("conv_stats", False), count=count,
              tile_stats=(training or rm is None) and not n.attrs.get("conv_stats", False))
    partials = (x, "stats") if n.attrs.get("conv_stats") else None

    moved: dict = {}

    def run(env: Env) -> None:
        xt = _c(env.values[x])
        y = _empty(env, n.out, xt)
        mean = torch.empty(C, dtype=torch.float32, device=xt.device)
        invstd = torch.empty_like(mean)
        env.extra[(n.out, "mean")], env.extra[(n.out, "invstd")] = mean, invstd
        stats, work = _running_stats(env, rm, rv)
        args = (xt, _c(_get(env, w)), _c(_get(env, b)), *work, y, mean, invstd, _get(env, counter),
                _c(_get(env, residual)))
        if partials is not None:  # the conv's per-tile statistics of x (passes.conv_batch_stats)
            k.module.launch(*args, st=env.extra[partials])
        elif hasattr(k.module, "stats_size"):  # batch statistics: per-tile partials, then normalise
            st = env.extra[(n.out, "stats")] = torch.empty(k.module.stats_size(xt.shape[0]), dtype=torch.float32,
                                                           device=xt.device)
            k.module.launch(*args, st=st)
        else:
            k.module.launch(*args)
        _write_back(stats, work)
        env.values[n.out] = y

    return Step(n, k, run, replayable=True, extra_reads=() if partials is None else (partials,))


def _get(env: Env, v: Value | None) -> torch.Tensor | None:
    return None if v is None else env.values[v]


def _running_stats(env: Env, rm: Value | None, rv: Value | None) -> tuple[list, list]:
    """The running statistics and what the kernel updates in place: a strided buffer is updated through a
    contiguous copy that `_write_back` copies back, so the user's buffer object keeps the new values."""
    stats = [_get(env, rm), _get(env, rv)]
    return stats, [_c(t) for t in stats]


def _write_back(stats: list, work: list) -> None:
    for t, c in zip(stats, work):
        if c is not t:
            t.copy_(c)


def _lower_norm(n: Node, precision: str) -> Step:
    """layer_norm, group_norm, instance_norm: rows normalised with their own statistics (templates/norm.py);
    instance_norm with running statistics (use_input_stats=False) is batch norm in eval."""
    x, w, b = n.inputs[0], n.inputs[-2], n.inputs[-1]
    rm = rv = None
    if n.op == "instance_norm":
        rm, rv = n.inputs[1], n.inputs[2]
        if not n.attrs["use_input_stats"]:
            return _batch_norm_step(n, x, rm, rv, w, b, None, training=False, momentum=n.attrs["momentum"])
    G, CPG, INNER = norm_geometry(n.op, x.type.shape, n.attrs)
    update = rm is not None
    k = _emit(n, norm.generate, norm.NormSpec, G=G, CPG=CPG, INNER=INNER, eps=n.attrs["eps"],
              weight=w is not None, bias=b is not None, update_running=update,
              momentum=n.attrs.get("momentum", 0.1))

    def run(env: Env) -> None:
        xt = _c(env.values[x])
        y = _empty(env, n.out, xt)
        rows = xt.numel() // (CPG * INNER)
        saved = [torch.empty(rows, dtype=torch.float32, device=xt.device) for _ in range(3)]
        for key, t in zip(("mean", "mean_lo", "invstd"), saved):
            env.extra[(n.out, key)] = t
        stats, work = _running_stats(env, rm, rv)
        k.module.launch(xt, _c(_get(env, w)), _c(_get(env, b)), *work, y, *saved)
        _write_back(stats, work)
        env.values[n.out] = y

    return Step(n, k, run, replayable=True)


def _lower_dropout(n: Node, precision: str) -> Step:
    x = n.inputs[0]
    inner = _numel(x.type.shape[2:]) if n.op == "dropout2d" else 0
    k = _emit(n, dropout.generate, dropout.DropoutSpec, numel=x.type.numel, p=n.attrs["p"], inner=inner)

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
    """A call the registry does not know (strict=False): torch runs it, no kernel; outside any torch.autocast,
    as it was traced (its result has the dtype the graph says)."""
    call = n.attrs["call"]

    def run(env: Env) -> None:
        ins = [env.values[v] for v in n.inputs]
        with torch.no_grad(), torch.autocast(ins[0].device.type if ins else "cpu", enabled=False):
            env.values[n.out] = call(ins)

    return Step(n, None, run)


def _lower_counter(n: Node, precision: str, in_kernel: bool = False) -> Step:
    """BatchNorm's batch counter: `add_` on the host, or (in_kernel) counted by a batch norm's kernel."""
    def run(env: Env) -> None:
        env.values[n.out] = env.values[n.inputs[0]].add_(n.attrs["by"])

    def alias(env: Env) -> None:
        env.values[n.out] = env.values[n.inputs[0]]  # nothing reads it (`_counters_in_kernels`)

    return Step(n, None, alias if in_kernel else run, replayable=in_kernel)


# The lowering of each codegen family (the registry row's `lower`).
LOWER: dict[str, Callable[[Node, str], Step]] = {
    "conv": _lower_conv, "linear": _lower_linear, "pointwise": _lower_pointwise, "pool": _lower_pool,
    "softmax": _lower_softmax, "loss": _lower_loss, "batch_norm": _lower_batch_norm, "norm": _lower_norm,
    "dropout": _lower_dropout, "reshape": _lower_reshape, "counter": _lower_counter, "eager": _lower_eager,
    "reduce": _lower_reduce, "cat": _lower_cat, "pool_indices": _lower_pool_indices,
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


# The ops whose kernels, forward and backward, take float16 and bfloat16 as well as float32 (tests/test_half.py,
# tests/test_autocast.py): they load any, compute in fp32 (GEMMs: half-precision operands, fp32 accumulation,
# kernels/precision.py) and store their result's dtype; so do the activations (kind "act"). The
# others take float32 only. bfloat16 needs a GPU: Triton's interpreter (triton 3.9, numpy 2.4) converts
# float32 to bfloat16 by truncation, not rounding to nearest, and returns garbage from a bfloat16 tl.dot,
# both silently; its kernels are checked by the sm_90 build (tests/test_aot_half.py) and on a GPU.
BF16_ON_INTERPRETER = ("bfloat16 needs a GPU: Triton's interpreter converts float32 to bfloat16 by truncation and "
                       "computes a bfloat16 tl.dot wrongly, so fusednn refuses it there; use float16 on the CPU")
HALF_OPS = frozenset({"conv2d", "conv_relu_pool", "conv_infer", "linear", "linear_relu", "max_pool2d", "avg_pool2d",
                      "adaptive_avg_pool2d", "adaptive_max_pool2d", "batch_norm", "batch_norm_act", "cross_entropy",
                      "mean", "amax", "sum", "max_pool2d_indices", "adaptive_max_pool2d_indices", "softmax",
                      "log_softmax", "layer_norm", "group_norm", "instance_norm", "cat", "dropout", "dropout2d",
                      "nll_loss", "mse_loss", "l1_loss", "rsub",
                      "add", "sub", "mul", "reshape", "pointwise"})


def _half_ok(n: Node) -> bool:
    return all(a.op in HALF_OPS or REGISTRY[a.op].kind == "act" for a in (n, *n.absorbed))


def check(graph: Graph) -> None:
    """Raise before code generation when a value does not fit the kernels: 2**31 elements or more
    (CompileError: 32-bit offsets) or a dtype other than float32 (float16 for `HALF_OPS`) (InputMismatchError)."""
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
        empty_ok = REGISTRY[n.op].kind == "cat"  # an empty input of a cat adds nothing
        if not empty_node(n) and not empty_ok and any(v is not None and v.type.numel == 0 for v in n.inputs):
            raise CompileError(f"{where(n)} reduces over an empty operand ({', '.join(map(str, n.inputs))} : "
                               f"{', '.join(str(v.type) for v in n.inputs if v is not None)}) to a non-empty "
                               f"{n.out.type}; fusednn does not support this")
        if n.op in ("reshape",):
            continue
        half = _half_ok(n)
        for i, v in enumerate(n.inputs):
            if v is None or i in REGISTRY[n.op].int_operands or v.type.dtype == torch.float32:
                continue
            if v.type.dtype == torch.bfloat16 and half and interpreting():
                raise InputMismatchError(f"{where(n)}: its operand %{v.name} is {v.type}; {BF16_ON_INTERPRETER}")
            if v.type.dtype in (torch.float16, torch.bfloat16) and half:
                continue
            takes = "float32, float16 or bfloat16" if half else ("float32 (half precision only for the activations, " +
                                                         ", ".join(sorted(HALF_OPS - {"pointwise"})) + ")")
            raise InputMismatchError(
                f"{where(n)}: fusednn's Triton kernels for {n.op} take {takes}, but its operand %{v.name} is "
                f"{v.type}. Convert the model and its inputs with .float(), or compile with backend='reference'")


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
    counts = _counters_in_kernels(graph)
    counted = set(counts.values())
    steps = []
    for n in graph.nodes:
        if n in counts:
            step = _lower_batch_norm(n, precision, counts[n])
        elif n in counted:
            step = _lower_counter(n, precision, in_kernel=True)
        else:
            lower_node = _lower_empty if empty_node(n) and not REGISTRY[n.op].side_effect else LOWER[REGISTRY[n.op].lower]
            step = lower_node(n, precision)
        if step.kernel is not None and debug >= 4:
            log.warning("fusednn: generated %s:\n%s", step.kernel.name, step.kernel.source)
        steps.append(step)
    return steps
