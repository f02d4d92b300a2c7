# fusednn generated kernel fnn_linear_12
# implements: %12 linear   (module: fc3)
# backward: kernels/linear_relu.py
from __future__ import annotations

import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.activation import _leaky_relu, _relu, _sigmoid, _tanh
from fusednn.launch import launch as _launch

M, N, K = 64, 10, 84  # M: rows at the nominal batch (tiles are chosen for it)
# Programs walk output tiles in groups of GROUP_M rows so that neighbours share w tiles in L2
# (the tutorial's swizzle); an ordering choice, not a tile size.
GROUP_M = 8


@triton.jit(do_not_specialize=["M"])  # M follows the batch
def fnn_linear_12(
    x_ptr,  # [M, K] input activations
    w_ptr,  # [N, K] weight, nn.Linear layout (y = x @ w.T)
    b_ptr,  # [N] bias
    y_ptr,  # [M, N] output
    M, N, K,
    stride_xm, stride_xk,
    stride_wn, stride_wk,
    stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
    # w is [N, K]; reading it through these strides gives the [BLOCK_K, BLOCK_N] tile of w.T
    wt_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn

    # %12 linear
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K  # masks the K remainder: its zeros add nothing
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
        wt = tl.load(wt_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(x.to(y_ptr.dtype.element_ty), wt.to(y_ptr.dtype.element_ty), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        wt_ptrs += BLOCK_K * stride_wk
    b = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)
    v12 = acc + b[None, :]

    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, v12, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def launch(x, w, b, y, nbytes=None):
    """y[m, N] = x @ w.T + b; x [m, K], w [N, K], b [N]; fp32, contiguous; any row count m."""
    m = x.shape[0]
    if not (x.shape == (m, K) and w.shape == (N, K) and y.shape == (m, N) and b is not None and b.shape == (N,)):
        shapes = [None if t is None else tuple(t.shape) for t in (x, w, b, y)]
        raise ValueError(f"fnn_linear_12: launch(x, w, b, y) got shapes {shapes}, "
                         f"built for [rows, K={K}] @ [N={N}, K]")
    cfg = configs.gemm(M, N, K)
    grid = (configs.cdiv(m, cfg["BLOCK_M"]) * configs.cdiv(N, cfg["BLOCK_N"]),)
    _launch(
        fnn_linear_12, grid,
        x, w, b, y, m, N, K,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
        GROUP_M=GROUP_M, PRECISION='ieee', nbytes=nbytes, **cfg,
    )
