"""Checking a compiled function against float64 torch (forward and every gradient), and running torch's own
OpInfo samples (`op_db`) through fusednn."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

import fusednn
from tests.helpers import rel_err


def tolerance(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """max(1e-5, 4x float32 torch's own error vs float64) on the finite elements."""
    fin = torch.isfinite(ref64)
    return max(1e-5, 4 * rel_err(ref32[fin], ref64[fin]))


def assert_matches(out: torch.Tensor, ref64: torch.Tensor, ref32: torch.Tensor, what: str) -> None:
    """Same shape, NaN where torch has NaN, the same infinities, finite parts within `tolerance`."""
    assert out.shape == ref64.shape, f"{what}: shape {list(out.shape)} != {list(ref64.shape)}"
    out = out.detach().double()
    assert torch.equal(out.isnan(), ref64.isnan()), f"{what}: NaN positions differ: {out} vs {ref64}"
    inf = ref64.isinf()
    assert torch.equal(out[inf], ref64[inf].detach()), f"{what}: infinities differ"
    fin = torch.isfinite(ref64)
    err = rel_err(out[fin], ref64[fin])
    assert err <= tolerance(ref32, ref64), f"{what}: rel err {err:.3g} > {tolerance(ref32, ref64):.3g}"


def check_fn(fn: Callable, tensors: Sequence[torch.Tensor], fuse: bool = True, **compile_kw: Any) -> Any:
    """Compile fn; its output and the gradient of every floating input match float64 torch. Returns the
    compiled function."""
    c = fusednn.compile(fn, fuse=fuse, **compile_kw)

    def leaves(dtype):
        return [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in tensors]

    xs, x64, x32 = leaves(torch.float32), leaves(torch.float64), leaves(torch.float32)
    y, y64, y32 = c(*xs), fn(*x64), fn(*x32)
    assert_matches(y, y64, y32, "output")
    if not y64.requires_grad:
        return c
    g = torch.randn(y.shape)
    y.backward(g)
    y64.backward(g.double())
    y32.backward(g)
    for i, (a, b, r) in enumerate(zip(xs, x64, x32)):
        if b.is_floating_point() and b.grad is not None:
            assert a.grad is not None, f"input {i}: no gradient"
            assert_matches(a.grad, b.grad, r.grad, f"grad of input {i}")
    return c


def sample_fn(op: Callable, sample: Any) -> tuple[Callable, list[torch.Tensor]]:
    """An OpInfo sample as (function of its tensors, the tensors): op(sample.input, *args, **kwargs)."""
    leaves, spec = pytree.tree_flatten((sample.input, sample.args, sample.kwargs))
    slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]

    def fn(*ts):
        filled = list(leaves)
        for i, t in zip(slots, ts):
            filled[i] = t
        inp, args, kwargs = pytree.tree_unflatten(filled, spec)
        return op(inp, *args, **kwargs)

    return fn, [leaves[i].detach() for i in slots]


def describe(sample: Any) -> str:
    """A sample's tensor shapes and its other arguments, for test ids and messages."""
    leaves = pytree.tree_leaves((sample.input, sample.args, sample.kwargs))
    shapes = [list(t.shape) for t in leaves if isinstance(t, torch.Tensor)]
    rest = {k: v for k, v in sample.kwargs.items() if not isinstance(v, torch.Tensor)}
    args = [a for a in sample.args if not isinstance(a, torch.Tensor)]
    return f"{shapes} {args or ''} {rest or ''}".strip()


def op_samples(name: str, variant: str = "") -> list[tuple[Any, Any]]:
    """(opinfo, sample) pairs of op_db's `name` in float64 with gradients."""
    from torch.testing._internal.common_methods_invocations import op_db

    info = next(o for o in op_db if o.name == name and o.variant_test_name == variant)
    return [(info, s) for s in info.sample_inputs("cpu", torch.float64, requires_grad=True)]
