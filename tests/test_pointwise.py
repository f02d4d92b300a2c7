"""Fused elementwise chains: generated forward (compiler/templates/pointwise.py) and the hand-written
backward (kernels/activation.py) against torch in float64, forward and every gradient."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fusednn.compiler import configs
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.pointwise import PointwiseSpec, PwStep, generate
from fusednn.kernels.activation import accumulate_, activation_backward, mul_backward, prelu_backward
from fusednn.launch import recording
from tests.helpers import rel_err

TOL = 1e-5
SLOPE = 0.1

# Values torch treats specially; +-50 and +-0.1 sit on either side of the sigmoid/tanh branch points.
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1e30, -1e30, 50.0, -50.0, 0.1, -0.1, 3.0, -3.0]


def pointwise(steps, inputs: dict, outputs, shape) -> dict:
    """Generate, load and launch one fused chain; asserts it is exactly one kernel launch."""
    numel = next(t.numel() for n, t in inputs.items() if not _is_weight(steps, n))
    name = "fnn_pw_test"
    spec = PointwiseSpec(name, header(name, [s.label for s in steps], ["test"], "kernels/activation.py"),
                         numel, tuple(inputs), tuple(steps), tuple(outputs))
    mod = load(generate(spec), name)
    outs = {o: torch.empty(shape) for o in outputs}
    with recording() as launches:
        mod.launch(*inputs.values(), *outs.values())
    assert len(launches) == (1 if numel else 0)
    return outs


def _is_weight(steps, name) -> bool:
    return any(s.op == "prelu" and s.args[1] == name for s in steps)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.double().requires_grad_()


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Same NaN positions, same infinities, finite values within TOL (normwise) of the float64 reference."""
    ref = ref.detach()
    assert torch.equal(out.isnan(), ref.isnan()), (out, ref)
    inf = ref.isinf()
    assert torch.equal(out[inf].double(), ref[inf]), (out, ref)
    fin = ref.isfinite()
    assert out[fin].isfinite().all(), (out, ref)
    assert rel_err(out[fin], ref[fin]) <= TOL


def random_input(numel: int) -> torch.Tensor:
    """Normal values with a few exact zeros (ReLU's derivative at 0 is part of the contract)."""
    x = torch.randn(numel) * 2
    x[::5] = 0.0
    return x


# (op, args, param, torch reference on float64 leaves)
OPS = {
    "relu": ("relu", ("x",), 0.0, lambda x, b: torch.relu(x)),
    "leaky_relu": ("leaky_relu", ("x",), SLOPE, lambda x, b: F.leaky_relu(x, SLOPE)),
    "sigmoid": ("sigmoid", ("x",), 0.0, lambda x, b: torch.sigmoid(x)),
    "tanh": ("tanh", ("x",), 0.0, lambda x, b: torch.tanh(x)),
    "add": ("add", ("x", "b"), 0.0, lambda x, b: x + b),
    "add_scalar": ("add", ("x", 2.5), 0.0, lambda x, b: x + 2.5),
    "mul": ("mul", ("x", "b"), 0.0, lambda x, b: x * b),
    "scalar_mul": ("mul", (-1.5, "x"), 0.0, lambda x, b: -1.5 * x),
    "sub": ("sub", ("x", "b"), 0.0, lambda x, b: x - b),
    "scalar_sub": ("sub", (0.75, "x"), 0.0, lambda x, b: 0.75 - x),
}


def our_grads(key: str, dy, x, b, y) -> dict:
    """Gradients w.r.t. each tensor operand, through the backward launchers the compiler would use."""
    if key in ("relu", "sigmoid", "tanh"):
        return {"x": activation_backward(dy, y, act=key)}
    if key == "leaky_relu":
        return {"x": activation_backward(dy, x, act="leaky_relu", act_param=SLOPE)}
    if key == "add":
        return {"x": dy, "b": dy}  # add passes dy through: no kernel
    if key == "add_scalar":
        return {"x": dy}
    if key == "mul":
        return {"x": mul_backward(dy, b), "b": mul_backward(dy, x)}
    if key == "scalar_mul":
        return {"x": mul_backward(dy, -1.5)}
    if key == "sub":
        return {"x": dy, "b": mul_backward(dy, -1.0)}
    return {"x": mul_backward(dy, -1.0)}  # scalar_sub


@pytest.mark.parametrize("numel", [1, 7, 1003])
@pytest.mark.parametrize("key", list(OPS))
def test_pointwise_op_and_grad_match_torch(key, numel):
    op, args, param, ref_fn = OPS[key]
    x, b, dy = random_input(numel), torch.randn(numel), torch.randn(numel)
    inputs = {n: t for n, t in (("x", x), ("b", b)) if n in args}
    y = pointwise([PwStep(f"%2 {op}", "v2", op, args, param)], inputs, ["v2"], (numel,))["v2"]

    x64, b64 = leaf(x), leaf(b)
    ref = ref_fn(x64, b64)
    ref.backward(dy.double())
    assert rel_err(y, ref) <= TOL
    refs = {"x": x64.grad, "b": b64.grad}
    for name, g in our_grads(key, dy, x, b, y).items():
        assert rel_err(g, refs[name]) <= TOL, name


@pytest.mark.parametrize("target", ["interp", "gpu"], ids=["interp_blocks", "nvidia_blocks"])
def test_fused_chain_with_several_outputs_and_grads_match_torch(target):
    # v1 = 0.5*x; v2 = v1 + b; v3 = tanh v2; v4 = relu v3; v5 = sigmoid(v2) - b
    # v2 is both an output (own upstream grad) and read by tanh and sigmoid: its grads accumulate.
    steps = [
        PwStep("%1 mul", "v1", "mul", ("x", 0.5)),
        PwStep("%2 add", "v2", "add", ("v1", "b")),
        PwStep("%3 tanh", "v3", "tanh", ("v2",)),
        PwStep("%4 relu", "v4", "relu", ("v3",)),
        PwStep("%5 sigmoid", "v5", "sigmoid", ("v2",)),
        PwStep("%6 sub", "v6", "sub", ("v5", "b")),
    ]
    shape = (3, 5, 67)  # 1005 elements: 1 program under the interpreter's configs, 1 + a partial under the GPU's
    x, b = torch.randn(shape) * 2, torch.randn(shape)
    with configs.use_target(target):
        out = pointwise(steps, {"x": x, "b": b}, ["v2", "v3", "v4", "v5", "v6"], shape)
        g2, g4, g6 = torch.randn(shape), torch.randn(shape), torch.randn(shape)
        # Backward in reverse step order, as the compiler's autodiff plan runs it.
        dv5 = g6
        db = mul_backward(g6, -1.0)
        dv3 = activation_backward(g4, out["v4"], act="relu")
        dv2 = g2.clone()
        accumulate_(dv2, activation_backward(dv3, out["v3"], act="tanh"))
        accumulate_(dv2, activation_backward(dv5, out["v5"], act="sigmoid"))
        accumulate_(db, dv2)
        dx = mul_backward(dv2, 0.5)

    x64, b64 = leaf(x), leaf(b)
    v2 = 0.5 * x64 + b64
    v3 = torch.tanh(v2)
    v4 = torch.relu(v3)
    v5 = torch.sigmoid(v2)
    v6 = v5 - b64
    for name, ref in {"v2": v2, "v3": v3, "v4": v4, "v5": v5, "v6": v6}.items():
        assert rel_err(out[name], ref) <= TOL, name
    ((v2 * g2.double()).sum() + (v4 * g4.double()).sum() + (v6 * g6.double()).sum()).backward()
    assert rel_err(dx, x64.grad) <= TOL
    assert rel_err(db, b64.grad) <= TOL


def test_generated_source_labels_each_step_and_names_temporaries():
    steps = (
        PwStep("%1 mul", "v1", "mul", ("x", 0.5)),
        PwStep("%2 prelu", "v2", "prelu", ("v1", "w"), channels=3, inner=4),
        PwStep("%3 leaky_relu", "v3", "leaky_relu", ("v2",), 0.2),
    )
    text = generate(PointwiseSpec("fnn_pw_src", header("fnn_pw_src", ["%1 mul"], ["m"], "kernels/activation.py"),
                                  24, ("x", "w"), steps, ("v3",)))
    assert text.startswith("# fusednn generated kernel fnn_pw_src\n")
    lines = [ln.strip() for ln in text.splitlines()]
    for s in steps:
        i = lines.index(f"# {s.label}")
        assert any(ln.startswith(f"{s.out} = ") for ln in lines[i + 1:i + 3]), s.label
    assert lines.index("# %1 mul") < lines.index("# %2 prelu") < lines.index("# %3 leaky_relu")
    assert "tl.store(v3_ptr + offs, v3, mask=mask)" in lines
    assert not any(ln.startswith(("tl.store(v1_ptr", "tl.store(v2_ptr")) for ln in lines)  # only outputs stored
    assert "def launch(x, w, v3, nbytes=None):" in lines


@pytest.mark.parametrize("bad", [
    PwStep("%1 cos", "v1", "cos", ("x",)),  # unknown op
    PwStep("%1 relu", "v1", "relu", ("nope",)),  # undefined value
    PwStep("%1 add", "v1", "add", (1.0, 2.0)),  # no tensor operand
    PwStep("%1 mul", "v1", "mul", ("x", float("inf"))),  # non-finite literal
    PwStep("%1 relu", "mask", "relu", ("x",)),  # shadows a name the kernel uses
])
def test_generate_rejects_malformed_specs(bad):
    with pytest.raises(ValueError):
        generate(PointwiseSpec("fnn_bad", "", 8, ("x",), (bad,), (bad.out,)))


@pytest.mark.parametrize("shape,channels", [
    ((2, 3, 5, 7), 3),  # NCHW, one weight per channel
    ((2, 3, 5, 7), 1),  # one shared weight
    ((1, 4), 4),  # after a linear layer, batch 1: inner = 1
    ((5, 1, 3), 1),
    ((3, 6, 1, 1), 6),
])
def test_prelu_forward_dx_dweight_match_torch(shape, channels):
    inner = 1
    for d in shape[2:]:
        inner *= d
    x, w, dy = random_input(torch.Size(shape).numel()).reshape(shape), torch.randn(channels), torch.randn(shape)
    y = pointwise([PwStep("%2 prelu", "v2", "prelu", ("x", "w"), channels=channels, inner=inner)],
                  {"x": x, "w": w}, ["v2"], shape)["v2"]
    dx, dw = prelu_backward(dy, x, w, channels=channels, inner=inner, needs_dx=True, needs_dw=True)

    x64, w64 = leaf(x), leaf(w)
    ref = F.prelu(x64, w64)
    ref.backward(dy.double())
    assert rel_err(y, ref) <= TOL
    assert rel_err(dx, x64.grad) <= TOL
    assert rel_err(dw, w64.grad) <= TOL
    assert prelu_backward(dy, x, w, channels=channels, inner=inner, needs_dx=False, needs_dw=False) == (None, None)


@pytest.mark.parametrize("target", ["interp", "gpu"], ids=["interp_blocks", "nvidia_blocks"])
def test_prelu_dweight_is_deterministic_and_matches_torch(target):
    # Under the GPU configs (BLOCK 1024) each channel walks 2*45*47 = 4230 elements in 5 steps.
    shape, channels, inner = (2, 3, 45, 47), 3, 45 * 47
    x, w, dy = torch.randn(shape), torch.randn(channels), torch.randn(shape)
    with configs.use_target(target):
        runs = [prelu_backward(dy, x, w, channels=channels, inner=inner, needs_dx=True, needs_dw=True)
                for _ in range(2)]
    assert torch.equal(runs[0][1], runs[1][1])
    assert torch.equal(runs[0][0], runs[1][0])
    x64, w64 = leaf(x), leaf(w)
    F.prelu(x64, w64).backward(dy.double())
    assert rel_err(runs[0][1], w64.grad) <= TOL


@pytest.mark.parametrize("scale", [1e-4, 0.2, 20.0])
def test_tanh_and_sigmoid_stay_accurate_for_tiny_and_large_inputs(scale):
    # Near 0, tanh = (1 - e)/(1 + e) with e = exp(-2|x|) would lose everything to cancellation
    # (relative error 6e-4 at |x| = 1e-4); large |x| must saturate without overflow.
    x = torch.randn(1001) * scale
    out = pointwise([PwStep("%1 tanh", "v1", "tanh", ("x",)), PwStep("%2 sigmoid", "v2", "sigmoid", ("x",))],
                    {"x": x}, ["v1", "v2"], x.shape)
    assert rel_err(out["v1"], torch.tanh(x.double())) <= TOL
    assert rel_err(out["v2"], torch.sigmoid(x.double())) <= TOL


UNARY_REFS = {
    "relu": (lambda x: torch.relu(x), lambda dy, x, y: activation_backward(dy, y, act="relu")),
    "leaky_relu": (lambda x: F.leaky_relu(x, SLOPE),
                   lambda dy, x, y: activation_backward(dy, x, act="leaky_relu", act_param=SLOPE)),
    "sigmoid": (lambda x: torch.sigmoid(x), lambda dy, x, y: activation_backward(dy, y, act="sigmoid")),
    "tanh": (lambda x: torch.tanh(x), lambda dy, x, y: activation_backward(dy, y, act="tanh")),
}


@pytest.mark.parametrize("op", list(UNARY_REFS))
def test_activation_propagates_nan_and_inf_as_torch(op):
    ref_fn, bwd = UNARY_REFS[op]
    x = torch.tensor(SPECIALS)
    dy = torch.randn(x.shape)
    y = pointwise([PwStep(f"%1 {op}", "v1", op, ("x",), SLOPE if op == "leaky_relu" else 0.0)],
                  {"x": x}, ["v1"], x.shape)["v1"]
    x64 = leaf(x)
    ref = ref_fn(x64)
    ref.backward(dy.double())
    assert_matches(y, ref)
    assert_matches(bwd(dy, x, y), x64.grad)


def test_prelu_and_scalar_ops_propagate_nan_and_inf_as_torch():
    x = torch.tensor(SPECIALS)
    w = torch.tensor([0.25])
    dy = torch.randn(x.shape)
    steps = [PwStep("%1 prelu", "v1", "prelu", ("x", "w")), PwStep("%2 mul", "v2", "mul", ("x", -1.5)),
             PwStep("%3 sub", "v3", "sub", (0.75, "x")), PwStep("%4 add", "v4", "add", ("x", 2.5))]
    out = pointwise(steps, {"x": x, "w": w}, ["v1", "v2", "v3", "v4"], x.shape)
    x64, w64 = leaf(x), leaf(w)
    ref = F.prelu(x64, w64)
    ref.backward(dy.double())
    assert_matches(out["v1"], ref)
    assert_matches(out["v2"], -1.5 * x64)
    assert_matches(out["v3"], 0.75 - x64)
    assert_matches(out["v4"], x64 + 2.5)
    dx, dw = prelu_backward(dy, x, w, channels=1, inner=1, needs_dx=True, needs_dw=True)
    assert_matches(dx, x64.grad)
    assert_matches(dw, w64.grad)


# ----------------------------------------------------------------------------------------------------
# The interpreter does not run Triton's compiler: compile every kernel for sm_90 in a subprocess with
# TRITON_INTERPRET=0 (here with triton 3.9; .ci/aot_triton36.sh runs the same test under triton 3.6).
# ----------------------------------------------------------------------------------------------------

_AOT_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusednn.compiler.source import load
    from fusednn.kernels import activation as A

    def compile(fn, constexprs, floats=(), ints=("numel", "channels", "inner", "per_channel")):
        sig = {}
        for a in fn.arg_names:
            if a in constexprs:
                sig[a] = "constexpr"
            elif a.endswith("_ptr"):
                sig[a] = "*fp32"
            else:
                sig[a] = "fp32" if a in floats else "i32"
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        assert k.asm["cubin"], fn.__name__

    for act in ("relu", "leaky_relu", "sigmoid", "tanh"):
        compile(A._activation_bwd_dx_kernel, {"ACT": act, "BLOCK": 1024}, floats=("p0", "p1", "p2"))
    compile(A._prelu_bwd_dx_kernel, {"BLOCK": 1024})
    compile(A._prelu_bwd_dw_kernel, {"BLOCK": 1024})
    for is_tensor in (True, False):
        compile(A._mul_bwd_dx_kernel, {"OTHER_IS_TENSOR": is_tensor, "BLOCK": 1024}, floats=("other_scalar",))
    compile(A._add_kernel, {"BLOCK": 1024})
    mod = load(open(sys.argv[1]).read(), "fnn_pw_aot")
    compile(mod.fnn_pw_aot, {"BLOCK": 1024})
    print("ok")
    """
)


@pytest.mark.aot
def test_pointwise_and_activation_kernels_compile_for_sm90(tmp_path):
    steps = (
        PwStep("%1 mul", "v1", "mul", ("x", 0.5)), PwStep("%2 add", "v2", "add", ("v1", "b")),
        PwStep("%3 sub", "v3", "sub", (1.0, "v2")), PwStep("%4 tanh", "v4", "tanh", ("v3",)),
        PwStep("%5 sigmoid", "v5", "sigmoid", ("v4",)), PwStep("%6 relu", "v6", "relu", ("v5",)),
        PwStep("%7 leaky_relu", "v7", "leaky_relu", ("v6",), 0.01),
        PwStep("%8 prelu", "v8", "prelu", ("v7", "w"), channels=6, inner=784),
        PwStep("%9 prelu", "v9", "prelu", ("v8", "w1")),
    )
    text = generate(PointwiseSpec("fnn_pw_aot", header("fnn_pw_aot", ["%1 mul"], ["m"], "kernels/activation.py"),
                                  64 * 6 * 784, ("x", "b", "w", "w1"), steps, ("v2", "v9")))
    src = tmp_path / "fnn_pw_aot.txt"
    src.write_text(text)
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, str(src)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
