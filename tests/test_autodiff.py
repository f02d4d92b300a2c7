"""The backward plan's gradient sums: a value read by several ops gets the sum of their gradients, and no
sum may write into a tensor that is also another value's gradient (add hands dy to both operands)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from tests.helpers import rel_err

TOL = 1e-5


class TwoHeads(nn.Module):
    """fc1's output feeds an add and a sigmoid: add's VJP gives dy to both operands, and the sigmoid's
    gradient is summed into fc1's afterwards. The sum must not land in fc2's gradient too."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x, y):
        b = self.fc2(x)
        a = self.fc1(x)
        c = torch.sigmoid(a)
        s = a + b
        return F.mse_loss(torch.tanh(s) * c, y)


def _grads_vs_float64(model: nn.Module, inputs: list[torch.Tensor], fuse: bool) -> dict[str, float]:
    ref = copy.deepcopy(model).double()
    ref_in = [t.double().requires_grad_(t.is_floating_point()) for t in inputs]
    ref(*ref_in).backward()
    ours = copy.deepcopy(model)
    ins = [t.clone().requires_grad_() for t in inputs]
    fusednn.compile(ours, fuse=fuse)(*ins).backward()
    errs = {f"{n}.grad": rel_err(p.grad, q.grad) for (n, p), q in zip(ours.named_parameters(), ref.parameters())}
    errs.update({f"input {i} grad": rel_err(a.grad, b.grad) for i, (a, b) in enumerate(zip(ins, ref_in))})
    return errs


@pytest.mark.parametrize("fuse", [True, False])
def test_add_operand_gradients_are_not_corrupted_by_later_sums(fuse):
    errs = _grads_vs_float64(TwoHeads(), [torch.randn(5, 4), torch.randn(5, 3)], fuse)
    assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("fuse", [True, False])
def test_a_value_read_twice_by_one_op_gets_both_gradients(fuse):
    def f(x):  # x + x and x * x: one node reads x through both operands
        return F.leaky_relu(x + x, 0.1) * torch.sigmoid(x * x) + torch.tanh(x)

    x = torch.randn(3, 5)
    xx, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    g = torch.randn(3, 5)
    fusednn.compile(f, fuse=fuse)(xx).backward(g)
    f(xr).backward(g.double())
    assert rel_err(xx.grad, xr.grad) <= TOL


def test_output_gradient_from_autograd_is_never_written():
    """A graph output that is also read inside the graph: autograd's gradient tensor for it stays as given."""
    def f(x):
        h = torch.tanh(x)
        return h, h * 3.0

    x = torch.randn(4, 4, requires_grad=True)
    h, y = fusednn.compile(f)(x)
    gh, gy = torch.randn(4, 4), torch.randn(4, 4)
    keep = gh.clone()
    torch.autograd.backward([h, y], [gh, gy])
    assert torch.equal(gh, keep)
    xr = x.detach().double().requires_grad_()
    hr = torch.tanh(xr)
    torch.autograd.backward([hr, hr * 3.0], [keep.double(), gy.double()])
    assert rel_err(x.grad, xr.grad) <= TOL
