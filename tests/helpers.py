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
