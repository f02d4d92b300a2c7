"""Pointwise activations: the forward math shared with generated kernels, and the hand-written backward.

Every activation formula is defined once, here: the generated forward kernels (the pointwise template and
the linear and conv epilogues) import `_relu`, `_leaky_relu`, `_sigmoid` and `_tanh`, and every backward
kernel that needs act' (this file, kernels/linear_relu.py, kernels/conv_relu_pool.py) calls `_act_grad`,
so fused and unfused kernels round alike.
Backward launchers: `activation_backward` (relu, leaky_relu, sigmoid, tanh), `prelu_backward`,
`mul_backward` (also serves sub's negated operand: other = -1.0), and `add` / `accumulate_` (sum the
gradients of a value that has several users: the first sum into a new tensor, later ones in place).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.launch import launch

# ----------------------------------------------------------------------------------------------------
# Forward math
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _relu(x):
    """relu(x); where, not tl.maximum: on the GPU tl.maximum drops NaN, torch.relu propagates it."""
    return tl.where(x < 0, 0.0, x)


@triton.jit
def _leaky_relu(x, slope):
    """leaky_relu(x) with negative slope `slope`; NaN propagates (NaN > 0 fails, NaN * slope is NaN)."""
    return tl.where(x > 0, x, x * slope)


@triton.jit
def _sigmoid(x):
    """sigmoid(x) in fp32 without overflow: exp is only taken of -|x| <= 0."""
    e = tl.exp(-tl.abs(x))  # in (0, 1]; 1/(1+exp(-x)) would overflow exp for x < -88
    r = 1.0 / (1.0 + e)
    # x < 0: sigmoid(x) = e/(1+e). NaN stays NaN through e; +-inf give exactly 1 and 0.
    return tl.where(x >= 0, r, e * r)


@triton.jit
def _tanh(x):
    """tanh(x) in fp32 without overflow, accurate near 0 (Triton has no portable tanh: libdevice's is
    CUDA-only and the interpreter lacks it)."""
    a = tl.abs(x)
    # |x| >= 0.3: tanh|x| = (1 - e)/(1 + e), e = exp(-2|x|) in (0, 1] never overflows; +-inf give +-1.
    # The cancellation in 1 - e amplifies exp's rounding by e/(1-e) <= 1.22 at |x| = 0.3.
    e = tl.exp(-2.0 * a)
    big = (1.0 - e) / (1.0 + e)
    big = tl.where(x < 0, -big, big)
    # |x| < 0.3: Taylor series to x^11; the first omitted term (x^13) is < 2e-9 relative at |x| = 0.3.
    # Evaluated on x zeroed outside that range, so no lane overflows x^3.
    xs = tl.where(a < 0.3, x, 0.0)
    x2 = xs * xs
    p = -0.008863235529902197  # -1382/155925
    p = p * x2 + 0.021869488536155203  # 62/2835
    p = p * x2 - 0.05396825396825397  # -17/315
    p = p * x2 + 0.13333333333333333  # 2/15
    p = p * x2 - 0.3333333333333333  # -1/3
    small = xs + xs * x2 * p
    return tl.where(a < 0.3, small, big)  # NaN fails a < 0.3 and propagates through `big`


@triton.jit
def _act_grad(dy, s, slope, ACT: tl.constexpr):
    """dy * act'(z), act' read from a saved tensor s: the output y for relu, sigmoid and tanh; for
    leaky_relu the input x, or the output y when slope >= 0 (then y > 0 exactly when x > 0).
    The VJPs are derived in the comment block below."""
    if ACT == "relu":
        # y <= 0 rather than not y > 0: a NaN output passes its gradient on, as torch's threshold_backward
        dx = tl.where(s <= 0, 0.0, dy)
    elif ACT == "leaky_relu":
        dx = tl.where(s > 0, dy, dy * slope)
    elif ACT == "sigmoid":
        dx = dy * (s * (1.0 - s))
    elif ACT == "tanh":
        dx = dy * (1.0 - s * s)
    else:  # "none"
        dx = dy
    return dx


# ----------------------------------------------------------------------------------------------------
# Backward kernels
#
# VJPs, with dy = dL/dy the upstream gradient (all elementwise):
#   relu:        y = max(x, 0)           dx = dy * [y > 0]        (torch: derivative 0 at x = 0; written
#                                                                  as y <= 0 ? 0 : dy so a NaN y passes dy
#                                                                  through, as torch's threshold_backward)
#   leaky_relu:  y = x > 0 ? x : s*x     dx = x > 0 ? dy : s*dy    (reads x: y loses x's sign when s = 0)
#   sigmoid:     y = 1/(1+e^-x)          dy/dx = y(1-y)            dx = dy * (1-y) * y
#   tanh:        y = tanh x              dy/dx = 1 - y^2           dx = dy * (1 - y*y)
#   prelu:       y = x > 0 ? x : w[c]*x  dx = x > 0 ? dy : w[c]*dy
#                                        dw[c] = sum over i in channel c of (x_i > 0 ? 0 : x_i*dy_i)
#                where c = (i // inner) % channels for an [outer, channels, inner] tensor
#   mul:         y = a*b                 da = dy*b, db = dy*a      (b a tensor or a scalar)
#   add / sub:   y = a +- b              da = dy, db = +-dy        (no kernel: dy itself, or mul by -1)
# A value read by several ops gets the sum of their gradients: add, then accumulate_ in place.
# dw is reduced by one program per channel walking its elements in a fixed order (no atomics), so two
# backward passes give bit-identical weight gradients.
# ----------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["numel"])
def _activation_bwd_dx_kernel(
    dy_ptr,  # [numel] upstream gradient
    s_ptr,  # [numel] saved tensor: the output y (relu, sigmoid, tanh) or the input x (leaky_relu)
    dx_ptr,  # [numel] gradient w.r.t. the activation's input (written)
    slope,  # leaky_relu negative slope (unused otherwise)
    numel,
    ACT: tl.constexpr,  # "relu" | "leaky_relu" | "sigmoid" | "tanh"
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask)
    s = tl.load(s_ptr + offs, mask=mask)
    tl.store(dx_ptr + offs, _act_grad(dy, s, slope, ACT), mask=mask)


@triton.jit(do_not_specialize=["numel"])
def _prelu_bwd_dx_kernel(
    dy_ptr,  # [numel] upstream gradient
    x_ptr,  # [numel] prelu input
    w_ptr,  # [channels] prelu weight
    dx_ptr,  # [numel] gradient w.r.t. x (written)
    numel,
    channels,
    inner,  # elements per channel per outer index (H*W for NCHW)
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask)
    x = tl.load(x_ptr + offs, mask=mask)
    w = tl.load(w_ptr + (offs // inner) % channels, mask=mask)
    tl.store(dx_ptr + offs, tl.where(x > 0, dy, w * dy), mask=mask)


@triton.jit(do_not_specialize=["per_channel"])
def _prelu_bwd_dw_kernel(
    dy_ptr,  # [outer, channels, inner] upstream gradient
    x_ptr,  # [outer, channels, inner] prelu input
    dw_ptr,  # [channels] weight gradient (written, one element per program)
    per_channel,  # outer * inner: elements of one channel
    channels,
    inner,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    # Walk channel c's elements in a fixed order; the block-wide sum at the end is a fixed tree too.
    for start in range(0, per_channel, BLOCK):
        j = start + tl.arange(0, BLOCK)
        m = j < per_channel
        offs = (j // inner) * (channels * inner) + c * inner + j % inner
        x = tl.load(x_ptr + offs, mask=m, other=0.0)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0)
        acc += tl.where(x > 0, 0.0, x * dy)  # masked lanes: x = 0 gives 0 * 0
    tl.store(dw_ptr + c, tl.sum(acc, axis=0))


@triton.jit(do_not_specialize=["numel"])
def _mul_bwd_dx_kernel(
    dy_ptr,  # [numel] upstream gradient
    other_ptr,  # [numel] the other factor (ignored when OTHER_IS_TENSOR is False)
    dx_ptr,  # [numel] gradient w.r.t. this factor (written)
    other_scalar,  # the other factor when it is a Python scalar
    numel,
    OTHER_IS_TENSOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask)
    if OTHER_IS_TENSOR:
        dx = dy * tl.load(other_ptr + offs, mask=mask)
    else:
        dx = dy * other_scalar
    tl.store(dx_ptr + offs, dx, mask=mask)


@triton.jit(do_not_specialize=["numel"])
def _add_kernel(
    a_ptr,  # [numel] first gradient
    b_ptr,  # [numel] gradient to add
    out_ptr,  # [numel] a + b (written; may be a_ptr: the sum in place)
    numel,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    a = tl.load(a_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, a + tl.load(b_ptr + offs, mask=mask), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

_ACTS = ("relu", "leaky_relu", "sigmoid", "tanh")


def _check_same(name: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.device != b.device:
        raise ValueError(f"{name}: tensors differ in shape or device: {tuple(a.shape)} on {a.device} "
                         f"vs {tuple(b.shape)} on {b.device}")
    if not (a.is_contiguous() and b.is_contiguous()):
        raise ValueError(f"{name}: tensors must be contiguous")
    if a.numel() >= 2**31:
        raise ValueError(f"{name}: {a.numel()} elements overflow the kernels' int32 offsets")


def _grid(numel: int, meta: dict) -> tuple[int]:
    return (configs.cdiv(numel, meta["BLOCK"]),)


def activation_backward(dy: torch.Tensor, saved: torch.Tensor, *, act: str, act_param: float = 0.0) -> torch.Tensor:
    """Gradient w.r.t. an activation's input, as a new tensor.

    Args:
        dy: upstream gradient.
        saved: the activation's output y for relu, sigmoid and tanh; its input x for leaky_relu.
        act: "relu" | "leaky_relu" | "sigmoid" | "tanh".
        act_param: leaky_relu's negative slope.
    """
    if act not in _ACTS:
        raise ValueError(f"activation_backward: act must be one of {_ACTS}, got {act!r}")
    _check_same("activation_backward", dy, saved)
    dx = torch.empty_like(dy)
    meta = configs.elementwise(configs.nominal(dy.numel()))
    launch(_activation_bwd_dx_kernel, _grid(dy.numel(), meta), dy, saved, dx, float(act_param), dy.numel(),
           ACT=act, **meta)
    return dx


def prelu_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, *, channels: int, inner: int,
    needs_dx: bool, needs_dw: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of prelu w.r.t. its input and weight: (dx, dweight), None where not needed.

    Args:
        dy, x: contiguous tensors of the same shape, viewed as [outer, channels, inner].
        weight: `channels` elements (channels = 1: one weight for every element).
        channels, inner: x's channel index is (flat index // inner) % channels (NCHW: C, H*W).
    """
    _check_same("prelu_backward", dy, x)
    if weight.numel() != channels or channels < 1 or inner < 1 or x.numel() % (channels * inner):
        raise ValueError(f"prelu_backward: weight of {weight.numel()} elements, channels={channels}, "
                         f"inner={inner} do not fit a tensor of shape {tuple(x.shape)}")
    numel = x.numel()
    dx = dw = None
    if needs_dx:
        dx = torch.empty_like(x)
        meta = configs.elementwise(configs.nominal(numel))
        launch(_prelu_bwd_dx_kernel, _grid(numel, meta), dy, x, weight, dx, numel, channels, inner, **meta)
    if needs_dw:
        dw = torch.empty_like(weight)
        per_channel = numel // channels
        if per_channel == 0:
            dw.zero_()
        else:
            meta = configs.elementwise(configs.nominal(per_channel))
            launch(_prelu_bwd_dw_kernel, (channels,), dy, x, dw, per_channel, channels, inner, **meta)
    return dx, dw


def mul_backward(dy: torch.Tensor, other: torch.Tensor | float) -> torch.Tensor:
    """Gradient of a product w.r.t. one factor, dy * other, as a new tensor (other: tensor or scalar)."""
    dx = torch.empty_like(dy)
    if isinstance(other, torch.Tensor):
        _check_same("mul_backward", dy, other)
        other_ptr, scalar, is_tensor = other, 0.0, True
    else:
        _check_same("mul_backward", dy, dy)
        other_ptr, scalar, is_tensor = None, float(other), False  # the kernel reads no other tensor
    meta = configs.elementwise(configs.nominal(dy.numel()))
    launch(_mul_bwd_dx_kernel, _grid(dy.numel(), meta), dy, other_ptr, dx, scalar, dy.numel(),
           OTHER_IS_TENSOR=is_tensor, **meta)
    return dx


def add(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b as a new tensor (the first sum of a value's gradients)."""
    _check_same("add", a, b)
    out = torch.empty_like(a)
    meta = configs.elementwise(configs.nominal(a.numel()))
    launch(_add_kernel, _grid(a.numel(), meta), a, b, out, a.numel(), **meta)
    return out


def accumulate_(acc: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """acc += g in place (a further sum into a gradient only fusednn holds); returns acc."""
    _check_same("accumulate_", acc, g)
    meta = configs.elementwise(configs.nominal(acc.numel()))
    launch(_add_kernel, _grid(acc.numel(), meta), acc, g, acc, acc.numel(), nbytes=3 * acc.numel() * acc.element_size(),
           **meta)
    return acc
