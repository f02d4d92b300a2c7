"""linear_relu stem: the generated forward GEMM (compiler/templates/linear.py) and the hand-written backward
(kernels/linear_relu.py) against float64 torch, on fresh random inputs."""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fusednn.compiler import configs
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.linear import LinearSpec, generate
from fusednn.kernels.activation import saves_input
from fusednn.kernels.linear_relu import linear_relu_backward
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err

ACTS = ["none", "relu", "leaky_relu", "sigmoid", "tanh"]
SLOPE = 0.2  # not torch's default 0.01, so a kernel that ignores act_param fails
TOL = 1e-5  # fp32 with ieee tl.dot against float64


# activations whose act' needs their input: the training forward saves z for the backward (saves_input)
INPUT_ACTS = ["gelu", "gelu_tanh", "silu", "mish", "hardswish", "hardsigmoid", "softsign", "tanhshrink",
              "logsigmoid"]


def make_spec(M: int, N: int, K: int, bias: bool, act: str, precision: str = "ieee") -> LinearSpec:
    labels = ("%7 linear",) if act == "none" else ("%7 linear", f"%8 {act}")
    name = "fnn_linear_relu_0"
    modules = ["fc1"] if act == "none" else ["fc1", f"F.{act}"]
    return LinearSpec(name, header(name, list(labels), modules, "kernels/linear_relu.py"), labels,
                      M, N, K, bias, act, SLOPE, precision, save_input=saves_input(act))


def torch_act(z: torch.Tensor, act: str) -> torch.Tensor:
    if act == "leaky_relu":
        return F.leaky_relu(z, SLOPE)
    if act == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if act in INPUT_ACTS:
        return getattr(F, act)(z)
    return {"none": lambda v: v, "relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh}[act](z)


def make_inputs(M: int, N: int, K: int, bias: bool, positive: bool = False):
    """fp32 x, w, b with z = x @ w.T + b of standard deviation ~0.6.

    Why so small: act' is read from the fp32 y, and where tanh or sigmoid saturate (|z| > ~2.7) one
    rounding of y already moves 1 - y² by more than 1e-5 relative, a limit of the contract, not a bug.
    positive=True draws every input from [0.1, 1) (w / K): sums of positive terms never cancel, which
    keeps a 1-element output (a 1-wide layer) well conditioned.
    """
    if positive:
        x = 0.1 + 0.9 * torch.rand(M, K)
        w = (0.1 + 0.9 * torch.rand(N, K)) / K
        b = 0.1 + 0.4 * torch.rand(N) if bias else None
        return x, w, b
    x = torch.randn(M, K)
    w = 0.5 * torch.randn(N, K) / math.sqrt(K)
    b = 0.25 * torch.randn(N) if bias else None
    return x, w, b


def forward(spec: LinearSpec, x, w, b) -> torch.Tensor:
    return forward_saving(spec, x, w, b)[0]


def forward_saving(spec: LinearSpec, x, w, b) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y, and z where the spec saves it for act' (else None)."""
    y = torch.empty(spec.M, spec.N)
    z = torch.empty(spec.M, spec.N) if spec.save_input else None
    load(generate(spec), spec.name).launch(x, w, b, y, z)
    return y, z


def reference(x, w, b, act, dy):
    """y and (dx, dw, db) from torch autograd in float64."""
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    b64 = b.double().requires_grad_() if b is not None else None
    y = torch_act(F.linear(x64, w64, b64), act)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad, (b64.grad if b is not None else None)


def check_stem(M: int, N: int, K: int, bias: bool, act: str, x=None, w=None, b=None,
               positive: bool = False) -> None:
    """Forward and every gradient of the stem match float64 torch."""
    if x is None:
        x, w, b = make_inputs(M, N, K, bias, positive)
    y, z = forward_saving(make_spec(M, N, K, bias, act), x, w, b)
    dy = 0.1 + torch.rand(M, N) if positive else torch.randn(M, N)
    y_ref, dx_ref, dw_ref, db_ref = reference(x, w, b, act, dy)
    dx, dw, db = linear_relu_backward(dy, x, w, y if z is None else z, act=act, act_param=SLOPE,
                                      needs_dx=True, needs_dw=True, needs_db=bias)
    assert rel_err(y, y_ref) <= TOL
    if z is not None:  # the saved z is the linear's result
        assert rel_err(z, F.linear(x.double(), w.double(), None if b is None else b.double())) <= TOL
    assert rel_err(dx, dx_ref) <= TOL
    assert rel_err(dw, dw_ref) <= TOL
    if bias:
        assert rel_err(db, db_ref) <= TOL
    else:
        assert db is None


@pytest.mark.parametrize("z_max", [3e-3, 0.3])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ["tanh", "sigmoid"])
def test_linear_tanh_sigmoid_small_preactivations_match_torch(act, bias, z_max):
    # |z| < 0.3 is where tanh's (1 - e)/(1 + e), e = exp(-2|z|), cancels (3.6e-5 relative once fused):
    # the epilogue must evaluate the activation as the pointwise kernel does (kernels/activation.py).
    M, N, K = 37, 23, 45
    x, w, b = make_inputs(M, N, K, bias)
    z = F.linear(x.double(), w.double(), b.double() if bias else None)
    s = 0.9 * z_max / z.abs().max().item()
    check_stem(M, N, K, bias, act, x, w * s, b * s if bias else None)


def well_conditioned(M: int, N: int, K: int, bias: bool) -> bool:
    """Every output either has >= 3 elements or is a single product (no sum that can cancel to ~0).

    A 1-element sum of signed random terms lands near 0 about once in a few hundred draws, and then its
    fp32 rounding exceeds 1e-5 of it; with 3 elements, all of them must do so at once."""
    return (M * N >= 3 and (M * K >= 3 or N == 1) and (N * K >= 3 or M == 1)
            and (not bias or N >= 3 or M == 1))


# (M, N, K): M = 1, K = 1, LeNet's fc shapes, and sizes past the interpreter's tile caps
# (N > 128, K > 256, M > 256) so that every kernel loops over its reduction and tiles its output.
SHAPES = [(1, 3, 17), (7, 5, 1), (3, 10, 84), (17, 84, 120), (1, 120, 400), (300, 130, 257)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_linear_act_forward_and_grads_match_torch(shape, bias, act):
    assert well_conditioned(*shape, bias)
    check_stem(*shape, bias, act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 1, 7), (1, 1, 9), (6, 2, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_linear_act_one_wide_matches_torch(shape, act):
    """1-wide layers (N = 1, M = N = 1, ...) with bias, on positive inputs (see make_inputs)."""
    check_stem(*shape, True, act, positive=True)


@pytest.mark.parametrize("act", INPUT_ACTS)
@pytest.mark.parametrize("shape", [(3, 10, 84), (300, 130, 257)], ids=lambda s: "x".join(map(str, s)))
def test_linear_act_that_reads_its_input_saves_z_and_matches_torch(shape, act):
    check_stem(*shape, True, act)


def split_in_3(tiles: int, steps: int) -> int:
    """configs.split_k stand-in: 3 slices whatever the GPU heuristic says (19 steps -> 7 + 7 + 5)."""
    return 3


@pytest.mark.parametrize("act", ["relu", "sigmoid", "gelu"])
def test_linear_act_matches_torch_with_gpu_tiles(act, monkeypatch):
    """The GPU's small tiles (run here in the interpreter): several program groups along M, N tiles,
    K loops, and a dw reduction over M split into 3 slices added by a second kernel."""
    monkeypatch.setattr(configs, "split_k", split_in_3)
    with configs.use_target("gpu"):
        check_stem(150, 70, 40, True, act)
        check_stem(600, 20, 24, True, act)
        with recording() as launches:
            x, w, _ = make_inputs(600, 20, 24, False)
            dy, y = torch.randn(600, 20), torch.rand(600, 20)
            linear_relu_backward(dy, x, w, y, act=act, act_param=0.0, needs_dx=False, needs_dw=True,
                                 needs_db=True)
    assert [kernel_name(l.kernel) for l in launches] == [
        "_linear_relu_bwd_dw_kernel", "_sum_to_kernel"]
    assert launches[0].grid[2] == 3  # split over M


@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear_act_tie_at_zero_matches_torch(bias, act):
    """z exactly 0 (zero weight rows and their bias; zero input rows without bias): ReLU's derivative there
    is 0, leaky ReLU's is the slope, as in torch."""
    M, N, K = 9, 12, 20
    x, w, b = make_inputs(M, N, K, bias)
    w[[0, 5, 11]] = 0.0
    if bias:
        b[[0, 5, 11]] = 0.0
    else:
        x[[2, 7]] = 0.0
    z = F.linear(x.double(), w.double(), b.double() if bias else None)
    assert (z == 0).sum() >= 3 * M  # the ties are there
    check_stem(M, N, K, bias, act, x, w, b)


def test_relu_grad_at_zero_is_zero():
    """Columns of z that are exactly 0 get no weight or bias gradient through ReLU."""
    M, N, K = 7, 6, 33
    x, w, b = make_inputs(M, N, K, True)
    w[[1, 4]] = 0.0
    b[[1, 4]] = 0.0
    y = forward(make_spec(M, N, K, True, "relu"), x, w, b)
    _, dw, db = linear_relu_backward(torch.randn(M, N), x, w, y, act="relu", act_param=0.0,
                                     needs_dx=False, needs_dw=True, needs_db=True)
    assert torch.all(dw[[1, 4]] == 0) and torch.all(db[[1, 4]] == 0)


# ids avoid the bare word "gpu": conftest skips tests whose keywords contain it
@pytest.mark.parametrize("target", ["interp", "gpu"], ids=["interp_tiles", "gpu_tiles_split"])
def test_linear_relu_backward_is_deterministic(target, monkeypatch):
    """Two backward passes give bit-identical gradients (fixed-order reductions, split or not)."""
    M, N, K = (300, 40, 50) if target == "interp" else (600, 20, 24)
    if target == "gpu":
        monkeypatch.setattr(configs, "split_k", split_in_3)
    x, w, b = make_inputs(M, N, K, True)
    dy = torch.randn(M, N)
    y = torch.sigmoid(F.linear(x, w, b))
    with configs.use_target(target):
        first = linear_relu_backward(dy, x, w, y, act="sigmoid", act_param=0.0,
                                     needs_dx=True, needs_dw=True, needs_db=True)
        second = linear_relu_backward(dy, x, w, y, act="sigmoid", act_param=0.0,
                                      needs_dx=True, needs_dw=True, needs_db=True)
    for a, b_ in zip(first, second):
        assert torch.equal(a, b_)


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (False, True, True), (True, True, True), (False, False, False)])
def test_linear_relu_backward_launches_only_what_is_needed(needs):
    """One kernel per kind of gradient asked for (dw and db share one); the results equal a full run's."""
    M, N, K = 13, 21, 35
    x, w, b = make_inputs(M, N, K, True)
    dy = torch.randn(M, N)
    y = F.relu(F.linear(x, w, b))
    full = linear_relu_backward(dy, x, w, y, act="relu", act_param=0.0,
                                needs_dx=True, needs_dw=True, needs_db=True)
    with recording() as launches:
        part = linear_relu_backward(dy, x, w, y, act="relu", act_param=0.0,
                                    needs_dx=needs[0], needs_dw=needs[1], needs_db=needs[2])
    expected = (["_linear_relu_bwd_dx_kernel"] * needs[0]
                + ["_linear_relu_bwd_dw_kernel"] * (needs[1] or needs[2]))
    assert [kernel_name(l.kernel) for l in launches] == expected
    for wanted, got, ref in zip(needs, part, full):
        if wanted:
            assert torch.equal(got, ref)
        else:
            assert got is None


def test_generated_source_has_header_and_labels():
    spec = make_spec(4, 6, 8, True, "relu")
    text = generate(spec)
    assert text.startswith(spec.header)
    assert spec.header.splitlines()[1] == "# implements: %7 linear, %8 relu   (module: fc1, F.relu)"
    body = text.splitlines()
    i_linear, i_relu = body.index("    # %7 linear"), body.index("    # %8 relu")
    assert i_linear < i_relu
    assert "def fnn_linear_relu_0(" in text and "\ndef launch(x, w, b, y, z=None, nbytes=None):" in text
    assert "v7 = acc + b[None, :]" in text and "v8 = " in text  # temporaries carry IR names
    no_bias = generate(make_spec(4, 6, 8, False, "none"))
    assert "b_ptr" not in no_bias and "# %8" not in no_bias and "    # %7 linear" in no_bias
    compile(text, spec.name, "exec")


def test_generated_launch_rejects_wrong_shapes():
    spec = make_spec(4, 6, 8, True, "tanh")
    mod = load(generate(spec), spec.name)
    x, w, b = make_inputs(4, 6, 8, True)
    with pytest.raises(ValueError, match="fnn_linear_relu_0"):
        mod.launch(x, w, None, torch.empty(4, 6))  # the spec has a bias
    with pytest.raises(ValueError, match="fnn_linear_relu_0"):  # any row count, but the same in x and y
        mod.launch(x[:3], w, b, torch.empty(4, 6))
    with pytest.raises(ValueError, match="fnn_linear_relu_0"):
        mod.launch(x[:, :7], w, b, torch.empty(4, 6))


def test_generate_rejects_bad_specs():
    good = make_spec(4, 6, 8, True, "relu")
    for bad in [dict(act="elu"), dict(act="hardtanh"), dict(save_input=True), dict(precision="bf16"),
                dict(labels=("%7 linear",)), dict(act="leaky_relu", act_param=-0.1), dict(K=0)]:
        with pytest.raises(ValueError):
            generate(dataclasses.replace(good, **bad))


def test_precision_reaches_every_kernel():
    """precision="tf32" is passed to each tl.dot as the PRECISION constexpr (the interpreter's tl.dot
    ignores it, so this checks the launches instead of the numbers)."""
    M, N, K = 5, 7, 9
    x, w, b = make_inputs(M, N, K, True)
    mod = load(generate(make_spec(M, N, K, True, "relu", "tf32")), "fnn_linear_relu_0")
    with recording(execute=False) as launches:
        mod.launch(x, w, b, torch.empty(M, N))
        linear_relu_backward(torch.randn(M, N), x, w, torch.rand(M, N), act="relu", act_param=0.0,
                             needs_dx=True, needs_dw=True, needs_db=True, precision="tf32")
    assert len(launches) == 3
    assert all(l.meta["PRECISION"] == "tf32" for l in launches)


def test_linear_relu_backward_rejects_bad_arguments():
    x, w, _ = make_inputs(4, 6, 8, False)
    dy = torch.randn(4, 6)
    kw = dict(act_param=0.0, needs_dx=True, needs_dw=True, needs_db=False)
    with pytest.raises(ValueError, match="act"):
        linear_relu_backward(dy, x, w, dy, act="elu", **kw)  # parameters: not an epilogue's
    with pytest.raises(ValueError, match="needs the forward output"):
        linear_relu_backward(dy, x, w, None, act="relu", **kw)
    with pytest.raises(ValueError, match="shapes"):
        linear_relu_backward(dy[:, :5], x, w, dy[:, :5], act="relu", **kw)
    dx, dw, _ = linear_relu_backward(dy, x, w, None, act="none", **kw)  # act' = 1 needs no y
    assert rel_err(dx, dy.double() @ w.double()) <= TOL and rel_err(dw, dy.double().T @ x.double()) <= TOL


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(M=st.integers(1, 40), N=st.integers(1, 40), K=st.integers(1, 70), bias=st.booleans(),
       act=st.sampled_from(ACTS))
def test_linear_act_matches_torch_hypothesis(M, N, K, bias, act):
    assume(well_conditioned(M, N, K, bias))
    check_stem(M, N, K, bias, act)


_AOT_SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fusednn.compiler import configs
    from fusednn.compiler.source import load
    from fusednn.kernels import linear_relu as lr
    from tests.test_linear_relu import generate, make_spec

    def build(fn, consts, dot=True):
        sig = {a: "constexpr" if a in consts else "*fp32" if a.endswith("_ptr") else
               "fp32" if a == "slope" else "i32" for a in fn.arg_names}
        ttir = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32)).asm["ttir"]
        assert ("tt.dot" in ttir) == dot, fn.__name__

    M, N, K = 64, 120, 400  # LeNet's fc1 at batch 64
    with configs.use_target("gpu"):
        for bias, act in [(True, "relu"), (False, "tanh"), (True, "gelu")]:  # gelu: z saved too
            spec = make_spec(M, N, K, bias, act)
            c = configs.gemm(M, N, K)
            build(getattr(load(generate(spec), spec.name), spec.name),
                  dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"], GROUP_M=8,
                       PRECISION="ieee"))
        c = configs.gemm(M, K, N)
        for act in ("leaky_relu", "gelu"):
            build(lr._linear_relu_bwd_dx_kernel, dict(ACT=act, BLOCK_M=c["BLOCK_M"],
                  BLOCK_K=c["BLOCK_N"], BLOCK_N=c["BLOCK_K"], PRECISION="tf32"))
        c = configs.gemm(N, K, M)
        blocks = dict(BLOCK_N=c["BLOCK_M"], BLOCK_K=c["BLOCK_N"], BLOCK_M=c["BLOCK_K"], PRECISION="ieee")
        build(lr._linear_relu_bwd_dw_kernel, dict(ACT="sigmoid", HAS_DW=True, HAS_DB=True, **blocks))
        build(lr._linear_relu_bwd_dw_kernel, dict(ACT="silu", HAS_DW=True, HAS_DB=True, **blocks))
        build(lr._linear_relu_bwd_dw_kernel, dict(ACT="none", HAS_DW=False, HAS_DB=True, y_ptr=None,
              dw_ptr=None, **blocks), dot=False)
    print("compiled for sm_90 with triton", triton.__version__)
    """
)


@pytest.mark.aot
def test_linear_relu_kernels_compile_for_sm90(tmp_path):
    """Triton's compiler (not run by the interpreter) accepts every kernel of the stem for sm_90 with the
    GPU's launch configs: tl.dot operand sizes, constexpr branches, None pointers."""
    pytest.importorskip("triton.backends.nvidia")
    env = dict(os.environ, TRITON_INTERPRET="0", FUSEDNN_CACHE_DIR=str(tmp_path),
               TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_DEFAULT_FP_FUSION="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "compiled for sm_90" in run.stdout


def test_a_linear_that_saves_z_in_training_and_not_in_inference_shows_both_kernels():
    """Training writes z for GELU's backward; calls autograd does not record run a kernel that saves nothing.
    Both are generated kernels with their own names: kernels() (and a dump) show each source."""
    import fusednn

    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    c = fusednn.compile(m)
    x = torch.randn(4, 6)
    c(x.requires_grad_()).sum().backward()
    with torch.no_grad():
        y = c(x)
    ks = c.kernels()
    train = [k for k in ks if k.startswith("fnn_linear_relu") and "z_ptr" in ks[k]]
    infer = [k for k in ks if k.startswith("fnn_linear_relu") and "z_ptr" not in ks[k]]
    assert len(train) == 1 and len(infer) == 1 and train != infer, sorted(ks)
    assert rel_err(y, copy.deepcopy(m).double()(x.double())) <= TOL
