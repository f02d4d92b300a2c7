"""Forward template for the reductions sum / mean / amax over any set of dims (x.mean((2, 3)), torch.amax).

x is read through `kernels/reduce.py`'s layout: its dims merged into at most 4 runs, each kept or reduced;
a program owns BLOCK_M outputs and walks each one's R reduced positions in BLOCK_R steps, then sums (or
maxes) its BLOCK_R partials in a fixed tree: a fixed order, so reruns are bit-identical. Sizes and strides
are runtime arguments (the batch can change without a recompile). Backward: kernels/reduce.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusednn.compiler.source import Source
from fusednn.kernels.reduce import KINDS


@dataclass(frozen=True, slots=True)
class ReduceSpec:
    """`kind` (sum | mean | amax) of a contiguous tensor over `dims` (non-negative); `labels` are its IR nodes."""

    name: str
    header: str
    labels: tuple[str, ...]
    kind: str
    dims: tuple[int, ...]


def _unravel_lines(s: Source, rem: str, offs: str, flag: str) -> None:
    """Peel the 4 merged dims (innermost first) off the flat index `rem`: x and y offsets."""
    for i in (3, 2, 1, 0):
        s.writeline(f"{rem}, {offs} = _unravel({rem}, S{i}, {flag.format(i=i)}, X{i}, 0, Y{i}, {offs})")


def generate(spec: ReduceSpec) -> str:
    """The text of a kernel file defining `spec.name` and `launch(x, y)`."""
    if spec.kind not in KINDS:
        raise ValueError(f"{spec.name}: kind must be one of {KINDS}, got {spec.kind!r}")
    amax = spec.kind == "amax"
    s = Source()
    s.writelines(spec.header)
    s.writelines(
        """
        from __future__ import annotations

        import triton
        import triton.language as tl

        from fusednn.compiler import configs
        from fusednn.kernels.broadcast import _unravel
        from fusednn.kernels.reduce import layout_args, reduce_layout
        from fusednn.launch import launch as run_kernel
        """
    )
    s.writeline()
    s.writeline()
    s.writeline('@triton.jit(do_not_specialize=["M", "R"])  # sizes that may follow the batch')
    s.writeline(f"def {spec.name}(")
    with s.indent():
        s.writelines(
            """
            x_ptr,  # input, contiguous
            y_ptr,  # [M] result, contiguous (with or without the reduced dims kept: the same memory)
            M,  # outputs
            R,  # reduced positions per output
            S0, S1, S2, S3,  # sizes of the merged dims of x, outermost first
            X0, X1, X2, X3,  # x strides
            Y0, Y1, Y2, Y3,  # y strides, 0 on reduced dims
            K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr,  # dim kept (1) or reduced (0)
            BLOCK_M: tl.constexpr,
            BLOCK_R: tl.constexpr,
            """
        )
    s.writeline("):")
    with s.indent():
        s.writeline("m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)")
        s.writeline("zero = m * 0")
        s.writeline("rem, x_m, unused, y_m = m, zero, zero, zero")
        _unravel_lines(s, "rem", "x_m, unused, y_m", "K{i}")
        fill = 'float("-inf")' if amax else "0.0"
        s.writeline(f"acc = tl.full((BLOCK_M, BLOCK_R), {fill}, dtype=tl.float32)")
        if amax:
            s.writeline("nan = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.int32)")
        s.writeline("for r0 in range(0, R, BLOCK_R):")
        with s.indent():
            s.writeline("r = r0 + tl.arange(0, BLOCK_R)")
            s.writeline("zr = r * 0")
            s.writeline("rem_r, x_r, unused_r, unused_y = r, zr, zr, zr")
            for i in (3, 2, 1, 0):
                s.writeline(f"rem_r, x_r, unused_r, unused_y = _unravel(rem_r, S{i}, 1 - K{i}, X{i}, 0, 0, "
                            "x_r, unused_r, unused_y)")
            s.writeline("mask = (m[:, None] < M) & (r[None, :] < R)")
            for label in spec.labels:
                s.writeline(f"# {label}")
            s.writeline(f"x = tl.load(x_ptr + x_m[:, None] + x_r[None, :], mask=mask, other={fill}).to(tl.float32)")
            if amax:
                # NaN is tracked apart: tl.maximum's NaN handling differs between the GPU and the interpreter
                s.writeline("nan = nan | (x != x).to(tl.int32)")
                s.writeline('acc = tl.maximum(acc, tl.where(x != x, float("-inf"), x))')
            else:
                s.writeline("acc += x")
        if amax:
            s.writeline('y = tl.where(tl.max(nan, axis=1) > 0, float("nan"), tl.max(acc, axis=1))')
        elif spec.kind == "mean":
            s.writeline("y = tl.sum(acc, axis=1) / R")
        else:
            s.writeline("y = tl.sum(acc, axis=1)")
        s.writeline("tl.store(y_ptr + y_m, y, mask=m < M)")
    s.writeline()
    s.writeline()
    s.writeline("def launch(x, y):")
    with s.indent():
        s.writelines(
            f'''
            """y = {spec.kind}(x) over dims {list(spec.dims)}; y is preallocated."""
            M, R, runs = reduce_layout(tuple(x.shape), {tuple(spec.dims)!r})
            flat, keep = layout_args(runs)
            cfg = configs.sum_to(M, R)
            run_kernel({spec.name}, (triton.cdiv(M, cfg["BLOCK_M"]),), x, y, M, R, *flat, **keep, **cfg)
            '''
        )
    return s.getvalue()
