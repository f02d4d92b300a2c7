"""softmax / log_softmax: generated forward (compiler/templates/softmax.py) and hand-written dx
(kernels/softmax.py) against torch in float64, over any dim."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusednn.tools import aot
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.softmax import SoftmaxSpec, generate
from fusednn.kernels.softmax import softmax_backward
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err

TOL = 1e-5


def softmax_spec(shape: tuple[int, ...], dim: int, log: bool) -> SoftmaxSpec:
    """The spec the compiler builds for softmax over `dim` of a contiguous tensor of `shape`."""
    dim %= len(shape)
    op = "log_softmax" if log else "softmax"
    name = f"fnn_{op}_test"
    return SoftmaxSpec(name, header(name, [f"%1 {op}"], [f"F.{op}"], "kernels/softmax.py"), (f"%1 {op}",),
                       math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1:]), log)


def run_softmax(x: torch.Tensor, dim: int, log: bool) -> tuple[torch.Tensor, dict]:
    """Generate, load and launch the forward; returns y and the backward's keyword arguments."""
    spec = softmax_spec(tuple(x.shape), dim, log)
    y = torch.empty_like(x)
    load(generate(spec), spec.name).launch(x, y)
    return y, dict(outer=spec.outer, D=spec.D, inner=spec.inner, log=log)


def check_softmax(x: torch.Tensor, dim: int, log: bool) -> None:
    """Forward and dx against torch in float64, with a random upstream gradient."""
    y, meta = run_softmax(x, dim, log)
    x64 = x.double().requires_grad_()
    ref = (F.log_softmax if log else F.softmax)(x64, dim)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= TOL
    dy = torch.randn_like(y)
    ref.backward(dy.double())
    dx = softmax_backward(dy, y, **meta)
    assert dx.shape == x.shape
    assert rel_err(dx, x64.grad) <= TOL


# (shape, dim): dims 0, 1, -1 and 3 of a 4-D tensor; softmax lengths 1, 10, 37; strided rows (inner > 1)
CASES = [
    ((10, 7), 0),
    ((6, 37), 1),
    ((5, 1), -1),  # D = 1: y = 1 (log: 0), dx = 0
    ((3, 4, 10), -1),
    ((2, 3, 4, 37), 3),
    ((2, 10, 3, 5), 1),
    ((1, 37, 2, 3), 1),  # batch 1
    ((37, 1, 2), 0),
    ((1, 1), 0),
]


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", CASES, ids=[f"{'x'.join(map(str, s))}-dim{d}" for s, d in CASES])
def test_softmax_forward_and_grad_match_torch(shape, dim, log):
    check_softmax(torch.randn(shape) * 3, dim, log)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("dim", [-1, 0])
def test_softmax_of_large_logits_stays_finite_and_matches_torch(dim, log):
    # logits near 1e4: exp without the max subtraction overflows to inf (and inf / inf = NaN)
    check_softmax(1e4 + torch.randn(6, 37) * 10, dim, log)


@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_of_logits_spread_over_1e4_saturates_without_nan(log):
    x = torch.randn(6, 37) * 1e4
    # each row's winner leads by >= 1e3: softmax is exactly one-hot even in float64 (e^-1000 underflows),
    # so its exact gradient is 0 (a gap near 100 would leave fp32 denormals, correct to a few bits only)
    x[torch.arange(6), x.argmax(1)] += 1e3
    y, meta = run_softmax(x, 1, log)
    x64 = x.double().requires_grad_()
    ref = (F.log_softmax if log else F.softmax)(x64, 1)
    assert torch.isfinite(y).all()
    assert rel_err(y, ref) <= TOL
    dy = torch.randn_like(y)
    ref.backward(dy.double())
    dx = softmax_backward(dy, y, **meta)
    assert torch.isfinite(dx).all()
    assert rel_err(dx, x64.grad) <= TOL


def test_log_softmax_keeps_the_small_log_probability_of_a_confident_row():
    # one logit leads by 5 to 20: its log-probability is −log(1 + u), u down to ~1e-8, which 1 + u in fp32
    # would round to 0
    x = torch.randn(9, 10)
    x[:, 3] += torch.linspace(5, 20, 9)
    y, _ = run_softmax(x, 1, True)
    ref = F.log_softmax(x.double(), 1)
    for i in range(9):
        assert rel_err(y[i, 3], ref[i, 3]) <= TOL, i


def test_softmax_rows_sum_to_one():
    y, _ = run_softmax(torch.randn(3, 37, 5) * 10, 1, False)
    assert torch.allclose(y.double().sum(1), torch.ones(3, 5, dtype=torch.float64), rtol=0, atol=1e-6)


def test_softmax_forward_and_backward_are_one_launch_each():
    x = torch.randn(2, 10, 3)
    with recording() as launches:
        y, meta = run_softmax(x, 1, True)
        softmax_backward(torch.randn_like(y), y, **meta)
    assert [kernel_name(r.kernel) for r in launches] == ["fnn_log_softmax_test", "_softmax_bwd_dx_kernel"]


def test_generated_softmax_source_has_header_labels_and_launch():
    spec = softmax_spec((2, 10, 3), 1, False)
    text = generate(spec)
    assert text.startswith(spec.header)
    assert "# %1 softmax\n" in text
    assert f"def {spec.name}(" in text and "\ndef launch(x, y, nbytes=None):" in text
    compile(text, spec.name, "exec")


@pytest.mark.aot
def test_softmax_kernels_compile_for_sm90_without_spills():
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(reason)

    def program():
        # both branches; contiguous rows (inner = 1) and strided rows (inner > 1)
        for shape, dim, log in [((64, 10), -1, False), ((2, 37, 3, 5), 1, True)]:
            spec = softmax_spec(shape, dim, log)
            x = torch.empty(shape)
            load(generate(spec), spec.name).launch(x, x)
            softmax_backward(x, x, outer=spec.outer, D=spec.D, inner=spec.inner, log=log)

    compiled = aot.compile_launches(aot.collect(program))
    assert {c.name for c in compiled} == {"fnn_softmax_test", "fnn_log_softmax_test", "_softmax_bwd_dx_kernel"}
    for c in compiled:
        assert not c.resources.spills, c.resources


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("dim", [0, -1])
def test_softmax_and_log_softmax_of_a_0_dim_tensor_match_torch(dim, fuse):
    # softmax of a single value is 1 (log: 0), its gradient 0; torch accepts dim 0 and -1 here
    from tests.opcheck import check_fn

    x = torch.tensor(1.7)
    check_fn(lambda x: torch.nn.Softmax(dim)(x), [x], fuse=fuse)
    check_fn(lambda x: torch.nn.LogSoftmax(dim)(x), [x], fuse=fuse)
