"""The ops registry: every op fusednn knows, defined once.

Each `OpDef` gives the op's name, its kind (what codegen and fusion do with it), the torch calls that
trace to it with a parser that turns such a call into (tensor inputs, attributes), and its torch reference
implementation. The reference serves three purposes: `backend="reference"` runs it, the tests compare
kernels with it, and the shape rule is the reference evaluated on meta tensors (`infer`), so a shape
rule can never disagree with torch.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from fusednn.compiler.ir import TensorType
from fusednn.errors import CompileError, InputMismatchError, UnsupportedOpError

Tensor = torch.Tensor
Parsed = tuple[list[Any], dict[str, Any]]


@dataclass(frozen=True, slots=True)
class OpDef:
    """One op: everything fusednn knows about it, in one row.

    Args:
        name: the IR op name.
        kind: what it is ("conv" | "linear" | "act" | "arith" | "pool" | "softmax" | "loss" | "norm" |
            "reduce" | "cat" | "dropout" | "view" | "counter" | "eager" | "fused").
        ref: the torch reference `ref(inputs, attrs)`; also the shape rule (`infer`).
        parse: a traced call's (args, kwargs) -> (tensor inputs, attrs).
        torch_fns: the torch callables that trace to it.
        doc: what users write (error messages, docs/IR.md).
        lower: the codegen family that generates its forward (`codegen.LOWER`).
        backward: the autodiff family of its VJP (`autodiff.VJPS`); None: not differentiable.
        backward_file: the file of its hand-written backward kernels (named in every kernel's header).
        elementwise: joins fused elementwise groups (`passes.fuse_pointwise`).
        epilogue: may be a conv/linear epilogue activation: elementwise and monotone non-decreasing, so
            act(max z) = max act(z) and act' can be read from a pooled output.
        side_effect: kept by dead-code elimination although nothing reads its result.
        int_operands: positions of operands read as integers (class targets, counters).
        kernel_act: for the "act" backward family: attrs -> (the activation of kernels/activation.py that
            computes it, its parameters), e.g. relu6 -> ("hardtanh", (0.0, 6.0)).
    """

    name: str
    kind: str
    ref: Callable[[list[Any], dict[str, Any]], Tensor]
    parse: Callable[..., Parsed]
    torch_fns: tuple[Any, ...]
    doc: str
    lower: str
    backward: str | None
    backward_file: str
    elementwise: bool = False
    epilogue: bool = False
    side_effect: bool = False
    int_operands: tuple[int, ...] = ()
    kernel_act: Callable[[dict[str, Any]], tuple[str, tuple[float, ...]]] | None = None


REGISTRY: dict[str, OpDef] = {}
_BY_FN: dict[Any, OpDef] = {}


def op(name: str, kind: str, torch_fns: Sequence[Any], parse: Callable[..., Parsed], doc: str, *, lower: str,
       backward: str | None, backward_file: str, **traits: Any):
    """Register the decorated function as the torch reference of op `name` (see OpDef for the fields)."""

    def deco(ref):
        d = OpDef(name, kind, ref, parse, tuple(torch_fns), doc, lower, backward, backward_file, **traits)
        REGISTRY[name] = d
        for fn in torch_fns:
            _BY_FN[fn] = d
        return ref

    return deco


def lookup(fn: Any) -> OpDef | None:
    """The OpDef a torch callable traces to, or None."""
    try:
        return _BY_FN.get(fn)
    except TypeError:  # unhashable callables
        return None


def supported_ops() -> str:
    """One line per traceable op: name and the torch calls that reach it (for error messages and docs)."""
    return "\n".join(f"  {d.name:<20} {d.doc}" for d in REGISTRY.values() if d.kind != "fused")


def empty_node(n: Any) -> bool:
    """A node with nothing to compute (batch 0): an empty result, or a loss over empty operands.
    It launches nothing, and its backward gives zeros (nothing in it depends on any operand)."""
    if n.op == "eager":  # torch runs it and differentiates it, empty or not
        return False
    return n.out.type.numel == 0 or (REGISTRY[n.op].kind == "loss" and n.inputs[0].type.numel == 0)


def softmax_dims(shape: tuple[int, ...], dim: int) -> tuple[int, int, int]:
    """A tensor seen as [outer, D, inner] around `dim` (a 0-dim tensor as [1, 1, 1])."""
    if not shape:
        return 1, 1, 1
    return math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:])


def infer(opname: str, in_types: Sequence[TensorType | None], attrs: dict[str, Any]) -> TensorType:
    """The op's output type: its torch reference evaluated on meta tensors."""
    metas = [None if t is None else torch.empty(t.shape, dtype=t.dtype, device="meta") for t in in_types]
    with torch.no_grad():
        out = REGISTRY[opname].ref(metas, attrs)
    return TensorType(tuple(out.shape), out.dtype)


# -- argument binding ----------------------------------------------------------------------------
def binder(signature: str) -> Callable[..., dict[str, Any]]:
    """A function (args, kwargs) -> {name: value} for a Python-style signature string."""
    sig = inspect.signature(eval(f"lambda {signature}: None"))  # noqa: S307 - constant strings only

    def bind(args, kwargs):
        b = sig.bind(*args, **kwargs)
        b.apply_defaults()
        return dict(b.arguments)

    return bind


def pair(v: Any, what: str) -> tuple[int, int]:
    """An int or a 1-/2-sequence of ints as an (h, w) pair."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) == 1:
        return (v[0], v[0])
    if len(v) != 2:
        raise CompileError(f"{what} must be an int or a pair of ints, got {v}")
    return v  # type: ignore[return-value]


def _scalar_or_tensor(b: Any) -> tuple[list[Any], dict[str, Any]]:
    if isinstance(b, Tensor):
        return [b], {}
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        return [None], {"scalar": float(b)}
    raise UnsupportedOpError(f"expected a tensor or a number, got {type(b).__name__}")


# -- convolution and linear ----------------------------------------------------------------------
def _check_dtypes(x: Tensor, w: Tensor) -> None:
    if not x.is_floating_point():
        raise InputMismatchError(f"input dtype {x.dtype} is not floating point (weight is {w.dtype}): "
                                 f"convert the input with x.to({w.dtype})")
    if x.dtype != w.dtype:
        raise InputMismatchError(f"input dtype {x.dtype} does not match weight dtype {w.dtype}")


_conv_args = binder("input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1")


def _parse_conv2d(*args, **kwargs) -> Parsed:
    a = _conv_args(args, kwargs)
    x, w = a["input"], a["weight"]
    groups = int(a["groups"])
    if x.dim() not in (3, 4):
        raise InputMismatchError(f"expected a 4-D input [N, C, H, W] (or 3-D unbatched), got shape {list(x.shape)}")
    if x.shape[-3] != w.shape[1] * groups:
        raise InputMismatchError(
            f"expected input with {w.shape[1] * groups} channels (weight {list(w.shape)}, groups={groups}), "
            f"got input of shape {list(x.shape)} with {x.shape[-3]} channels")
    _check_dtypes(x, w)
    stride, dilation = pair(a["stride"], "stride"), pair(a["dilation"], "dilation")
    if min(stride) < 1 or min(dilation) < 1 or groups < 1:
        # checked here: on meta tensors torch itself fails with a ZeroDivisionError
        raise CompileError(f"stride {stride}, dilation {dilation} and groups {groups} must be positive")
    if w.shape[0] % groups:
        raise CompileError(f"groups={groups} must divide the {w.shape[0]} output channels of weight {list(w.shape)}")
    pad = a["padding"]
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        elif pad == "same":
            if stride != (1, 1):  # torch's F.conv2d raises RuntimeError here, as CompileError is
                raise CompileError(f"padding='same' is not supported for strided convolutions (stride {stride})")
            totals = [dilation[i] * (w.shape[2 + i] - 1) for i in range(2)]
            if any(t % 2 for t in totals):
                raise UnsupportedOpError(
                    f"padding='same' with an even effective kernel {tuple(w.shape[2:])} (dilation {dilation}) pads "
                    "asymmetrically; fusednn supports symmetric padding only: pad explicitly with F.pad")
            pad = (totals[0] // 2, totals[1] // 2)
        else:
            raise ValueError(f"padding must be 'same', 'valid' or ints, got {pad!r}")
    pad = pair(pad, "padding")
    if min(pad) < 0:
        raise CompileError(f"padding {pad} must be non-negative")
    for i, side in enumerate(("height", "width")):
        eff, padded = dilation[i] * (w.shape[2 + i] - 1) + 1, x.shape[-2 + i] + 2 * pad[i]
        if eff > padded:
            raise InputMismatchError(
                f"kernel {list(w.shape[2:])} (dilation {dilation}, effective {side} {eff}) is larger than the padded "
                f"input {side} {padded} (input {list(x.shape)}, padding {pad})")
    return [x, w, a["bias"]], dict(stride=stride, padding=pad, dilation=dilation, groups=groups)


@op("conv2d", "conv", [F.conv2d], _parse_conv2d, "F.conv2d, nn.Conv2d (stride, padding incl. 'same'/'valid', dilation, groups)",
    lower="conv", backward="conv", backward_file="kernels/conv_relu_pool.py")
def conv2d(t, a):
    return F.conv2d(t[0], t[1], t[2], a["stride"], a["padding"], a["dilation"], a["groups"])


_linear_args = binder("input, weight, bias=None")


def _parse_linear(*args, **kwargs) -> Parsed:
    a = _linear_args(args, kwargs)
    x, w = a["input"], a["weight"]
    if x.dim() == 0 or x.shape[-1] != w.shape[1]:
        raise InputMismatchError(f"expected input [..., {w.shape[1]}] (weight {list(w.shape)}), got shape {list(x.shape)}")
    _check_dtypes(x, w)
    return [a["input"], a["weight"], a["bias"]], {}


@op("linear", "linear", [F.linear], _parse_linear, "F.linear, nn.Linear (any leading dims)",
    lower="linear", backward="linear", backward_file="kernels/linear_relu.py")
def linear(t, a):
    return F.linear(t[0], t[1], t[2])


# -- activations ---------------------------------------------------------------------------------
def _parse_unary(*args, **kwargs) -> Parsed:
    return [args[0] if args else kwargs["input"]], {}


_leaky_args = binder("input, negative_slope=0.01, inplace=False")


def _parse_leaky(*args, **kwargs) -> Parsed:
    a = _leaky_args(args, kwargs)
    return [a["input"]], {"negative_slope": float(a["negative_slope"])}


_ACT = dict(lower="pointwise", backward="act", backward_file="kernels/activation.py", elementwise=True)


def _plain(name: str) -> Callable[[dict[str, Any]], tuple[str, tuple[float, ...]]]:
    """kernel_act of an activation without parameters: the kernel activation of the same name."""
    return lambda a: (name, ())


@op("relu", "act", [F.relu, torch.relu, torch.relu_, Tensor.relu, Tensor.relu_], _parse_unary,
    "F.relu, torch.relu, x.relu(), nn.ReLU (inplace too)", **_ACT, epilogue=True, kernel_act=_plain("relu"))
def relu(t, a):
    return F.relu(t[0])


@op("leaky_relu", "act", [F.leaky_relu, Tensor.leaky_relu if hasattr(Tensor, "leaky_relu") else F.leaky_relu],
    _parse_leaky, "F.leaky_relu, nn.LeakyReLU", **_ACT, epilogue=True,
    kernel_act=lambda a: ("leaky_relu", (a["negative_slope"],)))
def leaky_relu(t, a):
    return F.leaky_relu(t[0], a["negative_slope"])


def _parse_prelu(*args, **kwargs) -> Parsed:
    a = binder("input, weight")(args, kwargs)
    return [a["input"], a["weight"]], {}


@op("prelu", "act", [F.prelu], _parse_prelu, "F.prelu, nn.PReLU", lower="pointwise", backward="prelu",
    backward_file="kernels/activation.py", elementwise=True)
def prelu(t, a):
    return F.prelu(t[0], t[1])


@op("sigmoid", "act", [torch.sigmoid, F.sigmoid, Tensor.sigmoid], _parse_unary, "torch.sigmoid, nn.Sigmoid",
    **_ACT, epilogue=True, kernel_act=_plain("sigmoid"))
def sigmoid(t, a):
    return torch.sigmoid(t[0])


@op("tanh", "act", [torch.tanh, F.tanh, Tensor.tanh], _parse_unary, "torch.tanh, nn.Tanh", **_ACT, epilogue=True,
    kernel_act=_plain("tanh"))
def tanh(t, a):
    return torch.tanh(t[0])


# The activations of issue #13. All are elementwise (they join pointwise groups) but none is an `epilogue`
# yet: the conv/linear templates apply only relu, leaky_relu, sigmoid and tanh (docs/ARCHITECTURE.md says
# which of these could join them, and why the non-monotone ones cannot precede a fused max pool).
def _number(what: str, v: Any) -> float:
    """An activation's parameter as a finite float (the kernels take it as a literal); the tracer prefixes
    the op, module and file:line to the message."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise UnsupportedOpError(f"{what} must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise UnsupportedOpError(f"{what}={v} is not supported (fusednn takes finite parameters)")
    return float(v)


def _parser(signature: str, *params: str) -> Callable[..., Parsed]:
    """A parser for `signature` (first parameter: the input) keeping the named float parameters."""
    bind = binder(signature)
    name = signature.split(",")[0]

    def parse(*args, **kwargs) -> Parsed:
        a = bind(args, kwargs)
        return [a[name]], {p: _number(p, a[p]) for p in params}

    return parse


def _parse_hardtanh(*args, **kwargs) -> Parsed:
    """F.hardtanh(x, min_val, max_val); hardtanh(0, 6) (nn.ReLU6) traces as relu6."""
    a = binder("input, min_val=-1.0, max_val=1.0, inplace=False")(args, kwargs)
    lo, hi = _number("min_val", a["min_val"]), _number("max_val", a["max_val"])
    if lo > hi:
        raise ValueError(f"min_val {lo} cannot be greater than max_val {hi}")
    if (lo, hi) == (0.0, 6.0):
        return [a["input"]], {"_op": "relu6"}
    return [a["input"]], {"min_val": lo, "max_val": hi}


def _parse_gelu(*args, **kwargs) -> Parsed:
    a = binder("input, approximate='none'")(args, kwargs)
    if a["approximate"] not in ("none", "tanh"):
        raise ValueError(f"approximate must be 'none' or 'tanh', got {a['approximate']!r}")
    return [a["input"]], {"approximate": a["approximate"]}


# torch's SELU constants (aten/src/ATen/native/Activation.cpp)
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


@op("relu6", "act", [F.relu6], _parser("input, inplace=False"), "F.relu6, nn.ReLU6 (inplace too)", **_ACT,
    kernel_act=lambda a: ("hardtanh", (0.0, 6.0)))
def relu6(t, a):
    return F.relu6(t[0])


@op("hardtanh", "act", [F.hardtanh, F.hardtanh_], _parse_hardtanh,
    "F.hardtanh, nn.Hardtanh (min_val, max_val; (0, 6) is relu6)", **_ACT,
    kernel_act=lambda a: ("hardtanh", (a["min_val"], a["max_val"])))
def hardtanh(t, a):
    return F.hardtanh(t[0], a["min_val"], a["max_val"])


@op("elu", "act", [F.elu, F.elu_], _parser("input, alpha=1.0, inplace=False", "alpha"), "F.elu, nn.ELU (alpha)",
    **_ACT, kernel_act=lambda a: ("elu", (a["alpha"], 1.0, 1.0)))
def elu(t, a):
    return F.elu(t[0], a["alpha"])


@op("selu", "act", [F.selu, torch.selu, torch.selu_], _parser("input, inplace=False"), "F.selu, torch.selu, nn.SELU",
    **_ACT, kernel_act=lambda a: ("elu", (SELU_ALPHA, SELU_SCALE, 1.0)))
def selu(t, a):
    return F.selu(t[0])


@op("celu", "act", [F.celu, torch.celu, torch.celu_], _parser("input, alpha=1.0, inplace=False", "alpha"),
    "F.celu, torch.celu, nn.CELU (alpha)", **_ACT, kernel_act=lambda a: ("elu", (a["alpha"], 1.0, 1.0 / a["alpha"])))
def celu(t, a):
    return F.celu(t[0], a["alpha"])


@op("gelu", "act", [F.gelu], _parse_gelu, "F.gelu, nn.GELU (approximate 'none' or 'tanh')", **_ACT,
    kernel_act=lambda a: ("gelu" if a["approximate"] == "none" else "gelu_tanh", ()))
def gelu(t, a):
    return F.gelu(t[0], approximate=a["approximate"])


@op("silu", "act", [F.silu], _parser("input, inplace=False"), "F.silu, nn.SiLU", **_ACT, kernel_act=_plain("silu"))
def silu(t, a):
    return F.silu(t[0])


@op("mish", "act", [F.mish], _parser("input, inplace=False"), "F.mish, nn.Mish", **_ACT, kernel_act=_plain("mish"))
def mish(t, a):
    return F.mish(t[0])


@op("hardswish", "act", [F.hardswish], _parser("input, inplace=False"), "F.hardswish, nn.Hardswish", **_ACT,
    kernel_act=_plain("hardswish"))
def hardswish(t, a):
    return F.hardswish(t[0])


@op("hardsigmoid", "act", [F.hardsigmoid], _parser("input, inplace=False"), "F.hardsigmoid, nn.Hardsigmoid", **_ACT,
    kernel_act=_plain("hardsigmoid"))
def hardsigmoid(t, a):
    return F.hardsigmoid(t[0])


@op("softplus", "act", [F.softplus], _parser("input, beta=1.0, threshold=20.0", "beta", "threshold"),
    "F.softplus, nn.Softplus (beta, threshold)", **_ACT,
    kernel_act=lambda a: ("softplus", (a["beta"], a["threshold"])))
def softplus(t, a):
    return F.softplus(t[0], a["beta"], a["threshold"])


@op("softsign", "act", [F.softsign], _parse_unary, "F.softsign, nn.Softsign", **_ACT, kernel_act=_plain("softsign"))
def softsign(t, a):
    return F.softsign(t[0])


@op("tanhshrink", "act", [F.tanhshrink], _parse_unary, "F.tanhshrink, nn.Tanhshrink", **_ACT,
    kernel_act=_plain("tanhshrink"))
def tanhshrink(t, a):
    return F.tanhshrink(t[0])


@op("threshold", "act", [F.threshold, F.threshold_, torch.threshold, torch.threshold_],
    _parser("input, threshold, value, inplace=False", "threshold", "value"),
    "F.threshold, torch.threshold, nn.Threshold (threshold, value)", **_ACT,
    kernel_act=lambda a: ("threshold", (a["threshold"], a["value"])))
def threshold(t, a):
    return F.threshold(t[0], a["threshold"], a["value"])


@op("logsigmoid", "act", [F.logsigmoid], _parse_unary, "F.logsigmoid, nn.LogSigmoid", **_ACT,
    kernel_act=_plain("logsigmoid"))
def logsigmoid(t, a):
    return F.logsigmoid(t[0])


@op("neg", "act", [torch.neg, torch.negative, torch.neg_, torch.negative_, Tensor.neg, Tensor.negative, Tensor.__neg__,
                   Tensor.neg_, Tensor.negative_], _parse_unary, "-x, torch.neg, x.neg(), torch.negative (inplace too)",
    **_ACT, kernel_act=_plain("neg"))
def neg(t, a):
    return torch.neg(t[0])


# -- softmax ---------------------------------------------------------------------------------------
_softmax_args = binder("input, dim=None, _stacklevel=3, dtype=None")


def _parse_softmax(*args, **kwargs) -> Parsed:
    a = _softmax_args(args, kwargs)
    x = a["input"]
    if a["dim"] is None:
        raise CompileError("softmax without dim is ambiguous: pass dim explicitly")
    if a["dtype"] is not None:
        raise UnsupportedOpError("softmax(dtype=...) is not supported")
    return [x], {"dim": int(a["dim"]) % max(x.dim(), 1)}  # a 0-dim tensor takes dim 0 or -1


@op("softmax", "softmax", [F.softmax, torch.softmax, Tensor.softmax], _parse_softmax, "F.softmax, nn.Softmax (any dim)",
    lower="softmax", backward="softmax", backward_file="kernels/softmax.py")
def softmax(t, a):
    return F.softmax(t[0], a["dim"])


@op("log_softmax", "softmax", [F.log_softmax, torch.log_softmax, Tensor.log_softmax], _parse_softmax,
    "F.log_softmax, nn.LogSoftmax (any dim)", lower="softmax", backward="softmax", backward_file="kernels/softmax.py")
def log_softmax(t, a):
    return F.log_softmax(t[0], a["dim"])


# -- pooling ---------------------------------------------------------------------------------------
_maxpool_args = binder("input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False")
_avgpool_args = binder("input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None")


def _check_pool(x: Tensor, k: tuple[int, int], s: tuple[int, int], p: tuple[int, int], d: tuple[int, int]) -> None:
    """torch's pool rules, checked before the meta call so the message can say which window and input."""
    if x.dim() not in (3, 4):
        raise InputMismatchError(f"expected a 4-D input [N, C, H, W] (or 3-D unbatched), got shape {list(x.shape)}")
    if min(k) < 1 or min(s) < 1 or min(d) < 1:
        raise CompileError(f"kernel {k}, stride {s} and dilation {d} must be positive")
    if min(p) < 0 or any(p[i] > ((k[i] - 1) * d[i] + 1) // 2 for i in range(2)):
        raise CompileError(f"padding {p} must be non-negative and at most half the effective kernel "
                           f"{tuple((k[i] - 1) * d[i] + 1 for i in range(2))}")


def _pool_stride(a: dict, k: tuple[int, int]) -> tuple[int, int]:
    return k if a["stride"] is None or a["stride"] == [] or a["stride"] == () else pair(a["stride"], "stride")


def _parse_max_pool(*args, **kwargs) -> Parsed:
    a = _maxpool_args(args, kwargs)
    k = pair(a["kernel_size"], "kernel_size")
    s, p, d = _pool_stride(a, k), pair(a["padding"], "padding"), pair(a["dilation"], "dilation")
    _check_pool(a["input"], k, s, p, d)
    return [a["input"]], dict(kernel=k, stride=s, padding=p, dilation=d, ceil_mode=bool(a["ceil_mode"]))


def _parse_avg_pool(*args, **kwargs) -> Parsed:
    a = _avgpool_args(args, kwargs)
    k = pair(a["kernel_size"], "kernel_size")
    s, p = _pool_stride(a, k), pair(a["padding"], "padding")
    _check_pool(a["input"], k, s, p, (1, 1))
    d = a["divisor_override"]
    if d is not None and int(d) == 0:
        raise CompileError("divisor_override must be non-zero")
    return [a["input"]], dict(kernel=k, stride=s, padding=p,
                              ceil_mode=bool(a["ceil_mode"]), count_include_pad=bool(a["count_include_pad"]),
                              divisor_override=None if d is None else int(d))


@op("max_pool2d", "pool", [F.max_pool2d, torch.max_pool2d], _parse_max_pool,
    "F.max_pool2d, nn.MaxPool2d (kernel, stride, padding, dilation, ceil_mode)", lower="pool", backward="pool",
    backward_file="kernels/pool.py")
def max_pool2d(t, a):
    return F.max_pool2d(t[0], a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"], False)


@op("avg_pool2d", "pool", [F.avg_pool2d], _parse_avg_pool,
    "F.avg_pool2d, nn.AvgPool2d (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)",
    lower="pool", backward="pool", backward_file="kernels/pool.py")
def avg_pool2d(t, a):
    return F.avg_pool2d(t[0], a["kernel"], a["stride"], a["padding"], a["ceil_mode"], a["count_include_pad"],
                        a["divisor_override"])


def _parse_lp_pool(*args, **kwargs) -> Parsed:
    a = binder("input, norm_type, kernel_size, stride=None, ceil_mode=False")(args, kwargs)
    p = float(a["norm_type"])
    for e in (p, 1.0 / p if p else 0.0):
        if p <= 0 or (e.is_integer() and e > 3):
            # the kernels' x**p is exact for p in {1, 2, 3, 0.5}; other integer powers of negative x
            # (which torch computes) would come out NaN
            raise UnsupportedOpError(f"lp_pool2d with norm_type {p}: fusednn takes p > 0 whose p and 1/p are not "
                                     "integers above 3")
    k = pair(a["kernel_size"], "kernel_size")
    s = _pool_stride(a, k)
    _check_pool(a["input"], k, s, (0, 0), (1, 1))
    return [a["input"]], dict(norm_type=p, kernel=k, stride=s, ceil_mode=bool(a["ceil_mode"]))


@op("lp_pool2d", "pool", [F.lp_pool2d], _parse_lp_pool, "F.lp_pool2d, nn.LPPool2d (norm_type, kernel, stride, ceil_mode)",
    lower="pool", backward="lp_pool", backward_file="kernels/pool.py")
def lp_pool2d(t, a):
    return F.lp_pool2d(t[0], a["norm_type"], a["kernel"], a["stride"], a["ceil_mode"])


def _parse_adaptive(*args, **kwargs) -> Parsed:
    a = binder("input, output_size, return_indices=False")(args, kwargs)
    x, size = a["input"], a["output_size"]
    size = (size, size) if isinstance(size, int) or size is None else tuple(size)
    size = tuple(int(x.shape[-2 + i]) if s is None else int(s) for i, s in enumerate(size))
    return [x], {"output_size": size}


@op("adaptive_avg_pool2d", "pool", [F.adaptive_avg_pool2d], _parse_adaptive, "F.adaptive_avg_pool2d, nn.AdaptiveAvgPool2d",
    lower="pool", backward="adaptive_pool", backward_file="kernels/pool.py")
def adaptive_avg_pool2d(t, a):
    return F.adaptive_avg_pool2d(t[0], a["output_size"])


@op("adaptive_max_pool2d", "pool", [F.adaptive_max_pool2d], _parse_adaptive, "F.adaptive_max_pool2d, nn.AdaptiveMaxPool2d",
    lower="pool", backward="adaptive_pool", backward_file="kernels/pool.py")
def adaptive_max_pool2d(t, a):
    return F.adaptive_max_pool2d(t[0], a["output_size"])


# (values, indices) pools: F.max_pool2d(..., return_indices=True) and nn.MaxPool2d(return_indices=True) reach
# F.max_pool2d_with_indices. The call becomes two nodes (`_outputs`): the pool, whose kernel then writes its
# argmax as int64 (and does not fuse), and a non-differentiable `*_indices` node that hands that argmax out.
def _with_indices(parse: Callable[..., Parsed], pool: str) -> Callable[..., Parsed]:
    def parse_with_indices(*args, **kwargs) -> Parsed:
        ins, attrs = parse(*args, **kwargs)
        return ins, {**attrs, "indices": True, "_outputs": (pool, pool + "_indices")}

    return parse_with_indices


@op("max_pool2d_indices", "pool", [F.max_pool2d_with_indices], _with_indices(_parse_max_pool, "max_pool2d"),
    "F.max_pool2d / nn.MaxPool2d with return_indices=True: the int64 flat h*W+w argmax (inputs: x, the pool)",
    lower="pool_indices", backward=None, backward_file="- (not differentiable)", int_operands=(1,))
def max_pool2d_indices(t, a):
    return F.max_pool2d(t[0], a["kernel"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"], True)[1]


@op("adaptive_max_pool2d_indices", "pool", [F.adaptive_max_pool2d_with_indices],
    _with_indices(_parse_adaptive, "adaptive_max_pool2d"),
    "F.adaptive_max_pool2d / nn.AdaptiveMaxPool2d with return_indices=True: the int64 argmax (inputs: x, the pool)",
    lower="pool_indices", backward=None, backward_file="- (not differentiable)", int_operands=(1,))
def adaptive_max_pool2d_indices(t, a):
    return F.adaptive_max_pool2d(t[0], a["output_size"], True)[1]


# -- shape ops: all become reshape with a concrete shape ----------------------------------------------
def _parse_reshape(*args, **kwargs) -> Parsed:
    # The concrete target shape is the traced call's result shape; the tracer fills attrs["shape"].
    return [args[0]], {}


@op("reshape", "view",
    [Tensor.view, Tensor.reshape, torch.reshape, Tensor.flatten, torch.flatten, Tensor.squeeze, torch.squeeze,
     Tensor.unsqueeze, torch.unsqueeze],
    _parse_reshape, "x.view, x.reshape, torch.flatten/x.flatten/nn.Flatten, squeeze, unsqueeze", lower="reshape",
    backward="reshape", backward_file="- (a view)")
def reshape(t, a):
    return t[0].reshape(a["shape"])


# -- dropout and batch norm --------------------------------------------------------------------------
_dropout_args = binder("input, p=0.5, training=True, inplace=False")


def _parse_dropout(*args, **kwargs) -> Parsed:
    a = _dropout_args(args, kwargs)
    p = float(a["p"])
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    return [a["input"]], {"p": p, "training": bool(a["training"])}


@op("dropout", "dropout", [F.dropout], _parse_dropout, "F.dropout, nn.Dropout (train and eval)", lower="dropout",
    backward="dropout", backward_file="kernels/dropout.py")
def dropout(t, a):
    return F.dropout(t[0], a["p"], a["training"])


def _parse_dropout2d(*args, **kwargs) -> Parsed:
    ins, attrs = _parse_dropout(*args, **kwargs)
    if ins[0].dim() < 2:
        raise UnsupportedOpError(f"dropout2d of a {ins[0].dim()}-D input (torch deprecates it): use dropout")
    return ins, attrs


@op("dropout2d", "dropout", [F.dropout2d], _parse_dropout2d,
    "F.dropout2d, nn.Dropout2d (channel-wise: one mask per (n, c); train and eval)", lower="dropout",
    backward="dropout", backward_file="kernels/dropout.py")
def dropout2d(t, a):
    return F.dropout2d(t[0], a["p"], a["training"])


_bn_args = binder("input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-05")


def _parse_batch_norm(*args, **kwargs) -> Parsed:
    a = _bn_args(args, kwargs)
    if a["training"] and a["running_mean"] is not None and a["momentum"] is None:
        # nn.BatchNorm(momentum=None) passes 1 / num_batches_tracked, which the tracer recognises
        raise UnsupportedOpError("F.batch_norm(momentum=None) is not a number; use nn.BatchNorm(momentum=None) "
                                 "for a cumulative moving average")
    return [a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"]], dict(
        training=bool(a["training"]), momentum=float(a["momentum"] or 0.0), eps=float(a["eps"]))


@op("batch_norm", "norm", [F.batch_norm], _parse_batch_norm,
    "F.batch_norm, nn.BatchNorm1d/2d (train, with running-stat update incl. momentum=None, and eval; weight "
    "and bias each optional)", lower="batch_norm", backward="batch_norm", backward_file="kernels/batch_norm.py",
    int_operands=(5,))
def batch_norm(t, a):
    momentum = a["momentum"]
    if momentum is None:  # cumulative average: the 6th operand is num_batches_tracked, already counted
        momentum = 0.0 if t[5].is_meta else 1.0 / float(t[5])
    return F.batch_norm(t[0], t[1], t[2], t[3], t[4], a["training"], momentum, a["eps"])


_ln_args = binder("input, normalized_shape, weight=None, bias=None, eps=1e-05")
_gn_args = binder("input, num_groups, weight=None, bias=None, eps=1e-05")
_in_args = binder("input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True, "
                  "momentum=0.1, eps=1e-05")


def _parse_layer_norm(*args, **kwargs) -> Parsed:
    a = _ln_args(args, kwargs)
    shape = a["normalized_shape"]
    shape = (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)
    return [a["input"], a["weight"], a["bias"]], dict(normalized_shape=shape, eps=float(a["eps"]))


def _parse_group_norm(*args, **kwargs) -> Parsed:
    a = _gn_args(args, kwargs)
    return [a["input"], a["weight"], a["bias"]], dict(groups=int(a["num_groups"]), eps=float(a["eps"]))


def _parse_instance_norm(*args, **kwargs) -> Parsed:
    a = _in_args(args, kwargs)
    return [a["input"], a["running_mean"], a["running_var"], a["weight"], a["bias"]], dict(
        use_input_stats=bool(a["use_input_stats"]), momentum=float(a["momentum"]), eps=float(a["eps"]))


@op("layer_norm", "norm", [F.layer_norm], _parse_layer_norm,
    "F.layer_norm, nn.LayerNorm (any normalized_shape, weight and bias each optional)", lower="norm",
    backward="norm", backward_file="kernels/norm.py")
def layer_norm(t, a):
    return F.layer_norm(t[0], a["normalized_shape"], t[1], t[2], a["eps"])


@op("group_norm", "norm", [F.group_norm], _parse_group_norm,
    "F.group_norm, nn.GroupNorm (weight and bias each optional)", lower="norm", backward="norm",
    backward_file="kernels/norm.py")
def group_norm(t, a):
    return F.group_norm(t[0], a["groups"], t[1], t[2], a["eps"])


@op("instance_norm", "norm", [F.instance_norm], _parse_instance_norm,
    "F.instance_norm, nn.InstanceNorm1d/2d (affine, track_running_stats; train and eval)", lower="norm",
    backward="norm", backward_file="kernels/norm.py, kernels/batch_norm.py (running statistics)")
def instance_norm(t, a):
    return F.instance_norm(t[0], t[1], t[2], t[3], t[4], a["use_input_stats"], a["momentum"], a["eps"])


def norm_geometry(opname: str, shape: tuple[int, ...], attrs: dict[str, Any]) -> tuple[int, int, int]:
    """(G, CPG, INNER): a row normalization's input seen as [N, G, CPG, INNER], one row per (n, g)."""
    if opname == "layer_norm":
        return 1, math.prod(attrs["normalized_shape"]), 1
    C, inner = shape[1], math.prod(shape[2:])
    if opname == "group_norm":
        return attrs["groups"], C // attrs["groups"], inner
    return C, 1, inner  # instance_norm


def _parse_counter(*args, **kwargs) -> Parsed:
    a = binder("input, other, alpha=1")(args, kwargs)
    return [a["input"]], {"by": int(a["other"]) * int(a["alpha"])}


@op("count_", "counter", [], _parse_counter, "buffer.add_(1) on an integer buffer (BatchNorm's num_batches_tracked)",
    lower="counter", backward=None, backward_file="-", side_effect=True, int_operands=(0,))
def count_(t, a):
    return t[0].add_(a["by"])


# -- arithmetic --------------------------------------------------------------------------------------
_binary_args = binder("input, other, alpha=1")


def _parse_binary(*args, **kwargs) -> Parsed:
    a = _binary_args(args, kwargs)
    x, y = a["input"], a["other"]
    if not isinstance(x, Tensor):  # torch.add(2, x), torch.mul(2, x): these commute
        x, y = y, x
    ins, attrs = _scalar_or_tensor(y)
    if a["alpha"] != 1:
        attrs["alpha"] = float(a["alpha"])
    return [x] + ins, attrs


def _parse_sub(*args, **kwargs) -> Parsed:
    """x - y; torch.sub(2, x) (a number first) is rsub: 2 - x."""
    a = _binary_args(args, kwargs)
    if isinstance(a["input"], Tensor):
        return _parse_binary(*args, **kwargs)
    return _reflected(a["other"], a["input"], a["alpha"])


def _parse_rsub(*args, **kwargs) -> Parsed:
    """other - alpha * input: `2 - x` (Tensor.__rsub__) and torch.rsub; with a tensor `other` it is sub."""
    a = _binary_args(args, kwargs)
    if isinstance(a["other"], Tensor):
        ins, attrs = _parse_binary(a["other"], a["input"], alpha=a["alpha"])
        return ins, {**attrs, "_op": "sub"}
    return _reflected(a["input"], a["other"], a["alpha"])


def _reflected(x: Any, number: Any, alpha: Any) -> Parsed:
    ins, attrs = _scalar_or_tensor(number)
    if not isinstance(x, Tensor) or ins != [None]:
        raise UnsupportedOpError(f"expected a tensor and a number, got {type(x).__name__} and {type(number).__name__}")
    if alpha != 1:
        attrs["alpha"] = float(alpha)
    return [x, None], {**attrs, "_op": "rsub"}


@op("add", "arith", [torch.add, Tensor.add, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__, Tensor.add_],
    _parse_binary, "x + y, torch.add (broadcasting, or a number)", lower="pointwise", backward="arith",
    backward_file="kernels/activation.py, kernels/broadcast.py", elementwise=True)
def add(t, a):
    y = t[1] if t[1] is not None else a["scalar"]
    return torch.add(t[0], y, alpha=a.get("alpha", 1))


@op("sub", "arith", [torch.sub, Tensor.sub, Tensor.__sub__, Tensor.__isub__, Tensor.sub_],
    _parse_sub, "x - y, torch.sub (broadcasting, or a number)", lower="pointwise", backward="arith",
    backward_file="kernels/activation.py, kernels/broadcast.py", elementwise=True)
def sub(t, a):
    y = t[1] if t[1] is not None else a["scalar"]
    return torch.sub(t[0], y, alpha=a.get("alpha", 1))


@op("rsub", "arith", [torch.rsub, Tensor.__rsub__], _parse_rsub, "number - x, torch.rsub (y = number - alpha * x)",
    lower="pointwise", backward="arith", backward_file="kernels/activation.py", elementwise=True)
def rsub(t, a):
    return torch.rsub(t[0], a["scalar"], alpha=a.get("alpha", 1))


@op("mul", "arith", [torch.mul, Tensor.mul, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__, Tensor.mul_],
    _parse_binary, "x * y, torch.mul (broadcasting, or a number)", lower="pointwise", backward="arith",
    backward_file="kernels/activation.py, kernels/broadcast.py", elementwise=True)
def mul(t, a):
    y = t[1] if t[1] is not None else a["scalar"]
    return torch.mul(t[0], y)


# -- reductions ----------------------------------------------------------------------------------------
_sum_args = binder("input, dim=None, keepdim=False, *, dtype=None, out=None")
_amax_args = binder("input, dim=(), keepdim=False, *, out=None")


def _reduce_dims(x: Tensor, dim: Any) -> tuple[int, ...]:
    """The reduced dims, non-negative and sorted; None / () / [] mean all (a 0-dim tensor takes dim 0 or -1)."""
    if isinstance(dim, str) or (isinstance(dim, (tuple, list)) and any(isinstance(d, str) for d in dim)):
        raise UnsupportedOpError(f"reductions over named dims ({dim!r}) are not supported")
    dims = (dim,) if isinstance(dim, int) else tuple(int(d) for d in (dim or ()))
    rank = x.dim()
    if not dims:
        return tuple(range(rank))
    lo, hi = -max(rank, 1), max(rank, 1) - 1
    if any(not lo <= d <= hi for d in dims):
        raise InputMismatchError(f"dim {list(dims)} out of range for a {rank}-D input (expected in [{lo}, {hi}])")
    norm = sorted(d % max(rank, 1) for d in dims)
    if len(set(norm)) != len(norm):
        raise InputMismatchError(f"dim {list(dims)} names a dim more than once")
    return tuple(norm) if rank else ()


def _parse_sum(*args, **kwargs) -> Parsed:
    a = _sum_args(args, kwargs)
    x = a["input"]
    if a["out"] is not None or (a["dtype"] is not None and a["dtype"] != x.dtype):
        raise UnsupportedOpError("sum/mean with out= or a dtype= other than the input's is not supported")
    return [x], {"dim": _reduce_dims(x, a["dim"]), "keepdim": bool(a["keepdim"])}


def _parse_amax(*args, **kwargs) -> Parsed:
    a = _amax_args(args, kwargs)
    if a["out"] is not None:
        raise UnsupportedOpError("amax with out= is not supported")
    return [a["input"]], {"dim": _reduce_dims(a["input"], a["dim"]), "keepdim": bool(a["keepdim"])}


@op("sum", "reduce", [torch.sum, Tensor.sum], _parse_sum, "x.sum(dims, keepdim), torch.sum (any dims, or all)",
    lower="reduce", backward="reduce", backward_file="kernels/reduce.py")
def sum_(t, a):
    return torch.sum(t[0], a["dim"], a["keepdim"])


@op("mean", "reduce", [torch.mean, Tensor.mean], _parse_sum,
    "x.mean(dims, keepdim), torch.mean (any dims, or all; x.mean((2, 3)) is global average pooling)",
    lower="reduce", backward="reduce", backward_file="kernels/reduce.py")
def mean(t, a):
    return torch.mean(t[0], a["dim"], a["keepdim"])


@op("amax", "reduce", [torch.amax, Tensor.amax], _parse_amax,
    "x.amax(dims, keepdim), torch.amax (ties share the gradient evenly, as in torch)",
    lower="reduce", backward="reduce", backward_file="kernels/reduce.py")
def amax(t, a):
    return torch.amax(t[0], a["dim"], a["keepdim"])


# -- concatenation ---------------------------------------------------------------------------------------
def _parse_cat(*args, **kwargs) -> Parsed:
    a = binder("tensors, dim=0, *, out=None, axis=None")(args, kwargs)  # torch.concatenate says axis
    xs = a["tensors"]
    if a["axis"] is not None:
        a["dim"] = a["axis"]
    if a["out"] is not None:
        raise UnsupportedOpError("cat with out= is not supported")
    if isinstance(a["dim"], str):
        raise UnsupportedOpError(f"cat along a named dim ({a['dim']!r}) is not supported")
    if isinstance(xs, Tensor) or not all(isinstance(x, Tensor) for x in xs):
        raise TypeError("cat expects a sequence of tensors")
    return list(xs), {"dim": int(a["dim"])}


def cat_dim(shapes: Sequence[tuple[int, ...]], dim: int) -> int:
    """The concatenated dim, non-negative, by the rank of the inputs that are not legacy empty [0] tensors."""
    ranks = [len(s) for s in shapes if tuple(s) != (0,)] or [1]
    return dim % ranks[0]


@op("cat", "cat", [torch.cat, torch.concat, torch.concatenate], _parse_cat,
    "torch.cat / torch.concat of 2+ tensors along any dim", lower="cat", backward="cat",
    backward_file="kernels/cat.py")
def cat(t, a):
    return torch.cat(list(t), a["dim"])


# -- losses ------------------------------------------------------------------------------------------
_ce_args = binder("input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, "
                  "reduction='mean', label_smoothing=0.0")
_point_loss_args = binder("input, target, size_average=None, reduce=None, reduction='mean', weight=None")


_nll_args = binder("input, target, weight=None, size_average=None, ignore_index=-100, reduce=None, reduction='mean'")


def _class_loss(a: dict, what: str) -> Parsed:
    """Inputs [logits, target, weight] and attrs of cross_entropy / nll_loss, after torch's own checks."""
    if a["size_average"] is not None or a["reduce"] is not None:
        raise UnsupportedOpError(f"{what} with the deprecated size_average / reduce: use reduction=")
    x, t, w = a["input"], a["target"], a["weight"]
    if a["reduction"] not in ("mean", "sum", "none"):
        raise ValueError(f"{a['reduction']!r} is not a valid value for reduction")
    if x.dim() < 1:
        raise InputMismatchError(f"{what} expects logits [C], [N, C] or [N, C, d1, ...], got a 0-dim tensor")
    if not t.is_floating_point() and t.dtype != torch.int64:
        raise InputMismatchError(f"{what} expects int64 class targets or float class probabilities, got {t.dtype}")
    return [x, t, w], dict(reduction=a["reduction"], ignore_index=int(a["ignore_index"]))


def _parse_cross_entropy(*args, **kwargs) -> Parsed:
    a = _ce_args(args, kwargs)
    ins, attrs = _class_loss(a, "cross_entropy")
    eps = float(a["label_smoothing"])
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"label_smoothing must be between 0.0 and 1.0, got {eps}")
    return ins, {**attrs, "label_smoothing": eps}


def _parse_nll_loss(*args, **kwargs) -> Parsed:
    return _class_loss(_nll_args(args, kwargs), "nll_loss")


def _parse_point_loss(*args, **kwargs) -> Parsed:
    a = _point_loss_args(args, kwargs)
    if a["size_average"] is not None or a["reduce"] is not None or a["weight"] is not None:
        raise UnsupportedOpError("only reduction= is supported for mse_loss / l1_loss")
    if tuple(a["input"].shape) != tuple(a["target"].shape):
        raise UnsupportedOpError("mse_loss / l1_loss with broadcasting shapes is not supported")
    return [a["input"], a["target"]], dict(reduction=a["reduction"])


@op("cross_entropy", "loss", [F.cross_entropy], _parse_cross_entropy,
    "F.cross_entropy, nn.CrossEntropyLoss ([C], [N, C] or [N, C, d...]; class or probability targets; weight, "
    "ignore_index, label_smoothing, reduction)", lower="loss", backward="cross_entropy",
    backward_file="kernels/losses.py", int_operands=(1,))
def cross_entropy(t, a):
    return F.cross_entropy(t[0], t[1], t[2], reduction=a["reduction"], ignore_index=a["ignore_index"],
                           label_smoothing=a["label_smoothing"])


@op("nll_loss", "loss", [F.nll_loss], _parse_nll_loss,
    "F.nll_loss, nn.NLLLoss ([C], [N, C] or [N, C, d...]; weight, ignore_index, reduction)", lower="loss",
    backward="cross_entropy", backward_file="kernels/losses.py", int_operands=(1,))
def nll_loss(t, a):
    return F.nll_loss(t[0], t[1], t[2], reduction=a["reduction"], ignore_index=a["ignore_index"])


@op("mse_loss", "loss", [F.mse_loss], _parse_point_loss, "F.mse_loss (reduction)", lower="loss",
    backward="point_loss", backward_file="kernels/losses.py")
def mse_loss(t, a):
    return F.mse_loss(t[0], t[1], reduction=a["reduction"])


@op("l1_loss", "loss", [F.l1_loss], _parse_point_loss, "F.l1_loss (reduction)", lower="loss",
    backward="point_loss", backward_file="kernels/losses.py")
def l1_loss(t, a):
    return F.l1_loss(t[0], t[1], reduction=a["reduction"])


# -- torch eager, for calls the registry does not know (fusednn.compile(..., strict=False)) ----------------
@dataclass(frozen=True, slots=True)
class EagerCall:
    """A torch call replayed on new tensors: `fn` with the traced tensor arguments put back in their slots.

    leaves: the call's flattened (args, kwargs) with None where a traced tensor goes; slots: for each leaf,
    the index of the node input that fills it (or None). Prints as the function's name in the IR.
    """

    fn: Any
    name: str
    spec: Any
    leaves: tuple[Any, ...]
    slots: tuple[int | None, ...]

    def __call__(self, tensors: Sequence[Tensor]) -> Tensor:
        from torch.utils import _pytree as pytree

        flat = [leaf if i is None else tensors[i] for leaf, i in zip(self.leaves, self.slots)]
        args, kwargs = pytree.tree_unflatten(flat, self.spec)
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict) -> "EagerCall":
        """Itself: passes copy graphs, never a call's function (which may be a getset descriptor, as
        `Tensor.mT`'s, that cannot be copied) or its constants."""
        return self

    def __str__(self) -> str:
        return self.name


def _parse_eager(*args, **kwargs) -> Parsed:
    raise UnsupportedOpError("eager nodes are recorded by the tracer (strict=False), not parsed")


@op("eager", "eager", [], _parse_eager,
    "any other torch call returning one tensor, with fusednn.compile(..., strict=False): run by torch",
    lower="eager", backward="eager", backward_file="torch autograd")
def eager(t, a):
    return a["call"](t)


# -- fused groups: made by passes, never traced; a group runs (and is referenced as) the nodes it absorbed --------
def _parse_fused(*args, **kwargs) -> Parsed:
    raise UnsupportedOpError("fused groups are made by fusednn's passes, not traced")


def _fused_ref(t, a):
    raise CompileError("a fused group has no reference of its own: run its absorbed nodes (reference.run_node)")


op("conv_relu_pool", "fused", [], _parse_fused, "conv2d -> [activation] -> [non-overlapping pool] (passes.fuse)",
   lower="conv", backward="conv", backward_file="kernels/conv_relu_pool.py")(_fused_ref)
op("conv_infer", "fused", [], _parse_fused, "conv2d -> [batch_norm (running statistics)] -> [+ residual] -> [any "
   "activation] -> [non-overlapping pool], or conv2d -> pool -> batch_norm -> [activation] (passes.fuse_conv_inference; "
   "calls autograd does not record)",
   lower="conv", backward="inference", backward_file="none: an inference-only kernel")(_fused_ref)
op("batch_norm_act", "fused", [], _parse_fused, "batch_norm -> [+ residual] -> [any activation] (passes.fuse_batch_norm; "
   "training and eval)", lower="batch_norm", backward="batch_norm", backward_file="kernels/batch_norm.py",
   int_operands=(5,))(_fused_ref)
op("linear_relu", "fused", [], _parse_fused, "linear -> [activation] (passes.fuse)", lower="linear",
   backward="linear", backward_file="kernels/linear_relu.py")(_fused_ref)
op("pointwise", "fused", [], _parse_fused, "a tree of elementwise ops of one shape (passes.fuse_pointwise)",
   lower="pointwise", backward="pointwise", backward_file="per absorbed op")(_fused_ref)


# Ops whose result is their input (no node): contiguity and identity calls.
ALIASES = (Tensor.contiguous,)
