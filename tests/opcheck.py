"""Checking a compiled function against float64 torch (forward and every gradient), and running torch's own
OpInfo samples (`op_db`) through fusednn."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch.utils import _pytree as pytree

import fusednn
from tests.helpers import rel_err


# torch.testing.assert_close's default rtol per dtype: the floor of every tolerance here
RTOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def tolerance(ref32: torch.Tensor, ref64: torch.Tensor) -> float:
    """max(torch's rtol for ref32's dtype, 4x torch's own error in that dtype vs float64) on the finite elements
    (ref32: torch's result in the dtype under test, float32 unless named otherwise)."""
    fin = torch.isfinite(ref64)
    return max(RTOL[ref32.dtype], 4 * rel_err(ref32[fin], ref64[fin]))


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


def check_fn(fn: Callable, tensors: Sequence[torch.Tensor], fuse: bool = True, grads: Sequence[bool] | None = None,
             dtype: torch.dtype = torch.float32, **compile_kw: Any) -> Any:
    """Compile fn; its output and the gradient of every floating input (those `grads` marks, by default
    all) match float64 torch, the floating inputs given in `dtype` (torch in that dtype sets the
    tolerance). Returns the compiled function.

    The float64 reference runs on the values the `dtype` runs receive (the inputs and the upstream gradient
    rounded to `dtype`): it is exact arithmetic on the same operands, so what is measured is each run's own
    arithmetic. (Against unrounded operands, a float16 result correctly rounded from its inputs was judged
    by how far eager float16's own error happened to offset the rounding of the inputs: prelu's weight
    gradient, -6.44921875 for an exact -6.44767 on the rounded operands, failed against eager's -6.44140625.)"""
    c = fusednn.compile(fn, fuse=fuse, **compile_kw)
    grads = [True] * len(tensors) if grads is None else list(grads)

    def leaves(dtype, ref=None):
        return [(t.detach().to(dtype) if ref is None else t.detach().to(dtype).to(ref)).requires_grad_(g)
                if t.is_floating_point() else t for t, g in zip(tensors, grads)]

    xs, x64, x32 = leaves(dtype), leaves(dtype, torch.float64), leaves(dtype)
    y, y64, y32 = c(*xs), fn(*x64), fn(*x32)
    assert_matches(y, y64, y32, "output")
    if not y64.requires_grad:
        return c
    g = torch.randn(y.shape).to(y.dtype)
    y.backward(g)
    y64.backward(g.double())
    y32.backward(g.to(y32.dtype))
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


def check_module(m64: torch.nn.Module, tensors: Sequence[torch.Tensor], fuse: bool = True,
                 kwargs: dict | None = None) -> Any:
    """Compile a float32 copy of the float64 module m64; output, every gradient (inputs and parameters) and
    every buffer after the step match float64 torch (float32 torch's own error sets the tolerance). Returns
    the compiled module. As in `check_fn`, the float64 reference runs on the float32 operands: a float64
    copy of the float32 module, on the inputs rounded to float32 (m64 itself is left as it was)."""
    import copy

    kwargs = kwargs or {}
    m32, mt = copy.deepcopy(m64).float(), copy.deepcopy(m64).float()
    m64 = copy.deepcopy(m32).double()
    c = fusednn.compile(m32, fuse=fuse)

    def leaves(dtype, ref=None):
        return [(t.detach().to(dtype) if ref is None else t.detach().to(dtype).to(ref)).requires_grad_(t.requires_grad)
                if t.is_floating_point() else t for t in tensors]

    xs, x64, x32 = leaves(torch.float32), leaves(torch.float32, torch.float64), leaves(torch.float32)
    outs = c(*xs, **kwargs), m64(*x64, **kwargs), mt(*x32, **kwargs)
    flat = [pytree.tree_leaves(o) for o in outs]
    for i, (y, y64, y32) in enumerate(zip(*flat)):
        if y64.is_floating_point():
            assert_matches(y, y64, y32, f"output {i}")
        else:
            assert torch.equal(y, y64), f"output {i} (integer) differs"
    diff = [(y, y64, y32) for y, y64, y32 in zip(*flat) if y64.requires_grad]
    if diff:
        gs = [torch.randn(y.shape) for y, _, _ in diff]  # float32, as every run receives them
        torch.autograd.backward([d[0] for d in diff], gs)
        torch.autograd.backward([d[1] for d in diff], [g.double() for g in gs])
        torch.autograd.backward([d[2] for d in diff], gs)
        for i, (a, b, r) in enumerate(zip(xs, x64, x32)):
            if b.is_floating_point() and b.grad is not None:
                assert_matches(a.grad, b.grad, r.grad, f"grad of input {i}")
        for (name, p), q, r in zip(m32.named_parameters(), m64.parameters(), mt.parameters()):
            if q.grad is not None:
                assert_matches(p.grad, q.grad, r.grad, f"grad of {name}")
    for (name, b), b64, b32 in zip(m32.named_buffers(), m64.buffers(), mt.buffers()):
        if b64.is_floating_point():
            assert_matches(b, b64, b32, f"buffer {name}")
        else:
            assert torch.equal(b, b64), f"buffer {name}"
    return c


def module_samples(cls: type, training: bool) -> list[tuple[Any, Any]]:
    """(module_info, module_input) pairs of module_db's entry for cls, float64 with gradients."""
    from torch.testing._internal.common_modules import module_db

    info = next(i for i in module_db if i.module_cls is cls)
    return [(info, s) for s in info.module_inputs_func(info, device="cpu", dtype=torch.float64,
                                                          requires_grad=True, training=training)]


def build(info: Any, sample: Any, training: bool) -> tuple[torch.nn.Module, list[torch.Tensor], dict]:
    """The float64 module a module_db sample constructs, its forward tensors and forward kwargs."""
    ci, fi = sample.constructor_input, sample.forward_input
    m = info.module_cls(*ci.args, **ci.kwargs).double().train(training)
    return m, list(fi.args), dict(fi.kwargs)
