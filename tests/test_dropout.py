"""Dropout: generated forward (compiler/templates/dropout.py) and its backward (kernels/dropout.py), which
regenerates the forward's mask from the seed."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fusednn.compiler import configs
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.dropout import DropoutSpec, generate
from fusednn.kernels.dropout import dropout_backward
from fusednn.launch import recording
from tests.helpers import rel_err


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Generate, load and launch the dropout forward for x; asserts it is one kernel launch."""
    name = "fnn_dropout_test"
    spec = DropoutSpec(name, header(name, ["%3 dropout"], ["drop"], "kernels/dropout.py"), ("%3 dropout",),
                       x.numel(), p)
    y = torch.empty_like(x)
    with recording() as launches:
        load(generate(spec), name).launch(x, y, seed)
    assert len(launches) == 1
    return y


def nonzero_input(shape) -> torch.Tensor:
    """Random values bounded away from 0, so y != 0 identifies exactly the kept elements."""
    x = torch.rand(shape) + 0.5
    return torch.where(torch.rand(shape) < 0.5, -x, x)


def new_seed() -> int:
    return int(torch.randint(0, 2**62, ()))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.8])
def test_dropout_keeps_fraction_near_one_minus_p(p):
    n = 2**16 + 3
    keep = dropout(nonzero_input(n), p, new_seed()) != 0
    # The kept count is Binomial(n, 1-p): allow 6 standard deviations (a false failure is < 1e-8 likely).
    assert abs(keep.double().mean().item() - (1 - p)) <= 6 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("numel", [1, 7, 1003])
@pytest.mark.parametrize("p", [0.25, 0.6])
def test_dropout_kept_values_and_grad_are_scaled_by_one_over_one_minus_p(p, numel):
    x, dy, seed = nonzero_input((numel,)), torch.randn(numel), new_seed()
    y = dropout(x, p, seed)
    keep = y != 0
    scale = 1.0 / (1.0 - p)
    # Kept values are x * (1/(1-p)) bit for bit (torch's form, x * mask * scale); dropped values are 0.
    assert torch.equal(y[keep], x[keep] * scale)
    assert torch.equal(y[~keep], torch.zeros_like(y[~keep]))
    assert rel_err(y, x.double() * keep / (1 - p)) <= 1e-5
    # The backward regenerates the forward's mask from the seed: dx = dy * mask / (1-p).
    dx = dropout_backward(dy, seed, p=p)
    assert torch.equal(dx, dy * torch.where(keep, scale, 0.0))
    x64 = x.double().requires_grad_()
    (x64 * keep / (1 - p)).backward(dy.double())
    assert rel_err(dx, x64.grad) <= 1e-5


def test_dropout_mask_depends_on_seed_and_index_only():
    x, p = nonzero_input((3, 1001)), 0.5
    seed = new_seed()
    keep = dropout(x, p, seed) != 0
    assert torch.equal(dropout(x, p, seed) != 0, keep)  # same seed: same mask
    # Other seeds, also differing only in the high 32 bits, give other masks (P(equal) = 2**-3003).
    masks = [keep] + [dropout(x, p, s) != 0 for s in (seed ^ 1, seed ^ (1 << 40))]
    assert not any(torch.equal(masks[i], masks[j]) for i in range(3) for j in range(i))
    # The backward under the GPU's 1024-wide blocks (3 programs) sees the same mask as the forward's
    # single interpreter program: the mask is a function of the element index, not of the launch.
    with configs.use_target("gpu"):
        dx = dropout_backward(torch.ones_like(x), seed, p=p)
    assert torch.equal(dx != 0, keep)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")  # inf * 0, on purpose
@pytest.mark.parametrize("p", [0.0, 1.0])
def test_dropout_p_zero_copies_and_p_one_zeroes_as_torch(p):
    x = torch.randn(2, 3, 7)
    x[0, 0, :3] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    dy = torch.randn(x.shape)
    y = dropout(x, p, new_seed())
    dx = dropout_backward(dy, new_seed(), p=p)
    # torch multiplies by the mask, so with p = 1 a NaN or inf input gives NaN, not 0.
    torch.testing.assert_close(y, F.dropout(x, p, training=True), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(dx, dy if p == 0 else torch.zeros_like(dy))


@pytest.mark.parametrize("p", [-0.1, 1.5])
def test_dropout_rejects_p_outside_unit_interval(p):
    with pytest.raises(ValueError):
        generate(DropoutSpec("fnn_bad", "", (), 8, p))
    with pytest.raises(ValueError):
        dropout_backward(torch.zeros(8), 0, p=p)


def test_generated_dropout_source_imports_the_shared_mask_and_labels_its_block():
    text = generate(DropoutSpec("fnn_dropout_src", header("fnn_dropout_src", ["%3 dropout"], ["drop"],
                                                          "kernels/dropout.py"), ("%3 dropout",), 10, 0.5))
    lines = [ln.strip() for ln in text.splitlines()]
    assert text.startswith("# fusednn generated kernel fnn_dropout_src\n")
    assert "from fusednn.kernels.dropout import _dropout_keep, check_seed" in lines
    assert lines[lines.index("# %3 dropout") + 1].startswith("keep = _dropout_keep(seed, offs, 0.5)")
    assert "def launch(x, y, seed: int, nbytes=None):" in lines


_AOT_SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from fusednn.compiler.source import load
    from fusednn.kernels.dropout import _dropout_bwd_dx_kernel, dropout_scale

    def compile(fn, constexprs):
        sig = {a: "constexpr" if a in constexprs else "*fp32" if a.endswith("_ptr") else "i64" if a == "seed"
               else "i32" for a in fn.arg_names}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs), target=GPUTarget("cuda", 90, 32))
        assert k.asm["cubin"], fn.__name__

    for p in (0.0, 0.3, 1.0):
        for channelwise in (False, True):
            compile(_dropout_bwd_dx_kernel, {"CHANNELWISE": channelwise, "P": p, "SCALE": dropout_scale(p),
                                             "BLOCK": 1024})
    for i, path in enumerate(sys.argv[1:]):
        mod = load(open(path).read(), f"fnn_dropout_aot{i}")
        compile(getattr(mod, f"fnn_dropout_aot{i}"), {"BLOCK": 1024})
    print("ok")
    """
)


@pytest.mark.aot
def test_dropout_kernels_compile_for_sm90(tmp_path):
    # Triton's interpreter skips the compiler: compile for sm_90 in a subprocess with TRITON_INTERPRET=0
    # (triton 3.9 here; .ci/aot_triton36.sh runs it under triton 3.6).
    paths = []
    for i, (p, inner) in enumerate(((0.0, 0), (0.3, 0), (1.0, 0), (0.3, 49))):  # inner 49: dropout2d
        name = f"fnn_dropout_aot{i}"
        path = tmp_path / f"{name}.txt"
        path.write_text(generate(DropoutSpec(name, header(name, ["%3 dropout"], ["drop"], "kernels/dropout.py"),
                                             ("%3 dropout",), 50000, p, inner)))
        paths.append(str(path))
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    out = subprocess.run([sys.executable, "-c", _AOT_SCRIPT, *paths], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# -- dropout2d (nn.Dropout2d): one mask value per (n, c) ------------------------------------------------
class Drop2d(torch.nn.Module):
    def __init__(self, p):
        super().__init__()
        self.drop = torch.nn.Dropout2d(p)

    def forward(self, x):
        return self.drop(x) * 1.0  # the graph output is not the dropout itself (eval: an identity)


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("shape", [(3, 5, 4, 7), (2, 6, 9), (1, 1, 1, 1)], ids=["4d", "3d-ncl", "1-element"])
def test_dropout2d_masks_whole_channels_and_grad_uses_the_same_mask(shape, fuse):
    import fusednn

    p = 0.4
    c = fusednn.compile(Drop2d(p), fuse=fuse)
    x = nonzero_input(shape).requires_grad_()
    y = c(x)
    keep = (y != 0).detach()
    k = keep.reshape(shape[0], shape[1], -1)
    assert torch.equal(k, k[:, :, :1].expand_as(k))  # one mask value per (n, c)
    assert torch.allclose(y, x * keep / (1 - p), rtol=1e-6, atol=0)
    dy = torch.randn(shape)
    y.backward(dy)
    assert torch.allclose(x.grad, dy * keep / (1 - p), rtol=1e-6, atol=0)
    assert "dropout2d" in [n.op for n in c.fused_graph.nodes]


def test_dropout2d_drops_about_p_of_the_channels_and_eval_is_identity():
    import fusednn

    m = Drop2d(0.3)
    x = nonzero_input((64, 32, 2, 2))
    kept = (fusednn.compile(m)(x) != 0).reshape(64, 32, -1)[:, :, 0].float().mean().item()
    assert abs(kept - 0.7) < 0.05
    c = fusednn.compile(m.eval())
    assert torch.equal(c(x), x) and "dropout2d" not in [n.op for n in c.fused_graph.nodes]
