"""Forward template for batch norm over x viewed as contiguous [N, C, inner] (inner = H*W, or 1 for [N, C]).

A channel's statistics run over its M = N*inner values. With batch statistics (training, or no running
stats) they come from per tile of rows partials: each tile's mean and sum of squared deviations per
channel and its row count (corrected two-pass in registers: no E[x²] − E[x]² cancellation, the mean
corrected for the rounding of its sum). Where a conv produces x (`partials`, passes.conv_batch_stats), its
epilogue has already written them (compiler/templates/conv.py `stats`); otherwise (`tile_stats`) a first
kernel of this module writes them, one program per tile and channel block (`_emit_tile_stats`). The batch
norm kernel never walks x for the statistics: each program combines the tiles' partials in tile order
(Chan, Golub & LeVeque: mean = Σ nₜ meanₜ / M, M2 = Σ M2ₜ + nₜ (meanₜ − mean)²), the same bits in every
program, and normalises its own slice of rows; the first row slice saves the statistics and updates the
running ones. Both grids split the rows (configs.normalize_split), so the whole GPU works on it, and
everything is deterministic. With running statistics (eval) the op is pointwise per channel and the grid
also splits the rows.

The normalise pass may go on, in registers, with what follows the batch norm in a network (the
`batch_norm_act` group of passes.fuse_batch_norm): a residual add (the other operand read once) and any
activation of kernels/activation.py, so `relu(bn(conv(x)) + shortcut)` writes only its result.
Backward: kernels/batch_norm.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusednn.compiler.source import Source
from fusednn.kernels.activation import SAVES, heavy_act


@dataclass(frozen=True, slots=True)
class BatchNormSpec:
    """batch_norm of [N, C, inner] with torch's BatchNorm semantics; momentum None: the cumulative moving
    average, factor 1 / num_batches_tracked, read from the counter on the device (after its update)."""

    name: str
    header: str
    labels: tuple[str, ...]
    N: int
    C: int
    inner: int
    training: bool
    momentum: float | None = 0.1
    eps: float = 1e-5
    weight: bool = True
    bias: bool = True
    track_running_stats: bool = True
    act: str = "none"  # an activation of kernels/activation.py applied after the (residual add of the) affine map
    act_params: tuple[float, ...] = ()  # its parameters, in the order its `_<act>` helper takes them
    residual: bool = False  # y = act(bn(x) + residual), the residual of x's shape
    partials: bool = False  # batch statistics from the producing conv's per-tile partials (module docstring)
    tile_stats: bool = False  # batch statistics from partials its own first kernel writes (`_emit_tile_stats`)
    count: int = 0  # added to num_batches_tracked by program (0, 0) with the running statistics' update

    @property
    def batch_stats(self) -> bool:
        """Normalise with the batch's statistics: in training, and always without running stats (as torch)."""
        return self.training or not self.track_running_stats


# The row loop shared by every pass: row r is (n, i) = (r // INNER, r % INNER); channel c sits at stride INNER.
_TILE = """
rows = r0 + tl.arange(0, BLOCK_R)
offs = ((rows // INNER) * (C * INNER) + rows % INNER)[:, None] + chans[None, :] * INNER
mask = (rows < M)[:, None] & c_ok[None, :]
x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
"""


def generate(spec: BatchNormSpec) -> str:
    """The text of a kernel file defining `spec.name` and
    `launch(x, weight, bias, running_mean, running_var, y, save_mean, save_invstd, counter=None)`."""
    M = spec.N * spec.inner
    if spec.batch_stats and M < 2:
        # torch raises the same: the unbiased variance of one value is undefined
        raise ValueError(f"batch_norm in training needs more than 1 value per channel, got input "
                         f"[{spec.N}, {spec.C}, {spec.inner}]")
    update = spec.training and spec.track_running_stats
    use_running = not spec.batch_stats
    if spec.act != "none" and spec.act not in SAVES:
        raise ValueError(f"batch_norm: unknown activation {spec.act!r}")
    if (spec.partials or spec.tile_stats) and not spec.batch_stats:
        raise ValueError("batch_norm: per-tile partial statistics are for batch statistics")
    if spec.batch_stats and not (spec.partials or spec.tile_stats):
        raise ValueError("batch_norm: batch statistics come from per-tile partials (the conv's, or tile_stats)")
    partials = spec.partials or spec.tile_stats
    params = ["x_ptr,  # [N, C, INNER] input, contiguous"]
    args = ["x"]
    if spec.residual:
        params.append("res_ptr,  # [N, C, INNER] residual added after the affine map, contiguous")
        args.append("residual")
    if spec.weight:
        params.append("w_ptr,  # [C] weight (gamma)")
        args.append("weight")
    if spec.bias:
        params.append("b_ptr,  # [C] bias (beta)")
        args.append("bias")
    if update or use_running:
        what = "updated in place" if update else "read"
        params += [f"rmean_ptr,  # [C] running mean, {what}",
                   f"rvar_ptr,  # [C] running (unbiased) variance, {what}"]
        args += ["running_mean", "running_var"]
    params += ["y_ptr,  # [N, C, INNER] output",
               "mean_ptr,  # [C] mean used, saved for backward",
               "invstd_ptr,  # [C] 1/sqrt(var + eps) used, saved for backward"]
    args += ["y", "save_mean", "save_invstd"]
    cma = update and spec.momentum is None
    if spec.count and (not update or cma):
        raise ValueError("batch_norm: a kernel counts batches only with the running statistics' update at a momentum")
    if cma:
        params.append("count_ptr,  # [] int64 num_batches_tracked, already counted: the factor is 1/count")
        args.append("counter")
    elif spec.count:
        params.append(f"count_ptr,  # [] int64 num_batches_tracked, += {spec.count} here (BatchNorm's count of batches)")
        args.append("counter")
    if partials:
        params += ["st_ptr,  # float32 [T * (2 * C + 1)]: per row tile, the means [T, C], sums of squared "
                   "deviations [T, C], row counts [T]",
                   "T,  # row tiles of the partials",
                   "ROWS,  # rows per program, a multiple of BLOCK_R"]
        args += ["st", "st.numel() // " + str(2 * spec.C + 1), "rows"]
    params.append("N,  # batch, a runtime int: statistics divide by the actual N * INNER")
    params += [f"{p}: tl.constexpr," for p in ("C", "INNER", "EPS")]
    if update and not cma:
        params.append("MOMENTUM: tl.constexpr,")
    params += ["BLOCK_R: tl.constexpr,", "BLOCK_C: tl.constexpr,"]
    if partials:
        params.append("BLOCK_T: tl.constexpr,")

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
    if spec.act not in ("none", "neg"):
        s.writeline(f"from fusednn.kernels.activation import _{spec.act}")
    s.writeline()
    s.writeline()
    if spec.tile_stats:
        _emit_tile_stats(s, spec)
    runtime = '["N", "T", "ROWS"]' if partials else '["N"]'
    s.writeline(f'@triton.jit(do_not_specialize={runtime})  # one compiled kernel for every batch size')
    s.writeline(f"def {spec.name}(")
    with s.indent():
        for p in params:
            s.writeline(p)
    s.writeline("):")
    with s.indent():
        s.writelines(
            """
            M = N * INNER
            chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            c_ok = chans < C
            """
        )
        for label in spec.labels:
            s.writeline(f"# {label}")
        if use_running:
            _emit_eval(s, spec)
        else:
            _emit_partials(s, spec, update)
    s.writeline()
    s.writeline()
    cfg = f"configs.reduce_cols({M}, {spec.C}{', heavy=True' if heavy_act(spec.act) else ''})"
    if spec.tile_stats:
        s.writelines(f'''
            def stats_size(n):
                """Floats of the statistics partials `st` at batch n: T row tiles x (2 C + 1)."""
                return configs.cdiv(n * {spec.inner}, {cfg}["BLOCK_R"]) * {2 * spec.C + 1}
        ''')
        s.writeline()
        s.writeline()
    s.writeline("def launch(x, weight, bias, running_mean, running_var, y, save_mean, save_invstd, counter=None, "
                f"residual=None, {'st=None, ' if partials else ''}nbytes=None):")
    with s.indent():
        mode = "running" if use_running else "batch"
        then = "".join([" + residual" if spec.residual else "", f", then {spec.act}" if spec.act != "none" else ""])
        st_doc = "; st: `stats_size(n)` floats, written then read" if spec.tile_stats else ""
        s.writeline(f'"""batch_norm of [N, {spec.C}, {spec.inner}] with {mode} statistics{then} into y, '
                    f'save_mean, save_invstd; any batch N (the tiles are picked at N = {spec.N}){st_doc}."""')
        s.writeline("n = x.shape[0]")
        s.writeline(f"cfg = {cfg}")
        rows_grid = f'configs.cdiv(n * {spec.inner}, cfg["BLOCK_R"])' if use_running else "1"
        if spec.tile_stats:
            s.writeline(f'run_kernel({spec.name}_stats, (configs.cdiv(n * {spec.inner}, cfg["BLOCK_R"]), '
                        f'configs.cdiv({spec.C}, cfg["BLOCK_C"])), x, st, n, C={spec.C}, INNER={spec.inner}, **cfg)')
        if partials:
            s.writeline(f'split = configs.normalize_split(n * {spec.inner}, configs.cdiv({spec.C}, cfg["BLOCK_C"]), '
                        f'cfg["BLOCK_R"], st.numel() // {2 * spec.C + 1})')
            s.writeline(f'rows = configs.cdiv(configs.cdiv(n * {spec.inner}, split), cfg["BLOCK_R"]) * cfg["BLOCK_R"]')
            rows_grid = "split"
        s.writeline(f'grid = ({rows_grid}, configs.cdiv({spec.C}, cfg["BLOCK_C"]))')
        args.append("n")
        meta = f"C={spec.C}, INNER={spec.inner}, EPS={spec.eps!r}"
        if update and not cma:
            meta += f", MOMENTUM={spec.momentum!r}"
        if partials:
            meta += ", BLOCK_T=32"
        s.writeline(f"run_kernel({spec.name}, grid, {', '.join(args)}, {meta}, nbytes=nbytes, **cfg)")
    return s.getvalue()


def _emit_tile_stats(s: Source, spec: BatchNormSpec) -> None:
    """The statistics kernel of a batch norm whose input no conv epilogue summarised: grid (row tiles of
    BLOCK_R, channel blocks), each program writes its tile's per-channel mean and sum of squared deviations
    (corrected two-pass in registers) and row count, in the conv epilogue's layout (templates/conv.py
    `_stats_lines`), for `_emit_partials` to combine in tile order. Spread over the whole GPU: a program
    per channel block walking all N * INNER rows would leave all but a few SMs idle."""
    s.writelines(
        f"""
        @triton.jit(do_not_specialize=["N"])  # one compiled kernel for every batch size
        def {spec.name}_stats(
            x_ptr,  # [N, C, INNER] input, contiguous
            st_ptr,  # float32 [T * (2 * C + 1)] out: per row tile, means [T, C], sums of squared deviations [T, C], rows [T]
            N,  # batch, a runtime int
            C: tl.constexpr,
            INNER: tl.constexpr,
            BLOCK_R: tl.constexpr,
            BLOCK_C: tl.constexpr,
        ):
            M = N * INNER
            T = tl.num_programs(0)
            t = tl.program_id(0)
            chans = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
            c_ok = chans < C
            r0 = t * BLOCK_R
        """
    )
    with s.indent():
        s.writelines(_TILE)
        s.writelines(
            """
            n_rows = tl.minimum(M - r0, BLOCK_R).to(tl.float32)
            mean = tl.sum(x, axis=0) / n_rows
            dev = tl.where(mask, x - mean[None, :], 0.0)
            sum_dev = tl.sum(dev, axis=0)  # corrects the mean for the rounding of the first sum
            tl.store(st_ptr + t * C + chans, mean + sum_dev / n_rows, mask=c_ok)
            tl.store(st_ptr + (T + t) * C + chans, tl.sum(dev * dev, axis=0) - sum_dev * sum_dev / n_rows, mask=c_ok)
            if tl.program_id(1) == 0:
                tl.store(st_ptr + 2 * T * C + t, n_rows)
            """
        )
    s.writeline()
    s.writeline()


def _emit_update(s: Source, spec: BatchNormSpec) -> None:
    """The running statistics' update from the batch's mean and biased var."""
    if spec.momentum is None:  # read on the device: a traced step never syncs for .item()
        s.writeline("momentum = 1.0 / tl.load(count_ptr).to(tl.float32)")
    else:
        s.writeline("momentum = MOMENTUM")
    if spec.count:
        s.writeline("if tl.program_id(0) + tl.program_id(1) == 0:  # num_batches_tracked, counted once")
        with s.indent():
            s.writeline(f"tl.store(count_ptr, tl.load(count_ptr) + {spec.count})")
    s.writelines(
        """
        # running stats exactly as torch: running_var takes the unbiased variance
        rm = tl.load(rmean_ptr + chans, mask=c_ok, other=0.0).to(tl.float32)
        rv = tl.load(rvar_ptr + chans, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(rmean_ptr + chans, (1.0 - momentum) * rm + momentum * mean, mask=c_ok)
        tl.store(rvar_ptr + chans, (1.0 - momentum) * rv + momentum * (var * M / (M - 1)), mask=c_ok)
        """
    )


# The partial statistics of tiles t0 .. t0 + BLOCK_T of the conv (row count, mean; `m2` adds the sums of
# squared deviations), the tiles past T masked to nothing.
_PARTIALS = """
t = t0 + tl.arange(0, BLOCK_T)
t_ok = t < T
t_at = t[:, None] * C + chans[None, :]
t_mask = t_ok[:, None] & c_ok[None, :]
t_rows = tl.load(st_ptr + 2 * T * C + t, mask=t_ok, other=0.0)
t_mean = tl.load(st_ptr + t_at, mask=t_mask, other=0.0)
"""


def _emit_partials(s: Source, spec: BatchNormSpec, update: bool) -> None:
    """Batch statistics from per-tile partials (a conv epilogue's, or `_emit_tile_stats`'s); grid (row
    slices, channel blocks)."""
    s.writelines(
        """
        # the statistics from the per-tile partials, combined in tile order (every program alike)
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
        """
    )
    with s.indent():
        s.writelines(_PARTIALS)
        s.writeline("acc += t_rows[:, None] * t_mean")
    s.writelines(
        """
        mean = tl.sum(acc, axis=0) / M
        # second pass: the tiles' deviations d from that mean; Σ nₜ d corrects the mean for the rounding of
        # the first sum, as the corrected two-pass of the kernel without partials
        acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        acc_d = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
        for t0 in range(0, T, BLOCK_T):
        """
    )
    with s.indent():
        s.writelines(_PARTIALS)
        s.writeline("d = tl.where(t_mask, t_mean - mean[None, :], 0.0)")
        s.writeline("acc += tl.load(st_ptr + T * C + t_at, mask=t_mask, other=0.0) + t_rows[:, None] * d * d")
        s.writeline("acc_d += t_rows[:, None] * d")
    s.writelines(
        """
        sum_d = tl.sum(acc_d, axis=0)
        mean += sum_d / M
        var = (tl.sum(acc, axis=0) - sum_d * sum_d / M) / M  # biased: what normalises
        invstd = 1.0 / tl.sqrt(var + EPS)
        if tl.program_id(0) == 0:  # the first row slice saves them and updates the running statistics
        """
    )
    with s.indent():
        s.writeline("tl.store(mean_ptr + chans, mean, mask=c_ok)")
        s.writeline("tl.store(invstd_ptr + chans, invstd, mask=c_ok)")
        if update:
            _emit_update(s, spec)
    y = _emit_scale(s, spec)
    s.writeline("first = tl.program_id(0) * ROWS")
    s.writeline("for r0 in range(first, tl.minimum(first + ROWS, M), BLOCK_R):")
    with s.indent():
        s.writelines(_TILE)
        _emit_store(s, spec, y)


def _emit_eval(s: Source, spec: BatchNormSpec) -> None:
    """Running statistics: pointwise per channel; grid (row blocks, channel blocks), no loop."""
    s.writelines(
        """
        mean = tl.load(rmean_ptr + chans, mask=c_ok, other=0.0).to(tl.float32)
        invstd = 1.0 / tl.sqrt(tl.load(rvar_ptr + chans, mask=c_ok, other=1.0).to(tl.float32) + EPS)
        if tl.program_id(0) == 0:  # the first row block saves what backward needs
            tl.store(mean_ptr + chans, mean, mask=c_ok)
            tl.store(invstd_ptr + chans, invstd, mask=c_ok)
        """
    )
    y = _emit_scale(s, spec)
    s.writeline("r0 = tl.program_id(0) * BLOCK_R")
    s.writelines(_TILE)
    _emit_store(s, spec, y)


def _emit_scale(s: Source, spec: BatchNormSpec) -> str:
    """Emit the per-channel affine factors; return the expression of y over a tile x."""
    scale = "invstd"
    if spec.weight:
        s.writeline("scale = invstd * tl.load(w_ptr + chans, mask=c_ok, other=0.0)")
        scale = "scale"
    y = f"(x - mean[None, :]) * {scale}[None, :]"
    if spec.bias:
        s.writeline("shift = tl.load(b_ptr + chans, mask=c_ok, other=0.0)")
        y += " + shift[None, :]"
    return y


def _emit_store(s: Source, spec: BatchNormSpec, y: str) -> None:
    """Store the normalised tile y, after the fused residual add and activation, each under its IR label."""
    roles = spec.labels[1:]  # the absorbed add and activation, in order
    if spec.residual or spec.act != "none":
        s.writeline(f"z = {y}")
        y = "z"
    if spec.residual:
        s.writeline(f"# {roles[0]}" if roles else "# + residual")
        s.writeline("z += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)")
    if spec.act != "none":
        s.writeline(f"# {roles[-1]}" if roles else f"# {spec.act}")
        params = "".join(f", {float(p)!r}" for p in spec.act_params)
        s.writeline("z = -z" if spec.act == "neg" else f"z = _{spec.act}(z{params})")
    s.writeline(f"tl.store(y_ptr + offs, {y}, mask=mask)")
