"""Fuzzing against torch: Hypothesis builds small random CNNs (conv with random stride/padding/dilation/groups
and bias or not, batch norm in train or eval, relu/leaky_relu/sigmoid/tanh, max/avg pools overlapping or not,
a linear head), compiles each with fusion on and off, and compares the output, the input gradient, every
parameter gradient and the running statistics with torch in float64.

Cases where torch's own float32 misses float64 by more than 1e-6 (`well_conditioned`: e.g. a bias whose
true gradient is 0 because a training batch norm downstream removes it) are discarded, not compared
with a looser tolerance; about 1 drawn case in 10.

Fault injection proves the check has teeth: with a corrupted pool argmax or a flipped activation mask
handed to the hand-written backward launchers, the same check reports a mismatch.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import fusednn
from tests.helpers import rel_err

TOL = 1e-5
ACTS = ("relu", "leaky_relu", "sigmoid", "tanh")


def _act(name: str, slope: float) -> nn.Module:
    return {"relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(slope), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh()}[name]


def _out(size: int, k: int, s: int, p: int, d: int = 1, ceil: bool = False) -> int:
    """torch's conv/pool output size (a ceil-mode window must start inside the input or its left padding)."""
    span = size + 2 * p - d * (k - 1) - 1
    o = (-(-span // s) if ceil else span // s) + 1
    return o - 1 if ceil and (o - 1) * s >= size + p else o


@st.composite
def cnns(draw):
    """(model, input shape): 1-2 blocks of conv [+bn] [+act] [+pool], then an optional linear head."""
    n, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(5, 9)), draw(st.integers(5, 9))
    shape = (n, c, h, w)
    layers: list[nn.Module] = []
    bn_train = draw(st.booleans())
    for _ in range(draw(st.integers(1, 2))):
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if c % g == 0]))
        k = groups * draw(st.integers(1, 2))
        pad, dil, stride = draw(st.integers(0, 1)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        r, s = min(draw(st.integers(1, 3)), h + 2 * pad), min(draw(st.integers(1, 3)), w + 2 * pad)
        if dil * (max(r, s) - 1) + 1 > min(h, w) + 2 * pad:
            dil = 1
        c_in, h, w = c, _out(h, r, stride, pad, dil), _out(w, s, stride, pad, dil)
        # Batch norm in training makes the problem ill-conditioned where torch's own float32 misses float64 by
        # far more than 1e-5, so those cases are not drawn: the preceding conv's bias then has gradient 0 (the
        # batch mean removes it), its weight's gradient is orthogonal to the weight (0 when the weight has one
        # element per output channel; torch float32 measured 8e-4 off), and with 2 values per channel the
        # normalised output is +-1 whatever the input (input gradient 0).
        bn = draw(st.booleans()) and (not bn_train or (n * h * w >= 4 and c_in // groups * r * s >= 2))
        layers.append(nn.Conv2d(c_in, k, (r, s), stride=stride, padding=pad, dilation=dil, groups=groups,
                                bias=draw(st.booleans()) and not (bn and bn_train)))
        c = k
        if bn:
            layers.append(nn.BatchNorm2d(c))
        if draw(st.booleans()):
            layers.append(_act(draw(st.sampled_from(ACTS)), draw(st.floats(0.0, 0.3))))
        if draw(st.booleans()) and min(h, w) >= 2:
            kind = draw(st.sampled_from(["max", "avg"]))
            if draw(st.booleans()):  # non-overlapping: fuses into the conv when nothing sits between
                pk = draw(st.integers(2, min(3, h, w)))
                layers.append(nn.MaxPool2d(pk) if kind == "max" else nn.AvgPool2d(pk))
                h, w = h // pk, w // pk
            else:  # overlapping, padded, maybe ceil mode: a separate pool kernel
                pk = draw(st.integers(2, 3))
                ps, pp, ceil = draw(st.integers(1, pk - 1)), draw(st.integers(0, pk // 2)), draw(st.booleans())
                oh, ow = _out(h, pk, ps, pp, 1, ceil), _out(w, pk, ps, pp, 1, ceil)
                if min(oh, ow) >= 1:
                    layers.append(nn.MaxPool2d(pk, ps, pp, ceil_mode=ceil) if kind == "max"
                                  else nn.AvgPool2d(pk, ps, pp, ceil_mode=ceil, count_include_pad=draw(st.booleans())))
                    h, w = oh, ow
    if draw(st.booleans()):
        hidden = draw(st.integers(1, 6))
        layers += [nn.Flatten(), nn.Linear(c * h * w, hidden)]
        if draw(st.booleans()):
            layers.append(_act(draw(st.sampled_from(ACTS)), draw(st.floats(0.0, 0.3))))
        layers.append(nn.Linear(hidden, draw(st.integers(1, 4))))
    model = nn.Sequential(*layers).train(bn_train)
    return model, shape


def mismatches(model: nn.Module, x: torch.Tensor | list[torch.Tensor], fuse: bool,
               grads: list[torch.Tensor] | None = None) -> list[str]:
    """Compile a copy of `model`, run it and torch (float64) on x (or on each input of a list in turn: the
    first call records its launches, later ones replay them: fusednn/prebuilt.py) with the same upstream
    gradient; return what differs in any call (output, input gradient, each parameter gradient, each
    buffer) beyond rel_err 1e-5. grads: the upstream gradient of each call (default: drawn per call)."""
    ours, ref = copy.deepcopy(model), copy.deepcopy(model).double()
    compiled = fusednn.compile(ours, fuse=fuse)
    bad = []
    for call, x in enumerate(x if isinstance(x, list) else [x]):
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        xx, xr = x.clone().requires_grad_(), x.double().requires_grad_()
        y, yr = compiled(xx), ref(xr)
        if y.shape != yr.shape:
            return [f"output shape {list(y.shape)} != torch's {list(yr.shape)}"]
        g = torch.randn(y.shape) if grads is None else grads[call]
        y.backward(g)
        yr.backward(g.double())
        pairs = [("output", y, yr), ("input grad", xx.grad, xr.grad)]
        pairs += [(f"{n}.grad", p.grad, q.grad) for (n, p), q in zip(ours.named_parameters(), ref.parameters())]
        pairs += [(n, b, q) for (n, b), q in zip(ours.named_buffers(), ref.buffers())]
        for name, a, b in pairs:
            if a is None or b is None or a.shape != b.shape:
                bad.append(f"call {call}, {name}: {None if a is None else list(a.shape)} vs torch's "
                           f"{None if b is None else list(b.shape)}")
            elif rel_err(a, b) > TOL:
                bad.append(f"call {call}, {name}: rel_err {rel_err(a, b):.2e}")
    return bad


def _float64_step(model: nn.Module, x: torch.Tensor, g: torch.Tensor, nudge: float = 0.0) -> list[torch.Tensor]:
    """Output, input gradient and parameter gradients in float64, every input, parameter and the upstream
    gradient first scaled by (1 + nudge * a random sign) each element."""
    gen = torch.Generator().manual_seed(1)
    wiggle = lambda t: t * (1 + nudge * (torch.randint(0, 2, t.shape, generator=gen) * 2 - 1))  # noqa: E731
    f64 = copy.deepcopy(model).double()
    with torch.no_grad():
        for p in f64.parameters():
            p.copy_(wiggle(p))
    xd = wiggle(x.double()).requires_grad_()
    yd = f64(xd)
    yd.backward(wiggle(g.double()))
    return [yd.detach(), xd.grad] + [p.grad for p in f64.parameters()]


def well_conditioned(model: nn.Module, x: torch.Tensor, g: torch.Tensor) -> bool:
    """Whether float32 can meet float64 with 10x margin on this case: the output and every gradient within
    rel_err 1e-6, both for torch's own float32 and when every input, parameter and upstream gradient is
    moved by one float32 rounding (2^-24 relative) in float64. Where the result moves further than that
    (a gradient that is a sum with heavy cancellation: a conv bias before an eval batch norm and a dead
    ReLU), any float32 computation is that far off on some draws, and 1e-5 would measure the problem, not
    fusednn; torch's float32 meeting it on one draw can be luck. g: the upstream gradient the comparison
    uses (the conditioning of a gradient depends on it)."""
    f32, f64 = copy.deepcopy(model), copy.deepcopy(model).double()
    xs, xd = x.clone().requires_grad_(), x.double().requires_grad_()
    y, yd = f32(xs), f64(xd)
    y.backward(g)
    yd.backward(g.double())
    pairs = [(y, yd), (xs.grad, xd.grad)] + [(p.grad, q.grad) for p, q in zip(f32.parameters(), f64.parameters())]
    exact, moved = _float64_step(model, x, g), _float64_step(model, x, g, 2.0 ** -24)
    return all(rel_err(a, b) <= TOL / 10 for a, b in pairs + list(zip(moved, exact)))


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(case=cnns(), seed=st.integers(0, 2**31 - 1))
def test_random_cnns_match_float64_torch_fused_and_unfused(case, seed):
    model, shape = case
    torch.manual_seed(seed)  # weights, statistics, input and upstream gradient follow from the drawn seed
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            m.reset_parameters()
        elif isinstance(m, nn.BatchNorm2d):  # non-trivial statistics and affine parameters
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    xs = [torch.randn(shape), torch.randn(shape)]  # the second call replays what the first recorded
    with torch.no_grad():
        gs = [torch.randn(copy.deepcopy(model)(x).shape) for x in xs]  # the upstream gradients, drawn up front
    assume(all(well_conditioned(model, x, g) for x, g in zip(xs, gs)))
    for fuse in (True, False):
        assert mismatches(model, xs, fuse, gs) == [], (fuse, model)


def test_a_sum_with_heavy_cancellation_is_not_taken_for_well_conditioned():
    # A draw the fuzzer once made: conv0's bias gradient is a sum of 36 terms of total size ~500x the sum's.
    # torch's float32 happened to land within 3e-7 of float64 on it, but one float32 rounding of the inputs
    # moves it by 3e-6: a float32 computation summing in another order may be 1e-5 off, so it is discarded.
    model = nn.Sequential(nn.Conv2d(3, 3, (3, 2), stride=2, padding=1, groups=3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 3, 1, groups=3, bias=False)).train(False)
    torch.manual_seed(11640)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.reset_parameters()
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_()
                m.bias.normal_()
    x = torch.randn(3, 3, 5, 7)
    torch.randn(3, 3, 5, 7)
    g = torch.randn(3, 3, 3, 4)
    f32, f64 = copy.deepcopy(model), copy.deepcopy(model).double()
    f32(x).backward(g)
    f64(x.double()).backward(g.double())
    assert rel_err(f32[0].bias.grad, f64[0].bias.grad) <= TOL / 10  # torch's luck
    assert not well_conditioned(model, x, g)


# -- fault injection ----------------------------------------------------------------------------------------------
def _lenet_block() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 4 * 4, 6), nn.ReLU(), nn.Linear(6, 3))


def _flip_relu_mask(y: torch.Tensor) -> torch.Tensor:
    """A stand-in activation output whose relu mask (y > 0) is the opposite of y's."""
    return torch.where(y > 0, 0.0, 1.0).to(y.dtype)


def _corrupt_conv_idx(orig):
    def wrapped(dy, x, w, y, idx, a, **kw):
        return orig(dy, x, w, y, (idx + 1) % (kw["pool_k"] ** 2), a, **kw)  # the next offset in each window
    return wrapped


def _flip_conv_mask(orig):
    def wrapped(dy, x, w, y, idx, a, **kw):
        return orig(dy, x, w, _flip_relu_mask(y), idx, a, **kw)
    return wrapped


def _flip_linear_mask(orig):
    def wrapped(dy, x, w, y, **kw):
        return orig(dy, x, w, None if y is None else _flip_relu_mask(y), **kw)
    return wrapped


def _corrupt_pool_idx(orig):
    def wrapped(dy, idx, **kw):
        return orig(dy, None if idx is None else idx.flip(-1).contiguous(), **kw)  # argmaxes of other windows
    return wrapped


def _flip_act_mask(orig):
    def wrapped(dy, saved, *, act, act_param=0.0):
        return orig(dy, _flip_relu_mask(saved) if act == "relu" else saved, act=act, act_param=act_param)
    return wrapped


FAULTS = [
    ("fused pool argmax", True, "fusednn.kernels.conv_relu_pool", "conv_relu_pool_backward", _corrupt_conv_idx),
    ("fused conv relu mask", True, "fusednn.kernels.conv_relu_pool", "conv_relu_pool_backward", _flip_conv_mask),
    ("fused linear relu mask", True, "fusednn.kernels.linear_relu", "linear_relu_backward", _flip_linear_mask),
    ("pool argmax", False, "fusednn.kernels.pool", "pool2d_backward", _corrupt_pool_idx),
    ("relu mask", False, "fusednn.kernels.activation", "activation_backward", _flip_act_mask),
]


def test_the_check_passes_the_uncorrupted_block():
    model, x = _lenet_block(), torch.randn(2, 2, 8, 8)
    assert mismatches(model, x, True) == [] and mismatches(model, x, False) == []


@pytest.mark.parametrize("name, fuse, module, launcher, corrupt", FAULTS, ids=[f[0] for f in FAULTS])
def test_the_check_catches_a_broken_backward(monkeypatch, name, fuse, module, launcher, corrupt):
    import importlib

    mod = importlib.import_module(module)
    monkeypatch.setattr(mod, launcher, corrupt(getattr(mod, launcher)))
    bad = mismatches(_lenet_block(), torch.randn(2, 2, 8, 8), fuse)
    assert any("grad" in b for b in bad), bad
    assert not any(b.startswith("output") for b in bad)  # only the backward was broken
