"""Standalone pools: generated forward (compiler/templates/pool.py) and hand-written dx (kernels/pool.py)
against torch in float64, over torch's own option set."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fusednn.compiler.source import header, load
from fusednn.compiler.templates.pool import AdaptivePoolSpec, PoolSpec, generate
from fusednn.kernels.pool import pool_out_size
from fusednn.kernels.pool import adaptive_pool2d_backward, lp_pool2d_backward, pool2d_backward
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err
from tests.opcheck import check_module

TOL = 1e-5


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pool_args(kernel, stride, padding, dilation):
    """Explicit (kernel, stride, padding, dilation) pairs; stride None means the kernel, as in torch."""
    k = _pair(kernel)
    return k, (k if stride is None else _pair(stride)), _pair(padding), _pair(dilation)


def run_pool(x, kind, kernel, stride=None, padding=0, dilation=1, ceil_mode=False,
             count_include_pad=True, divisor_override=None):
    """Generate, load and launch the forward pool for x; returns (y, idx, spec kwargs for backward)."""
    k, s, p, d = _pool_args(kernel, stride, padding, dilation)
    N, C, H, W = x.shape
    OH = pool_out_size(H, k[0], s[0], p[0], d[0], ceil_mode)
    OW = pool_out_size(W, k[1], s[1], p[1], d[1], ceil_mode)
    name = f"fnn_{kind}_pool2d_test"
    spec = PoolSpec(name, header(name, [f"%1 {kind}_pool2d"], ["pool"], "kernels/pool.py"),
                    (f"%1 {kind}_pool2d",), kind, N, C, H, W, OH, OW, k, s, p, d, ceil_mode,
                    count_include_pad, divisor_override)
    mod = load(generate(spec), name)
    y = torch.empty(N, C, OH, OW)
    idx = torch.empty(N, C, OH, OW, dtype=torch.int32) if kind == "max" else None
    mod.launch(x, y, idx)
    meta = dict(kind=kind, x_shape=tuple(x.shape), kernel=k, stride=s, padding=p, dilation=d,
                ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                divisor_override=divisor_override)
    return y, idx, meta


def run_adaptive(x, kind, out_hw):
    """Generate, load and launch the forward adaptive pool for x; returns (y, idx)."""
    N, C, H, W = x.shape
    OH, OW = _pair(out_hw)
    name = f"fnn_adaptive_{kind}_pool2d_test"
    spec = AdaptivePoolSpec(name, header(name, [f"%1 adaptive_{kind}_pool2d"], ["pool"], "kernels/pool.py"),
                            (f"%1 adaptive_{kind}_pool2d",), kind, N, C, H, W, OH, OW)
    mod = load(generate(spec), name)
    y = torch.empty(N, C, OH, OW)
    idx = torch.empty(N, C, OH, OW, dtype=torch.int32) if kind == "max" else None
    mod.launch(x, y, idx)
    return y, idx


def torch_pool(x64, kind, kernel, stride=None, padding=0, dilation=1, ceil_mode=False,
               count_include_pad=True, divisor_override=None):
    """torch's pool on a float64 leaf: (y, indices or None)."""
    if kind == "max":
        return F.max_pool2d(x64, kernel, stride, padding, dilation, ceil_mode=ceil_mode, return_indices=True)
    assert dilation == 1
    return F.avg_pool2d(x64, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override), None


def check_pool(x, kind, **opts):
    """Forward, argmax and dx of our pool against torch's in float64, with a random upstream gradient."""
    y, idx, meta = run_pool(x, kind, **opts)
    x64 = x.double().requires_grad_()
    ref, ref_idx = torch_pool(x64, kind, **opts)
    assert y.shape == ref.shape
    if kind == "max":
        # a max selects an input element: y and its index are exact
        assert torch.equal(y, ref.float())
        assert torch.equal(idx.long(), ref_idx)
    else:
        assert rel_err(y, ref) <= TOL
    dy = torch.randn_like(y)
    ref.backward(dy.double())
    dx = pool2d_backward(dy, idx, **meta)
    assert dx.shape == x.shape
    assert rel_err(dx, x64.grad) <= TOL


def check_adaptive(x, kind, out_hw):
    """Forward, argmax and dx of our adaptive pool against torch's in float64."""
    y, idx = run_adaptive(x, kind, out_hw)
    x64 = x.double().requires_grad_()
    if kind == "max":
        ref, ref_idx = F.adaptive_max_pool2d(x64, out_hw, return_indices=True)
        assert torch.equal(y, ref.float())
        assert torch.equal(idx.long(), ref_idx)
    else:
        ref = F.adaptive_avg_pool2d(x64, out_hw)
        assert rel_err(y, ref) <= TOL
    dy = torch.randn_like(y)
    ref.backward(dy.double())
    dx = adaptive_pool2d_backward(dy, idx, kind=kind, x_shape=tuple(x.shape))
    assert rel_err(dx, x64.grad) <= TOL


# (x shape, options): odd sizes, batch 1, overlapping windows, and shapes where ceil_mode adds a window
# (H=10, k=3, s=2, p=1: floor 5, ceil 6, and the sixth window hangs past the padded edge).
MAX_CASES = [
    ((2, 3, 9, 11), dict(kernel=3, stride=2)),
    ((2, 3, 9, 11), dict(kernel=3)),  # stride None = kernel
    ((1, 2, 10, 7), dict(kernel=3, stride=2, padding=1)),
    ((1, 2, 10, 7), dict(kernel=3, stride=2, padding=1, ceil_mode=True)),
    ((2, 2, 11, 9), dict(kernel=3, stride=2, dilation=2)),
    ((2, 2, 11, 10), dict(kernel=3, stride=1, padding=1, dilation=2, ceil_mode=True)),
    ((1, 3, 8, 9), dict(kernel=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), ceil_mode=True)),
    ((3, 1, 5, 5), dict(kernel=2, stride=2, padding=1, ceil_mode=True)),  # ceil_mode drops the last window
    ((1, 1, 1, 1), dict(kernel=1)),
]

AVG_CASES = [
    ((2, 3, 9, 11), dict(kernel=3, stride=2)),
    ((2, 3, 9, 11), dict(kernel=3)),
    ((1, 2, 10, 7), dict(kernel=3, stride=2, padding=1, count_include_pad=True)),
    ((1, 2, 10, 7), dict(kernel=3, stride=2, padding=1, count_include_pad=False)),
    ((1, 2, 10, 7), dict(kernel=3, stride=2, padding=1, ceil_mode=True, count_include_pad=True)),
    ((1, 2, 10, 7), dict(kernel=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
    ((2, 2, 10, 9), dict(kernel=3, stride=2, padding=1, ceil_mode=True, divisor_override=5)),
    ((1, 3, 8, 9), dict(kernel=(3, 2), stride=(2, 1), padding=(1, 1), ceil_mode=True, count_include_pad=False)),
    ((1, 3, 8, 9), dict(kernel=(2, 4), stride=(1, 3), padding=(1, 2), ceil_mode=True, count_include_pad=True)),
    ((3, 1, 5, 5), dict(kernel=2, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
]


def _ids(cases):
    return ["x".join(map(str, s)) + "-" + ",".join(f"{k}={v}" for k, v in o.items()) for s, o in cases]


@pytest.mark.parametrize("shape,opts", MAX_CASES, ids=_ids(MAX_CASES))
def test_max_pool_forward_argmax_and_grad_match_torch(shape, opts):
    check_pool(torch.randn(shape), "max", **opts)


@pytest.mark.parametrize("shape,opts", AVG_CASES, ids=_ids(AVG_CASES))
def test_avg_pool_forward_and_grad_match_torch(shape, opts):
    check_pool(torch.randn(shape), "avg", **opts)


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("shape,out_hw", [
    ((2, 3, 7, 7), (3, 3)),   # windows of 3 that overlap by one
    ((1, 2, 5, 5), (5, 5)),   # identity
    ((2, 2, 6, 6), (2, 4)),   # divides along H, not along W
    ((1, 3, 3, 5), (5, 2)),   # output taller than the input: windows repeat rows
    ((1, 1, 9, 10), (1, 1)),  # global pool
])
def test_adaptive_pool_forward_argmax_and_grad_match_torch(kind, shape, out_hw):
    check_adaptive(torch.randn(shape), kind, out_hw)


@pytest.mark.parametrize("adaptive", [False, True])
def test_max_pool_nan_propagates_like_torch(adaptive):
    x = torch.randn(1, 2, 7, 8)
    x[0, 0, 3, 3] = float("nan")  # in four overlapping 3x3/stride-2 windows
    x[0, 1, 0, 0] = float("nan")  # in a padded corner window
    if adaptive:
        y, idx = run_adaptive(x, "max", (3, 3))
        ref, ref_idx = F.adaptive_max_pool2d(x.double(), (3, 3), return_indices=True)
    else:
        y, idx, meta = run_pool(x, "max", kernel=3, stride=2, padding=1)
        ref, ref_idx = F.max_pool2d(x.double(), 3, 2, 1, return_indices=True)
    assert torch.isnan(ref).any()
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    assert torch.equal(y.nan_to_num(), ref.float().nan_to_num())
    assert torch.equal(idx.long(), ref_idx)
    # the gradient of a NaN window goes to the NaN, as in torch
    x64 = x.double().requires_grad_()
    ref = F.adaptive_max_pool2d(x64, (3, 3)) if adaptive else F.max_pool2d(x64, 3, 2, 1)
    dy = torch.randn_like(y)
    ref.backward(dy.double())
    dx = (adaptive_pool2d_backward(dy, idx, kind="max", x_shape=tuple(x.shape)) if adaptive
          else pool2d_backward(dy, idx, **meta))
    assert rel_err(dx, x64.grad) <= TOL


@pytest.mark.parametrize("value", [0.5, float("-inf")])
def test_max_pool_ties_route_gradient_like_torch(value):
    # every window is one tie: torch keeps the first in-bounds element in scan order, padding never wins
    x = torch.full((2, 2, 7, 6), value)
    x[1, 1, 2:5, 2:5] = value + 1.0 if value != float("-inf") else 0.0  # a tied plateau
    y, idx, meta = run_pool(x, "max", kernel=3, stride=2, padding=1, ceil_mode=True)
    x64 = x.double().requires_grad_()
    ref, ref_idx = F.max_pool2d(x64, 3, 2, 1, ceil_mode=True, return_indices=True)
    assert torch.equal(y, ref.float())
    assert torch.equal(idx.long(), ref_idx)
    dy = torch.randn_like(y)
    ref.backward(dy.double())
    assert rel_err(pool2d_backward(dy, idx, **meta), x64.grad) <= TOL
    ya, idxa = run_adaptive(x, "max", (3, 4))
    ra, ria = F.adaptive_max_pool2d(x.double(), (3, 4), return_indices=True)
    assert torch.equal(ya, ra.float()) and torch.equal(idxa.long(), ria)


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_pool_backward_is_deterministic(kind):
    x = torch.randn(2, 3, 9, 10)
    y, idx, meta = run_pool(x, kind, kernel=3, stride=1, padding=1)  # every input in nine windows
    dy = torch.randn_like(y)
    assert torch.equal(pool2d_backward(dy, idx, **meta), pool2d_backward(dy, idx, **meta))
    ya, idxa = run_adaptive(x, kind, (4, 6))
    dya = torch.randn_like(ya)
    back = [adaptive_pool2d_backward(dya, idxa, kind=kind, x_shape=tuple(x.shape)) for _ in range(2)]
    assert torch.equal(back[0], back[1])


def test_pool_forward_and_backward_are_one_launch_each():
    x = torch.randn(2, 3, 9, 10)
    with recording() as launches:
        y, idx, meta = run_pool(x, "max", kernel=3, stride=2, padding=1)
        pool2d_backward(torch.randn_like(y), idx, **meta)
    assert [kernel_name(launch.kernel) for launch in launches] == ["fnn_max_pool2d_test", "_pool_bwd_dx_kernel"]


def test_generated_pool_source_has_header_and_label():
    name = "fnn_max_pool2d_7"
    spec = PoolSpec(name, header(name, ["%7 max_pool2d"], ["features.2"], "kernels/pool.py"),
                    ("%7 max_pool2d",), "max", 1, 1, 5, 5, 2, 2, (3, 3), (2, 2), (0, 0), (1, 1),
                    False, True, None)
    text = generate(spec)
    assert text.startswith("# fusednn generated kernel fnn_max_pool2d_7\n# implements: %7 max_pool2d")
    assert "    # %7 max_pool2d\n" in text and f"def {name}(" in text
    compile(text, name, "exec")


def test_pool_out_size_matches_torch():
    x = torch.empty(1, 1, 11, 11)
    for size, k, s, d, ceil in itertools.product([1, 2, 5, 10, 11], [1, 2, 3, 4], [1, 2, 3], [1, 2], [False, True]):
        for p in range(k // 2 + 1):
            if size + 2 * p < d * (k - 1) + 1:
                continue  # torch rejects a window larger than the padded input
            ref = F.max_pool2d(x[..., :size, :size], k, s, p, d, ceil_mode=ceil).shape[-1]
            assert pool_out_size(size, k, s, p, d, ceil) == ref, (size, k, s, p, d, ceil)


def test_pool_backward_rejects_mismatched_gradient():
    x = torch.randn(1, 2, 6, 6)
    y, idx, meta = run_pool(x, "max", kernel=2)
    with pytest.raises(ValueError, match="dy has shape"):
        pool2d_backward(torch.randn(1, 2, 4, 3), idx, **meta)
    with pytest.raises(ValueError, match="int32 \\(or int64\\) idx"):
        pool2d_backward(torch.randn_like(y), None, **meta)


def _window_reads_input(size, k, s, p, d, ceil_mode):
    """Whether every pooling window along one dimension holds at least one input position."""
    out = pool_out_size(size, k, s, p, d, ceil_mode)
    return all(any(0 <= o * s - p + i * d < size for i in range(k)) for o in range(out))


def test_max_pool_window_wholly_in_padding_gets_no_gradient():
    # H=1, kernel 2, dilation 2, padding 1: the one window reads rows -1 and 1, both padding. torch gives
    # -inf with index 1 (past the plane; its backward writes there); ours gives -inf with index -1, and dx 0.
    x = torch.randn(1, 2, 1, 3)
    y, idx, meta = run_pool(x, "max", kernel=(2, 1), padding=(1, 0), dilation=(2, 1), stride=1)
    ref = F.max_pool2d(x.double(), (2, 1), 1, (1, 0), (2, 1))
    assert torch.equal(y, ref.float()) and bool((y == float("-inf")).all())
    assert bool((idx == -1).all())
    assert torch.equal(pool2d_backward(torch.randn_like(y), idx, **meta), torch.zeros_like(x))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_pool_configs_match_torch(data):
    kind = data.draw(st.sampled_from(["max", "avg"]), label="kind")
    k = (data.draw(st.integers(1, 4), label="kh"), data.draw(st.integers(1, 4), label="kw"))
    s = (data.draw(st.integers(1, 3), label="sh"), data.draw(st.integers(1, 3), label="sw"))
    p = (data.draw(st.integers(0, k[0] // 2), label="ph"), data.draw(st.integers(0, k[1] // 2), label="pw"))
    d = (1, 1) if kind == "avg" else (data.draw(st.integers(1, 2), label="dh"), data.draw(st.integers(1, 2), label="dw"))
    H = data.draw(st.integers(max(1, d[0] * (k[0] - 1) + 1 - 2 * p[0]), 9), label="H")
    W = data.draw(st.integers(max(1, d[1] * (k[1] - 1) + 1 - 2 * p[1]), 9), label="W")
    opts = dict(kernel=k, stride=s, padding=p, ceil_mode=data.draw(st.booleans(), label="ceil_mode"))
    # torch's index for a dilated window that lies wholly in padding points outside the window (see
    # test_max_pool_window_wholly_in_padding_gets_no_gradient); every other window is compared
    assume(all(_window_reads_input(n, k[a], s[a], p[a], d[a], opts["ceil_mode"]) for a, n in enumerate((H, W))))
    if kind == "max":
        opts["dilation"] = d
    else:
        opts["count_include_pad"] = data.draw(st.booleans(), label="count_include_pad")
        opts["divisor_override"] = data.draw(st.sampled_from([None, 1, 3]), label="divisor_override")
    check_pool(torch.randn(data.draw(st.integers(1, 2), label="N"), 2, H, W), kind, **opts)


@pytest.mark.aot
def test_pool_kernels_compile_for_sm90_without_spills():
    from fusednn.tools import aot

    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(f"cannot compile for sm_90 here: {reason}")

    def program():
        x = torch.empty(4, 8, 33, 30)
        for kind, opts in [("max", dict(kernel=3, stride=2, padding=1, dilation=2, ceil_mode=True)),
                           ("avg", dict(kernel=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)),
                           ("avg", dict(kernel=(3, 2), stride=1, padding=1, count_include_pad=True)),
                           ("avg", dict(kernel=2, divisor_override=3))]:
            y, idx, meta = run_pool(x, kind, **opts)
            pool2d_backward(y, idx, **meta)
        for kind in ("max", "avg"):
            y, idx = run_adaptive(x, kind, (5, 7))
            adaptive_pool2d_backward(y, idx, kind=kind, x_shape=tuple(x.shape))
        # return_indices=True: the max pool's argmax written and read as int64
        y, idx, meta = run_pool(x, "max", kernel=3, stride=2, padding=1)
        pool2d_backward(y, idx.long(), **meta)
        # lp pool, p = 1.5 (exp2/log2 powers) and p = 2: forward, and its backward's two own kernels
        for p in (1.5, 2.0):
            name = f"fnn_lp_pool2d_aot{int(p * 10)}"
            spec = PoolSpec(name, header(name, ["%1 lp_pool2d"], ["pool"], "kernels/pool.py"), ("%1 lp_pool2d",),
                            "lp", 4, 8, 33, 30, 16, 15, (3, 2), (2, 2), (0, 0), (1, 1), True, True, None, p)
            y = torch.empty(4, 8, 16, 15)
            load(generate(spec), name).launch(x, y, None)
            lp_pool2d_backward(y, x, y, norm_type=p, kernel=(3, 2), stride=(2, 2), ceil_mode=True)

    compiled = aot.compile_launches(aot.collect(program))
    assert len(compiled) > 12  # each distinct (kernel, constexprs, argument types) compiles once
    assert {"fnn_lp_pool2d_aot15", "fnn_lp_pool2d_aot20", "_lp_pool_bwd_scale_kernel",
            "_lp_pool_bwd_dx_kernel"} <= {c.name for c in compiled}
    assert not [c.name for c in compiled if c.resources.spills]


# -- through fusednn.compile: return_indices=True, adaptive max pools after a fused conv ------------------
class ConvPoolIndices(torch.nn.Module):
    """conv + relu, then a max pool that also returns its indices (the pool then stays out of the conv)."""

    def __init__(self, pool):
        super().__init__()
        self.conv, self.pool = torch.nn.Conv2d(2, 3, 3), pool

    def forward(self, x):
        y, i = self.pool(F.relu(self.conv(x)))
        return y * 2.0, i


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("pool", [torch.nn.MaxPool2d(2, return_indices=True),
                                  torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True, return_indices=True),
                                  torch.nn.AdaptiveMaxPool2d((2, 3), return_indices=True)],
                         ids=["2x2", "3s2p1-ceil", "adaptive"])
def test_max_pool_return_indices_gives_torch_int64_indices_and_grads(pool, fuse):
    x = torch.randn(2, 2, 9, 10, dtype=torch.float64, requires_grad=True)
    c = check_module(ConvPoolIndices(pool).double(), [x], fuse=fuse)
    ops = [n.op for n in c.fused_graph.nodes]
    assert ops[-2].endswith("max_pool2d_indices") and ops[0] == ("conv_relu_pool" if fuse else "conv2d")


def test_max_pool_return_indices_of_an_unbatched_input():
    check_module(torch.nn.MaxPool2d(3, 2, 1, return_indices=True), [torch.randn(3, 7, 7, dtype=torch.float64)])


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_adaptive_max_pool_after_conv_matches_torch(fuse):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveMaxPool2d(2)).double()
    check_module(m, [torch.randn(2, 3, 6, 7, dtype=torch.float64, requires_grad=True)], fuse=fuse)


# (norm_type, kernel, stride, ceil_mode, input shape): integer p with negative inputs, p = 1.5 (NaN for
# negative inputs, as torch), overlapping and ceil_mode windows, an unbatched input
LP_CASES = [(2.0, 2, None, False, (2, 3, 7, 8)), (1.0, (2, 3), 2, True, (1, 2, 7, 8)), (3.0, 3, 2, True, (3, 7, 7)),
            (1.5, 3, 1, False, (2, 2, 6, 5)), (2.0, 1, 1, False, (1, 1, 1, 1))]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("p,k,s,ceil,shape", LP_CASES, ids=[f"p{c[0]}-k{c[1]}-s{c[2]}-{'ceil' if c[3] else 'floor'}"
                                                             for c in LP_CASES])
def test_lp_pool_forward_and_grad_match_torch(p, k, s, ceil, shape, fuse):
    x = torch.randn(shape, dtype=torch.float64)
    x.view(-1)[0] = 0.0  # a zero window sum: y = 0 and no gradient through it, as torch
    check_module(torch.nn.LPPool2d(p, k, s, ceil), [x.requires_grad_()], fuse=fuse)


def test_lp_pool_with_an_integer_power_above_3_is_refused_naming_the_op():
    import fusednn

    with pytest.raises(fusednn.UnsupportedOpError, match=r"lp_pool2d .*\(test_pool.py:\d+\).*norm_type 4.0"):
        fusednn.compile(lambda x: F.lp_pool2d(x, 4, 2))(torch.randn(1, 1, 4, 4))
