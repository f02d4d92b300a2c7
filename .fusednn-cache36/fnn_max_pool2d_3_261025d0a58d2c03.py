# fusednn generated kernel fnn_max_pool2d_3
# implements: %3 max_pool2d   (module: max_pool2d)
# backward: kernels/pool.py
from __future__ import annotations

import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.pool import lp_pow
from fusednn.launch import launch as _launch


@triton.jit(do_not_specialize=["total"])  # total follows the batch: one kernel for every batch size
def fnn_max_pool2d_3(
    x_ptr,  # input [N, C, H, W], contiguous fp32
    y_ptr,  # output [N, C, OH, OW], fp32
    idx_ptr,  # output [N, C, OH, OW], int32 (int64 for return_indices): flat h*W+w of each window's max
    total,  # N*C*OH*OW
    H: tl.constexpr,
    W: tl.constexpr,
    OH: tl.constexpr,
    OW: tl.constexpr,
    KH: tl.constexpr,
    KW: tl.constexpr,
    SH: tl.constexpr,
    SW: tl.constexpr,
    PH: tl.constexpr,
    PW: tl.constexpr,
    DH: tl.constexpr,
    DW: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < total
    ow = offs % OW
    oh = (offs // OW) % OH
    x_plane = x_ptr + (offs // (OH * OW)) * (H * W)
    # %3 max_pool2d
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    arg = tl.full([BLOCK], -1, tl.int32)
    for i in range(KH):
        ih = h0 + i * DH
        for j in range(KW):
            iw = w0 + j * DW
            ok = live & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            v = tl.load(x_plane + ih * W + iw, mask=ok, other=float("-inf")).to(tl.float32)
            # torch: strictly greater or NaN replaces, so the first of equal maxima wins
            # and NaN propagates; arg < 0 takes the first in-bounds position even if -inf
            take = ok & ((v > best) | (v != v) | (arg < 0))
            best = tl.where(take, v, best)
            arg = tl.where(take, (ih * W + iw).to(tl.int32), arg)
    tl.store(y_ptr + offs, best, mask=live)
    tl.store(idx_ptr + offs, arg, mask=live)


def launch(x, y, idx, nbytes=None):
    """Pool x [N, 6, 28, 28] into y [N, 6, 14, 14] (any batch N; the block is picked at N = 8); its int32 argmax into idx."""
    cfg = configs.window(9408)  # a window of reads per output: 8 warps, no spill
    total = y.numel()
    _launch(fnn_max_pool2d_3, (configs.cdiv(total, cfg["BLOCK"]),), x, y, idx, total,
        H=28, W=28, OH=14, OW=14, KH=2, KW=2, SH=2, SW=2, PH=0, PW=0, DH=1, DW=1, nbytes=nbytes, **cfg)
