"""Backward of the losses: cross-entropy and nll_loss over [N, C, *d] logits, and pointwise mse / l1.

Forwards are generated from compiler/templates/losses.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.plan import bytes_once
from fusednn.launch import launch

# Cross-entropy VJP. Row r (logits[r // inner, :, r % inner]) with p = softmax(x_r), w = class weights
# (1 without), ε = label smoothing, g_r = dloss[r] ("none"), dloss ("sum") or dloss / den ("mean", den
# saved by the forward: Σ w_t over kept rows, or the number of rows for probability targets):
#   class target t:  loss = (1−ε) w_t (−log p_t) + ε/C Σ_c w_c (−log p_c),  ∂/∂x_c −log p_k = p_c − [c = k]
#                    dx_c = g [(1−ε) w_t (p_c − [c = t]) + ε/C (W p_c − w_c)],  W = Σ_c w_c;  0 if t ignored
#   probabilities:   loss = Σ_k w_k q'_k (−log p_k), q' = (1−ε) q + ε/C
#                    dx_c = g (S p_c − w_c q'_c), S = Σ_k w_k q'_k;   dq_c = −g (1−ε) w_c log p_c
#   nll_loss:        loss = −w_t x_t,  dx_c = −g w_t [c = t]
# Precision: lse is saved in fp32, so for logits near 1e4 it is off by up to half an ulp (~5e-4) and
# e^{x − lse} by as much relatively. That error is one factor e^{−δ} common to the whole row, so the kernel
# renormalises, p = e^{x − lse} / Σ e^{x − lse}, which cancels it (and x − lse ≤ 0 cannot overflow).
# p_t − 1 is formed as −Σ_{c≠t} e_c / Σe: it would cancel when the target holds nearly all the mass.


@triton.jit(do_not_specialize=["n_rows"])
def _cross_entropy_bwd_dx_kernel(
    g_ptr,  # [N, inner] per-row upstream gradient (PER_ROW), else [] one weight shared by every row
    den_ptr,  # [1] the mean's denominator saved by the forward (MEAN), else None
    logits_ptr,  # [N, C, inner] forward input (log-probabilities for NLL)
    target_ptr,  # [N, inner] int64 targets, or [N, C, inner] probabilities (PROB)
    w_ptr,  # [C] class weights (WEIGHT), else None
    lse_ptr,  # [N, inner] log-sum-exp of each row saved by the forward (None for NLL)
    dx_ptr,  # [N, C, inner] gradient of the logits, written
    dt_ptr,  # [N, C, inner] gradient of the probabilities, written when NEEDS_DT
    n_rows,  # N * inner
    C,
    INNER,
    IGNORE_INDEX,
    EPS: tl.constexpr,  # label smoothing
    PER_ROW: tl.constexpr,
    MEAN: tl.constexpr,
    PROB: tl.constexpr,
    WEIGHT: tl.constexpr,
    NLL: tl.constexpr,
    NEEDS_DT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < n_rows
    base = (rows // INNER) * (C * INNER) + rows % INNER
    mask = row_ok[:, None] & (cols[None, :] < C)
    offs = base[:, None] + cols[None, :] * INNER
    if PER_ROW:
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    else:
        g = tl.load(g_ptr).to(tl.float32) + tl.zeros([BLOCK_R], dtype=tl.float32)
    if MEAN:
        g = g / tl.load(den_ptr)
    if WEIGHT:
        w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    if PROB:
        x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        e = tl.exp(x - lse[:, None])
        p = e / tl.where(row_ok, tl.sum(e, axis=1), 1.0)[:, None]
        q = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if EPS > 0.0:
            q = tl.where(mask, q * (1.0 - EPS) + EPS / C, 0.0)
        wq = q
        if WEIGHT:
            wq = w[None, :] * q
        dx = g[:, None] * (tl.sum(wq, axis=1)[:, None] * p - wq)
        if NEEDS_DT:
            dq = -g[:, None] * (1.0 - EPS) * tl.where(mask, x - lse[:, None], 0.0)
            if WEIGHT:
                dq = dq * w[None, :]
            tl.store(dt_ptr + offs, dq, mask=mask)
    else:
        t = tl.load(target_ptr + rows, mask=row_ok, other=IGNORE_INDEX)
        keep = t != IGNORE_INDEX
        onehot = cols[None, :] == t[:, None]
        w_t = tl.where(keep, 1.0, 0.0)
        if WEIGHT:
            w_t = tl.load(w_ptr + t, mask=row_ok & keep & (t >= 0) & (t < C), other=0.0).to(tl.float32)
        gw = tl.where(keep, g, 0.0)
        if NLL:
            dx = tl.where(onehot, -(gw * w_t)[:, None], 0.0)
        else:
            x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
            e = tl.exp(x - lse[:, None])
            den = tl.where(row_ok, tl.sum(e, axis=1), 1.0)
            rest = tl.sum(tl.where(onehot, 0.0, e), axis=1)
            dx = (w_t * (1.0 - EPS))[:, None] * (tl.where(onehot, -rest[:, None], e) / den[:, None])
            if EPS > 0.0:
                p = e / den[:, None]
                if WEIGHT:
                    dx += (EPS / C) * (tl.sum(w, axis=0) * p - w[None, :])
                else:
                    dx += EPS * (p - 1.0 / C)
            dx = gw[:, None] * dx
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
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_ELEMENT:
        g = tl.load(dloss_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        g = tl.load(dloss_ptr).to(tl.float32) * inv_count
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
                           lse: torch.Tensor | None, *, reduction: str, ignore_index: int = -100,
                           weight: torch.Tensor | None = None, den: torch.Tensor | None = None,
                           label_smoothing: float = 0.0, nll: bool = False,
                           needs_dt: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients (dlogits, dtarget) of cross_entropy (or nll_loss, nll=True) of logits [N, C, *d] or [C].

    Args:
        dloss: upstream gradient: 0-d for "mean"/"sum", shaped like the per-row loss for "none".
        logits: the forward input, contiguous; target: int64 class targets [N, *d], or float class
            probabilities shaped like the logits; lse: [N, *d] log-sum-exp saved by the forward (None: nll).
        reduction: "mean" | "sum" | "none"; den: the mean's denominator the forward saved ("mean" only).
        weight: [C] class weights or None; label_smoothing: ε in [0, 1].
        needs_dt: write the gradient of probability targets (else dtarget is None).
    Returns dlogits shaped like the logits (zero rows where the target is ignore_index) and dtarget.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if reduction == "mean" and den is None:
        raise ValueError("cross_entropy_backward: reduction='mean' needs den, saved by the forward")
    C = logits.shape[1] if logits.dim() > 1 else logits.shape[0]
    inner = logits[0, 0].numel() if logits.dim() > 2 else 1
    n_rows = logits.numel() // C if C else 0
    prob = target.is_floating_point()
    dx = torch.empty_like(logits)
    dt = torch.empty_like(target) if prob and needs_dt else None
    g = dloss.contiguous()  # an upstream gradient may arrive expanded (stride 0) from autograd
    cfg = configs.rows(configs.nominal(n_rows), C)
    grid = (configs.cdiv(n_rows, cfg["BLOCK_R"]),)
    launch(_cross_entropy_bwd_dx_kernel, grid, g, den, logits, target, weight, lse, dx, dt, n_rows, C, inner,
           ignore_index, EPS=float(label_smoothing), PER_ROW=reduction == "none", MEAN=reduction == "mean",
           PROB=prob, WEIGHT=weight is not None, NLL=nll, NEEDS_DT=dt is not None, **cfg)
    return dx, dt


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
