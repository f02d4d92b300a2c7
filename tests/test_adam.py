"""fusednn.optim.Adam / AdamW and kernels/adam.py against torch.optim.Adam / AdamW (float32, same params and grads)."""
from __future__ import annotations

import itertools

import pytest
import torch

import fusednn  # noqa: F401  (interpreter switch before the kernel module is imported)
from fusednn.tools import aot
from fusednn.compiler import configs
from fusednn.kernels.adam import adam_step
from fusednn.launch import kernel_name, recording
from fusednn.optim import Adam, AdamW
from tests import helpers
from tests.helpers import rel_err

SHAPES = [(6, 1, 5, 5), (6,), (10, 84), (1,), (3, 7)]
TOL = 1e-6
CLASSES = [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)]
STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def _params(shapes=SHAPES) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(s)) for s in shapes]


def _twin(params) -> list[torch.nn.Parameter]:
    """Independent float32 copies of `params` (the reference's leaves)."""
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _set_grads(*param_lists, skip=()) -> None:
    """Give every list the same fresh gradient per position (None at positions in `skip`)."""
    for i, ps in enumerate(zip(*param_lists)):
        g = None if i in skip else torch.randn(ps[0].shape)
        for p in ps:
            p.grad = None if g is None else g.to(p.dtype)


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().reshape(-1) for t in tensors])


def _assert_close(params, ref_params, opt, ref_opt) -> None:
    """Parameters and every state tensor as one vector each (see tests/test_sgd.py for why one vector)."""
    assert rel_err(_flat(params), _flat(ref_params)) <= TOL
    assert [q in ref_opt.state for q in ref_params] == [p in opt.state for p in params]
    pairs = [(opt.state[p], ref_opt.state[q]) for p, q in zip(params, ref_params) if q in ref_opt.state]
    for k in STATE_KEYS:
        if pairs and k in pairs[0][1]:
            assert rel_err(_flat(a[k] for a, _ in pairs), _flat(b[k] for _, b in pairs)) <= TOL, k
    for a, b in pairs:
        assert set(a) == set(b)
        assert a["step"].item() == b["step"].item()


def _lr(kind: str, value: float):
    return torch.tensor(value) if kind == "tensor" else value


def _combos():
    for (cls, ref_cls), amsgrad, maximize, wd, lr_kind in itertools.product(
        CLASSES, (False, True), (False, True), (0.0, 0.05), ("float", "tensor")
    ):
        yield pytest.param(cls, ref_cls, dict(amsgrad=amsgrad, maximize=maximize, weight_decay=wd), lr_kind,
                           id=f"{cls.__name__}-amsgrad={amsgrad}-maximize={maximize}-wd={wd}-lr={lr_kind}")


@pytest.mark.parametrize("cls,ref_cls,hyper,lr_kind", list(_combos()))
def test_adam_matches_torch_over_five_steps(cls, ref_cls, hyper, lr_kind):
    params = _params()
    ref = _twin(params)
    opt = cls(params, lr=_lr(lr_kind, 0.01), **hyper)
    ref_opt = ref_cls(ref, lr=_lr(lr_kind, 0.01), **hyper)
    for _ in range(5):
        _set_grads(params, ref)
        opt.step()
        ref_opt.step()
        _assert_close(params, ref, opt, ref_opt)


@pytest.mark.parametrize("cls,ref_cls", CLASSES, ids=["Adam", "AdamW"])
def test_adam_is_one_launch_per_group_per_step(cls, ref_cls):
    params = _params()
    opt = cls([{"params": params[:3]}, {"params": params[3:], "lr": 0.1, "amsgrad": True}], lr=0.01)
    with recording() as launches:
        for _ in range(3):
            _set_grads(params)
            opt.step()
    assert len(launches) == 3 * 2
    assert {kernel_name(lc.kernel) for lc in launches} == {"_adam_step_kernel"}


def test_adam_leaves_params_without_grad_untouched_and_stateless():
    params = _params()
    ref = _twin(params)
    before = [p.detach().clone() for p in params]
    opt, ref_opt = AdamW(params, lr=0.01), torch.optim.AdamW(ref, lr=0.01)
    for _ in range(3):
        _set_grads(params, ref, skip=(1, 3))
        opt.step()
        ref_opt.step()
    for i in (1, 3):
        assert torch.equal(params[i], before[i]) and params[i] not in opt.state
    _assert_close(params, ref, opt, ref_opt)


@pytest.mark.parametrize("cls,ref_cls", CLASSES, ids=["Adam", "AdamW"])
def test_adam_params_at_different_steps_in_one_launch_match_torch(cls, ref_cls):
    # Per-tensor step counters: one launch mixes tensors at step 1 with tensors at step 3.
    params = _params()
    ref = _twin(params)
    opt = cls(params, lr=0.01, weight_decay=0.05, amsgrad=True)
    ref_opt = ref_cls(ref, lr=0.01, weight_decay=0.05, amsgrad=True)
    for step in range(5):
        _set_grads(params, ref, skip=(0, 2) if step < 2 else ())
        opt.step()
        ref_opt.step()
        _assert_close(params, ref, opt, ref_opt)
    assert [opt.state[p]["step"].item() for p in params] == [3, 5, 3, 5, 5]


@pytest.mark.parametrize("sched", ["cosine", "step"])
@pytest.mark.parametrize("cls,ref_cls", CLASSES, ids=["Adam", "AdamW"])
def test_adam_with_tensor_lr_driven_by_a_torch_scheduler_matches_torch(cls, ref_cls, sched):
    params = _params()
    ref = _twin(params)
    opt, ref_opt = cls(params, lr=torch.tensor(0.02)), ref_cls(ref, lr=torch.tensor(0.02))
    lr = opt.param_groups[0]["lr"]

    def make(o):
        if sched == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4, eta_min=1e-3)
        return torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.3)

    s, ref_s = make(opt), make(ref_opt)
    with recording() as launches:
        for _ in range(5):
            _set_grads(params, ref)
            opt.step()
            ref_opt.step()
            s.step()
            ref_s.step()
            assert opt.param_groups[0]["lr"] is lr  # filled in place, never replaced
            assert opt.param_groups[0]["lr"].item() == ref_opt.param_groups[0]["lr"].item()
            _assert_close(params, ref, opt, ref_opt)
    assert all(lc.args[9] is lr and lc.meta["LR_PTR"] for lc in launches)  # the kernel reads the tensor


def test_adam_with_tensor_betas_and_weight_decay_matches_float_torch():
    # torch reads tensor betas in fp32 and float betas in float64: compare with the float run within TOL.
    params = _params()
    ref = _twin(params)
    hyper = dict(lr=torch.tensor(0.01), weight_decay=torch.tensor(0.05))
    opt = Adam(params, betas=(torch.tensor([0.8]), torch.tensor([0.99])), amsgrad=True, **hyper)
    ref_opt = torch.optim.Adam(ref, lr=0.01, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True)
    with recording() as launches:
        for _ in range(5):
            _set_grads(params, ref)
            opt.step()
            ref_opt.step()
            _assert_close(params, ref, opt, ref_opt)
    assert launches[0].meta["BETAS_PTR"] and launches[0].meta["WD_PTR"] and launches[0].meta["WEIGHT_DECAY"]


@pytest.mark.parametrize("ours_first", [True, False], ids=["fusednn_then_torch", "torch_then_fusednn"])
@pytest.mark.parametrize("cls,ref_cls", CLASSES, ids=["Adam", "AdamW"])
def test_adam_state_dict_round_trips_with_torch(cls, ref_cls, ours_first):
    hyper = dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.05, amsgrad=True)
    a = _params()
    b = _twin(a)
    ref = _twin(a)
    first_cls, second_cls = (cls, ref_cls) if ours_first else (ref_cls, cls)
    first, ref_opt = first_cls(a, **hyper), ref_cls(ref, **hyper)
    assert cls(b, **hyper).state_dict()["param_groups"] == ref_opt.state_dict()["param_groups"]
    for _ in range(2):
        _set_grads(a, ref)
        first.step()
        ref_opt.step()
    sd = first.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}
    assert isinstance(sd["state"][0]["step"], torch.Tensor) and sd["state"][0]["step"].item() == 2
    with torch.no_grad():
        for p, q in zip(b, a):
            p.copy_(q)
    second = second_cls(b, lr=1.0)  # hyper-parameters and state come from the state dict
    second.load_state_dict(sd)
    assert second.param_groups[0]["amsgrad"] and second.param_groups[0]["betas"] == (0.8, 0.99)
    for _ in range(3):
        _set_grads(b, ref)
        second.step()
        ref_opt.step()
    _assert_close(b, ref, second, ref_opt)
    assert all(st["step"].device == p.device for p, st in zip(b, second.state.values()))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=-0.1),
        dict(lr=torch.tensor([0.1, 0.2])),
        dict(eps=-1e-8),
        dict(betas=(1.0, 0.999)),
        dict(betas=(0.9, -0.1)),
        dict(weight_decay=-1e-4),
        dict(betas=(0.9, torch.tensor(0.999))),
        dict(lr=-0.1, eps=-1.0),
    ],
    ids=["lr", "tensor_lr", "eps", "beta0", "beta1", "weight_decay", "mixed_betas", "first_wins"],
)
@pytest.mark.parametrize("cls,ref_cls", CLASSES, ids=["Adam", "AdamW"])
def test_adam_raises_the_same_value_errors_as_torch(cls, ref_cls, kwargs):
    with pytest.raises(ValueError) as ref:
        ref_cls(_params(), **kwargs)
    with pytest.raises(ValueError) as ours:
        cls(_params(), **kwargs)
    assert str(ours.value) == str(ref.value)


def test_adam_refuses_sparse_grads_and_differentiable_and_leaves_state_alone():
    params = _params()
    opt = Adam(params, lr=0.01)
    before = [p.detach().clone() for p in params]
    _set_grads(params)
    params[2].grad = params[2].grad.to_sparse()
    with pytest.raises(RuntimeError, match=r"Adam does not support sparse gradients.*\(10, 84\)"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(params, before)) and len(opt.state) == 0
    with pytest.raises(NotImplementedError, match="differentiable"):
        AdamW(params, differentiable=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach`"):
        Adam(params, fused=True, foreach=True)


def test_adam_refuses_non_float32_params_and_mixed_devices_naming_the_tensor():
    params = _params()
    params[1] = torch.nn.Parameter(params[1].detach().double())
    opt = Adam(params, lr=0.01)
    _set_grads(params)
    with pytest.raises(ValueError, match=r"params\[1\] is torch.float64 on cpu; expected float32 on cpu"):
        opt.step()
    assert len(opt.state) == 0
    p = [torch.randn(3), torch.randn(3, device="meta")]
    s = [torch.zeros(()), torch.zeros((), device="meta")]
    with pytest.raises(ValueError, match=r"params\[1\] is torch.float32 on meta; expected float32 on cpu"):
        adam_step(p, [torch.randn(3), torch.randn(3, device="meta")], [torch.zeros(3)] * 2, [torch.zeros(3)] * 2,
                  None, s, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                  decoupled_weight_decay=False, amsgrad=False, maximize=False)
    assert s[0].item() == 0  # refused before the step counters were touched


def test_adam_step_multi_chunk_tensors_and_strided_grad_match_torch():
    # GPU launch configs (1024-element chunks) under the interpreter: the 3001-element tensor spans three
    # programs that must all read the same step; one gradient is a transposed view.
    shapes = [(6, 1, 5, 5), (6,), (10, 84), (1,), (3001,)]
    params = _params(shapes)
    ref = _twin(params)
    opt, ref_opt = AdamW(params, lr=0.01, amsgrad=True, maximize=True), torch.optim.AdamW(
        ref, lr=0.01, amsgrad=True, maximize=True)
    with configs.use_target("gpu"), recording() as launches:
        for _ in range(3):
            _set_grads(params, ref)
            g = torch.randn(84, 10).t()
            params[2].grad, ref[2].grad = g, g.clone()
            opt.step()
            ref_opt.step()
            _assert_close(params, ref, opt, ref_opt)
    assert [lc.grid for lc in launches] == [(7,)] * 3 and launches[0].meta["BLOCK"] == 1024


@pytest.mark.aot
def test_adam_kernel_compiles_for_sm90_without_spills():
    # Both constexpr extremes for Adam and AdamW: floats everywhere, and every hyper-parameter a pointer
    # with every branch on; with the GPU launch configs the step would use.
    reason = aot.unavailable_reason(90)
    if reason is not None:
        pytest.skip(f"cannot compile for sm_90 here: {reason}")
    params = _params()
    _set_grads(params)
    tensors = dict(lr=torch.tensor(0.01), betas=(torch.tensor(0.9), torch.tensor(0.99)),
                   weight_decay=torch.tensor(0.01), amsgrad=True, maximize=True)
    opts = [Adam(params), Adam(params, **tensors), AdamW(params), AdamW(params, **tensors)]
    launches = [lc for o in opts for lc in aot.collect(o.step)]
    compiled = aot.compile_launches(launches)
    assert len(compiled) == 4
    for c in compiled:
        assert "int_to_ptr" in c.ttir and c.job.arch == 90
        assert not c.resources.spills, c.resources


@pytest.mark.parametrize("cls, ref_cls", [(Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW)])
def test_adam_steady_steps_follow_every_change_between_steps(cls, ref_cls, monkeypatch):
    """As tests/test_sgd.py's: a step like the one before relaunches its launch after incrementing the step
    counters; lr, a moment replaced, a parameter's data replaced and a parameter without a gradient each
    take the general path, and every step matches torch."""
    params = _params()
    ref = _twin(params)
    opt, ref_opt = cls(params, lr=0.01, amsgrad=True), ref_cls(ref, lr=0.01, amsgrad=True)
    general = []
    real = opt._general_step
    monkeypatch.setattr(opt, "_general_step", lambda *a: (general.append(1), real(*a))[1])

    def grads_in_place(skip=()):
        helpers.grads_in_place(params, ref, skip)

    def lr():
        helpers.set_lr((opt, ref_opt), 0.003)

    def moment():
        for o, p in ((opt, params[0]), (ref_opt, ref[0])):
            o.state[p]["exp_avg"] = o.state[p]["exp_avg"] * -0.5

    def data():
        helpers.scale_data(params, ref, 3, 3.0)

    took = []
    for change in (None, None, None, lr, None, moment, None, data, None, "skip", None, None):
        grads_in_place(skip=(1,) if change == "skip" else ())
        if callable(change):
            change()
        before = len(general)
        opt.step()
        ref_opt.step()
        _assert_close(params, ref, opt, ref_opt)
        took.append(len(general) - before)
    # general: the first step (no state yet) and the one after (the first whose state is all there), each
    # change, and after the skipped parameter the step where its gradient is a new tensor; every other step
    # relaunches
    assert took == [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 0]
