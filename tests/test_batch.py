"""Batch polymorphism: one specialisation serves every batch size (compiler/batch.py, fusednn/api.py), its
kernels take the batch as a runtime argument, and results at every batch match float64 torch."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn import launch
from fusednn.tools import aot
from fusednn.compiler import configs
from tests.helpers import rel_err
from tests.models import LeNet

TOL = 1e-5


class ConvBN(nn.Module):
    """conv -> BatchNorm (batch statistics in training) -> relu -> avg pool -> flatten -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # a bias before BatchNorm has no gradient
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc(torch.flatten(x, 1))


class FlattensBatch(nn.Module):
    """Folds the batch into other dims (`x.view(-1, 6)`, `.view(-1)`): not batch-polymorphic."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x.view(-1, 6))).view(-1)


def _check_step(net: nn.Module, loss_of, compiled, inputs: list[torch.Tensor]) -> None:
    """compiled(*inputs) and every gradient (parameters and float inputs, under a random upstream gradient)
    against float64 torch."""
    ref = copy.deepcopy(net).double()
    for p in [*net.parameters(), *ref.parameters()]:
        p.grad = None
    xs = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    xr = [(t.double() if t.is_floating_point() else t).requires_grad_(t.is_floating_point()) for t in inputs]
    out, want = compiled(*xs), loss_of(ref, *xr)
    assert out.shape == want.shape and rel_err(out, want) <= TOL
    g = torch.randn(want.shape, dtype=torch.float64)
    out.backward(g.float())
    want.backward(g)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        if q.grad is None:  # a parameter this call does not use
            assert p.grad is None, name
            continue
        assert rel_err(p.grad, q.grad) <= TOL, name
    for a, b in zip(xs, xr):
        if a.is_floating_point():
            assert rel_err(a.grad, b.grad) <= TOL
    for a, b in zip(net.buffers(), ref.buffers()):  # BatchNorm's running statistics, updated the same
        assert rel_err(a, b) <= TOL


@pytest.mark.parametrize("fuse", [True, False])
def test_batch_1_3_8_from_one_specialisation_match_float64_torch(fuse):
    net = LeNet()
    loss = lambda m, x, y: F.cross_entropy(m(x), y)  # noqa: E731  'mean' divides by the actual batch
    c = fusednn.compile(lambda x, y: loss(net, x, y), fuse=fuse)
    for n in (8, 1, 3, 8):
        _check_step(net, loss, c, [torch.randn(n, 1, 32, 32), torch.randint(0, 10, (n,))])
    assert c.trace_count == 1 and c.specializations == 1
    assert "f32[N=8,6,28,28]" in c.graph.format(batch=True)


@pytest.mark.parametrize("fuse", [True, False])
def test_batch_norm_statistics_and_mean_loss_follow_the_actual_batch(fuse):
    net = ConvBN()
    loss = lambda m, x, t: F.mse_loss(m(x), t)  # noqa: E731
    c = fusednn.compile(lambda x, t: loss(net, x, t), fuse=fuse)
    for n in (6, 2, 5):
        _check_step(net, loss, c, [torch.randn(n, 3, 6, 6), torch.randn(n, 5)])
    assert c.trace_count == 1


class Modern(nn.Module):
    """The newer op families at changing batch sizes: group/layer/instance norm, GELU and SiLU, torch.cat
    along channels, mean over (2, 3), amax, a max pool with its indices unused, K-dim cross-entropy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn, self.inorm = nn.GroupNorm(2, 4), nn.InstanceNorm2d(4, affine=True)
        self.ln = nn.LayerNorm([8, 4, 4])
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        h = torch.cat([F.gelu(self.gn(h)), F.silu(self.inorm(h))], dim=1)
        h = self.ln(F.max_pool2d(h, 2))
        logits = self.head(h + h.mean((2, 3), keepdim=True) - h.amax(1, keepdim=True))
        return F.cross_entropy(logits, t, label_smoothing=0.1)


@pytest.mark.parametrize("fuse", [True, False])
def test_newer_op_families_follow_the_actual_batch(fuse):
    net = Modern()
    c = fusednn.compile(lambda x, t: net(x, t), fuse=fuse)
    for n in (4, 3, 6):
        _check_step(net, lambda m, x, t: m(x, t), c, [torch.randn(n, 2, 8, 8), torch.randint(0, 3, (n, 4, 4))])
    assert c.trace_count == 1


def test_model_that_flattens_the_batch_keeps_it_in_the_key_and_stays_correct():
    net = FlattensBatch()
    c = fusednn.compile(net)
    for n in (4, 3):
        _check_step(net, lambda m, x: m(x), c, [torch.randn(n, 12)])
    assert c.trace_count == 2 and not c.fused_graph.dynamic
    _check_step(net, lambda m, x: m(x), c, [torch.randn(4, 12)])
    assert c.trace_count == 2


class BranchesOnBatch(nn.Module):
    """A forward that branches on the batch size where the check traces of a compile at batch 8 (9 and 1)
    do not tell: 8 and 9 take the branch, 1 does not, so the specialisation serves batch >= 2, and 3 does
    not take it either. A batch it has not traced at must be traced before it runs."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)  # a bias before BatchNorm has no gradient
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if x.shape[0] > 4:
            y = self.bn(y)
        return self.out(torch.tanh(y))


def test_a_branch_on_the_batch_size_is_followed_at_every_batch():
    torch.manual_seed(0)
    net = BranchesOnBatch()
    c = fusednn.compile(net)
    for n in (8, 3, 5, 8, 3, 3, 6, 2):
        _check_step(net, lambda m, x: m(x), c, [torch.randn(n, 4)])  # buffers too: the counts
    assert net.bn.num_batches_tracked.item() == 4  # at 8, 5, 8 and 6 only
    assert c.trace_count == 2  # batch > 4 and batch <= 4: one specialisation each, each serving its batches


class EagerBranch(nn.Module):
    """A branch on the batch size between two calls run in torch (strict=False) that differ only in which
    keyword takes the number: `clamp(min=0.1)` and `clamp(max=0.1)` record the same captured arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return torch.clamp(y, min=0.1) if x.shape[0] > 4 else torch.clamp(y, max=0.1)


def test_calls_run_in_torch_compare_by_function_and_argument_layout():
    torch.manual_seed(0)
    net = EagerBranch()
    c = fusednn.compile(net, strict=False)
    for n in (8, 3, 1, 8):
        x = torch.randn(n, 4)
        assert rel_err(c(x), copy.deepcopy(net).double()(x.double())) <= TOL, n


class CountsCalls(nn.Module):
    """A forward that sets an attribute as it runs (a call counter), read by nothing it computes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(self.fc(x))


def test_a_forward_that_counts_its_calls_matches_torch_at_every_batch():
    # Each trace runs the forward's Python, so the count moves and the key with it: a new batch (traced
    # before it is served) finds the key changed and compiles again. What it computes stays torch's.
    torch.manual_seed(0)
    net = CountsCalls()
    c = fusednn.compile(net)
    for n in (8, 5, 6, 8, 5, 3):
        x = torch.randn(n, 4)
        assert rel_err(c(x), torch.tanh(copy.deepcopy(net.fc).double()(x.double()))) <= TOL, n


def _recorded_step(c, net: nn.Module, n: int) -> list[launch.Launch]:
    """Every launch of a forward and backward at batch n, recorded without running any kernel."""
    x, y = torch.randn(n, 1, 32, 32, requires_grad=True), torch.randint(0, 10, (n,))
    with launch.recording(execute=False) as rec:
        c(x, y).backward()
    return rec


@pytest.mark.parametrize("target", ["interp", "gpu"])
@pytest.mark.parametrize("fuse", [True, False])
def test_no_kernel_takes_the_batch_as_a_constexpr(fuse, target):
    """At batch 8, 3 and 1: the same kernels, launched with the same constexprs and specialisations (the
    compilation `aot.job_of` asks for), so no batch size compiles anything new."""
    net = LeNet()
    c = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y), fuse=fuse)
    with configs.use_target(target):
        steps = {n: _recorded_step(c, net, n) for n in (8, 3, 1)}
    assert c.trace_count == 1
    base = steps[8]
    assert len(base) >= 5
    for n in (3, 1):
        assert [r.kernel for r in steps[n]] == [r.kernel for r in base]
        for r, r8 in zip(steps[n], base):
            assert aot.job_of(r) == aot.job_of(r8), launch.kernel_name(r.kernel)
        assert [r.grid for r in steps[n]] != [r.grid for r in base]  # the grids do follow the batch


def test_lenet_default_training_compiles_one_specialisation_per_mode(monkeypatch):
    """`fusednn train`'s loop: train batch 8 with a partial last batch, two evaluation batch sizes."""
    from fusednn.tools import train

    made = []
    real = fusednn.compile

    def spy(*a, **k):
        made.append(real(*a, **k))
        return made[-1]

    monkeypatch.setattr(fusednn, "compile", spy)
    monkeypatch.setattr(train, "evaluate", functools.partial(train.evaluate, batch_size=16))
    train.fit(train.TrainConfig(epochs=1, limit=20))  # 20 = 8 + 8 + 4 to train; 16 + 4 to evaluate
    model, loss = made
    assert model.trace_count == 2  # train and eval
    assert sorted(s.graph.nodes[0].out.type.shape[0] for s in model._fnn_cache.values()) == [8, 16]
    assert all(s.min_batch == 1 for s in model._fnn_cache.values())
    assert loss.trace_count == 1
