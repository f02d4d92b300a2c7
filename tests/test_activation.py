"""The activations of issue #13 and neg: generated forward (compiler/templates/pointwise.py, formulas in
kernels/activation.py) and hand-written backward (kernels/activation.py `activation_backward`) against
torch in float64, forward and every gradient; through fusednn.compile fused and unfused; PyTorch's own
module_db and op_db samples; NaN/Inf as torch; sm_90 compilation without spills."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn.tools import aot
from fusednn.compiler.ops import REGISTRY
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.pointwise import PointwiseSpec, PwStep, generate
from fusednn.compiler.trace import trace
from fusednn.kernels.activation import SAVES, activation_backward
from fusednn.launch import recording
from tests.helpers import rel_err
from tests.test_pointwise import SPECIALS, assert_matches, leaf

TOL = 1e-5

# IR op -> (module, the same as a function of a tensor). Parameters other than the defaults where an op has
# them, so the kernels' parameter plumbing is exercised.
MODULES = {
    "relu6": nn.ReLU6(),
    "hardtanh": nn.Hardtanh(-0.5, 1.5),
    "elu": nn.ELU(0.7),
    "selu": nn.SELU(),
    "celu": nn.CELU(1.3),
    "gelu": nn.GELU(),
    "gelu_tanh": nn.GELU(approximate="tanh"),
    "silu": nn.SiLU(),
    "mish": nn.Mish(),
    "hardswish": nn.Hardswish(),
    "hardsigmoid": nn.Hardsigmoid(),
    "softplus": nn.Softplus(2.0, 5.0),
    "softsign": nn.Softsign(),
    "tanhshrink": nn.Tanhshrink(),
    "threshold": nn.Threshold(0.25, -2.0),
    "logsigmoid": nn.LogSigmoid(),
    "neg": torch.neg,
}


def ir_op(key: str) -> str:
    return "gelu" if key == "gelu_tanh" else key


def kernel_act(key: str, x: torch.Tensor) -> tuple[str, tuple[float, ...]]:
    """The (kernel activation, parameters) the compiler uses for MODULES[key]: traced, not restated."""
    g = trace(lambda t: MODULES[key](t), x)
    (n,) = g.nodes
    assert n.op == ir_op(key), g
    return REGISTRY[n.op].kernel_act(n.attrs)


def forward_backward(key: str, x: torch.Tensor, dy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y from the generated pointwise kernel (one launch), dx from activation_backward on what SAVES says."""
    act, params = kernel_act(key, x)
    name = "fnn_act_test"
    spec = PointwiseSpec(name, header(name, [f"%1 {key}"], ["test"], "kernels/activation.py"), x.numel(), ("x",),
                         (PwStep(f"%1 {key}", "v1", act, ("x",), params),), ("v1",))
    y = torch.empty_like(x)
    with recording() as launches:
        load(generate(spec), name).launch(x, y)
    assert len(launches) == 1
    saved = {"x": x, "y": y, None: None}[SAVES[act]]
    return y, activation_backward(dy, saved, act=act, act_param=params)


def tolerance(f, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    """max(TOL, 4x float32 torch's own error vs float64), for y and dx."""
    x32, x64 = x.clone().requires_grad_(), leaf(x)
    y32, y64 = f(x32), f(x64)
    y32.backward(dy)
    y64.backward(dy.double())
    return max(TOL, 4 * rel_err(y32, y64)), max(TOL, 4 * rel_err(x32.grad, x64.grad))


def random_input(numel: int, scale: float = 3.0) -> torch.Tensor:
    """Normal values with exact zeros and the branch points of the piecewise activations (+-3, 0.1, 6)."""
    x = torch.randn(numel) * scale
    x[::5] = 0.0
    specials = torch.tensor([3.0, -3.0, 0.1, 6.0, -0.5, 1.5])[: max(0, numel - 1)]
    x[1:1 + len(specials)] = specials
    return x


@pytest.mark.parametrize("numel", [1, 7, 1003])
@pytest.mark.parametrize("key", list(MODULES))
def test_activation_and_grad_match_torch(key, numel):
    f = MODULES[key]
    x, dy = random_input(numel), torch.randn(numel)
    y, dx = forward_backward(key, x, dy)
    x64 = leaf(x)
    ref = f(x64)
    ref.backward(dy.double())
    tol_y, tol_dx = tolerance(f, x, dy)
    assert rel_err(y, ref) <= tol_y
    assert rel_err(dx, x64.grad) <= tol_dx


@pytest.mark.parametrize("key", list(MODULES))
def test_activation_propagates_nan_and_inf_as_torch(key):
    # Where float32 and float64 torch disagree (hardtanh/relu6's gradient at NaN: 1 in float32, 0 in
    # float64; gelu(+inf): NaN in float32, inf in float64), fusednn follows float64.
    x = torch.tensor(SPECIALS)
    dy = torch.randn(x.shape)
    y, dx = forward_backward(key, x, dy)
    x64 = leaf(x)
    ref = MODULES[key](x64)
    ref.backward(dy.double())
    assert_matches(y, ref)
    assert_matches(dx, x64.grad)


# Ranges where a float64 reference is exact enough to judge relative accuracy element by element: tanhshrink
# (x - tanh x) cancels in float64 too below |x| ~ 1e-3; torch's float64 gelu (1 + erf, 1 + tanh) cancels in
# the lower tail (2% wrong at x = -8, the tanh form 15% at x = -7), so gelu is judged by its erfc/sigmoid forms.
EXACT = {
    "gelu": lambda x: x * 0.5 * torch.erfc(-x * 0.7071067811865476),
    "gelu_tanh": lambda x: x * torch.sigmoid(1.5957691216057308 * (x + 0.044715 * x**3)),
}
ACCURACY = [(k, lo, hi) for k in MODULES if k not in ("neg", "threshold", "hardtanh", "relu6")
            for lo, hi in ((-7.0, -0.5), (0.5, 12.0), (-1e-3, 1e-3))
            if not (k == "tanhshrink" and hi == 1e-3)] + [("tanhshrink", 1e-3, 0.3)]


@pytest.mark.parametrize("key,lo,hi", ACCURACY)
def test_activation_is_accurate_element_by_element(key, lo, hi):
    """Each element to TOL relative (not just normwise): tails (gelu's Phi, silu, softplus), values near 0
    (elu's expm1, tanhshrink's series, log1p), where float32 torch loses up to every digit."""
    x = torch.linspace(lo, hi, 501)
    y, dx = forward_backward(key, x, torch.ones(501))
    x64 = leaf(x)
    ref = EXACT.get(key, MODULES[key])(x64)
    ref.backward(torch.ones(501, dtype=torch.float64))
    for what, out, r in (("y", y, ref.detach()), ("dx", dx, x64.grad)):
        judged = r.abs() > 1e-30  # normal float32 range
        # ... and away from a root (gelu', silu', mish', hardswish' cross 0 for some x < 0): relative error
        # there measures the distance to the root, not the kernel
        flips = torch.nonzero(torch.sign(r[1:]) * torch.sign(r[:-1]) < 0).flatten()
        for i in flips.tolist():
            judged[max(0, i - 4):i + 5] = False
        err = ((out.double() - r).abs()[judged] / r.abs()[judged]).max().item()
        # TOL: exp(a) carries about |a| ulp (the rounding of a itself), 4e-6 at gelu's a = -x^2/2 = -21
        assert err <= TOL, (key, what, err)


def test_saturated_tanh_grad_is_zero_as_in_float32_torch():
    # float32 tanh rounds to +-1 beyond |x| = 9.01; torch's tanh_backward computes 1 - y*y from that
    # y and returns exactly 0 there (float64 gives 5e-8 at x = 9.1). fusednn reads y too and matches torch:
    # exactly 0 where torch is 0, torch's 1 - y*y to rounding where y < 1.
    x = torch.tensor([5.0, 8.0, 8.5, 9.0, 9.1, 10.0, 15.0, 50.0, -9.1, -20.0])
    dy = torch.ones_like(x)
    xt = x.clone().requires_grad_()
    torch.tanh(xt).backward(dy)
    y = torch.tanh(x)
    dx = activation_backward(dy, y, act="tanh")
    assert torch.equal(dx == 0, xt.grad == 0)
    assert (dx[4:] == 0).all()
    assert torch.allclose(dx, xt.grad, rtol=1e-4, atol=0)


# -- through fusednn.compile -------------------------------------------------------------------------------
def check_compiled(fn, x: torch.Tensor, fuse: bool, ref_fn=None) -> fusednn.api.CompiledModel:
    """Output and input gradient of fusednn.compile(fn) against fn (or ref_fn) in float64."""
    ref_fn = ref_fn or fn
    c = fusednn.compile(fn, fuse=fuse)
    xt = x.clone().requires_grad_()
    y = c(xt)
    dy = torch.randn(y.shape)
    y.backward(dy)
    x64 = leaf(x)
    ref = ref_fn(x64)
    ref.backward(dy.double())
    tol_y, tol_dx = tolerance(ref_fn, x, dy)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert rel_err(y, ref) <= tol_y
    assert rel_err(xt.grad, x64.grad) <= tol_dx
    return c


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("shape", [(), (1,), (3, 5, 7)], ids=["0d", "1", "3x5x7"])
@pytest.mark.parametrize("key", list(MODULES))
def test_compiled_activation_matches_torch(key, shape, fuse):
    m = MODULES[key]
    c = check_compiled(m, torch.randn(shape) * 3, fuse)
    assert [n.op for n in c.fused_graph.nodes] == [ir_op(key)]


INPLACE = {
    "F.relu6(inplace)": (lambda h: F.relu6(h, inplace=True), "relu6"),
    "F.hardtanh_": (lambda h: F.hardtanh_(h, -0.5, 0.5), "hardtanh"),
    "F.elu_": (lambda h: F.elu_(h, 0.5), "elu"),
    "F.elu(inplace)": (lambda h: F.elu(h, inplace=True), "elu"),
    "torch.selu_": (torch.selu_, "selu"),
    "torch.celu_": (lambda h: torch.celu_(h, 2.0), "celu"),
    "F.silu(inplace)": (lambda h: F.silu(h, inplace=True), "silu"),
    "F.mish(inplace)": (lambda h: F.mish(h, inplace=True), "mish"),
    "F.hardswish(inplace)": (lambda h: F.hardswish(h, inplace=True), "hardswish"),
    "F.hardsigmoid(inplace)": (lambda h: F.hardsigmoid(h, inplace=True), "hardsigmoid"),
    "F.threshold_": (lambda h: F.threshold_(h, 0.2, 9.0), "threshold"),
    "torch.threshold_": (lambda h: torch.threshold_(h, 0.2, 9.0), "threshold"),
    "x.neg_()": (lambda h: h.neg_(), "neg"),
    "torch.negative_": (torch.negative_, "neg"),
}


@pytest.mark.parametrize("name", list(INPLACE))
def test_inplace_forms_trace_as_their_functional_twins(name):
    act, op = INPLACE[name]

    def fn(x):
        h = x * 2.0  # in-place ops may write only what forward made itself
        act(h)
        return h + 1.0  # h holds the activated value

    c = check_compiled(fn, torch.randn(4, 9), fuse=False)
    assert [n.op for n in c.fused_graph.nodes] == ["mul", op, "add"]


@pytest.mark.parametrize("expr", [lambda x: -x, lambda x: x.neg(), lambda x: torch.negative(x), lambda x: x.negative()],
                         ids=["-x", "x.neg()", "torch.negative", "x.negative()"])
def test_neg_forms(expr):
    c = check_compiled(expr, torch.randn(2, 3), fuse=True)
    assert [n.op for n in c.fused_graph.nodes] == ["neg"]


def _chain(x):
    """Every activation once, each value read once: one pointwise tree."""
    h = F.silu(F.gelu(x * 0.5))
    h = F.elu(F.hardswish(F.mish(-h)), 0.3)
    h = F.selu(torch.celu(F.softplus(h, 2.0, 3.0), 0.8))
    h = F.softsign(F.logsigmoid(F.hardsigmoid(h) * 4.0 - 2.0))
    h = F.threshold(F.hardtanh(F.tanhshrink(h * 3.0), -2.0, 2.0), 0.05, 0.3)
    return F.gelu(F.relu6(h * 4.0), approximate="tanh")


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
def test_chain_of_all_activations_fuses_into_one_kernel(fuse):
    c = check_compiled(_chain, torch.randn(2, 3, 11) * 2, fuse)
    if fuse:
        (n,) = c.fused_graph.nodes  # every op of the chain, one pointwise kernel
        assert n.op == "pointwise" and len(n.absorbed) == len(c.graph.nodes)
        assert len(c.kernels()) == 1
    else:
        assert len(c.kernels()) == len(c.graph.nodes)


@pytest.mark.parametrize("act", [nn.GELU(), nn.SiLU(), nn.Hardswish(), nn.ReLU6(), nn.ELU()],
                         ids=["gelu", "silu", "hardswish", "relu6", "elu"])
def test_a_conv_takes_an_activation_read_from_its_input_but_not_the_max_pool_after_it(act):
    # A conv or linear epilogue applies an activation without parameters whose act' needs its input (GELU,
    # SiLU, Hardswish) and saves its result for the backward, but a conv not a max pool after it: the max of
    # a non-monotone activation's values is not the activation of the max, and the backward would need the
    # result at the argmax. Activations with parameters (ReLU6, ELU) stay out of both.
    m = nn.Sequential(nn.Conv2d(2, 3, 3), act, nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 5), act)
    c = fusednn.compile(m)
    x = torch.randn(2, 2, 6, 6)
    xt = x.clone().requires_grad_()
    y = c(xt)
    name = REGISTRY_OP[type(act)]
    if name in ("gelu", "silu", "hardswish"):
        expected = ["conv_relu_pool", "max_pool2d", "reshape", "linear_relu"]
    else:
        expected = ["conv2d", name, "max_pool2d", "reshape", "linear", name]
    assert [n.op for n in c.fused_graph.nodes] == expected
    m64 = copy.deepcopy(m).double()  # the same parameters, in float64
    x64 = leaf(x)
    ref = m64(x64)
    dy = torch.randn(y.shape)
    y.backward(dy)
    ref.backward(dy.double())
    assert rel_err(y, ref) <= TOL
    assert rel_err(xt.grad, x64.grad) <= TOL
    for p, p64 in zip(m.parameters(), m64.parameters()):
        assert rel_err(p.grad, p64.grad) <= TOL


REGISTRY_OP = {nn.GELU: "gelu", nn.SiLU: "silu", nn.Hardswish: "hardswish", nn.ReLU6: "relu6", nn.ELU: "elu"}


# -- errors -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn,exc,words", [
    (lambda x: F.softplus(x, 1.0, float("inf")), fusednn.UnsupportedOpError, ["softplus", "threshold=inf"]),
    (lambda x: F.hardtanh(x, 2.0, 1.0), ValueError, ["hardtanh", "min_val"]),
    (lambda x: F.gelu(x, approximate="fast"), ValueError, ["gelu", "approximate"]),
    (lambda x: F.elu(x, alpha=float("nan")), fusednn.UnsupportedOpError, ["elu", "alpha=nan"]),
])
def test_bad_activation_arguments_name_the_op_and_the_line(fn, exc, words):
    with pytest.raises(exc) as e:
        fusednn.compile(fn)(torch.randn(3))
    msg = str(e.value)
    assert all(w in msg for w in words), msg
    assert "test_activation.py:" in msg and "Traceback" not in msg


@pytest.mark.parametrize("fn,name", [(lambda x: x.std(), "Tensor.std"), (lambda x: torch.stack([x, x]), "torch.stack"),
                                     (lambda x: F.softmin(x, 0), "F.softmin"), (lambda x: x.cumsum(0), "Tensor.cumsum"),
                                     (lambda x: torch.special.erf(x), "torch.special.erf")])
def test_unsupported_op_is_named_as_users_write_it(fn, name):
    with pytest.raises(fusednn.UnsupportedOpError) as e:
        fusednn.compile(fn)(torch.randn(3))
    msg = str(e.value)
    assert msg.startswith(f"unsupported op {name} (test_activation.py:"), msg
    assert "TensorBase" not in msg and "_VariableFunctionsClass" not in msg


# -- PyTorch's own samples ----------------------------------------------------------------------------------
# op_db / module_db samples fusednn refuses, with the reason (none today: every sample of these ops runs).
REFUSED: dict[str, str] = {}

OPINFOS = ["nn.functional.relu6", "nn.functional.elu", "nn.functional.selu", "nn.functional.celu", "nn.functional.gelu",
           "nn.functional.silu", "nn.functional.mish", "nn.functional.hardswish", "nn.functional.hardsigmoid",
           "nn.functional.hardtanh", "nn.functional.softplus", "nn.functional.softsign", "nn.functional.tanhshrink",
           "nn.functional.threshold", "nn.functional.logsigmoid", "neg"]
MODULE_CLASSES = [nn.ReLU6, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Hardswish, nn.Hardsigmoid,
                  nn.Hardtanh, nn.Softplus, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.LogSigmoid]


@functools.cache
def _op_db():
    from torch.testing._internal.common_methods_invocations import op_db

    return {(o.name, o.variant_test_name): o for o in op_db if o.name in OPINFOS}


@functools.cache
def _module_db():
    from torch.testing._internal.common_modules import module_db

    return {m.module_cls: m for m in module_db if m.module_cls in MODULE_CLASSES}


def _match_sample(fn64, fn32, inputs64: list[torch.Tensor]) -> None:
    """fn32 (fusednn) on float32 copies vs fn64 on the float64 sample: output and every input gradient."""
    ins32 = [t.detach().float().requires_grad_() for t in inputs64]
    ins64 = [t.detach().clone().requires_grad_() for t in inputs64]
    y, ref = fn32(*ins32), fn64(*ins64)
    dy = torch.randn(ref.shape, dtype=torch.float64)
    y.backward(dy.float())
    ref.backward(dy)
    c32 = [t.detach().float().requires_grad_() for t in inputs64]
    y32 = fn64(*c32)
    y32.backward(dy.float())
    assert y.shape == ref.shape
    assert rel_err(y, ref) <= max(TOL, 4 * rel_err(y32, ref))
    for g, g64, g32 in zip((t.grad for t in ins32), (t.grad for t in ins64), (t.grad for t in c32)):
        assert rel_err(g, g64) <= max(TOL, 4 * rel_err(g32, g64))


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("variant", ["plain", "inplace"])
@pytest.mark.parametrize("opname", OPINFOS)
def test_op_db_samples_match_torch(opname, variant, fuse):
    infos = [o for (n, _), o in _op_db().items() if n == opname]
    assert infos, opname
    if variant == "inplace" and all(o.inplace_variant is None for o in infos):
        pytest.skip(f"op_db has no in-place variant of {opname}")
    for info in infos:
        fn = info.op if variant == "plain" else info.inplace_variant
        for i, s in enumerate(info.sample_inputs("cpu", torch.float64, requires_grad=True)):
            if f"{opname}[{i}]" in REFUSED:
                continue

            def call(x, fn=fn, s=s):
                return fn(x * 1.0 if variant == "inplace" else x, *s.args, **s.kwargs)

            _match_sample(call, fusednn.compile(call, fuse=fuse), [s.input])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("cls", MODULE_CLASSES, ids=lambda c: c.__name__)
def test_module_db_samples_match_torch(cls, training):
    info = _module_db().get(cls)
    if info is None:
        pytest.skip(f"module_db has no entry for {cls.__name__}")
    for s in info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True, training=training):
        ci, fi = s.constructor_input, s.forward_input
        m64 = cls(*ci.args, **ci.kwargs).double().train(training)
        m32 = fusednn.compile(cls(*ci.args, **ci.kwargs).float().train(training))
        tensors = [a for a in fi.args if isinstance(a, torch.Tensor)]
        assert len(tensors) == len(fi.args) and not fi.kwargs
        _match_sample(m64, m32, tensors)


# -- sm_90 --------------------------------------------------------------------------------------------------
@pytest.mark.aot
def test_activation_kernels_compile_for_sm90_without_spills():
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(reason)

    def program():
        x = torch.empty(4096)
        for act, saves in SAVES.items():
            activation_backward(x, None if saves is None else x, act=act, act_param=(0.5, 1.5, 1.0))
        c = fusednn.compile(_chain)  # every forward helper, in one generated kernel
        c(torch.empty(64, 3, 100))

    compiled = aot.compile_launches(aot.collect(program))
    names = [c.name for c in compiled]
    assert names.count("_activation_bwd_dx_kernel") == len(SAVES), names
    assert any(n.startswith("fnn_pointwise_") for n in names), names
    for c in compiled:
        assert not c.resources.spills, c.resources
