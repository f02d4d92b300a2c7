"""Tracing: golden IR text for real PyTorch models, functions, in-place forms, and the module left untouched."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn.compiler import passes
from fusednn.compiler.ir import topo_check
from fusednn.compiler.trace import trace
from tests import golden_ir
from tests.models import LeNet, Mixed, lenet_ordered, lenet_sequential


def test_tutorial_lenet_traces_to_golden_ir():
    g = trace(LeNet(), torch.randn(64, 1, 32, 32))
    topo_check(g)
    assert str(g) + "\n" == golden_ir.LENET


def test_tutorial_lenet_fuses_to_golden_ir():
    g = passes.run(trace(LeNet(), torch.randn(64, 1, 32, 32)), passes.pipeline(True))
    topo_check(g)
    assert str(g) + "\n" == golden_ir.LENET_FUSED
    assert [n.op for n in g.nodes] == ["conv_relu_pool", "conv_relu_pool", "reshape", "linear_relu", "linear_relu", "linear"]


@pytest.mark.parametrize("make, golden", [(lenet_sequential, "LENET_SEQUENTIAL"), (lenet_ordered, "LENET_ORDERED")])
def test_sequential_lenet_traces_to_golden_ir(make, golden):
    assert str(trace(make(), torch.randn(64, 1, 32, 32))) + "\n" == getattr(golden_ir, golden)


def test_mixed_model_traces_train_and_eval_modes():
    m = Mixed()
    assert str(trace(m, torch.randn(2, 3, 16, 16))) + "\n" == golden_ir.MIXED_TRAIN
    m.eval()
    assert str(trace(m, torch.randn(2, 3, 16, 16))) + "\n" == golden_ir.MIXED_EVAL


def test_tracing_leaves_module_parameters_buffers_mode_and_rng_untouched():
    m = Mixed()
    before = copy.deepcopy(m.state_dict())
    x = torch.randn(2, 3, 16, 16)
    rng = torch.get_rng_state()
    trace(m, x)
    assert m.training
    assert torch.equal(torch.get_rng_state(), rng)
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.device.type == "cpu" for p in m.parameters())


def test_function_with_loss_traces_with_qualified_parameter_names():
    net = LeNet()
    g = trace(lambda x, y: F.cross_entropy(net(x), y), torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,)))
    assert g.nodes[-1].op == "cross_entropy"
    assert [v.name for v in g.inputs][:4] == ["x", "y", "net.conv1.weight", "net.conv1.bias"]
    assert g.nodes[0].module == "net.conv1"


def test_inplace_forms_trace_as_functional_ops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.ReLU(inplace=True)

        def forward(self, x):
            y = x * 2.0
            y.relu_()
            y += 1.0
            return self.act(y)

    g = trace(M(), torch.randn(3, 4))
    assert [n.op for n in g.nodes] == ["mul", "relu", "add", "relu"]
    assert [n.inputs[0].name for n in g.nodes[1:]] == ["1", "2", "3"]


def test_linear_on_any_leading_dims_and_conv_padding_modes():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.same = nn.Conv2d(2, 3, 3, padding="same", dilation=3)
            self.valid = nn.Conv2d(3, 3, 3, padding="valid")
            self.fc = nn.Linear(5, 2)

        def forward(self, x, z):
            return self.valid(self.same(x)), self.fc(z)

    g = trace(M(), torch.randn(1, 2, 12, 12), torch.randn(1, 1, 3, 5))
    assert g.nodes[0].attrs["padding"] == (3, 3) and g.nodes[0].out.type.shape == (1, 3, 12, 12)
    assert g.nodes[1].attrs["padding"] == (0, 0) and g.nodes[1].out.type.shape == (1, 3, 10, 10)
    assert g.nodes[2].out.type.shape == (1, 1, 3, 2)


def test_unsupported_op_error_names_op_module_location_and_supported_list():
    class Block(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()

        def forward(self, x):
            return self.block(x)

    with pytest.raises(fusednn.UnsupportedOpError) as e:
        trace(M(), torch.randn(2, 3))
    msg = str(e.value)
    assert "cumsum" in msg and "'block'" in msg and "test_trace.py:" in msg
    assert "conv2d" in msg and "max_pool2d" in msg  # the supported list


def test_to_dot_names_every_node_and_edge():
    g = passes.run(trace(LeNet(), torch.randn(2, 1, 32, 32)), passes.pipeline(True))
    dot = g.to_dot()
    assert dot.startswith('digraph "LeNet"') and dot.count("shape=box") == len(g.nodes)
    assert '"v_x" -> "v_3"' in dot and "conv_relu_pool[bias,relu,max_pool2d(2,2)]" in dot


def test_inplace_ops_through_views_reach_every_alias():
    """v = h.view(-1); v.add_(1) changes h; h.relu_() changes a view made before it (values, via fusednn)."""
    def f(x):
        h = x * 1.0
        v = h.view(-1)
        v.add_(1.0)
        w = h.unsqueeze(0)
        h.relu_()
        return h, v, w

    x = torch.randn(2, 3)
    for fuse in (True, False):
        outs, ref = fusednn.compile(f, fuse=fuse)(x), f(x.clone())
        assert all(torch.equal(a, b) for a, b in zip(outs, ref))


@pytest.mark.parametrize("how", ["view", "direct", "relu_inplace", "iadd"])
def test_inplace_write_into_an_input_is_refused(how):
    import torch.nn.functional as F

    def f(x):
        if how == "view":
            x.view(-1).add_(1.0)
        elif how == "direct":
            x.mul_(2.0)
        elif how == "relu_inplace":
            return F.relu(x, inplace=True)
        else:
            x += 1.0
        return x

    x = torch.randn(2, 3)
    keep = x.clone()
    with pytest.raises(fusednn.UnsupportedOpError, match=r"\(in place\) at the top level \(test_trace.py:\d+\) writes into "
                                                 r"input 'x'"):
        fusednn.compile(f)(x)
    assert torch.equal(x, keep)


def test_inplace_write_into_a_parameter_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            self.fc.weight.mul_(0.5)
            return self.fc(x)

    m = M()
    keep = m.fc.weight.detach().clone()
    with pytest.raises(fusednn.UnsupportedOpError, match="writes into param 'fc.weight'"):
        fusednn.compile(m)(torch.randn(2, 3))
    assert torch.equal(m.fc.weight, keep)


def test_flatten_forms_trace_to_reshape_and_identity_to_nothing():
    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.flat, self.id = nn.Flatten(), nn.Identity()

        def forward(self, x):
            return self.id(self.flat(x)), torch.flatten(x, 0, 2), x.flatten(2)

    g = trace(Head(), torch.randn(2, 3, 4, 5))
    assert [n.op for n in g.nodes] == ["reshape"] * 3
    assert [n.out.type.shape for n in g.nodes] == [(2, 60), (24, 5), (2, 3, 20)]
    from tests.opcheck import check_module

    check_module(Head().double(), [torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)])
    check_module(nn.Identity(), [torch.randn(2, 3, dtype=torch.float64, requires_grad=True)])  # returns its input


def test_a_call_returning_a_tuple_traces_as_one_node_per_result():
    g = trace(lambda x: F.max_pool2d(x, 2, return_indices=True), torch.randn(1, 2, 4, 4))
    assert [n.op for n in g.nodes] == ["max_pool2d", "max_pool2d_indices"]
    assert g.nodes[1].inputs == (g.inputs[0], g.nodes[0].out) and str(g.nodes[1].out.type) == "i64[1,2,2,2]"
    assert g.outputs == [g.nodes[0].out, g.nodes[1].out]
