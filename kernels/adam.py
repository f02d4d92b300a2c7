"""Fused multi-tensor Adam / AdamW: one Triton launch updates every parameter of a parameter group.

Same multi-tensor design as kernels/sgd.py (a table of addresses per group, one program per chunk of one
tensor; `multi_tensor_tables`), with three more state tensors per parameter (exp_avg, exp_avg_sq,
max_exp_avg_sq) and a per-parameter step counter that lives on the device, as in torch's capturable and
fused Adam. Hyper-parameters are fp32 scalars or pointers to device tensors (`hyper_arg`, `load_hyper`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from fusednn._backend import interpreting
from fusednn.compiler import configs
from fusednn.kernels.sgd import check_like, hyper_arg, load_hyper, multi_tensor_tables
from fusednn.launch import launch

# ---------------------------------------------------------------------------------------------------
# The update, exactly torch.optim.Adam's (torch/optim/adam.py, `_single_tensor_adam`), per element, with
# t the tensor's step counter already incremented (torch: `step_t += 1` first):
#
#   g = -grad if maximize else grad
#   if weight_decay != 0:
#       p = p * (1 - lr * weight_decay)            decoupled (AdamW)
#       g = g + weight_decay * p                   otherwise (L2 penalty in the gradient)
#   m = lerp(m, g, 1 - beta1)                      torch's lerp: m + w (g - m) for w < 0.5, else g - (g - m)(1 - w)
#   v = v * beta2 + (1 - beta2) * g * g
#   vmax = max(vmax, v); v_used = vmax if amsgrad else v
#   p = p - (lr / (1 - beta1^t)) * m / (sqrt(v_used) / sqrt(1 - beta2^t) + eps)
#
# Precision. torch computes 1 - beta and the bias corrections 1 - beta^t in float64 on the host for float
# betas. In fp32, 1 - fp32(0.999) is 0.00099998713, 1.3e-5 away from 0.001, which would move v by that
# much; so for float betas the host passes 1 - beta and ln(beta) (both from float64), and the kernel
# forms 1 - beta^t = -expm1(t ln beta) with Kahan's expm1 (u = exp(x); (u - 1) x / ln u), accurate to a
# few fp32 ulps instead of losing ~4 digits to the cancellation in 1 - beta^t. For tensor betas torch
# itself works in fp32 (`1 - beta` as a tensor op), and so does the kernel, from the loaded beta.
#
# The step counter: each program of a tensor reads the same t, so the kernel must not write it (a
# program that ran first would change what a later one reads on the GPU). The launcher increments the
# group's counters with one `torch._foreach_add_` just before the launch, as torch's fused Adam does;
# both are stream-ordered, and a CUDA graph captures both.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _one_minus_pow(log_beta, t):
    """1 - beta^t = -expm1(t ln beta), with Kahan's expm1 (exact for u == 1 and u == 0)."""
    x = t * log_beta
    u = tl.exp(x)
    um1 = u - 1.0
    safe = (um1 != 0.0) & (um1 != -1.0)
    em1 = tl.where(safe, um1 * x / tl.log(tl.where(safe, u, 2.0)), tl.where(um1 == 0.0, x, -1.0))
    return -em1


@triton.jit
def _adam_step_kernel(
    p_addr_ptr,  # int64 [T]: address of each fp32 parameter (updated in place)
    g_addr_ptr,  # int64 [T]: address of each fp32 gradient (read only)
    m_addr_ptr,  # int64 [T]: address of each fp32 exp_avg (read/written)
    v_addr_ptr,  # int64 [T]: address of each fp32 exp_avg_sq (read/written)
    vmax_addr_ptr,  # int64 [T]: address of each fp32 max_exp_avg_sq (read/written; unused without AMSGRAD)
    step_addr_ptr,  # int64 [T]: address of each fp32 0-dim step counter, already incremented (read only)
    numel_ptr,  # int64 [T]: elements in each tensor
    chunk_tensor_ptr,  # int64 [C]: which tensor program c updates
    chunk_start_ptr,  # int64 [C]: first element of program c's chunk in that tensor
    lr,  # fp32 learning rate, or a pointer to it (LR_PTR)
    beta1,  # fp32, or a pointer to it (BETAS_PTR)
    beta2,  # fp32, or a pointer to it (BETAS_PTR)
    one_minus_beta1,  # fp32 from float64 on the host; unused with BETAS_PTR
    one_minus_beta2,  # fp32 from float64 on the host; unused with BETAS_PTR
    log_beta1,  # fp32 ln(beta1) from float64 on the host; unused with BETAS_PTR
    log_beta2,  # fp32 ln(beta2) from float64 on the host; unused with BETAS_PTR
    weight_decay,  # fp32, or a pointer to it (WD_PTR)
    eps,  # fp32
    LR_PTR: tl.constexpr,
    BETAS_PTR: tl.constexpr,
    WD_PTR: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0 (always for a tensor)
    DECOUPLED: tl.constexpr,  # AdamW: decay the parameter, not the gradient
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t_idx = tl.load(chunk_tensor_ptr + c)
    start = tl.load(chunk_start_ptr + c)
    n = tl.load(numel_ptr + t_idx)
    p_ptr = tl.load(p_addr_ptr + t_idx).to(tl.pointer_type(tl.float32), bitcast=True)
    g_ptr = tl.load(g_addr_ptr + t_idx).to(tl.pointer_type(tl.float32), bitcast=True)
    m_ptr = tl.load(m_addr_ptr + t_idx).to(tl.pointer_type(tl.float32), bitcast=True)
    v_ptr = tl.load(v_addr_ptr + t_idx).to(tl.pointer_type(tl.float32), bitcast=True)
    step_ptr = tl.load(step_addr_ptr + t_idx).to(tl.pointer_type(tl.float32), bitcast=True)
    t = tl.load(step_ptr)

    lr_v = load_hyper(lr, LR_PTR)
    b2 = load_hyper(beta2, BETAS_PTR)
    if BETAS_PTR:
        b1 = load_hyper(beta1, BETAS_PTR)
        w1 = 1.0 - b1
        w2 = 1.0 - b2
        bc1 = _one_minus_pow(tl.log(b1), t)
        bc2 = _one_minus_pow(tl.log(b2), t)
    else:
        w1 = one_minus_beta1
        w2 = one_minus_beta2
        bc1 = _one_minus_pow(log_beta1, t)
        bc2 = _one_minus_pow(log_beta2, t)
    step_size = lr_v / bc1
    bc2_sqrt = tl.sqrt(bc2)

    offs = start + tl.arange(0, BLOCK)  # int64: a tensor may exceed 2**31 elements
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask)
    m = tl.load(m_ptr + offs, mask=mask)
    v = tl.load(v_ptr + offs, mask=mask)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        wd = load_hyper(weight_decay, WD_PTR)
        if DECOUPLED:
            p = p * (1.0 - lr_v * wd)
        else:
            g = g + wd * p
    # torch's lerp, both halves (the weight is a scalar, so one branch is taken for the whole block).
    d = g - m
    m = tl.where(w1 < 0.5, m + w1 * d, g - d * (1.0 - w1))
    v = v * b2 + w2 * g * g
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if AMSGRAD:
        vmax_ptr = tl.load(vmax_addr_ptr + t_idx).to(tl.pointer_type(tl.float32), bitcast=True)
        vmax = tl.maximum(tl.load(vmax_ptr + offs, mask=mask), v)
        tl.store(vmax_ptr + offs, vmax, mask=mask)
        denom = tl.sqrt(vmax) / bc2_sqrt + eps
    else:
        denom = tl.sqrt(v) / bc2_sqrt + eps
    tl.store(p_ptr + offs, p + (-step_size) * (m / denom), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def adam_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    max_exp_avg_sqs: Sequence[torch.Tensor] | None,
    steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float | torch.Tensor,
    beta2: float | torch.Tensor,
    eps: float,
    weight_decay: float | torch.Tensor,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    maximize: bool,
) -> None:
    """Increment every step counter, then apply one torch.optim.Adam/AdamW step to every tensor in one launch.

    Args:
        params: contiguous float32 tensors on one device, updated in place.
        grads: their gradients (same shapes; dense).
        exp_avgs, exp_avg_sqs: contiguous float32 state, updated in place (zeros before the first step).
        max_exp_avg_sqs: the same for AMSGrad; None without amsgrad.
        steps: one float32 0-dim counter per parameter on the parameters' device, incremented here.
        lr, beta1, beta2, weight_decay: floats, or 1-element tensors; a tensor on the parameters' device
            is read by the kernel (see `hyper_arg`). beta1 and beta2 are both floats or both such tensors.
        decoupled_weight_decay: AdamW (decay the parameter) instead of Adam (decay in the gradient).
    """
    params, grads = list(params), list(grads)
    if not params:
        return
    dev = params[0].device
    for i, p in enumerate(params):
        if p.dtype != torch.float32 or p.device != dev:
            raise ValueError(f"adam_step: params[{i}] is {p.dtype} on {p.device}; expected float32 on {dev}")
        if not p.is_contiguous():
            raise ValueError(f"adam_step: params[{i}] {tuple(p.shape)} is not contiguous; it is updated in place")
    check_like("grads", grads, params, "adam_step")
    if interpreting() and dev.type != "cpu":
        raise RuntimeError("adam_step: Triton's interpreter cannot follow device addresses; use CPU tensors")
    state = [("exp_avgs", list(exp_avgs)), ("exp_avg_sqs", list(exp_avg_sqs))]
    if amsgrad:
        if max_exp_avg_sqs is None:
            raise ValueError("adam_step: amsgrad needs max_exp_avg_sqs")
        state.append(("max_exp_avg_sqs", list(max_exp_avg_sqs)))
    for name, tensors in state:
        check_like(name, tensors, params, "adam_step")
        if not all(x.is_contiguous() for x in tensors):
            raise ValueError(f"adam_step: {name} must be contiguous; they are updated in place")
    steps = list(steps)
    if len(steps) != len(params):
        raise ValueError(f"adam_step: {len(params)} params but {len(steps)} steps")
    for i, s in enumerate(steps):
        if s.numel() != 1 or s.dtype != torch.float32 or s.device != dev:
            raise ValueError(
                f"adam_step: steps[{i}] is {s.dtype} {tuple(s.shape)} on {s.device}; expected a float32 "
                f"1-element tensor on {dev} (the step counter lives on the parameters' device)"
            )
    lr_arg, lr_ptr = hyper_arg(lr, dev, "lr", "adam_step")
    wd_arg, wd_ptr = hyper_arg(weight_decay, dev, "weight_decay", "adam_step")
    b1_arg, b1_ptr = hyper_arg(beta1, dev, "beta1", "adam_step")
    b2_arg, b2_ptr = hyper_arg(beta2, dev, "beta2", "adam_step")
    if b1_ptr != b2_ptr:
        raise ValueError(f"adam_step: beta1 and beta2 must both be tensors on {dev} or both be read on the host")
    if b1_ptr:
        host_betas = (0.0, 0.0, 0.0, 0.0)
    else:
        host_betas = (1.0 - b1_arg, 1.0 - b2_arg, _log(b1_arg), _log(b2_arg))

    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]  # read only: a copy is fine
    numels = tuple(p.numel() for p in params)
    cfg = configs.elementwise(max(numels))
    vmaxs = state[2][1] if amsgrad else [None] * len(params)
    rows, n_chunks = multi_tensor_tables(
        dev,
        tuple(
            tuple(0 if x is None else x.data_ptr() for x in col)
            for col in (params, grads, state[0][1], state[1][1], vmaxs, steps)
        ),
        numels,
        cfg["BLOCK"],
    )
    # Read p, g, m, v and write p, m, v; AMSGrad also reads and writes vmax.
    moved = sum(numels) * params[0].element_size() * (9 if amsgrad else 7)
    moved += sum(r.numel() * r.element_size() for r in rows)
    torch._foreach_add_(steps, 1.0)  # after every check: a refused step leaves the counters alone
    launch(
        _adam_step_kernel,
        (n_chunks,),
        *rows,
        lr_arg,
        b1_arg,
        b2_arg,
        *host_betas,
        wd_arg,
        float(eps),
        LR_PTR=lr_ptr,
        BETAS_PTR=b1_ptr,
        WD_PTR=wd_ptr,
        WEIGHT_DECAY=wd_ptr or wd_arg != 0,
        DECOUPLED=bool(decoupled_weight_decay),
        AMSGRAD=bool(amsgrad),
        MAXIMIZE=bool(maximize),
        nbytes=moved,
        **cfg,
    )


def _log(beta: float) -> float:
    """ln(beta) in float64; beta == 0 (allowed by torch) gives -inf, for which 1 - 0^t = 1 in the kernel."""
    return math.log(beta) if beta > 0 else float("-inf")
