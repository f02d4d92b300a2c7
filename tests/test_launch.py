"""fusednn.launch's figures: bytes count each memory range a launch touches once, and a buffer a kernel
does not read is not passed (so not counted); exact launch counts of a LeNet training step at the GPU's
launch configs (split-K second passes included), recorded on the CPU without running anything."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

import fusednn
from fusednn import launch
from fusednn.compiler import configs
from fusednn.kernels.activation import mul_backward
from fusednn.kernels.conv_relu_pool import conv_relu_pool_backward
from fusednn.optim import SGD
from tests.models import LeNet


def test_tensor_bytes_counts_each_memory_range_once():
    a = torch.empty(100)  # 400 bytes
    b = torch.empty(10, dtype=torch.float64)  # 80 bytes
    assert launch.tensor_bytes((a,)) == 400
    assert launch.tensor_bytes((a, a, 3, None, 2.0)) == 400  # the same tensor twice
    assert launch.tensor_bytes((a, a[50:])) == 400  # a view next to its base
    assert launch.tensor_bytes((a[:60], a[40:])) == 400  # overlapping views: their union
    assert launch.tensor_bytes((a[:30], a[70:])) == 240  # disjoint views of one storage
    assert launch.tensor_bytes((a, b)) == 480
    assert launch.tensor_bytes((a[:0], b)) == 80


def _nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


CONV_VARIANTS = {  # act, pool, which saved tensors the backward reads besides dy
    "none_none": ("none", "none"),
    "relu_max": ("relu", "max"),
    "tanh_avg": ("tanh", "avg"),
    "none_max": ("none", "max"),
    "sigmoid_none": ("sigmoid", "none"),
}


@pytest.mark.parametrize("variant", list(CONV_VARIANTS))
def test_conv_backward_bytes_are_the_buffers_the_variant_reads_and_writes(variant):
    act, pool = CONV_VARIANTS[variant]
    N, C, H, W, K, R = 2, 3, 8, 8, 4, 3
    OH = H - R + 1
    P = 2 if pool != "none" else 1
    x, w = torch.randn(N, C, H, W), torch.randn(K, C, R, R)
    dy = torch.randn(N, K, OH // P, OH // P)
    y = torch.rand(dy.shape)
    idx = torch.zeros(dy.shape, dtype=torch.uint8)
    a = torch.rand(N, K, OH, OH)
    with launch.recording() as rec:
        dx, dw, db = conv_relu_pool_backward(
            dy, x, w, y, idx, a, stride=1, padding=0, dilation=1, groups=1, act=act, act_param=0.0,
            pool=pool, pool_k=P, out_hw=(OH, OH), needs_dx=True, needs_dw=True, needs_db=True)
    read = [dy] + ([idx] if pool == "max" else [])
    if act != "none":
        read.append(a if pool == "avg" else y)
    by = {launch.kernel_name(r.kernel): r for r in rec}
    assert set(by) == {"_conv_relu_pool_bwd_dx_kernel", "_conv_relu_pool_bwd_dw_kernel"}  # no split-K here
    assert by["_conv_relu_pool_bwd_dx_kernel"].bytes == _nbytes(*read, w, dx)
    assert by["_conv_relu_pool_bwd_dw_kernel"].bytes == _nbytes(*read, x, dw, db)


def test_mul_backward_by_a_scalar_counts_dy_and_dx_only():
    dy = torch.randn(33)
    with launch.recording() as rec:
        mul_backward(dy, 2.5)
    [r] = rec
    assert r.bytes == 2 * _nbytes(dy)


def _lenet_step_launches(batch: int, target: str) -> list[launch.Launch]:
    """Record (not run) one LeNet training step as `benchmarks/` runs it, at `target`'s launch configs."""
    net = LeNet()
    step = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))
    opt = SGD(net.parameters(), lr=0.01, momentum=0.9)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # grads zeroed in place, as the benchmark does
    x, t = torch.randn(batch, 1, 32, 32), torch.randint(0, 10, (batch,))
    with configs.use_target(target), launch.recording(execute=False) as rec:
        opt.zero_grad(set_to_none=False)
        step(x, t).backward()
        opt.step()
    return rec


def _per_kernel(rec: list[launch.Launch]) -> Counter:
    # generated kernels carry their IR node number (fnn_linear_relu_9): count them by stem
    return Counter(re.sub(r"^(fnn_\w+?)_\d+$", r"\1", launch.kernel_name(r.kernel)) for r in rec)


_STEP_BASE = {  # every LeNet training step, at any launch config
    "fnn_conv_relu_pool": 2, "fnn_linear_relu": 2, "fnn_linear": 1, "fnn_cross_entropy": 1,  # forward
    "_cross_entropy_bwd_dx_kernel": 1,  # the mean's denominator is saved by the forward
    "_linear_relu_bwd_dx_kernel": 3, "_linear_relu_bwd_dw_kernel": 3,
    "_conv_relu_pool_bwd_dx_kernel": 1, "_conv_relu_pool_bwd_dw_kernel": 2,  # conv1 needs no dx
    "_sgd_step_kernel": 1,
}


@pytest.mark.parametrize("batch, target, total, split_k", [
    # split-K second passes: conv1's dw and db in one launch (conv2's run in its dx launch)
    (64, "gpu", 18, {"_conv_bwd_sums_kernel": 1}),
    (4096, "gpu", 21, {"_conv_bwd_sums_kernel": 1, "_sum_to_kernel": 3}),  # and fc1-fc3's [dw | db]
    (64, "interp", 17, {}),  # the interpreter's configs never split K
], ids=["gpu_batch64", "gpu_batch4096", "interpreter_batch64"])
def test_lenet_training_step_launch_counts_are_exact(batch, target, total, split_k):
    """fusednn's launches only: torch's own kernels (zero_grad, .grad accumulation, the loss seed) are not
    fusednn launches and are not counted (benchmarks/README.md)."""
    rec = _lenet_step_launches(batch, target)
    assert len(rec) == total
    assert _per_kernel(rec) == Counter(_STEP_BASE) + Counter(split_k)
