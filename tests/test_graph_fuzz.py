"""Differential fuzzing of graph structure: Hypothesis writes small random programs of elementwise ops,
linear and conv layers, compiles each with fusion on and off, and compares every output and every
gradient (inputs, broadcast operands, parameters) of two calls on different values (the second replays the
launches the first recorded) with the same program run by torch in float64.

What the programs exercise, because silent wrong results hid there:
- values with several users (operands are drawn from all earlier values, so most are read more than once,
  and a graph output may also feed later ops): their gradients are summed;
- broadcasting in both operand orders: [C,1,1], [1,C,1,1], [W], [N,1,1,1], [1,1,H,1] and 0-dim tensors,
  and Python numbers, on either side of add/sub/mul;
- linear and conv layers feeding gates (tanh(a + b) * sigmoid(c) shapes), so elementwise groups meet
  epilogues; the activations of today's CNNs (GELU, SiLU, Mish, Hardswish, ReLU6, ELU, Softplus) among them;
- in-place ops through views: `v = h.view(-1); v.add_(c)` must change h, `h.relu_()` must change an
  earlier view of h, `h += b` with a broadcast b.

Cases where torch's own float32 misses float64 by more than 1e-6 are discarded (`well_conditioned`), as in
tests/test_fuzz.py, not compared with a looser tolerance.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fusednn
from tests.helpers import rel_err

TOL = 1e-5
F = nn.functional
ACTS = {"relu": torch.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "leaky_relu": lambda v: F.leaky_relu(v, 0.1),
        "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh"), "silu": F.silu, "mish": F.mish,
        "hardswish": F.hardswish, "relu6": F.relu6, "elu": F.elu, "softplus": F.softplus, "neg": torch.neg}
BINARY = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


class Program(nn.Module):
    """Runs a list of instructions over a growing list of values; values[0] is x, all values have x's shape."""

    def __init__(self, shape: tuple[int, ...], code: list[tuple], n_linear: int, n_conv: int):
        super().__init__()
        n, c, h, w = shape
        self.shape, self.code = shape, code
        self.fc = nn.ModuleList(nn.Linear(w, w) for _ in range(n_linear))
        self.conv = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for _ in range(n_conv))

    def forward(self, x, b0, b1, b2):
        vals, small = [x], [b0, b1, b2]
        for ins in self.code:
            kind = ins[0]
            if kind == "act":
                vals.append(ACTS[ins[1]](vals[ins[2]]))
            elif kind == "bin":
                a, b = vals[ins[2]], vals[ins[3]]
                vals.append(BINARY[ins[1]](a, b))
            elif kind == "bcast":  # a broadcast tensor operand or a Python number, on either side
                _, op, i, other, first = ins
                b = small[other] if isinstance(other, int) else other
                vals.append(BINARY[op](b, vals[i]) if first else BINARY[op](vals[i], b))
            elif kind == "linear":
                vals.append(self.fc[ins[1]](vals[ins[2]]))
            elif kind == "conv":
                vals.append(self.conv[ins[1]](vals[ins[2]]))
            elif kind == "inplace":
                _, how, i, other = ins
                h = vals[i] * 1.0  # a value of our own: in-place ops never touch inputs or saved tensors
                v = h.view(-1)
                if how == "add_view":
                    v.add_(0.5)  # changes h
                elif how == "mul_view":
                    v.mul_(-1.5)
                elif how == "relu_base":
                    h.relu_()  # changes v, made before
                else:  # "iadd_bcast"
                    h += small[other]
                vals += [h, v.view(self.shape)]
        return vals[-1], vals[len(vals) // 2]


SMALL_SHAPES = ("c11", "1c11", "w", "n111", "11h1", "scalar0d")


def _small(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    n, c, h, w = shape
    return {"c11": (c, 1, 1), "1c11": (1, c, 1, 1), "w": (w,), "n111": (n, 1, 1, 1), "11h1": (1, 1, h, 1),
            "scalar0d": ()}[kind]


@st.composite
def programs(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    smalls = tuple(draw(st.sampled_from(SMALL_SHAPES)) for _ in range(3))
    n_linear, n_conv = draw(st.integers(0, 2)), draw(st.integers(0, 1))
    code: list[tuple] = []
    n_vals = 1
    pick = lambda: draw(st.integers(max(0, n_vals - 4), n_vals - 1))  # noqa: E731  (mostly recent values)
    kinds = ["act", "bin", "bcast", "bcast", "inplace"] + ["linear"] * bool(n_linear) + ["conv"] * bool(n_conv)
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(st.sampled_from(kinds))
        if kind == "act":
            code.append(("act", draw(st.sampled_from(sorted(ACTS))), pick()))
        elif kind == "bin":
            code.append(("bin", draw(st.sampled_from(sorted(BINARY))), pick(), draw(st.integers(0, n_vals - 1))))
        elif kind == "bcast":
            other = draw(st.one_of(st.integers(0, 2), st.sampled_from([0.5, -2.0, 3.0])))
            code.append(("bcast", draw(st.sampled_from(sorted(BINARY))), pick(), other, draw(st.booleans())))
        elif kind == "linear":
            code.append(("linear", draw(st.integers(0, n_linear - 1)), pick()))
        elif kind == "conv":
            code.append(("conv", 0, pick()))
        else:
            how = draw(st.sampled_from(["add_view", "mul_view", "relu_base", "iadd_bcast"]))
            code.append(("inplace", how, pick(), draw(st.integers(0, 2))))
            n_vals += 1  # the in-place op adds two values
        n_vals += 1
    return shape, smalls, code, n_linear, n_conv


def _inputs(shape, smalls):
    x = torch.randn(shape)
    return [x] + [torch.randn(_small(k, shape)) for k in smalls]


def _run(model: nn.Module, calls: list[tuple[list, list]], compiled: bool, fuse: bool = True) -> list[list]:
    """Per call (its inputs and upstream gradients): the outputs, input gradients and parameter gradients
    (the model is copied once, inputs per call; gradients reset between calls). A compiled model's first
    call records its launches, later calls replay them (fusednn/prebuilt.py)."""
    m = copy.deepcopy(model)
    run = fusednn.compile(m, fuse=fuse) if compiled else m
    results = []
    for inputs, grads in calls:
        m.zero_grad(set_to_none=True)
        ins = [t.clone().requires_grad_() for t in inputs]
        outs = run(*ins)
        torch.autograd.backward(outs, [g.to(outs[0].dtype) for g in grads])
        results.append(list(outs) + [t.grad for t in ins] + [p.grad for p in m.parameters()])
    return results


def _compare(ours: list, ref: list) -> list[str]:
    bad = []
    for i, (a, b) in enumerate(zip(ours, ref)):
        if (a is None) != (b is None):
            bad.append(f"#{i}: {a is None} vs torch's {b is None}")
        elif a is not None and (a.shape != b.shape or rel_err(a, b) > TOL):
            bad.append(f"#{i}: shape {list(a.shape)} vs {list(b.shape)}, rel_err {rel_err(a, b):.2e}")
    return bad


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=programs(), seed=st.integers(0, 2**31 - 1))
def test_random_graphs_match_float64_torch_fused_and_unfused(case, seed):
    shape, smalls, code, n_linear, n_conv = case
    torch.manual_seed(seed)
    model = Program(shape, code, n_linear, n_conv)
    calls = []
    for _ in range(2):  # the second call, on other values, replays what the first recorded
        inputs = _inputs(shape, smalls)
        with torch.no_grad():
            outs = model(*inputs)
        calls.append((inputs, [torch.randn(o.shape) for o in outs]))
    ref = _run(model.double(), [([t.double() for t in ins], gs) for ins, gs in calls], compiled=False)
    f32 = _run(model.float(), calls, compiled=False)
    for a32, a64 in zip(f32, ref):  # torch's float32 is exact enough on both calls
        assume(all(a is None or rel_err(a, b) <= TOL / 10 for a, b in zip(a32, a64)))
    for fuse in (True, False):
        for call, (ours, want) in enumerate(zip(_run(model, calls, compiled=True, fuse=fuse), ref)):
            bad = _compare(ours, want)
            assert not bad, f"call {call}, fuse={fuse}, shape {shape}, broadcast operands {smalls}, program {code}: {bad}"
