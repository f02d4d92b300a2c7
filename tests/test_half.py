"""Half precision: a float16 model (`model.half()`) through fusednn's kernels, forward and every gradient.

The kernels of `codegen.HALF_OPS` load float16, compute in fp32 (GEMMs: float16 operands, fp32 accumulation)
and store their result's dtype, so a float16 step is compared with torch in float64. The tolerance is
torch's own for float16 (1e-3, relative, as torch.testing.assert_close's rtol for float16) or 4x eager
float16's error against float64, whichever is larger: float16 rounds each stored value to 11 bits, and a
weight gradient that is a cancelling sum of many terms can miss by more than that even in eager. Where
fusednn keeps a value in fp32 registers that eager stores in float16 (a fused epilogue; the max of a fused
pool chooses among unrounded values), it is closer to float64 than eager.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn import launch
from fusednn.compiler.configs import use_target
from fusednn.models import LeNet, LeNet5
from tests.helpers import rel_err

F16_RTOL = 1e-3  # torch.testing.assert_close's default rtol for float16


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {"input": x.grad, **{n: p.grad for n, p in model.named_parameters()}}


@pytest.mark.parametrize("make", [LeNet, LeNet5], ids=["lenet", "lenet5"])
@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_float16_model_matches_torch_float64_forward_and_every_gradient(make, fuse):
    torch.manual_seed(0)
    model = make().half()
    eager16, eager64 = copy.deepcopy(model), copy.deepcopy(model).double()
    x, y = torch.randn(4, 1, 32, 32).half(), torch.randint(0, 10, (4,))
    compiled = fusednn.compile(model, fuse=fuse)
    loss, grads = _step(compiled, x, y)
    loss16, grads16 = _step(eager16, x, y)
    loss64, grads64 = _step(eager64, x.double(), y)
    assert loss.dtype == torch.float16
    assert rel_err(loss, loss64) <= max(F16_RTOL, 4 * rel_err(loss16, loss64))
    for name, g64 in grads64.items():
        assert grads[name].dtype == torch.float16, name
        assert rel_err(grads[name], g64) <= max(F16_RTOL, 4 * rel_err(grads16[name], g64)), name


def test_float16_step_moves_about_half_the_bytes_of_float32():
    """Same launches; bytes at most 0.55x at a training batch of 4096 (the GPU launch configs, nothing run).
    Split-K weight-gradient partials stay fp32, so at batch 64, where conv1's are a large share, the ratio is
    higher (0.63)."""
    counts = {}
    for dtype in (torch.float32, torch.float16):
        torch.manual_seed(0)
        net = LeNet().to(dtype)
        c = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))
        x, y = torch.randn(4096, 1, 32, 32, dtype=dtype), torch.randint(0, 10, (4096,))
        with use_target("gpu"), launch.recording(execute=False):
            c(x, y).backward()
        st = c.stats()
        counts[dtype] = (st["forward"]["launches"], st["backward"]["launches"],
                         st["forward"]["bytes"] + st["backward"]["bytes"])
    (f32_fwd, f32_bwd, f32_bytes), (f16_fwd, f16_bwd, f16_bytes) = counts[torch.float32], counts[torch.float16]
    assert (f16_fwd, f16_bwd) == (f32_fwd, f32_bwd)
    assert f16_bytes <= 0.55 * f32_bytes, (f16_bytes, f32_bytes)


def test_ops_without_float16_kernels_are_refused_by_name():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LPPool2d(2, 2), nn.ReLU()).half()
    with pytest.raises(fusednn.InputMismatchError, match=r"lp_pool2d in module '1'.*take float32 \(half precision only for"):
        fusednn.compile(model)(torch.randn(2, 3, 8, 8).half())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU bfloat16 runs")
def test_bfloat16_is_refused_on_the_interpreter_with_why():
    with pytest.raises(fusednn.InputMismatchError, match=r"conv2d in module 'conv1'.*bf16\[2,1,32,32\].*bfloat16 needs "
                                                         r"a GPU.*truncation"):
        fusednn.compile(LeNet().bfloat16())(torch.randn(2, 1, 32, 32).bfloat16())


def test_float16_and_float32_calls_of_one_model_are_two_specialisations():
    torch.manual_seed(0)
    model = LeNet()
    c = fusednn.compile(model)
    x = torch.randn(2, 1, 32, 32)
    y32 = c(x)
    model.half()
    y16 = c(x.half())
    assert (y32.dtype, y16.dtype) == (torch.float32, torch.float16) and c.trace_count == 2
    assert rel_err(y16, y32) <= 4e-3


class _Reduces(nn.Module):
    """Global average pooling as mean((2, 3)) and a max over channels, with a ReLU6 and a depthwise conv."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self.dw(x))
        return self.fc(y.mean((2, 3))) + y.amax(1).mean((1, 2), keepdim=True).reshape(-1, 1)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_float16_reductions_depthwise_conv_and_relu6_match_torch_float64(fuse):
    torch.manual_seed(0)
    model = _Reduces().half()
    eager16, eager64 = copy.deepcopy(model), copy.deepcopy(model).double()
    x = torch.randn(3, 4, 6, 6).half()
    g = torch.randn(3, 3)
    outs = []
    for net, xx in ((fusednn.compile(model, fuse=fuse), x), (eager16, x), (eager64, x.double())):
        xx = xx.clone().requires_grad_()
        out = net(xx)
        out.backward(g.to(out.dtype))
        params = model if net is not eager16 and net is not eager64 else net
        outs.append((out.detach(), [xx.grad] + [p.grad for p in params.parameters()]))
    (y, grads), (y16, grads16), (y64, grads64) = outs
    assert y.dtype == torch.float16 and rel_err(y, y64) <= max(F16_RTOL, 4 * rel_err(y16, y64))
    for a, a16, a64 in zip(grads, grads16, grads64):
        assert a.dtype == torch.float16 and rel_err(a, a64) <= max(F16_RTOL, 4 * rel_err(a16, a64))
