"""Backward of the fused linear (+bias) (+activation) stem: dx, dw and db as Triton GEMMs.

Forward (generated from compiler/templates/linear.py): y[M, N] = act(x[M, K] @ w[N, K]ᵀ + b).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.activation import EPILOGUE_ACTS, NPARAMS, _act_grad, saves_input
from fusednn.kernels.broadcast import sum_to
from fusednn.kernels.plan import MeasuredBytes
from fusednn.kernels.precision import _dot_in
from fusednn.launch import launch

ACTS = EPILOGUE_ACTS
PRECISIONS = ("ieee", "tf32")

# VJP.  z = x @ wᵀ + b,  y = act(z),  dy = ∂L/∂y;  z, y, dy are [M, N], x is [M, K], w is [N, K].
#
#   dz[m, n] = dy[m, n] · act'(z[m, n])       elementwise; act' is read from the saved y, not z:
#              relu        y <= 0 ? 0 : 1     (derivative 0 at z = 0: torch's rule)
#              leaky_relu  y > 0 ? 1 : slope  (slope >= 0, so y > 0 exactly when z > 0; z = 0 gets slope)
#              sigmoid     y (1 − y)
#              tanh        1 − y²
#              none        1
#   An activation whose act' needs its input (GELU, SiLU, Mish, Hardswish, ...: activation.saves_input) reads
#   z itself, which the training forward saves in y's place; act' is kernels/activation.py's formula.
#   dx[m, k] = Σ_n dz[m, n] w[n, k]           dx = dz @ w     [M, K]   (reduce over N)
#   dw[n, k] = Σ_m dz[m, n] x[m, k]           dw = dzᵀ @ x    [N, K]   (reduce over M)
#   db[n]    = Σ_m dz[m, n]                   column sums of dz
#
# dz is never stored: each kernel recomputes its tile of it from dy and y in the GEMM prologue, which costs
# a second read of dy and y instead of a write and a read of dz. dw and db share one walk over M. On the
# GPU, when the [N, K] tiles alone are too few to fill it, M is cut into SPLIT fixed slices whose parts a
# second kernel adds in a fixed order (kernels/broadcast.py `sum_to`). Every sum thus runs in a fixed order (no atomics): two backward passes
# give bit-identical gradients.


@triton.jit
def _linear_relu_dz(
    dy_ptr,  # [M, N] upstream gradient
    y_ptr,  # [M, N] forward output y = act(z) (or z: saves_input), same strides as dy; None when ACT == "none"
    offs,  # element offsets of the tile in dy and y
    mask,
    slope,  # leaky_relu negative slope
    ACT: tl.constexpr,
):
    """The GEMM prologue of both backward kernels: a tile of dz = dy * act'(z), act' read from y."""
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT != "none":
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dz = _act_grad(dz, y, slope, ACT)  # the one act' formula (kernels/activation.py)
    return dz


@triton.jit(do_not_specialize=["M"])
def _linear_relu_bwd_dx_kernel(
    dy_ptr,  # [M, N] upstream gradient
    y_ptr,  # [M, N] forward output, or z (saves_input), for act' (None when ACT == "none")
    w_ptr,  # [N, K] weight
    dx_ptr,  # [M, K] out: input gradient
    M, N, K,
    slope,
    stride_dym, stride_dyn,  # of dy and of y
    stride_wn, stride_wk,
    stride_dxm, stride_dxk,
    ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per [BLOCK_M, BLOCK_K] tile of dx; the GEMM reduces over N.
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + offs_n
        mask_mn = (offs_m[:, None] < M) & (cols[None, :] < N)
        dz = _linear_relu_dz(
            dy_ptr, y_ptr, offs_m[:, None] * stride_dym + cols[None, :] * stride_dyn, mask_mn, slope, ACT
        )
        w = tl.load(
            w_ptr + cols[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=(cols[:, None] < N) & (offs_k[None, :] < K), other=0.0,
        )
        acc = tl.dot(_dot_in(dz, dy_ptr.dtype.element_ty), _dot_in(w, dy_ptr.dtype.element_ty), acc, input_precision=PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit
def _linear_relu_dw_step(acc, db, dy_ptr, y_ptr, x_ptr, rows, offs_n, offs_k, M, N, K, slope,
                         stride_dym, stride_dyn, stride_xm, stride_xk,
                         ACT: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr, PRECISION: tl.constexpr,
                         ROW_MASK: tl.constexpr):
    """One BLOCK_M step of the dw/db reduction over the rows `rows` (masked against M only if ROW_MASK)."""
    if ROW_MASK:
        mask_nm = (offs_n[:, None] < N) & (rows[None, :] < M)
        mask_mk = (rows[:, None] < M) & (offs_k[None, :] < K)
    else:
        mask_nm = (offs_n[:, None] < N) & (rows[None, :] >= 0)
        mask_mk = (rows[:, None] >= 0) & (offs_k[None, :] < K)
    # dzᵀ tile [BLOCK_N, BLOCK_M], read transposed straight from dy and y
    dzt = _linear_relu_dz(dy_ptr, y_ptr, rows[None, :] * stride_dym + offs_n[:, None] * stride_dyn, mask_nm, slope,
                          ACT)
    if HAS_DW:
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=mask_mk, other=0.0)
        acc = tl.dot(_dot_in(dzt, dy_ptr.dtype.element_ty), _dot_in(x, dy_ptr.dtype.element_ty), acc, input_precision=PRECISION)
    if HAS_DB:
        db += dzt
    return acc, db


# M follows the batch: not specialised. m_per_split stays specialised: a multiple of BLOCK_M >= 16 at every
# batch, so it compiles the same way at every batch.
@triton.jit(do_not_specialize=["M"])
def _linear_relu_bwd_dw_kernel(
    dy_ptr,  # [M, N] upstream gradient
    y_ptr,  # [M, N] forward output, or z (saves_input), for act' (None when ACT == "none")
    x_ptr,  # [M, K] forward input
    dw_ptr,  # [SPLIT, N, K] out: per M slice, its part of the weight gradient (None unless HAS_DW)
    db_ptr,  # [SPLIT, N] out: per M slice, its part of the bias gradient (None unless HAS_DB)
    M, N, K,
    m_per_split,  # rows of M per slice, a multiple of BLOCK_M
    slope,
    stride_dym, stride_dyn,  # of dy and of y
    stride_xm, stride_xk,
    stride_part,  # between the parts of consecutive slices, in dw_ptr and db_ptr alike
    ACT: tl.constexpr, HAS_DW: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # One program per [BLOCK_N, BLOCK_K] tile of dw and slice of M; it walks its slice in ascending order.
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    # Whole BLOCK_M blocks of rows first, with no row mask, then the one partial block at the end of M,
    # masked: M follows the batch, so it is not specialised, and a row mask in every step (the compiler no
    # longer knows M % 16) spilled predicates on sm_90 (LeNet unfused, batch 64: 8-byte stack).
    m_lo = pid_s * m_per_split
    m_hi = m_lo + m_per_split  # slices end on BLOCK_M boundaries
    m_full = (M // BLOCK_M) * BLOCK_M
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    # db sums the dzᵀ tiles elementwise and reduces across M once, after the loop: a tl.sum per step
    # costs a cross-thread reduction each time, and under triton 3.9 it left values spilled across the
    # loop (sm_90, LeNet fc1 at batch 64: 8-byte stack, 5 LDL/STL; now none).
    db = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for m0 in range(m_lo, tl.minimum(m_hi, m_full), BLOCK_M):
        acc, db = _linear_relu_dw_step(acc, db, dy_ptr, y_ptr, x_ptr, m0 + offs_m, offs_n, offs_k, M, N, K, slope,
                                       stride_dym, stride_dyn, stride_xm, stride_xk,
                                       ACT, HAS_DW, HAS_DB, PRECISION, False)
    if (m_full >= m_lo) & (m_full < m_hi) & (m_full < M):
        acc, db = _linear_relu_dw_step(acc, db, dy_ptr, y_ptr, x_ptr, m_full + offs_m, offs_n, offs_k, M, N, K,
                                       slope, stride_dym, stride_dyn, stride_xm, stride_xk,
                                       ACT, HAS_DW, HAS_DB, PRECISION, True)
    if HAS_DW:
        dw_ptrs = dw_ptr + pid_s * stride_part + offs_n[:, None] * K + offs_k[None, :]
        tl.store(dw_ptrs, acc, mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))
    if HAS_DB:
        if pid_k == 0:  # every K-tile program of this (pid_n, pid_s) holds the same sums; one writes them
            tl.store(db_ptr + pid_s * stride_part + offs_n, tl.sum(db, axis=1), mask=offs_n < N)


@dataclass
class _Plan(MeasuredBytes):
    """Everything shape-dependent about one backward call, computed once per shapes and batch, and the
    bytes each launch moves, measured on its first call (then its arguments' shapes are the plan's)."""

    M: int
    N: int
    K: int
    slope: float
    dx_grid: tuple
    dx_strides: tuple
    dx_meta: dict
    split: int
    m_per_split: int
    n_dw: int
    length: int
    dw_grid: tuple
    dw_strides: tuple
    dw_meta: dict
    nbytes: dict = field(default_factory=dict)


@configs.memo
def _backward_plan(dy_shape: tuple, x_shape: tuple, w_shape: tuple, y_shape: tuple | None, dy_stride: tuple,
                   x_stride: tuple, w_stride: tuple, y_stride: tuple | None, act: str, act_param: float,
                   precision: str, needs_dx: bool, needs_dw: bool, needs_db: bool, dtypes: tuple = ()) -> _Plan:
    """dtypes: of dy, x and w; not read, but the bytes each launch moves depend on them."""
    if act not in ACTS and not (saves_input(act) and not NPARAMS.get(act)):
        raise ValueError(f"linear_relu_backward: act must be one of {ACTS} or a parameter-free activation whose "
                         f"act' needs its input, got {act!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"linear_relu_backward: precision must be one of {PRECISIONS}, got {precision!r}")
    if act == "leaky_relu" and not act_param >= 0.0:
        raise ValueError(f"linear_relu_backward: leaky_relu needs negative_slope >= 0, got {act_param}")
    M, K = x_shape
    N = w_shape[0]
    if act != "none" and y_shape is None:
        raise ValueError(f"linear_relu_backward: act={act!r} needs the forward output y")
    if not (dy_shape == (M, N) and w_shape == (N, K) and (y_shape is None or y_shape == (M, N))):
        raise ValueError(f"linear_relu_backward: shapes dy {dy_shape}, x {x_shape}, w {w_shape}, y {y_shape} do not "
                         "fit y[M, N] = act(x[M, K] @ w[N, K].T)")
    if y_stride is not None and y_stride != dy_stride:
        raise ValueError("linear_relu_backward: y and dy must have the same strides (both contiguous)")
    slope = float(act_param) if act == "leaky_relu" else 0.0
    cfg = configs.gemm(configs.nominal(M), K, N)  # dx[M, K] = dz[M, N] @ w[N, K]
    dx_grid = (configs.cdiv(M, cfg["BLOCK_M"]), configs.cdiv(K, cfg["BLOCK_N"]))
    dx_meta = dict(ACT=act, BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_N"], BLOCK_N=cfg["BLOCK_K"],
                   PRECISION=precision, num_warps=cfg["num_warps"])
    cfg = configs.gemm(N, K, configs.nominal(M))  # dw[N, K] = dzᵀ[N, M] @ x[M, K]
    bn, bk, bm = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    if torch.float16 in dtypes and configs.target() != "interp":
        # float16 operands at 16 x 64 x 32 spilled on sm_90 (triton 3.9: LeNet fc2 + relu at batch 64, dy
        # [64, 84]: 64 registers and a 56-byte stack); 32-wide K tiles took 62 and none
        bk = min(bk, 32)
    # db alone needs one program per N tile
    tiles = (configs.cdiv(N, bn), configs.cdiv(K, bk) if needs_dw else 1)
    # Split M into slices when the tiles alone leave the GPU idle (configs.split_k; never under the
    # interpreter). Each slice writes its own part; sum_to adds the parts in a fixed order. The slice count
    # is chosen at the nominal batch (it sets the tiles of the parts' sum); the slices cut the actual rows,
    # and a slice past them writes a zero part.
    split = configs.split_k(tiles[0] * tiles[1], configs.cdiv(configs.nominal(M), bm))
    per_split = configs.cdiv(configs.cdiv(M, bm), split)
    n_dw = N * K if needs_dw else 0
    length = n_dw + (N if needs_db else 0)
    dw_meta = dict(ACT=act, HAS_DW=needs_dw, HAS_DB=needs_db, BLOCK_N=bn, BLOCK_K=bk, BLOCK_M=bm,
                   PRECISION=precision, num_warps=cfg["num_warps"])
    dx_strides = (dy_stride[0], dy_stride[1], w_stride[0], w_stride[1], K, 1)  # dx is a fresh [M, K]
    dw_strides = (dy_stride[0], dy_stride[1], x_stride[0], x_stride[1], length)
    return _Plan(M, N, K, slope, dx_grid, dx_strides, dx_meta, split, per_split * bm, n_dw, length,
                 (*tiles, split), dw_strides, dw_meta)


def linear_relu_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor | None,
    *,
    act: str,
    act_param: float,
    needs_dx: bool,
    needs_dw: bool,
    needs_db: bool,
    precision: str = "ieee",
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dw, db) of y = act(x @ w.T + b), freshly allocated; None where not needed.

    dw and db are contiguous views of one fresh buffer.

    Args:
        dy: [M, N] upstream gradient.  x: [M, K] forward input.  w: [N, K] weight.
        y: [M, N] forward output act(z), read for act'; may be None when act == "none"; z itself for an
            activation whose act' needs its input (kernels/activation.saves_input).
        act: "none" | "relu" | "leaky_relu" | "sigmoid" | "tanh", or one whose act' needs its input (gelu,
            silu, ...);  act_param: leaky_relu's slope (>= 0).
        precision: "ieee" (exact fp32 tl.dot) or "tf32".
    """
    if act == "none":
        y = None  # act' = 1: the kernels never read y
    p = _backward_plan(tuple(dy.shape), tuple(x.shape), tuple(w.shape), None if y is None else tuple(y.shape),
                       dy.stride(), x.stride(), w.stride(), None if y is None else y.stride(), act,
                       float(act_param), precision, needs_dx, needs_dw, needs_db, (dy.dtype, x.dtype, w.dtype))
    dx = dw = db = None
    if needs_dx:
        dx = torch.empty((p.M, p.K), device=x.device, dtype=x.dtype)  # dx[M, K] = dz[M, N] @ w[N, K]
        args = (dy, y, w, dx, p.M, p.N, p.K, p.slope, *p.dx_strides)
        launch(_linear_relu_bwd_dx_kernel, p.dx_grid, *args, nbytes=p.moved("dx", args), **p.dx_meta)
    if needs_dw or needs_db:
        n_dw, length, split, N, K = p.n_dw, p.length, p.split, p.N, p.K
        if split == 1:  # the one part is the result itself, in the weight's dtype: dw and db apart
            dw = torch.empty((N, K), device=x.device, dtype=w.dtype) if needs_dw else None
            db = torch.empty((N,), device=x.device, dtype=w.dtype) if needs_db else None
            args = (dy, y, x, dw, db, p.M, p.N, p.K, p.m_per_split, p.slope, *p.dw_strides)
            launch(_linear_relu_bwd_dw_kernel, p.dw_grid, *args, nbytes=p.moved("dw", args), **p.dw_meta)
            return dx, dw, db
        # fp32 partials, [dw | db] per slice, added in a fixed order
        parts = torch.empty((split, length), device=x.device, dtype=torch.float32)
        args = (dy, y, x, parts if needs_dw else None, parts[:, n_dw:] if needs_db else None,
                p.M, p.N, p.K, p.m_per_split, p.slope, *p.dw_strides)
        launch(_linear_relu_bwd_dw_kernel, p.dw_grid, *args, nbytes=p.moved("dw", args), **p.dw_meta)
        out = sum_to(parts, (length,), batched=False, dtype=w.dtype)
        dw = out[:n_dw].view(N, K) if needs_dw else None
        db = out[n_dw:] if needs_db else None
    return dx, dw, db
