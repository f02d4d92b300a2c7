"""Backward of batch norm over x viewed as contiguous [N, C, inner] (inner = H*W, or 1 for [N, C]).

The forward is generated from compiler/templates/batch_norm.py, which saves the mean and 1/sqrt(var + eps)
it normalised with (batch statistics in training, running statistics in eval).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.kernels.activation import SAVES, _act_grad3, heavy_act
from fusednn.launch import launch

# VJP per channel, over its M = N*inner values. y = x̂ w + b, x̂ = (x − μ) σ⁻¹, σ⁻¹ = (var + eps)^(−1/2).
#   dbias = Σ dy,   dweight = Σ dy x̂   (the sums run over the channel's M values)
# Eval (μ, σ⁻¹ are running stats, constants): dx = dy w σ⁻¹.
# Training (μ = mean x, var = mean (x − μ)², both functions of x), with g = dy w:
#   ∂μ/∂x_j = 1/M,  ∂σ⁻¹/∂x_j = −σ⁻³ (x_j − μ)/M  ⇒  ∂x̂_i/∂x_j = σ⁻¹ (δ_ij − 1/M − x̂_i x̂_j / M)
#   dx_j = Σ_i g_i ∂x̂_i/∂x_j = w σ⁻¹ (dy_j − Σdy/M − x̂_j Σ(dy x̂)/M)
# So both cases need only the two channel sums Σdy and Σ(dy x̂), which are dbias and dweight. One kernel
# reduces them in two levels: its grid is (row slices, channel blocks), each program walks its slice's
# rows in a fixed order and writes partial sums [SPLIT, C]; a second kernel, parallel over rows and
# channels, adds a channel's partials in slice order (every program the same bits, on every run), writes
# dx from them, and its first row block writes dweight and dbias. SPLIT (configs.reduce_split) keeps the
# GPU's SMs busy: one program per channel block walking all 65,536 rows of a batch-64 CIFAR stage would
# not. With SPLIT == 1 the partials are the sums themselves.


# Fused forms (batch_norm_act: out = act(y + r), y the batch norm's output, r a residual): the kernels
# first pull dout back through the activation, dy = dout act'(z) with z = y + r, then proceed as above;
# the residual's gradient is dy itself. act' reads what kernels/activation.SAVES says: the saved output
# (relu, sigmoid, tanh, hardtanh) or z, recomputed as the forward computed it from x, the saved statistics,
# the affine parameters and r. With a residual that needs its gradient, the reduction kernel writes dy,
# and the dx kernel reads it back instead of recomputing it.


@triton.jit
def _pullback(dout_ptr, out_ptr, res_ptr, w_ptr, b_ptr, offs, mask, chans, c_ok, x, mean, invstd, p0, p1, p2,
              ACT: tl.constexpr, ACT_FROM_OUT: tl.constexpr, HAS_RES: tl.constexpr, HAS_WEIGHT: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """dy = dout act'(z) on a tile (dout itself without an activation)."""
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == "none":
        dy = dout
    elif ACT_FROM_OUT:
        dy = _act_grad3(dout, tl.load(out_ptr + offs, mask=mask, other=0.0).to(tl.float32), p0, p1, p2, ACT)
    else:
        # z exactly as compiler/templates/batch_norm.py computes it
        scale = invstd
        if HAS_WEIGHT:
            scale = invstd * tl.load(w_ptr + chans, mask=c_ok, other=0.0)
        z = (x - mean[None, :]) * scale[None, :]
        if HAS_BIAS:
            z = z + tl.load(b_ptr + chans, mask=c_ok, other=0.0)[None, :]
        if HAS_RES:
            z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = _act_grad3(dout, z, p0, p1, p2, ACT)
    return tl.where(mask, dy, 0.0)


@triton.jit(do_not_specialize=["M", "ROWS"])  # runtime ints: one compiled kernel for every batch
def _batch_norm_bwd_dwdb_kernel(
    dy_ptr,  # [N, C, INNER] upstream gradient (of the activation's output when ACT is not "none")
    x_ptr,  # [N, C, INNER] forward input
    mean_ptr,  # [C] mean the forward normalised with
    invstd_ptr,  # [C] 1/sqrt(var + eps) the forward normalised with
    dw_ptr,  # [SPLIT, C] Σ dy·x̂ over each slice's rows, written (SPLIT == 1: dweight)
    db_ptr,  # [SPLIT, C] Σ dy over each slice's rows, written (SPLIT == 1: dbias)
    out_ptr,  # [N, C, INNER] the fused output (ACT_FROM_OUT only)
    res_ptr,  # [N, C, INNER] the residual (HAS_RES and act' from z only)
    w_ptr,  # [C] weight (HAS_WEIGHT; act' from z only)
    b_ptr,  # [C] bias (HAS_BIAS; act' from z only)
    dz_ptr,  # [N, C, INNER] dy after the activation, written (WRITE_DY: the residual's gradient)
    p0,  # the activation's parameters
    p1,
    p2,
    M,  # N * INNER: values per channel
    C,
    INNER,
    ROWS,  # rows per slice, a multiple of BLOCK_R: slice s sums rows [s * ROWS, (s + 1) * ROWS)
    ACT: tl.constexpr,
    ACT_FROM_OUT: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    WRITE_DY: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    first = tl.program_id(0) * ROWS
    chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = chans < C
    mean = tl.load(mean_ptr + chans, mask=c_ok, other=0.0)
    invstd = tl.load(invstd_ptr + chans, mask=c_ok, other=0.0)
    acc_dw = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    for r0 in range(first, tl.minimum(first + ROWS, M), BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        offs = ((rows // INNER) * (C * INNER) + rows % INNER)[:, None] + chans[None, :] * INNER
        mask = (rows < M)[:, None] & c_ok[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = _pullback(dy_ptr, out_ptr, res_ptr, w_ptr, b_ptr, offs, mask, chans, c_ok, x, mean, invstd, p0, p1,
                       p2, ACT, ACT_FROM_OUT, HAS_RES, HAS_WEIGHT, HAS_BIAS)
        if WRITE_DY:
            tl.store(dz_ptr + offs, dy, mask=mask)
        acc_dw += dy * ((x - mean[None, :]) * invstd[None, :])
        acc_db += dy
    tl.store(dw_ptr + tl.program_id(0) * C + chans, tl.sum(acc_dw, axis=0), mask=c_ok)
    tl.store(db_ptr + tl.program_id(0) * C + chans, tl.sum(acc_db, axis=0), mask=c_ok)


@triton.jit
def channel_sums(pdw_ptr, pdb_ptr, chans, c_ok, SPLIT, C, BLOCK_S: tl.constexpr):
    """(Σ dy·x̂, Σ dy) of channels `chans` from the reduction kernel's [SPLIT, C] partials, added in slice
    order (BLOCK_S slices at once, then a fixed tree): the same bits in every program that asks."""
    part_dw = tl.zeros([BLOCK_S, chans.shape[0]], dtype=tl.float32)
    part_db = tl.zeros([BLOCK_S, chans.shape[0]], dtype=tl.float32)
    for s0 in range(0, SPLIT, BLOCK_S):
        sl = s0 + tl.arange(0, BLOCK_S)
        at = sl[:, None] * C + chans[None, :]
        s_ok = (sl < SPLIT)[:, None] & c_ok[None, :]
        part_dw += tl.load(pdw_ptr + at, mask=s_ok, other=0.0)
        part_db += tl.load(pdb_ptr + at, mask=s_ok, other=0.0)
    return tl.sum(part_dw, axis=0), tl.sum(part_db, axis=0)


@triton.jit(do_not_specialize=["M", "SPLIT"])
def _batch_norm_bwd_dx_kernel(
    dy_ptr,  # [N, C, INNER] upstream gradient (of the activation's output when ACT is not "none"), or the
             # pulled-back dy the reduction kernel wrote (DY_WRITTEN)
    x_ptr,  # [N, C, INNER] forward input (read in TRAINING, or for act' from z)
    w_ptr,  # [C] weight, or None without affine (HAS_WEIGHT False)
    mean_ptr,  # [C] mean the forward normalised with
    invstd_ptr,  # [C] 1/sqrt(var + eps) the forward normalised with
    dw_ptr,  # [SPLIT, C] partial Σ dy·x̂ from _batch_norm_bwd_dwdb_kernel (read only in TRAINING)
    db_ptr,  # [SPLIT, C] partial Σ dy from _batch_norm_bwd_dwdb_kernel (read only in TRAINING)
    sum_dw_ptr,  # [C] Σ dy·x̂, written by the first row block (WRITE_SUMS: dweight)
    sum_db_ptr,  # [C] Σ dy, written by the first row block (WRITE_SUMS: dbias)
    dx_ptr,  # [N, C, INNER] gradient of x, written
    out_ptr,  # [N, C, INNER] the fused output (ACT_FROM_OUT only)
    res_ptr,  # [N, C, INNER] the residual (HAS_RES and act' from z only)
    b_ptr,  # [C] bias (HAS_BIAS; act' from z only)
    p0,  # the activation's parameters
    p1,
    p2,
    M,  # N * INNER: values per channel
    C,
    INNER,
    SPLIT,  # partials per channel (TRAINING)
    TRAINING: tl.constexpr,
    WRITE_SUMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    ACT: tl.constexpr,  # "none" also when DY_WRITTEN: dy is already pulled back
    ACT_FROM_OUT: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
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
    mean = tl.load(mean_ptr + chans, mask=c_ok, other=0.0)
    if TRAINING or (ACT != "none" and not ACT_FROM_OUT):
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    dy = _pullback(dy_ptr, out_ptr, res_ptr, w_ptr, b_ptr, offs, mask, chans, c_ok, x, mean, invstd, p0, p1, p2,
                   ACT, ACT_FROM_OUT, HAS_RES, HAS_WEIGHT, HAS_BIAS)
    if TRAINING:
        # the channel sums: the slices' partials added in slice order, the same in every program
        sum_dw, sum_db = channel_sums(dw_ptr, db_ptr, chans, c_ok, SPLIT, C, BLOCK_S)
        if WRITE_SUMS:
            if tl.program_id(0) == 0:
                tl.store(sum_dw_ptr + chans, sum_dw, mask=c_ok)
                tl.store(sum_db_ptr + chans, sum_db, mask=c_ok)
        mean_dy = sum_db / M
        mean_dy_xhat = sum_dw / M
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
    dx, dw, db, _ = batch_norm_act_backward(dy, x, weight, save_mean, save_invstd, training=training,
                                            needs_dx=needs_dx, needs_dweight=needs_dweight, needs_dbias=needs_dbias)
    return dx, dw, db


def batch_norm_act_backward(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                            save_mean: torch.Tensor, save_invstd: torch.Tensor, *, training: bool, needs_dx: bool,
                            needs_dweight: bool, needs_dbias: bool, act: str = "none",
                            act_params: tuple[float, ...] = (), out: torch.Tensor | None = None,
                            bias: torch.Tensor | None = None, residual: torch.Tensor | None = None,
                            has_residual: bool = False, needs_dresidual: bool = False,
                            ) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dx, dweight, dbias, dresidual) of out = act(batch_norm(x) [+ residual]); None where not
    needed (batch_norm_act of passes.fuse_batch_norm; plain batch norm with act "none", no residual).

    Args:
        dout: gradient of out, shaped like x.
        act, act_params: the activation (a key of kernels/activation.SAVES, or "none") and its parameters.
        out: the forward's output, where act' reads it (SAVES[act] == "y"); bias and residual: the
            forward's, where act' reads z (the other activations). has_residual: the forward added one.
        Otherwise as `batch_norm_backward`. dresidual is the pulled-back dy (dout itself without an
        activation).
    """
    dout, M, C, inner, p, fwd, flags = _act_inputs(dout, x, weight, act, act_params, out, bias, residual,
                                                   has_residual)
    write_dy = needs_dresidual and act != "none"
    dx = torch.empty_like(x) if needs_dx else None
    dres = (torch.empty_like(x) if write_dy else dout) if needs_dresidual else None
    dw = db = part_dw = part_db = None
    cfg = configs.reduce_cols(configs.nominal(M), C, heavy=heavy_act(act))
    split = 1
    if needs_dweight or needs_dbias or (needs_dx and training) or write_dy:
        # Σ dy·x̂ and Σ dy per channel: dweight and dbias, and what training dx reads. In slices where the
        # dx kernel adds them up (and writes dweight, dbias); else one slice, the sums themselves.
        c_blocks = configs.cdiv(C, cfg["BLOCK_C"])
        if needs_dx and training:
            split = configs.reduce_split(M, c_blocks, cfg["BLOCK_R"])
        part_dw, part_db = _reduce(dout, x, save_mean, save_invstd, fwd, p, dres if write_dy else None, M, C, inner,
                                   split, flags, cfg)
        if split == 1:
            dw, db = part_dw.view(C), part_db.view(C)
        elif needs_dweight or needs_dbias:
            dw = torch.empty(C, device=x.device, dtype=torch.float32)
            db = torch.empty(C, device=x.device, dtype=torch.float32)
    if needs_dx:
        grid = (configs.cdiv(M, cfg["BLOCK_R"]), configs.cdiv(C, cfg["BLOCK_C"]))
        if write_dy and dres.dtype == torch.float32:  # read back the pulled-back dy the reduction wrote (unrounded)
            src, fwd, flags = dres, (None,) * 4, dict(flags, ACT="none", ACT_FROM_OUT=False, HAS_RES=False,
                                                       HAS_BIAS=False)
        else:
            src = dout
        reads_x = training or (flags["ACT"] != "none" and not flags["ACT_FROM_OUT"])
        write_sums = training and split > 1 and dw is not None
        launch(_batch_norm_bwd_dx_kernel, grid, src, x if reads_x else None, weight, save_mean, save_invstd,
               part_dw if training else None, part_db if training else None, dw if write_sums else None,
               db if write_sums else None, dx, fwd[0], fwd[1], fwd[3], *p, M, C, inner, split,
               TRAINING=training, WRITE_SUMS=write_sums, BLOCK_S=16, **flags, **cfg)
    return dx, (dw if needs_dweight else None), (db if needs_dbias else None), dres


def _act_inputs(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, act: str,
                act_params: tuple[float, ...], out: torch.Tensor | None, bias: torch.Tensor | None,
                residual: torch.Tensor | None, has_residual: bool) -> tuple:
    """(dout contiguous, M, C, inner, the activation's 3 parameters, what act' reads (out, residual, weight,
    bias; None where it reads none), the kernels' flags) of a batch_norm_act backward."""
    N, C = x.shape[0], x.shape[1]
    inner = x.numel() // max(N * C, 1)
    M = N * inner
    dout = dout.contiguous()  # an upstream gradient may arrive expanded (stride 0) from autograd
    from_out = act != "none" and SAVES[act] == "y"
    if act != "none" and (out is None if from_out else (SAVES[act] == "x" and has_residual and residual is None)):
        raise ValueError(f"batch_norm_act_backward: act' of {act} needs the forward's "
                         f"{'output' if from_out else 'residual'}")
    p = (tuple(float(v) for v in act_params) + (0.0, 0.0, 0.0))[:3]
    fwd = (out if from_out else None, residual if has_residual and not from_out and act != "none" else None,
           weight if act != "none" and not from_out else None, bias if act != "none" and not from_out else None)
    flags = dict(ACT=act, ACT_FROM_OUT=from_out, HAS_RES=fwd[1] is not None, HAS_WEIGHT=weight is not None,
                 HAS_BIAS=fwd[3] is not None)
    return dout, M, C, inner, p, fwd, flags


def _reduce(dout: torch.Tensor, x: torch.Tensor, save_mean: torch.Tensor, save_invstd: torch.Tensor, fwd: tuple,
            p: tuple, dy_out: torch.Tensor | None, M: int, C: int, inner: int, split: int, flags: dict,
            cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The reduction kernel: [split, C] partials of Σ dy·x̂ and Σ dy (dy pulled back through the activation,
    and written to dy_out where given)."""
    rows = configs.cdiv(configs.cdiv(M, split), cfg["BLOCK_R"]) * cfg["BLOCK_R"]
    part_dw = torch.empty(split, C, device=x.device, dtype=torch.float32)
    part_db = torch.empty(split, C, device=x.device, dtype=torch.float32)
    launch(_batch_norm_bwd_dwdb_kernel, (split, configs.cdiv(C, cfg["BLOCK_C"])), dout, x, save_mean, save_invstd,
           part_dw, part_db, *fwd, dy_out, *p, M, C, inner, rows, WRITE_DY=dy_out is not None, **flags, **cfg)
    return part_dw, part_db


@dataclass
class BatchNormPending:
    """A batch norm's backward after its reduction kernel, its dx not yet made: what the conv before it
    reads to make that dx in its own GEMMs' prologue (kernels/conv_relu_pool.py), and where that conv's dw
    kernel writes dweight and dbias."""

    dy: torch.Tensor  # dy' [N, C, ...]: pulled back through the activation (the upstream gradient without one)
    x: torch.Tensor  # the batch norm's input, the conv's output
    weight: torch.Tensor | None
    mean: torch.Tensor
    invstd: torch.Tensor
    part_dw: torch.Tensor  # [SPLIT, C] partial Σ dy'·x̂
    part_db: torch.Tensor  # [SPLIT, C] partial Σ dy'
    training: bool  # batch statistics: dx flows through the mean and variance too
    dweight: torch.Tensor | None  # [C] fp32, written by the conv's dw kernel (where needed)
    dbias: torch.Tensor | None


def batch_norm_pending(dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None,
                       save_mean: torch.Tensor, save_invstd: torch.Tensor, *, training: bool, needs_dweight: bool,
                       needs_dbias: bool, act: str = "none", act_params: tuple[float, ...] = (),
                       out: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                       residual: torch.Tensor | None = None, has_residual: bool = False,
                       needs_dresidual: bool = False) -> tuple[BatchNormPending, torch.Tensor | None]:
    """(pending, dresidual): batch_norm_act_backward's reduction only, for a conv that makes dx itself.

    dy' is written (in x's dtype: callers pass float32 or float64 x, so nothing is rounded that the dx
    kernel would not) where an activation pulls it back; it is the residual's gradient too."""
    dout, M, C, inner, p, fwd, flags = _act_inputs(dout, x, weight, act, act_params, out, bias, residual,
                                                   has_residual)
    cfg = configs.reduce_cols(configs.nominal(M), C, heavy=heavy_act(act))
    split = configs.reduce_split(M, configs.cdiv(C, cfg["BLOCK_C"]), cfg["BLOCK_R"])
    dy = torch.empty_like(x) if act != "none" else dout
    part_dw, part_db = _reduce(dout, x, save_mean, save_invstd, fwd, p, dy if act != "none" else None, M, C, inner,
                               split, flags, cfg)
    f32 = lambda need: torch.empty(C, device=x.device, dtype=torch.float32) if need else None  # noqa: E731
    pending = BatchNormPending(dy, x, weight, save_mean, save_invstd, part_dw, part_db, training, f32(needs_dweight),
                               f32(needs_dbias))
    return pending, (dy if needs_dresidual else None)
