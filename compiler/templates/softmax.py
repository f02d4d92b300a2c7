"""Forward template for softmax / log_softmax over one dim: x is viewed as contiguous [outer, D, inner].

A row is the D elements x[o, :, i] (stride inner); each program owns BLOCK_R rows and holds a whole row in
registers, so one read of x and one write of y. Backward: kernels/softmax.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusednn.compiler.source import Source


@dataclass(frozen=True, slots=True)
class SoftmaxSpec:
    """softmax (log=False) or log_softmax (log=True) over D of a contiguous [outer, D, inner] tensor."""

    name: str
    header: str
    labels: tuple[str, ...]
    outer: int
    D: int
    inner: int
    log: bool = False


def emit_log_den(s: Source) -> None:
    """Emit `log_den` = log Σ_c e^{x − m} of each row of the tile x, from m (its max), e = e^{x − m}, row_ok.

    It is computed as log1p(u), u = the sum without one of its max terms (e^0 = 1): when one logit holds
    nearly all the mass (a confident prediction), log Σ = log(1 + u) with u tiny, and forming 1 + u in
    fp32 would round u away (a loss of 2e-3 came out 4e-5 off, relatively). log1p is Goldberg's
    log(w)·u/(w − 1), w = 1 + u: exact to a few ulps with an accurate log (tl.log is libdevice's logf on
    NVIDIA).
    """
    s.writelines(
        """
        # log Σ e^{x-m} = log1p(u), u = Σ without one max term: 1 + u would round a tiny u away
        is_max = x == m[:, None]
        u = tl.sum(tl.where(is_max, 0.0, e), axis=1) + (tl.sum(is_max.to(tl.float32), axis=1) - 1.0)
        u = tl.where(row_ok, u, 0.0)
        w = 1.0 + u
        log_den = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
        """
    )


def generate(spec: SoftmaxSpec) -> str:
    """The text of a kernel file defining `spec.name` and `launch(x, y)`."""
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
    s.writeline('@triton.jit(do_not_specialize=["OUTER"])  # OUTER follows the batch')
    s.writeline(f"def {spec.name}(")
    with s.indent():
        s.writelines(
            """
            x_ptr,  # [OUTER, D, INNER] input, contiguous
            y_ptr,  # [OUTER, D, INNER] output
            OUTER,  # runtime: one compiled kernel serves every batch size
            D: tl.constexpr,
            INNER: tl.constexpr,
            BLOCK_R: tl.constexpr,
            BLOCK_C: tl.constexpr,
            """
        )
    s.writeline("):")
    with s.indent():
        s.writelines(
            """
            # row r is x[r // INNER, :, r % INNER]; BLOCK_C >= D, so a program sees whole rows
            rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
            cols = tl.arange(0, BLOCK_C)
            row_ok = rows < OUTER * INNER
            offs = ((rows // INNER) * (D * INNER) + rows % INNER)[:, None] + cols[None, :] * INNER
            mask = row_ok[:, None] & (cols[None, :] < D)
            """
        )
        for label in spec.labels:
            s.writeline(f"# {label}")
        s.writelines(
            """
            x = tl.load(x_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            # subtract the row max: exp never overflows, so logits of 1e4 stay finite
            m = tl.max(x, axis=1)
            m = tl.where(row_ok, m, 0.0)  # rows past the end are all -inf; keep them free of NaN
            z = x - m[:, None]
            e = tl.exp(z)
            """
        )
        if spec.log:
            emit_log_den(s)
            s.writeline("y = z - log_den[:, None]")
        else:
            s.writeline("y = e / tl.where(row_ok, tl.sum(e, axis=1), 1.0)[:, None]")
        s.writeline("tl.store(y_ptr + offs, y, mask=mask)")
    s.writeline()
    s.writeline()
    fn = "log_softmax" if spec.log else "softmax"
    s.writeline("def launch(x, y, nbytes=None):")
    with s.indent():
        s.writelines(
            f'''
            """y = {fn}(x) over D of x viewed as [outer, {spec.D}, {spec.inner}] (outer = {spec.outer} at the
            nominal batch, which picks the tiles); y is preallocated."""
            outer = x.numel() // {spec.D * spec.inner}
            cfg = configs.rows({spec.outer * spec.inner}, {spec.D})
            grid = (configs.cdiv(outer * {spec.inner}, cfg["BLOCK_R"]),)
            run_kernel({spec.name}, grid, x, y, outer, D={spec.D}, INNER={spec.inner}, nbytes=nbytes, **cfg)
            '''
        )
    return s.getvalue()
