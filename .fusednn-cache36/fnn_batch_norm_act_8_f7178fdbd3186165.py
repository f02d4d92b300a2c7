# fusednn generated kernel fnn_batch_norm_act_8
# implements: %7 batch_norm, %8 relu   (module: layer1.bn1, layer1)
# backward: kernels/batch_norm.py
from __future__ import annotations

import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.launch import launch as run_kernel
from fusednn.kernels.activation import _relu


@triton.jit(do_not_specialize=["N"])  # one compiled kernel for every batch size
def fnn_batch_norm_act_8(
    x_ptr,  # [N, C, INNER] input, contiguous
    w_ptr,  # [C] weight (gamma)
    b_ptr,  # [C] bias (beta)
    rmean_ptr,  # [C] running mean, updated in place
    rvar_ptr,  # [C] running (unbiased) variance, updated in place
    y_ptr,  # [N, C, INNER] output
    mean_ptr,  # [C] mean used, saved for backward
    invstd_ptr,  # [C] 1/sqrt(var + eps) used, saved for backward
    N,  # batch, a runtime int: statistics divide by the actual N * INNER
    C: tl.constexpr,
    INNER: tl.constexpr,
    EPS: tl.constexpr,
    MOMENTUM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    M = N * INNER
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chans < C
    # %7 batch_norm
    # %8 relu
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, M, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = ((rows // INNER) * (C * INNER) + rows % INNER)[:, None] + chans[None, :] * INNER
        mask = (rows < M)[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        acc += x
    mean = tl.sum(acc, axis=0) / M
    # second pass: deviations d from that mean, Σd² (no E[x²] − E[x]² cancellation) and Σd, which
    # corrects the mean for the rounding of the first sum (corrected two-pass, Chan, Golub & LeVeque)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_d = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(0, M, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = ((rows // INNER) * (C * INNER) + rows % INNER)[:, None] + chans[None, :] * INNER
        mask = (rows < M)[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, x - mean[None, :], 0.0)
        acc += d * d
        acc_d += d
    sum_d = tl.sum(acc_d, axis=0)
    mean += sum_d / M
    var = (tl.sum(acc, axis=0) - sum_d * sum_d / M) / M  # biased: what normalises
    invstd = 1.0 / tl.sqrt(var + EPS)
    tl.store(mean_ptr + chans, mean, mask=c_ok)
    tl.store(invstd_ptr + chans, invstd, mask=c_ok)
    momentum = MOMENTUM
    # running stats exactly as torch: running_var takes the unbiased variance
    rm = tl.load(rmean_ptr + chans, mask=c_ok, other=0.0)
    rv = tl.load(rvar_ptr + chans, mask=c_ok, other=0.0)
    tl.store(rmean_ptr + chans, (1.0 - momentum) * rm + momentum * mean, mask=c_ok)
    tl.store(rvar_ptr + chans, (1.0 - momentum) * rv + momentum * (var * M / (M - 1)), mask=c_ok)
    scale = invstd * tl.load(w_ptr + chans, mask=c_ok, other=0.0)
    shift = tl.load(b_ptr + chans, mask=c_ok, other=0.0)
    for r0 in range(0, M, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = ((rows // INNER) * (C * INNER) + rows % INNER)[:, None] + chans[None, :] * INNER
        mask = (rows < M)[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = (x - mean[None, :]) * scale[None, :] + shift[None, :]
        # %8 relu
        z = _relu(z)
        tl.store(y_ptr + offs, z, mask=mask)


def launch(x, weight, bias, running_mean, running_var, y, save_mean, save_invstd, counter=None, residual=None, nbytes=None):
    """batch_norm of [N, 16, 1024] with batch statistics, then relu into y, save_mean, save_invstd; any batch N (the tiles are picked at N = 64)."""
    n = x.shape[0]
    cfg = configs.reduce_cols(65536, 16)
    grid = (1, configs.cdiv(16, cfg["BLOCK_C"]))
    run_kernel(fnn_batch_norm_act_8, grid, x, weight, bias, running_mean, running_var, y, save_mean, save_invstd, n, C=16, INNER=1024, EPS=1e-05, MOMENTUM=0.1, nbytes=nbytes, **cfg)
