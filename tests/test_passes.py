"""Passes: how many kernel groups a model becomes, when fusion is refused, and overlapping pools."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn.compiler import passes
from fusednn.compiler.trace import trace
from tests.helpers import rel_err
from tests.models import LeNet, Mixed


def _ops(model, x, fuse=True):
    return [n.op for n in passes.run(trace(model, x), passes.pipeline(fuse)).nodes]


def test_lenet_groups_fused_and_unfused():
    x = torch.randn(2, 1, 32, 32)
    assert _ops(LeNet(), x) == ["conv_relu_pool", "conv_relu_pool", "reshape", "linear_relu", "linear_relu", "linear"]
    assert len(_ops(LeNet(), x, fuse=False)) == 12


def test_eval_dropout_is_removed_and_train_dropout_kept():
    m = Mixed()
    assert "dropout" in _ops(m, torch.randn(2, 3, 16, 16))
    assert "dropout" not in _ops(m.eval(), torch.randn(2, 3, 16, 16))


def test_fusion_refused_when_an_intermediate_has_another_user():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)

        def forward(self, x):
            z = F.relu(self.conv(x))
            return F.max_pool2d(z, 2), z  # the relu output is also returned

    ops = _ops(Branch(), torch.randn(1, 2, 10, 10))
    assert ops == ["conv_relu_pool", "max_pool2d"]  # conv+relu fuse; the pool cannot absorb a shared value


def test_linear_then_activation_with_two_users_stays_apart():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            return torch.tanh(h) + h

    # h feeds tanh and add, so the linear cannot absorb tanh; tanh -> add is a pointwise chain
    assert _ops(Two(), torch.randn(2, 3)) == ["linear", "pointwise"]


class ConvPool(nn.Module):
    def __init__(self, k, s, act=F.relu):
        super().__init__()
        self.conv, self.k, self.s, self.act = nn.Conv2d(3, 5, 3, padding=1), k, s, act

    def forward(self, x):
        return F.max_pool2d(self.act(self.conv(x)), self.k, self.s)


@pytest.mark.parametrize("k, s, fused", [(2, 2, True), (3, 3, True), (3, 1, False), (3, 2, False)])
def test_only_non_overlapping_pools_fuse_and_both_forms_match_torch(k, s, fused):
    m = ConvPool(k, s)
    x = torch.randn(2, 3, 11, 11)
    ops = _ops(m, x)
    assert ops == (["conv_relu_pool"] if fused else ["conv_relu_pool", "max_pool2d"])
    _matches_float64_torch(m, x, fuse=True)


def _matches_float64_torch(m, x, fuse):
    """Compile a copy of m; its output and the gradients of x and every parameter match float64 torch."""
    mm, ref = copy.deepcopy(m), copy.deepcopy(m).double()
    c = fusednn.compile(mm, fuse=fuse)
    xx, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yr = c(xx), ref(xr)
    assert rel_err(y, yr) <= 1e-5
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    assert rel_err(xx.grad, xr.grad) <= 1e-5
    for p, q in zip(mm.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5
    return c


class Chain(nn.Module):
    """conv, then a pointwise chain with a shared input (x used twice) and a leaky_relu that saves its input."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.prelu = nn.PReLU(3)

    def forward(self, x):
        h = self.conv(x)              # conv with no activation: the chain starts after it
        z = torch.sigmoid(h * 2.0 + 0.5)
        z = F.leaky_relu(z - h, 0.1)  # h has two users: conv output feeds the chain twice
        return self.prelu(z)


def test_pointwise_chain_becomes_one_group_and_matches_torch():
    m = Chain()
    x = torch.randn(2, 2, 7, 7)
    g = passes.run(trace(m, x), passes.pipeline(True))
    assert [n.op for n in g.nodes] == ["conv2d", "pointwise"]
    assert g.nodes[1].tag == "mul,add,sigmoid,sub,leaky_relu,prelu"
    assert "pointwise[mul,add,sigmoid,sub,leaky_relu,prelu]" in str(g)
    assert _matches_float64_torch(m, x, fuse=True).stats()["forward"]["launches"] == 2
    assert _matches_float64_torch(m, x, fuse=False).stats()["forward"]["launches"] == 7  # conv + six elementwise


def test_a_gate_is_one_elementwise_group_and_matches_torch():
    """tanh(a + b) * sigmoid(c): two producers meet in one mul; each node joins exactly one group."""
    def gate(a, b, c):
        return torch.tanh(a + b) * torch.sigmoid(c)

    ins = [torch.randn(3, 4) for _ in range(3)]
    g = passes.run(trace(gate, *ins), passes.pipeline(True))
    assert [n.op for n in g.nodes] == ["pointwise"]
    assert [a.op for a in g.nodes[0].absorbed] == ["add", "tanh", "sigmoid", "mul"]
    assert [v.name for v in g.nodes[0].inputs] == ["a", "b", "c"]
    for fuse in (True, False):
        ours = [t.clone().requires_grad_() for t in ins]
        ref = [t.double().requires_grad_() for t in ins]
        y, yr = fusednn.compile(gate, fuse=fuse)(*ours), gate(*ref)
        assert rel_err(y, yr) <= 1e-5
        gy = torch.randn(3, 4)
        y.backward(gy)
        yr.backward(gy.double())
        assert all(rel_err(p.grad, q.grad) <= 1e-5 for p, q in zip(ours, ref))


def test_elementwise_group_lists_a_value_read_twice_once():
    g = passes.run(trace(lambda x: torch.relu(x + x), torch.randn(2, 3)), passes.pipeline(True))
    assert [n.op for n in g.nodes] == ["pointwise"] and [v.name for v in g.nodes[0].inputs] == ["x"]


def test_elementwise_groups_stop_where_the_shape_changes():
    """relu(b) of a [3] operand is not fused into the [4, 3] add it is broadcast into: a group's computed
    values all have the result's shape."""
    g = passes.run(trace(lambda b, x: torch.relu(b) + x, torch.randn(3), torch.randn(4, 3)), passes.pipeline(True))
    assert [n.op for n in g.nodes] == ["relu", "add"]
