"""Forward templates for losses: cross-entropy over [N, C] logits, and pointwise mse / l1 losses.

Reduced losses ("mean", "sum") are summed by a single program that walks the rows (elements) in a fixed
order: the loss is bit-identical from run to run (no atomics) and the whole loss is one launch. That suits
a loss over one batch of logits; for inputs of millions of elements a two-stage reduction (per-program
partial sums, then a fixed-order sum of those) would use more of the GPU. Backward: kernels/losses.py.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

from fusednn.compiler.source import Source
from fusednn.compiler.templates.softmax import emit_log_den

REDUCTIONS = ("mean", "sum", "none")


@dataclass(frozen=True, slots=True)
class CrossEntropySpec:
    """cross_entropy(logits [N, C], target int64 [N]) with torch's reduction and ignore_index rules."""

    name: str
    header: str
    labels: tuple[str, ...]
    N: int
    C: int
    reduction: str = "mean"
    ignore_index: int = -100


@dataclass(frozen=True, slots=True)
class PointLossSpec:
    """mse_loss or l1_loss (kind "mse" | "l1") between two tensors of `numel` elements."""

    name: str
    header: str
    labels: tuple[str, ...]
    numel: int
    kind: str = "mse"
    reduction: str = "mean"


_IMPORTS = """
from __future__ import annotations

import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.launch import launch as run_kernel
"""


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _labels(s: Source, labels: tuple[str, ...], part: int, parts: int) -> None:
    """Write the label comments of the IR nodes whose block starts here.

    A kernel made of `parts` blocks gets one label per block when the spec names one node per block
    (e.g. log_softmax then nll_loss); otherwise all labels go before the first block.
    """
    if len(labels) == parts:
        s.writeline(f"# {labels[part]}")
    elif part == 0:
        for label in labels:
            s.writeline(f"# {label}")


def generate_cross_entropy(spec: CrossEntropySpec) -> str:
    """The text of a kernel file defining `spec.name` and `launch(logits, target, loss, lse)`."""
    _check_reduction(spec.reduction)
    reduce = spec.reduction != "none"
    s = Source()
    s.writelines(spec.header)
    s.writelines(_IMPORTS)
    s.writeline()
    s.writeline()
    s.writeline('@triton.jit(do_not_specialize=["N"])  # N, the batch: one kernel for every batch size')
    s.writeline(f"def {spec.name}(")
    with s.indent():
        s.writelines(
            f"""
            logits_ptr,  # [N, C] float32
            target_ptr,  # [N] int64 class index; IGNORE_INDEX rows add nothing
            loss_ptr,  # {"[] the reduced loss" if reduce else "[N] loss of each row"}
            lse_ptr,  # [N] log-sum-exp of each row, saved for backward
            N,  # rows: the batch, a runtime int
            C: tl.constexpr,
            IGNORE_INDEX: tl.constexpr,
            BLOCK_R: tl.constexpr,
            BLOCK_C: tl.constexpr,
            """
        )
    s.writeline("):")
    with s.indent():
        s.writeline("cols = tl.arange(0, BLOCK_C)")
        if reduce:
            s.writelines(
                """
                total = tl.zeros([BLOCK_R], dtype=tl.float32)
                count = tl.zeros([BLOCK_R], dtype=tl.float32)
                # this one program walks every row in order: a fixed-order, deterministic sum
                for r0 in range(0, N, BLOCK_R):
                """
            )
        with s.indent() if reduce else contextlib.nullcontext():
            if reduce:
                s.writeline("rows = r0 + tl.arange(0, BLOCK_R)")
            else:
                s.writeline("rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)")
            s.writelines(
                """
                row_ok = rows < N
                mask = row_ok[:, None] & (cols[None, :] < C)
                x = tl.load(logits_ptr + rows[:, None] * C + cols[None, :], mask=mask, other=float("-inf"))
                """
            )
            _labels(s, spec.labels, 0, 2)
            s.writelines(
                """
                # subtract the row max so exp never overflows
                m = tl.where(row_ok, tl.max(x, axis=1), 0.0)  # rows past the end are all -inf
                e = tl.exp(x - m[:, None])
                """
            )
            emit_log_den(s)
            s.writeline("tl.store(lse_ptr + rows, m + log_den, mask=row_ok)")
            _labels(s, spec.labels, 1, 2)
            s.writelines(
                """
                t = tl.load(target_ptr + rows, mask=row_ok, other=IGNORE_INDEX)
                keep = row_ok & (t != IGNORE_INDEX)
                in_range = (t >= 0) & (t < C)
                x_t = tl.load(logits_ptr + rows * C + t, mask=keep & in_range, other=0.0)
                # lse - x_t as log_den - (x_t - m): no cancellation between two large numbers.
                # A target outside [0, C) gives NaN (torch raises; a kernel cannot) instead of a wild read.
                loss = tl.where(in_range, log_den - (x_t - m), float("nan"))
                loss = tl.where(keep, loss, 0.0)
                """
            )
            if reduce:
                s.writeline("total += loss")
                s.writeline("count += keep.to(tl.float32)")
            else:
                s.writeline("tl.store(loss_ptr + rows, loss, mask=row_ok)")
        if spec.reduction == "mean":
            s.writeline("# torch's rule: divide by the number of rows not ignored (all ignored: 0 / 0 = NaN)")
            s.writeline("tl.store(loss_ptr, tl.sum(total, axis=0) / tl.sum(count, axis=0))")
        elif spec.reduction == "sum":
            s.writeline("tl.store(loss_ptr, tl.sum(total, axis=0))")
    s.writeline()
    s.writeline()
    s.writeline("def launch(logits, target, loss, lse, nbytes=None):")
    with s.indent():
        s.writeline(
            f'"""cross_entropy(logits [N, {spec.C}], target [N], reduction={spec.reduction!r}) into loss; '
            f'lse [N] for backward. Any batch N; the tiles are picked at N = {spec.N}."""'
        )
        s.writeline("n = logits.shape[0]")
        s.writeline(f"cfg = configs.rows({spec.N}, {spec.C})")
        if reduce:
            s.writeline("grid = (1,)")
        else:
            s.writeline('grid = (configs.cdiv(n, cfg["BLOCK_R"]),)')
        s.writeline(
            f"run_kernel({spec.name}, grid, logits, target, loss, lse, n, C={spec.C}, "
            f"IGNORE_INDEX={spec.ignore_index}, nbytes=nbytes, **cfg)"
        )
    return s.getvalue()


def generate_point_loss(spec: PointLossSpec) -> str:
    """The text of a kernel file defining `spec.name` and `launch(x, t, loss)`."""
    _check_reduction(spec.reduction)
    if spec.kind not in ("mse", "l1"):
        raise ValueError(f"point loss kind must be 'mse' or 'l1', got {spec.kind!r}")
    reduce = spec.reduction != "none"
    s = Source()
    s.writelines(spec.header)
    s.writelines(_IMPORTS)
    s.writeline()
    s.writeline()
    s.writeline('@triton.jit(do_not_specialize=["NUMEL"])  # NUMEL follows the batch')
    s.writeline(f"def {spec.name}(")
    with s.indent():
        s.writelines(
            f"""
            x_ptr,  # [NUMEL] input
            t_ptr,  # [NUMEL] target
            loss_ptr,  # {"[] the reduced loss" if reduce else "[NUMEL] loss of each element"}
            NUMEL,  # runtime: one compiled kernel serves every batch size ('mean' divides by it)
            BLOCK: tl.constexpr,
            """
        )
    s.writeline("):")
    with s.indent():
        if reduce:
            s.writelines(
                """
                total = tl.zeros([BLOCK], dtype=tl.float32)
                # this one program walks every element in order: a fixed-order, deterministic sum
                for start in range(0, NUMEL, BLOCK):
                """
            )
        with s.indent() if reduce else contextlib.nullcontext():
            if reduce:
                s.writeline("offs = start + tl.arange(0, BLOCK)")
            else:
                s.writeline("offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)")
            s.writelines(
                """
                mask = offs < NUMEL
                x = tl.load(x_ptr + offs, mask=mask, other=0.0)
                t = tl.load(t_ptr + offs, mask=mask, other=0.0)
                """
            )
            _labels(s, spec.labels, 0, 1)
            s.writeline("d = x - t")
            s.writeline("loss = d * d" if spec.kind == "mse" else "loss = tl.abs(d)")
            s.writeline("total += loss" if reduce else "tl.store(loss_ptr + offs, loss, mask=mask)")
        if spec.reduction == "mean":
            s.writeline("tl.store(loss_ptr, tl.sum(total, axis=0) / NUMEL)")
        elif spec.reduction == "sum":
            s.writeline("tl.store(loss_ptr, tl.sum(total, axis=0))")
    s.writeline()
    s.writeline()
    fn = "mse_loss" if spec.kind == "mse" else "l1_loss"
    s.writeline("def launch(x, t, loss, nbytes=None):")
    with s.indent():
        s.writeline(f'"""{fn}(x, t, reduction={spec.reduction!r}) over x\'s elements into loss ({spec.numel} at '
                    f'the nominal batch, which picks the block)."""')
        s.writeline("numel = x.numel()")
        s.writeline(f"cfg = configs.elementwise({spec.numel})")
        if reduce:
            s.writeline("grid = (1,)")
        else:
            s.writeline('grid = (configs.cdiv(numel, cfg["BLOCK"]),)')
        s.writeline(f"run_kernel({spec.name}, grid, x, t, loss, numel, nbytes=nbytes, **cfg)")
    return s.getvalue()


def generate(spec: CrossEntropySpec | PointLossSpec) -> str:
    """The text of the kernel file for either loss spec."""
    if isinstance(spec, CrossEntropySpec):
        return generate_cross_entropy(spec)
    return generate_point_loss(spec)
