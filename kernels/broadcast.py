"""Backward of broadcasting: the gradient of an operand that was broadcast to a larger result.

Forward: `add`/`sub`/`mul` read a smaller operand a (shape A, broadcast to the result's shape S under
torch's rules) through a stride-0 index (compiler/templates/pointwise.py `broadcast_index`). Every element
of a is then used by all the result positions that differ from it only in the broadcast dims, so

    da[i] = scale · Σ over the broadcast positions j of i   dy[j] · other[j]

with other = the other factor of a product (read through its own broadcast index), or 1 for add/sub,
and scale = ±alpha. The sum over a value's broadcast positions runs in a fixed order (one program per
block of outputs walks its positions in BLOCK_R steps, then a fixed tree): no atomics, so two backward
passes give bit-identical gradients.

Dims are coalesced on the host (adjacent dims that are all kept or all summed, and contiguous in every
operand, become one), so the kernel sees at most 4 dims: every broadcast of tensors of up to 4 dims, and
most beyond. Sizes are runtime arguments (the batch can change without a recompile).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.launch import launch

MAX_DIMS = 4


@triton.jit
def _unravel(rem, size, keep: tl.constexpr, dy_stride, o_stride, out_stride, off_dy, off_o, off_out):
    """Peel the innermost remaining dim off the flat index `rem` of the kept (or summed) dims."""
    if keep:
        i = rem % size
        rem = rem // size
        off_dy += i * dy_stride
        off_o += i * o_stride
        off_out += i * out_stride
    return rem, off_dy, off_o, off_out


# Every size and stride may follow the batch: none is specialised, so one compiled kernel serves every batch.
@triton.jit(do_not_specialize=["M", "R", "S0", "S1", "S2", "S3", "D0", "D1", "D2", "D3",
                               "O0", "O1", "O2", "O3", "T0", "T1", "T2", "T3"])
def _sum_to_kernel(
    dy_ptr,  # [S] upstream gradient of the broadcast result, contiguous
    o_ptr,  # the other factor, read through strides so (0 where it broadcasts); unused unless HAS_OTHER
    out_ptr,  # [A] gradient of the broadcast operand (written), contiguous
    scale,  # ±alpha, applied once per output after the sum
    M,  # outputs: the product of the kept dims
    R,  # broadcast positions per output: the product of the summed dims
    S0, S1, S2, S3,  # sizes of the (coalesced) result dims, outermost first
    D0, D1, D2, D3,  # dy strides
    O0, O1, O2, O3,  # other's strides (0 on the dims it broadcasts)
    T0, T1, T2, T3,  # out strides (0 on summed dims)
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,  # dim kept (1) or summed (0)
    HAS_OTHER: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    # Offsets of each output's first position: unravel m over the kept dims, innermost first.
    zero = m * 0
    rem, dy_m, o_m, out_m = m, zero, zero, zero
    rem, dy_m, o_m, out_m = _unravel(rem, S3, K3, D3, O3, T3, dy_m, o_m, out_m)
    rem, dy_m, o_m, out_m = _unravel(rem, S2, K2, D2, O2, T2, dy_m, o_m, out_m)
    rem, dy_m, o_m, out_m = _unravel(rem, S1, K1, D1, O1, T1, dy_m, o_m, out_m)
    rem, dy_m, o_m, out_m = _unravel(rem, S0, K0, D0, O0, T0, dy_m, o_m, out_m)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        zr = r * 0
        rem_r, dy_r, o_r, unused = r, zr, zr, zr  # the same, over the summed dims
        rem_r, dy_r, o_r, unused = _unravel(rem_r, S3, 1 - K3, D3, O3, 0, dy_r, o_r, unused)
        rem_r, dy_r, o_r, unused = _unravel(rem_r, S2, 1 - K2, D2, O2, 0, dy_r, o_r, unused)
        rem_r, dy_r, o_r, unused = _unravel(rem_r, S1, 1 - K1, D1, O1, 0, dy_r, o_r, unused)
        rem_r, dy_r, o_r, unused = _unravel(rem_r, S0, 1 - K0, D0, O0, 0, dy_r, o_r, unused)
        mask = (m[:, None] < M) & (r[None, :] < R)
        g = tl.load(dy_ptr + dy_m[:, None] + dy_r[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_OTHER:
            g = g * tl.load(o_ptr + o_m[:, None] + o_r[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += g
    tl.store(out_ptr + out_m, tl.sum(acc, axis=1) * scale, mask=m < M)


def _padded(shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    return (1,) * (rank - len(shape)) + tuple(shape)


def _strides(shape: tuple[int, ...], out: tuple[int, ...]) -> list[int]:
    """Element strides of a contiguous tensor of `shape` read at the positions of `out` (0 where it broadcasts)."""
    st, acc = [], 1
    for s in reversed(shape):
        st.append(acc)
        acc *= s
    st.reverse()
    return [0 if s == 1 and o != 1 else t for s, o, t in zip(shape, out, st)]


def coalesce(out: tuple[int, ...], target: tuple[int, ...], other: tuple[int, ...] | None):
    """The result's dims with size, kept flag, and dy/other/out strides, merged where possible.

    Dims of size 1 are dropped; a dim joins its outer neighbour when both are kept or both summed and
    each operand is contiguous across the pair."""
    rank = len(out)
    tgt = _padded(target, rank)
    strides = [_strides(out, out), _strides(_padded(other, rank), out) if other is not None else [0] * rank,
               _strides(tgt, out)]
    dims: list[list] = []  # [size, keep, dy_stride, o_stride, out_stride]
    for d in range(rank):
        if out[d] == 1:
            continue
        keep = tgt[d] == out[d]
        st = [s[d] for s in strides]
        if dims and dims[-1][1] == keep and all(p == q * out[d] for p, q in zip(dims[-1][2:], st)):
            dims[-1][0] *= out[d]
            dims[-1][2:] = st
        else:
            dims.append([out[d], keep] + st)
    return dims


def sum_to(dy: torch.Tensor, shape: tuple[int, ...], other: torch.Tensor | None = None,
           scale: float = 1.0, batched: bool = True, dtype: torch.dtype | None = None) -> torch.Tensor:
    """scale · (dy · other) summed over the dims where `shape` was broadcast to dy's shape, as a new
    contiguous tensor of `shape` (torch's `sum_to_size`).

    Args:
        dy: contiguous upstream gradient of the broadcast result.
        shape: the broadcast operand's shape (broadcastable to dy's shape).
        other: a contiguous tensor broadcastable to dy's shape that multiplies dy first (a product's other
            factor), or None.
        scale: a number multiplying the sum (sub's -1, alpha).
        batched: dy may follow the batch, so the tiles are picked at the nominal batch (`configs.nominal`);
            False for sums whose sizes never do (split-K parts of a weight gradient).
        dtype: the result's dtype (the sum runs in fp32); dy's by default.
    """
    out_shape = tuple(dy.shape)
    shape = tuple(shape)
    if torch.broadcast_shapes(shape, out_shape) != out_shape or (
            other is not None and torch.broadcast_shapes(tuple(other.shape), out_shape) != out_shape):
        raise ValueError(f"sum_to: shape {list(shape)} (and the other factor "
                         f"{None if other is None else list(other.shape)}) must broadcast to {list(out_shape)}")
    if not dy.is_contiguous() or (other is not None and not other.is_contiguous()):
        raise ValueError("sum_to: dy and other must be contiguous")
    out = torch.empty(shape, dtype=dtype or dy.dtype, device=dy.device)
    dims = coalesce(out_shape, shape, None if other is None else tuple(other.shape))
    if len(dims) > MAX_DIMS:
        raise ValueError(f"sum_to: broadcasting {list(shape)} to {list(out_shape)} needs {len(dims)} dims after "
                         f"merging, more than {MAX_DIMS}")
    dims = [[1, True, 0, 0, 0]] * (MAX_DIMS - len(dims)) + dims
    M = math.prod(d[0] for d in dims if d[1])
    R = math.prod(d[0] for d in dims if not d[1])
    if out.numel() == 0:
        return out
    if dy.numel() == 0:  # nothing was broadcast into: the sum over no positions
        return out.zero_()
    meta = configs.sum_to(configs.nominal(M), configs.nominal(R)) if batched else configs.sum_to(M, R)
    sizes, keep = [d[0] for d in dims], [int(d[1]) for d in dims]
    dys, os_, ts = [d[2] for d in dims], [d[3] for d in dims], [d[4] for d in dims]
    moved = (dy.numel() + (0 if other is None else other.numel())) * dy.element_size() + out.nbytes
    launch(_sum_to_kernel, (configs.cdiv(M, meta["BLOCK_M"]),), dy, dy if other is None else other, out,
           float(scale), M, R, *sizes, *dys, *os_, *ts, K0=keep[0], K1=keep[1], K2=keep[2], K3=keep[3],
           HAS_OTHER=other is not None, nbytes=moved, **meta)  # dy stands in for an absent other
    return out
