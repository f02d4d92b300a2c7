"""Backward of softmax / log_softmax over D of a contiguous [outer, D, inner] tensor.

The forward is generated from compiler/templates/softmax.py; both read a row as x[o, :, i] (stride inner).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.launch import launch

# VJP, per row (the D elements one softmax normalises), from the saved output y:
#   softmax:      y = e^x / Σe^x,  ∂y_j/∂x_k = y_j (δ_jk − y_k)
#                 dx_k = Σ_j dy_j y_j (δ_jk − y_k) = y_k (dy_k − Σ_j dy_j y_j)
#   log_softmax:  y = x − log Σe^x,  ∂y_j/∂x_k = δ_jk − softmax_k = δ_jk − e^{y_k}
#                 dx_k = dy_k − e^{y_k} Σ_j dy_j
# One row-sum per row; BLOCK_C >= D, so each row is read once.


@triton.jit(do_not_specialize=["n_rows"])
def _softmax_bwd_dx_kernel(
    dy_ptr,  # [outer, D, inner] upstream gradient
    y_ptr,  # [outer, D, inner] saved forward output (softmax, or log_softmax when LOG)
    dx_ptr,  # [outer, D, inner] gradient of the input (written)
    n_rows,  # outer * inner
    D,  # softmax length
    INNER,  # stride between consecutive elements of a row
    LOG: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    offs = ((rows // INNER) * (D * INNER) + rows % INNER)[:, None] + cols[None, :] * INNER
    mask = row_ok[:, None] & (cols[None, :] < D)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if LOG:
        # masked cells load y = -inf, so exp(y) = 0 there
        y = tl.load(y_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        dx = dy - tl.exp(y) * tl.sum(dy, axis=1)[:, None]
    else:
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dx = y * (dy - tl.sum(dy * y, axis=1)[:, None])
    tl.store(dx_ptr + offs, dx, mask=mask)


def softmax_backward(dy: torch.Tensor, y: torch.Tensor, *, outer: int, D: int, inner: int,
                     log: bool, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Gradient of softmax (log=False) or log_softmax (log=True) over D of [outer, D, inner], from its output y.

    Args:
        dy: upstream gradient, contiguous, same shape as y.
        y: the forward output (softmax probabilities, or log-probabilities when log).
        outer, D, inner: the [outer, D, inner] view of the tensor; the softmax runs over D.
        dtype: the input's dtype, dx's (y's by default; a float16 input under CUDA autocast gives a float32 y).
    Returns dx, a new tensor shaped like y.
    """
    dy = dy.contiguous()  # an upstream gradient may arrive expanded (stride 0) from autograd
    dx = torch.empty_like(y, dtype=dtype or y.dtype)
    n_rows = outer * inner
    cfg = configs.rows(configs.nominal(n_rows), D)
    grid = (configs.cdiv(n_rows, cfg["BLOCK_R"]),)
    launch(_softmax_bwd_dx_kernel, grid, dy, y, dx, n_rows, D, inner, LOG=log, **cfg)
    return dx
