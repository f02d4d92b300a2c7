"""Batch norm: generated forward (compiler/templates/batch_norm.py) and hand-written backward
(kernels/batch_norm.py) against torch in float64: training with running-stat updates, eval, affine or not,
[N, C] and [N, C, H, W] inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fusednn.tools import aot
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.batch_norm import BatchNormSpec, generate
from fusednn.kernels.batch_norm import batch_norm_backward
from fusednn.compiler.configs import use_target
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err

TOL = 1e-5
RUNNING_TOL = 1e-6
MOMENTUM, EPS = 0.1, 1e-5


def bn_spec(shape, training, affine=True, track=True, momentum=MOMENTUM, eps=EPS) -> BatchNormSpec:
    name = "fnn_batch_norm_test"
    return BatchNormSpec(name, header(name, ["%2 batch_norm"], ["bn1"], "kernels/batch_norm.py"), ("%2 batch_norm",),
                         shape[0], shape[1], math.prod(shape[2:]), training, momentum, eps, weight=affine,
                         bias=affine, track_running_stats=track, tile_stats=training or not track)


class Case:
    """Random inputs and parameters for one batch norm, and our forward's outputs."""

    def __init__(self, shape, training, affine, track):
        C = shape[1]
        self.spec = bn_spec(shape, training, affine, track)
        # a mean far from 0 relative to the spread: a one-pass E[x²] − E[x]² variance would lose digits
        self.x = torch.randn(shape) * 2 + 5
        self.w = torch.randn(C) if affine else None
        self.b = torch.randn(C) if affine else None
        # positive, like the batch means: 0.9 rm + 0.1 mean must not cancel to ~0 (its fp32 rounding error
        # would then exceed 1e-6 of a one-channel result)
        self.rm = torch.rand(C) if track else None
        self.rv = torch.rand(C) + 0.5 if track else None
        self.rm0 = None if self.rm is None else self.rm.clone()
        self.rv0 = None if self.rv is None else self.rv.clone()

    def forward(self):
        """Run our forward (updating self.rm / self.rv in place); returns (y, save_mean, save_invstd)."""
        C = self.x.shape[1]
        y, mean, invstd = torch.empty_like(self.x), torch.empty(C), torch.empty(C)
        module = load(generate(self.spec), self.spec.name)
        st = {"st": torch.empty(module.stats_size(self.x.shape[0]))} if self.spec.tile_stats else {}
        module.launch(self.x, self.w, self.b, self.rm, self.rv, y, mean, invstd, **st)
        return y, mean, invstd

    def backward(self, dy, mean, invstd, needs=(True, True, True)):
        affine = self.w is not None
        return batch_norm_backward(dy, self.x, self.w, mean, invstd, training=self.spec.batch_stats,
                                   needs_dx=needs[0], needs_dweight=affine and needs[1], needs_dbias=affine and needs[2])


def double(t):
    return None if t is None else t.double().requires_grad_()


def check_batch_norm(shape, training, affine, track, upstream=None):
    """Forward, saved statistics, running-stat update and every gradient against torch in float64.

    upstream(x) makes the upstream gradient (default: standard normal noise).
    """
    case = Case(shape, training, affine, track)
    y, mean, invstd = case.forward()
    x64, w64, b64 = double(case.x), double(case.w), double(case.b)
    rm64 = None if case.rm0 is None else case.rm0.double()
    rv64 = None if case.rv0 is None else case.rv0.double()
    ref = F.batch_norm(x64, rm64, rv64, w64, b64, training=case.spec.batch_stats, momentum=MOMENTUM, eps=EPS)
    assert rel_err(y, ref) <= TOL
    dims = [0] + list(range(2, len(shape)))
    if case.spec.batch_stats:
        ref_mean, ref_var = x64.detach().mean(dims), x64.detach().var(dims, unbiased=False)
    else:
        ref_mean, ref_var = rm64, rv64
    assert rel_err(mean, ref_mean) <= TOL
    assert rel_err(invstd, (ref_var + EPS).rsqrt()) <= TOL
    if track:
        # training updates them in place exactly as torch (unbiased running_var); eval leaves them alone
        assert rel_err(case.rm, rm64) <= RUNNING_TOL and rel_err(case.rv, rv64) <= RUNNING_TOL
        if not training:
            assert torch.equal(case.rm, case.rm0) and torch.equal(case.rv, case.rv0)
    dy = torch.randn_like(y) if upstream is None else upstream(case.x)
    ref.backward(dy.double())
    dx, dw, db = case.backward(dy, mean, invstd)
    assert rel_err(dx, x64.grad) <= TOL
    if affine:
        assert rel_err(dw, w64.grad) <= TOL
        assert rel_err(db, b64.grad) <= TOL
    else:
        assert dw is None and db is None


@pytest.mark.parametrize("track", [True, False], ids=["running-stats", "no-running-stats"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(6, 5), (3, 4, 5, 7), (2, 3, 3, 3)], ids=["2d", "4d", "4d-small"])
def test_batch_norm_forward_running_stats_and_grads_match_torch(shape, training, affine, track):
    # without running stats torch normalises with the batch's statistics even in eval
    check_batch_norm(shape, training, affine, track)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_with_one_channel_matches_torch(training):
    # With one channel dweight and dbias are single sums of M terms. For pure noise dy they cancel so far,
    # now and then, that no fp32 sum meets 1e-5: torch's own fp32 batch norm misses it on 0.6% of seeds at
    # this shape. So the upstream gradient here has a mean and a part along x: both sums stay well away
    # from 0 and the check stays at 1e-5 (dx still sees the noise).
    check_batch_norm((2, 1, 3, 3), training, True, True,
                     upstream=lambda x: 1.0 + (x - 5.0) / 2.0 + 0.5 * torch.randn_like(x))


@pytest.mark.parametrize("shape", [(1, 3, 4, 5), (1, 4)], ids=["4d", "2d"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_batch_norm_eval_with_batch_of_one_matches_torch(shape, affine):
    check_batch_norm(shape, False, affine, True)


def test_batch_norm_training_with_batch_of_one_4d_matches_torch():
    # one image still gives H*W values per channel
    check_batch_norm((1, 3, 2, 3), True, True, True)


def test_batch_norm_training_with_one_value_per_channel_is_refused_like_torch():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        F.batch_norm(torch.randn(1, 3), torch.zeros(3), torch.ones(3), training=True)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        generate(bn_spec((1, 3), training=True))


def test_batch_norm_running_stats_follow_torch_over_several_steps():
    shape = (4, 3, 2, 5)
    bn = torch.nn.BatchNorm2d(3, momentum=0.3).double()
    bn.running_mean.uniform_(-2.0, -0.5)  # the sign of the batch means below: the updates never cancel to ~0
    case = Case(shape, True, True, True)
    case.spec = bn_spec(shape, True, momentum=0.3)
    case.rm, case.rv = bn.running_mean.float(), bn.running_var.float()
    for _ in range(3):
        case.x = torch.randn(shape) * 3 - 1
        case.forward()
        bn(case.x.double())
    assert rel_err(case.rm, bn.running_mean) <= RUNNING_TOL
    assert rel_err(case.rv, bn.running_var) <= RUNNING_TOL


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_backward_is_deterministic(training):
    case = Case((8, 6, 9, 7), training, True, True)
    _, mean, invstd = case.forward()
    dy = torch.randn_like(case.x)
    first, second = case.backward(dy, mean, invstd), case.backward(dy, mean, invstd)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["dx", "dweight", "dbias"])
def test_batch_norm_backward_returns_only_the_grads_asked_for(needs):
    case = Case((5, 3, 2, 2), True, True, True)
    _, mean, invstd = case.forward()
    x64, w64, b64 = double(case.x), double(case.w), double(case.b)
    dy = torch.randn_like(case.x)
    F.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS).backward(dy.double())
    grads = case.backward(dy, mean, invstd, needs)
    for need, got, ref in zip(needs, grads, (x64.grad, w64.grad, b64.grad)):
        assert (got is not None) == need
        if need:
            assert rel_err(got, ref) <= TOL


def test_batch_norm_cumulative_average_reads_the_counter_on_the_device():
    # momentum=None: the factor is 1/num_batches_tracked, read by the kernel (no .item()), after its update
    shape = (4, 3, 2, 5)
    bn = torch.nn.BatchNorm2d(3, momentum=None).double()
    case = Case(shape, True, True, True)
    case.spec = bn_spec(shape, True, momentum=None)
    case.rm, case.rv = bn.running_mean.float(), bn.running_var.float()
    kernel = load(generate(case.spec), case.spec.name)
    counter = torch.zeros((), dtype=torch.long)
    for _ in range(3):
        case.x = torch.randn(shape) * 3 - 1
        counter += 1
        C = shape[1]
        kernel.launch(case.x, case.w, case.b, case.rm, case.rv, torch.empty_like(case.x), torch.empty(C),
                      torch.empty(C), counter, st=torch.empty(kernel.stats_size(shape[0])))
        bn(case.x.double())
    assert rel_err(case.rm, bn.running_mean) <= RUNNING_TOL
    assert rel_err(case.rv, bn.running_var) <= RUNNING_TOL


@pytest.mark.parametrize("weight", [True, False], ids=["weight-only", "bias-only"])
def test_batch_norm_with_weight_or_bias_alone_matches_torch(weight):
    shape = (3, 4, 2, 3)
    case = Case(shape, True, True, True)
    case.spec = BatchNormSpec("fnn_batch_norm_test", case.spec.header, case.spec.labels, 3, 4, 6, True,
                              weight=weight, bias=not weight, tile_stats=True)
    if weight:
        case.b = None
    else:
        case.w = None
    y, mean, invstd = case.forward()
    x64, w64, b64 = double(case.x), double(case.w), double(case.b)
    ref = F.batch_norm(x64, case.rm0.double(), case.rv0.double(), w64, b64, training=True, eps=EPS)
    assert rel_err(y, ref) <= TOL
    dy = torch.randn_like(y)
    ref.backward(dy.double())
    dx, dw, db = batch_norm_backward(dy, case.x, case.w, mean, invstd, training=True, needs_dx=True,
                                     needs_dweight=weight, needs_dbias=not weight)
    assert rel_err(dx, x64.grad) <= TOL
    assert rel_err(dw, w64.grad) <= TOL if weight else rel_err(db, b64.grad) <= TOL


def test_batch_norm_backward_sums_split_over_row_slices_match_torch_and_rerun_bit_identically():
    # With the GPU's launch configs the channel sums are reduced in row slices (configs.reduce_split), each
    # writing partials that the dx kernel adds in slice order; dweight and dbias come from its first row
    # block. Run here in the interpreter, against float64 torch, twice.
    case = Case((8, 16, 16, 16), True, True, True)
    _, mean, invstd = case.forward()
    x64, w64, b64 = double(case.x), double(case.w), double(case.b)
    dy = torch.randn_like(case.x)
    F.batch_norm(x64, None, None, w64, b64, training=True, eps=EPS).backward(dy.double())
    with use_target("gpu"), recording() as launches:
        first = case.backward(dy, mean, invstd)
    second = case.backward(dy, mean, invstd)
    with use_target("gpu"):
        third = case.backward(dy, mean, invstd)
    reduce = next(r for r in launches if kernel_name(r.kernel) == "_batch_norm_bwd_dwdb_kernel")
    assert reduce.grid[0] == 4  # 2,048 rows of 64 in slices of at least 8 steps
    for got, ref in zip(first, (x64.grad, w64.grad, b64.grad)):
        assert rel_err(got, ref) <= TOL
    for a, b, c in zip(first, second, third):
        assert rel_err(b, a) <= TOL  # one slice (the interpreter's configs): the same sums, another order
        assert torch.equal(a, c)


def test_batch_statistics_over_many_row_tiles_match_torch_and_rerun_bit_identically():
    # At the GPU's tiles the statistics kernel writes one partial per 64-row tile (32 here, grid (32, 1))
    # and the batch norm combines them in tile order over row slices: within an ulp of float64's mean on
    # the same float32 values (a mean far from 0 against the spread), the running statistics as torch's,
    # and the same bits on a rerun.
    case = Case((8, 16, 16, 16), True, True, True)
    with use_target("gpu"), recording() as launches:
        y, mean, invstd = case.forward()
    assert [(kernel_name(r.kernel), r.grid[0]) for r in launches] == [
        ("fnn_batch_norm_test_stats", 32), ("fnn_batch_norm_test", 32)]
    x64 = case.x.double()
    m64, v64 = x64.mean((0, 2, 3)), x64.var((0, 2, 3), unbiased=False)
    assert ((mean.double() - m64).abs() <= torch.finfo(torch.float32).eps * m64.abs()).all(), (mean.double() - m64)
    assert rel_err(invstd, (v64 + EPS).rsqrt()) <= 1e-6
    ref = F.batch_norm(x64, case.rm0.double(), case.rv0.double(), case.w.double(), case.b.double(), training=True,
                       momentum=MOMENTUM, eps=EPS)
    assert rel_err(y, ref) <= TOL
    assert rel_err(case.rm, case.rm0.double() * (1 - MOMENTUM) + MOMENTUM * m64) <= RUNNING_TOL
    assert rel_err(case.rv, case.rv0.double() * (1 - MOMENTUM) + MOMENTUM * x64.var((0, 2, 3))) <= RUNNING_TOL
    case.rm, case.rv = case.rm0.clone(), case.rv0.clone()
    with use_target("gpu"):
        again = case.forward()
    assert all(torch.equal(a, b) for a, b in zip((y, mean, invstd), again))


def test_batch_norm_launches():
    case = Case((2, 3, 4, 4), True, True, True)
    with recording() as launches:
        _, mean, invstd = case.forward()
        case.backward(torch.randn_like(case.x), mean, invstd)
    # forward: per-tile statistics, then their combination, running stats and y; backward: the channel
    # sums, then dx
    assert [kernel_name(r.kernel) for r in launches] == [
        "fnn_batch_norm_test_stats", "fnn_batch_norm_test", "_batch_norm_bwd_dwdb_kernel", "_batch_norm_bwd_dx_kernel"]


def test_generated_batch_norm_source_has_header_labels_and_launch():
    spec = bn_spec((2, 3, 4, 4), True)
    text = generate(spec)
    assert text.startswith(spec.header)
    assert "# %2 batch_norm\n" in text
    assert f"def {spec.name}(" in text
    assert ("\ndef launch(x, weight, bias, running_mean, running_var, y, save_mean, save_invstd, counter=None, "
            "residual=None, st=None, nbytes=None):") in text
    assert f"def {spec.name}_stats(" in text and "\ndef stats_size(n):" in text
    compile(text, spec.name, "exec")


@pytest.mark.aot
def test_batch_norm_kernels_compile_for_sm90_without_spills():
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(reason)

    def program():
        # training with affine; eval without (None weight and unused pointers)
        for shape, training in [((64, 6, 28, 28), True), ((64, 120), False)]:
            case = Case(shape, training, training, True)
            _, mean, invstd = case.forward()
            case.backward(case.x, mean, invstd)

    compiled = aot.compile_launches(aot.collect(program))
    assert {c.name for c in compiled} == {"fnn_batch_norm_test_stats", "fnn_batch_norm_test",
                                          "_batch_norm_bwd_dwdb_kernel", "_batch_norm_bwd_dx_kernel"}
    for c in compiled:
        assert not c.resources.spills, c.resources


def test_statistics_from_a_convs_tile_partials_are_within_an_ulp_of_the_exact_ones():
    # A conv's epilogue writes per-tile partial statistics (templates/conv.py `stats`) and the batch norm
    # combines them (`partials`), at the GPU's tiles here: 64 tiles of 32 rows, 32 programs. Outputs far
    # from 0 against their spread: the corrected two-pass keeps the mean within an ulp of float64's on the
    # same float32 values (without the correction it is ~2 ulps off, as a one-pass sum would be).
    from fusednn.compiler.templates.conv import ConvSpec, generate as conv_generate

    N, C, H, W, K = 8, 4, 16, 16, 8
    cs = ConvSpec(N=N, C=C, H=H, W=W, K=K, R=3, S=3, padding=1, stats=True, name="fnn_conv_stats_test")
    conv = load(conv_generate(cs), cs.name)
    bs = BatchNormSpec("fnn_batch_norm_partials_test", header("fnn_batch_norm_partials_test", ["%2 batch_norm"],
                       ["bn"], "kernels/batch_norm.py"), ("%2 batch_norm",), N, K, H * W, True, partials=True)
    bn = load(generate(bs), bs.name)
    x, w, b = torch.randn(N, C, H, W), torch.randn(K, C, 3, 3) * 0.3, torch.randn(K) * 0.01 + 3
    rm, rv, wt, bt = torch.rand(K), torch.rand(K) + 0.5, torch.randn(K), torch.randn(K)
    rm0, rv0 = rm.clone(), rv.clone()
    with use_target("gpu"), recording() as launches:
        y = torch.empty(N, K, H, W)
        st = torch.empty(conv.stats_size(N))
        conv.launch(x, w, b, y, None, None, st=st)
        out, mean, invstd = torch.empty_like(y), torch.empty(K), torch.empty(K)
        bn.launch(y, wt, bt, rm, rv, out, mean, invstd, st=st)
    assert [r.grid[0] for r in launches] == [64, 32]
    y64 = y.double()
    m64, v64 = y64.mean((0, 2, 3)), y64.var((0, 2, 3), unbiased=False)
    assert ((mean.double() - m64).abs() <= torch.finfo(torch.float32).eps * m64.abs()).all(), (mean.double() - m64)
    assert rel_err(invstd, (v64 + EPS).rsqrt()) <= 1e-6
    ref = F.batch_norm(y64, rm0.double(), rv0.double(), wt.double(), bt.double(), training=True, momentum=MOMENTUM,
                       eps=EPS)
    assert rel_err(out, ref) <= TOL
    assert rel_err(rm, rm0.double() * (1 - MOMENTUM) + MOMENTUM * m64) <= RUNNING_TOL
    assert rel_err(rv, rv0.double() * (1 - MOMENTUM) + MOMENTUM * y64.var((0, 2, 3))) <= RUNNING_TOL
