"""backend="reference" runs the IR with the registry's torch ops: bit for bit torch eager, forward and grads."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import fusednn
from tests.models import LeNet, Mixed, lenet_ordered, lenet_sequential

MODELS = [(LeNet, (4, 1, 32, 32)), (lenet_sequential, (3, 1, 32, 32)), (lenet_ordered, (1, 1, 32, 32)),
          (Mixed, (2, 3, 16, 16))]


def _run(model, x, seed):
    torch.manual_seed(seed)  # dropout draws from torch's RNG in both runs
    out = model(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    out.backward(grad)
    return out


@pytest.mark.parametrize("make, shape", MODELS)
@pytest.mark.parametrize("train", [True, False])
def test_reference_backend_matches_eager_bit_for_bit(make, shape, train, fresh_seed):
    eager = make().train(train)
    ours = copy.deepcopy(eager)
    compiled = fusednn.compile(ours, backend="reference")
    x = torch.randn(shape)
    ref = _run(eager, x, fresh_seed)
    out = _run(compiled, x, fresh_seed)
    assert torch.equal(out, ref)
    for (name, p), q in zip(eager.named_parameters(), ours.parameters()):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(eager.named_buffers(), ours.buffers()):
        assert torch.equal(b, c), name  # running statistics and num_batches_tracked move identically


def test_reference_function_with_loss_matches_eager():
    net = LeNet()
    twin = copy.deepcopy(net)
    x, y = torch.randn(5, 1, 32, 32), torch.randint(0, 10, (5,))
    loss = fusednn.compile(lambda a, b: F.cross_entropy(net(a), b), backend="reference")(x, y)
    ref = F.cross_entropy(twin(x), y)
    loss.backward()
    ref.backward()
    assert torch.equal(loss, ref)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(net.parameters(), twin.parameters()))


def test_reference_backend_passes_float64_gradcheck():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(), torch.nn.AvgPool2d(2),
                              torch.nn.Flatten(), torch.nn.Linear(12, 2)).double()
    c = fusednn.compile(net, backend="reference")
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: c(inp), (x,))
