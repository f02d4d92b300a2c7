"""Row normalizations (layer_norm, group_norm, instance_norm: compiler/templates/norm.py forward,
kernels/norm.py backward) and the batch norm variants (momentum=None, weight or bias alone), compiled
end to end against torch in float64: forward, every gradient and running statistics, fused and unfused,
on ordinary and ill-conditioned inputs (large mean, small spread), plus PyTorch's own module_db and
op_db samples."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn.tools import aot
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.norm import NormSpec, generate
from fusednn.kernels.norm import norm_backward
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err


def _randomize(m: nn.Module) -> nn.Module:
    """Parameters and running stats away from their init (weight 1, bias 0 make some gradients trivial)."""
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
        for name, b in m.named_buffers():
            if b.is_floating_point():
                b.uniform_(0.5, 1.5)  # positive: a running variance, and updates that do not cancel to ~0
    return m


def _run(fn, x, params):
    """fn(x) and the gradients of x and params for a fixed upstream gradient (same seed every call)."""
    y = fn(x)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    wrt = [t for t in [x, *params] if t.requires_grad]
    grads = torch.autograd.grad(y, wrt, dy, allow_unused=True) if y.requires_grad and wrt else []
    return [y, *grads]


def check_module(m64: nn.Module, x: torch.Tensor, training: bool, fuse: bool = True, runs: int = 2) -> None:
    """Compile a float32 copy of m64 and match torch float64 on output, every gradient and the buffers, over
    `runs` calls (running statistics accumulate); tolerance max(1e-5, 4x torch float32's own error)."""
    m64 = copy.deepcopy(m64).double().train(training)
    m32, t32 = copy.deepcopy(m64).float(), copy.deepcopy(m64).float()
    compiled = fusednn.compile(m32, fuse=fuse)
    x32 = x.detach().float().requires_grad_()
    x64 = x32.detach().double().requires_grad_()
    for _ in range(runs):
        ref = _run(m64, x64, list(m64.parameters()))
        ours = _run(compiled, x32, list(m32.parameters()))
        theirs = _run(t32, x32, list(t32.parameters()))
        assert len(ours) == len(ref)
        for i, (o, r, t) in enumerate(zip(ours, ref, theirs)):
            _close(o, r, t, f"output/grad {i}")
        for (name, o), r, t in zip(m32.named_buffers(), m64.buffers(), t32.buffers()):
            if o.is_floating_point():
                _close(o, r, t, name)
            else:
                assert torch.equal(o, r), name  # num_batches_tracked


def _close(ours: torch.Tensor, ref: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, what
    nan = ref.isnan()
    assert torch.equal(ours.isnan(), nan), f"{what}: NaN where torch has none (or the reverse)"
    if nan.any():  # NaN/Inf propagate as in torch; compare the rest
        ours, ref, theirs = ours[~nan], ref[~nan], theirs[~nan]
    tol = max(1e-5, 4 * rel_err(theirs, ref))
    assert rel_err(ours, ref) <= tol, f"{what}: {rel_err(ours, ref):.3g} > {tol:.3g}"


ILL = lambda shape: 1e4 + 1e-2 * torch.randn(shape)  # noqa: E731  (large mean, small spread)
PLAIN = lambda shape: 2 * torch.randn(shape) + 1  # noqa: E731

CASES = [
    # (module, input shape)
    (lambda: nn.LayerNorm(7), (3, 5, 7)),
    (lambda: nn.LayerNorm([3, 5]), (2, 3, 5)),
    (lambda: nn.LayerNorm(6, elementwise_affine=False), (5, 6)),
    (lambda: nn.LayerNorm(6, bias=False), (5, 6)),
    (lambda: nn.LayerNorm(1), (4, 1)),  # one value per row: y = bias
    (lambda: nn.GroupNorm(3, 6), (2, 6, 3, 5)),
    (lambda: nn.GroupNorm(1, 5, affine=False), (3, 5, 7)),
    (lambda: nn.GroupNorm(4, 4), (1, 4, 3, 3)),
    (lambda: nn.GroupNorm(1, 4), (2, 4, 5)),  # one group: every channel of an image in one row
    (lambda: nn.InstanceNorm2d(3, affine=True), (2, 3, 5, 7)),
    (lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (4, 3, 3, 5)),
    (lambda: nn.InstanceNorm2d(2), (2, 3, 6)),  # an unbatched [C, H, W] image
    (lambda: nn.InstanceNorm1d(4, track_running_stats=True), (3, 4, 9)),
]


@pytest.mark.parametrize("data", [PLAIN, ILL], ids=["plain", "ill-conditioned"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"{CASES[i][0]().__class__.__name__}-{i}")
def test_norm_forward_grads_and_running_stats_match_torch(case, training, data):
    make, shape = CASES[case]
    check_module(_randomize(make()), data(shape), training)


@pytest.mark.parametrize("case", [0, 6, 10], ids=["layer", "group", "instance"])
def test_norm_unfused_matches_torch(case):
    make, shape = CASES[case]
    check_module(_randomize(make()), PLAIN(shape), True, fuse=False)


@pytest.mark.parametrize("make", [lambda: nn.LayerNorm(5), lambda: nn.GroupNorm(2, 4),
                                  lambda: nn.InstanceNorm2d(4, affine=True)], ids=["layer", "group", "instance"])
def test_norm_nan_and_inf_propagate_like_torch(make):
    x = torch.randn(3, 4, 5) if isinstance(make(), nn.LayerNorm) else torch.randn(3, 4, 2, 5)
    x[0].view(-1)[1] = float("nan")
    x[1].view(-1)[2] = float("inf")
    check_module(_randomize(make()), x, True, runs=1)


# -- batch norm variants (forward: compiler/templates/batch_norm.py, backward: kernels/batch_norm.py) ----------
@pytest.mark.parametrize("make", [
    lambda: nn.BatchNorm2d(3, momentum=None),
    lambda: nn.BatchNorm2d(3, bias=False),
    lambda: nn.BatchNorm1d(4, momentum=None),
    lambda: nn.BatchNorm1d(4, bias=False),
], ids=["2d-cumulative", "2d-no-bias", "1d-cumulative", "1d-no-bias"])
def test_batch_norm_variants_match_torch_over_steps(make):
    m = _randomize(make())
    shape = (3, 4, 5) if isinstance(m, nn.BatchNorm1d) else (2, 3, 4, 3)
    check_module(m, PLAIN(shape), True, runs=3)  # the cumulative average's factor is 1, 1/2, 1/3
    check_module(m, PLAIN(shape), False, runs=1)


@pytest.mark.parametrize("which", ["weight", "bias"])
def test_functional_batch_norm_with_weight_or_bias_alone_matches_torch(which):
    C = 3
    p = torch.randn(C, requires_grad=True)
    fn = (lambda x, t: F.batch_norm(x, None, None, t, None, training=True)) if which == "weight" else (
        lambda x, t: F.batch_norm(x, None, None, None, t, training=True))
    x = torch.randn(4, C, 5, requires_grad=True)
    compiled = fusednn.compile(fn)
    ours = _run(lambda x: compiled(x, p), x, [p])
    x64, p64 = x.detach().double().requires_grad_(), p.detach().double().requires_grad_()
    ref = _run(lambda x: fn(x, p64), x64, [p64])
    theirs = _run(lambda x: fn(x, p), x, [p])
    for o, r, t in zip(ours, ref, theirs):
        _close(o, r, t, which)


def test_counter_read_outside_batch_norm_is_refused():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("n", torch.zeros((), dtype=torch.long))

        def forward(self, x):
            self.n.add_(1)
            return x * (1.0 / float(self.n))

    with pytest.raises(fusednn.UnsupportedOpError, match="num_batches_tracked"):
        fusednn.compile(M())(torch.randn(2))


# -- determinism, launches, generated source ---------------------------------------------------------
def test_norm_reruns_are_bit_identical():
    m = _randomize(nn.GroupNorm(2, 6))
    compiled = fusednn.compile(m)
    x = (ILL((3, 6, 5, 7))).requires_grad_()
    first, second = _run(compiled, x, list(m.parameters())), _run(compiled, x, list(m.parameters()))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _spec(G, CPG, INNER, **kw) -> NormSpec:
    name = "fnn_norm_test"
    return NormSpec(name, header(name, ["%2 group_norm"], ["gn"], "kernels/norm.py"), ("%2 group_norm",),
                    G, CPG, INNER, **kw)


def test_norm_launches_one_forward_and_two_backward_kernels():
    spec = _spec(2, 3, 4, weight=True, bias=True)
    x, w, b = torch.randn(5, 6, 4), torch.randn(6), torch.randn(6)
    y, stats = torch.empty_like(x), [torch.empty(10) for _ in range(3)]
    with recording() as launches:
        load(generate(spec), spec.name).launch(x, w, b, None, None, y, *stats)
        norm_backward(torch.randn_like(x), x, w, *stats, G=2, CPG=3, INNER=4, needs_dx=True, needs_dweight=True,
                      needs_dbias=True)
    assert [kernel_name(r.kernel) for r in launches] == [
        "fnn_norm_test", "_norm_bwd_dx_kernel", "_norm_bwd_dwdb_kernel"]


def test_generated_norm_source_has_header_labels_and_launch():
    spec = _spec(3, 1, 5, weight=True, update_running=True)
    text = generate(spec)
    assert text.startswith(spec.header)
    assert "# %2 group_norm\n" in text
    assert f"def {spec.name}(" in text and f"def {spec.name}_running(" in text
    compile(text, spec.name, "exec")


def test_instance_norm_training_with_one_value_per_channel_is_refused_like_torch():
    with pytest.raises(ValueError, match="more than 1"):
        F.instance_norm(torch.randn(2, 3, 1), torch.zeros(3), torch.ones(3), use_input_stats=True)
    with pytest.raises(ValueError, match="more than 1 value"):
        generate(_spec(3, 1, 1, update_running=True))


@pytest.mark.aot
def test_norm_kernels_compile_for_sm90_without_spills():
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(reason)

    def program():
        for G, CPG, INNER, N in [(32, 8, 196, 64), (1, 768, 1, 512), (64, 1, 3136, 8)]:
            spec = _spec(G, CPG, INNER, weight=True, bias=True, update_running=CPG == 1)
            x = torch.empty(N, G * CPG, INNER)
            stats = [torch.empty(N * G) for _ in range(3)]
            w = torch.empty(G * CPG)
            load(generate(spec), spec.name).launch(x, w, w, w, w, x, *stats)
            norm_backward(x, x, w, *stats, G=G, CPG=CPG, INNER=INNER, needs_dx=True, needs_dweight=True,
                          needs_dbias=True)

    compiled = aot.compile_launches(aot.collect(program))
    assert {c.name for c in compiled} >= {"fnn_norm_test", "fnn_norm_test_running", "_norm_bwd_dx_kernel",
                                          "_norm_bwd_dwdb_kernel"}
    for c in compiled:
        assert not c.resources.spills, (c.name, c.resources)


# -- PyTorch's own samples -----------------------------------------------------------------------------
MODULES = ("BatchNorm1d", "BatchNorm2d", "GroupNorm", "LayerNorm", "InstanceNorm1d", "InstanceNorm2d")
# module_db samples fusednn refuses, by (module, desc), with the reason: none today.
REFUSED_MODULE_SAMPLES: dict[tuple[str, str], str] = {}


def _module_samples():
    from torch.testing._internal.common_modules import module_db

    for info in module_db:
        if info.module_cls.__name__ not in MODULES:
            continue
        for training in (True, False):
            samples = info.module_inputs_func(info, device="cpu", dtype=torch.float64, requires_grad=True,
                                              training=training)
            for i, s in enumerate(samples):
                yield pytest.param(info, s, training, id=f"{info.module_cls.__name__}-{s.desc or i}-"
                                   f"{'train' if training else 'eval'}")


@pytest.mark.parametrize("info, sample, training", list(_module_samples()))
def test_module_db_samples_match_torch(info, sample, training):
    c = sample.constructor_input
    m = _randomize(info.module_cls(*c.args, **c.kwargs))
    key = (info.module_cls.__name__, sample.desc)
    if key in REFUSED_MODULE_SAMPLES:
        with pytest.raises(fusednn.UnsupportedOpError):
            check_module(m, sample.forward_input.args[0], training)
        return
    check_module(m, sample.forward_input.args[0], training)


OPS = ("nn.functional.layer_norm", "nn.functional.group_norm", "nn.functional.instance_norm",
       "nn.functional.batch_norm")
# op_db samples fusednn refuses, by (op, sample index), with the reason: none today.
REFUSED_OP_SAMPLES: dict[tuple[str, int], str] = {}


def _op_samples():
    from torch.testing._internal.common_methods_invocations import op_db

    for info in op_db:
        if info.name in OPS and info.variant_test_name == "":
            for i, s in enumerate(info.sample_inputs("cpu", torch.float64, requires_grad=True)):
                yield pytest.param(info, i, s, id=f"{info.name.split('.')[-1]}-{i}")


def _as_function(info, sample):
    """fn(*tensors) calling the op with the sample's tensors (in order) and its other arguments."""
    leaves = [sample.input, *sample.args, *sample.kwargs.values()]
    slots = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    keys = list(sample.kwargs)
    n_args = 1 + len(sample.args)

    def fn(*tensors):
        vals = list(leaves)
        for i, t in zip(slots, tensors):
            vals[i] = t
        return info.op(*vals[:n_args], **dict(zip(keys, vals[n_args:])))

    return fn, [leaves[i] for i in slots]


@pytest.mark.parametrize("info, index, sample", list(_op_samples()))
def test_op_db_samples_match_torch(info, index, sample):
    fn, tensors = _as_function(info, sample)
    # running stats (not differentiable) are updated in place: each run gets its own copies
    t32 = [t.detach().float().requires_grad_(t.requires_grad) for t in tensors]
    t64 = [t.detach().double().requires_grad_(t.requires_grad) for t in t32]

    def run(f, ts):
        ts = [t if t.requires_grad else t.clone() for t in ts]
        y = f(*ts)
        wrt = [t for t in ts if t.requires_grad]
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
        grads = torch.autograd.grad(y, wrt, dy, allow_unused=True) if y.requires_grad and y.numel() else []
        return [y, *grads, *[t for t in ts if not t.requires_grad]]

    key = (info.name, index)
    if key in REFUSED_OP_SAMPLES:
        with pytest.raises(fusednn.UnsupportedOpError):
            run(fusednn.compile(fn), t32)
        return
    ours, ref, theirs = run(fusednn.compile(fn), t32), run(fn, t64), run(fn, t32)
    assert len(ours) == len(ref)
    for i, (o, r, t) in enumerate(zip(ours, ref, theirs)):
        _close(o if o is not None else torch.zeros_like(r), r if r is not None else torch.zeros_like(o),
               t if t is not None else torch.zeros_like(r), f"{info.name} sample {index}: value {i}")
