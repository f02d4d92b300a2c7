"""fusednn.optim.SGD and kernels/sgd.py against torch.optim.SGD (float64 reference), fresh inputs per test."""
from __future__ import annotations

import itertools

import pytest
import torch

import fusednn  # noqa: F401  (interpreter switch before the kernel module is imported)
from fusednn.tools import aot
from fusednn.compiler import configs
from fusednn.kernels.sgd import sgd_step
from fusednn.launch import kernel_name, recording
from fusednn.optim import SGD
from tests import helpers
from tests.helpers import rel_err

SHAPES = [(6, 1, 5, 5), (6,), (10, 84), (1,), (3, 7)]
TOL = 1e-6


def _params(shapes=SHAPES) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


def _twin(params, dtype=torch.float64) -> list[torch.nn.Parameter]:
    """Independent copies of `params` (the reference's leaves)."""
    return [torch.nn.Parameter(p.detach().to(dtype).clone()) for p in params]


def _set_grads(*param_lists, skip=()) -> None:
    """Give every list the same fresh gradient per position (None at positions in `skip`)."""
    for i, ps in enumerate(zip(*param_lists)):
        g = None if i in skip else torch.randn(ps[0].shape)
        for p in ps:
            p.grad = None if g is None else g.to(p.dtype).clone()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _assert_close(params, ref_params, opt=None, ref_opt=None) -> None:
    """rel_err over all parameters (and all momentum buffers) as one vector.

    One vector, not per tensor: a 1-element parameter can land near 0 after steps of size ~1 and then
    carries fp32 rounding of the steps (~1e-7 absolute) at a relative size far above 1e-6; any wrong
    update is still >= 1e-3 of the whole vector's norm.
    """
    assert rel_err(_flat(params), _flat(ref_params)) <= TOL
    if opt is not None:
        pairs = [(p, q) for p, q in zip(params, ref_params) if q in ref_opt.state]
        assert [q in ref_opt.state for q in ref_params] == [p in opt.state for p in params]
        if pairs:
            bufs = [opt.state[p]["momentum_buffer"] for p, _ in pairs]
            ref_bufs = [ref_opt.state[q]["momentum_buffer"] for _, q in pairs]
            assert rel_err(_flat(bufs), _flat(ref_bufs)) <= TOL


def _hyper_combos():
    for momentum, dampening, nesterov, wd, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (False, True), (0.0, 0.01), (False, True)
    ):
        if nesterov and (momentum <= 0 or dampening != 0):
            continue  # torch refuses these (test_sgd_raises_the_same_value_errors_as_torch)
        yield dict(momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=wd, maximize=maximize)


@pytest.mark.parametrize("hyper", list(_hyper_combos()), ids=lambda h: "-".join(f"{k}={v}" for k, v in h.items()))
def test_sgd_matches_torch_over_five_steps(hyper):
    params = _params()
    ref = _twin(params)
    opt, ref_opt = SGD(params, lr=0.1, **hyper), torch.optim.SGD(ref, lr=0.1, **hyper)
    for _ in range(5):
        _set_grads(params, ref)
        opt.step()
        ref_opt.step()
        _assert_close(params, ref, opt, ref_opt)


def test_sgd_is_one_launch_per_group_per_step():
    params = _params()
    opt = SGD([{"params": params[:3]}, {"params": params[3:], "lr": 0.01}], lr=0.1, momentum=0.9)
    with recording() as launches:
        for _ in range(3):
            _set_grads(params)
            opt.step()
    assert len(launches) == 3 * 2
    assert {kernel_name(lc.kernel) for lc in launches} == {"_sgd_step_kernel"}


def test_sgd_group_without_grads_launches_nothing():
    params = _params()
    opt = SGD([{"params": params[:2]}, {"params": params[2:]}], lr=0.1, momentum=0.9)
    _set_grads(params, skip=(2, 3, 4))
    with recording() as launches:
        opt.step()
    assert len(launches) == 1


def test_sgd_leaves_params_without_grad_untouched():
    params = _params()
    ref = _twin(params)
    before = [p.detach().clone() for p in params]
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=0.01)
    for _ in range(3):
        _set_grads(params, ref, skip=(1, 3))
        opt.step()
        ref_opt.step()
    for i in (1, 3):
        assert torch.equal(params[i], before[i])
        assert params[i] not in opt.state or "momentum_buffer" not in opt.state[params[i]]
    _assert_close(params, ref, opt, ref_opt)


def test_sgd_param_getting_its_first_grad_later_matches_torch():
    # One launch mixes tensors on their first momentum step with tensors that already have a buffer.
    params = _params()
    ref = _twin(params)
    opt = SGD(params, lr=0.1, momentum=0.9, dampening=0.1)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, dampening=0.1)
    for step in range(5):
        _set_grads(params, ref, skip=(0, 2) if step < 2 else ())
        opt.step()
        ref_opt.step()
        _assert_close(params, ref, opt, ref_opt)


def test_sgd_two_groups_with_different_lr_match_torch():
    params = _params()
    ref = _twin(params)

    def groups(ps):
        return [{"params": ps[:2], "lr": 0.2, "nesterov": True}, {"params": ps[2:], "lr": 0.03, "weight_decay": 0.01}]

    opt = SGD(groups(params), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(groups(ref), lr=0.1, momentum=0.9)
    for _ in range(5):
        _set_grads(params, ref)
        opt.step()
        ref_opt.step()
        _assert_close(params, ref, opt, ref_opt)


def test_sgd_with_step_lr_scheduler_matches_torch():
    params = _params()
    ref = _twin(params)
    opt = SGD(params, lr=0.2, momentum=0.9)
    ref_opt = torch.optim.SGD(ref, lr=0.2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.3)
    for _ in range(5):
        _set_grads(params, ref)
        opt.step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
        assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
        _assert_close(params, ref, opt, ref_opt)


def test_sgd_lr_is_a_runtime_argument_not_a_specialisation():
    params = _params()
    opt = SGD(params, lr=0.2, momentum=0.9)
    with recording() as launches:
        for lr in (0.2, 0.05, 0.0125):
            opt.param_groups[0]["lr"] = lr
            _set_grads(params)
            opt.step()
    # Same constexprs every step (nothing to recompile); the lr travels as an ordinary argument.
    assert launches[0].meta == launches[1].meta == launches[2].meta
    assert [float(torch.tensor(lr, dtype=torch.float32)) for lr in (0.2, 0.05, 0.0125)] == [
        float(torch.tensor(lc.args[7], dtype=torch.float32)) for lc in launches
    ]


@pytest.mark.parametrize("ours_first", [True, False], ids=["fusednn_then_torch", "torch_then_fusednn"])
def test_sgd_state_dict_round_trips_with_torch(ours_first):
    hyper = dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01)
    a = _params()
    b = _twin(a, torch.float32)
    ref = _twin(a)
    first_cls, second_cls = (SGD, torch.optim.SGD) if ours_first else (torch.optim.SGD, SGD)
    first, ref_opt = first_cls(a, **hyper), torch.optim.SGD(ref, **hyper)
    assert SGD(b, **hyper).state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]
    for _ in range(2):
        _set_grads(a, ref)
        first.step()
        ref_opt.step()
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    second = second_cls(b, lr=1.0)  # hyper-parameters and buffers come from the state dict
    second.load_state_dict(first.state_dict())
    assert second.param_groups[0]["momentum"] == 0.9
    for _ in range(3):
        _set_grads(b, ref)
        second.step()
        ref_opt.step()
    _assert_close(b, ref, second, ref_opt)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-0.1),
        dict(lr=torch.tensor([0.1, 0.2])),
        dict(lr=0.1, momentum=-0.5),
        dict(lr=0.1, weight_decay=-1e-4),
        dict(lr=0.1, nesterov=True),
        dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True),
        dict(lr=-0.1, momentum=-0.5),
    ],
    ids=["lr", "tensor_lr", "momentum", "weight_decay", "nesterov_no_momentum", "nesterov_dampening", "first_wins"],
)
def test_sgd_raises_the_same_value_errors_as_torch(kwargs):
    with pytest.raises(ValueError) as ref:
        torch.optim.SGD(_params(), **kwargs)
    with pytest.raises(ValueError) as ours:
        SGD(_params(), **kwargs)
    assert str(ours.value) == str(ref.value)


def test_sgd_refuses_sparse_gradients_and_leaves_state_alone():
    params = _params()
    opt = SGD(params, lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in params]
    _set_grads(params)
    params[2].grad = params[2].grad.to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert len(opt.state) == 0


def test_sgd_step_returns_the_closure_loss():
    params = _params()
    opt = SGD(params, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = sum((p * p).sum() for p in params)
        loss.backward()
        return loss

    ref = [p.detach().clone() for p in params]
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(sum((q * q).sum().item() for q in ref), rel=1e-6)
    for p, q in zip(params, ref):
        assert rel_err(p, q.double() * 0.8) <= TOL  # grad of p·p is 2p: p - 0.1·2p


def test_sgd_step_multi_chunk_tensors_and_strided_grad_match_torch():
    # GPU launch configs (1024-element chunks) under the interpreter: the 3001-element tensor spans
    # three programs, so chunk starts inside a tensor are exercised; one gradient is a transposed view.
    shapes = [(6, 1, 5, 5), (6,), (10, 84), (1,), (3001,)]
    params = [torch.randn(s) for s in shapes]
    ref = [p.double() for p in params]
    grads = [torch.randn(s) for s in shapes]
    grads[2] = torch.randn(84, 10).t()
    bufs = [torch.empty_like(p) for p in params]
    hyper = dict(lr=0.05, momentum=0.9, dampening=0.0, weight_decay=0.01, nesterov=True, maximize=True)
    with configs.use_target("gpu"), recording() as launches:
        sgd_step(params, grads, bufs, first_step=True, **hyper)
        sgd_step(params, grads, bufs, first_step=False, **hyper)
    assert [lc.grid for lc in launches] == [(7,), (7,)] and launches[0].meta["BLOCK"] == 1024
    ref_bufs = []
    for step in range(2):
        for i, (q, g) in enumerate(zip(ref, grads)):
            d = -g.double() + 0.01 * q
            if step == 0:
                ref_bufs.append(d.clone())
            else:
                ref_bufs[i] = 0.9 * ref_bufs[i] + d
            q -= 0.05 * (d + 0.9 * ref_bufs[i])
    assert rel_err(_flat(params), _flat(ref)) <= TOL
    assert rel_err(_flat(bufs), _flat(ref_bufs)) <= TOL


@pytest.mark.aot
def test_sgd_kernel_compiles_for_sm90_without_spills():
    # The pointer table (int64 -> *fp32 bitcast) must survive Triton's real compiler, which the
    # interpreter never runs; both constexpr extremes and every hyper-parameter a pointer, with the GPU
    # launch configs the step would use.
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(f"cannot compile for sm_90 here: {reason}")
    params = _params()
    _set_grads(params)
    plain = SGD(params, lr=0.1)
    every_branch = SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True, maximize=True)
    tensors = SGD(params, lr=torch.tensor(0.1), momentum=torch.tensor(0.9), weight_decay=torch.tensor(0.01))
    compiled = aot.compile_launches(aot.collect(plain.step) + aot.collect(every_branch.step) + aot.collect(tensors.step))
    assert len(compiled) == 3
    for c in compiled:
        assert "int_to_ptr" in c.ttir and c.job.arch == 90
        assert not c.resources.spills, c.resources


@pytest.mark.parametrize("sched", ["cosine", "step"])
def test_sgd_with_tensor_lr_driven_by_a_torch_scheduler_matches_torch(sched):
    params = _params()
    ref = _twin(params)
    opt = SGD(params, lr=torch.tensor(0.2), momentum=0.9, weight_decay=0.01)
    ref_opt = torch.optim.SGD(ref, lr=torch.tensor(0.2), momentum=0.9, weight_decay=0.01)
    lr = opt.param_groups[0]["lr"]

    def make(o):
        if sched == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=0.01)
        return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3)

    s, ref_s = make(opt), make(ref_opt)
    with recording() as launches:
        for _ in range(5):
            _set_grads(params, ref)
            opt.step()
            ref_opt.step()
            s.step()
            ref_s.step()
            assert opt.param_groups[0]["lr"] is lr  # the scheduler fills the tensor in place
            assert opt.param_groups[0]["lr"].item() == ref_opt.param_groups[0]["lr"].item()
            _assert_close(params, ref, opt, ref_opt)
    assert len(launches) == 5
    # The kernel gets the tensor itself (a pointer it loads), not a value read on the host.
    assert all(lc.args[7] is lr and lc.meta["LR_PTR"] for lc in launches)


def test_sgd_tensor_momentum_and_weight_decay_are_read_by_the_kernel():
    params = _params()
    ref = _twin(params)
    opt = SGD(params, lr=0.1, momentum=torch.tensor(0.9), weight_decay=torch.tensor(0.01))
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, weight_decay=0.01)
    with recording() as launches:
        for _ in range(3):
            _set_grads(params, ref)
            opt.step()
            ref_opt.step()
            _assert_close(params, ref, opt, ref_opt)
    assert launches[0].meta["MOMENTUM_PTR"] and launches[0].meta["WD_PTR"] and not launches[0].meta["LR_PTR"]


def test_sgd_steady_steps_follow_every_change_between_steps(monkeypatch):
    """A step whose parameters, gradients (kept in place, as zero_grad(set_to_none=False) does), buffers and
    hyper-parameters are those of the step before relaunches its launch; any change between steps must reach
    the update: lr, a momentum buffer replaced, a parameter's data replaced, a strided gradient, a
    parameter without a gradient."""
    params = _params()
    ref = _twin(params)
    opt, ref_opt = SGD(params, lr=0.1, momentum=0.9), torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    general = []
    real = opt._general_step
    monkeypatch.setattr(opt, "_general_step", lambda *a: (general.append(1), real(*a))[1])

    def grads_in_place(skip=()):
        helpers.grads_in_place(params, ref, skip)

    def lr():
        helpers.set_lr((opt, ref_opt), 0.05)

    def buffer():
        for o, p in ((opt, params[0]), (ref_opt, ref[0])):
            o.state[p]["momentum_buffer"] = o.state[p]["momentum_buffer"] * -0.5

    def data():
        helpers.scale_data(params, ref, 3, 3.0)

    def strided():
        g = torch.randn(84, 10)
        params[2].grad, ref[2].grad = g.t(), g.t().double()

    took = []
    for change in (None, None, None, lr, None, buffer, None, data, None, strided, "skip", None, None):
        grads_in_place(skip=(1,) if change == "skip" else ())
        if callable(change):
            change()
        before = len(general)
        opt.step()
        ref_opt.step()
        _assert_close(params, ref, opt, ref_opt)
        took.append(len(general) - before)
    # general: the first step, the first with buffers, each change, and after the strided gradient and the
    # skipped parameter the steps whose gradients are new tensors; every other step relaunches
    assert took == [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0]


def test_sgd_state_cleared_after_a_first_step_starts_momentum_again():
    """`opt.state.clear()` (a warm restart) right after a first step: the next step is a first step again,
    whose buffer is allocated anew (not the freed one the first step wrote) and kept."""
    params = _params()
    ref = _twin(params)
    opt, ref_opt = SGD(params, lr=0.1, momentum=0.9), torch.optim.SGD(ref, lr=0.1, momentum=0.9)
    for p, q in zip(params, ref):
        p.grad, q.grad = torch.zeros(p.shape), torch.zeros(q.shape, dtype=q.dtype)
    for step in range(4):
        for p, q in zip(params, ref):  # gradients kept at their addresses, as zero_grad(set_to_none=False)
            g = torch.randn(p.shape)
            p.grad.copy_(g)
            q.grad.copy_(g.double())
        opt.step()
        ref_opt.step()
        if step == 0:
            opt.state.clear()
            ref_opt.state.clear()
        else:
            _assert_close(params, ref, opt, ref_opt)
