"""Forward template for row normalizations (layer_norm, group_norm, instance_norm with batch statistics).

All three see x as contiguous [N, G, CPG, INNER] and normalise each of its R = N*G rows of L = CPG*INNER
values with the row's own mean and variance; the affine parameter of a value is p = g*CPG + cpg:
  layer_norm     G = 1, CPG = L (normalized_shape flattened), INNER = 1: p is the column
  group_norm     G = groups, CPG = C/groups, INNER = H*W: p is the channel
  instance_norm  G = C, CPG = 1, INNER = H*W: p is the channel (= the row's channel)
Each program owns BLOCK_R rows and walks them three times in BLOCK_L steps, in a fixed order (bit-identical
reruns): sum (first mean m1), the deviations d = x − m1 summed and squared (corrected two-pass: no
E[x²] − E[x]² cancellation), normalise. The mean is kept as the pair (m1, Σd/L) and x − m1 − Σd/L is
evaluated in that order: x − m1 is exact for x near m1 (Sterbenz), while rounding m1 + Σd/L to one
float32 would move the mean by up to half an ulp of m1: 5% of the spread for x = 1e4 + 1e-2·randn.
instance_norm with running statistics in training also averages its rows' statistics over N into the
running mean and (unbiased) variance: a second kernel, one program per channel block, N in order.
Backward: kernels/norm.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusednn.compiler.source import Source


@dataclass(frozen=True, slots=True)
class NormSpec:
    """A row normalization of x as [N, G, CPG, INNER] (N, the batch, is a runtime argument)."""

    name: str
    header: str
    labels: tuple[str, ...]
    G: int
    CPG: int
    INNER: int
    eps: float = 1e-5
    weight: bool = False
    bias: bool = False
    update_running: bool = False  # instance_norm in training with running stats: update them
    momentum: float = 0.1

    @property
    def L(self) -> int:
        """Values per row."""
        return self.CPG * self.INNER


# The tile every pass loads: BLOCK_R rows by BLOCK_L of their values, from column l0.
_TILE = """
cols = l0 + tl.arange(0, BLOCK_L)
mask = r_ok[:, None] & (cols < L)[None, :]
offs = rows[:, None] * L + cols[None, :]
x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
"""


def generate(spec: NormSpec) -> str:
    """The text of a kernel file defining `spec.name` and
    `launch(x, weight, bias, running_mean, running_var, y, save_mean, save_mean_lo, save_invstd)`."""
    if spec.update_running and spec.L < 2:
        # torch refuses the same: the unbiased variance of one value is undefined
        raise ValueError(f"instance_norm in training needs more than 1 value per channel, got {spec.L}")
    params = ["x_ptr,  # [R, L] input, contiguous"]
    if spec.weight:
        params.append("w_ptr,  # [G*CPG] weight")
    if spec.bias:
        params.append("b_ptr,  # [G*CPG] bias")
    params += ["y_ptr,  # [R, L] output",
               "mean_ptr,  # [R] first-pass mean m1 of each row, saved for backward",
               "mean_lo_ptr,  # [R] its correction Σ(x − m1)/L: the mean is m1 + mean_lo",
               "invstd_ptr,  # [R] 1/sqrt(var + eps), saved for backward"]
    if spec.update_running:
        params.append("var_ptr,  # [R] biased variance of each row, for the running-stat update")
    params += ["R,  # rows: N * G", "G: tl.constexpr,", "CPG: tl.constexpr,", "INNER: tl.constexpr,",
               "EPS: tl.constexpr,", "BLOCK_R: tl.constexpr,", "BLOCK_L: tl.constexpr,"]

    s = Source()
    s.writelines(spec.header)
    s.writelines(
        """
        from __future__ import annotations

        import triton
        import triton.language as tl

        from fusednn.compiler import configs
        from fusednn.launch import launch as run_kernel
        """
    )
    s.writeline()
    s.writeline()
    s.writeline('@triton.jit(do_not_specialize=["R"])  # R = N * G rows: one kernel for every batch size')
    s.writeline(f"def {spec.name}(")
    with s.indent():
        s.writelines("\n".join(params))
    s.writeline("):")
    with s.indent():
        s.writelines(
            """
            L = CPG * INNER
            rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
            r_ok = rows < R
            """
        )
        for label in spec.labels:
            s.writeline(f"# {label}")
        _emit_body(s, spec)
    if spec.update_running:
        _emit_running(s, spec)
    s.writeline()
    s.writeline()
    s.writeline("def launch(x, weight, bias, running_mean, running_var, y, save_mean, save_mean_lo, save_invstd):")
    with s.indent():
        s.writeline(f'"""Normalise the rows of x ([N, {spec.G}, {spec.CPG}, {spec.INNER}]) into y; save the row '
                    'statistics."""')
        s.writeline(f"R = x.numel() // {spec.L}")
        s.writeline(f"cfg = configs.norm_rows(R, {spec.L})")
        args = ["x"] + (["weight"] if spec.weight else []) + (["bias"] if spec.bias else [])
        args += ["y", "save_mean", "save_mean_lo", "save_invstd"]
        if spec.update_running:
            s.writeline("var = save_invstd.new_empty(R)")
            args.append("var")
        meta = f"G={spec.G}, CPG={spec.CPG}, INNER={spec.INNER}, EPS={spec.eps!r}"
        s.writeline(f'run_kernel({spec.name}, (triton.cdiv(R, cfg["BLOCK_R"]),), {", ".join(args)}, R, {meta}, **cfg)')
        if spec.update_running:
            s.writeline(f"cfg = configs.reduce_cols(R // {spec.G}, {spec.G})")
            s.writeline(f'run_kernel({spec.name}_running, (triton.cdiv({spec.G}, cfg["BLOCK_C"]),), save_mean, '
                        f'save_mean_lo, var, running_mean, running_var, R // {spec.G}, C={spec.G}, L={spec.L}, '
                        f'MOMENTUM={spec.momentum!r}, BLOCK_C=cfg["BLOCK_C"], num_warps=cfg["num_warps"])')
    return s.getvalue()


def _emit_body(s: Source, spec: NormSpec) -> None:
    s.writeline("acc = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)")
    s.writeline("for l0 in range(0, L, BLOCK_L):")
    with s.indent():
        s.writelines(_TILE)
        s.writeline("acc += x")
    s.writelines(
        """
        mean = tl.sum(acc, axis=1) / L
        # second pass: Σd² over the deviations from m1 and Σd, which corrects m1 for the rounding of the
        # first sum (corrected two-pass, Chan, Golub & LeVeque)
        acc = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_R, BLOCK_L], dtype=tl.float32)
        for l0 in range(0, L, BLOCK_L):
        """
    )
    with s.indent():
        s.writelines(_TILE)
        s.writeline("d = tl.where(mask, x - mean[:, None], 0.0)")
        s.writeline("acc += d * d")
        s.writeline("acc_d += d")
    s.writelines(
        """
        sum_d = tl.sum(acc_d, axis=1)
        mean_lo = sum_d / L
        var = tl.maximum((tl.sum(acc, axis=1) - sum_d * mean_lo) / L, 0.0)  # biased: what normalises
        invstd = 1.0 / tl.sqrt(var + EPS)
        tl.store(mean_ptr + rows, mean, mask=r_ok)
        tl.store(mean_lo_ptr + rows, mean_lo, mask=r_ok)
        tl.store(invstd_ptr + rows, invstd, mask=r_ok)
        """
    )
    if spec.update_running:
        s.writeline("tl.store(var_ptr + rows, var, mask=r_ok)")
    s.writeline("for l0 in range(0, L, BLOCK_L):")
    with s.indent():
        s.writelines(_TILE)
        s.writeline("y = ((x - mean[:, None]) - mean_lo[:, None]) * invstd[:, None]")
        if spec.weight or spec.bias:
            s.writeline(_param_index(spec))
            if spec.weight:
                s.writeline("y = y * tl.load(w_ptr + p, mask=mask, other=0.0).to(tl.float32)")
            if spec.bias:
                s.writeline("y = y + tl.load(b_ptr + p, mask=mask, other=0.0).to(tl.float32)")
        s.writeline("tl.store(y_ptr + offs, y, mask=mask)")


def _param_index(spec: NormSpec) -> str:
    """The affine parameter index p = g*CPG + cpg of each tile element, in the simplest form per geometry."""
    if spec.G == 1 and spec.INNER == 1:
        return "p = tl.broadcast_to(cols[None, :], [BLOCK_R, BLOCK_L])  # layer_norm: the column"
    if spec.CPG == 1:
        return "p = tl.broadcast_to((rows % G)[:, None], [BLOCK_R, BLOCK_L])  # instance_norm: the row's channel"
    return "p = (rows % G)[:, None] * CPG + (cols // INNER)[None, :]  # group_norm: the channel"


def _emit_running(s: Source, spec: NormSpec) -> None:
    """instance_norm's running-stat update: as torch, each channel's running stats move by MOMENTUM towards
    the mean over the batch of its rows' means and unbiased variances."""
    s.writeline()
    s.writeline()
    s.writelines(
        f"""
        @triton.jit
        def {spec.name}_running(
            mean_ptr,  # [N, C] first-pass row means
            mean_lo_ptr,  # [N, C] their corrections
            var_ptr,  # [N, C] biased row variances
            rmean_ptr,  # [C] running mean, updated in place
            rvar_ptr,  # [C] running (unbiased) variance, updated in place
            N,  # batch
            C: tl.constexpr,
            L: tl.constexpr,
            MOMENTUM: tl.constexpr,
            BLOCK_C: tl.constexpr,
        ):
            chans = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
            c_ok = chans < C
            acc_m = tl.zeros([BLOCK_C], dtype=tl.float32)
            acc_v = tl.zeros([BLOCK_C], dtype=tl.float32)
            for n in range(0, N):  # in order: bit-identical reruns
                acc_m += tl.load(mean_ptr + n * C + chans, mask=c_ok, other=0.0)
                acc_m += tl.load(mean_lo_ptr + n * C + chans, mask=c_ok, other=0.0)
                acc_v += tl.load(var_ptr + n * C + chans, mask=c_ok, other=0.0)
            rm = tl.load(rmean_ptr + chans, mask=c_ok, other=0.0).to(tl.float32)
            rv = tl.load(rvar_ptr + chans, mask=c_ok, other=0.0).to(tl.float32)
            tl.store(rmean_ptr + chans, (1.0 - MOMENTUM) * rm + MOMENTUM * (acc_m / N), mask=c_ok)
            tl.store(rvar_ptr + chans, (1.0 - MOMENTUM) * rv + MOMENTUM * (acc_v / N * L / (L - 1)), mask=c_ok)
        """
    )
