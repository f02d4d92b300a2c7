"""The backward plan: from the (fused) forward graph, in reverse, each node's hand-written backward kernels
and the few forward tensors they read.

What each pattern saves (and nothing more):
  conv_relu_pool  x, w, the pooled output y (for act'), a 1-byte argmax per pooled element (max pool);
                  with avg pool and an activation, the full-size activation (act' cannot come from the mean);
                  with an activation whose act' needs its input (GELU, SiLU, ...), the conv's result z
  linear_relu     x, w, the output y (for act'), or z where act' needs the input (GELU, SiLU, ...)
  activations     the output (relu, sigmoid, tanh, relu6, hardtanh) or the input (the others), as
                  kernels/activation.SAVES says; neg nothing; prelu the input and weight; mul: the other operand
  max pools       the int32 flat argmax per output; avg pools: nothing; lp_pool2d: its input and output
  softmax         the output; cross_entropy: logits, target, weight, a per-row log-sum-exp and (mean) the
                  denominator; nll_loss the same without the log-sum-exp
  sum, mean, cat  nothing; amax: its input and result (ties share the gradient)
  batch_norm      x, weight, the per-channel mean and 1/std; fused with an activation (batch_norm_act), also
                  the output (relu-like act') or the bias and residual (act' recomputed from z)
  layer/group/instance_norm  x, weight, each row's mean (as m1 + mean_lo) and 1/std
  dropout         the seed (the mask is regenerated from (seed, index))
  eager           its inputs: torch recomputes the call under autograd (strict=False)
Gradients of values with several users are summed (`GradSum`: into a new tensor, then in place). A node with nothing to compute (batch
0, `ops.empty_node`) launches nothing and gives zero gradients, as torch does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from fusednn.compiler.ir import Env, Graph, Node, Value
from fusednn.compiler.ops import REGISTRY, cat_dim, empty_node, norm_geometry, softmax_dims
from fusednn.errors import CompileError

Grads = list[torch.Tensor | None]
Vjp = Callable[[Node, Env, torch.Tensor, list[bool], str], Grads]


@dataclass(frozen=True, slots=True)
class Rule:
    """How one op differentiates: the launcher it calls, what it reads from the forward, the VJP."""

    kernels: tuple[str, ...]
    saves: Callable[[Node], list[Value | str]]  # Values (inputs/outputs) and extra keys ("idx", "lse", ...)
    vjp: Vjp
    # The VJP takes `into=`, a gradient its first input already has from other uses, and returns that
    # input's gradient with it added (in its own kernel: no separate sum)
    accumulates: bool = False


def _as4d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 4 else t.unsqueeze(0)


# -- VJPs, one per kernel family ---------------------------------------------------------------------
def _conv_saves(n: Node) -> list[Value | str]:
    from fusednn.kernels.conv_relu_pool import conv_saves_act

    act, pool = n.attrs.get("act", "none"), n.attrs.get("pool", "none")
    out: list[Value | str] = [n.inputs[0], n.inputs[1]]
    if conv_saves_act(act, pool):  # act(z) before an avg pool, or z where act' needs the input
        out.append("act")
    elif act != "none":
        out.append(n.out)
    if pool == "max":
        out.append("idx")
    return out


def _conv_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str,
              into: torch.Tensor | None = None, bn: object | None = None) -> Grads:
    from fusednn.kernels.activation import saves_input
    from fusednn.kernels.conv_relu_pool import conv_relu_pool_backward

    x, w, b = n.inputs
    a = n.attrs
    xt = env.values[x]
    OH, OW = (n.absorbed[0] if n.absorbed else n).out.type.shape[-2:]  # the conv's own output, before any pool
    y = env.values.get(n.out)
    if saves_input(a.get("act", "none")) and a.get("pool", "none") == "none":
        y = env.extra[(n.out, "act")]  # act' reads the conv's result z, saved in y's place
    dx, dw, db = conv_relu_pool_backward(
        _as4d(dy), _as4d(xt.contiguous()), env.values[w].contiguous(), None if y is None else _as4d(y),
        env.extra.get((n.out, "idx")), env.extra.get((n.out, "act")),
        stride=a["stride"], padding=a["padding"], dilation=a["dilation"], groups=a["groups"],
        act=a.get("act", "none"), act_param=a.get("act_param", 0.0), pool=a.get("pool", "none"),
        pool_k=a.get("pool_k", 1), out_hw=(OH, OW), needs_dx=needs[0], needs_dw=needs[1],
        needs_db=b is not None and needs[2], precision=precision,
        dx_into=None if into is None else _as4d(into), bn=bn)
    if dx is not None and xt.dim() == 3:
        dx = dx.squeeze(0)
    return [dx, dw, db]


def _linear_saves(n: Node) -> list[Value | str]:
    if n.attrs.get("save_input"):  # z, for an activation whose act' needs its input
        return [n.inputs[0], n.inputs[1], "act"]
    return [n.inputs[0], n.inputs[1]] + ([n.out] if n.attrs.get("act", "none") != "none" else [])


def _linear_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.linear_relu import linear_relu_backward

    x, w, b = n.inputs
    K = w.type.shape[1]
    Nout = w.type.shape[0]
    xt = env.values[x].contiguous().reshape(-1, K)
    y = env.extra[(n.out, "act")] if n.attrs.get("save_input") else env.values.get(n.out)  # what act' reads
    dx, dw, db = linear_relu_backward(
        dy.reshape(-1, Nout), xt, env.values[w].contiguous(), None if y is None else y.reshape(-1, Nout),
        act=n.attrs.get("act", "none"), act_param=n.attrs.get("act_param", 0.0), needs_dx=needs[0],
        needs_dw=needs[1], needs_db=b is not None and needs[2], precision=precision)
    return [None if dx is None else dx.reshape(env.shape(x)), dw, db]


def _act_saved(n: Node) -> Value | None:
    """The one tensor an activation's backward reads (kernels/activation.SAVES): its input, its output or
    nothing."""
    from fusednn.kernels.activation import SAVES

    act, _ = REGISTRY[n.op].kernel_act(n.attrs)  # type: ignore[misc]
    return {"x": n.inputs[0], "y": n.out, None: None}[SAVES[act]]


def _act_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.activation import activation_backward

    act, params = REGISTRY[n.op].kernel_act(n.attrs)  # type: ignore[misc]
    v = _act_saved(n)
    saved = None if v is None else env.values[v].contiguous()
    return [activation_backward(dy, saved, act=act, act_param=params)]


def _prelu_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.activation import prelu_backward

    x, w = n.inputs
    shape = x.type.shape
    inner = 1
    for s in shape[2:]:
        inner *= s
    dx, dw = prelu_backward(dy, env.values[x].contiguous(), env.values[w].contiguous(), channels=w.type.numel,
                            inner=inner, needs_dx=needs[0], needs_dw=needs[1])
    return [dx, None if dw is None else dw.reshape(w.type.shape)]


def _arith_saves(n: Node) -> list[Value | str]:
    if n.op != "mul":
        return []
    return [v for v in n.inputs if v is not None]


def _arith_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    """add/sub/mul, either operand possibly broadcast (or a number): a broadcast operand's gradient is
    summed over the dims it was broadcast along (kernels/broadcast.py)."""
    from fusednn.kernels.activation import mul_backward
    from fusednn.kernels.broadcast import sum_to

    x, y = n.inputs
    out = env.shape(n.out)
    alpha = n.attrs.get("alpha", 1.0)
    scales = {"add": [1.0, alpha], "sub": [1.0, -alpha], "rsub": [-alpha, 1.0], "mul": [1.0, 1.0]}[n.op]
    grads: Grads = [None, None]
    for i, (v, other) in enumerate(((x, y), (y, x))):
        if v is None or not needs[i]:
            continue
        factor = None
        if n.op == "mul":
            factor = env.values[other].contiguous() if other is not None else n.attrs["scalar"]
        if env.shape(v) != out:
            t = factor if isinstance(factor, torch.Tensor) else None
            s = scales[i] * (factor if isinstance(factor, float) else 1.0)
            grads[i] = sum_to(dy, env.shape(v), t, s)
        elif factor is not None and (not isinstance(factor, torch.Tensor) or factor.shape == dy.shape):
            grads[i] = mul_backward(dy, factor)
        elif factor is not None:  # the other factor is broadcast: read it through its strides
            grads[i] = sum_to(dy, out, factor, scales[i])
        else:
            grads[i] = dy if scales[i] == 1.0 else mul_backward(dy, scales[i])
    return grads


def _chain_saves(n: Node) -> list[Value | str]:
    out: list[Value | str] = []
    for a in n.absorbed:
        out += [s for s in rule(a).saves(a) if s not in out]
    return out


def _chain_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    """A fused pointwise chain differentiates node by node, in reverse, with each op's own kernels."""
    inside = {a.out for a in n.absorbed}
    need = {v: nd for v, nd in zip(n.inputs, needs)}
    acc = GradSum({n.out: dy})
    for a in reversed(n.absorbed):
        g = acc.grads.pop(a.out, None)
        if g is None:
            continue
        sub = [v is not None and (v in inside or need.get(v, False)) for v in a.inputs]
        for v, gv in zip(a.inputs, rule(a).vjp(a, env, g.contiguous(), sub, precision)):
            if v is not None and gv is not None and (v in inside or need.get(v, False)):
                acc.add(v, gv)
    return [acc.grads.get(v) for v in n.inputs]


def _pool_saves(n: Node) -> list[Value | str]:
    return ["idx"] if "max" in n.op else []


def _pool_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.pool import adaptive_pool2d_backward, pool2d_backward

    x = n.inputs[0]
    shape = env.shape(x)
    shape4 = (1,) * (4 - len(shape)) + shape
    kind = "max" if "max" in n.op else "avg"
    idx = env.extra.get((n.out, "idx"))
    if n.op.startswith("adaptive"):
        dx = adaptive_pool2d_backward(_as4d(dy), idx, kind=kind, x_shape=shape4)
    else:
        a = n.attrs
        dx = pool2d_backward(_as4d(dy), idx, kind=kind, x_shape=shape4, kernel=a["kernel"], stride=a["stride"],
                             padding=a["padding"], dilation=a.get("dilation", (1, 1)), ceil_mode=a["ceil_mode"],
                             count_include_pad=a.get("count_include_pad", False),
                             divisor_override=a.get("divisor_override"))
    return [dx.reshape(shape)]


def _lp_pool_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.pool import lp_pool2d_backward

    x = n.inputs[0]
    a = n.attrs
    dx = lp_pool2d_backward(_as4d(dy), _as4d(env.values[x].contiguous()), _as4d(env.values[n.out].contiguous()),
                            norm_type=a["norm_type"], kernel=a["kernel"], stride=a["stride"], ceil_mode=a["ceil_mode"])
    return [dx.reshape(env.shape(x))]


def _softmax_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.softmax import softmax_backward

    outer, D, inner = softmax_dims(env.shape(n.inputs[0]), n.attrs["dim"])
    return [softmax_backward(dy, env.values[n.out], outer=outer, D=D, inner=inner, log=n.op == "log_softmax",
                             dtype=n.inputs[0].type.dtype)]


def _loss_saves(n: Node) -> list[Value | str]:
    if n.op not in ("cross_entropy", "nll_loss"):
        return list(n.inputs)
    extra = (["lse"] if n.op == "cross_entropy" else []) + (["den"] if n.attrs["reduction"] == "mean" else [])
    return [v for v in n.inputs if v is not None] + extra


def _loss_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.losses import cross_entropy_backward, point_loss_backward

    red = n.attrs["reduction"]
    if n.op in ("cross_entropy", "nll_loss"):
        x, t, w = n.inputs
        dx, dt = cross_entropy_backward(
            dy, env.values[x].contiguous(), env.values[t].contiguous(), env.extra.get((n.out, "lse")),
            reduction=red, ignore_index=n.attrs["ignore_index"],
            weight=None if w is None else env.values[w].contiguous(), den=env.extra.get((n.out, "den")),
            label_smoothing=n.attrs.get("label_smoothing", 0.0), nll=n.op == "nll_loss", needs_dt=needs[1])
        return [dx, dt, None]
    x, t = n.inputs
    dx, dt = point_loss_backward(dy, env.values[x].contiguous(), env.values[t].contiguous(),
                                 kind="mse" if n.op == "mse_loss" else "l1", reduction=red,
                                 needs_dx=needs[0], needs_dt=needs[1])
    return [dx, dt]


def _reduce_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.reduce import reduce_backward

    x = n.inputs[0]
    amax = n.op == "amax"
    return [reduce_backward(dy, env.shape(x), n.attrs["dim"], kind=n.op,
                            x=env.values[x] if amax else None, y=env.values[n.out] if amax else None,
                            dtype=x.type.dtype)]


def _cat_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.cat import cat_backward

    shapes = [env.shape(v) for v in n.inputs]
    return cat_backward(dy, shapes, cat_dim(shapes, n.attrs["dim"]), needs)


def _bn_act_reads(n: Node) -> str | None:
    """What a batch_norm_act's act' reads (kernels/activation.SAVES): "y" its output, "x" its
    pre-activation (recomputed from x, the statistics, weight, bias and residual), None nothing."""
    from fusednn.kernels.activation import SAVES

    act = n.attrs.get("act", "none")
    return None if act == "none" else SAVES[act]


def _bn_saves(n: Node) -> list[Value | str]:
    x, _, _, w, b = n.inputs[:5]
    out: list[Value | str] = [x] + ([w] if w is not None else []) + ["mean", "invstd"]
    reads = _bn_act_reads(n)
    if reads == "y":
        out.append(n.out)
    elif reads == "x":
        out += [v for v in (b, n.inputs[6]) if v is not None]
    return out


def _bn_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    """batch_norm, and batch_norm_act (the residual's gradient is the last)."""
    from fusednn.kernels.batch_norm import batch_norm_act_backward

    x, rm, rv, w, b = n.inputs[:5]  # a 6th, num_batches_tracked (momentum=None), has no gradient
    res = n.inputs[6] if len(n.inputs) > 6 else None
    reads = _bn_act_reads(n)
    get = lambda v: None if v is None else env.values[v].contiguous()  # noqa: E731
    dx, dw, db, dres = batch_norm_act_backward(
        dy, env.values[x].contiguous(), get(w), env.extra[(n.out, "mean")], env.extra[(n.out, "invstd")],
        training=n.attrs["training"] or rm is None, needs_dx=needs[0], needs_dweight=w is not None and needs[3],
        needs_dbias=b is not None and needs[4], act=n.attrs.get("act", "none"),
        act_params=tuple(n.attrs.get("act_params", ())), out=get(n.out) if reads == "y" else None,
        bias=get(b) if reads == "x" else None, residual=get(res) if reads == "x" else None,
        has_residual=res is not None, needs_dresidual=res is not None and needs[6])
    grads: Grads = [dx, None, None, dw, db] + [None] * (len(n.inputs) - 5)
    if res is not None:
        grads[6] = dres
    return grads


def _bn_conv_vjp(bn: Node, conv: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str,
                 into: torch.Tensor | None = None) -> Grads:
    """A conv and the batch norm that alone reads its output, as one VJP (`BackwardPlan.pairs`): the batch
    norm's reduction kernel, then the conv's dw and dx kernels, which make the batch norm's dx in their
    prologue (kernels/conv_relu_pool.py) instead of a launch of its own. needs: the conv's inputs', then the
    batch norm's; the gradients come back in that order."""
    from fusednn.kernels.batch_norm import batch_norm_pending

    nc = len(conv.inputs)
    needs_c, needs_b = needs[:nc], needs[nc:]
    x, rm, _, w, b = bn.inputs[:5]
    res = bn.inputs[6] if len(bn.inputs) > 6 else None
    reads = _bn_act_reads(bn)
    get = lambda v: None if v is None else env.values[v].contiguous()  # noqa: E731
    pending, dres = batch_norm_pending(
        dy, env.values[x].contiguous(), get(w), env.extra[(bn.out, "mean")], env.extra[(bn.out, "invstd")],
        training=bn.attrs["training"] or rm is None, needs_dweight=w is not None and needs_b[3],
        needs_dbias=b is not None and needs_b[4], act=bn.attrs.get("act", "none"),
        act_params=tuple(bn.attrs.get("act_params", ())), out=get(bn.out) if reads == "y" else None,
        bias=get(b) if reads == "x" else None, residual=get(res) if reads == "x" else None,
        has_residual=res is not None, needs_dresidual=res is not None and needs_b[6])
    grads_b: Grads = [None, None, None, pending.dweight, pending.dbias] + [None] * (len(bn.inputs) - 5)
    if res is not None:
        grads_b[6] = dres
    if res is conv.inputs[0] and into is None and dres is not None and needs_c[0]:
        into, grads_b[6] = dres, None  # the residual is the conv's input: its dx kernel adds the two
    return _conv_vjp(conv, env, pending.dy, needs_c, precision, into, bn=pending) + grads_b


def fuses_batch_norm(conv: Node, bn: Node, users: int) -> bool:
    """Whether the backward makes batch norm `bn`'s dx inside conv `conv`'s dw and dx kernels: the batch norm
    alone reads the conv's output (`users`: its readers, graph outputs counted), no activation sits between
    them (a pool in the conv's epilogue may: airbench's conv -> max pool -> batch norm), the conv is no
    depthwise one (its direct kernels take no prologue) and the values are float32 or float64 (dy' is
    stored in the value's dtype, unrounded)."""
    x = bn.inputs[0]
    if REGISTRY[conv.op].backward != "conv" or REGISTRY[bn.op].backward != "batch_norm" or conv.out is not x:
        return False
    w = conv.inputs[1].type.shape
    depthwise = 1 < conv.attrs["groups"] == conv.inputs[0].type.shape[1] == w[0]
    return (users == 1 and conv.attrs.get("act", "none") == "none" and not depthwise and len(x.type.shape) == 4
            and x.type.dtype in (torch.float32, torch.float64) and not empty_node(conv) and not empty_node(bn))


def _running_norm(n: Node) -> bool:
    """instance_norm with running statistics: batch norm in eval, differentiated as such."""
    return n.op == "instance_norm" and not n.attrs["use_input_stats"]


def _norm_saves(n: Node) -> list[Value | str]:
    w = n.inputs[-2]
    stats = ["mean", "invstd"] if _running_norm(n) else ["mean", "mean_lo", "invstd"]
    return [n.inputs[0]] + ([w] if w is not None else []) + stats


def _norm_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.batch_norm import batch_norm_backward
    from fusednn.kernels.norm import norm_backward

    x, w, b = n.inputs[0], n.inputs[-2], n.inputs[-1]
    xt, wt = env.values[x].contiguous(), None if w is None else env.values[w].contiguous()
    need_w, need_b = w is not None and needs[-2], b is not None and needs[-1]
    stat = lambda key: env.extra[(n.out, key)]  # noqa: E731
    if _running_norm(n):
        dx, dw, db = batch_norm_backward(dy, xt, wt, stat("mean"), stat("invstd"), training=False,
                                         needs_dx=needs[0], needs_dweight=need_w, needs_dbias=need_b)
    else:
        G, CPG, INNER = norm_geometry(n.op, x.type.shape, n.attrs)
        dx, dw, db = norm_backward(dy, xt, wt, stat("mean"), stat("mean_lo"), stat("invstd"), G=G, CPG=CPG,
                                   INNER=INNER, needs_dx=needs[0], needs_dweight=need_w, needs_dbias=need_b)
    dw = None if dw is None else dw.reshape(w.type.shape)
    db = None if db is None else db.reshape(b.type.shape)
    return [dx] + [None] * (len(n.inputs) - 3) + [dw, db]


def _dropout_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    from fusednn.kernels.dropout import dropout_backward

    inner = math.prod(n.out.type.shape[2:]) if n.op == "dropout2d" else 0
    return [dropout_backward(dy, env.extra[(n.out, "seed")], p=n.attrs["p"], inner=inner)]


def _eager_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    """A call torch ran (strict=False): recompute it from its saved inputs under autograd, pull dy back."""
    ins = [env.values[v].detach().requires_grad_(nd) for v, nd in zip(n.inputs, needs)]
    with torch.enable_grad(), torch.autocast(ins[0].device.type if ins else "cpu", enabled=False):
        out = n.attrs["call"](ins)
    wrt = [t for t in ins if t.requires_grad]
    if not wrt or not out.requires_grad:
        return [None] * len(ins)
    grads = iter(torch.autograd.grad(out, wrt, dy, allow_unused=True))
    return [next(grads) if t.requires_grad else None for t in ins]


def _inference_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    raise CompileError(f"{n.label()} is an inference-only kernel (batch norm folded into the conv) and autograd "
                       "reached it; the runtime runs such graphs only for calls autograd does not record")


def _reshape_vjp(n: Node, env: Env, dy: torch.Tensor, needs: list[bool], precision: str) -> Grads:
    return [dy.reshape(env.shape(n.inputs[0]))]


_NONE: Callable[[Node], list[Value | str]] = lambda n: []  # noqa: E731
# The VJP of each autodiff family (the registry row's `backward`).
VJPS: dict[str, Rule] = {
    "conv": Rule(("conv_relu_pool_backward",), _conv_saves, _conv_vjp, accumulates=True),
    "linear": Rule(("linear_relu_backward",), _linear_saves, _linear_vjp),
    "act": Rule(("activation_backward",), lambda n: [v for v in (_act_saved(n),) if v is not None], _act_vjp),
    "prelu": Rule(("prelu_backward",), lambda n: list(n.inputs), _prelu_vjp),
    "arith": Rule(("mul_backward", "sum_to"), _arith_saves, _arith_vjp),
    "pointwise": Rule(("per absorbed op",), _chain_saves, _chain_vjp),
    "pool": Rule(("pool2d_backward",), _pool_saves, _pool_vjp),
    "adaptive_pool": Rule(("adaptive_pool2d_backward",), _pool_saves, _pool_vjp),
    "lp_pool": Rule(("lp_pool2d_backward",), lambda n: [n.inputs[0], n.out], _lp_pool_vjp),
    "softmax": Rule(("softmax_backward",), lambda n: [n.out], _softmax_vjp),
    "cross_entropy": Rule(("cross_entropy_backward",), _loss_saves, _loss_vjp),
    "point_loss": Rule(("point_loss_backward",), _loss_saves, _loss_vjp),
    "batch_norm": Rule(("batch_norm_backward",), _bn_saves, _bn_vjp),
    "norm": Rule(("norm_backward",), _norm_saves, _norm_vjp),
    "dropout": Rule(("dropout_backward",), lambda n: ["seed"], _dropout_vjp),
    "reshape": Rule((), _NONE, _reshape_vjp),
    "reduce": Rule(("reduce_backward",), lambda n: [n.inputs[0], n.out] if n.op == "amax" else [], _reduce_vjp),
    "cat": Rule(("cat_backward",), _NONE, _cat_vjp),
    "eager": Rule(("torch autograd",), lambda n: list(n.inputs), _eager_vjp),
    "inference": Rule((), _NONE, _inference_vjp),
}


def rule(n: Node) -> Rule:
    """How node n differentiates (its registry row's backward family)."""
    return VJPS[REGISTRY[n.op].backward]  # type: ignore[index]


def differentiable(n: Node) -> bool:
    return REGISTRY[n.op].backward is not None


def saved_values(n: Node) -> list[Value]:
    """The forward values (not extra tensors) n's backward reads: a fused group writes these to memory."""
    return [s for s in rule(n).saves(n) if not isinstance(s, str)] if differentiable(n) else []


class GradSum:
    """Gradients being summed per value.

    A VJP may hand back a tensor that is also another value's gradient (add passes dy to both operands, a
    reshape a view of dy) or autograd's own output gradient, so the first sum for a value is written to a
    new tensor; later sums for the same value add into that tensor in place (`accumulate_`), which no one
    else can see."""

    def __init__(self, grads: dict[Value, torch.Tensor]) -> None:
        self.grads = grads
        self._owned: set[Value] = set()

    def owned(self, v: Value, g: torch.Tensor) -> None:
        """v's gradient is g, a new tensor that already holds every sum so far (an accumulating VJP's)."""
        self.grads[v] = g
        self._owned.add(v)

    def into(self, n: Node, needs: list[bool]) -> torch.Tensor | None:
        """What an accumulating VJP of n adds into its first input's gradient: the gradient that input
        already has, where its kernel can read it as it is (the value's shape and dtype, contiguous)."""
        v = n.inputs[0]
        prev = self.grads.get(v) if needs[0] and rule(n).accumulates else None
        if prev is None or prev.dtype != v.type.dtype or not prev.is_contiguous():
            return None
        return prev

    def add(self, v: Value, g: torch.Tensor) -> None:
        from fusednn.kernels.activation import accumulate_, add

        prev = self.grads.get(v)
        if prev is None:
            self.grads[v] = g
        elif v in self._owned:
            accumulate_(prev, g.contiguous())
        else:
            self.grads[v] = add(prev.contiguous(), g.contiguous())
            self._owned.add(v)


def _add_all(inputs: list[Value | None], outs: Grads, need: dict[Value, bool], acc: GradSum,
             into: torch.Tensor | None) -> None:
    """Sum a VJP's gradients into their values' (the first one owned where the VJP added `into` to it)."""
    for i, (v, g) in enumerate(zip(inputs, outs)):
        if v is not None and g is not None and need.get(v, False):
            if g.dtype != v.type.dtype:  # a VJP past a dtype change (autocast): the value's dtype
                g = g.to(v.type.dtype)
            if i == 0 and into is not None:  # the VJP added the gradient v had
                acc.owned(v, g)
            else:
                acc.add(v, g)


class BackwardPlan:
    """The reverse schedule of a graph: which nodes run which backward kernels, reading what.

    `pairs`: batch norm -> the conv before it whose dw and dx kernels make the batch norm's dx
    (`fuses_batch_norm`), run as one VJP (`_bn_conv_vjp`) where the conv's weight needs a gradient."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._needs_cache: dict[tuple[bool, ...], dict[Value, bool]] = {}
        # The differentiable nodes in reverse, each with whether it is empty (what `run` walks every call)
        self._reverse = [(n, empty_node(n)) for n in reversed(graph.nodes) if differentiable(n)]
        users: dict[Value, int] = dict.fromkeys(graph.outputs, 1)
        for n in graph.nodes:  # every read: a batch norm whose residual is its own input reads it twice
            own = [v for v in n.inputs if v is not None]
            for v in own + [v for a in n.absorbed for v in a.inputs if v is not None and v not in own]:
                users[v] = users.get(v, 0) + 1
        producer = {n.out: n for n in graph.nodes}
        self.pairs: dict[Node, Node] = {}
        for n in graph.nodes:
            p = producer.get(n.inputs[0]) if n.inputs and n.inputs[0] is not None else None
            if p is not None and fuses_batch_norm(p, n, users.get(p.out, 0)):
                self.pairs[n] = p
        self._paired = set(self.pairs.values())

    def saved(self) -> tuple[set[Value], set[tuple[Value, str]]]:
        """Forward values and extra tensors the backward reads: all that a forward saves."""
        vals: set[Value] = set()
        extra: set[tuple[Value, str]] = set()
        for n in self.graph.nodes:
            if not differentiable(n):
                continue
            for s in rule(n).saves(n):
                if isinstance(s, str):
                    extra.add((n.out, s))
                else:
                    vals.add(s)
        return vals, extra

    def requires_grad(self, input_needs: tuple[bool, ...]) -> dict[Value, bool]:
        """Which values carry a gradient, given which graph inputs need one."""
        cached = self._needs_cache.get(input_needs)
        if cached is None:
            cached = {v: nd for v, nd in zip(self.graph.inputs, input_needs)}
            for n in self.graph.nodes:
                diff = differentiable(n) and n.out.type.dtype.is_floating_point
                cached[n.out] = diff and any(cached.get(v, False) for v in n.inputs if v is not None)
            self._needs_cache[input_needs] = cached
        return cached

    def run(self, env: Env, grads: dict[Value, torch.Tensor], input_needs: tuple[bool, ...],
            precision: str, vjp: Callable[..., list] | None = None) -> list[torch.Tensor | None]:
        """Propagate output gradients back to the graph inputs; returns one gradient per graph input.

        vjp: runs a node's VJP instead of calling its rule directly, as `vjp(nodes, env, dy, needs, general,
        into)` where nodes is (n,), or (batch norm, conv) for a pair, `general()` is the rule's call and `into`
        the gradient it adds into (GradSum.into; None for none): the runtime records and replays it
        (fusednn/prebuilt.py)."""
        need = self.requires_grad(input_needs)
        acc = GradSum(grads)
        for n, empty in self._reverse:
            dy = grads.pop(n.out, None)
            if dy is None or not need.get(n.out, False):
                continue
            needs = [v is not None and need.get(v, False) for v in n.inputs]
            into = None
            conv = self.pairs.get(n)
            if conv is not None and need.get(conv.inputs[1], False) and need.get(conv.out, False):
                self._run_pair(n, conv, env, dy.contiguous(), needs, need, acc, precision, vjp)
                continue
            if empty:  # batch 0: nothing flows back; parameters get zeros, as in torch
                outs = [torch.zeros(env.shape(v), dtype=v.type.dtype, device=dy.device) if nd else None
                        for v, nd in zip(n.inputs, needs)]
            else:
                dyc = dy.contiguous()
                into = acc.into(n, needs)
                kw = {} if into is None else {"into": into}
                if vjp is None:
                    outs = rule(n).vjp(n, env, dyc, needs, precision, **kw)
                else:
                    outs = vjp((n,), env, dyc, needs,
                               lambda n=n, d=dyc, nd=needs, kw=kw: rule(n).vjp(n, env, d, nd, precision, **kw), into)
            _add_all(n.inputs, outs, need, acc, into)
        return [grads.get(v) for v in self.graph.inputs]

    def _run_pair(self, bn: Node, conv: Node, env: Env, dy: torch.Tensor, needs_b: list[bool],
                  need: dict[Value, bool], acc: GradSum, precision: str, vjp: Callable[..., list] | None) -> None:
        """A batch norm and its conv as one VJP (`_bn_conv_vjp`); the conv's gradients first, so one that adds
        into its input's gradient (`into`) owns it before the residual's is added."""
        needs_c = [v is not None and need.get(v, False) for v in conv.inputs]
        needs = needs_c + needs_b
        into = acc.into(conv, needs_c)
        kw = {} if into is None else {"into": into}
        general = lambda: _bn_conv_vjp(bn, conv, env, dy, needs, precision, **kw)  # noqa: E731
        outs = general() if vjp is None else vjp((bn, conv), env, dy, needs, general, into)
        _add_all([*conv.inputs, None, *bn.inputs[1:]], outs, need, acc, into)  # the conv's output: inside

    def format(self) -> str:
        """The plan as text (written by dump() as backward.ir)."""
        vals, extra = self.saved()
        lines = [f"backward {self.graph.name} {{"]
        for n in reversed(self.graph.nodes):
            if not differentiable(n):
                continue
            r = rule(n)
            ins = [f"d{v}" for v in n.inputs if v is not None and v.type.dtype.is_floating_point]
            reads = [str(s) if not isinstance(s, str) else f"{s}(%{n.out.name})" for s in r.saves(n)]
            call = ", ".join(r.kernels) or "view"
            if n in self.pairs:
                call += f" (reduction only; its dx made by %{self.pairs[n].out.name}'s dw and dx kernels)"
            elif n in self._paired:
                call += " (dz: the batch norm's dx, made in the prologue of dw and dx)"
            lines.append(f"  {', '.join(ins) or '-'} = {call}(d{n.out}; saved: {', '.join(reads) or '-'})"
                         f"  # {n.label()}")
        lines.append("  saved: " + ", ".join(sorted([str(v) for v in vals]) + sorted(f"{k}(%{v.name})" for v, k in extra)))
        lines.append("}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def plan(graph: Graph) -> BackwardPlan:
    """Build the backward plan of a forward graph."""
    for n in graph.nodes:
        if differentiable(n) and REGISTRY[n.op].backward not in VJPS:
            raise NotImplementedError(f"no backward rule for {n.op}")
    return BackwardPlan(graph)

