"""Template: training-mode dropout as one 1-D Triton kernel, y = x * keep / (1 - p); channel-wise
(dropout2d, `inner` > 0) draws one keep per (n, c), i.e. per `inner` consecutive elements.

The keep mask comes from `fusednn.kernels.dropout._dropout_keep(seed, index, p)`, imported by the
generated file, so the backward (kernels/dropout.py) regenerates the same mask from the same seed.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusednn.compiler.source import Source
from fusednn.kernels.dropout import check_p, dropout_scale


@dataclass(frozen=True, slots=True)
class DropoutSpec:
    """Dropout over `numel` elements with drop probability p (inner > 0: one draw per `inner` elements);
    `labels` are the IR nodes it implements."""

    name: str
    header: str
    labels: tuple[str, ...]
    numel: int
    p: float
    inner: int = 0


def generate(spec: DropoutSpec) -> str:
    """The source of a module defining kernel `spec.name` and `launch(x, y, seed)`."""
    p = check_p(spec.p)
    if not isinstance(spec.numel, int) or not 0 <= spec.numel < 2**31:
        raise ValueError(f"{spec.name}: numel must be an int in [0, 2**31), got {spec.numel!r}")
    if not spec.name.isidentifier():
        raise ValueError(f"{spec.name!r} is not a Python identifier")
    src = Source()
    for line in spec.header.rstrip("\n").splitlines():
        src.writeline(line)
    src.writelines("""
        import triton
        import triton.language as tl

        from fusednn.compiler import configs as _configs
        from fusednn.kernels.dropout import _dropout_keep, check_seed
        from fusednn.launch import launch as _launch


        # numel follows the batch and seed changes every call: neither may pick a compiled variant
        @triton.jit(do_not_specialize=["seed", "numel"])
    """)
    src.writeline(f"def {spec.name}(")
    with src.indent():
        src.writelines(f"""
            x_ptr,  # [{spec.numel}] input
            y_ptr,  # [{spec.numel}] output
            seed,  # Philox seed; the backward passes the same one to regenerate the mask
            numel,
            BLOCK: tl.constexpr,
        """)
    src.writeline("):")
    with src.indent():
        src.writeline("pid = tl.program_id(0)")
        src.writeline("offs = pid * BLOCK + tl.arange(0, BLOCK)")
        src.writeline("mask = offs < numel")
        src.writeline("x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)")
        for label in spec.labels:
            src.writeline(f"# {label}")
        draw = f"offs // {spec.inner}" if spec.inner > 0 else "offs"  # dropout2d: one draw per (n, c)
        src.writeline(f"keep = _dropout_keep(seed, {draw}, {p!r})  # the mask depends on (seed, index) only")
        # x * 0 rather than 0 where dropped: a NaN x stays NaN, as in torch (x * mask * scale).
        src.writeline(f"y = x * tl.where(keep, {dropout_scale(p)!r}, 0.0)")
        src.writeline("tl.store(y_ptr + offs, y, mask=mask)")
    src.writeline()
    src.writeline()
    src.writeline("def launch(x, y, seed: int, nbytes=None):")
    with src.indent():
        src.writeline(f'"""Run {spec.name} (p = {p!r}) over x\'s elements into the preallocated y ({spec.numel} at '
                      f'the nominal batch, which picks the block)."""')
        src.writeline("numel = x.numel()")
        src.writeline(f"meta = _configs.elementwise({spec.numel})")
        src.writeline(f'_launch({spec.name}, (_configs.cdiv(numel, meta["BLOCK"]),), x, y, '
                      f'check_seed(seed), numel, nbytes=nbytes, **meta)')
    return src.getvalue()
