"""ResNet8 (fusednn/models.py) through fusednn, fused and unfused, in training and eval mode: output, input
gradient, every parameter gradient and the running statistics against torch in float64.

Tolerance: 1e-5 relative, or 4x torch float32's own error against float64 where that is larger (training-mode
batch norm over few values per channel is ill-conditioned, so float32 itself can miss by more than 1e-5)."""
from __future__ import annotations

import copy

import pytest
import torch

import fusednn
from fusednn.models import MODELS, ResNet8
from tests.helpers import rel_err, relu_margin


def _tol(f32: torch.Tensor, f64: torch.Tensor) -> float:
    return max(1e-5, 4 * rel_err(f32, f64))


def _run(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    y = model(x)
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape))  # not a sum: BN would zero it
    grads = {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}
    return y.detach(), grads


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_resnet8_output_gradients_and_running_stats_match_torch_float64(fuse, training):
    in_channels = 3 if fuse else 1
    net = ResNet8(in_channels=in_channels).train(training)
    if not training:  # non-trivial running statistics, so eval mode does not see mean 0 / var 1
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    for _ in range(50):  # an input with no ReLU input within float32's rounding of the kink (~1 in 2 draws)
        x = torch.randn(2, in_channels, 32, 32)
        if relu_margin(net, x) >= 1e-5:
            break
    else:
        pytest.fail("50 draws each put a ReLU input within float32's rounding of its kink")
    eager32, eager64 = copy.deepcopy(net), copy.deepcopy(net).double()
    compiled = fusednn.compile(net, fuse=fuse)

    y, grads = _run(compiled, x)
    y32, grads32 = _run(eager32, x)
    y64, grads64 = _run(eager64, x.double())

    assert y.shape == (2, 10)
    assert rel_err(y, y64) <= _tol(y32, y64)
    assert grads.keys() == grads64.keys() and len(grads) == 1 + len(list(net.parameters()))
    for name in grads64:
        assert rel_err(grads[name], grads64[name]) <= _tol(grads32[name], grads64[name]), name
    for (name, b), b64 in zip(net.named_buffers(), eager64.buffers()):
        if b.is_floating_point():
            assert rel_err(b, b64) <= 1e-5, name
        else:
            assert torch.equal(b, b64), name


def test_resnet8_is_registered_and_fuses_each_batch_norm_with_its_residual_add_and_relu():
    assert MODELS["resnet8"] is ResNet8
    fused = fusednn.compile(ResNet8())
    unfused = fusednn.compile(ResNet8(), fuse=False)
    x = torch.randn(2, 1, 32, 32)
    fused(x), unfused(x)
    # 9 convs, 9 batch norms, 6 relus, 3 residual adds, 1 pool, 1 linear; fused: each training batch norm takes
    # the relu after it, or the residual add and relu (a conv keeps its own kernel: the statistics need all of
    # it). In the two blocks with a projection shortcut, the add's operands are both batch norms: the
    # shortcut's takes the add and relu, the other's output is its residual.
    assert unfused.stats()["groups"] == 30
    kernels = fused.stats()["kernels"]
    assert len(kernels) == 20, kernels
    assert sum(k.startswith("fnn_batch_norm_act") for k in kernels) == 7, kernels
    assert sum(k.startswith("fnn_batch_norm_") and "act" not in k for k in kernels) == 2, kernels
