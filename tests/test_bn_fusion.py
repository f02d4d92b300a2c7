"""Batch norm -> [+ residual] -> [activation] as one kernel (batch_norm_act, passes.fuse_batch_norm), forward
(compiler/templates/batch_norm.py) and backward (kernels/batch_norm.py), in training and with running
statistics, in the ways models write it.

Every check compares the output, the input's gradient, every parameter's gradient and every buffer with torch in
float64; tolerance 1e-5 relative, or 4x torch float32's own error where that is larger (training batch norm
over few values per channel is ill-conditioned). Launch counts come from `stats()`.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn import launch
from fusednn.compiler import passes
from fusednn.compiler.configs import use_target
from tests.helpers import rel_err

ACTS = {
    "relu": F.relu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh"), "silu": F.silu,
    "relu6": F.relu6, "leaky_relu": lambda t: F.leaky_relu(t, 0.1), "tanh": torch.tanh, "sigmoid": torch.sigmoid,
    "elu": F.elu, "mish": F.mish, "hardswish": F.hardswish, "none": lambda t: t,
}


def _tol(f32: torch.Tensor, f64: torch.Tensor) -> float:
    return max(1e-5, 4 * rel_err(f32, f64))


def _run(model: nn.Module, x: torch.Tensor, grad: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(grad)
    y = model(x)
    # not a sum: a training batch norm's dx would be 0
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape) ** 3)
    grads = {n: p.grad for n, p in model.named_parameters()}
    if grad:
        grads["input"] = x.grad
    return y.detach(), grads


def _check(model: nn.Module, x: torch.Tensor, fuse: bool = True, input_grad: bool = True) -> fusednn.CompiledModule:
    """The compiled model matches torch float64 in output, gradients and buffers; returns it."""
    model.zero_grad(set_to_none=True)
    eager32, eager64 = copy.deepcopy(model), copy.deepcopy(model).double()
    compiled = fusednn.compile(model, fuse=fuse)
    y, grads = _run(compiled, x, input_grad)
    y32, grads32 = _run(eager32, x, input_grad)
    y64, grads64 = _run(eager64, x.double(), input_grad)
    assert rel_err(y, y64) <= _tol(y32, y64)
    assert grads.keys() == grads64.keys()
    for name in grads64:
        assert grads[name] is not None, name
        assert rel_err(grads[name], grads64[name]) <= _tol(grads32[name], grads64[name]), name
    for (name, b), b64 in zip(model.named_buffers(), eager64.buffers()):
        if b.is_floating_point():
            assert rel_err(b, b64) <= 1e-5, name
        else:
            assert torch.equal(b, b64), name
    return compiled


def _fused(compiled: fusednn.CompiledModule) -> list[str]:
    return [k for k in compiled.stats()["kernels"] if k.startswith("fnn_batch_norm_act")]


def _affine(model: nn.Module) -> nn.Module:
    """Affine parameters and running statistics away from 1 / 0, so a missing term shows."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.weight is not None:
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.5, 0.5)
            if m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


class Unit(nn.Module):
    """conv -> bn -> [+ residual] -> act; the residual is the block input (same shape)."""

    def __init__(self, act: str = "relu", residual: bool = False, inplace_add: bool = False, **bn) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, **bn)
        self.act, self.residual, self.inplace_add = ACTS[act], residual, inplace_add

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.residual and self.inplace_add:
            y += x
        elif self.residual:
            y = x + y  # the residual first: either operand order
        return self.act(y)


@pytest.mark.parametrize("act", sorted(ACTS))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_batch_norm_activation_and_residual_fuse_and_match_torch_in_training(act, residual):
    if act == "none" and not residual:
        pytest.skip("nothing to fuse")
    model = _affine(Unit(act, residual))
    c = _check(model, torch.randn(3, 4, 6, 6))
    assert len(_fused(c)) == 1 and len(c.stats()["kernels"]) == 2, c.stats()["kernels"]  # conv, bn+act


@pytest.mark.parametrize("act", ["gelu"])  # act' from z, recomputed in both kernels
def test_gpu_configs_split_the_batch_norm_rows_and_match_torch(act):
    # With the GPU's launch configs (2,048 rows here, in the interpreter) the conv writes per-tile partial
    # statistics (64 tiles of 32 rows) that every program of the batch norm combines before normalising its
    # own slice of rows (configs.normalize_split), and the backward cuts each channel's sums into row slices
    # (configs.reduce_split); the pulled-back dy the residual receives is written slice by slice. The input
    # sits far from 0, so the conv's outputs have a mean large against their spread.
    model = _affine(Unit(act, residual=True))
    with use_target("gpu"), launch.recording() as launches:
        c = _check(model, torch.randn(8, 4, 16, 16) + 4)
    grids = {launch.kernel_name(r.kernel): r.grid for r in launches}
    conv, bn = c.stats()["kernels"]
    assert grids[conv][0] > 1 and grids[bn][0] > 1 and grids["_batch_norm_bwd_dwdb_kernel"][0] > 1, grids
    assert "stats=True" in str(c.fused_graph) and "conv_stats=True" in str(c.fused_graph)


def test_the_conv_makes_its_batch_norms_dx_and_sums_its_split_k_partials_at_gpu_configs():
    # conv -> batch norm + residual + relu, at the GPU's tiles (in the interpreter): the batch norm's backward
    # is its reduction kernel only; the conv's dw kernel adds the reduction's partials (BN_SPLIT > 1) and
    # writes dweight and dbias, its dx kernel makes the batch norm's dx in its GEMM prologue and, in extra
    # programs, sums the dw kernel's split-K partials (SPLIT_W > 1): 3 backward launches for the unit,
    # bit-identical on a rerun.
    model = _affine(Unit("relu", residual=True))
    with use_target("gpu"), launch.recording() as launches:
        c = _check(model, torch.randn(8, 4, 16, 16) + 4)
    names = [launch.kernel_name(r.kernel) for r in launches]
    backward = names[names.index("_batch_norm_bwd_dwdb_kernel"):]
    assert backward == ["_batch_norm_bwd_dwdb_kernel", "_conv_relu_pool_bwd_dw_kernel",
                        "_conv_relu_pool_bwd_dx_kernel"], names
    by_name = {launch.kernel_name(r.kernel): r for r in launches}
    dw, dx = by_name["_conv_relu_pool_bwd_dw_kernel"], by_name["_conv_relu_pool_bwd_dx_kernel"]
    assert dw.meta["BN"] and dw.meta["SPLIT"] > 1 and dw.args[-1] > 1  # the last: BN_SPLIT
    assert dx.meta["BN"] and dx.meta["SUM_DW"] and dx.meta["SPLIT_W"] == dw.meta["SPLIT"]
    assert dx.meta["ACCUMULATE"]  # the residual is the conv's input: its gradient added in the dx kernel
    x = torch.randn(8, 4, 16, 16) + 4
    runs = []
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with use_target("gpu"):
            runs.append(_run(c, x)[1])
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2)], ids=["max", "avg"])
def test_a_conv_with_a_fused_pool_makes_the_dx_of_the_batch_norm_after_it_at_gpu_configs(pool):
    # airbench's order, conv -> pool -> batch norm -> GELU: the batch norm's dx is made at the pooled
    # positions in the conv's prologue, then routed through the pool (the argmax, or 1/k² of the window)
    model = _affine(nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), pool, nn.BatchNorm2d(8), nn.GELU()))
    with use_target("gpu"), launch.recording() as launches:
        _check(model, torch.randn(8, 4, 16, 16))
    names = [launch.kernel_name(r.kernel) for r in launches]
    assert names[names.index("_batch_norm_bwd_dwdb_kernel"):] == [
        "_batch_norm_bwd_dwdb_kernel", "_conv_relu_pool_bwd_dw_kernel", "_conv_relu_pool_bwd_dx_kernel"], names
    assert all(r.meta.get("BN") for r in launches if launch.kernel_name(r.kernel).startswith("_conv_relu_pool_bwd"))


class ConvOutputResidual(nn.Module):
    """relu(bn(c) + c): the batch norm reads the conv's output twice (its input and its residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv(x)
        return torch.relu(self.bn(c) + c)


def test_a_batch_norm_whose_residual_is_the_conv_output_keeps_its_own_dx_kernel():
    # the conv's output has a second reader (the residual), so it gets the sum of two gradients: the pair
    # does not form, and the conv's backward runs once
    c = _check(_affine(ConvOutputResidual()), torch.randn(2, 4, 6, 6))
    kernels = c.stats()["backward"]["per_kernel"]
    assert "_batch_norm_bwd_dx_kernel" in kernels, kernels
    assert kernels["_conv_relu_pool_bwd_dx_kernel"]["launches"] == kernels["_conv_relu_pool_bwd_dw_kernel"]["launches"] == 1


@pytest.mark.parametrize("frozen", ["conv weight", "none"])
def test_a_conv_whose_weight_needs_no_gradient_leaves_the_batch_norm_its_own_dx_kernel(frozen):
    # the pair runs where the conv computes dw (its dw kernel makes the coefficients); a frozen conv keeps
    # the batch norm's own dx kernel, and both match torch
    model = _affine(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU()))
    if frozen == "conv weight":
        model[3].weight.requires_grad_(False)
    eager64 = copy.deepcopy(model).double()
    c = fusednn.compile(model)
    x = torch.randn(2, 3, 6, 6)
    y, grads = _run(c, x)
    y64, grads64 = _run(eager64, x.double())
    assert rel_err(y, y64) <= 1e-5
    for name, g64 in grads64.items():
        assert (grads[name] is None) == (g64 is None), name
        assert g64 is None or rel_err(grads[name], g64) <= 1e-5, name
    kernels = c.stats()["backward"]["per_kernel"]
    assert ("_batch_norm_bwd_dx_kernel" in kernels) == (frozen == "conv weight"), kernels
    assert kernels["_batch_norm_bwd_dwdb_kernel"]["launches"] == 2


@pytest.mark.parametrize("act", ["relu", "gelu", "none"])
def test_running_statistics_path_fuses_with_gradients(act):
    """eval mode with gradients (a frozen batch norm while fine-tuning): the running statistics normalise."""
    model = _affine(Unit(act, residual=True)).eval()
    c = _check(model, torch.randn(3, 4, 6, 6))
    assert len(_fused(c)) == 1


@pytest.mark.parametrize("bn", [dict(affine=False), dict(momentum=None), dict(track_running_stats=False)],
                         ids=["no-affine", "cumulative-average", "no-running-stats"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_batch_norm_variants_fuse(bn, act):
    c = _check(_affine(Unit(act, residual=True, **bn)), torch.randn(3, 4, 6, 6))
    assert len(_fused(c)) == 1


def test_in_place_residual_add_and_unfused_agree():
    model = _affine(Unit("relu", residual=True, inplace_add=True))
    assert len(_fused(_check(model, torch.randn(3, 4, 6, 6)))) == 1
    _check(model, torch.randn(3, 4, 6, 6), fuse=False)


def test_residual_gradient_not_needed_when_the_input_does_not_require_it():
    c = _check(_affine(Unit("gelu", residual=True)), torch.randn(3, 4, 6, 6), input_grad=False)
    assert len(_fused(c)) == 1


class PreActBlock(nn.Module):
    """Pre-activation residual block: bn -> relu -> conv, twice, + identity (nn.Identity shortcut)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out += self.shortcut(x)
        return out


class Projection(nn.Module):
    """A basic block with a projection shortcut: the add's operands are both batch norm outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.shortcut = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PoolThenBN(nn.Module):
    """airbench's order: conv -> max pool -> bn -> gelu; and bn before an avg pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.gelu(self.bn1(F.max_pool2d(self.conv1(x), 2)))
        return F.avg_pool2d(F.silu(self.bn2(self.conv2(y))), 2)


class Head(nn.Module):
    """BatchNorm1d on a linear's output, then an activation."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn = nn.Linear(12, 8), nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(self.bn(self.fc(x)))


@pytest.mark.parametrize("make, shape, fused", [
    (PreActBlock, (3, 4, 6, 6), 2),
    (Projection, (3, 4, 8, 8), 2),
    (PoolThenBN, (3, 3, 8, 8), 2),
    (Head, (5, 12), 1),
], ids=["pre-activation", "projection", "pool-then-bn", "batchnorm1d"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_blocks_written_in_common_ways_match_torch(make, shape, fused, fuse):
    torch.manual_seed(0)
    c = _check(_affine(make()), torch.randn(shape), fuse=fuse)
    assert len(_fused(c)) == (fused if fuse else 0), c.stats()["kernels"]


class Twice(nn.Module):
    """One BatchNorm module called twice: its running statistics update in call order, so the first call
    must not move past the second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, momentum=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.bn(self.conv(x))
        b = self.bn(self.conv(x * 2.0))
        return F.relu(a + b)


class ReadsStats(nn.Module):
    """The running mean read between a batch norm and the add after it: it must see the updated value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4, momentum=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        shift = self.bn.running_mean.view(1, -1, 1, 1) * x
        return F.relu(y + shift)


@pytest.mark.parametrize("make", [Twice, ReadsStats])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_a_batch_norm_does_not_move_past_what_uses_its_running_statistics(make, fuse):
    _check(_affine(make()), torch.randn(3, 4, 6, 6), fuse=fuse)


class TwiceCumulative(nn.Module):
    """One BatchNorm(momentum=None) called twice per forward: num_batches_tracked counts both calls, and each
    call's cumulative-average factor is 1 / its own count."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4, momentum=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(x) + self.bn(x * 2.0)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_a_batch_norm_called_twice_counts_both_batches(fuse):
    model = _affine(TwiceCumulative())
    c = fusednn.compile(model, fuse=fuse)
    eager = copy.deepcopy(model)
    for _ in range(2):
        x = torch.randn(3, 4, 6, 6)
        assert rel_err(c(x), eager(x)) <= 1e-5
    assert int(model.bn.num_batches_tracked) == int(eager.bn.num_batches_tracked) == 4
    assert rel_err(model.bn.running_mean, eager.bn.running_mean) <= 1e-5
    assert rel_err(model.bn.running_var, eager.bn.running_var) <= 1e-5


def test_backward_is_bit_identical_across_runs():
    model = _affine(Projection())
    c = fusednn.compile(model)
    x = torch.randn(3, 4, 8, 8)
    runs = []
    for _ in range(2):
        model.zero_grad()
        _run(c, x)
        runs.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2), nn.MaxPool2d(2)], ids=["avg", "max"])
def test_a_conv_with_a_fused_pool_writes_the_statistics_of_the_pooled_values(pool):
    # conv -> pool -> training batch norm: the conv's epilogue takes the statistics of what it stores, the
    # pooled tile (an average's division included)
    model = _affine(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), pool, nn.BatchNorm2d(4), nn.ReLU()))
    c = _check(model, torch.randn(2, 3, 8, 8))
    assert "conv_stats=True" in str(c.fused_graph)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_a_residual_inputs_two_gradients_are_summed_in_the_conv_dx_kernel(fuse):
    # x feeds the conv and the residual add: the add's VJP hands x its gradient first, and the conv's dx
    # kernel adds it into its own result (GradSum.into), so no launch of its own sums them
    model = _affine(Unit("relu", residual=True))
    c = _check(model, torch.randn(3, 4, 6, 6), fuse=fuse)
    kernels = c.stats()["backward"]["per_kernel"]
    assert "_add_kernel" not in kernels and "_conv_relu_pool_bwd_dx_kernel" in kernels, kernels


def test_conv_bn_relu_unit_is_two_forward_and_at_most_five_backward_launches():
    """conv, then batch norm + residual + relu; backward: batch norm (reductions, dx; the relu and the residual's
    gradient inside them), conv (dx, dw and its split sum). Before this fusion: 3 forward launches, 6 backward."""
    c = fusednn.compile(_affine(Unit("relu", residual=True)))
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    c(x).backward(torch.randn(3, 4, 6, 6))
    st = c.stats()
    assert st["forward"]["launches"] == 2
    assert st["backward"]["launches"] <= 5, st["backward"]["per_kernel"]
    assert "_activation_bwd_dx_kernel" not in st["backward"]["per_kernel"]


def test_the_pass_leaves_batch_norms_alone_without_an_add_or_activation_after_them():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3))
    c = fusednn.compile(model)
    c(torch.randn(2, 3, 8, 8))
    assert not _fused(c)
    assert passes.fuse_batch_norm in passes.pipeline(True) and passes.fuse_batch_norm not in passes.pipeline(False)


class NegResidual(nn.Module):
    """-(bn(x) + r): the fused activation is neg, whose backward reads nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(self.bn(self.conv(x)) + x)


class ViewOfStats(nn.Module):
    """A view of the running mean taken before the batch norm and read after it: it aliases the buffer, so it
    sees the updated statistics (eager); the fused batch norm must not move past that read."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(4, momentum=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rm = self.bn.running_mean.view(1, -1, 1, 1)
        y = self.bn(x)
        return F.relu(y + x * rm)


@pytest.mark.parametrize("make", [NegResidual, ViewOfStats])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_negated_residual_and_a_view_of_the_running_statistics(make, fuse):
    _check(_affine(make()), torch.randn(3, 4, 6, 6) + 1.0, fuse=fuse)
