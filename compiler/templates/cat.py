"""Forward template for torch.cat along any dim: one copy launch per input into its slice of the result.

Viewed around the concatenated dim, input i is a contiguous [outer, inner_i] block and the result is
[outer, Σ inner_i]; input i fills columns [offset_i, offset_i + inner_i) of every row
(kernels/cat.py `cat_slices`). The sizes are runtime arguments (the batch can change without a recompile).
Backward: kernels/cat.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusednn.compiler.source import Source


@dataclass(frozen=True, slots=True)
class CatSpec:
    """Concatenation of `n_inputs` tensors along the non-negative `dim`; `labels` are its IR nodes."""

    name: str
    header: str
    labels: tuple[str, ...]
    n_inputs: int
    dim: int


def generate(spec: CatSpec) -> str:
    """The text of a kernel file defining `spec.name` and `launch(xs, y)`."""
    s = Source()
    s.writelines(spec.header)
    s.writelines(
        """
        from __future__ import annotations

        import triton
        import triton.language as tl

        from fusednn.compiler import configs
        from fusednn.kernels.cat import cat_slices
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
            x_ptr,  # [outer, INNER_X] one input, contiguous
            y_ptr,  # [outer, INNER_Y] the concatenation (written in columns OFFSET .. OFFSET + INNER_X)
            n,  # outer * INNER_X
            INNER_X,  # this input's row length
            INNER_Y,  # y's row length
            OFFSET,  # where this input's columns start in a row of y
            BLOCK: tl.constexpr,
            """
        )
    s.writeline("):")
    with s.indent():
        s.writeline("offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)")
        s.writeline("mask = offs < n")
        for label in spec.labels:
            s.writeline(f"# {label}")
        s.writeline("dst = (offs // INNER_X) * INNER_Y + OFFSET + offs % INNER_X")
        s.writeline("tl.store(y_ptr + dst, tl.load(x_ptr + offs, mask=mask), mask=mask)")
    s.writeline()
    s.writeline()
    s.writeline("def launch(xs, y):")
    with s.indent():
        s.writelines(
            f'''
            """y = cat(xs, dim={spec.dim}) of {spec.n_inputs} contiguous inputs; y is preallocated."""
            inner_y, slices = cat_slices([tuple(x.shape) for x in xs], {spec.dim})
            outer = y.numel() // inner_y if inner_y else 0
            for x, (offset, inner) in zip(xs, slices):
                n = outer * inner
                cfg = configs.elementwise(n)
                run_kernel({spec.name}, (triton.cdiv(n, cfg["BLOCK"]),), x, y, n, inner, inner_y, offset, **cfg)
            '''
        )
    return s.getvalue()
