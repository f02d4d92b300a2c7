"""Backward of the row normalizations (layer_norm, group_norm, instance_norm with batch statistics).

x is seen as contiguous [N, G, CPG, INNER]: R = N*G rows of L = CPG*INNER values, the affine parameter of a
value p = g*CPG + cpg (compiler/templates/norm.py, which saves each row's mean as the pair m1 + mean_lo and
its 1/sqrt(var + eps)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.launch import launch

# VJP per row of L values. y = x̂ w_p + b_p, x̂ = (x − μ) σ⁻¹, σ⁻¹ = (var + eps)^(−1/2), μ and var the row's.
#   dbias_p = Σ dy,   dweight_p = Σ dy x̂   (over every value whose parameter is p: across rows and batch)
# With g = dy w_p (dy without weight), as for batch norm over a channel (kernels/batch_norm.py):
#   dx_j = σ⁻¹ (g_j − Σg/L − x̂_j Σ(g x̂)/L)
# dx: each program owns BLOCK_R rows, sums Σg and Σ(g x̂) along them, then writes dx (two passes, in order).
# dweight/dbias: each program owns BLOCK_C parameters and walks all (n, inner) positions of them in a fixed
# order, gathering each value's row statistics (no atomics: bit-identical reruns).


@triton.jit
def _norm_xhat(x, mean, mean_lo, invstd):
    """x̂ with the mean as the pair (m1, mean_lo): x − m1 is exact near m1, so the correction survives."""
    return ((x - mean) - mean_lo) * invstd


@triton.jit
def _norm_bwd_dx_kernel(
    dy_ptr,  # [R, L] upstream gradient
    x_ptr,  # [R, L] forward input
    w_ptr,  # [G*CPG] weight, or None (HAS_WEIGHT False)
    mean_ptr,  # [R] first-pass row means m1
    mean_lo_ptr,  # [R] their corrections
    invstd_ptr,  # [R] 1/sqrt(var + eps) of each row
    dx_ptr,  # [R, L] gradient of x, written
    R,  # rows: N * G
    G: tl.constexpr,
    CPG: tl.constexpr,
    INNER: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    L = CPG * INNER
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    mean = tl.load(mean_ptr + rows, mask=r_ok, other=0.0)[:, None]
    mean_lo = tl.load(mean_lo_ptr + rows, mask=r_ok, other=0.0)[:, None]
    invstd = tl.load(invstd_ptr + rows, mask=r_ok, other=0.0)[:, None]
    acc_g = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
    acc_gx = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = r_ok[:, None] & (cols < L)[None, :]
        offs = rows[:, None] * L + cols[None, :]
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g *= tl.load(w_ptr + (rows % G)[:, None] * CPG + (cols // INNER)[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc_g += g
        acc_gx += tl.where(mask, g * _norm_xhat(x, mean, mean_lo, invstd), 0.0)
    mean_g = (tl.sum(acc_g, axis=1) / L)[:, None]
    mean_gx = (tl.sum(acc_gx, axis=1) / L)[:, None]
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        mask = r_ok[:, None] & (cols < L)[None, :]
        offs = rows[:, None] * L + cols[None, :]
        g = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_WEIGHT:
            g *= tl.load(w_ptr + (rows % G)[:, None] * CPG + (cols // INNER)[None, :], mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = invstd * (g - mean_g - _norm_xhat(x, mean, mean_lo, invstd) * mean_gx)
        tl.store(dx_ptr + offs, dx, mask=mask)


@triton.jit
def _norm_bwd_dwdb_kernel(
    dy_ptr,  # [N, G*CPG, INNER] upstream gradient
    x_ptr,  # [N, G*CPG, INNER] forward input
    mean_ptr,  # [N*G] first-pass row means m1
    mean_lo_ptr,  # [N*G] their corrections
    invstd_ptr,  # [N*G] 1/sqrt(var + eps) of each row
    dw_ptr,  # [G*CPG] Σ dy·x̂, written (= dweight)
    db_ptr,  # [G*CPG] Σ dy, written (= dbias)
    N,  # batch
    G: tl.constexpr,
    CPG: tl.constexpr,
    INNER: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    P = G * CPG
    M = N * INNER  # positions per parameter
    ps = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = ps < P
    acc_dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for m0 in range(0, M, BLOCK_R):
        ms = m0 + tl.arange(0, BLOCK_R)
        n = ms // INNER
        mask = (ms < M)[:, None] & p_ok[None, :]
        offs = (n * (P * INNER) + ms % INNER)[:, None] + ps[None, :] * INNER
        stat = n[:, None] * G + (ps // CPG)[None, :]  # the row (n, g) of each element
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        xhat = _norm_xhat(x, tl.load(mean_ptr + stat, mask=mask, other=0.0),
                          tl.load(mean_lo_ptr + stat, mask=mask, other=0.0),
                          tl.load(invstd_ptr + stat, mask=mask, other=0.0))
        acc_dw += dy * xhat
        acc_db += dy
    tl.store(dw_ptr + ps, tl.sum(acc_dw, axis=0), mask=p_ok)
    tl.store(db_ptr + ps, tl.sum(acc_db, axis=0), mask=p_ok)


def norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, save_mean: torch.Tensor,
                  save_mean_lo: torch.Tensor, save_invstd: torch.Tensor, *, G: int, CPG: int, INNER: int,
                  needs_dx: bool, needs_dweight: bool, needs_dbias: bool
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dweight, dbias) of a row normalization of x as [N, G, CPG, INNER]; None where not needed.

    Args:
        dy, x: any shape of G*CPG*INNER*N elements, contiguous. weight: G*CPG elements, or None.
        save_mean, save_mean_lo, save_invstd: [N*G] row statistics, as the forward saved them.
    dweight and dbias come back flat ([G*CPG]), reduced in a fixed order: two calls give bit-identical results.
    """
    L = CPG * INNER
    R = x.numel() // L
    dy = dy.contiguous()  # an upstream gradient may arrive expanded (stride 0) from autograd
    dx = dw = db = None
    if needs_dx:
        dx = torch.empty_like(x)
        cfg = configs.norm_rows(R, L)
        launch(_norm_bwd_dx_kernel, (triton.cdiv(R, cfg["BLOCK_R"]),), dy, x, weight, save_mean, save_mean_lo,
               save_invstd, dx, R, G=G, CPG=CPG, INNER=INNER, HAS_WEIGHT=weight is not None, **cfg)
    if needs_dweight or needs_dbias:
        P, N = G * CPG, R // G
        dw = torch.empty(P, device=x.device, dtype=torch.float32)
        db = torch.empty(P, device=x.device, dtype=torch.float32)
        cfg = configs.norm_cols(N * INNER, P)
        launch(_norm_bwd_dwdb_kernel, (triton.cdiv(P, cfg["BLOCK_C"]),), dy, x, save_mean, save_mean_lo,
               save_invstd, dw, db, N, G=G, CPG=CPG, INNER=INNER, **cfg)
    return dx, (dw if needs_dweight else None), (db if needs_dbias else None)
