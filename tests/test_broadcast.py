"""Broadcasting in add/sub/rsub/mul: either operand (or both) smaller than the result, 0-dim tensors and
numbers on either side. Forward reads a broadcast operand through its own index (compiler/templates/
pointwise.py `broadcast_index`), backward sums its gradient over the broadcast dims (kernels/broadcast.py);
both against torch in float64, fused and unfused."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fusednn
from fusednn.compiler.templates.pointwise import broadcast_index
from fusednn.errors import UnsupportedOpError
from fusednn.kernels.broadcast import sum_to
from tests.helpers import rel_err

TOL = 1e-5
SHAPES = [  # (a, b): torch broadcasts both to the result
    ((3,), (4, 3)), ((4, 3), (3,)), ((2, 3, 4, 5), (3, 1, 1)), ((3, 1, 1), (2, 3, 4, 5)),
    ((1, 3, 1, 1), (2, 3, 4, 5)), ((2, 3, 4, 5), (2, 1, 1, 1)), ((), (2, 3, 4)), ((2, 3, 4), ()),
    ((4, 1), (1, 3)), ((2, 1, 4, 1), (1, 3, 1, 5)), ((5,), (5,)),
]
OPS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b,
       "add_alpha": lambda a, b: torch.add(a, b, alpha=-2.5), "sub_alpha": lambda a, b: torch.sub(a, b, alpha=0.5),
       "gate": lambda a, b: torch.tanh(a + b) * torch.sigmoid(b)}


def _grads(f, inputs, g, compiled=False, fuse=True):
    ins = [t.clone().requires_grad_() for t in inputs]
    y = (fusednn.compile(f, fuse=fuse) if compiled else f)(*ins)
    y.backward(g.to(y.dtype))
    return [y] + [t.grad for t in ins]


def _check(f, inputs, fuse):
    """Output and every operand gradient within max(1e-5, 4x torch float32's own error) of float64 torch.

    A broadcast operand's gradient is a sum over the broadcast positions whose terms may cancel; there
    torch's float32 misses float64 too, and the bound follows it."""
    with torch.no_grad():
        g = torch.randn(f(*inputs).shape)
    ref = _grads(f, [t.double() for t in inputs], g)
    f32 = _grads(f, inputs, g)
    ours = _grads(f, inputs, g, compiled=True, fuse=fuse)
    for i, (a, b, c) in enumerate(zip(ours, ref, f32)):
        assert a.shape == b.shape, i
        assert rel_err(a, b) <= max(TOL, 4 * rel_err(c, b)), "output" if i == 0 else f"operand {i - 1}"


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("shapes", SHAPES, ids=str)
def test_broadcast_binary_ops_match_float64_torch(shapes, op, fuse):
    _check(OPS[op], [torch.randn(s) for s in shapes], fuse)


NUMBER_FIRST = {"2-x": lambda x: 2.0 - x, "torch.sub(2,x)": lambda x: torch.sub(2.0, x),
                "rsub alpha": lambda x: torch.rsub(x, 2.0, alpha=3.0), "3*x": lambda x: 3.0 * x,
                "torch.mul(2,x)": lambda x: torch.mul(2.0, x), "1+x": lambda x: 1.0 + x,
                "sub(2,relu(x),alpha)": lambda x: torch.sub(2.0, torch.relu(x), alpha=0.5),
                "x-2": lambda x: x - 2.0, "x.sub(2,alpha)": lambda x: x.sub(2.0, alpha=3.0)}


@pytest.mark.parametrize("fuse", [True, False])
@pytest.mark.parametrize("form", sorted(NUMBER_FIRST))
def test_numbers_on_either_side_match_float64_torch(form, fuse):
    """torch.sub(2, x) is 2 - x (it once traced as x - 2)."""
    _check(NUMBER_FIRST[form], [torch.randn(3, 4)], fuse)


@pytest.mark.parametrize("fuse", [True, False])
def test_squeeze_excitation_scale_matches_float64_torch(fuse):
    def se(x, w):  # x * sigmoid(per-channel gate) + per-channel bias, as squeeze-excitation blocks do
        return x * torch.sigmoid(w) + w

    _check(se, [torch.randn(2, 3, 4, 5), torch.randn(2, 3, 1, 1)], fuse)


@pytest.mark.parametrize("out,shape", [((4, 3), (3,)), ((4, 3), (4, 1)), ((2, 3, 4, 5), (3, 1, 1)),
                                       ((2, 3, 4, 5), (1, 3, 1, 5)), ((2, 3, 4, 5), ()), ((7, 1, 3), (7, 1, 1)),
                                       ((2, 3, 4, 5, 6), (3, 1, 5, 6)), ((6,), (6,))], ids=str)
def test_sum_to_matches_torch_sum_to_size(out, shape):
    dy, other = torch.randn(out), torch.randn((1,) + out[1:])
    for o in (None, other):
        ref = (dy.double() * (1.0 if o is None else o.double()) * -0.5).sum_to_size(shape) if shape else \
            (dy.double() * (1.0 if o is None else o.double()) * -0.5).sum()
        got = sum_to(dy, shape, o, -0.5)
        assert got.shape == torch.Size(shape) and rel_err(got, ref) <= TOL


def test_sum_to_is_deterministic():
    dy = torch.randn(8, 16, 9, 9)
    assert torch.equal(sum_to(dy, (16, 1, 1)), sum_to(dy, (16, 1, 1)))


@pytest.mark.parametrize("shape,out,expr", [
    ((3,), (4, 3), "(offs % 3)"), ((16, 1, 1), (8, 16, 4, 4), "((offs // 16) % 16)"),
    ((8, 1, 1, 1), (8, 16, 4, 4), "(offs // 256)"), ((), (2, 3), "offs * 0"), ((2, 3), (2, 3), "offs"),
    ((4, 1), (4, 3), "(offs // 3)"), ((2, 1, 4, 1), (2, 3, 4, 5), "(offs // 60) * 4 + ((offs // 5) % 4)")])
def test_broadcast_index_is_batch_independent_and_exact(shape, out, expr):
    """The outermost run has no modulo, so the index does not depend on the batch; and it is right."""
    assert broadcast_index(shape, out) == expr
    offs = torch.arange(torch.Size(out).numel())
    src = torch.arange(torch.Size(shape).numel()).reshape(shape)
    assert torch.equal(eval(expr, {"offs": offs}) * torch.ones_like(offs), src.expand(out).reshape(-1))  # noqa: S307


def test_broadcast_beyond_the_gradient_kernel_is_refused_at_compile_time():
    with pytest.raises(UnsupportedOpError, match=r"add at the top level \(test_broadcast.py:\d+\).*alternates"):
        fusednn.compile(lambda a, b: a + b)(torch.randn(2, 3, 4, 5, 6), torch.randn(3, 1, 5, 1))


_AOT_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusednn.kernels import broadcast as B
    consts = {"K0": 0, "K1": 1, "K2": 0, "K3": 1, "HAS_OTHER": True, "BLOCK_M": 32, "BLOCK_R": 128}
    sig = {a: ("constexpr" if a in consts else "*fp32" if a.endswith("_ptr") else "fp32" if a == "scale" else "i32")
           for a in B._sum_to_kernel.arg_names}
    k = triton.compile(ASTSource(fn=B._sum_to_kernel, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert k.asm["cubin"]
    print("ok")
    """
)


@pytest.mark.aot
def test_sum_to_kernel_compiles_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
