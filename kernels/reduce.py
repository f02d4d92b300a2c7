"""Backward of the reductions sum / mean / amax over any set of dims (forward: compiler/templates/reduce.py).

Both directions see x through the same layout (`reduce_layout`): x's dims merged into at most 4 runs that
are all kept or all reduced (kernels/broadcast.py `coalesce`), so an output m owns the R = Π reduced sizes
positions of x that differ from it only in the reduced dims. A program owns BLOCK_M outputs and walks
their R positions in BLOCK_R steps, in a fixed order: no atomics, bit-identical reruns.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.broadcast import MAX_DIMS, _unravel, coalesce
from fusednn.launch import launch

KINDS = ("sum", "mean", "amax")


def reduce_layout(shape: tuple[int, ...], dims: tuple[int, ...]) -> tuple[int, int, list[list]]:
    """(M outputs, R positions per output, 4 merged dims [size, keep, x_stride, y_stride]) of reducing a
    contiguous tensor of `shape` over `dims`; ValueError when the dims alternate more than 4 times."""
    kept = tuple(1 if d in dims else s for d, s in enumerate(shape))
    runs = [[s, k, xs, ys] for s, k, xs, _, ys in coalesce(tuple(shape), kept, None)]
    if len(runs) > MAX_DIMS:
        raise ValueError(f"reducing {list(shape)} over dims {list(dims)} alternates kept and reduced dims "
                         f"{len(runs)} times after merging adjacent ones, more than {MAX_DIMS}")
    runs = [[1, True, 0, 0]] * (MAX_DIMS - len(runs)) + runs
    M = math.prod(r[0] for r in runs if r[1])
    R = math.prod(r[0] for r in runs if not r[1])
    return M, R, runs


def layout_args(runs: list[list]) -> tuple[list[int], dict[str, int]]:
    """The layout as the kernels take it: runtime sizes and strides, constexpr kept flags K0..K3."""
    flat = [r[0] for r in runs] + [r[2] for r in runs] + [r[3] for r in runs]
    return flat, {f"K{i}": int(r[1]) for i, r in enumerate(runs)}


# VJP, per output m and each of its positions j (y[m] = reduce_j x[j]):
#   sum:   dx[j] = dy[m]
#   mean:  dx[j] = dy[m] / R
#   amax:  dx[j] = dy[m] / cnt[m] · [x[j] == y[m]],  cnt[m] = #{j : x[j] == y[m]}
#          torch's rule: tied maxima share the gradient evenly. Written as torch writes it, a NaN max
#          (x == NaN never holds, cnt = 0) gives (dy / 0) · 0 = NaN at every position, as in torch.
@triton.jit
def _reduce_bwd_kernel(
    dy_ptr,  # [M] upstream gradient of the reduced result, contiguous
    x_ptr,  # the forward input, contiguous (read only when AMAX)
    y_ptr,  # [M] the forward result (read only when AMAX)
    dx_ptr,  # gradient of x (written), contiguous, x's shape
    div,  # sum: 1, mean: R
    M,  # outputs
    R,  # reduced positions per output
    S0, S1, S2, S3,  # sizes of the merged dims of x, outermost first
    X0, X1, X2, X3,  # x (and dx) strides
    Y0, Y1, Y2, Y3,  # y (and dy) strides, 0 on reduced dims
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,  # dim kept (1) or reduced (0)
    AMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    zero = m * 0
    rem, x_m, unused, y_m = m, zero, zero, zero
    rem, x_m, unused, y_m = _unravel(rem, S3, K3, X3, 0, Y3, x_m, unused, y_m)
    rem, x_m, unused, y_m = _unravel(rem, S2, K2, X2, 0, Y2, x_m, unused, y_m)
    rem, x_m, unused, y_m = _unravel(rem, S1, K1, X1, 0, Y1, x_m, unused, y_m)
    rem, x_m, unused, y_m = _unravel(rem, S0, K0, X0, 0, Y0, x_m, unused, y_m)
    m_ok = m < M
    g = tl.load(dy_ptr + y_m, mask=m_ok, other=0.0).to(tl.float32)
    if AMAX:
        y = tl.load(y_ptr + y_m, mask=m_ok, other=0.0).to(tl.float32)
        cnt = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            r = r0 + tl.arange(0, BLOCK_R)
            zr = r * 0
            rem_r, x_r, unused_r, unused_y = r, zr, zr, zr
            rem_r, x_r, unused_r, unused_y = _unravel(rem_r, S3, 1 - K3, X3, 0, 0, x_r, unused_r, unused_y)
            rem_r, x_r, unused_r, unused_y = _unravel(rem_r, S2, 1 - K2, X2, 0, 0, x_r, unused_r, unused_y)
            rem_r, x_r, unused_r, unused_y = _unravel(rem_r, S1, 1 - K1, X1, 0, 0, x_r, unused_r, unused_y)
            rem_r, x_r, unused_r, unused_y = _unravel(rem_r, S0, 1 - K0, X0, 0, 0, x_r, unused_r, unused_y)
            mask = m_ok[:, None] & (r[None, :] < R)
            xv = tl.load(x_ptr + x_m[:, None] + x_r[None, :], mask=mask, other=0.0).to(tl.float32)
            cnt += tl.where(mask & (xv == y[:, None]), 1.0, 0.0)
        g = g / tl.where(m_ok, tl.sum(cnt, axis=1), 1.0)  # rows past the end: no 0 / 0
    else:
        g = g / div
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        zr = r * 0
        rem_r, x_r, unused_r, unused_y = r, zr, zr, zr
        rem_r, x_r, unused_r, unused_y = _unravel(rem_r, S3, 1 - K3, X3, 0, 0, x_r, unused_r, unused_y)
        rem_r, x_r, unused_r, unused_y = _unravel(rem_r, S2, 1 - K2, X2, 0, 0, x_r, unused_r, unused_y)
        rem_r, x_r, unused_r, unused_y = _unravel(rem_r, S1, 1 - K1, X1, 0, 0, x_r, unused_r, unused_y)
        rem_r, x_r, unused_r, unused_y = _unravel(rem_r, S0, 1 - K0, X0, 0, 0, x_r, unused_r, unused_y)
        mask = m_ok[:, None] & (r[None, :] < R)
        offs = x_m[:, None] + x_r[None, :]
        if AMAX:
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dx = g[:, None] * tl.where(xv == y[:, None], 1.0, 0.0)
        else:
            dx = g[:, None] + tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        tl.store(dx_ptr + offs, dx, mask=mask)


def reduce_backward(dy: torch.Tensor, x_shape: tuple[int, ...], dims: tuple[int, ...], *, kind: str,
                    x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gradient of `kind` (sum | mean | amax) of a tensor of x_shape over dims, as a new contiguous tensor.

    Args:
        dy: the upstream gradient, shaped like the result (with or without the reduced dims kept).
        dims: the reduced dims, non-negative.
        x, y: the forward input and result; amax only (ties share the gradient).
    """
    if kind not in KINDS:
        raise ValueError(f"reduce_backward: kind must be one of {KINDS}, got {kind!r}")
    if kind == "amax" and (x is None or y is None):
        raise ValueError("reduce_backward: amax needs the forward input x and result y")
    M, R, runs = reduce_layout(tuple(x_shape), tuple(dims))
    if dy.numel() != M:
        raise ValueError(f"reduce_backward: dy has {dy.numel()} elements, the result of reducing "
                         f"{list(x_shape)} over {list(dims)} has {M}")
    dy = dy.contiguous()
    dx = torch.empty(x_shape, dtype=dtype or dy.dtype, device=dy.device)  # dtype: the input's
    amax = kind == "amax"
    xt = x.contiguous() if amax else dy  # dy stands in for the unread x and y
    yt = y.contiguous() if amax else dy
    flat, keep = layout_args(runs)
    meta = configs.sum_to(M, R)
    moved = (dy.numel() + dx.numel() + (xt.numel() + yt.numel() if amax else 0)) * dy.element_size()
    launch(_reduce_bwd_kernel, (triton.cdiv(M, meta["BLOCK_M"]),), dy, xt, yt, dx, float(R if kind == "mean" else 1),
           M, R, *flat, **keep, AMAX=amax, nbytes=moved, **meta)
    return dx
