"""Helpers imported by tests."""
from tests.conftest import rel_err  # noqa: F401


def grads_in_place(params, ref, skip=()) -> None:
    """Fresh gradients written into the existing ones where they are contiguous (as zero_grad(set_to_none=
    False) keeps them), the same values for `ref` in its dtype; None at positions in `skip`."""
    import torch

    for i, (p, q) in enumerate(zip(params, ref)):
        if i in skip:
            p.grad = q.grad = None
            continue
        g = torch.randn(p.shape)
        if p.grad is None or not p.grad.is_contiguous():
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        q.grad = g.to(q.dtype)


def set_lr(optimizers, lr: float) -> None:
    for o in optimizers:
        for grp in o.param_groups:
            grp["lr"] = lr


def scale_data(params, ref, i: int, by: float) -> None:
    """Replace parameter i's data (a new tensor, at a new address) in both lists."""
    import torch

    with torch.no_grad():
        params[i].data = params[i].data * by
        ref[i].data = ref[i].data * by


def relu_margin(model, x) -> float:
    """The smallest |z| / median |z| over the input z of every ReLU (F.relu, torch.relu) of a float64 forward
    of model on x. An element within float32's rounding of the kink (~1e-6 of typical values after a few
    layers) may land on either side in any float32 computation, and every gradient through it then differs
    by that element's whole contribution: a draw to redraw, not a difference to measure (fusednn and
    float32 torch each land on a side by luck)."""
    import copy

    import torch
    import torch.nn.functional as F

    seen: list = []
    relu, frelu = torch.relu, F.relu

    def record(fn):
        def wrapped(t, *a, **k):
            a_ = t.detach().abs().flatten()
            if a_.numel():
                seen.append((a_.min() / a_.median().clamp_min(1e-300)).item())
            return fn(t, *a, **k)
        return wrapped

    torch.relu, F.relu = record(relu), record(frelu)
    try:
        with torch.no_grad():
            copy.deepcopy(model).double()(x.double())
    finally:
        torch.relu, F.relu = relu, frelu
    return min(seen, default=float("inf"))
