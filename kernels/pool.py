"""Backward of the standalone 2-D pools (forward: compiler/templates/pool.py).

Gather formulation: each program owns BLOCK input positions and sums the gradient of every window
that covers them, in a fixed (i, j) order. No two programs write the same element, so there are no
atomics and two runs give bit-identical dx.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.launch import launch


def pool_out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1,
                  ceil_mode: bool = False) -> int:
    """Output length of one pooled dimension, as torch computes it (pooling_output_shape)."""
    span = size + 2 * padding - dilation * (kernel - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    # torch drops a ceil_mode window that would start past the input and its left padding
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def adaptive_window(size: int, out: int) -> int:
    """The largest window an adaptive pool from `size` to `out` uses along one dimension."""
    return max(-(-(o + 1) * size // out) - o * size // out for o in range(out))


# VJP. Index an input plane by p = (ph, pw) and an output plane by o = (oh, ow).
#
# max:  y[o] = x[idx[o]]                      =>  dx[p] = sum_{o : p in win(o)} dy[o] * [idx[o] == p]
# avg:  y[o] = sum_{q in win(o)} x[q] / div(o) =>  dx[p] = sum_{o : p in win(o)} dy[o] / div(o)
#
# Which windows cover p (per dimension; the 2-D set is the product):
# - pool: win(o) holds ph = oh*SH - PH + i*DH for i in [0, KH), so p is covered by the oh with
#   oh*SH = ph + PH - i*DH for some i, 0 <= oh < OH. Looping over i (not over oh) visits each
#   covering window exactly once, because distinct i give distinct oh.
# - adaptive: win(oh) = [floor(oh*H/OH), ceil((oh+1)*H/OH)), which covers ph exactly when
#   oh in [floor(ph*OH/H), ceil((ph+1)*OH/H)) -- the same formula with H and OH swapped.
#
# div(o) is torch's: divisor_override, else the window clipped to the padded input
# (count_include_pad) or to the input, a product of one extent per dimension.
# Padding positions receive nothing: they are not inputs.


@triton.jit
def _avg_extent(o, size, K: tl.constexpr, S: tl.constexpr, P: tl.constexpr,
                COUNT_INCLUDE_PAD: tl.constexpr):
    """Along one dimension: how many positions of window o count toward avg_pool2d's divisor."""
    lo = o * S - P
    hi = tl.minimum(lo + K, size + P)  # a ceil_mode window is clipped at the padded edge
    if not COUNT_INCLUDE_PAD:
        lo = tl.maximum(lo, 0)
        hi = tl.minimum(hi, size)
    return hi - lo


@triton.jit(do_not_specialize=["total"])
def _pool_bwd_dx_kernel(
    dy_ptr,  # upstream gradient [N, C, OH, OW], fp32
    idx_ptr,  # int32 (int64 with return_indices) argmax [N, C, OH, OW] (flat h*W+w in the plane); None for avg
    dx_ptr,  # output [N, C, H, W], fp32
    total,  # N*C*H*W
    H, W, OH, OW,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    IS_MAX: tl.constexpr,
    COUNT_INCLUDE_PAD: tl.constexpr,
    DIVISOR: tl.constexpr,  # divisor_override, 0 when none
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    pw = offs % W
    ph = (offs // W) % H
    plane = (offs // (H * W)) * (OH * OW)
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(KH):
        th = ph + PH - i * DH  # = oh * SH when window oh covers ph at tap i
        oh = tl.maximum(th, 0) // SH  # clamped: // of a negative differs between C and Python
        ok_h = (th >= 0) & (oh * SH == th) & (oh < OH)
        if not IS_MAX:
            ext_h = _avg_extent(oh, H, KH, SH, PH, COUNT_INCLUDE_PAD)
        for j in range(KW):
            tw = pw + PW - j * DW
            ow = tl.maximum(tw, 0) // SW
            ok = live & ok_h & (tw >= 0) & (ow * SW == tw) & (ow < OW)
            g = tl.load(dy_ptr + plane + oh * OW + ow, mask=ok, other=0.0).to(tl.float32)
            if IS_MAX:
                arg = tl.load(idx_ptr + plane + oh * OW + ow, mask=ok, other=-1)
                # where, not multiply: a non-finite dy of a window whose max is elsewhere must not leak
                acc += tl.where(arg == ph * W + pw, g, 0.0)
            else:
                if DIVISOR != 0:
                    acc += g / DIVISOR
                else:
                    ext_w = _avg_extent(ow, W, KW, SW, PW, COUNT_INCLUDE_PAD)
                    # masked lanes load g = 0 and may have a zero extent: keep 0/0 out of acc
                    acc += g / tl.maximum(ext_h * ext_w, 1).to(tl.float32)
    tl.store(dx_ptr + offs, acc, mask=live)


@triton.jit(do_not_specialize=["total"])
def _adaptive_pool_bwd_dx_kernel(
    dy_ptr,  # upstream gradient [N, C, OH, OW], fp32
    idx_ptr,  # int32 (int64 with return_indices) argmax [N, C, OH, OW] (flat h*W+w in the plane); None for avg
    dx_ptr,  # output [N, C, H, W], fp32
    total,  # N*C*H*W
    H, W, OH, OW,
    MH: tl.constexpr, MW: tl.constexpr,  # most windows covering one input row / column
    IS_MAX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    pw = offs % W
    ph = (offs // W) % H
    plane = (offs // (H * W)) * (OH * OW)
    oh0 = (ph * OH) // H
    oh1 = ((ph + 1) * OH + H - 1) // H
    ow0 = (pw * OW) // W
    ow1 = ((pw + 1) * OW + W - 1) // W
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(MH):
        oh = oh0 + i
        ok_h = oh < oh1
        ext_h = ((oh + 1) * H + OH - 1) // OH - (oh * H) // OH
        for j in range(MW):
            ow = ow0 + j
            ok = live & ok_h & (ow < ow1)
            g = tl.load(dy_ptr + plane + oh * OW + ow, mask=ok, other=0.0).to(tl.float32)
            if IS_MAX:
                arg = tl.load(idx_ptr + plane + oh * OW + ow, mask=ok, other=-1)
                acc += tl.where(arg == ph * W + pw, g, 0.0)
            else:
                ext_w = ((ow + 1) * W + OW - 1) // OW - (ow * W) // OW
                acc += g / (ext_h * ext_w).to(tl.float32)
    tl.store(dx_ptr + offs, acc, mask=live)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _check_grads(op: str, dy: torch.Tensor, idx: torch.Tensor | None, kind: str,
                 x_shape: tuple[int, ...], out_hw: tuple[int, int]) -> None:
    if kind not in ("max", "avg"):
        raise ValueError(f"{op}: kind must be 'max' or 'avg', got {kind!r}")
    if len(x_shape) != 4:
        raise ValueError(f"{op}: x_shape must be [N, C, H, W], got {tuple(x_shape)}")
    want = (x_shape[0], x_shape[1], *out_hw)
    if tuple(dy.shape) != want:
        raise ValueError(f"{op}: dy has shape {tuple(dy.shape)}, expected {want} for x {tuple(x_shape)}")
    if dy.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not dy.is_contiguous():
        raise ValueError(f"{op}: dy must be contiguous float32, float16 or bfloat16, got {dy.dtype}")
    if kind == "max":
        if idx is None or tuple(idx.shape) != want or idx.dtype not in (torch.int32, torch.int64) \
                or not idx.is_contiguous():
            raise ValueError(f"{op}: max pool needs the forward's contiguous int32 (or int64) idx of shape {want}")


def pool2d_backward(dy: torch.Tensor, idx: torch.Tensor | None, *, kind: str,
                    x_shape: tuple[int, int, int, int], kernel: tuple[int, int],
                    stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                    ceil_mode: bool, count_include_pad: bool,
                    divisor_override: int | None) -> torch.Tensor:
    """dx of F.max_pool2d / F.avg_pool2d, freshly allocated, from dy and (max only) the forward's idx.

    Args mirror the forward's PoolSpec; idx is the int32 argmax the forward wrote (None for avg).
    """
    (KH, KW), (SH, SW) = _pair(kernel), _pair(stride)
    (PH, PW), (DH, DW) = _pair(padding), _pair(dilation)
    N, C, H, W = (int(s) for s in x_shape)
    out_hw = (pool_out_size(H, KH, SH, PH, DH, ceil_mode), pool_out_size(W, KW, SW, PW, DW, ceil_mode))
    _check_grads("pool2d_backward", dy, idx, kind, (N, C, H, W), out_hw)
    if kind == "avg" and (DH, DW) != (1, 1):
        raise ValueError(f"pool2d_backward: avg pool has no dilation, got {(DH, DW)}")
    if divisor_override == 0:
        raise ValueError("pool2d_backward: divisor_override must be non-zero")
    dx = torch.empty((N, C, H, W), dtype=dy.dtype, device=dy.device)
    total = dx.numel()
    cfg = configs.elementwise(configs.nominal(total))
    launch(_pool_bwd_dx_kernel, (configs.cdiv(total, cfg["BLOCK"]),),
           dy, idx if kind == "max" else None, dx, total, H, W, *out_hw,
           KH=KH, KW=KW, SH=SH, SW=SW, PH=PH, PW=PW, DH=DH, DW=DW,
           IS_MAX=kind == "max", COUNT_INCLUDE_PAD=bool(count_include_pad),
           DIVISOR=int(divisor_override or 0), **cfg)
    return dx


def adaptive_pool2d_backward(dy: torch.Tensor, idx: torch.Tensor | None, *, kind: str,
                             x_shape: tuple[int, int, int, int]) -> torch.Tensor:
    """dx of F.adaptive_max_pool2d / F.adaptive_avg_pool2d, freshly allocated; the output size is dy's."""
    N, C, H, W = (int(s) for s in x_shape)
    if dy.dim() != 4:
        raise ValueError(f"adaptive_pool2d_backward: dy must be [N, C, OH, OW], got {tuple(dy.shape)}")
    OH, OW = int(dy.shape[2]), int(dy.shape[3])
    _check_grads("adaptive_pool2d_backward", dy, idx, kind, (N, C, H, W), (OH, OW))
    dx = torch.empty((N, C, H, W), dtype=dy.dtype, device=dy.device)
    total = dx.numel()
    cfg = configs.elementwise(configs.nominal(total))
    launch(_adaptive_pool_bwd_dx_kernel, (configs.cdiv(total, cfg["BLOCK"]),),
           dy, idx if kind == "max" else None, dx, total, H, W, OH, OW,
           MH=adaptive_window(OH, H), MW=adaptive_window(OW, W), IS_MAX=kind == "max", **cfg)
    return dx



# LP pool (F.lp_pool2d, norm p): with A the avg_pool2d of x^p (no padding, count_include_pad; ceil_mode
# windows clipped), K = KH·KW, torch computes y = (sign(A)·relu(|A|)·K)^(1/p) = S^(1/p), S = K·A. So
#   dS = dy · (1/p) S^(1/p − 1) · [A ≠ 0]   (relu's derivative at 0 is 0, and it masks, as a where)
#   dx_q = p x_q^(p−1) · Σ_{o ∋ q} K dS_o / div(o)
# and since S^(1/p − 1) = y^(1 − p), with g_o = K dy_o y_o^(1−p) [y_o ≠ 0] (the 1/p and p cancel):
#   dx_q = x_q^(p−1) · (avg_pool2d backward of g)_q
# Three launches: g (outputs), the avg pool's gather (above), the product with x^(p−1) (inputs).
@triton.jit
def lp_pow(x, P: tl.constexpr):
    """x ** P as torch computes it for a float exponent: exact products for small integer P (negative x
    allowed), else exp2(P log2 x), NaN for x < 0 as torch; 0 ** P = 0 for P > 0."""
    if P == 0.0:
        return x * 0.0 + 1.0
    elif P == 1.0:
        return x
    elif P == 2.0:
        return x * x
    elif P == 3.0:
        return x * x * x
    elif P == 0.5:
        return tl.sqrt(x)
    else:
        return tl.exp2(P * tl.log2(x))


@triton.jit
def _lp_pool_bwd_scale_kernel(
    dy_ptr,  # [N, C, OH, OW] upstream gradient
    y_ptr,  # [N, C, OH, OW] the forward output
    g_ptr,  # [N, C, OH, OW] K · dy · y^(1−p), 0 where y = 0 (written)
    total,  # N*C*OH*OW
    K,  # KH * KW
    ONE_MINUS_P: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    dy = tl.load(dy_ptr + offs, mask=live, other=0.0)
    y = tl.load(y_ptr + offs, mask=live, other=1.0)
    g = tl.where(y == 0.0, 0.0, dy * K * lp_pow(y, ONE_MINUS_P))
    tl.store(g_ptr + offs, g, mask=live)


@triton.jit
def _lp_pool_bwd_dx_kernel(
    gx_ptr,  # [N, C, H, W] the avg pool's gather of g
    x_ptr,  # [N, C, H, W] the forward input
    dx_ptr,  # [N, C, H, W] gradient of x (written; may be gx)
    total,  # N*C*H*W
    P_MINUS_1: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    gx = tl.load(gx_ptr + offs, mask=live, other=0.0)
    x = tl.load(x_ptr + offs, mask=live, other=1.0)
    tl.store(dx_ptr + offs, gx * lp_pow(x, P_MINUS_1), mask=live)


def lp_pool2d_backward(dy: torch.Tensor, x: torch.Tensor, y: torch.Tensor, *, norm_type: float,
                       kernel: tuple[int, int], stride: tuple[int, int], ceil_mode: bool) -> torch.Tensor:
    """dx of F.lp_pool2d(x, norm_type, kernel, stride, ceil_mode) from dy, its input x and output y (all 4-D,
    contiguous); freshly allocated."""
    (KH, KW), p = _pair(kernel), float(norm_type)
    g = torch.empty_like(y)
    n_out = g.numel()
    cfg = configs.elementwise(n_out)
    launch(_lp_pool_bwd_scale_kernel, (triton.cdiv(n_out, cfg["BLOCK"]),), dy.contiguous(), y, g, n_out,
           float(KH * KW), ONE_MINUS_P=1.0 - p, **cfg)
    dx = pool2d_backward(g, None, kind="avg", x_shape=tuple(x.shape), kernel=(KH, KW), stride=stride,
                         padding=(0, 0), dilation=(1, 1), ceil_mode=ceil_mode, count_include_pad=True,
                         divisor_override=None)
    total = dx.numel()
    cfg = configs.elementwise(total)
    launch(_lp_pool_bwd_dx_kernel, (triton.cdiv(total, cfg["BLOCK"]),), dx, x, dx, total, P_MINUS_1=p - 1.0,
           **cfg)
    return dx
