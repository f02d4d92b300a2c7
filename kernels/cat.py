"""Backward of torch.cat (forward: compiler/templates/cat.py).

Each input x_i is, viewed around the concatenated dim, a contiguous [outer, inner_i] block
(inner_i = Π x_i.shape[dim:]), and y is [outer, Σ inner_i]; x_i fills columns [offset_i, offset_i + inner_i)
of every row. The VJP is the same slice of dy: dx_i[o, j] = dy[o, offset_i + j]. One copy launch per input
that needs a gradient; no sum, so nothing depends on the order.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from fusednn.compiler import configs
from fusednn.launch import launch


def cat_slices(shapes: Sequence[tuple[int, ...]], dim: int) -> tuple[int, list[tuple[int, int]]]:
    """(row length of y, each input's (offset, inner)) for cat of `shapes` along the non-negative `dim`.
    A legacy empty [0] input (torch skips it) has inner 0."""
    slices, off = [], 0
    for s in shapes:
        inner = 0 if tuple(s) == (0,) else math.prod(s[dim:])  # a 1-D empty input, legacy or not, adds nothing
        slices.append((off, inner))
        off += inner
    return off, slices


@triton.jit
def _cat_bwd_kernel(
    dy_ptr,  # [outer, INNER_Y] upstream gradient of the concatenation, contiguous
    dx_ptr,  # [outer, INNER_X] gradient of one input (written)
    n,  # outer * INNER_X
    INNER_X,  # this input's row length
    INNER_Y,  # y's row length
    OFFSET,  # where this input's columns start in a row of y
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    src = (offs // INNER_X) * INNER_Y + OFFSET + offs % INNER_X
    tl.store(dx_ptr + offs, tl.load(dy_ptr + src, mask=mask), mask=mask)


def cat_backward(dy: torch.Tensor, shapes: Sequence[tuple[int, ...]], dim: int,
                 needs: Sequence[bool]) -> list[torch.Tensor | None]:
    """The gradient of each concatenated input (None where not needed): its slice of dy along `dim`.

    Args:
        dy: the gradient of the concatenation, contiguous.
        shapes: the inputs' shapes, in order; dim: the concatenated dim, non-negative.
    """
    dy = dy.contiguous()
    inner_y, slices = cat_slices(shapes, dim)
    outer = dy.numel() // inner_y if inner_y else 0
    grads: list[torch.Tensor | None] = []
    for shape, (off, inner), need in zip(shapes, slices, needs):
        if not need:
            grads.append(None)
            continue
        dx = torch.empty(shape, dtype=dy.dtype, device=dy.device)
        n = outer * inner
        meta = configs.elementwise(n)
        launch(_cat_bwd_kernel, (triton.cdiv(n, meta["BLOCK"]),), dy, dx, n, inner, inner_y, off, **meta)
        grads.append(dx)
    return grads
