"""conv_relu_pool: the generated forward (compiler/templates/conv.py) and the hand-written backward
(kernels/conv_relu_pool.py) against torch in float64: y, idx, a, dx, dw and db, over torch's conv cases."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusednn  # noqa: F401  (before any kernel is defined: picks the interpreter on CPU-only machines)
from fusednn.compiler import configs
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.conv import ConvSpec, generate
from fusednn.kernels.activation import saves_input
from fusednn.kernels.conv_relu_pool import conv_relu_pool_backward, conv_saves_act
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err

TOL = 1e-5
SLOPE = 0.1
ACTS = {
    "none": lambda z: z,
    "relu": F.relu,
    "leaky_relu": lambda z: F.leaky_relu(z, SLOPE),
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    # act' read from the conv's result z, which the forward saves (saves_input): no max pool
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "mish": F.mish,
    "hardswish": F.hardswish,
    "hardsigmoid": F.hardsigmoid,
    "softsign": F.softsign,
    "tanhshrink": F.tanhshrink,
    "logsigmoid": F.logsigmoid,
}


def make_spec(**kw) -> ConvSpec:
    """A ConvSpec with IR-style labels for the stages present; save_act where backward needs it."""
    act, pool = kw.get("act", "none"), kw.get("pool", "none")
    labels = ("%1 conv2d",) + ((f"%2 {act}",) if act != "none" else ())
    labels += (f"%3 {pool}_pool2d",) if pool != "none" else ()
    kw.setdefault("save_act", conv_saves_act(act, pool))
    kw.setdefault("act_param", SLOPE)
    name = kw.pop("name", "fnn_conv_relu_pool_test")
    return ConvSpec(name=name, header=header(name, list(labels), ["conv"], "kernels/conv_relu_pool.py"),
                    labels=labels, **kw)


def make_inputs(spec: ConvSpec, gen: torch.Generator | None = None):
    """x, w (scaled like torch's default init, so activations do not saturate), b or None."""
    cg = spec.C // spec.groups
    x = torch.randn(spec.N, spec.C, spec.H, spec.W, generator=gen)
    w = torch.randn(spec.K, cg, spec.R, spec.S, generator=gen) / (cg * spec.R * spec.S) ** 0.5
    b = torch.randn(spec.K, generator=gen) if spec.bias else None
    return x, w, b


def forward(spec: ConvSpec, x, w, b):
    """Generate, load and launch the kernel; returns (y, idx, a) with None for buffers it does not write."""
    mod = load(generate(spec), spec.name)
    OH, OW = spec.out_hw
    y = torch.empty(spec.N, spec.K, *spec.pooled_hw)
    idx = torch.empty(y.shape, dtype=torch.uint8) if spec.pool == "max" else None
    a = torch.empty(spec.N, spec.K, OH, OW) if spec.save_act else None
    mod.launch(x, w, b, y, idx, a)
    return y, idx, a


def backward(spec: ConvSpec, dy, x, w, y, idx, a, needs_dx=True, needs_dw=True, needs_db=None):
    if saves_input(spec.act) and spec.pool == "none":
        y = a  # act' reads the saved z where the output is read otherwise (compiler/autodiff.py does the same)
    return conv_relu_pool_backward(
        dy, x, w, y, idx, a, stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
        groups=spec.groups, act=spec.act, act_param=spec.act_param, pool=spec.pool, pool_k=spec.pool_k,
        out_hw=spec.out_hw, needs_dx=needs_dx, needs_dw=needs_dw,
        needs_db=spec.bias if needs_db is None else needs_db)


def reference(spec: ConvSpec, x, w, b, dy):
    """torch in float64: y, the pool's window offsets, what the forward saves for act' (a = act(z), or z where
    act' needs the input), and dx, dw, db for upstream dy."""
    xd, wd = x.double().requires_grad_(), w.double().requires_grad_()
    bd = b.double().requires_grad_() if b is not None else None
    z = F.conv2d(xd, wd, bd, spec.stride, spec.padding, spec.dilation, spec.groups)
    a = ACTS[spec.act](z)
    win = None
    if spec.pool == "max":
        y, flat = F.max_pool2d(a, spec.pool_k, return_indices=True)
        OW, P = spec.out_hw[1], spec.pool_k
        ph = torch.arange(y.shape[2]).view(-1, 1)
        pw = torch.arange(y.shape[3]).view(1, -1)
        win = (flat // OW - ph * P) * P + (flat % OW - pw * P)  # flat index in the plane -> window offset
    elif spec.pool == "avg":
        y = F.avg_pool2d(a, spec.pool_k)
    else:
        y = a
    grads = torch.autograd.grad(y, [xd, wd] + ([bd] if bd is not None else []), dy.double())
    saved = z if saves_input(spec.act) else a
    return dict(y=y.detach(), win=win, a=saved.detach(), dx=grads[0], dw=grads[1],
                db=grads[2] if b is not None else None)


def _clear_maxima(spec: ConvSpec, x, w, b) -> bool:
    """Every max-pool window's largest activation (float64) beats its runner-up by more than 8 float32 ulps."""
    z = F.conv2d(x.double(), w.double(), b.double() if b is not None else None, spec.stride, spec.padding,
                 spec.dilation, spec.groups)
    P = spec.pool_k
    win = F.unfold(ACTS[spec.act](z).flatten(0, 1).unsqueeze(1), P, stride=P)  # [N*K, P*P, windows]
    top = win.topk(2, dim=1).values
    return bool((top[:, 0] - top[:, 1] > 8 * torch.finfo(torch.float32).eps * top[:, 0].abs()).all())


def check_against_torch(spec: ConvSpec, gen: torch.Generator | None = None, z_max: float | None = None) -> None:
    """Forward (y, idx, a) and every gradient (dx, dw, db) within TOL of float64 torch.

    z_max: scale w and b so that every pre-activation z lies in (-z_max, z_max). Under max pool, inputs are
    drawn again (at most 50 times) while a window's two largest activations lie within 8 float32 ulps: which
    one float32 picks there is rounding, not the kernel (small sigmoid pre-activations tie often).
    """
    for _ in range(50):
        x, w, b = make_inputs(spec, gen)
        if z_max is not None:
            z = F.conv2d(x.double(), w.double(), b.double() if b is not None else None, spec.stride, spec.padding,
                         spec.dilation, spec.groups)
            s = 0.9 * z_max / z.abs().max().item()
            w, b = w * s, (b * s if b is not None else None)
        if spec.pool != "max" or _clear_maxima(spec, x, w, b):
            break
    y, idx, a = forward(spec, x, w, b)
    dy = torch.randn(y.shape, generator=gen)
    ref = reference(spec, x, w, b, dy)
    assert rel_err(y, ref["y"]) <= TOL
    if idx is not None:
        assert torch.equal(idx.long(), ref["win"])
    if a is not None:
        assert rel_err(a, ref["a"]) <= TOL
    dx, dw, db = backward(spec, dy, x, w, y, idx, a)
    assert rel_err(dx, ref["dx"]) <= TOL
    assert rel_err(dw, ref["dw"]) <= TOL
    if spec.bias:
        assert rel_err(db, ref["db"]) <= TOL
    else:
        assert db is None


CASES = {
    # name: ConvSpec fields; every case checks the forward and all gradients
    "lenet_conv1": dict(N=2, C=1, H=12, W=12, K=6, R=5, S=5, act="relu", pool="max", pool_k=2),
    "stride_2_max_pool_remainder": dict(N=2, C=3, H=11, W=11, K=4, R=3, S=3, stride=2, act="relu", pool="max",
                                        pool_k=2),
    "stride_3x2_sigmoid": dict(N=2, C=2, H=12, W=9, K=3, R=3, S=2, stride=(3, 2), act="sigmoid"),
    "padding_2_tanh_avg_pool_3": dict(N=1, C=3, H=7, W=8, K=4, R=3, S=3, padding=2, act="tanh", pool="avg",
                                      pool_k=3),
    "padding_2x1_leaky_max_pool_3": dict(N=2, C=2, H=9, W=7, K=5, R=3, S=3, padding=(2, 1), act="leaky_relu",
                                         pool="max", pool_k=3),
    "dilation_2x3": dict(N=2, C=3, H=11, W=12, K=4, R=3, S=3, dilation=(2, 3), act="relu"),
    "groups_2": dict(N=2, C=4, H=9, W=9, K=6, R=3, S=3, groups=2, act="relu", pool="max", pool_k=2),
    "depthwise": dict(N=2, C=4, H=10, W=9, K=4, R=3, S=3, groups=4, padding=1, act="tanh", pool="max", pool_k=2),
    "depthwise_stride_2": dict(N=2, C=5, H=9, W=8, K=5, R=3, S=3, groups=5, stride=2, padding=1, act="relu"),
    "depthwise_dilation_no_bias": dict(N=1, C=3, H=9, W=10, K=3, R=3, S=2, groups=3, dilation=(2, 1),
                                       bias=False, pool="avg", pool_k=2),
    "1x1": dict(N=2, C=5, H=6, W=7, K=9, R=1, S=1),
    "1x1_groups_2_relu_max_pool": dict(N=2, C=4, H=6, W=6, K=6, R=1, S=1, groups=2, act="relu", pool="max",
                                       pool_k=2),
    "depthwise_multiplier_2": dict(N=1, C=3, H=8, W=9, K=6, R=2, S=2, groups=3, act="sigmoid", pool="avg",
                                   pool_k=2),
    "kernel_3x2_leaky_avg": dict(N=2, C=3, H=10, W=9, K=4, R=3, S=2, act="leaky_relu", pool="avg", pool_k=2),
    "no_bias": dict(N=2, C=3, H=9, W=10, K=5, R=3, S=3, bias=False, act="relu", pool="max", pool_k=2),
    "batch_1_odd": dict(N=1, C=3, H=7, W=5, K=3, R=3, S=1, padding=(1, 0), act="relu", pool="max", pool_k=2),
    "no_act_avg_pool": dict(N=2, C=2, H=11, W=10, K=3, R=2, S=3, pool="avg", pool_k=2),
    "no_act_no_pool": dict(N=2, C=3, H=6, W=7, K=4, R=3, S=3, stride=(1, 2), padding=1),
    "no_act_max_pool_3": dict(N=2, C=2, H=10, W=11, K=3, R=2, S=2, pool="max", pool_k=3),
    "save_act_max_pool_partial_windows": dict(N=2, C=2, H=9, W=8, K=3, R=3, S=2, act="sigmoid", pool="max",
                                              pool_k=2, save_act=True),
    "save_act_no_pool": dict(N=1, C=2, H=6, W=6, K=3, R=3, S=3, act="tanh", save_act=True),
    # an activation whose act' needs its input: the forward saves z
    "gelu": dict(N=2, C=3, H=8, W=8, K=4, R=3, S=3, padding=1, act="gelu"),
    "gelu_tanh_stride_2_no_bias": dict(N=2, C=3, H=9, W=9, K=4, R=3, S=3, stride=2, bias=False, act="gelu_tanh"),
    "silu_avg_pool": dict(N=2, C=2, H=10, W=9, K=3, R=3, S=2, act="silu", pool="avg", pool_k=2),
    "mish_groups_2": dict(N=2, C=4, H=8, W=8, K=6, R=3, S=3, groups=2, act="mish"),
    "hardswish_avg_pool_3_partial": dict(N=1, C=3, H=9, W=8, K=4, R=2, S=2, act="hardswish", pool="avg",
                                         pool_k=3),
    "hardsigmoid_dilation_2": dict(N=2, C=2, H=10, W=10, K=3, R=3, S=3, dilation=2, act="hardsigmoid"),
    "softsign_1x1": dict(N=2, C=5, H=6, W=7, K=4, R=1, S=1, act="softsign"),
    "tanhshrink_depthwise": dict(N=2, C=4, H=9, W=9, K=4, R=3, S=3, groups=4, padding=1, act="tanhshrink"),
    "logsigmoid_depthwise_avg_pool": dict(N=1, C=3, H=8, W=8, K=3, R=3, S=3, groups=3, padding=1,
                                          act="logsigmoid", pool="avg", pool_k=2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conv_relu_pool_grad_matches_torch(case):
    check_against_torch(make_spec(**CASES[case]))


@pytest.mark.parametrize("z_max", [3e-3, 0.3])
@pytest.mark.parametrize("pool", ["none", "max", "avg"])
@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_conv_tanh_sigmoid_small_preactivations_match_torch(act, pool, z_max):
    # |z| < 0.3 is where tanh's (1 - e)/(1 + e), e = exp(-2|z|), cancels: the epilogue must use the same
    # formula as the pointwise kernel (kernels/activation.py), within 1e-5 relative like every other kernel.
    spec = make_spec(N=2, C=3, H=10, W=9, K=5, R=3, S=3, padding=1, act=act, pool=pool,
                     pool_k=2 if pool != "none" else 1)
    check_against_torch(spec, z_max=z_max)


def test_conv_relu_pool_max_pool_tie_grad_matches_torch():
    """Constant input: every window ties; the first max in scan order gets the gradient, as in torch.

    Dyadic weights keep every conv output exact in fp32, so the ties are real ties in both."""
    spec = make_spec(N=2, C=2, H=9, W=10, K=4, R=3, S=3, act="relu", pool="max", pool_k=2)
    x = torch.full((spec.N, spec.C, spec.H, spec.W), 0.5)
    w = torch.randint(-4, 5, (spec.K, spec.C, spec.R, spec.S)).float() / 8
    b = torch.randint(-4, 5, (spec.K,)).float() / 4
    y, idx, a = forward(spec, x, w, b)
    dy = torch.randn(y.shape)
    ref = reference(spec, x, w, b, dy)
    assert torch.equal(y.double(), ref["y"])
    assert torch.equal(idx.long(), ref["win"]) and (idx == 0).all()
    dx, dw, db = backward(spec, dy, x, w, y, idx, a)
    for out, name in ((dx, "dx"), (dw, "dw"), (db, "db")):
        assert rel_err(out, ref[name]) <= TOL, name


def test_conv_max_pool_nan_wins_as_in_torch():
    """A NaN in the input makes its windows' max NaN, with torch's window offset (the last NaN)."""
    spec = make_spec(N=1, C=2, H=8, W=8, K=3, R=2, S=2, pool="max", pool_k=2)
    x, w, b = make_inputs(spec)
    x[0, 1, 3, 4] = float("nan")
    y, idx, _ = forward(spec, x, w, b)
    ref = reference(spec, x, w, b, torch.zeros(y.shape))
    nan = torch.isnan(ref["y"])
    assert nan.any() and torch.equal(torch.isnan(y), nan)
    assert rel_err(y[~nan], ref["y"][~nan]) <= TOL
    assert torch.equal(idx.long(), ref["win"])


def test_conv_relu_pool_split_k_grad_matches_torch_and_is_deterministic():
    """GPU launch configs (small tiles, dw/db split over row slices plus a fixed-order second pass), run
    in the interpreter: gradients match torch and two runs are bit-identical. With dx, the dx launch's extra
    programs sum the partials (after the dw kernel); without, one launch of their own does, the same way."""
    spec = make_spec(N=2, C=3, H=18, W=18, K=4, R=3, S=3, act="relu", pool="max", pool_k=2)
    x, w, b = make_inputs(spec)
    y, idx, a = forward(spec, x, w, b)
    dy = torch.randn(y.shape)
    ref = reference(spec, x, w, b, dy)
    with configs.use_target("gpu"), recording() as launches:
        dx, dw, db = backward(spec, dy, x, w, y, idx, a)
    assert [kernel_name(r.kernel) for r in launches] == ["_conv_relu_pool_bwd_dw_kernel",
                                                        "_conv_relu_pool_bwd_dx_kernel"]
    assert launches[1].meta["SUM_DW"] and launches[1].meta["SUM_DB"] and launches[1].meta["SPLIT_W"] > 1
    for out, name in ((dx, "dx"), (dw, "dw"), (db, "db")):
        assert rel_err(out, ref[name]) <= TOL, name
    with configs.use_target("gpu"), recording() as launches:
        dx2, dw2, db2 = backward(spec, dy, x, w, y, idx, a)
        _, dw3, db3 = backward(spec, dy, x, w, y, idx, a, needs_dx=False)
    assert [kernel_name(r.kernel) for r in launches][-2:] == ["_conv_relu_pool_bwd_dw_kernel", "_conv_bwd_sums_kernel"]
    assert torch.equal(dx, dx2) and torch.equal(dw, dw2) and torch.equal(db, db2)
    assert rel_err(dw3, ref["dw"]) <= TOL and rel_err(db3, ref["db"]) <= TOL


def run_and_check(spec: ConvSpec, target: str) -> tuple[list, tuple, dict, tuple]:
    """Forward and backward of `spec` at `target`'s launch configs, recorded; y, dx, dw and db checked against
    float64 torch. Returns the launches, the gradients, the reference and the inputs (x, w, b, dy, y, idx, a)."""
    x, w, b = make_inputs(spec)
    dy = torch.randn(spec.N, spec.K, *spec.pooled_hw)
    with configs.use_target(target), recording() as launches:
        y, idx, a = forward(spec, x, w, b)
        grads = backward(spec, dy, x, w, y, idx, a)
    ref = reference(spec, x, w, b, dy)
    assert rel_err(y, ref["y"]) <= TOL
    for out, name in zip(grads, ("dx", "dw", "db")):
        assert (out is None) if ref[name] is None else rel_err(out, ref[name]) <= TOL, name
    return launches, grads, ref, (x, w, b, dy, y, idx, a)


@pytest.mark.parametrize("target", ["interp", "gpu"])
def test_a_conv_with_gelu_saves_z_and_its_backward_reads_it(target):
    """conv + GELU in training: the forward writes y and z (what act' needs), the dw and dx kernels make
    dz = dy * gelu'(z) in their prologue; at the GPU's tiles too (split-K dw summed in the dx launch)."""
    spec = make_spec(N=4, C=8, H=12, W=12, K=16, R=3, S=3, padding=1, act="gelu")
    assert spec.save_act and "tl.store(a_ptr + y_off, conv2d_1, " in generate(spec)  # %1 conv2d: z
    launches, _, ref, (*_, a) = run_and_check(spec, target)
    assert rel_err(a, ref["a"]) <= TOL
    names = [kernel_name(r.kernel) for r in launches]
    assert names == [spec.name, "_conv_relu_pool_bwd_dw_kernel", "_conv_relu_pool_bwd_dx_kernel"], names
    if target == "gpu":
        assert launches[1].meta["SPLIT"] > 1 and launches[2].meta.get("SUM_DW"), [r.meta for r in launches]


@pytest.mark.parametrize("target", ["interp", "gpu"])
def test_depthwise_conv_runs_direct_kernels_and_matches_torch(target):
    """groups == C == K: a direct kernel per direction (one multiply-add per tap, channels as columns), no
    GEMM of one-channel groups. 40 channels (two channel blocks at the GPU's tiles) and, at the GPU's tiles,
    dw over 4 row slices summed in a fixed order: two runs are bit-identical."""
    spec = make_spec(N=4, C=40, H=16, W=16, K=40, R=3, S=3, groups=40, padding=1, act="relu")
    assert spec.depthwise and "tl.dot(" not in generate(spec)
    launches, grads, _, (x, w, b, dy, y, idx, a) = run_and_check(spec, target)
    names = [kernel_name(r.kernel) for r in launches]
    # the dx launch sums the dw kernel's row-slice partials: no launch of their own
    assert names[1:] == ["_depthwise_bwd_dw_kernel", "_depthwise_bwd_dx_kernel"], names
    if target == "gpu":
        assert launches[0].grid[1] == 2 and launches[1].grid[0] == 4, [r.grid for r in launches]
        assert launches[2].meta["SUM_DW"] and launches[2].meta["SPLIT_W"] == 4, launches[2].meta
        with configs.use_target(target):
            again = backward(spec, dy, x, w, y, idx, a)
        assert all(torch.equal(g, h) for g, h in zip(grads, again))


@pytest.mark.parametrize("target", ["interp", "gpu"])
def test_1x1_conv_is_a_plain_gemm_and_matches_torch(target):
    """A 1x1 conv with stride 1 and no padding reads x as [N, C, H * W] (no im2col gather) and, with nothing
    fused, takes GEMM tiles rather than gather tiles forward and for dw (MobileNet's expand and project
    convs, ResNet's projection shortcuts)."""
    spec = make_spec(N=4, C=48, H=8, W=8, K=40, R=1, S=1, bias=False)
    assert spec.plain_gemm and "ih =" not in generate(spec)
    # a fused avg pool after an activation also visits the partial windows past a 9x9 input: the gather's
    # masks keep those reads inside x, so such a 1x1 conv gathers
    assert not make_spec(N=1, C=4, H=9, W=9, K=6, R=1, S=1, act="relu", pool="avg", pool_k=2).plain_gemm
    launches = run_and_check(spec, target)[0]
    if target == "gpu":  # forward, dw (GEMM tiles), dx (gather tiles: 16 x 32 x 16 here)
        tiles = [(r.meta["BLOCK_M"], r.meta["BLOCK_N"], r.meta["BLOCK_K"]) for r in launches[:3]]
        assert tiles == [(16, 64, 32), (16, 64, 32), (16, 32, 16)], tiles


@pytest.mark.parametrize("case", ["lenet_conv1", "depthwise"])
def test_conv_dx_adds_a_gradient_x_already_has(case):
    """dx_into: the dx kernel returns the conv's dx plus it, read, not written."""
    spec = make_spec(**CASES[case])
    x, w, b = make_inputs(spec)
    y, idx, a = forward(spec, x, w, b)
    dy = torch.randn(y.shape)
    ref = reference(spec, x, w, b, dy)
    into = torch.randn(x.shape)
    before = into.clone()
    dx, _, _ = conv_relu_pool_backward(
        dy, x, w, y, idx, a, stride=spec.stride, padding=spec.padding, dilation=spec.dilation, groups=spec.groups,
        act=spec.act, act_param=spec.act_param, pool=spec.pool, pool_k=spec.pool_k, out_hw=spec.out_hw,
        needs_dx=True, needs_dw=False, needs_db=False, dx_into=into)
    assert rel_err(dx, ref["dx"] + into.double()) <= TOL and torch.equal(into, before)
    with pytest.raises(ValueError, match="dx_into"):
        conv_relu_pool_backward(
            dy, x, w, y, idx, a, stride=spec.stride, padding=spec.padding, dilation=spec.dilation,
            groups=spec.groups, act=spec.act, act_param=spec.act_param, pool=spec.pool, pool_k=spec.pool_k,
            out_hw=spec.out_hw, needs_dx=True, needs_dw=False, needs_db=False, dx_into=into.double())


def test_conv_relu_pool_dw_db_bit_identical_across_runs():
    spec = make_spec(N=2, C=4, H=10, W=11, K=6, R=3, S=3, groups=2, act="tanh", pool="avg", pool_k=2)
    x, w, b = make_inputs(spec)
    y, idx, a = forward(spec, x, w, b)
    dy = torch.randn(y.shape)
    _, dw1, db1 = backward(spec, dy, x, w, y, idx, a, needs_dx=False)
    _, dw2, db2 = backward(spec, dy, x, w, y, idx, a, needs_dx=False)
    assert torch.equal(dw1, dw2) and torch.equal(db1, db2)


def test_conv_relu_pool_computes_only_the_gradients_asked_for():
    """needs_* flags: None where not needed, the rest as when everything is asked for; db alone works."""
    spec = make_spec(N=2, C=2, H=8, W=9, K=3, R=3, S=3, act="leaky_relu", pool="max", pool_k=2)
    x, w, b = make_inputs(spec)
    y, idx, a = forward(spec, x, w, b)
    dy = torch.randn(y.shape)
    ref = reference(spec, x, w, b, dy)
    dx, dw, db = backward(spec, dy, x, w, y, idx, a, needs_dx=False, needs_dw=False, needs_db=True)
    assert dx is None and dw is None and rel_err(db, ref["db"]) <= TOL
    dx, dw, db = backward(spec, dy, x, w, y, idx, a, needs_dx=True, needs_dw=False, needs_db=False)
    assert dw is None and db is None and rel_err(dx, ref["dx"]) <= TOL


def test_conv_relu_pool_backward_rejects_missing_saved_tensors():
    spec = make_spec(N=1, C=1, H=6, W=6, K=2, R=3, S=3, act="relu", pool="max", pool_k=2)
    x, w, b = make_inputs(spec)
    y, idx, a = forward(spec, x, w, b)
    with pytest.raises(ValueError, match="idx"):
        backward(spec, torch.ones_like(y), x, w, y, None, a)
    avg = make_spec(N=1, C=1, H=6, W=6, K=2, R=3, S=3, act="tanh", pool="avg", pool_k=2)
    with pytest.raises(ValueError, match="save_act"):
        backward(avg, torch.ones_like(y), x, w, y, None, None)
    with pytest.raises(ValueError, match="out_hw"):
        conv_relu_pool_backward(torch.ones_like(y), x, w, y, idx, a, stride=1, padding=0, dilation=1, groups=1,
                                act="relu", act_param=0.0, pool="max", pool_k=2, out_hw=(5, 4), needs_dx=True,
                                needs_dw=True, needs_db=True)


def test_conv_generated_source_starts_with_header_and_labels_each_stage():
    spec = make_spec(N=2, C=1, H=12, W=12, K=6, R=5, S=5, act="relu", pool="max", pool_k=2,
                     name="fnn_conv_relu_pool_0")
    text = generate(spec)
    assert text.startswith(spec.header)
    assert text.startswith("# fusednn generated kernel fnn_conv_relu_pool_0\n")
    for label in spec.labels:
        assert f"# {label}" in text
    assert "def fnn_conv_relu_pool_0(" in text and "def launch(x, w, b, y, idx, a, nbytes=None):" in text
    # temporaries named after the IR values, shapes baked in as constexpr arguments of the launch, except
    # the batch: a runtime argument the kernel does not specialise on
    assert "relu_2 = " in text and "max_pool2d_3 = " in text
    assert "C=1, H=12, W=12, K=6, R=5, S=5" in text
    assert '@triton.jit(do_not_specialize=["N"])' in text and " N: tl.constexpr" not in text
    compile(text, spec.name, "exec")


def test_conv_spec_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="groups"):
        make_spec(N=1, C=3, H=8, W=8, K=4, R=3, S=3, groups=2)
    with pytest.raises(ValueError, match="labels"):
        ConvSpec(N=1, C=1, H=8, W=8, K=2, R=3, S=3, act="relu", labels=("%1 conv2d",))
    with pytest.raises(ValueError, match="pool_k"):
        make_spec(N=1, C=1, H=4, W=4, K=2, R=3, S=3, pool="max", pool_k=3)
    with pytest.raises(ValueError, match="max pool"):  # the argmax's act' would need z there
        make_spec(N=1, C=1, H=8, W=8, K=2, R=3, S=3, act="gelu", pool="max", pool_k=2)
    with pytest.raises(ValueError, match="act"):  # a GELU epilogue that saves nothing has no backward
        make_spec(N=1, C=1, H=8, W=8, K=2, R=3, S=3, act="gelu", save_act=False)


@st.composite
def conv_cases(draw):
    """Small conv+act+pool hyper-parameters whose conv output fits the pool window."""
    groups = draw(st.sampled_from([1, 2]))
    kw = dict(N=draw(st.integers(1, 2)), C=groups * draw(st.integers(1, 2)), K=groups * draw(st.integers(1, 3)),
              H=draw(st.integers(3, 11)), W=draw(st.integers(3, 11)), R=draw(st.integers(1, 3)),
              S=draw(st.integers(1, 3)), groups=groups,
              stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
              padding=(draw(st.integers(0, 2)), draw(st.integers(0, 1))),
              dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
              bias=draw(st.booleans()), act=draw(st.sampled_from(list(ACTS))),
              pool=draw(st.sampled_from(["none", "max", "avg"])), pool_k=draw(st.integers(2, 3)))
    (sh, sw), (ph, pw), (dh, dw) = kw["stride"], kw["padding"], kw["dilation"]
    oh = (kw["H"] + 2 * ph - dh * (kw["R"] - 1) - 1) // sh + 1
    ow = (kw["W"] + 2 * pw - dw * (kw["S"] - 1) - 1) // sw + 1
    if kw["pool"] == "max" and saves_input(kw["act"]):
        kw["pool"] = "avg"  # no max pool after an activation whose act' needs its input
    need = kw["pool_k"] if kw["pool"] != "none" else 1
    if kw["pool"] == "none":
        kw["pool_k"] = 1
    return kw, oh >= need and ow >= need, draw(st.integers(0, 2**31 - 1))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conv_cases())
def test_conv_relu_pool_grad_matches_torch_hypothesis(case):
    kw, fits, seed = case
    if not fits:  # an empty conv output or a pool window larger than it: not a kernel input
        with pytest.raises(ValueError):
            make_spec(**kw)
        return
    check_against_torch(make_spec(**kw), torch.Generator().manual_seed(seed))


@pytest.mark.aot
def test_conv_relu_pool_kernels_compile_for_sm90():
    """LeNet conv1 at batch 64 with the GPU launch configs: the generated forward and every backward kernel
    (split-K dw/db included) go through Triton's real compiler for sm_90, which the interpreter never runs."""
    aot = pytest.importorskip("fusednn.tools.aot")
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(f"cannot compile for sm_90 here: {reason}")
    spec = make_spec(N=64, C=1, H=32, W=32, K=6, R=5, S=5, act="relu", pool="max", pool_k=2,
                     name="fnn_conv_relu_pool_aot")
    mod = load(generate(spec), spec.name)
    x, w, b = make_inputs(spec)
    y = torch.empty(spec.N, spec.K, *spec.pooled_hw)
    idx = torch.empty(y.shape, dtype=torch.uint8)

    def step():
        mod.launch(x, w, b, y, idx, None)
        backward(spec, y, x, w, y, idx, None)

    launches = aot.collect(step)
    names = {kernel_name(r.kernel) for r in launches}
    assert names == {spec.name, "_conv_relu_pool_bwd_dx_kernel", "_conv_relu_pool_bwd_dw_kernel"}
    assert any(r.meta.get("SUM_DW") for r in launches)  # the split-K sums, in the dx launch
    compiled = aot.compile_launches(launches)
    assert {c.resources.kernel for c in compiled} == names


@pytest.mark.aot
def test_depthwise_kernels_compile_for_sm90_without_spills():
    """MobileNetV2Tiny's widest depthwise conv at batch 64 with the GPU launch configs, with and without a
    fused activation and max pool: the direct forward and backward kernels compile for sm_90, no spills."""
    aot = pytest.importorskip("fusednn.tools.aot")
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(f"cannot compile for sm_90 here: {reason}")
    specs = [make_spec(N=64, C=96, H=16, W=16, K=96, R=3, S=3, groups=96, padding=1, bias=False,
                       name="fnn_depthwise_aot"),
             make_spec(N=64, C=96, H=16, W=16, K=96, R=3, S=3, groups=96, padding=1, act="relu", pool="max",
                       pool_k=2, name="fnn_depthwise_relu_pool_aot")]

    def step():
        for spec in specs:
            x, w, b = make_inputs(spec)
            y, idx, a = forward(spec, x, w, b)
            backward(spec, y, x, w, y, idx, a)

    launches = aot.collect(step)
    names = {kernel_name(r.kernel) for r in launches}
    assert {"_depthwise_bwd_dx_kernel", "_depthwise_bwd_dw_kernel"} <= names, names
    assert any(r.meta.get("SUM_DW") for r in launches)  # the dw partials' sums, in the dx launch
    compiled = aot.compile_launches(launches)
    spilled = [c for c in compiled if c.resources.spills]
    assert not spilled, "\n" + aot.report_table(spilled)
