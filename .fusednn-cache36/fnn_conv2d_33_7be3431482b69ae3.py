# fusednn generated kernel fnn_conv2d_33
# implements: %33 conv2d   (module: layer3.shortcut.0)
# backward: kernels/conv_relu_pool.py
from __future__ import annotations

import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.activation import _leaky_relu, _relu, _sigmoid, _tanh
from fusednn.launch import launch as launch_kernel


@triton.jit(do_not_specialize=["N"])
def fnn_conv2d_33(
    x_ptr,  # input [N, C, H, W]
    w_ptr,  # filters [K, C // GROUPS, R, S]
    y_ptr,  # output [N, K, OH, OW]
    N,  # batch, a runtime int: one compiled kernel serves every batch size
    C: tl.constexpr, H: tl.constexpr, W: tl.constexpr,  # input shape [N, C, H, W]
    K: tl.constexpr, R: tl.constexpr, S: tl.constexpr, GROUPS: tl.constexpr,  # filters
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr, PAD_H: tl.constexpr, PAD_W: tl.constexpr,  # stride, zero padding
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,  # dilation
    OH: tl.constexpr, OW: tl.constexpr,  # conv output
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,  # "ieee" or "tf32"
):
    # Implicit GEMM, one group g per program along axis 2:
    #   rows     m = (n, oh, ow)  output positions
    #   columns  j = k            the group's K // GROUPS output channels
    #   reduce   q = (c, r, s)    the group's C // GROUPS * R * S taps, one axis so that a
    #                             1-channel input still fills BLOCK_K
    CG: tl.constexpr = C // GROUPS
    KG: tl.constexpr = K // GROUPS
    CRS: tl.constexpr = CG * R * S
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < N * OH * OW
    # rows past the end repeat the last one: every load stays in bounds without a row mask (with
    # the batch a runtime value, row predicates live through the main loop and spill on sm_90);
    # only the stores are masked
    rows = tl.minimum(offs_m, N * OH * OW - 1)
    n = rows // (OH * OW)
    oh = (rows // OW) % OH
    ow = rows % OW
    offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = offs_j < KG
    k = g * KG + offs_j  # output channel
    offs_q = tl.arange(0, BLOCK_K)

    # %33 conv2d
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for q0 in range(0, CRS, BLOCK_K):
        q = q0 + offs_q
        q_ok = q < CRS
        c = g * CG + q // (R * S)  # input channel
        ih = oh[:, None] * STRIDE_H - PAD_H + ((q // S) % R)[None, :] * DIL_H
        iw = ow[:, None] * STRIDE_W - PAD_W + (q % S)[None, :] * DIL_W
        x_ok = q_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tile = tl.load(x_ptr + ((n[:, None] * C + c[None, :]) * H + ih) * W + iw, mask=x_ok, other=0.0)
        # w is [K, CG * R * S] row-major: the (c, r, s) taps of channel k are contiguous
        w_tile = tl.load(w_ptr + k[None, :] * CRS + q[:, None], mask=q_ok[:, None] & j_ok[None, :], other=0.0)
        # operands in the output's precision (float16 in, fp32 accumulation), the epilogue in fp32
        acc = tl.dot(x_tile.to(y_ptr.dtype.element_ty), w_tile.to(y_ptr.dtype.element_ty), acc, input_precision=PRECISION)
    conv2d_33 = acc

    y_off = ((n[:, None] * K + k[None, :]) * OH + oh[:, None]) * OW + ow[:, None]
    y_ok = m_ok[:, None] & j_ok[None, :]
    tl.store(y_ptr + y_off, conv2d_33, mask=y_ok)


def launch(x, w, b, y, idx, a, nbytes=None):
    """%33 conv2d in one launch; b, idx, a are None where this variant has none."""
    # GEMM view: M = N * 64 rows, N = 64 channels per group, K = 32 taps; tiles for
    # the nominal batch 64, whatever x's batch
    n = x.shape[0]
    cfg = configs.gemm(4096, 64, 32, gather=True)
    grid = (configs.cdiv(n * 64, cfg["BLOCK_M"]), configs.cdiv(64, cfg["BLOCK_N"]), 1)
    launch_kernel(
        fnn_conv2d_33, grid, x, w, y, n, nbytes=nbytes,
        C=32, H=16, W=16, K=64, R=1, S=1, GROUPS=1,
        STRIDE_H=2, STRIDE_W=2, PAD_H=0, PAD_W=0, DIL_H=1, DIL_W=1, OH=8, OW=8,
        PRECISION="ieee", **cfg,
    )
