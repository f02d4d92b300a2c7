"""The Triton backend end to end: LeNet forward and every gradient against float64 torch, launch counts,
training parity with torch eager, autograd semantics (no_grad, retain_graph, double backward), no mutation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fusednn
from fusednn import launch
from fusednn.optim import SGD
from tests.helpers import rel_err
from tests.models import LeNet, Mixed

TOL = 1e-5


def _grads_match(model, ref, tol=TOL):
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= tol, name


@pytest.mark.parametrize("fuse", [True, False])
def test_lenet_forward_and_every_gradient_match_float64_torch(fuse):
    net = LeNet()
    ref = copy.deepcopy(net).double()
    c = fusednn.compile(net, fuse=fuse)
    x = torch.randn(3, 1, 32, 32, requires_grad=True)
    xr = x.detach().double().requires_grad_()
    y, yr = c(x), ref(xr)
    assert rel_err(y, yr) <= TOL
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g.double())
    assert rel_err(x.grad, xr.grad) <= TOL
    _grads_match(net, ref)


def test_lenet_launch_counts_fused_and_unfused():
    x = torch.randn(2, 1, 32, 32)
    fused = fusednn.compile(LeNet())
    fused(x).sum().backward()
    s = fused.stats()
    assert s["forward"]["launches"] == 5 and s["groups"] == 5
    # backward: 2 conv_relu_pool (dx+dw+db kernels each, dx skipped for conv1's input), 3 linear (dx, dw+db)
    assert s["backward"]["launches"] == 9
    unfused = fusednn.compile(LeNet(), fuse=False)
    unfused(x).sum().backward()
    u = unfused.stats()
    assert u["forward"]["launches"] == 11  # one per op: 2 conv, 4 relu, 2 pool, 3 linear (reshape is a view)
    assert u["backward"]["launches"] > s["backward"]["launches"]
    assert u["forward"]["bytes"] > s["forward"]["bytes"]


def test_fused_lenet_saves_pooled_output_and_1_byte_argmax_not_the_full_activation():
    c = fusednn.compile(LeNet())
    c(torch.randn(2, 1, 32, 32))
    vals, extra = c._last().executable.saved_keys
    names = sorted(str(v) for v in vals)
    assert "%1" not in names and "%2" not in names  # the full-size conv1 / relu activations
    assert {k for _, k in extra} == {"idx"}


def test_mixed_model_eval_matches_float64_torch_fused_and_unfused():
    for fuse in (True, False):
        net = Mixed().eval()
        ref = copy.deepcopy(net).double()
        c = fusednn.compile(net, fuse=fuse)
        x = torch.randn(2, 3, 16, 16)
        y, yr = c(x), ref(x.double())
        assert rel_err(y, yr) <= TOL
        g = torch.randn_like(y)
        y.backward(g)
        yr.backward(g.double())
        _grads_match(net, ref)


def test_mixed_model_train_updates_running_stats_like_torch():
    net = Mixed()
    net.drop.p = 0.0  # keep dropout out of the comparison (its mask comes from fusednn's own RNG)
    ref = copy.deepcopy(net).double()
    c = fusednn.compile(net)
    x = torch.randn(4, 3, 16, 16)
    y, yr = c(x), ref(x.double())
    assert rel_err(y, yr) <= TOL
    assert rel_err(net.bn.running_mean, ref.bn.running_mean) <= TOL
    assert rel_err(net.bn.running_var, ref.bn.running_var) <= TOL
    assert net.bn.num_batches_tracked.item() == ref.bn.num_batches_tracked.item() == 1


def test_backward_twice_gives_bit_identical_gradients():
    net = LeNet()
    c = fusednn.compile(net)
    x = torch.randn(4, 1, 32, 32)
    c(x).square().sum().backward()
    first = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    c(x).square().sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(first, net.parameters()))


def test_grads_accumulate_and_retain_graph_works():
    net = LeNet()
    c = fusednn.compile(net)
    y = c(torch.randn(2, 1, 32, 32)).sum()
    y.backward(retain_graph=True)
    once = [p.grad.clone() for p in net.parameters()]
    y.backward()
    assert all(rel_err(p.grad, 2 * a) <= 1e-6 for a, p in zip(once, net.parameters()))
    with pytest.raises(RuntimeError):
        y.backward()  # buffers freed, as in eager


def test_no_grad_saves_nothing_and_runs_no_autograd_node():
    c = fusednn.compile(LeNet())
    with torch.no_grad():
        y = c(torch.randn(2, 1, 32, 32))
    assert y.grad_fn is None and not y.requires_grad
    with torch.inference_mode():
        assert c(torch.randn(2, 1, 32, 32)).grad_fn is None


def test_double_backward_raises_clear_error():
    net = LeNet()
    c = fusednn.compile(net)
    y = c(torch.randn(2, 1, 32, 32)).sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y, [net.fc3.bias], create_graph=True)


def test_frozen_parameters_get_no_gradient_and_input_grad_only_when_asked():
    net = LeNet()
    for p in net.conv1.parameters():
        p.requires_grad_(False)
    c = fusednn.compile(net)
    x = torch.randn(2, 1, 32, 32)
    c(x).sum().backward()
    assert net.conv1.weight.grad is None and net.conv2.weight.grad is not None


def test_forward_and_backward_never_mutate_inputs():
    net = LeNet()
    c = fusednn.compile(net)
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    x0 = x.detach().clone()
    w0 = [p.detach().clone() for p in net.parameters()]
    y = c(x)
    g = torch.randn_like(y)
    g0 = g.clone()
    y.backward(g)
    assert torch.equal(x, x0) and torch.equal(g, g0)
    assert all(torch.equal(a, p) for a, p in zip(w0, net.parameters()))


def test_function_with_loss_runs_loss_backward_inside_the_plan():
    net = LeNet()
    ref = copy.deepcopy(net).double()
    step = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))
    x, t = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    loss = step(x, t)
    assert step.fused_graph.nodes[-1].op == "cross_entropy"
    with launch.recording() as rec:
        loss.backward()
    assert len(rec) == 10  # the loss backward's kernel plus LeNet's nine
    lr = F.cross_entropy(ref(x.double()), t)
    lr.backward()
    assert rel_err(loss, lr) <= TOL
    _grads_match(net, ref)


def test_training_parity_fused_unfused_and_eager_over_20_steps():
    torch.manual_seed(0)
    base = LeNet()
    models = {"eager": copy.deepcopy(base), "fused": copy.deepcopy(base), "unfused": copy.deepcopy(base)}
    run = {"eager": models["eager"], "fused": fusednn.compile(models["fused"]),
           "unfused": fusednn.compile(models["unfused"], fuse=False)}
    opts = {"eager": torch.optim.SGD(models["eager"].parameters(), lr=0.01, momentum=0.9),
            "fused": SGD(models["fused"].parameters(), lr=0.01, momentum=0.9),
            "unfused": SGD(models["unfused"].parameters(), lr=0.01, momentum=0.9)}
    for step in range(20):
        x, t = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
        losses = {}
        for k in models:
            opts[k].zero_grad()
            loss = F.cross_entropy(run[k](x), t)
            loss.backward()
            opts[k].step()
            losses[k] = loss.item()
        for k in ("fused", "unfused"):
            assert abs(losses[k] - losses["eager"]) <= 1e-4 * abs(losses["eager"]), (step, k, losses)
            for p, q in zip(models[k].parameters(), models["eager"].parameters()):
                assert rel_err(p, q) <= 1e-4, (step, k)
