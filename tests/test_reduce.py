"""Reductions sum / mean / amax: generated forward (compiler/templates/reduce.py) and hand-written backward
(kernels/reduce.py) against torch in float64, fused and unfused, Tensor and torch forms, and torch's own
OpInfo samples."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn.tools import aot
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.reduce import ReduceSpec, generate
from fusednn.kernels.reduce import reduce_backward
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err
from tests.opcheck import check_fn, describe, op_samples, sample_fn

# (shape, dim, keepdim): global average pooling (2, 3), odd sizes, negative dims, alternating kept and
# reduced dims, all dims, 0-dim and 1-element inputs
CASES = [
    ((2, 3, 5, 7), (2, 3), False),
    ((2, 3, 5, 7), (2, 3), True),
    ((3, 37), -1, False),
    ((37, 3), 0, True),
    ((2, 3, 5, 7), (0, 2), False),  # reduced, kept, reduced, kept
    ((2, 3, 5, 7), (-3, -1), True),
    ((4, 1, 6), 1, False),  # a size-1 reduced dim
    ((3, 4), None, False),  # all dims
    ((), None, False),
    ((), 0, True),
    ((1,), 0, False),
    ((1, 1, 1), (0, 2), True),
]
FORMS = {
    "sum": [lambda x, d, k: x.sum(d, keepdim=k) if d is not None else x.sum(),
            lambda x, d, k: torch.sum(x, d, k) if d is not None else torch.sum(x)],
    "mean": [lambda x, d, k: x.mean(d, keepdim=k) if d is not None else x.mean(),
             lambda x, d, k: torch.mean(x, dim=d, keepdim=k) if d is not None else torch.mean(x)],
    "amax": [lambda x, d, k: x.amax(d, keepdim=k) if d is not None else x.amax(),
             lambda x, d, k: torch.amax(x, d if d is not None else (), k)],
}


def _id(c):
    shape, dim, keep = c
    return f"{'x'.join(map(str, shape)) or 'scalar'}-dim{dim}-{'keep' if keep else 'drop'}"


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("kind", ["sum", "mean", "amax"])
@pytest.mark.parametrize("shape,dim,keepdim", CASES, ids=[_id(c) for c in CASES])
def test_reduction_forward_and_grad_match_torch(shape, dim, keepdim, kind, fuse):
    tensor_form, torch_form = FORMS[kind]
    x = torch.randn(shape) * 3
    check_fn(lambda x: tensor_form(x, dim, keepdim), [x], fuse=fuse)
    check_fn(lambda x: torch_form(x, dim, keepdim), [x], fuse=fuse)


def test_amax_ties_share_the_gradient_evenly_like_torch():
    x = torch.randint(0, 3, (5, 7, 4)).float()  # many ties per row
    check_fn(lambda x: x.amax(1), [x])
    check_fn(lambda x: x.amax((0, 2), keepdim=True), [x])


@pytest.mark.parametrize("kind", ["sum", "mean", "amax"])
def test_reductions_propagate_nan_and_inf_like_torch(kind):
    x = torch.randn(4, 6)
    x[0, 1] = float("nan")
    x[1, 2] = float("inf")
    x[2, 0] = float("-inf")
    x[3, :] = float("-inf")  # amax of all -inf is -inf; its gradient is split over the whole row
    tensor_form = FORMS[kind][0]
    check_fn(lambda x: tensor_form(x, 1, False), [x])
    check_fn(lambda x: tensor_form(x, 0, True), [x])


class GapNet(nn.Module):
    """How most ResNets end: conv, relu, global average pooling as x.mean((2, 3)), a linear classifier."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_global_average_pooling_head_matches_torch(fuse):
    m, x = GapNet(), torch.randn(2, 3, 9, 11)
    c = fusednn.compile(m, fuse=fuse)
    xx, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    ref = GapNet().double()
    ref.load_state_dict(m.state_dict())
    y, yr = c(xx), ref(xr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    assert rel_err(y, yr) <= 1e-5 and rel_err(xx.grad, xr.grad) <= 1e-5
    for p, q in zip(m.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5
    ops = [n.op for n in c.fused_graph.nodes]
    assert ops == (["conv_relu_pool", "mean", "linear"] if fuse else ["conv2d", "relu", "mean", "linear"])


@pytest.mark.parametrize("kind", ["sum", "mean", "amax"])
def test_reductions_are_bit_identical_across_reruns(kind):
    x = torch.randn(3, 300, 5)
    c = fusednn.compile(lambda x: FORMS[kind][0](x, (0, 1), False))
    outs, grads = [], []
    for _ in range(2):
        xx = x.clone().requires_grad_()
        y = c(xx)
        y.backward(torch.ones_like(y))
        outs.append(y.detach())
        grads.append(xx.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])


def reduce_spec(kind: str, dims: tuple[int, ...]) -> ReduceSpec:
    name = f"fnn_{kind}_test"
    return ReduceSpec(name, header(name, [f"%1 {kind}"], [f"x.{kind}"], "kernels/reduce.py"), (f"%1 {kind}",),
                      kind, dims)


def test_reduction_forward_and_backward_are_one_launch_each():
    x = torch.randn(2, 3, 4)
    spec = reduce_spec("amax", (1,))
    y = torch.empty(2, 4)
    with recording() as launches:
        load(generate(spec), spec.name).launch(x, y)
        reduce_backward(torch.randn(2, 4), (2, 3, 4), (1,), kind="amax", x=x, y=y)
    assert [kernel_name(r.kernel) for r in launches] == ["fnn_amax_test", "_reduce_bwd_kernel"]
    assert torch.equal(y, x.amax(1))


def test_generated_reduction_source_has_header_labels_and_launch():
    spec = reduce_spec("mean", (2, 3))
    text = generate(spec)
    assert text.startswith(spec.header)
    assert "# %1 mean\n" in text and "\ndef launch(x, y):" in text
    compile(text, spec.name, "exec")


def test_reduction_over_too_many_alternating_dims_is_refused_naming_the_op():
    x = torch.randn(2, 3, 2, 3, 2, 3)
    with pytest.raises(fusednn.UnsupportedOpError, match=r"sum .*test_reduce.py:\d+.*alternates"):
        fusednn.compile(lambda x: x.sum((0, 2, 4)))(x)


def test_reduction_with_a_bad_dim_names_the_op_and_call():
    with pytest.raises(fusednn.InputMismatchError, match=r"mean.*test_reduce.py:\d+.*out of range"):
        fusednn.compile(lambda x: x.mean(3))(torch.randn(2, 3))


# torch's own samples (op_db), each fused and unfused. All are supported.
SAMPLES = [p for name in ("sum", "mean", "amax") for p in op_samples(name)]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("info,sample", SAMPLES, ids=[f"{i.name}-{describe(s)}" for i, s in SAMPLES])
def test_op_db_samples_match_torch(info, sample, fuse):
    fn, tensors = sample_fn(info.op, sample)
    check_fn(fn, tensors, fuse=fuse)


@pytest.mark.aot
def test_reduction_kernels_compile_for_sm90_without_spills():
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(reason)

    def program():
        x = torch.empty(8, 64, 7, 7)
        for kind in ("sum", "mean", "amax"):
            spec = reduce_spec(kind, (2, 3))
            y = torch.empty(8, 64)
            load(generate(spec), spec.name).launch(x, y)
            reduce_backward(y, tuple(x.shape), (2, 3), kind=kind, x=x, y=y)

    compiled = aot.compile_launches(aot.collect(program))
    assert {c.name for c in compiled} >= {"fnn_sum_test", "fnn_mean_test", "fnn_amax_test", "_reduce_bwd_kernel"}
    for c in compiled:
        assert not c.resources.spills, c.resources
