"""Pointwise activations: the forward math shared with generated kernels, and the hand-written backward.

Every activation formula is defined once, here: the generated forward kernels (the pointwise template and
the linear and conv epilogues) import `_relu`, `_leaky_relu`, `_sigmoid`, `_tanh`, ... (one `_<act>` per
entry of `SAVES`), and every backward kernel that needs act' (this file, kernels/linear_relu.py,
kernels/conv_relu_pool.py) calls `_act_grad` (or `_act_grad3` for activations with up to three
parameters), so fused and unfused kernels round alike.
Backward launchers: `activation_backward` (every activation of `SAVES`), `prelu_backward`,
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
def _tanh_tail(xs):
    """tanh(xs) - xs for |xs| < 0.3 (Taylor series to xs^11; the first omitted term, xs^13, is < 2e-9
    relative at |xs| = 0.3). Callers zero xs outside that range, so no lane overflows xs^3."""
    x2 = xs * xs
    p = -0.008863235529902197  # -1382/155925
    p = p * x2 + 0.021869488536155203  # 62/2835
    p = p * x2 - 0.05396825396825397  # -17/315
    p = p * x2 + 0.13333333333333333  # 2/15
    p = p * x2 - 0.3333333333333333  # -1/3
    return xs * x2 * p


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
    xs = tl.where(a < 0.3, x, 0.0)
    return tl.where(a < 0.3, xs + _tanh_tail(xs), big)  # NaN fails a < 0.3 and propagates through `big`


@triton.jit
def _expm1(u):
    """exp(u) - 1 accurate near 0: exp(u) - 1 would lose all digits of a tiny u to cancellation."""
    us = tl.where(tl.abs(u) < 0.5, u, 0.0)
    # |u| < 0.5: Taylor series to u^9 (first omitted term < 6e-10 relative); beyond, exp(u) - 1 loses at
    # most a factor e^u/(e^u - 1) <= 1.6 to cancellation. NaN fails |u| < 0.5 and propagates.
    p = 1.0 / 362880.0
    p = p * us + 1.0 / 40320.0
    p = p * us + 1.0 / 5040.0
    p = p * us + 1.0 / 720.0
    p = p * us + 1.0 / 120.0
    p = p * us + 1.0 / 24.0
    p = p * us + 1.0 / 6.0
    p = p * us + 0.5
    p = p * us + 1.0
    return tl.where(tl.abs(u) < 0.5, us * p, tl.exp(u) - 1.0)


@triton.jit
def _log1p_small(u):
    """log(1 + u) for u in [0, 1] (or NaN), accurate for tiny u: log(w) * u / (w - 1) with w = 1 + u
    cancels the rounding of w (Goldberg); w == 1 means u is below half an ulp of 1 and log1p(u) = u."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))


@triton.jit
def _softplus0(z):
    """log(1 + exp(z)) without overflow: max(z, 0) + log1p(exp(-|z|)); NaN propagates."""
    return tl.where(z > 0, z, 0.0) + _log1p_small(tl.exp(-tl.abs(z)))


@triton.jit
def _hardtanh(x, lo, hi):
    """clamp(x, lo, hi) (relu6: lo=0, hi=6); where, not min/max: NaN propagates as in torch."""
    return tl.where(x < lo, lo, tl.where(x > hi, hi, x))


@triton.jit
def _elu(x, alpha, scale, input_scale):
    """elu/selu/celu: x > 0 ? scale*x : scale*alpha*(exp(input_scale*x) - 1), as torch's elu (NaN takes
    the x > 0 side and stays NaN). expm1 keeps small negative x accurate."""
    neg = tl.where(x <= 0, x, 0.0)  # the exp of a large positive x would overflow in the unused branch
    return tl.where(x <= 0, (alpha * scale) * _expm1(neg * input_scale), x * scale)


@triton.jit
def _normal_cdf(x):
    """Phi(x), the standard normal CDF, accurate relative to itself also in the lower tail. (1 + erf(x/sqrt 2))/2
    cancels there (x = -5: 10% error in fp32), so x < -1 takes erfc(z)/2, z = -x/sqrt 2, from Numerical
    Recipes' erfcc: t exp(-z^2 + poly(t)), t = 1/(1 + z/2), fractional error < 1.2e-7 for every z >= 0; the
    rounding of the exp argument adds about z^2 ulp (3e-6 at x = -6)."""
    z = tl.where(x < -1.0, -x * 0.7071067811865476, 1.0)  # z = 1 in lanes that do not use it
    t = 1.0 / (1.0 + 0.5 * z)
    p = 0.17087277
    p = p * t - 0.82215223
    p = p * t + 1.48851587
    p = p * t - 1.13520398
    p = p * t + 0.27886807
    p = p * t - 0.18628806
    p = p * t + 0.09678418
    p = p * t + 0.37409196
    p = p * t + 1.00002368
    p = p * t - 1.26551223
    tail = 0.5 * t * tl.exp(p - z * z)
    # NaN and +-inf fail x < -1 or take erf; -inf: z = inf, t = 0, exp(-inf) = 0 gives 0 as erf would
    return tl.where(x < -1.0, tail, 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)))


@triton.jit
def _gelu(x):
    """x * Phi(x) (approximate='none'); -inf gives -inf * 0 = NaN as torch."""
    return x * _normal_cdf(x)


@triton.jit
def _gelu_tanh_2u(x):
    """2u = 2 sqrt(2/pi) (x + 0.044715 x^3) of gelu's tanh form, x clamped to [-30, 30] first: sigmoid(2u)
    is exactly 0 or 1 beyond, and the clamp keeps x^3 from overflowing (NaN passes the clamp)."""
    xc = _hardtanh(x, -30.0, 30.0)
    return 1.5957691216057308 * (xc + 0.044715 * xc * xc * xc)


@triton.jit
def _gelu_tanh(x):
    """approximate='tanh': x/2 * (1 + tanh(u)) written as x * sigmoid(2u) (1 + tanh u = 2 sigmoid(2u)),
    which keeps the tiny values of large negative x instead of cancelling them; -inf gives NaN as torch."""
    return x * _sigmoid(_gelu_tanh_2u(x))


@triton.jit
def _silu(x):
    """x * sigmoid(x); -inf gives -inf * 0 = NaN as torch."""
    return x * _sigmoid(x)


@triton.jit
def _mish_t(x):
    """tanh(softplus(x)) without cancellation: with s = 1 + e^x, tanh(log s) = (s^2 - 1)/(s^2 + 1) =
    n/(n + 2), n = e^x (e^x + 2); for x > 0 in terms of u = e^-x: (1 + 2u)/(1 + 2u + 2u^2)."""
    u = tl.exp(-tl.abs(x))
    n = u * (u + 2.0)
    return tl.where(x > 0, (1.0 + 2.0 * u) / (1.0 + 2.0 * u + 2.0 * u * u), n / (n + 2.0))


@triton.jit
def _mish(x):
    """x * tanh(softplus(x)); -inf gives NaN as torch."""
    return x * _mish_t(x)


@triton.jit
def _hardsigmoid(x):
    """relu6(x + 3) / 6, as torch (NaN propagates)."""
    return _hardtanh(x + 3.0, 0.0, 6.0) / 6.0


@triton.jit
def _hardswish(x):
    """x * relu6(x + 3) / 6, as torch (-inf gives NaN)."""
    return x * _hardtanh(x + 3.0, 0.0, 6.0) / 6.0


@triton.jit
def _softplus(x, beta, threshold):
    """beta*x > threshold ? x : log(1 + exp(beta*x)) / beta, as torch; never overflows exp."""
    z = x * beta
    return tl.where(z > threshold, x, _softplus0(z) / beta)


@triton.jit
def _softsign(x):
    """x / (1 + |x|); +-inf give inf/inf = NaN as torch."""
    return x / (1.0 + tl.abs(x))


@triton.jit
def _tanhshrink(x):
    """x - tanh(x); near 0 from the series of tanh (x - tanh x would cancel every digit of a tiny x)."""
    a = tl.abs(x)
    xs = tl.where(a < 0.3, x, 0.0)
    return tl.where(a < 0.3, -_tanh_tail(xs), x - _tanh(x))


@triton.jit
def _threshold(x, threshold, value):
    """x <= threshold ? value : x, as torch (NaN stays NaN)."""
    return tl.where(x <= threshold, value, x)


@triton.jit
def _logsigmoid(x):
    """log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)): no overflow, exact tails."""
    return tl.where(x < 0, x, 0.0) - _log1p_small(tl.exp(-tl.abs(x)))


@triton.jit
def _act_grad(dy, s, slope, ACT: tl.constexpr):
    """dy * act'(z) for the conv/linear epilogue activations (one parameter at most): see `_act_grad3`."""
    return _act_grad3(dy, s, slope, 0.0, 0.0, ACT)


@triton.jit
def _act_grad3(dy, s, p0, p1, p2, ACT: tl.constexpr):
    """dy * act'(z), act' read from the saved tensor s that `SAVES` names: the output y or the input x
    (leaky_relu: the input, or the output y when slope >= 0, as then y > 0 exactly when x > 0).
    p0, p1, p2: the activation's parameters in the order its forward helper takes them.
    The VJPs are derived in the comment block below."""
    if ACT == "relu":
        # y <= 0 rather than not y > 0: a NaN output passes its gradient on, as torch's threshold_backward
        dx = tl.where(s <= 0, 0.0, dy)
    elif ACT == "leaky_relu":
        dx = tl.where(s > 0, dy, dy * p0)
    elif ACT == "sigmoid":
        dx = dy * (s * (1.0 - s))
    elif ACT == "tanh":
        dx = dy * (1.0 - s * s)
    elif ACT == "hardtanh":  # s = y; y strictly inside (lo, hi) exactly when x is; NaN gives 0 as torch
        dx = tl.where((s > p0) & (s < p1), dy, 0.0)
    elif ACT == "elu":  # s = x; NaN takes the x > 0 side, as torch
        neg = tl.where(s <= 0, s, 0.0)  # no overflowing exp in the unused branch
        dx = tl.where(s <= 0, dy * ((p2 * p0 * p1) * tl.exp(neg * p2)), dy * p1)
    elif ACT == "gelu":  # s = x
        dx = dy * (_normal_cdf(s) + s * (0.3989422804014327 * tl.exp(-0.5 * s * s)))
    elif ACT == "gelu_tanh":  # s = x
        u2 = _gelu_tanh_2u(s)
        # The x^2 factor only matters where sigmoid(2u) (1 - sigmoid(2u)) is not 0 (|x| < 30); clamping x
        # keeps it from overflowing into 0 * inf at |x| > 1e19. 1 - sigmoid(2u) is sigmoid(-2u), exact.
        xc = _hardtanh(s, -30.0, 30.0)
        d = _sigmoid(u2) * _sigmoid(-u2) * (1.5957691216057308 * (1.0 + 0.134145 * xc * xc))
        dx = dy * (_sigmoid(u2) + s * d)
    elif ACT == "silu":  # s = x; 1 - sigmoid(x) is sigmoid(-x), exact for large x
        dx = dy * (_sigmoid(s) * (1.0 + s * _sigmoid(-s)))
    elif ACT == "mish":  # s = x
        t = _mish_t(s)
        # 1 - t^2 = (1 - t)(1 + t) without cancellation: 1 - t = 2/(n + 2) for x <= 0 and
        # 2u^2 / (1 + 2u + 2u^2) for x > 0 (the notation of _mish_t)
        u = tl.exp(-tl.abs(s))
        n = u * (u + 2.0)
        one_minus_t = tl.where(s > 0, 2.0 * u * u / (1.0 + 2.0 * u + 2.0 * u * u), 2.0 / (n + 2.0))
        dx = dy * (t + s * _sigmoid(s) * (one_minus_t * (1.0 + t)))
    elif ACT == "hardswish":  # s = x; torch's branches (x = -3 gives 0, x = 3 gives dy); NaN passes dy on
        dx = tl.where(s <= -3.0, 0.0, tl.where(s < 3.0, dy * (s / 3.0 + 0.5), dy))
    elif ACT == "hardsigmoid":  # s = x; NaN gives 0 as torch
        dx = tl.where((s > -3.0) & (s < 3.0), dy * (1.0 / 6.0), 0.0)
    elif ACT == "softplus":  # s = x; p0 = beta, p1 = threshold
        z = s * p0
        dx = tl.where(z > p1, dy, dy * _sigmoid(z))
    elif ACT == "softsign":  # s = x; (s - s) is NaN at +-inf, where torch's x/(1+|x|) rule gives inf/inf
        d = 1.0 / (1.0 + tl.abs(s))
        dx = dy * (d * d + (s - s))
    elif ACT == "tanhshrink":  # s = x
        t = _tanh(s)
        dx = dy * (t * t)
    elif ACT == "threshold":  # s = x; p0 = threshold
        dx = tl.where(s <= p0, 0.0, dy)
    elif ACT == "logsigmoid":  # s = x
        dx = dy * _sigmoid(-s)
    elif ACT == "neg":  # reads nothing
        dx = -dy
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
#                (reads y, as torch: where float32 tanh rounds to +-1 (|x| > 9.01) both give exactly 0)
#   hardtanh:    y = clamp(x, lo, hi)    dx = lo < y < hi ? dy : 0 (relu6: lo = 0, hi = 6)
#   elu:         y = x > 0 ? s*x : s*a*(e^(i*x) - 1)              dx = x > 0 ? s*dy : dy * i*s*a*e^(i*x)
#                (selu: a = 1.6733, s = 1.0507, i = 1; celu(a): s = 1, i = 1/a)
#   gelu:        y = x Phi(x)            dy/dx = Phi(x) + x phi(x), phi(x) = e^(-x^2/2)/sqrt(2 pi)
#   gelu_tanh:   y = x sig(2u), u = k(x + c x^3)   dy/dx = sig(2u) + x * 2 sig(2u) sig(-2u) * k(1 + 3c x^2)
#   silu:        y = x sig(x)            dy/dx = sig(x) (1 + x sig(-x))
#   mish:        y = x t, t = tanh(softplus x)     dy/dx = t + x sig(x) (1 - t^2)
#   hardswish:   y = x relu6(x+3)/6      dy/dx = x <= -3 ? 0 : x < 3 ? x/3 + 1/2 : 1
#   hardsigmoid: y = relu6(x+3)/6        dy/dx = -3 < x < 3 ? 1/6 : 0
#   softplus:    y = log(1 + e^(bx))/b   dy/dx = sig(bx) (1 where bx > threshold: y = x there)
#   softsign:    y = x/(1+|x|)           dy/dx = 1/(1+|x|)^2
#   tanhshrink:  y = x - tanh x          dy/dx = tanh^2 x          (exact, unlike 1 - (1 - tanh^2))
#   threshold:   y = x <= t ? v : x      dy/dx = x <= t ? 0 : 1
#   logsigmoid:  y = -softplus(-x)       dy/dx = sig(-x)
#   neg:         y = -x                  dx = -dy                  (reads nothing)
#   Which tensor each reads is `SAVES`: the input wherever the output cannot give act' exactly.
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
    s_ptr,  # [numel] saved tensor: the output y or the input x, as SAVES[ACT] says (unread for neg)
    dx_ptr,  # [numel] gradient w.r.t. the activation's input (written)
    p0,  # the activation's parameters (leaky_relu: slope; elu: alpha, scale, input_scale; ...)
    p1,
    p2,
    numel,
    ACT: tl.constexpr,  # a key of SAVES
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    if ACT == "neg":
        s = dy  # neg reads no saved tensor
    else:
        s = tl.load(s_ptr + offs, mask=mask).to(tl.float32)
    tl.store(dx_ptr + offs, _act_grad3(dy, s, p0, p1, p2, ACT), mask=mask)


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
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    w = tl.load(w_ptr + (offs // inner) % channels, mask=mask).to(tl.float32)
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
        x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
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
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    if OTHER_IS_TENSOR:
        dx = dy * tl.load(other_ptr + offs, mask=mask).to(tl.float32)
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
    a = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, a + tl.load(b_ptr + offs, mask=mask).to(tl.float32), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------

# What each activation's backward reads (`_act_grad3`): its output "y", its input "x", or nothing (None).
# The output where it gives act' exactly and lets the input die early (relu, sigmoid, tanh, hardtanh); the
# input where act' cannot be recovered from y (not one-to-one: threshold, hardswish; or only through a
# cancellation: elu near saturation, gelu, silu, mish, softsign, softplus, logsigmoid, tanhshrink).
SAVES: dict[str, str | None] = {
    "relu": "y", "leaky_relu": "x", "sigmoid": "y", "tanh": "y", "hardtanh": "y", "elu": "x", "gelu": "x",
    "gelu_tanh": "x", "silu": "x", "mish": "x", "hardswish": "x", "hardsigmoid": "x", "softplus": "x",
    "softsign": "x", "tanhshrink": "x", "threshold": "x", "logsigmoid": "x", "neg": None,
}
# The activations a GEMM epilogue (conv_relu_pool, linear_relu) applies with act' read from its output: monotone
# non-decreasing, so a fused max pool may follow.
EPILOGUE_ACTS = ("none", "relu", "leaky_relu", "sigmoid", "tanh")


def saves_input(act: str) -> bool:
    """Whether a GEMM epilogue's activation is one whose act' its backward reads from the GEMM's result z,
    which the training forward then also writes: an activation that needs its input (`SAVES`), not one of
    EPILOGUE_ACTS (GELU, SiLU, Mish, Hardswish, ...)."""
    return act not in EPILOGUE_ACTS and SAVES.get(act) == "x"


# How many parameters each activation's forward helper `_<act>` and `_act_grad3` take (p0, p1, p2).
NPARAMS: dict[str, int] = {"leaky_relu": 1, "hardtanh": 2, "elu": 3, "softplus": 2, "threshold": 2}
_ACTS = tuple(SAVES)


def heavy_act(act: str) -> bool:
    """An activation whose formula and derivative are long (erf, exp, ...): a kernel applying it to a large
    tile per thread needs smaller tiles to stay out of local memory (configs.reduce_cols `heavy`)."""
    return act not in ("none", "relu", "leaky_relu", "hardtanh", "neg")


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


def activation_backward(dy: torch.Tensor, saved: torch.Tensor | None, *, act: str,
                        act_param: float | tuple[float, ...] = 0.0) -> torch.Tensor:
    """Gradient w.r.t. an activation's input, as a new tensor.

    Args:
        dy: upstream gradient.
        saved: what SAVES[act] names: the activation's output y or its input x (None for neg).
        act: a key of SAVES (a kernel activation: relu6 is hardtanh(0, 6), selu and celu are elu).
        act_param: the activation's parameters, NPARAMS[act] of them (a float for one).
    """
    if act not in _ACTS:
        raise ValueError(f"activation_backward: act must be one of {_ACTS}, got {act!r}")
    params = tuple(float(p) for p in (act_param if isinstance(act_param, (tuple, list)) else (act_param,)))
    if len(params) < NPARAMS.get(act, 0):
        raise ValueError(f"activation_backward: {act} takes {NPARAMS[act]} parameters, got {params}")
    params = (params + (0.0, 0.0, 0.0))[:3]
    if SAVES[act] is None:
        _check_same("activation_backward", dy, dy)
        saved = None  # the kernel reads no saved tensor
    else:
        if saved is None:
            raise ValueError(f"activation_backward: {act} reads its saved {SAVES[act]}, got None")
        _check_same("activation_backward", dy, saved)
    dx = torch.empty_like(dy)
    meta = configs.elementwise(configs.nominal(dy.numel()))
    launch(_activation_bwd_dx_kernel, _grid(dy.numel(), meta), dy, saved, dx, *params, dy.numel(),
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
