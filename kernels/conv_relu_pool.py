"""Backward of the conv_relu_pool stem: conv2d (+bias) (+activation) (+non-overlapping pool).

The forward kernel is generated (compiler/templates/conv.py). Its backward is two implicit GEMMs, dx and
dw (db rides along with dw), whose dz operand is made tile by tile by one shared prologue from the pooled
gradient dy, the 1-byte argmax idx and the activation's output: the full-size gradient never touches memory.
Where a training batch norm alone reads the conv's output, that prologue makes the batch norm's dx instead
(`_bn_dz`), so the batch norm's backward is its reduction kernel only; and where dx is computed, the dx
launch's extra programs sum the dw kernel's split-K partials (`_split_sums`). A conv -> batch norm unit's
backward is then three launches: the batch norm's reduction, the conv's dw, the conv's dx.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.activation import _act_grad, saves_input
from fusednn.kernels.batch_norm import BatchNormPending, channel_sums
from fusednn.kernels.plan import MeasuredBytes
from fusednn.kernels.precision import _dot_in
from fusednn.launch import launch

# VJP of  z = conv2d(x, w) + b,  a = act(z),  y = pool(a)   (P = pool_k, per group g of channels):
#
#   z[n,k,oh,ow] = b[k] + sum_{c,r,s} x[n,c, oh*SH - PAD_H + r*DH, ow*SW - PAD_W + s*DW] * w[k,c,r,s]
#                  (x is zero outside [0,H) x [0,W); c runs over the C/groups channels of k's group)
#   max pool: y[n,k,ph,pw] = a[n,k, ph*P + i, pw*P + j] at the window offset idx[n,k,ph,pw] = i*P + j
#   avg pool: y[n,k,ph,pw] = 1/P^2 * sum_{i,j} a[n,k, ph*P + i, pw*P + j]
#
# Given dy:
#   da[n,k,oh,ow] = dy[n,k, oh//P, ow//P] * [idx == (oh%P)*P + ow%P]      (max pool)
#                 = dy[n,k, oh//P, ow//P] / P^2                            (avg pool)
#                 = 0 where oh >= PH*P or ow >= PW*P                       (floor mode dropped them)
#   dz = da * act'(z), act' read from the activation's output o = act(z) (kernels/activation.EPILOGUE_ACTS):
#        relu: o > 0 (0 at z == 0, torch's choice)   leaky_relu: o > 0 ? 1 : slope
#        sigmoid: o (1 - o)                           tanh: 1 - o^2
#     These are monotone non-decreasing, so under max pool o at the argmax is y itself; under avg pool
#     every position needs its own o: the full-size a saved by the forward (save_act).
#     Any other activation without parameters whose act' needs its input (GELU, SiLU, Mish, Hardswish, ...;
#     `saves_input`) reads z itself, saved by the forward in place of a (save_act), with no pool or
#     under an avg pool; act' is kernels/activation.py's formula of the input.
#   db[k]       = sum_{n,oh,ow} dz[n,k,oh,ow]
#   dw[k,c,r,s] = sum_{n,oh,ow} dz[n,k,oh,ow] * x[n,c, oh*SH - PAD_H + r*DH, ow*SW - PAD_W + s*DW]
#               = (dz^T [K, N*OH*OW] @ im2col(x) [N*OH*OW, C/g*R*S]) per group
#   dx[n,c,h,w] = sum_{k,r,s} dz[n,k,oh,ow] * w[k,c,r,s]  where h + PAD_H - r*DH = oh*SH and
#                 w + PAD_W - s*DW = ow*SW for integers oh in [0,OH), ow in [0,OW)
#               = (gather(dz) [N*H*W, K/g*R*S] @ w [K/g*R*S, C/g]) per group: the transposed conv
#
# Determinism: every dw/db element is summed by one program over its rows in a fixed order; split-K (GPU)
# writes per-slice partials that are added in a fixed order, BLOCK_S slices of a block of elements at once,
# then a fixed tree (a few vectorised steps, not SPLIT dependent loads): by extra programs of the dx launch,
# which runs after the dw kernel (`_split_sums`; a depthwise conv's row-slice partials too), or, where no dx
# launch does (the network's first conv), by one `_conv_bwd_sums_kernel` launch for dw and db together.
# No atomics anywhere.


def conv_saves_act(act: str, pool: str) -> bool:
    """Whether a conv's training forward saves a full-size tensor for act' (`save_act`, the backward's `a`):
    act(z) under an avg pool, or z for an activation whose act' needs its input."""
    return act != "none" and (pool == "avg" or saves_input(act))


@triton.jit
def _conv_relu_pool_dz(
    dy_ptr,  # upstream gradient [N, K, PH, PW] (pooled) or [N, K, OH, OW] (no pool)
    idx_ptr,  # uint8 [N, K, PH, PW]: window offset of each max (max pool)
    y_ptr,  # forward output, shaped as dy: act' under max pool or no pool (z itself: `saves_input`)
    a_ptr,  # full-size act(z) [N, K, OH, OW], or z (`saves_input`): act' under avg pool
    slope,  # leaky_relu's negative slope
    n, k, oh, ow,  # conv-output coordinates of the tile (broadcastable integer tensors)
    ok,  # the tile's mask: coordinates inside the conv output
    K: tl.constexpr, OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    ACT: tl.constexpr, POOL: tl.constexpr, POOL_K: tl.constexpr,
    bnx_ptr=None, sc=0.0, mu=0.0, inv=0.0, mdy=0.0, mdyx=0.0,  # a batch norm after the conv (BN; `_bn_dz`)
    BN: tl.constexpr = False, BN_TRAIN: tl.constexpr = False,
):
    """The GEMM prologue shared by dx and dw: dz at conv positions (n, k, oh, ow), zero where masked. With
    BN, dy_ptr holds the batch norm's dy' (at the pooled positions under a pool) and the batch norm's dx
    there takes dy's place."""
    if POOL == "none":
        off = ((n * K + k) * OH + oh) * OW + ow
        if BN:
            dz = _bn_dz(dy_ptr, bnx_ptr, off, ok, sc, mu, inv, mdy, mdyx, BN_TRAIN)
        else:
            dz = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if ACT != "none":
            o = tl.load(y_ptr + off, mask=ok, other=0.0).to(tl.float32)
    else:
        ph = oh // POOL_K
        pw = ow // POOL_K
        inside = ok & (ph < PH) & (pw < PW)
        p_off = ((n * K + k) * PH + ph) * PW + pw
        if BN:
            dz = _bn_dz(dy_ptr, bnx_ptr, p_off, inside, sc, mu, inv, mdy, mdyx, BN_TRAIN)
        else:
            dz = tl.load(dy_ptr + p_off, mask=inside, other=0.0).to(tl.float32)
        if POOL == "max":
            win = tl.load(idx_ptr + p_off, mask=inside, other=0).to(tl.int32)
            hit = inside & (win == (oh - ph * POOL_K) * POOL_K + (ow - pw * POOL_K))
            dz = tl.where(hit, dz, 0.0)
            if ACT != "none":
                o = tl.load(y_ptr + p_off, mask=hit, other=0.0).to(tl.float32)
        else:
            dz = dz / (POOL_K * POOL_K)
            if ACT != "none":
                o = tl.load(a_ptr + ((n * K + k) * OH + oh) * OW + ow, mask=inside, other=0.0).to(tl.float32)
    if ACT != "none":
        dz = _act_grad(dz, o, slope, ACT)  # the one act' formula (kernels/activation.py)
    return dz


# A conv whose (pooled) output only a batch norm reads (conv [-> pool] -> BN [-> act] [+ residual]) takes the
# batch norm's dx as its dz, made in this prologue instead of a launch of its own (kernels/batch_norm.py has
# the VJP): from the pulled-back gradient dy' (the batch norm's reduction kernel wrote it, or the upstream
# gradient itself without an activation), the conv's output x and per-channel coefficients,
#   dz = scale (dy' - Σdy'/M - x̂ Σ(dy' x̂)/M),   x̂ = (x - mean) invstd,   scale = invstd weight
# (eval statistics: dz = scale dy'). The dw kernel runs first: each program adds the reduction's partials
# of its channels in slice order (the same bits in every program), and the programs of column 0, slice 0
# write the coefficients for the dx kernel, and the batch norm's dweight (Σ dy' x̂) and dbias (Σ dy').
@triton.jit
def _bn_coefficients(k, k_ok, mean_ptr, invstd_ptr, w_ptr, pdw_ptr, pdb_ptr, BN_SPLIT, M,
                     K: tl.constexpr, BN_TRAIN: tl.constexpr, BN_HAS_W: tl.constexpr, BLOCK_S: tl.constexpr):
    """Per channel k: (scale, mean, invstd, Σdy'/M, Σ(dy' x̂)/M, Σdy', Σ(dy' x̂)) from [BN_SPLIT, K] partials."""
    mean = tl.load(mean_ptr + k, mask=k_ok, other=0.0)
    invstd = tl.load(invstd_ptr + k, mask=k_ok, other=0.0)
    scale = invstd
    if BN_HAS_W:
        scale = invstd * tl.load(w_ptr + k, mask=k_ok, other=0.0)
    sum_dw, sum_db = channel_sums(pdw_ptr, pdb_ptr, k, k_ok, BN_SPLIT, K, BLOCK_S)
    if BN_TRAIN:
        mean_dy = sum_db / M
        mean_dy_xhat = sum_dw / M
    else:
        mean_dy = tl.zeros_like(sum_db)
        mean_dy_xhat = tl.zeros_like(sum_dw)
    return scale, mean, invstd, mean_dy, mean_dy_xhat, sum_dw, sum_db


@triton.jit
def _bn_dz(dy_ptr, x_ptr, off, ok, scale, mean, invstd, mean_dy, mean_dy_xhat, BN_TRAIN: tl.constexpr):
    """The batch norm's dx at conv positions `off` (coefficients broadcast to the tile), zero where masked."""
    dy = tl.load(dy_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if BN_TRAIN:
        x = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dz = scale * (dy - mean_dy - ((x - mean) * invstd) * mean_dy_xhat)
    else:
        dz = dy * scale
    return tl.where(ok, dz, 0.0)


# N, the batch, is a runtime int (not specialised: batch 1 or a multiple of 16 must not compile anew), so
# one compiled kernel serves every batch size; every other shape is a constexpr.
@triton.jit(do_not_specialize=["N"])
def _conv_relu_pool_bwd_dx_kernel(
    dy_ptr, idx_ptr, y_ptr, a_ptr,  # read through _conv_relu_pool_dz
    w_ptr,  # filters [K, C // GROUPS, R, S]
    dx_ptr,  # out: input gradient [N, C, H, W]
    into_ptr,  # [N, C, H, W] a gradient x already has, added to dx (ACCUMULATE)
    bnx_ptr,  # [N, K, OH, OW] the conv's output, the batch norm's input (BN and BN_TRAIN)
    coef_ptr,  # [5, K] the batch norm's coefficients, written by the dw kernel (BN)
    dw_part_ptr, dw_ptr,  # [SPLIT_W, K * CRS] the dw kernel's partials, summed into [K * CRS] (SUM_DW)
    db_part_ptr, db_ptr,  # [SPLIT_W, K] and [K], the same for db (SUM_DB)
    slope,  # leaky_relu's negative slope
    N,  # batch
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
    K: tl.constexpr, R: tl.constexpr, S: tl.constexpr, GROUPS: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    ACT: tl.constexpr, POOL: tl.constexpr, POOL_K: tl.constexpr, ACCUMULATE: tl.constexpr,
    BN: tl.constexpr, BN_TRAIN: tl.constexpr,  # dz is a batch norm's dx, made here (dy_ptr: its dy')
    SUM_DW: tl.constexpr, SUM_DB: tl.constexpr, SPLIT_W: tl.constexpr,  # the dw kernel's split-K sums, here
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    CG: tl.constexpr = C // GROUPS
    KG: tl.constexpr = K // GROUPS
    KRS: tl.constexpr = KG * R * S
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)
    dx_tiles = tl.cdiv(N * H * W, BLOCK_M)
    if SUM_DW or SUM_DB:
        if pid_m >= dx_tiles:  # programs past dx's rows: the dw kernel's split-K partials, summed (column 0)
            if (pid_n == 0) & (g == 0):
                _split_sums(dw_part_ptr, dw_ptr, db_part_ptr, db_ptr, pid_m - dx_tiles, K * (C // GROUPS) * R * S,
                            K, SUM_DW, SUM_DB, SPLIT_W)
    if pid_m < dx_tiles:
        _conv_bwd_dx_tile(dy_ptr, idx_ptr, y_ptr, a_ptr, w_ptr, dx_ptr, into_ptr, bnx_ptr, coef_ptr, slope, pid_m,
                          pid_n, g, N, C, H, W, K, R, S, GROUPS, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W,
                          OH, OW, PH, PW, ACT, POOL, POOL_K, ACCUMULATE, BN, BN_TRAIN, BLOCK_M, BLOCK_N, BLOCK_K,
                          PRECISION)


# The sums of the dw kernel's split-K partials, by the dx kernel's extra programs (the dw kernel runs first):
# each program adds BLOCK_S slices of BLOCK_E elements at once, in slice order, then a fixed tree; the same
# bits on every run, no launch of their own.
@triton.jit
def _split_sums(dw_part_ptr, dw_ptr, db_part_ptr, db_ptr, j, DW_N: tl.constexpr, DB_N: tl.constexpr,
                SUM_DW: tl.constexpr, SUM_DB: tl.constexpr, SPLIT_W: tl.constexpr):
    BLOCK_E: tl.constexpr = 128
    BLOCK_S: tl.constexpr = 16
    DW_TILES: tl.constexpr = (DW_N + BLOCK_E - 1) // BLOCK_E if SUM_DW else 0
    if SUM_DW:
        if j < DW_TILES:
            _sum_slices(dw_part_ptr, dw_ptr, j, DW_N, SPLIT_W, BLOCK_E, BLOCK_S)
    if SUM_DB:
        if j >= DW_TILES:
            _sum_slices(db_part_ptr, db_ptr, j - DW_TILES, DB_N, SPLIT_W, BLOCK_E, BLOCK_S)


@triton.jit
def _conv_bwd_sums_kernel(dw_part_ptr, dw_ptr, db_part_ptr, db_ptr, DW_N: tl.constexpr, DB_N: tl.constexpr,
                          SUM_DW: tl.constexpr, SUM_DB: tl.constexpr, SPLIT_W: tl.constexpr):
    """The split-K sums of a conv whose dx launch does not make them, dw's and db's in one launch."""
    _split_sums(dw_part_ptr, dw_ptr, db_part_ptr, db_ptr, tl.program_id(0), DW_N, DB_N, SUM_DW, SUM_DB, SPLIT_W)


def _sum_tiles(dw_n: int, db_n: int, needs_dw: bool, needs_db: bool) -> int:
    """Programs `_split_sums` takes: BLOCK_E (128) elements each, dw's then db's."""
    return (configs.cdiv(dw_n, 128) if needs_dw else 0) + (configs.cdiv(db_n, 128) if needs_db else 0)


@triton.jit
def _sum_slices(part_ptr, out_ptr, j, NUMEL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_S: tl.constexpr):
    """out[e] = Σ_s part[s, e] for the j-th block of BLOCK_E elements, slices in order."""
    e = j * BLOCK_E + tl.arange(0, BLOCK_E)
    e_ok = e < NUMEL
    acc = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        sl = s0 + tl.arange(0, BLOCK_S)
        acc += tl.load(part_ptr + sl[:, None] * NUMEL + e[None, :], mask=(sl < SPLIT)[:, None] & e_ok[None, :],
                       other=0.0)
    tl.store(out_ptr + e, tl.sum(acc, axis=0), mask=e_ok)


@triton.jit
def _conv_bwd_dx_tile(dy_ptr, idx_ptr, y_ptr, a_ptr, w_ptr, dx_ptr, into_ptr, bnx_ptr, coef_ptr, slope, pid_m, pid_n,
                      g, N, C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, K: tl.constexpr, R: tl.constexpr,
                      S: tl.constexpr, GROUPS: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
                      PAD_H: tl.constexpr, PAD_W: tl.constexpr, DIL_H: tl.constexpr, DIL_W: tl.constexpr,
                      OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr, ACT: tl.constexpr,
                      POOL: tl.constexpr, POOL_K: tl.constexpr, ACCUMULATE: tl.constexpr, BN: tl.constexpr,
                      BN_TRAIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PRECISION: tl.constexpr):
    # Implicit GEMM of the transposed conv, one group g per program along axis 2:
    #   rows     m = (n, ih, iw)  input positions
    #   columns  j = c            the group's C // GROUPS input channels
    #   reduce   q = (k, r, s)    the group's K // GROUPS * R * S taps; a tap reaches (ih, iw) only from
    #                             the conv position it was applied at, when that position exists
    CG: tl.constexpr = C // GROUPS
    KG: tl.constexpr = K // GROUPS
    KRS: tl.constexpr = KG * R * S

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * H * W
    rows = tl.minimum(offs_m, N * H * W - 1)  # past the end: the last row again, so only the store is masked
    n = rows // (H * W)
    ih = (rows // W) % H
    iw = rows % W
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = offs_j < CG
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, KRS, BLOCK_K):
        q = q0 + tl.arange(0, BLOCK_K)
        q_ok = q < KRS
        k = g * KG + q // (R * S)
        rs = q % (R * S)
        th = ih[:, None] + PAD_H - (rs // S)[None, :] * DIL_H  # == oh * STRIDE_H when the tap hits
        tw = iw[:, None] + PAD_W - (rs % S)[None, :] * DIL_W
        oh = th // STRIDE_H
        ow = tw // STRIDE_W
        hit = (q_ok[None, :] & (th >= 0) & (tw >= 0)
               & (oh * STRIDE_H == th) & (ow * STRIDE_W == tw) & (oh < OH) & (ow < OW))
        if BN:  # the batch norm's coefficients of these taps' channels
            co = coef_ptr + k
            sc = tl.load(co, mask=q_ok, other=0.0)[None, :]
            mu = tl.load(co + K, mask=q_ok, other=0.0)[None, :]
            inv = tl.load(co + 2 * K, mask=q_ok, other=0.0)[None, :]
            mdy = tl.load(co + 3 * K, mask=q_ok, other=0.0)[None, :]
            mdyx = tl.load(co + 4 * K, mask=q_ok, other=0.0)[None, :]
        else:
            sc = 0.0
            mu = 0.0
            inv = 0.0
            mdy = 0.0
            mdyx = 0.0
        dz = _conv_relu_pool_dz(dy_ptr, idx_ptr, y_ptr, a_ptr, slope, n[:, None], k[None, :], oh, ow, hit,
                                K, OH, OW, PH, PW, ACT, POOL, POOL_K, bnx_ptr, sc, mu, inv, mdy, mdyx, BN, BN_TRAIN)
        # w viewed as [K, CG, R * S]: row k, channel c, tap (r, s)
        w_tile = tl.load(w_ptr + (k[:, None] * CG + offs_j[None, :]) * (R * S) + rs[:, None],
                         mask=q_ok[:, None] & j_ok[None, :], other=0.0)
        acc = tl.dot(_dot_in(dz, dy_ptr.dtype.element_ty), _dot_in(w_tile, dy_ptr.dtype.element_ty), acc, input_precision=PRECISION)
    c = g * CG + offs_j
    dx_off = ((n[:, None] * C + c[None, :]) * H + ih[:, None]) * W + iw[:, None]
    if ACCUMULATE:  # x's other uses' gradient, summed here in fp32 and rounded once
        acc += tl.load(into_ptr + dx_off, mask=j_ok[None, :], other=0.0).to(tl.float32)
    tl.store(dx_ptr + dx_off, acc, mask=m_ok[:, None] & j_ok[None, :])


# SLICE stays specialised: a multiple of BLOCK_K >= 16 at every batch, so it always compiles the same way.
# BN_SPLIT (the batch norm's partials per channel) follows the batch: not specialised either.
@triton.jit(do_not_specialize=["N", "BN_SPLIT"])
def _conv_relu_pool_bwd_dw_kernel(
    dy_ptr, idx_ptr, y_ptr, a_ptr,  # read through _conv_relu_pool_dz
    x_ptr,  # input [N, C, H, W]
    dw_ptr,  # out: [SPLIT, K, C // GROUPS * R * S] weight-gradient partials, one per row slice
    db_ptr,  # out: [SPLIT, K] bias-gradient partials
    bnx_ptr,  # [N, K, OH, OW] the conv's output, the batch norm's input (BN)
    coef_ptr,  # out: [5, K] the batch norm's coefficients, for the dx kernel (BN)
    bn_w_ptr, bn_mean_ptr, bn_invstd_ptr,  # [K] the batch norm's weight (BN_HAS_W), saved mean and 1/std
    bn_pdw_ptr, bn_pdb_ptr,  # [BN_SPLIT, K] partial Σ dy' x̂ and Σ dy' of the batch norm's reduction
    bn_dw_ptr, bn_db_ptr,  # out: [K] the batch norm's dweight and dbias (BN_DW, BN_DB)
    slope,  # leaky_relu's negative slope
    N,  # batch
    SLICE,  # rows per slice, a multiple of BLOCK_K (grows with the batch; a slice may be empty)
    BN_SPLIT,  # the batch norm's partials per channel
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
    K: tl.constexpr, R: tl.constexpr, S: tl.constexpr, GROUPS: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    ACT: tl.constexpr, POOL: tl.constexpr, POOL_K: tl.constexpr,
    SPLIT: tl.constexpr,  # row slices
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BN: tl.constexpr, BN_TRAIN: tl.constexpr, BN_HAS_W: tl.constexpr,  # dz is a batch norm's dx, made here
    BN_DW: tl.constexpr, BN_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    # GEMM dz^T @ im2col(x), one (group g, row slice) per program along axis 2:
    #   rows     i = k            the group's K // GROUPS output channels
    #   columns  j = (c, r, s)    the group's C // GROUPS * R * S taps
    #   reduce   m = (n, oh, ow)  conv positions of this slice, in order; db is the row sum of dz, done
    #                             on the same tiles by the programs of column 0
    CG: tl.constexpr = C // GROUPS
    KG: tl.constexpr = K // GROUPS
    CRS: tl.constexpr = CG * R * S
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2) // SPLIT
    part = tl.program_id(2) % SPLIT

    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = offs_i < KG
    k = g * KG + offs_i
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = offs_j < CRS
    c = g * CG + offs_j // (R * S)
    r = (offs_j // S) % R
    s = offs_j % S
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if BN:
        scale, mean, invstd, mean_dy, mean_dy_xhat, sum_dw, sum_db = _bn_coefficients(
            k, i_ok, bn_mean_ptr, bn_invstd_ptr, bn_w_ptr, bn_pdw_ptr, bn_pdb_ptr, BN_SPLIT, N * PH * PW, K,
            BN_TRAIN, BN_HAS_W, 16)
        if (pid_n == 0) & (part == 0):  # one program per channel block writes what the others computed too
            tl.store(coef_ptr + k, scale, mask=i_ok)
            tl.store(coef_ptr + K + k, mean, mask=i_ok)
            tl.store(coef_ptr + 2 * K + k, invstd, mask=i_ok)
            tl.store(coef_ptr + 3 * K + k, mean_dy, mask=i_ok)
            tl.store(coef_ptr + 4 * K + k, mean_dy_xhat, mask=i_ok)
            if BN_DW:
                tl.store(bn_dw_ptr + k, sum_dw, mask=i_ok)
            if BN_DB:
                tl.store(bn_db_ptr + k, sum_db, mask=i_ok)
    for m0 in range(part * SLICE, (part + 1) * SLICE, BLOCK_K):
        m = m0 + tl.arange(0, BLOCK_K)
        m_ok = m < N * OH * OW
        n = m // (OH * OW)
        oh = (m // OW) % OH
        ow = m % OW
        if BN:
            dz = _conv_relu_pool_dz(dy_ptr, idx_ptr, y_ptr, a_ptr, slope, n[None, :], k[:, None], oh[None, :],
                                    ow[None, :], i_ok[:, None] & m_ok[None, :], K, OH, OW, PH, PW, ACT, POOL, POOL_K,
                                    bnx_ptr, scale[:, None], mean[:, None], invstd[:, None], mean_dy[:, None],
                                    mean_dy_xhat[:, None], BN, BN_TRAIN)
        else:
            dz = _conv_relu_pool_dz(dy_ptr, idx_ptr, y_ptr, a_ptr, slope, n[None, :], k[:, None], oh[None, :],
                                    ow[None, :], i_ok[:, None] & m_ok[None, :], K, OH, OW, PH, PW, ACT, POOL, POOL_K)
        if COMPUTE_DB:
            db_acc += tl.sum(dz, axis=1)
        if COMPUTE_DW:
            ih = oh[:, None] * STRIDE_H - PAD_H + r[None, :] * DIL_H
            iw = ow[:, None] * STRIDE_W - PAD_W + s[None, :] * DIL_W
            x_ok = m_ok[:, None] & j_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tile = tl.load(x_ptr + ((n[:, None] * C + c[None, :]) * H + ih) * W + iw, mask=x_ok, other=0.0)
            acc = tl.dot(_dot_in(dz, dy_ptr.dtype.element_ty), _dot_in(x_tile, dy_ptr.dtype.element_ty), acc, input_precision=PRECISION)
    if COMPUTE_DW:
        dw_off = (part * K + k[:, None]) * CRS + offs_j[None, :]
        tl.store(dw_ptr + dw_off, acc, mask=i_ok[:, None] & j_ok[None, :])
    if COMPUTE_DB:
        if pid_n == 0:  # every column of programs has the same db; the first one writes it
            tl.store(db_ptr + part * K + k, db_acc, mask=i_ok)


# Depthwise (GROUPS == C == K, each output channel filters its own input channel): the same VJP with one
# channel per group, run directly, not as GEMMs of one-column groups padded to 16 (configs.depthwise):
#   dx[n,c,h,w] = sum_{r,s} dz[n,c,oh,ow] * w[c,0,r,s]      (the conv positions the taps reach, as above)
#   dw[c,0,r,s] = sum_{n,oh,ow} dz[n,c,oh,ow] * x[n,c, oh*SH - PAD_H + r*DH, ow*SW - PAD_W + s*DW]
# Programs own BLOCK_N channels; dw's rows are cut into SPLIT slices whose partials are summed as above.
@triton.jit(do_not_specialize=["N"])
def _depthwise_bwd_dx_kernel(
    dy_ptr, idx_ptr, y_ptr, a_ptr,  # read through _conv_relu_pool_dz
    w_ptr,  # filters [C, 1, R, S]
    dx_ptr,  # out: input gradient [N, C, H, W]
    into_ptr,  # [N, C, H, W] a gradient x already has, added to dx (ACCUMULATE)
    dw_part_ptr, dw_ptr,  # [SPLIT_W, C * R * S] the dw kernel's partials, summed into [C * R * S] (SUM_DW)
    db_part_ptr, db_ptr,  # [SPLIT_W, C] and [C], the same for db (SUM_DB)
    slope,  # leaky_relu's negative slope
    N,  # batch
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
    K: tl.constexpr, R: tl.constexpr, S: tl.constexpr, GROUPS: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    ACT: tl.constexpr, POOL: tl.constexpr, POOL_K: tl.constexpr, ACCUMULATE: tl.constexpr,
    SUM_DW: tl.constexpr, SUM_DB: tl.constexpr, SPLIT_W: tl.constexpr,  # the dw kernel's split sums, here
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    dx_tiles = tl.cdiv(N * H * W, BLOCK_M)
    pid_m = tl.program_id(0)
    if SUM_DW or SUM_DB:
        if pid_m >= dx_tiles:  # programs past dx's rows: the dw kernel's row-slice partials, summed (column 0)
            if tl.program_id(1) == 0:
                _split_sums(dw_part_ptr, dw_ptr, db_part_ptr, db_ptr, pid_m - dx_tiles, C * R * S, C, SUM_DW,
                            SUM_DB, SPLIT_W)
    if pid_m < dx_tiles:
        _depthwise_bwd_dx_tile(dy_ptr, idx_ptr, y_ptr, a_ptr, w_ptr, dx_ptr, into_ptr, slope, pid_m, N, C, H, W, K,
                               R, S, STRIDE_H, STRIDE_W, PAD_H, PAD_W, DIL_H, DIL_W, OH, OW, PH, PW, ACT, POOL,
                               POOL_K, ACCUMULATE, BLOCK_M, BLOCK_N)


@triton.jit
def _depthwise_bwd_dx_tile(
    dy_ptr, idx_ptr, y_ptr, a_ptr, w_ptr, dx_ptr, into_ptr, slope, pid_m, N,
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr, K: tl.constexpr, R: tl.constexpr, S: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    ACT: tl.constexpr, POOL: tl.constexpr, POOL_K: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One [BLOCK_M input positions, BLOCK_N channels] tile of a depthwise conv's dx."""
    #   rows m = (n, ih, iw) input positions, columns c = channels; R * S multiply-adds per element
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * H * W
    rows = tl.minimum(offs_m, N * H * W - 1)  # past the end: the last row again, so only the store is masked
    n = rows // (H * W)
    ih = (rows // W) % H
    iw = rows % W
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for rs in range(R * S):
        th = ih + PAD_H - (rs // S) * DIL_H  # == oh * STRIDE_H when the tap hits
        tw = iw + PAD_W - (rs % S) * DIL_W
        oh = th // STRIDE_H
        ow = tw // STRIDE_W
        hit = (th >= 0) & (tw >= 0) & (oh * STRIDE_H == th) & (ow * STRIDE_W == tw) & (oh < OH) & (ow < OW)
        dz = _conv_relu_pool_dz(dy_ptr, idx_ptr, y_ptr, a_ptr, slope, n[:, None], c[None, :], oh[:, None],
                                ow[:, None], hit[:, None] & c_ok[None, :], K, OH, OW, PH, PW, ACT, POOL, POOL_K)
        w_tap = tl.load(w_ptr + c * (R * S) + rs, mask=c_ok, other=0.0)
        # operands rounded as the GEMM kernels' tl.dot takes them, products and sums in fp32
        acc += (_dot_in(dz, dy_ptr.dtype.element_ty).to(tl.float32)
                * _dot_in(w_tap, dy_ptr.dtype.element_ty).to(tl.float32)[None, :])
    dx_off = ((n[:, None] * C + c[None, :]) * H + ih[:, None]) * W + iw[:, None]
    if ACCUMULATE:  # x's other uses' gradient, summed here in fp32 and rounded once
        acc += tl.load(into_ptr + dx_off, mask=c_ok[None, :], other=0.0).to(tl.float32)
    tl.store(dx_ptr + dx_off, acc, mask=m_ok[:, None] & c_ok[None, :])


@triton.jit(do_not_specialize=["N"])
def _depthwise_bwd_dw_kernel(
    dy_ptr, idx_ptr, y_ptr, a_ptr,  # read through _conv_relu_pool_dz
    x_ptr,  # input [N, C, H, W]
    dw_ptr,  # out: [SPLIT, C, R * S] weight-gradient partials, one per row slice
    db_ptr,  # out: [SPLIT, C] bias-gradient partials
    slope,  # leaky_relu's negative slope
    N,  # batch
    SLICE,  # rows per slice, a multiple of BLOCK_M (a slice may be empty)
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,
    K: tl.constexpr, R: tl.constexpr, S: tl.constexpr, GROUPS: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    OH: tl.constexpr, OW: tl.constexpr, PH: tl.constexpr, PW: tl.constexpr,
    ACT: tl.constexpr, POOL: tl.constexpr, POOL_K: tl.constexpr,
    SPLIT: tl.constexpr,  # row slices
    COMPUTE_DW: tl.constexpr, COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    #   one (row slice, channel block) per program; per tap, the slice's conv positions in order
    part = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = c < C
    if COMPUTE_DW:
        for rs in range(R * S):
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for m0 in range(part * SLICE, (part + 1) * SLICE, BLOCK_M):
                m = m0 + tl.arange(0, BLOCK_M)
                m_ok = m < N * OH * OW
                n = m // (OH * OW)
                oh = (m // OW) % OH
                ow = m % OW
                dz = _conv_relu_pool_dz(dy_ptr, idx_ptr, y_ptr, a_ptr, slope, n[:, None], c[None, :], oh[:, None],
                                        ow[:, None], m_ok[:, None] & c_ok[None, :], K, OH, OW, PH, PW, ACT, POOL, POOL_K)
                ih = oh * STRIDE_H - PAD_H + (rs // S) * DIL_H
                iw = ow * STRIDE_W - PAD_W + (rs % S) * DIL_W
                x_ok = (m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None] & c_ok[None, :]
                x_tile = tl.load(x_ptr + ((n[:, None] * C + c[None, :]) * H + ih[:, None]) * W + iw[:, None],
                                 mask=x_ok, other=0.0)
                acc += (_dot_in(dz, dy_ptr.dtype.element_ty).to(tl.float32)
                        * _dot_in(x_tile, dy_ptr.dtype.element_ty).to(tl.float32))
            tl.store(dw_ptr + (part * C + c) * (R * S) + rs, tl.sum(acc, axis=0), mask=c_ok)
    if COMPUTE_DB:
        db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for m0 in range(part * SLICE, (part + 1) * SLICE, BLOCK_M):
            m = m0 + tl.arange(0, BLOCK_M)
            m_ok = m < N * OH * OW
            db_acc += _conv_relu_pool_dz(dy_ptr, idx_ptr, y_ptr, a_ptr, slope, (m // (OH * OW))[:, None], c[None, :],
                                         ((m // OW) % OH)[:, None], (m % OW)[:, None], m_ok[:, None] & c_ok[None, :],
                                         K, OH, OW, PH, PW, ACT, POOL, POOL_K)
        tl.store(db_ptr + part * C + c, tl.sum(db_acc, axis=0), mask=c_ok)


def conv_out_hw(hw: tuple[int, int], rs: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]) -> tuple[int, int]:
    """A convolution's output (OH, OW), as torch computes it (the template and this file share it)."""
    return tuple((hw[i] + 2 * padding[i] - dilation[i] * (rs[i] - 1) - 1) // stride[i] + 1 for i in range(2))


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass
class _Plan(MeasuredBytes):
    """Everything shape-dependent about one backward call, computed once per shapes and batch (the launch
    configs, grids, split-K slices) and the bytes each launch moves, measured on its first call."""

    N: int
    crs: int
    split: int
    slice_rows: int
    dx_grid: tuple
    dx_meta: dict
    dw_grid: tuple
    dw_meta: dict
    dx_kernel: Any = _conv_relu_pool_bwd_dx_kernel  # the depthwise kernels where groups == C == K
    dw_kernel: Any = _conv_relu_pool_bwd_dw_kernel
    nbytes: dict = field(default_factory=dict)


@configs.memo
def _backward_plan(dy_shape: tuple, x_shape: tuple, w_shape: tuple, stride: tuple, padding: tuple, dilation: tuple,
                   groups: int, act: str, pool: str, pool_k: int, out_hw: tuple, precision: str, no_y: bool,
                   no_idx: bool, no_a: bool, needs_dx: bool, needs_dw: bool, needs_db: bool,
                   dtypes: tuple = ()) -> _Plan:
    """dtypes: of dy, x and w; not read, but the bytes each launch moves depend on them."""
    (sh, sw), (pad_h, pad_w), (dil_h, dil_w) = stride, padding, dilation
    N, C, H, W = x_shape
    K, CG, R, S = w_shape
    OH, OW = out_hw
    P = pool_k if pool != "none" else 1
    PH, PW = OH // P, OW // P
    conv_hw = conv_out_hw((H, W), (R, S), (sh, sw), (pad_h, pad_w), (dil_h, dil_w))
    if (OH, OW) != conv_hw:
        raise ValueError(f"conv_relu_pool_backward: out_hw {out_hw} is not the conv output {conv_hw} of "
                         f"x {x_shape}, w {w_shape}")
    if dy_shape != (N, K, PH, PW) or CG * groups != C:
        raise ValueError(f"conv_relu_pool_backward: dy {dy_shape} / w {w_shape} do not fit "
                         f"x {x_shape}, groups={groups}, pool {pool} {P}")
    if pool == "max" and no_idx:
        raise ValueError("conv_relu_pool_backward: max pool needs idx, the forward's argmax offsets")
    if act != "none" and (no_a if pool == "avg" else no_y):  # where act' is read from
        raise ValueError(f"conv_relu_pool_backward: act {act} with pool {pool} needs "
                         f"{'a (forward with save_act)' if pool == 'avg' else 'y'}")
    meta = dict(C=C, H=H, W=W, K=K, R=R, S=S, GROUPS=groups, STRIDE_H=sh, STRIDE_W=sw,
                PAD_H=pad_h, PAD_W=pad_w, DIL_H=dil_h, DIL_W=dil_w, OH=OH, OW=OW, PH=PH, PW=PW,
                ACT=act, POOL=pool, POOL_K=P, PRECISION=precision)
    KG = K // groups
    rows, crs = N * OH * OW, CG * R * S
    if 1 < groups == C == K:  # depthwise: the direct kernels
        cfg = configs.depthwise(configs.nominal(N * H * W), C)
        dx_grid = (configs.cdiv(N * H * W, cfg["BLOCK_M"]), configs.cdiv(C, cfg["BLOCK_N"]))
        cfg_w = configs.depthwise(configs.nominal(rows), C)
        c_blocks = configs.cdiv(C, cfg_w["BLOCK_N"])
        split = configs.split_k(c_blocks, configs.cdiv(configs.nominal(rows), cfg_w["BLOCK_M"]))
        slice_rows = configs.cdiv(configs.cdiv(rows, cfg_w["BLOCK_M"]), split) * cfg_w["BLOCK_M"]
        dw_meta = {**meta, "SPLIT": split, "COMPUTE_DW": needs_dw, "COMPUTE_DB": needs_db, **cfg_w}
        dx_meta = {**meta, "SUM_DW": False, "SUM_DB": False, "SPLIT_W": 1, **cfg}
        return _Plan(N, crs, split, slice_rows, dx_grid, dx_meta, (split, c_blocks), dw_meta,
                     _depthwise_bwd_dx_kernel, _depthwise_bwd_dw_kernel)
    # dw of a plain 1x1 conv (stride 1, no padding, nothing fused) gathers nothing: GEMM tiles, not gather
    # tiles. Its dx keeps gather tiles: at 32 x 64 x 32 its ieee kernel took an 8-byte stack on sm_90
    # (triton 3.9, MobileNetV2Tiny's project convs at batch 64).
    gather = not (R == S == 1 and (sh, sw) == (1, 1) and (pad_h, pad_w) == (0, 0) and act == pool == "none")
    cfg = configs.gemm(configs.nominal(N * H * W), CG, KG * R * S, gather=True)
    dx_grid = (configs.cdiv(N * H * W, cfg["BLOCK_M"]), configs.cdiv(CG, cfg["BLOCK_N"]), groups)
    dx_meta = {**meta, "BN": False, "BN_TRAIN": False, "SUM_DW": False, "SUM_DB": False, "SPLIT_W": 1, **cfg}
    cfg = configs.gemm(KG, crs, configs.nominal(rows), gather=gather, heavy_prologue=saves_input(act))
    tiles_m, tiles_n = configs.cdiv(KG, cfg["BLOCK_M"]), configs.cdiv(crs, cfg["BLOCK_N"]) if needs_dw else 1
    # SPLIT is a constexpr: chosen at the nominal batch; the slices cut the actual rows (an empty slice
    # writes zero partials).
    split = configs.split_k(tiles_m * tiles_n * groups, configs.cdiv(configs.nominal(rows), cfg["BLOCK_K"]))
    slice_rows = configs.cdiv(configs.cdiv(rows, cfg["BLOCK_K"]), split) * cfg["BLOCK_K"]
    dw_meta = {**meta, "SPLIT": split, "COMPUTE_DW": needs_dw, "COMPUTE_DB": needs_db, "BN": False, "BN_TRAIN": False,
               "BN_HAS_W": False, "BN_DW": False, "BN_DB": False, **cfg}
    return _Plan(N, crs, split, slice_rows, dx_grid, dx_meta, (tiles_m, tiles_n, groups * split), dw_meta)


def conv_relu_pool_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    y: torch.Tensor | None,
    idx: torch.Tensor | None,
    a: torch.Tensor | None,
    *,
    stride: int | tuple[int, int],
    padding: int | tuple[int, int],
    dilation: int | tuple[int, int],
    groups: int,
    act: str,
    act_param: float,
    pool: str,
    pool_k: int,
    out_hw: tuple[int, int],
    needs_dx: bool,
    needs_dw: bool,
    needs_db: bool,
    precision: str = "ieee",
    dx_into: torch.Tensor | None = None,
    bn: BatchNormPending | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dw, db) of y = pool(act(conv2d(x, w) + b)) given dy; freshly allocated, None where not needed.

    Args:
        dy: gradient of the forward output: pooled [N, K, PH, PW], or [N, K, OH, OW] when pool == "none".
        x, w: the forward's input [N, C, H, W] and filters [K, C // groups, R, S].
        y: the forward output (act' under max pool or no pool; may be None when act == "none"); for an
            activation whose act' needs its input (`saves_input`), the conv's result z saved instead.
        idx: uint8 window offsets of the maxima [N, K, PH, PW] (max pool only, else None).
        a: the saved full-size act(z) [N, K, OH, OW] (avg pool with an activation only, else None); z for
            an activation whose act' needs its input.
        stride, padding, dilation, groups: the conv's; act, act_param, pool, pool_k: the fused epilogue's.
        out_hw: the conv output (OH, OW).
        needs_dx, needs_dw, needs_db: which gradients to compute.
        precision: "ieee" or "tf32", for tl.dot.
        dx_into: a gradient x already has (its other uses'), shaped and typed like x, contiguous: dx is
            returned with it added (in the dx kernel, no launch of its own); it is only read.
        bn: the batch norm that alone reads this conv's (pooled) output (no act here), its dx not yet made
            (kernels/batch_norm.batch_norm_pending): dy is then its pulled-back dy', dz its dx, made in the
            GEMMs' prologue, and its dweight and dbias are written into `bn` by the dw kernel. Needs dw, and
            not a depthwise conv (`fuses_batch_norm`).
    """
    plan = _backward_plan(tuple(dy.shape), tuple(x.shape), tuple(w.shape), _pair(stride), _pair(padding),
                          _pair(dilation), groups, act, pool, pool_k, tuple(out_hw), precision,
                          y is None, idx is None, a is None, needs_dx, needs_dw, needs_db, (dy.dtype, x.dtype, w.dtype))
    # Only the buffers this variant reads are passed; the others are None, which the constexpr branches
    # never touch (a stand-in tensor there would be counted as bytes moved; see launch.tensor_bytes).
    bufs = (dy, idx if pool == "max" else None, y if act != "none" and pool != "avg" else None,
            a if act != "none" and pool == "avg" else None)
    slope = float(act_param or 0.0)
    dx = dw = db = None
    gemm = plan.dw_kernel is _conv_relu_pool_bwd_dw_kernel
    if bn is not None and not (gemm and needs_dw and act == "none"):
        raise ValueError("conv_relu_pool_backward: a batch norm's dx is made only by a non-depthwise conv with "
                         "no act of its own, computing dw")
    coef = None if bn is None else torch.empty((5, w.shape[0]), device=x.device, dtype=torch.float32)
    bn_flags = {} if bn is None else dict(BN=True, BN_TRAIN=bn.training)
    split, K = plan.split, w.shape[0]
    if needs_dw or needs_db:  # first: with `bn`, its programs write the coefficients the dx kernel reads
        # fp32 partials to be summed; a single part is the result itself, in the weight's dtype
        part_dtype = torch.float32 if split > 1 else w.dtype
        dw_part = torch.empty((split, K, plan.crs) if needs_dw else (0,), device=x.device, dtype=part_dtype)
        db_part = torch.empty((split, K) if needs_db else (0,), device=x.device, dtype=part_dtype)
        if gemm:
            pend = (None,) * 9 if bn is None else (bn.x if bn.training else None, coef, bn.weight, bn.mean,
                                                    bn.invstd, bn.part_dw, bn.part_db, bn.dweight, bn.dbias)
            args = (*bufs, x, dw_part, db_part, *pend, slope, plan.N, plan.slice_rows,
                    1 if bn is None else bn.part_dw.shape[0])
            flags = bn_flags and dict(bn_flags, BN_HAS_W=bn.weight is not None, BN_DW=bn.dweight is not None,
                                      BN_DB=bn.dbias is not None)
            site = "dw" + ("" if bn is None else "+bn" + "".join("01"[f] for f in flags.values()))
            launch(plan.dw_kernel, plan.dw_grid, *args, nbytes=plan.moved(site, args), **{**plan.dw_meta, **flags})
        else:
            args = (*bufs, x, dw_part, db_part, slope, plan.N, plan.slice_rows)
            launch(plan.dw_kernel, plan.dw_grid, *args, nbytes=plan.moved("dw", args), **plan.dw_meta)
    if needs_dx:
        if dx_into is not None and (dx_into.shape != x.shape or dx_into.dtype != x.dtype
                                    or not dx_into.is_contiguous()):
            raise ValueError(f"conv_relu_pool_backward: dx_into {tuple(dx_into.shape)} {dx_into.dtype} must be "
                             f"a contiguous {tuple(x.shape)} {x.dtype}")
        dx = torch.empty_like(x)
        grid, extra = plan.dx_grid, dict(bn_flags)
        # the dw kernel's split-K (GEMM) or row-slice (depthwise) partials are summed by extra programs of this
        # launch (`_split_sums`)
        sums = split > 1 and (needs_dw or needs_db)
        if sums:
            dw = torch.empty(w.shape, device=x.device, dtype=w.dtype) if needs_dw else None
            db = torch.empty(K, device=x.device, dtype=w.dtype) if needs_db else None
            grid = (grid[0] + _sum_tiles(K * plan.crs, K, needs_dw, needs_db), *grid[1:])
            extra |= dict(SUM_DW=needs_dw, SUM_DB=needs_db, SPLIT_W=split)
        summed = (dw_part if needs_dw else None, dw, db_part if needs_db else None, db) if sums else (None,) * 4
        if gemm:
            pend = ((None if bn is None or not bn.training else bn.x), coef, *summed)
        else:
            pend = summed
        args = (*bufs, w, dx, dx_into, *pend, slope, plan.N)
        # a launch site per variant: what it reads and writes differs with each flag
        site = ("dx" if dx_into is None else "dx+") + "".join(f"{k}={v}" for k, v in extra.items())
        launch(plan.dx_kernel, grid, *args, nbytes=plan.moved(site, args), ACCUMULATE=dx_into is not None,
               **{**plan.dx_meta, **extra})
    if (needs_dw or needs_db) and dw is None and db is None:  # no dx launch summed them
        if split == 1:  # a single part is the result itself
            dw = dw_part.view(w.shape) if needs_dw else None
            db = db_part.view(K) if needs_db else None
        else:
            dw = torch.empty(w.shape, device=x.device, dtype=w.dtype) if needs_dw else None
            db = torch.empty(K, device=x.device, dtype=w.dtype) if needs_db else None
            args = (dw_part if needs_dw else None, dw, db_part if needs_db else None, db)
            launch(_conv_bwd_sums_kernel, (_sum_tiles(K * plan.crs, K, needs_dw, needs_db),), *args,
                   nbytes=plan.moved("sums", args), DW_N=K * plan.crs, DB_N=K, SUM_DW=needs_dw, SUM_DB=needs_db,
                   SPLIT_W=split)
    return dx, dw, db
