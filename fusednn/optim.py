"""Optimizers whose step is one fused Triton launch per parameter group."""
from __future__ import annotations

from typing import Callable

import torch
from torch.optim.optimizer import ParamsT

from fusednn.kernels.sgd import sgd_step


class SGD(torch.optim.Optimizer):
    """torch.optim.SGD (same arguments, defaults, errors, state and state_dict) with a fused step.

    Each `step()` launches one Triton kernel per parameter group that updates every parameter with a
    gradient (see kernels/sgd.py); parameters without a gradient are skipped, as torch does. The state
    holds `momentum_buffer` per parameter exactly as torch.optim.SGD does, so state dicts move freely
    between the two. `foreach` and `fused` are accepted for compatibility and change nothing: the step
    is always fused. Parameters must be contiguous float32 tensors on one device per group; sparse
    gradients and `differentiable=True` are refused.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float | torch.Tensor = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        # Same checks, order and messages as torch.optim.SGD.__init__.
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if differentiable:
            raise NotImplementedError(
                "fusednn.optim.SGD: differentiable=True is not supported (the Triton update is not "
                "recorded by autograd); use torch.optim.SGD for differentiable optimization"
            )
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "maximize": maximize,
            "foreach": foreach,
            "differentiable": differentiable,
            "fused": fused,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Perform one optimization step: one Triton launch per group that has any gradient.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            use_momentum = group["momentum"] != 0
            params, grads, bufs, first = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(
                        "fusednn.optim.SGD does not support sparse gradients; use torch.optim.SGD for "
                        f"parameters with sparse gradients (got one for a parameter of shape {tuple(p.shape)})"
                    )
                params.append(p)
                grads.append(p.grad)
                if use_momentum:
                    buf = self.state.get(p, {}).get("momentum_buffer")  # .get: no state entry yet
                    first.append(buf is None)
                    if buf is None:
                        # Written, not read, by the kernel on this first step.
                        buf = torch.empty_like(p, memory_format=torch.contiguous_format)
                    elif not buf.is_contiguous():
                        buf = buf.contiguous()  # e.g. loaded from a state dict with other strides
                    bufs.append(buf)
            if not params:
                continue
            sgd_step(
                params,
                grads,
                bufs if use_momentum else None,
                lr=float(group["lr"]),
                momentum=float(group["momentum"]),
                dampening=float(group["dampening"]),
                weight_decay=float(group["weight_decay"]),
                nesterov=bool(group["nesterov"]),
                maximize=bool(group["maximize"]),
                first_step=first if use_momentum else False,
            )
            # Only after a successful launch: a refused step leaves the state as it was.
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf
        return loss
