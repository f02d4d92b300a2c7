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
    s.writeline("@triton.jit")
    s.writeline(f"def {spec.name}(")
    with s.indent():
        s.writelines(
            """
            x_ptr,  # [OUTER, D, INNER] input, contiguous
            y_ptr,  # [OUTER, D, INNER] output
            OUTER: tl.constexpr,
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
            x = tl.load(x_ptr + offs, mask=mask, other=float("-inf"))
            # subtract the row max: exp never overflows, so logits of 1e4 stay finite
            m = tl.max(x, axis=1)
            m = tl.where(row_ok, m, 0.0)  # rows past the end are all -inf; keep them free of NaN
            z = x - m[:, None]
            e = tl.exp(z)
            den = tl.where(row_ok, tl.sum(e, axis=1), 1.0)
            """
        )
        if spec.log:
            s.writeline("y = z - tl.log(den)[:, None]")
        else:
            s.writeline("y = e / den[:, None]")
        s.writeline("tl.store(y_ptr + offs, y, mask=mask)")
    s.writeline()
    s.writeline()
    fn = "log_softmax" if spec.log else "softmax"
    s.writeline("def launch(x, y):")
    with s.indent():
        s.writelines(
            f'''
            """y = {fn}(x) over D of x viewed as [{spec.outer}, {spec.D}, {spec.inner}]; y is preallocated."""
            n_rows = {spec.outer} * {spec.inner}
            cfg = configs.rows(n_rows, {spec.D})
            grid = (triton.cdiv(n_rows, cfg["BLOCK_R"]),)
            run_kernel({spec.name}, grid, x, y, OUTER={spec.outer}, D={spec.D}, INNER={spec.inner}, **cfg)
            '''
        )
    return s.getvalue()
