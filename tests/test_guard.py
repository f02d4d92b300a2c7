"""The specialisation key and its steady-state guard: whatever a forward reads that changes after compile
reaches the next call (a new trace where the graph bakes it in), on the first call after the change and on
every later one, and nothing that did not change retraces.

Each case compiles a model, calls it twice (the second call takes the steady-state guard), changes one
thing, then calls twice more; every output is compared with the eager module in float64 (rel_err <= 1e-5).
"""
from __future__ import annotations

import collections
import copy
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from tests.helpers import rel_err

TOL = 1e-5


class Scaled(nn.Module):
    """A forward that reads plain attributes: a float, a callable, a dict and a list."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.scale = 2.0
        self.act = torch.relu
        self.cfg = {"k": 1.5}
        self.sizes = [0.5]
        self._offset = 0.25

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x)) * self.scale * self.cfg["k"] * self.sizes[0] + self._offset


def _set(name: str, value) -> Callable[[nn.Module], None]:
    return lambda m: setattr(m, name, value)


def _bias_none(m: nn.Module) -> None:
    m.fc.bias = None


def _new_child(m: nn.Module) -> None:
    m.fc = nn.Linear(4, 3)


def _stride(m: nn.Module) -> None:
    m.conv.stride = (2, 2)


def _eval_child(m: nn.Module) -> None:
    m.bn.eval()


def _weight_shape(m: nn.Module) -> None:
    m.fc = nn.Linear(4, 5)


def _no_grad_weight(m: nn.Module) -> None:
    m.fc.weight.requires_grad_(False)


def _forward_hook(m: nn.Module) -> None:
    m.fc.register_forward_hook(lambda mod, inp, out: out * 3.0)


class Nested(nn.Module):
    """Attributes whose changes leave a dict's version tag as it was: a list inside a tuple inside a dict,
    an OrderedDict reordered in place."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.cfg = {"scale": (1.0, [2.0])}
        self.ops = collections.OrderedDict(a=2.0, b=3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x) * self.cfg["scale"][1][0]
        for v in self.ops.values():
            y = y * v + 1.0
        return y


def _replace_dict(m: nn.Module) -> None:
    m.__dict__ = {**m.__dict__, "scale": 5.0}


CASES = {  # name: (model factory, change, retraces)
    "list in a tuple in a dict, in place": (Nested, lambda m: m.cfg["scale"][1].__setitem__(0, 5.0), True),
    "OrderedDict reordered in place": (Nested, lambda m: m.ops.move_to_end("a"), True),
    "attribute dict replaced": (Scaled, _replace_dict, True),
    "float attribute": (Scaled, _set("scale", 3.0), True),
    "private attribute": (Scaled, _set("_offset", -1.0), True),
    "callable attribute": (Scaled, _set("act", torch.tanh), True),
    "dict attribute mutated in place": (Scaled, lambda m: m.cfg.update(k=-2.0), True),
    "list attribute mutated in place": (Scaled, lambda m: m.sizes.__setitem__(0, 4.0), True),
    "child replaced": (Scaled, _new_child, False),
    "bias set to None": (Scaled, _bias_none, True),
    "parameter shape": (Scaled, _weight_shape, True),
    "requires_grad": (Scaled, _no_grad_weight, True),
    "forward hook": (Scaled, _forward_hook, True),
    "same value assigned": (Scaled, _set("scale", 2.0), False),
    "parameter data replaced": (Scaled, lambda m: setattr(m.fc.weight, "data", torch.randn(3, 4)), False),
    "parameter data made strided": (Scaled, lambda m: setattr(m.fc.weight, "data", torch.randn(4, 3).t()), True),
    "conv stride": (lambda: _ConvBN(), _stride, True),
    "submodule mode": (lambda: _ConvBN(), _eval_child, True),
}


class _ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn(self.conv(x)))


@pytest.mark.parametrize("case", list(CASES))
def test_a_change_after_compile_reaches_every_later_call(case):
    make, change, retraces = CASES[case]
    torch.manual_seed(0)
    m = make()
    c = fusednn.compile(m)
    x = torch.randn(3, 2, 6, 6) if isinstance(m, _ConvBN) else torch.randn(5, 4)
    for _ in range(2):
        assert rel_err(c(x), copy.deepcopy(m).double()(x.double())) <= TOL
    traced = c.trace_count
    change(m)
    for _ in range(2):
        ref = copy.deepcopy(m).double()
        assert rel_err(c(x), ref(x.double())) <= TOL, case
    assert c.trace_count == traced + (1 if retraces else 0)


def test_steady_state_calls_take_the_guard_and_follow_the_batch():
    torch.manual_seed(0)
    m = Scaled()
    c = fusednn.compile(m)
    for b in (8, 8, 3, 8, 5):
        x = torch.randn(b, 4)
        assert rel_err(c(x), copy.deepcopy(m).double()(x.double())) <= TOL
    assert c.trace_count == 1 and c._fnn_guard is not None
    # torch's C++ tensor check (TensorGuards) does the per-tensor work where this torch has it
    assert c._fnn_guard.native is not None


def test_a_second_argument_that_stops_following_the_batch_is_a_new_key():
    """batch positions are part of the key: y [b] follows x [b, 4]; y of another length does not."""
    torch.manual_seed(0)
    fc = nn.Linear(4, 1)
    c = fusednn.compile(lambda x, y: F.mse_loss(fc(x).squeeze(1), y))
    x = torch.randn(6, 4)
    for _ in range(2):
        c(x, torch.randn(6))
    with pytest.raises(Exception):
        c(x, torch.randn(5))  # torch refuses the broadcast; fusednn must not reuse the [6] specialisation
    x4, y4 = torch.randn(4, 4), torch.randn(4)
    got = c(x4, y4)  # a new batch on both: the guard's batch path
    ref = copy.deepcopy(fc).double()
    assert rel_err(got, F.mse_loss(ref(x4.double()).squeeze(1), y4.double())) <= TOL


def test_an_argument_whose_fixed_dim_0_equals_a_new_batch_takes_the_full_key():
    """The key's batch positions are the arguments whose dim 0 equals the first one's: w [6, 4] is fixed
    beside x [8, 4], but beside x [6, 4] it is a batch position too, which only the full key sees."""
    torch.manual_seed(0)
    c = fusednn.compile(lambda x, w: torch.tanh(F.linear(x, w)))
    w = torch.randn(6, 4)
    for b in (8, 8, 6, 6, 5):
        x = torch.randn(b, 4)
        assert rel_err(c(x, w), torch.tanh(F.linear(x.double(), w.double()))) <= TOL, b
        assert c._fnn_last_key[1:] == (((0, 1) if b == 6 else (0,)), b), b


def test_a_parameter_the_graph_does_not_read_does_not_make_calls_record_autograd():
    """Only the graph's inputs decide whether autograd records a call: a frozen eval conv + batch norm next
    to an unused layer that requires grad runs the inference graph (batch norm folded into the conv) on
    every call, the guard's included."""
    torch.manual_seed(0)
    m = _ConvBN().eval()
    m.unused = nn.Linear(3, 3)
    for p in [*m.conv.parameters(), *m.bn.parameters()]:
        p.requires_grad_(False)
    c = fusednn.compile(m)
    x = torch.randn(2, 2, 6, 6)
    for call in range(3):
        y = c(x)
        assert not y.requires_grad and c.stats()["inference"], call
        assert rel_err(y, copy.deepcopy(m).double()(x.double())) <= TOL, call


class BranchesOnGradMode(nn.Module):
    """A forward that computes something else when autograd records (as torch's own fast paths do)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return torch.tanh(y) if torch.is_grad_enabled() else torch.sigmoid(y) * 2.0


@pytest.mark.parametrize("first", [True, False], ids=["grad first", "no_grad first"])
def test_a_branch_on_the_grad_mode_is_followed_in_each_mode(first):
    torch.manual_seed(0)
    m = BranchesOnGradMode()
    c = fusednn.compile(m)
    ref = copy.deepcopy(m).double()
    for grad in (first, first, not first, not first, first, not first):
        x = torch.randn(5, 4)
        with torch.set_grad_enabled(grad):
            y, want = c(x), ref(x.double())
        assert rel_err(y, want) <= TOL, grad
        assert y.requires_grad == grad
    assert c.trace_count == 2


def test_a_forward_that_ignores_the_grad_mode_loads_the_same_kernels_in_each_mode():
    """The grad mode is part of the key, but a second specialisation of the same graph generates the same
    kernel files: it loads the modules (and Triton's compiled kernels) of the first."""
    torch.manual_seed(0)
    m = Scaled()
    c = fusednn.compile(m)
    x = torch.randn(5, 4)
    c(x)
    first = {s.kernel.name: s.kernel.module for s in c._last().executable.steps if s.kernel is not None}
    with torch.no_grad():
        assert rel_err(c(x), copy.deepcopy(m).double()(x.double())) <= TOL
    second = {s.kernel.name: s.kernel.module for s in c._last().executable.steps if s.kernel is not None}
    assert c.trace_count == 2 and first and first.keys() == second.keys()
    assert all(first[k] is second[k] for k in first)
