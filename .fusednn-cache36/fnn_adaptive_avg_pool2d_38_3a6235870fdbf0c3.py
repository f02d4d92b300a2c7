# fusednn generated kernel fnn_adaptive_avg_pool2d_38
# implements: %38 adaptive_avg_pool2d   (module: pool)
# backward: kernels/pool.py
from __future__ import annotations

import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.pool import lp_pow
from fusednn.launch import launch as _launch


@triton.jit(do_not_specialize=["total"])  # total follows the batch: one kernel for every batch size
def fnn_adaptive_avg_pool2d_38(
    x_ptr,  # input [N, C, H, W], contiguous fp32
    y_ptr,  # output [N, C, OH, OW], fp32
    total,  # N*C*OH*OW
    H: tl.constexpr,
    W: tl.constexpr,
    OH: tl.constexpr,
    OW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    ow = offs % OW
    oh = (offs // OW) % OH
    x_plane = x_ptr + (offs // (OH * OW)) * (H * W)
    # %38 adaptive_avg_pool2d
    h0 = (oh * H) // OH
    w0 = (ow * W) // OW
    h1 = ((oh + 1) * H + OH - 1) // OH
    w1 = ((ow + 1) * W + OW - 1) // OW
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(KH):
        ih = h0 + i
        for j in range(KW):
            iw = w0 + j
            ok = live & (ih < h1) & (iw < w1)
            acc += tl.load(x_plane + ih * W + iw, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc / ((h1 - h0) * (w1 - w0)).to(tl.float32), mask=live)


def launch(x, y, idx, nbytes=None):
    """Pool x [N, 64, 8, 8] into y [N, 64, 1, 1] (any batch N; the block is picked at N = 64); idx is None."""
    assert idx is None, "avg pool has no argmax"
    cfg = configs.window(4096)  # a window of reads per output: 8 warps, no spill
    total = y.numel()
    _launch(fnn_adaptive_avg_pool2d_38, (configs.cdiv(total, cfg["BLOCK"]),), x, y, total,
        H=8, W=8, OH=1, OW=1, KH=8, KW=8, nbytes=nbytes, **cfg)
