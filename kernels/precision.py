"""The operands of every tl.dot: cast to the GEMM's compute dtype as they are loaded.

A GEMM of half-precision results (float16 or bfloat16: `model.half()`, or torch.autocast) rounds both
operands to that dtype, whatever they are stored as (an fp32 weight under autocast), and accumulates in fp32,
as torch's half-precision GEMMs do; an fp32 GEMM leaves them alone. `_dot_in` is that cast, shared by the
conv and linear templates and their backward kernels.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot_in(x, CT: tl.constexpr):
    """x as a tl.dot operand of compute dtype CT (the dtype of the GEMM's result, or of its gradient)."""
    return x.to(CT)
