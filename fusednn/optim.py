"""Optimizers whose step is one fused Triton launch per parameter group: SGD, Adam, AdamW."""

from __future__ import annotations

import functools
from typing import Callable

import torch
from torch.optim.optimizer import ParamsT

from fusednn.checks import dict_version, tensor_guards
from fusednn.kernels.adam import adam_step
from fusednn.kernels.sgd import hyper_arg, sgd_step
from fusednn.launch import launch, recording

__all__ = ["SGD", "Adam", "AdamW"]


def _nonzero(value: float | torch.Tensor, device: torch.device) -> bool:
    """Whether a branch on `value != 0` is taken; a tensor the kernel reads on `device` counts as nonzero."""
    arg, is_ptr = hyper_arg(value, device, "hyper-parameter", "fusednn.optim")
    return is_ptr or arg != 0


class _Fused(torch.optim.Optimizer):
    """What fusednn's optimizers share: `step()` runs the closure, then one launch per parameter group
    that has any gradient (`_step_group`)."""

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
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return loss

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        """Update one group's parameters that have a gradient, in one launch: the last step's launch again
        when nothing it depends on changed (`_steady_key`, then a check of every tensor's dtype, device,
        sizes and strides against the last step's), else built anew (`_general_step`), every check made and
        every table looked up."""
        found = self._steady_key(group, params)
        steady = self.__dict__.setdefault("_fnn_steady", {})  # id(group) -> (key, launch, before it, check)
        last = steady.get(id(group))
        if found is not None and last is not None and last[0] == found[0] and last[3](found[1]):
            _, rec, before, _ = last
            if before is not None:
                before()
            launch(rec.kernel, rec.grid, *rec.args, nbytes=rec.bytes, **rec.meta)
            return
        steady.pop(id(group), None)
        with recording() as launches:
            before = self._general_step(group, params)
        if found is not None and len(launches) == 1 and _dense_f32(*found[1]):
            steady[id(group)] = (found[0], launches[0], before, _same_tensors(found[1]))

    def _steady_key(self, group: dict, params: list[torch.Tensor]) -> tuple[tuple, list[torch.Tensor]] | None:
        """(key, tensors): what a step's launch depends on, read cheaply, and the tensors whose dtype,
        device, sizes and strides must be as on the step that recorded it; None where the general path
        must run."""
        return None

    def _general_step(self, group: dict, params: list[torch.Tensor]) -> Callable[[], None] | None:
        """One group's step; returns what a relaunch must do before its launch (None: nothing)."""
        raise NotImplementedError

    def _state_tensors(self, params: list[torch.Tensor], names: tuple[str, ...]) -> list[torch.Tensor] | None:
        """[state[p][k] for k in names for p in params], or None where one is not a tensor. Read through the
        last read's list while neither `self.state` nor any of these parameters' state dicts changed (by
        version tag; each lookup hashes a tensor in Python, ~0.3 us); with .get, as `self.state` is a
        defaultdict that a lookup would fill."""
        state, ids = self.state, tuple(map(id, params))
        last = self.__dict__.get("_fnn_states")
        if (last is not None and dict_version is not None and last[0] is state and last[1] == ids
                and last[2] == names and dict_version(state) == last[3]
                and list(map(dict_version, last[4])) == last[5]):
            return last[6]
        entries = [state.get(p) for p in params]
        if None in entries:
            return None
        tensors = [e.get(k) for k in names for e in entries]
        if not all(isinstance(t, torch.Tensor) for t in tensors):
            return None
        if dict_version is not None:
            self.__dict__["_fnn_states"] = (state, ids, names, dict_version(state), entries,
                                            list(map(dict_version, entries)), tensors)
        return tensors


def _dense_f32(*tensors: torch.Tensor) -> bool:
    """Whether every tensor is a dense, contiguous float32 tensor (what a relaunch may read in place)."""
    return all(t.layout is torch.strided and t.dtype is torch.float32 and t.is_contiguous() for t in tensors)


def _same_tensors(tensors: list[torch.Tensor]) -> Callable[[list[torch.Tensor]], bool]:
    """A check that tensors (one per position) have the class, dtype, device, sizes and strides of these:
    one call of torch's C++ tensor check where torch has it (~0.1 us a tensor), else Python."""
    guards = tensor_guards(list(tensors), set())
    if guards is not None:
        return lambda ts: guards.check(*ts)
    shapes = [(t.shape, t.stride()) for t in tensors]
    return lambda ts: _dense_f32(*ts) and [(t.shape, t.stride()) for t in ts] == shapes


_address = torch.Tensor.data_ptr


def _key(hyper: tuple, params: list[torch.Tensor], tensors: list[torch.Tensor]) -> tuple:
    """A steady key: the hyper-parameters, the parameters' identities and every tensor's address (the
    launch's address tables hold these; sizes and layouts are checked apart, `_same_tensors`)."""
    return hyper, tuple(map(id, params)), tuple(map(_address, tensors))


class SGD(_Fused):
    """torch.optim.SGD (same arguments, defaults, errors, state and state_dict) with a fused step.

    Each `step()` launches one Triton kernel per parameter group that updates every parameter with a
    gradient (see kernels/sgd.py); parameters without a gradient are skipped, as torch does. The state
    holds `momentum_buffer` per parameter exactly as torch.optim.SGD does, so state dicts move freely
    between the two. `foreach` and `fused` are accepted for compatibility and change nothing: the step
    is always fused. Parameters must be contiguous float32 tensors on one device per group; sparse
    gradients and `differentiable=True` are refused.

    `lr`, `momentum` and `weight_decay` may be 1-element tensors. One on the parameters' device is read by
    the kernel at every step (torch's `capturable` semantics: a scheduler that `fill_`s it drives a
    captured CUDA graph without re-capture); on that path a tensor momentum or weight decay is treated as
    nonzero, since testing it would need a device sync. A float, or a tensor elsewhere, is read on the host.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        momentum: float | torch.Tensor = 0,
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

    def _steady_key(self, group: dict, params: list[torch.Tensor]) -> tuple[tuple, list[torch.Tensor]] | None:
        """The hyper-parameters (Python numbers only), the parameters, their gradients and, with momentum,
        their buffers (`_Fused._steady_key`). None where the step takes the general path: a tensor
        hyper-parameter, or with momentum a parameter without a buffer (a first step, which allocates one)."""
        hyper = (group["lr"], group["momentum"], group["dampening"], group["weight_decay"], group["nesterov"],
                 group["maximize"])
        if any(isinstance(h, torch.Tensor) for h in hyper):
            return None
        tensors = params + [p.grad for p in params]
        if group["momentum"] != 0:
            bufs = self._state_tensors(params, ("momentum_buffer",))
            if bufs is None:  # a first step: its buffer is allocated anew (a relaunch would write a freed one)
                return None
            tensors += bufs
        return _key(hyper, params, tensors), tensors

    def _general_step(self, group: dict, params: list[torch.Tensor]) -> None:
        """One group's step, every check made and every table looked up: `sgd_step`."""
        use_momentum = _nonzero(group["momentum"], params[0].device)
        grads, bufs, first = [], [], []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(
                    "fusednn.optim.SGD does not support sparse gradients; use torch.optim.SGD for "
                    f"parameters with sparse gradients (got one for a parameter of shape {tuple(p.shape)})"
                )
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
        sgd_step(
            params,
            grads,
            bufs if use_momentum else None,
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=float(group["dampening"]),
            weight_decay=group["weight_decay"],
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            first_step=first if use_momentum else False,
        )
        # Only after a successful launch: a refused step leaves the state as it was.
        for p, buf in zip(params, bufs):
            self.state[p]["momentum_buffer"] = buf


class Adam(_Fused):
    """torch.optim.Adam (same arguments, defaults, errors, state and state_dict) with a fused step.

    Each `step()` increments the step counters of the parameters that have a gradient (one
    `torch._foreach_add_`) and launches one Triton kernel per parameter group (see kernels/adam.py);
    parameters without a gradient are skipped, as torch does. The state holds torch's keys (`step`,
    `exp_avg`, `exp_avg_sq`, and `max_exp_avg_sq` with amsgrad), so state dicts move freely between the
    two. The step counter lives on the parameter's device and the bias corrections are computed from it
    inside the kernel: the step is always capturable (no host sync), whatever `capturable` says; `foreach`,
    `fused` and `capturable` are accepted and recorded for compatibility. `lr`, the betas (both or
    neither) and `weight_decay` may be 1-element tensors: one on the parameters' device is read by the
    kernel (a scheduler's in-place `fill_` drives a captured CUDA graph), anything else is read on the host.
    Parameters must be contiguous float32 tensors on one device per group; sparse gradients and
    `differentiable=True` are refused.
    """

    _name = "Adam"

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | torch.Tensor = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
    ) -> None:
        # Same checks, order and messages as torch.optim.Adam.__init__, except torch's refusals of tensor
        # hyper-parameters with foreach=True and capturable=False: a limit of torch's foreach path, not ours.
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not (
            (isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))
        ):
            raise ValueError("betas must be either both floats or both Tensors")
        for i, b in enumerate(betas):
            if isinstance(b, torch.Tensor) and b.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() != 0 else b for b in betas)
        if differentiable:
            raise NotImplementedError(
                f"fusednn.optim.{self._name}: differentiable=True is not supported (the Triton update is not "
                f"recorded by autograd); use torch.optim.{self._name} for differentiable optimization"
            )
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "maximize": maximize,
            "foreach": foreach,
            "capturable": capturable,
            "differentiable": differentiable,
            "fused": fused,
            "decoupled_weight_decay": decoupled_weight_decay,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)

    def _step_counter(self, p: torch.Tensor, state: dict) -> torch.Tensor:
        """state["step"] as a float32 0-dim tensor on p's device (torch's non-capturable state keeps it on the CPU)."""
        step = state.get("step")
        if step is None:
            return torch.zeros((), dtype=torch.float32, device=p.device)
        if not isinstance(step, torch.Tensor):
            return torch.tensor(float(step), dtype=torch.float32, device=p.device)
        if step.device != p.device or step.dtype != torch.float32:
            # Once, after loading torch's state dict: a copy outside any captured graph.
            return step.to(device=p.device, dtype=torch.float32)
        return step

    def _steady_key(self, group: dict, params: list[torch.Tensor]) -> tuple[tuple, list[torch.Tensor]] | None:
        """SGD's `_steady_key` for Adam: the hyper-parameters (Python numbers), the parameters, their
        gradients, step counters and moments (all present); the step counters are incremented before each
        relaunch."""
        hyper = (group["lr"], *group["betas"], group["eps"], group["weight_decay"], group["amsgrad"],
                 group["maximize"], group["decoupled_weight_decay"])
        if any(isinstance(h, torch.Tensor) for h in hyper):
            return None
        names = ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ())
        held = self._state_tensors(params, names)
        if held is None:
            return None  # missing (a first step), or a step counter held as a number (an older state dict)
        tensors = params + [p.grad for p in params] + held
        return _key(hyper, params, tensors), tensors

    def _general_step(self, group: dict, params: list[torch.Tensor]) -> Callable[[], None]:
        """One group's step, every check made and every table looked up: `adam_step`."""
        amsgrad = bool(group["amsgrad"])
        grads, steps, new = [], [], []
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
        bufs: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"fusednn.optim.{self._name} does not support sparse gradients; use torch.optim.SparseAdam "
                    f"for parameters with sparse gradients (got one for a parameter of shape {tuple(p.shape)})"
                )
            grads.append(p.grad)
            state = self.state.get(p, {})  # .get: no state entry until the launch succeeds
            entry = {"step": self._step_counter(p, state)}
            for k in keys:
                buf = state.get(k)
                if buf is None:
                    buf = torch.zeros_like(p, memory_format=torch.contiguous_format)
                elif not buf.is_contiguous():
                    buf = buf.contiguous()  # e.g. loaded from a state dict with other strides
                entry[k] = buf
                bufs[k].append(buf)
            steps.append(entry["step"])
            new.append(entry)
        beta1, beta2 = group["betas"]
        adam_step(
            params,
            grads,
            bufs["exp_avg"],
            bufs["exp_avg_sq"],
            bufs["max_exp_avg_sq"] if amsgrad else None,
            steps,
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=float(group["eps"]),
            weight_decay=group["weight_decay"],
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            amsgrad=amsgrad,
            maximize=bool(group["maximize"]),
        )
        # Only after a successful launch: a refused step leaves the state as it was.
        for p, entry in zip(params, new):
            self.state[p].update(entry)
        return functools.partial(torch._foreach_add_, steps, 1.0)  # what adam_step does before its launch


class AdamW(Adam):
    """torch.optim.AdamW (decoupled weight decay, default 1e-2) with a fused step; see `Adam`."""

    _name = "AdamW"

    def __init__(
        self,
        params: ParamsT,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | torch.Tensor = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
            capturable=capturable, differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
        )

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True  # as torch: AdamW loads any state as AdamW
