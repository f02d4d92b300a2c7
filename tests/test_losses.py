"""Losses: generated forwards (compiler/templates/losses.py) and hand-written backwards (kernels/losses.py)
against torch in float64: cross_entropy with ignore_index, mse_loss and l1_loss, every reduction."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusednn import aot
from fusednn.compiler.source import header, load
from fusednn.compiler.templates.losses import CrossEntropySpec, PointLossSpec, generate
from fusednn.kernels.losses import cross_entropy_backward, point_loss_backward
from fusednn.launch import kernel_name, recording
from tests.helpers import rel_err

TOL = 1e-5
REDUCTIONS = ["mean", "sum", "none"]


def ce_spec(N: int, C: int, reduction: str, ignore_index: int = -100) -> CrossEntropySpec:
    name = f"fnn_cross_entropy_{reduction}_test"
    return CrossEntropySpec(name, header(name, ["%2 cross_entropy"], ["F.cross_entropy"], "kernels/losses.py"),
                            ("%2 cross_entropy",), N, C, reduction, ignore_index)


def run_cross_entropy(logits, target, reduction, ignore_index=-100):
    """Generate, load and launch the forward; returns (loss, lse)."""
    N, C = logits.shape
    spec = ce_spec(N, C, reduction, ignore_index)
    loss = torch.empty(N) if reduction == "none" else torch.empty(())
    lse = torch.empty(N)
    load(generate(spec), spec.name).launch(logits, target, loss, lse)
    return loss, lse


def check_cross_entropy(logits, target, reduction, ignore_index=-100):
    """Loss and dlogits against torch in float64, with a random upstream gradient."""
    loss, lse = run_cross_entropy(logits, target, reduction, ignore_index)
    x64 = logits.double().requires_grad_()
    ref = F.cross_entropy(x64, target, reduction=reduction, ignore_index=ignore_index)
    assert loss.shape == ref.shape
    assert rel_err(loss, ref) <= TOL
    assert rel_err(lse, torch.logsumexp(x64.detach(), 1)) <= TOL
    dloss = torch.randn_like(loss)
    ref.backward(dloss.double())
    dx = cross_entropy_backward(dloss, logits, target, lse, reduction=reduction, ignore_index=ignore_index)
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
    loss, lse = run_cross_entropy(logits, t, reduction)
    ref = F.cross_entropy(logits.double(), t, reduction=reduction)
    assert torch.equal(torch.isnan(loss), torch.isnan(ref))
    assert torch.equal(loss.nan_to_num(), ref.float().nan_to_num())
    dloss = torch.randn_like(loss)
    dx = cross_entropy_backward(dloss, logits, t, lse, reduction=reduction, ignore_index=-100)
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
    loss, lse = run_cross_entropy(logits, t, "none")
    x64 = logits.double().requires_grad_()
    ref = F.cross_entropy(x64, t, reduction="none")
    dloss = torch.randn_like(loss)
    ref.backward(dloss.double())
    dx = cross_entropy_backward(dloss, logits, t, lse, reduction="none", ignore_index=-100)
    for i in range(9):  # row by row: the largest loss must not hide the smallest
        assert rel_err(loss[i], ref[i]) <= TOL, i
        assert rel_err(dx[i], x64.grad[i]) <= TOL, i


@pytest.mark.parametrize("bad", [10, -1])
def test_cross_entropy_target_out_of_range_gives_nan(bad):
    # torch raises; a kernel cannot, so the row's loss is NaN (never a read outside the row)
    logits, t = torch.randn(4, 10), torch.tensor([1, bad, 3, 4])
    loss, _ = run_cross_entropy(logits, t, "none")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
    assert torch.isnan(run_cross_entropy(logits, t, "mean")[0])


def test_cross_entropy_is_deterministic():
    logits, t = torch.randn(300, 37), targets(300, 37, -100)
    runs = []
    for _ in range(2):
        loss, lse = run_cross_entropy(logits, t, "mean")
        dx = cross_entropy_backward(torch.tensor(1.7), logits, t, lse, reduction="mean", ignore_index=-100)
        runs.append((loss, dx))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_cross_entropy_forward_is_one_launch():
    logits, t = torch.randn(7, 10), torch.randint(0, 10, (7,))
    with recording() as launches:
        loss, lse = run_cross_entropy(logits, t, "mean")
        cross_entropy_backward(torch.tensor(1.0), logits, t, lse, reduction="mean", ignore_index=-100)
    # the mean's backward counts the kept targets first (the forward's launch signature saves only lse)
    assert [kernel_name(r.kernel) for r in launches] == [
        "fnn_cross_entropy_mean_test", "_cross_entropy_bwd_scale_kernel", "_cross_entropy_bwd_dx_kernel"]


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
    for spec, sig in [(ce_spec(7, 10, "mean"), "launch(logits, target, loss, lse, nbytes=None)"),
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
        for reduction in ("mean", "none"):
            spec = ce_spec(N, C, reduction)
            loss = torch.empty(N) if reduction == "none" else torch.empty(())
            load(generate(spec), spec.name).launch(logits, t, loss, lse)
            cross_entropy_backward(loss, logits, t, lse, reduction=reduction, ignore_index=-100)
        x = torch.empty(5000)
        for kind, reduction in (("mse", "sum"), ("l1", "none")):
            spec = pl_spec(x.numel(), kind, reduction)
            loss = x if reduction == "none" else torch.empty(())
            load(generate(spec), spec.name).launch(x, x, loss)
            point_loss_backward(loss, x, x, kind=kind, reduction=reduction, needs_dx=True, needs_dt=kind == "l1")

    compiled = aot.compile_launches(aot.collect(program))
    assert {c.name for c in compiled} >= {"_cross_entropy_bwd_scale_kernel", "_cross_entropy_bwd_dx_kernel",
                                          "_point_loss_bwd_dx_kernel", "fnn_cross_entropy_mean_test"}
    for c in compiled:
        assert not c.resources.spills, c.resources
