"""torch.cat: generated forward (compiler/templates/cat.py, one copy per input) and hand-written backward
(kernels/cat.py, each input's slice of dy) against torch in float64, fused and unfused, and op_db samples."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn.tools import aot
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.cat import CatSpec, generate
from fusednn.kernels.cat import cat_backward
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err
from tests.opcheck import check_fn, describe, op_samples, sample_fn

# (input shapes, dim): channels (DenseNet/Inception), first and last dims, negative dims, 1-wide slices,
# three inputs, 1-D inputs, 1-element inputs, an empty input
CASES = [
    ([(2, 3, 5, 5), (2, 4, 5, 5)], 1),
    ([(2, 3, 5, 5), (2, 1, 5, 5), (2, 6, 5, 5)], -3),
    ([(3, 7), (2, 7)], 0),
    ([(3, 7), (3, 1), (3, 2)], -1),
    ([(5,), (3,)], 0),
    ([(1,), (1,)], 0),
    ([(2, 0, 3), (2, 4, 3)], 1),
    ([(2, 3, 4)], 2),  # one input: a copy
]


def _id(c):
    shapes, dim = c
    return "+".join("x".join(map(str, s)) for s in shapes) + f"-dim{dim}"


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("shapes,dim", CASES, ids=[_id(c) for c in CASES])
def test_cat_forward_and_grad_match_torch(shapes, dim, fuse):
    xs = [torch.randn(s) for s in shapes]
    check_fn(lambda *ts: torch.cat(ts, dim), xs, fuse=fuse)
    check_fn(lambda *ts: torch.cat(list(ts), dim=dim), xs, fuse=fuse)


def test_cat_forms_and_nan_inf_pass_through():
    a, b = torch.randn(2, 3), torch.randn(2, 2)
    a[0, 0], b[1, 1], b[0, 0] = float("nan"), float("inf"), float("-inf")
    check_fn(lambda a, b: torch.concat([a, b], 1), [a, b])
    check_fn(lambda a, b: torch.concatenate([a, b], axis=1), [a, b])


def test_cat_of_a_value_with_itself_sums_both_slices_into_its_gradient():
    check_fn(lambda a: torch.cat([a, torch.relu(a), a], 1), [torch.randn(2, 3, 4)])


class Dense(nn.Module):
    """A DenseNet-style block: each conv's output is concatenated to its input along the channels."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(7, 4, 3, padding=1)

    def forward(self, x):
        x = torch.cat([x, F.relu(self.c1(x))], 1)
        return torch.cat([x, F.relu(self.c2(x))], 1)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_dense_block_matches_torch(fuse):
    m, x = Dense(), torch.randn(2, 3, 6, 5)
    ref = Dense().double()
    ref.load_state_dict(m.state_dict())
    c = fusednn.compile(m, fuse=fuse)
    xx, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yr = c(xx), ref(xr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    assert rel_err(y, yr) <= 1e-5 and rel_err(xx.grad, xr.grad) <= 1e-5
    for p, q in zip(m.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5
    assert [n.op for n in c.fused_graph.nodes].count("cat") == 2


def cat_spec(n: int, dim: int) -> CatSpec:
    name = "fnn_cat_test"
    return CatSpec(name, header(name, ["%3 cat"], ["torch.cat"], "kernels/cat.py"), ("%3 cat",), n, dim)


def test_cat_launches_one_copy_per_input_each_way():
    xs = [torch.randn(2, 3, 4), torch.randn(2, 1, 4)]
    spec = cat_spec(2, 1)
    y = torch.empty(2, 4, 4)
    with recording() as launches:
        load(generate(spec), spec.name).launch(xs, y)
        grads = cat_backward(y, [(2, 3, 4), (2, 1, 4)], 1, [True, False])
    assert [kernel_name(r.kernel) for r in launches] == ["fnn_cat_test"] * 2 + ["_cat_bwd_kernel"]
    assert torch.equal(y, torch.cat(xs, 1)) and torch.equal(grads[0], xs[0]) and grads[1] is None


def test_generated_cat_source_has_header_labels_and_launch():
    spec = cat_spec(3, 1)
    text = generate(spec)
    assert text.startswith(spec.header) and "# %3 cat\n" in text and "\ndef launch(xs, y):" in text
    compile(text, spec.name, "exec")


def test_cat_of_mismatched_shapes_names_the_op_and_call():
    with pytest.raises(fusednn.InputMismatchError, match=r"cat.*test_cat.py:\d+"):
        fusednn.compile(lambda a, b: torch.cat([a, b], 1))(torch.randn(2, 3), torch.randn(3, 3))


# torch's own samples (op_db), each fused and unfused. All are supported.
SAMPLES = op_samples("cat")


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("info,sample", SAMPLES, ids=[describe(s) for _, s in SAMPLES])
def test_op_db_samples_match_torch(info, sample, fuse):
    fn, tensors = sample_fn(info.op, sample)
    check_fn(fn, tensors, fuse=fuse)


@pytest.mark.aot
def test_cat_kernels_compile_for_sm90_without_spills():
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(reason)

    def program():
        xs = [torch.empty(8, 16, 7, 7), torch.empty(8, 32, 7, 7)]
        y = torch.empty(8, 48, 7, 7)
        load(generate(cat_spec(2, 1)), "fnn_cat_test").launch(xs, y)
        cat_backward(y, [tuple(x.shape) for x in xs], 1, [True, True])

    compiled = aot.compile_launches(aot.collect(program))
    assert {c.name for c in compiled} == {"fnn_cat_test", "_cat_bwd_kernel"}
    for c in compiled:
        assert not c.resources.spills, c.resources
