"""Backward of the losses: cross-entropy over [N, C] logits, and pointwise mse / l1.

Forwards are generated from compiler/templates/losses.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.plan import bytes_once
from fusednn.launch import launch

_moved: dict = {}  # bytes per launch site and shapes (kernels/plan.py)

# Cross-entropy VJP. Row n with target t_n: loss_n = lse_n − x_{n,t_n}, lse_n = log Σ_c e^{x_{n,c}}, so
#   ∂loss_n/∂x_{n,c} = softmax(x_n)_c − [c = t_n] = e^{x_{n,c} − lse_n} − [c = t_n].
# The upstream weight g_n of row n is dloss[n] ("none"), dloss ("sum") or dloss / count ("mean", count =
# rows whose target is not ignore_index); ignored rows get g_n = 0. So dx_{n,c} = g_n (e^{x − lse} − onehot).
# "mean" needs count, which the forward does not save: one small program counts the targets in a fixed
# order and writes g = dloss / count, then the dx kernel reads it.
# Precision: lse is saved in fp32, so for logits near 1e4 it is off by up to half an ulp (~5e-4) and
# e^{x − lse} by as much relatively. That error is one factor e^{−δ} common to the whole row, so the kernel
# renormalises, softmax = e^{x − lse} / Σ e^{x − lse}, which cancels it (and x − lse ≤ 0 cannot overflow).


@triton.jit(do_not_specialize=["N"])
def _cross_entropy_bwd_scale_kernel(
    dloss_ptr,  # [] upstream gradient of the mean loss
    target_ptr,  # [N] int64 targets
    scale_ptr,  # [1] dloss / (number of targets != IGNORE_INDEX), written
    N,
    IGNORE_INDEX,
    BLOCK: tl.constexpr,
):
    count = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, N, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        t = tl.load(target_ptr + offs, mask=offs < N, other=IGNORE_INDEX)
        count += (t != IGNORE_INDEX).to(tl.float32)
    tl.store(scale_ptr, tl.load(dloss_ptr) / tl.sum(count, axis=0))


@triton.jit(do_not_specialize=["N"])
def _cross_entropy_bwd_dx_kernel(
    g_ptr,  # [N] per-row upstream gradient (PER_ROW), else [] one weight shared by every row
    logits_ptr,  # [N, C] forward input
    target_ptr,  # [N] int64 targets
    lse_ptr,  # [N] log-sum-exp of each row, saved by the forward
    dx_ptr,  # [N, C] gradient of the logits, written
    N,
    C,
    IGNORE_INDEX,
    PER_ROW: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    mask = row_ok[:, None] & (cols[None, :] < C)
    offs = rows[:, None] * C + cols[None, :]
    x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf"))
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    t = tl.load(target_ptr + rows, mask=row_ok, other=IGNORE_INDEX)
    if PER_ROW:
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    else:
        g = tl.load(g_ptr)
    g = tl.where(t != IGNORE_INDEX, g, 0.0)
    e = tl.exp(x - lse[:, None])
    onehot = cols[None, :] == t[:, None]
    # softmax_c − [c = t] = (e_c − [c = t] Σe) / Σe; at c = t that is −Σ_{c≠t} e_c / Σe, summed directly:
    # p_t − 1 would cancel when the target holds nearly all the mass
    den = tl.where(row_ok, tl.sum(e, axis=1), 1.0)
    rest = tl.sum(tl.where(onehot, 0.0, e), axis=1)
    dx = g[:, None] * (tl.where(onehot, -rest[:, None], e) / den[:, None])
    tl.store(dx_ptr + offs, dx, mask=mask)


# Pointwise losses, d = x − t, with g = dloss[i] ("none"), dloss ("sum"), dloss / numel ("mean"):
#   mse: loss = d², dx = 2 d g;   l1: loss = |d|, dx = sign(d) g with sign(0) = 0 (torch's rule).
#   dt = −dx in both.


@triton.jit(do_not_specialize=["numel"])
def _point_loss_bwd_dx_kernel(
    dloss_ptr,  # [numel] upstream gradient (PER_ELEMENT), else [] the reduced loss's gradient
    x_ptr,  # [numel] forward input
    t_ptr,  # [numel] forward target
    dx_ptr,  # [numel] gradient of x, written when NEEDS_DX
    dt_ptr,  # [numel] gradient of t, written when NEEDS_DT
    numel,
    inv_count,  # 1/numel for "mean", 1 otherwise
    L1: tl.constexpr,
    PER_ELEMENT: tl.constexpr,
    NEEDS_DX: tl.constexpr,
    NEEDS_DT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0)
    if PER_ELEMENT:
        g = tl.load(dloss_ptr + offs, mask=mask, other=0.0)
    else:
        g = tl.load(dloss_ptr) * inv_count
    d = x - t
    if L1:
        dx = tl.where(d > 0, g, tl.where(d < 0, -g, 0.0))
    else:
        dx = 2.0 * d * g
    if NEEDS_DX:
        tl.store(dx_ptr + offs, dx, mask=mask)
    if NEEDS_DT:
        tl.store(dt_ptr + offs, -dx, mask=mask)


def cross_entropy_backward(dloss: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                           lse: torch.Tensor, *, reduction: str, ignore_index: int) -> torch.Tensor:
    """Gradient of cross_entropy(logits, target) with respect to the logits.

    Args:
        dloss: upstream gradient: 0-d for "mean"/"sum", [N] for "none".
        logits: [N, C] forward input; target: [N] int64; lse: [N] log-sum-exp saved by the forward.
        reduction: "mean" | "sum" | "none", as in the forward; ignore_index: the target that is skipped.
    Returns dlogits [N, C] (zero rows where the target is ignore_index).
    """
    N, C = logits.shape
    dx = torch.empty_like(logits)
    g = dloss.contiguous()  # an upstream gradient may arrive expanded (stride 0) from autograd
    if reduction == "mean":
        g = torch.empty(1, device=logits.device, dtype=torch.float32)
        block = configs.elementwise(configs.nominal(N))["BLOCK"]
        args = (dloss, target, g, N, ignore_index)
        launch(_cross_entropy_bwd_scale_kernel, (1,), *args, BLOCK=block,
               nbytes=bytes_once(_moved, ("scale", N, g.shape, dloss.shape), args))
    elif reduction not in ("sum", "none"):
        raise ValueError(f"cross_entropy reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    cfg = configs.rows(configs.nominal(N), C)
    grid = (configs.cdiv(N, cfg["BLOCK_R"]),)
    args = (g, logits, target, lse, dx, N, C, ignore_index)
    launch(_cross_entropy_bwd_dx_kernel, grid, *args, PER_ROW=reduction == "none", **cfg,
           nbytes=bytes_once(_moved, ("dx", N, C, g.shape), args))
    return dx


def point_loss_backward(dloss: torch.Tensor, x: torch.Tensor, t: torch.Tensor, *, kind: str, reduction: str,
                        needs_dx: bool, needs_dt: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients (dx, dt) of mse_loss / l1_loss (kind "mse" | "l1") between x and t; None where not needed.

    Args:
        dloss: upstream gradient: 0-d for "mean"/"sum", shaped like x for "none".
        x, t: the forward's input and target (same shape, contiguous).
    """
    if kind not in ("mse", "l1"):
        raise ValueError(f"point loss kind must be 'mse' or 'l1', got {kind!r}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"point loss reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    dx = torch.empty_like(x) if needs_dx else None
    dt = torch.empty_like(t) if needs_dt else None
    if not (needs_dx or needs_dt):
        return dx, dt
    dloss = dloss.contiguous()  # an upstream gradient may arrive expanded (stride 0) from autograd
    numel = x.numel()
    inv_count = 1.0 / numel if reduction == "mean" and numel else 1.0
    cfg = configs.elementwise(configs.nominal(numel))
    grid = (configs.cdiv(numel, cfg["BLOCK"]),)
    launch(_point_loss_bwd_dx_kernel, grid, dloss, x, t, dx, dt, numel, inv_count, L1=kind == "l1",
           PER_ELEMENT=reduction == "none", NEEDS_DX=needs_dx, NEEDS_DT=needs_dt, **cfg)
    return dx, dt
