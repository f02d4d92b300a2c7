"""Forward templates for losses: cross-entropy / nll_loss over [N, C, *d] logits, and pointwise mse / l1 losses.

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
    """cross_entropy (or nll_loss, nll=True) of logits [N, C, *d] (inner = Π d) with torch's rules: int64
    class targets [N, *d] (ignore_index skipped) or class probabilities (prob=True, shaped like the
    logits), optional class weights, label_smoothing, every reduction."""

    name: str
    header: str
    labels: tuple[str, ...]
    N: int
    C: int
    reduction: str = "mean"
    ignore_index: int = -100
    inner: int = 1
    label_smoothing: float = 0.0
    prob: bool = False
    weight: bool = False
    nll: bool = False


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
    """The text of a kernel file defining `spec.name` and `launch(logits, target, weight, loss, lse, den)`.

    Row r (of N·inner) is logits[r // inner, :, r % inner] (class stride inner). With z = x − max and
    log_den = log Σ e^z, −log p_c = log_den − z_c, and per row (w = class weights, 1 without; ε = label
    smoothing):
      class target t:  loss = (1 − ε) w_t (log_den − z_t) + ε/C Σ_c w_c (log_den − z_c); 0 when t is ignored
      probabilities q: loss = Σ_c w_c q'_c (log_den − z_c), q' = (1 − ε) q + ε/C
      nll_loss:        loss = −w_t x_t (x holds log-probabilities)
    "mean" divides the sum by den = Σ w_t over rows not ignored (class targets; all ignored: 0/0 = NaN, as
    torch) or by the number of rows (probabilities); den is saved for the backward.
    """
    _check_reduction(spec.reduction)
    if spec.nll and (spec.prob or spec.label_smoothing):
        raise ValueError(f"{spec.name}: nll_loss takes class targets and no label_smoothing")
    if not 0.0 <= spec.label_smoothing <= 1.0:
        raise ValueError(f"{spec.name}: label_smoothing must be in [0, 1], got {spec.label_smoothing}")
    reduce = spec.reduction != "none"
    eps = float(spec.label_smoothing)
    s = Source()
    s.writelines(spec.header)
    s.writelines(_IMPORTS)
    s.writeline()
    s.writeline()
    s.writeline('@triton.jit(do_not_specialize=["n_rows"])  # n_rows = N * inner, the batch: one kernel for every batch size')
    s.writeline(f"def {spec.name}(")
    with s.indent():
        target = "[N, C, inner] class probabilities" if spec.prob else "[N, inner] int64 class index"
        s.writelines(
            f"""
            logits_ptr,  # [N, C, inner] float32{" log-probabilities" if spec.nll else ""}
            target_ptr,  # {target}
            w_ptr,  # [C] class weights{"" if spec.weight else " (unused: None)"}
            loss_ptr,  # {"[] the reduced loss" if reduce else "[N, inner] loss of each row"}
            lse_ptr,  # [N, inner] log-sum-exp of each row, saved for backward{" (unused: None)" if spec.nll else ""}
            den_ptr,  # [1] the mean's denominator, saved for backward{"" if spec.reduction == "mean" else " (unused: None)"}
            n_rows,  # N * inner
            C: tl.constexpr,
            INNER: tl.constexpr,
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
                for r0 in range(0, n_rows, BLOCK_R):
                """
            )
        with s.indent() if reduce else contextlib.nullcontext():
            if reduce:
                s.writeline("rows = r0 + tl.arange(0, BLOCK_R)")
            else:
                s.writeline("rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)")
            s.writelines(
                """
                row_ok = rows < n_rows
                base = (rows // INNER) * (C * INNER) + rows % INNER
                mask = row_ok[:, None] & (cols[None, :] < C)
                offs = base[:, None] + cols[None, :] * INNER
                """
            )
            if not spec.nll:
                s.writeline('x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)')
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
                # −log p_c = log_den − z_c, 0 outside the row (masked cells hold -inf)
                s.writeline("nlp = tl.where(mask, log_den[:, None] - (x - m[:, None]), 0.0)")
            _labels(s, spec.labels, 1 if not spec.nll else 0, 2 if not spec.nll else 1)
            if spec.weight:
                s.writeline("w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)")
            if spec.prob:
                s.writeline("q = tl.load(target_ptr + offs, mask=mask, other=0.0).to(tl.float32)")
                if eps:
                    s.writeline(f"q = tl.where(mask, q * {1.0 - eps!r} + {eps / spec.C!r}, 0.0)")
                wq = "w[None, :] * q" if spec.weight else "q"
                s.writeline(f"loss = tl.sum({wq} * nlp, axis=1)")
                s.writeline("loss = tl.where(row_ok, loss, 0.0)")
                s.writeline("keep_w = row_ok.to(tl.float32)  # the mean divides by the number of rows")
            else:
                s.writelines(
                    """
                    t = tl.load(target_ptr + rows, mask=row_ok, other=IGNORE_INDEX)
                    keep = row_ok & (t != IGNORE_INDEX)
                    in_range = (t >= 0) & (t < C)
                    x_t = tl.load(logits_ptr + base + t * INNER, mask=keep & in_range, other=0.0).to(tl.float32)
                    """
                )
                if spec.weight:
                    s.writeline("w_t = tl.load(w_ptr + t, mask=keep & in_range, other=0.0).to(tl.float32)")
                else:
                    s.writeline("w_t = 1.0")
                if spec.nll:
                    s.writeline("loss = -(w_t * x_t)")
                else:
                    # lse - x_t as log_den - (x_t - m): no cancellation between two large numbers
                    nll = "(log_den - (x_t - m))"
                    s.writeline(f"loss = w_t * {nll}" if not eps else f"loss = {1.0 - eps!r} * w_t * {nll}")
                    if eps:
                        smooth = "tl.sum(w[None, :] * nlp, axis=1)" if spec.weight else "tl.sum(nlp, axis=1)"
                        s.writeline(f"loss += {eps / spec.C!r} * {smooth}")
                s.writelines(
                    """
                    # A target outside [0, C) gives NaN (torch raises; a kernel cannot) instead of a wild read.
                    loss = tl.where(in_range, loss, float("nan"))
                    loss = tl.where(keep, loss, 0.0)
                    keep_w = tl.where(keep, w_t, 0.0)  # torch's mean divides by the weights of the kept targets
                    """
                )
            if reduce:
                s.writeline("total += loss")
                s.writeline("count += keep_w")
            else:
                s.writeline("tl.store(loss_ptr + rows, loss, mask=row_ok)")
        if spec.reduction == "mean":
            s.writeline("den = tl.sum(count, axis=0)")
            s.writeline("tl.store(den_ptr, den)")
            s.writeline("tl.store(loss_ptr, tl.sum(total, axis=0) / den)  # all ignored: 0 / 0 = NaN, as torch")
        elif spec.reduction == "sum":
            s.writeline("tl.store(loss_ptr, tl.sum(total, axis=0))")
    s.writeline()
    s.writeline()
    s.writeline("def launch(logits, target, weight, loss, lse, den, nbytes=None):")
    with s.indent():
        fn = "nll_loss" if spec.nll else "cross_entropy"
        s.writeline(
            f'"""{fn}(logits [N, {spec.C}, {spec.inner}], reduction={spec.reduction!r}) into loss; lse [N, '
            f'{spec.inner}] and den [1] for backward (None where unused)."""'
        )
        s.writeline(f"n_rows = logits.numel() // {spec.C}")
        s.writeline(f"cfg = configs.rows({spec.N * spec.inner}, {spec.C})  # tiles picked at the spec's batch")
        if reduce:
            s.writeline("grid = (1,)")
        else:
            s.writeline('grid = (configs.cdiv(n_rows, cfg["BLOCK_R"]),)')
        s.writeline(
            f"run_kernel({spec.name}, grid, logits, target, weight, loss, lse, den, n_rows, C={spec.C}, "
            f"INNER={spec.inner}, IGNORE_INDEX={spec.ignore_index}, nbytes=nbytes, **cfg)"
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
                x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                t = tl.load(t_ptr + offs, mask=mask, other=0.0).to(tl.float32)
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
