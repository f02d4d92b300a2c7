"""Backward of batch norm over x viewed as contiguous [N, C, inner] (inner = H*W, or 1 for [N, C]).

The forward is generated from compiler/templates/batch_norm.py, which saves the mean and 1/sqrt(var + eps)
it normalised with (batch statistics in training, running statistics in eval).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.launch import launch

# VJP per channel, over its M = N*inner values. y = x̂ w + b, x̂ = (x − μ) σ⁻¹, σ⁻¹ = (var + eps)^(−1/2).
#   dbias = Σ dy,   dweight = Σ dy x̂   (the sums run over the channel's M values)
# Eval (μ, σ⁻¹ are running stats, constants): dx = dy w σ⁻¹.
# Training (μ = mean x, var = mean (x − μ)², both functions of x), with g = dy w:
#   ∂μ/∂x_j = 1/M,  ∂σ⁻¹/∂x_j = −σ⁻³ (x_j − μ)/M  ⇒  ∂x̂_i/∂x_j = σ⁻¹ (δ_ij − 1/M − x̂_i x̂_j / M)
#   dx_j = Σ_i g_i ∂x̂_i/∂x_j = w σ⁻¹ (dy_j − Σdy/M − x̂_j Σ(dy x̂)/M)
# So both cases need only the two channel sums Σdy and Σ(dy x̂), which are dbias and dweight. One kernel
# reduces them (each program owns BLOCK_C channels and walks all rows in a fixed order: bit-identical
# every run), a second, parallel over rows and channels, writes dx from them.


@triton.jit(do_not_specialize=["M"])
def _batch_norm_bwd_dwdb_kernel(
    dy_ptr,  # [N, C, INNER] upstream gradient
    x_ptr,  # [N, C, INNER] forward input
    mean_ptr,  # [C] mean the forward normalised with
    invstd_ptr,  # [C] 1/sqrt(var + eps) the forward normalised with
    dw_ptr,  # [C] Σ dy·x̂, written (= dweight)
    db_ptr,  # [C] Σ dy, written (= dbias)
    M,  # N * INNER: values per channel
    C,
    INNER,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chans < C
    mean = tl.load(mean_ptr + chans, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + chans, mask=c_ok, other=0.0)
    acc_dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, M, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = ((rows // INNER) * (C * INNER) + rows % INNER)[:, None] + chans[None, :] * INNER
        mask = (rows < M)[:, None] & c_ok[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        acc_dw += dy * ((x - mean[None, :]) * invstd[None, :])
        acc_db += dy
    tl.store(dw_ptr + chans, tl.sum(acc_dw, axis=0), mask=c_ok)
    tl.store(db_ptr + chans, tl.sum(acc_db, axis=0), mask=c_ok)


@triton.jit(do_not_specialize=["M"])
def _batch_norm_bwd_dx_kernel(
    dy_ptr,  # [N, C, INNER] upstream gradient
    x_ptr,  # [N, C, INNER] forward input (read only in TRAINING)
    w_ptr,  # [C] weight, or None without affine (HAS_WEIGHT False)
    mean_ptr,  # [C] mean the forward normalised with
    invstd_ptr,  # [C] 1/sqrt(var + eps) the forward normalised with
    dw_ptr,  # [C] Σ dy·x̂ from _batch_norm_bwd_dwdb_kernel (read only in TRAINING)
    db_ptr,  # [C] Σ dy from _batch_norm_bwd_dwdb_kernel (read only in TRAINING)
    dx_ptr,  # [N, C, INNER] gradient of x, written
    M,  # N * INNER: values per channel
    C,
    INNER,
    TRAINING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chans < C
    offs = ((rows // INNER) * (C * INNER) + rows % INNER)[:, None] + chans[None, :] * INNER
    mask = (rows < M)[:, None] & c_ok[None, :]
    invstd = tl.load(invstd_ptr + chans, mask=c_ok, other=0.0)
    scale = invstd
    if HAS_WEIGHT:
        scale = invstd * tl.load(w_ptr + chans, mask=c_ok, other=0.0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    if TRAINING:
        mean = tl.load(mean_ptr + chans, mask=c_ok, other=0.0)
        mean_dy = tl.load(db_ptr + chans, mask=c_ok, other=0.0) / M
        mean_dy_xhat = tl.load(dw_ptr + chans, mask=c_ok, other=0.0) / M
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        xhat = (x - mean[None, :]) * invstd[None, :]
        dx = scale[None, :] * (dy - mean_dy[None, :] - xhat * mean_dy_xhat[None, :])
    else:
        dx = dy * scale[None, :]
    tl.store(dx_ptr + offs, dx, mask=mask)


def batch_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                        save_mean: torch.Tensor, save_invstd: torch.Tensor, *, training: bool, needs_dx: bool,
                        needs_dweight: bool, needs_dbias: bool
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dweight, dbias) of batch norm of x ([N, C] or [N, C, H, W]); None where not needed.

    Args:
        dy: upstream gradient, shaped like x; weight: [C], or None without one (dweight and dbias need none).
        save_mean, save_invstd: [C], as the forward saved them.
        training: True when the forward normalised with batch statistics (training, or no running stats):
            dx then flows through the mean and variance as well.
    dweight and dbias are reduced in a fixed order: two calls give bit-identical results.
    """
    N, C = x.shape[0], x.shape[1]
    inner = x.numel() // max(N * C, 1)
    M = N * inner
    dy = dy.contiguous()  # an upstream gradient may arrive expanded (stride 0) from autograd
    dx = torch.empty_like(x) if needs_dx else None
    dw = db = None
    cfg = configs.reduce_cols(configs.nominal(M), C)
    if needs_dweight or needs_dbias or (needs_dx and training):
        # Σ dy·x̂ and Σ dy per channel: dweight and dbias themselves, and what training dx reads
        dw = torch.empty(C, device=x.device, dtype=torch.float32)
        db = torch.empty(C, device=x.device, dtype=torch.float32)
        launch(_batch_norm_bwd_dwdb_kernel, (configs.cdiv(C, cfg["BLOCK_C"]),), dy, x, save_mean, save_invstd,
               dw, db, M, C, inner, **cfg)
    if needs_dx:
        grid = (configs.cdiv(M, cfg["BLOCK_R"]), configs.cdiv(C, cfg["BLOCK_C"]))
        launch(_batch_norm_bwd_dx_kernel, grid, dy, x, weight, save_mean, save_invstd, dw, db, dx,
               M, C, inner, TRAINING=training, HAS_WEIGHT=weight is not None, **cfg)
    return dx, (dw if needs_dweight else None), (db if needs_dbias else None)
