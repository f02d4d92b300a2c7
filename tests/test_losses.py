"""Losses: generated forwards (compiler/templates/losses.py) and hand-written backwards (kernels/losses.py)
against torch in float64: cross_entropy with ignore_index, mse_loss and l1_loss, every reduction."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusednn.tools import aot
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.losses import CrossEntropySpec, PointLossSpec, generate
from fusednn.kernels.losses import cross_entropy_backward, point_loss_backward
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err
from tests.opcheck import build, check_fn, check_module, describe, module_samples, op_samples, sample_fn

TOL = 1e-5
REDUCTIONS = ["mean", "sum", "none"]


def ce_spec(N: int, C: int, reduction: str, ignore_index: int = -100) -> CrossEntropySpec:
    name = f"fnn_cross_entropy_{reduction}_test"
    return CrossEntropySpec(name, header(name, ["%2 cross_entropy"], ["F.cross_entropy"], "kernels/losses.py"),
                            ("%2 cross_entropy",), N, C, reduction, ignore_index)


def run_cross_entropy(logits, target, reduction, ignore_index=-100):
    """Generate, load and launch the forward; returns (loss, lse, den)."""
    N, C = logits.shape
    spec = ce_spec(N, C, reduction, ignore_index)
    loss = torch.empty(N) if reduction == "none" else torch.empty(())
    lse, den = torch.empty(N), torch.empty(1) if reduction == "mean" else None
    load(generate(spec), spec.name).launch(logits, target, None, loss, lse, den)
    return loss, lse, den


def ce_backward(dloss, logits, target, lse, den, reduction, ignore_index=-100):
    """dlogits from kernels/losses.py."""
    return cross_entropy_backward(dloss, logits, target, lse, reduction=reduction, ignore_index=ignore_index,
                                  den=den)[0]


def check_cross_entropy(logits, target, reduction, ignore_index=-100):
    """Loss and dlogits against torch in float64, with a random upstream gradient."""
    loss, lse, den = run_cross_entropy(logits, target, reduction, ignore_index)
    x64 = logits.double().requires_grad_()
    ref = F.cross_entropy(x64, target, reduction=reduction, ignore_index=ignore_index)
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) <= TOL
    assert rel_err(lse, torch.logsumexp(x64.detach(), 1)) <= TOL
    dloss = torch.randn_like(loss)
    ref.backward(dloss.double())
    dx = ce_backward(dloss, logits, target, lse, den, reduction, ignore_index)
    assert rel_err(dx, x64.grad) <= TOL


def targets(N: int, C: int, ignore_index: int | None) -> torch.Tensor:
    """Random class targets; with ignore_index, about a third of them ignored (the first, never the last)."""
    t = torch.randint(0, C, (N,))
    if ignore_index is not None:
        t[torch.rand(N) < 0.33] = ignore_index
        t[0] = ignore_index
        t[-1] = (ignore_index + 1) % C
    return t


# (N, C, ignore_index): None = no target ignored; -100 is torch's default; 2 ignores a real class
CE_CASES = [(7, 10, None), (7, 10, -100), (7, 10, 2), (33, 37, None), (33, 37, -100), (1, 5, None), (2, 1, -100)]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N,C,ignore_index", CE_CASES, ids=[f"{n}x{c}-ignore{i}" for n, c, i in CE_CASES])
def test_cross_entropy_loss_and_grad_match_torch(N, C, ignore_index, reduction):
    t = targets(N, C, ignore_index)
    check_cross_entropy(torch.randn(N, C) * 3, t, reduction, -100 if ignore_index is None else ignore_index)


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_with_every_target_ignored_matches_torch(reduction):
    # mean divides by the count of kept targets, 0: NaN as torch; the gradient is zero everywhere
    logits, t = torch.randn(5, 10), torch.full((5,), -100)
    loss, lse, den = run_cross_entropy(logits, t, reduction)
    ref = F.cross_entropy(logits.double(), t, reduction=reduction)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))
    assert torch.equal(loss.nan_to_num(), ref.float().nan_to_num())
    dloss = torch.randn_like(loss)
    dx = ce_backward(dloss, logits, t, lse, den, reduction, -100)
    assert torch.equal(dx, torch.zeros_like(dx))


def test_cross_entropy_of_large_logits_stays_finite_and_matches_torch():
    # logits near 1e4: exp without the max subtraction overflows; loss = lse − x_t must not cancel badly
    logits = 1e4 + torch.randn(9, 10) * 5
    check_cross_entropy(logits, torch.randint(0, 10, (9,)), "none")


def test_cross_entropy_of_confident_right_predictions_matches_torch():
    # the target leads by 5 to 20: losses from ~5e-2 down to ~1e-8, where log(1 + u) and p_t − 1 would
    # round u away in fp32 (this is where a trained classifier's loss lives)
    logits, t = torch.randn(9, 10), torch.randint(0, 10, (9,))
    logits[torch.arange(9), t] += torch.linspace(5, 20, 9)
    loss, lse, den = run_cross_entropy(logits, t, "none")
    x64 = logits.double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction="none")
    dloss = torch.randn_like(loss)
    ref.backward(dloss.double())
    dx = ce_backward(dloss, logits, t, lse, den, "none", -100)
    for i in range(9):  # row by row: the largest loss must not hide the smallest
        assert rel_err(loss[i], ref[i]) <= TOL, i
        assert rel_err(dx[i], x64.grad[i]) <= TOL, i


@pytest.mark.parametrize("bad", [10, -1])
def test_cross_entropy_target_out_of_range_gives_nan(bad):
    # torch raises; a kernel cannot, so the row's loss is NaN (never a read outside the row)
    logits, t = torch.randn(4, 10), torch.tensor([1, bad, 3, 4])
    loss, _, _ = run_cross_entropy(logits, t, "none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    assert torch.isnan(run_cross_entropy(logits, t, "mean")[0])


def test_cross_entropy_is_deterministic():
    logits, t = torch.randn(300, 37), targets(300, 37, -100)
    runs = []
    for _ in range(2):
        loss, lse, den = run_cross_entropy(logits, t, "mean")
        dx = ce_backward(torch.tensor(1.7), logits, t, lse, den, "mean")
        runs.append((loss, dx))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_cross_entropy_forward_is_one_launch():
    logits, t = torch.randn(7, 10), torch.randint(0, 10, (7,))
    with recording() as launches:
        loss, lse, den = run_cross_entropy(logits, t, "mean")
        ce_backward(torch.tensor(1.0), logits, t, lse, den, "mean")
    # the mean's denominator (the kept targets' weight) is saved by the forward: the backward is one launch
    assert [kernel_name(r.kernel) for r in launches] == ["fnn_cross_entropy_mean_test", "_cross_entropy_bwd_dx_kernel"]


def pl_spec(numel: int, kind: str, reduction: str) -> PointLossSpec:
    op = "mse_loss" if kind == "mse" else "l1_loss"
    name = f"fnn_{op}_{reduction}_test"
    return PointLossSpec(name, header(name, [f"%3 {op}"], [f"F.{op}"], "kernels/losses.py"), (f"%3 {op}",),
                         numel, kind, reduction)


def run_point_loss(x, t, kind, reduction):
    spec = pl_spec(x.numel(), kind, reduction)
    loss = torch.empty_like(x) if reduction == "none" else torch.empty(())
    load(generate(spec), spec.name).launch(x, t, loss)
    return loss


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("kind", ["mse", "l1"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (1,), (4, 300)])
def test_point_loss_and_grads_match_torch(shape, kind, reduction):
    x, t = torch.randn(shape), torch.randn(shape)
    x.view(-1)[::4] = t.view(-1)[::4]  # x == t: l1's derivative is 0 there (torch's sign rule)
    loss = run_point_loss(x, t, kind, reduction)
    x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
    ref = (F.mse_loss if kind == "mse" else F.l1_loss)(x64, t64, reduction=reduction)
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) <= TOL
    dloss = torch.randn_like(loss)
    ref.backward(dloss.double())
    dx, dt = point_loss_backward(dloss, x, t, kind=kind, reduction=reduction, needs_dx=True, needs_dt=True)
    assert rel_err(dx, x64.grad) <= TOL
    assert rel_err(dt, t64.grad) <= TOL


@pytest.mark.parametrize("needs_dx,needs_dt", [(True, False), (False, True), (False, False)])
def test_point_loss_backward_returns_only_the_grads_asked_for(needs_dx, needs_dt):
    x, t = torch.randn(4, 9), torch.randn(4, 9)
    x64, t64 = x.double().requires_grad_(), t.double().requires_grad_()
    F.l1_loss(x64, t64, reduction="sum").backward()
    dx, dt = point_loss_backward(torch.tensor(1.0), x, t, kind="l1", reduction="sum", needs_dx=needs_dx,
                                 needs_dt=needs_dt)
    assert (dx is not None) == needs_dx and (dt is not None) == needs_dt
    if needs_dx:
        assert rel_err(dx, x64.grad) <= TOL
    if needs_dt:
        assert rel_err(dt, t64.grad) <= TOL


def test_point_loss_backward_accepts_an_expanded_upstream_gradient():
    # loss(reduction="none").sum().backward() hands the backward a stride-0 view of one number
    x, t = torch.randn(3, 7), torch.randn(3, 7)
    dloss = torch.randn(()).expand(3, 7)
    dx, _ = point_loss_backward(dloss, x, t, kind="mse", reduction="none", needs_dx=True, needs_dt=False)
    assert rel_err(dx, 2 * (x.double() - t.double()) * dloss.double()) <= TOL


def test_point_loss_sum_is_deterministic():
    x, t = torch.randn(5000), torch.randn(5000)
    assert torch.equal(run_point_loss(x, t, "mse", "sum"), run_point_loss(x, t, "mse", "sum"))


def test_generated_loss_sources_have_header_labels_and_launch():
    for spec, sig in [(ce_spec(7, 10, "mean"), "launch(logits, target, weight, loss, lse, den, nbytes=None)"),
                      (pl_spec(35, "l1", "none"), "launch(x, t, loss, nbytes=None)")]:
        text = generate(spec)
        assert text.startswith(spec.header)
        assert f"# {spec.labels[0]}\n" in text
        assert f"def {spec.name}(" in text and f"\ndef {sig}:" in text
        compile(text, spec.name, "exec")


def test_loss_specs_reject_unknown_reduction_and_kind():
    with pytest.raises(ValueError, match="reduction"):
        generate(ce_spec(7, 10, "avg"))
    with pytest.raises(ValueError, match="kind"):
        generate(pl_spec(7, "huber", "mean"))


@pytest.mark.aot
def test_loss_kernels_compile_for_sm90_without_spills():
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(reason)

    def program():
        N, C = 300, 10
        logits, t, lse = torch.empty(N, C), torch.zeros(N, dtype=torch.int64), torch.empty(N)
        w, den = torch.ones(C), torch.ones(1)
        for reduction in ("mean", "none"):
            spec = ce_spec(N, C, reduction)
            loss = torch.empty(N) if reduction == "none" else torch.empty(())
            load(generate(spec), spec.name).launch(logits, t, None, loss, lse, den)
            ce_backward(loss, logits, t, lse, den, reduction)
        # the general forms: K-dim logits with weights and label smoothing, probability targets, nll_loss
        x4 = torch.empty(8, C, 4, 4)
        t4 = torch.zeros(8, 4, 4, dtype=torch.int64)
        for name, kw, tt in (("fnn_ce_kdim", dict(weight=True, label_smoothing=0.1), t4),
                             ("fnn_ce_prob", dict(prob=True, weight=True, label_smoothing=0.1), x4),
                             ("fnn_nll", dict(nll=True, weight=True), t4)):
            spec = CrossEntropySpec(name, header(name, ["%2 cross_entropy"], ["F.cross_entropy"],
                                                 "kernels/losses.py"), ("%2 cross_entropy",), 8, C, "mean", -100, 16,
                                    **kw)
            lse4 = None if kw.get("nll") else torch.empty(8 * 16)
            load(generate(spec), name).launch(x4, tt, w, torch.empty(()), lse4, den)
            cross_entropy_backward(torch.ones(()), x4, tt, lse4, reduction="mean", weight=w, den=den,
                                   label_smoothing=kw.get("label_smoothing", 0.0), nll=kw.get("nll", False),
                                   needs_dt=kw.get("prob", False))
        x = torch.empty(5000)
        for kind, reduction in (("mse", "sum"), ("l1", "none")):
            spec = pl_spec(x.numel(), kind, reduction)
            loss = x if reduction == "none" else torch.empty(())
            load(generate(spec), spec.name).launch(x, x, loss)
            point_loss_backward(loss, x, x, kind=kind, reduction=reduction, needs_dx=True, needs_dt=kind == "l1")

    compiled = aot.compile_launches(aot.collect(program))
    assert {c.name for c in compiled} >= {"_cross_entropy_bwd_dx_kernel", "_point_loss_bwd_dx_kernel",
                                          "fnn_cross_entropy_mean_test", "fnn_ce_kdim", "fnn_ce_prob", "fnn_nll"}
    for c in compiled:
        assert not c.resources.spills, c.resources


# -- cross_entropy / nll_loss through fusednn.compile: every option torch allows -----------------------
def _class_case(shape, prob, weighted, ignore_index, eps):
    C = shape[1] if len(shape) > 1 else shape[0]
    x = torch.randn(shape) * 2
    if prob:
        t = torch.softmax(torch.randn(shape), 1 if len(shape) > 1 else 0)
    else:
        t = torch.randint(0, C, (shape[0],) + shape[2:] if len(shape) > 1 else ())
        if ignore_index in range(C) and t.dim():
            t.view(-1)[0] = ignore_index  # at least one row ignored
    return [x, t] + ([torch.rand(C) + 0.5] if weighted else [])


# (logits shape, probability targets, class weights, ignore_index, label_smoothing): unbatched [C], [N, C],
# K-dim [N, C, d1, d2]; torch refuses ignore_index with probability targets
CLASS_CASES = [
    ((7, 5), False, False, -100, 0.0), ((7, 5), False, True, 1, 0.0), ((7, 5), False, True, 1, 0.2),
    ((3, 4, 2, 3), False, True, 2, 0.15), ((3, 4, 5), False, False, -100, 0.1), ((5,), False, True, -100, 0.1),
    ((7, 5), True, False, -100, 0.0), ((3, 4, 2, 3), True, True, -100, 0.2), ((5,), True, True, -100, 0.0),
    ((1, 1), False, False, -100, 0.3), ((1, 1), True, True, -100, 0.0),
]


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape,prob,weighted,ignore_index,eps", CLASS_CASES,
                         ids=["x".join(map(str, c[0])) + f"-{'prob' if c[1] else 'class'}{'-w' if c[2] else ''}"
                              f"-ii{c[3]}-ls{c[4]}" for c in CLASS_CASES])
def test_cross_entropy_options_match_torch_through_compile(shape, prob, weighted, ignore_index, eps, reduction,
                                                           fuse):
    ins = _class_case(shape, prob, weighted, ignore_index, eps)

    def ce(x, t, *w):
        return F.cross_entropy(x, t, w[0] if w else None, ignore_index=ignore_index, reduction=reduction,
                               label_smoothing=eps)

    check_fn(ce, ins, fuse=fuse, grads=[True, prob, False])  # weights are not differentiated
    if not prob and not eps:
        def nll(x, t, *w):
            return F.nll_loss(F.log_softmax(x, 1 if x.dim() > 1 else 0), t, w[0] if w else None,
                              ignore_index=ignore_index, reduction=reduction)
        check_fn(nll, ins, fuse=fuse, grads=[True, False, False])


def test_nll_loss_of_log_probabilities_matches_torch_with_every_target_ignored():
    x, t = torch.randn(4, 3).log_softmax(1), torch.full((4,), 1)
    for reduction in REDUCTIONS:  # mean: 0 / 0 = NaN, as torch; the gradient is zero
        check_fn(lambda x, t: F.nll_loss(x, t, ignore_index=1, reduction=reduction), [x, t])


def test_cross_entropy_with_a_class_weight_that_requires_grad_is_refused_by_torch_too():
    # torch's nll_loss does not differentiate weights either; fusednn gives them no gradient
    with pytest.raises(RuntimeError, match="weight"):
        F.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), torch.rand(3, requires_grad=True)).backward()


# torch's own samples. All are supported (weights are not differentiated, as in torch).
OP_SAMPLES = op_samples("nn.functional.cross_entropy") + op_samples("nn.functional.nll_loss")


@pytest.mark.parametrize("info,sample", OP_SAMPLES, ids=[f"{i.name.split('.')[-1]}-{describe(s)}" for i, s in OP_SAMPLES])
def test_op_db_samples_match_torch(info, sample):
    fn, tensors = sample_fn(info.op, sample)
    check_fn(fn, tensors, grads=[t.requires_grad for t in tensors])


MODULE_SAMPLES = [(training, p) for training in (True, False) for cls in (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss)
                  for p in module_samples(cls, training)]


@pytest.mark.parametrize("training,pair", MODULE_SAMPLES,
                         ids=[f"{p[0].module_cls.__name__}-{'train' if t else 'eval'}-{i}"
                              for i, (t, p) in enumerate(MODULE_SAMPLES)])
def test_module_db_samples_match_torch(training, pair):
    # nn.CrossEntropyLoss and nn.NLLLoss (losses are never fused: one form covers both)
    info, sample = pair
    m, xs, kw = build(info, sample, training)
    check_module(m, xs, kwargs=kw)
