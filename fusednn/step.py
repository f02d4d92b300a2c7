"""One training step as one callable, optionally captured whole into a CUDA graph.

`train_step(model, loss_fn, optimizer)` returns `step(x, y) -> loss` that zeroes the gradients (in place,
torch's `zero_grad(set_to_none=False)`), runs forward, loss, backward and `optimizer.step()`. On CUDA
the step is captured once into a `torch.cuda.CUDAGraph` and every later call is one graph replay:
LeNet's ~40 kernel launches become one `cudaGraphLaunch`, so the host's launch overhead (tens of µs
per launch in Python) disappears from the step time.

Capture follows torch's "whole network capture" recipe (torch.cuda docs, CUDA Graphs): a few eager warm-up
steps on a side stream (lazy initialisation, Triton compiles, optimizer state and the persistent `.grad`
tensors), then the capture of one step on static input/target buffers. Here the warm-up steps are the
caller's first real batches, so the sequence of updates is the same as without a graph.

What a captured graph freezes (the constraints of CUDA graphs, stated for this step):
- Shapes, dtypes and devices of x and y: a different one raises ValueError (pad the last batch or
  drop it, or make a new step).
- Python scalars passed to kernels. A hyper-parameter given as a Python float (or as a tensor on another
  device than the parameters, e.g. a CPU lr for CUDA parameters) is read on the host and passed to the
  kernel as a constant, so a captured graph keeps the value it was captured with. Every replay compares
  the optimizer's hyper-parameters (and the model's train/eval mode) with the captured ones; on a change
  it warns once and re-captures (each re-capture costs about one eager step), so a schedule over a float
  lr re-captures every step.
  A 1-element tensor on the parameters' device is different: `fusednn.optim.SGD`, `Adam` and `AdamW` pass
  its address and their kernels load it at every replay (torch's `capturable` semantics; torch's own
  capturable/fused optimizers do the same). torch's schedulers (`torch.optim.lr_scheduler`) `fill_` a
  tensor lr in place, so `SGD(params, lr=torch.tensor(0.1, device="cuda"))` with any scheduler drives
  the captured graph with no re-capture: such a tensor is compared by identity, not value. Adam's step
  counters live on the device too, and its bias corrections are computed from them inside the kernel.
- Random numbers drawn on the host: fusednn's dropout draws its seed from torch's CPU RNG at each
  forward, so inside a captured graph every replay uses the same dropout mask (the one of the capture).
- Tensors the graph reads and writes: parameters, their `.grad` and the optimizer state must stay the
  same tensors. Do not set grads to None, load an optimizer state dict or move the model between
  replays; make a new step instead.
The returned loss is the graph's static output tensor: the next call overwrites it, so read it
(`.item()`) or clone it before then.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch

from fusednn import launch as _launch

log = logging.getLogger("fusednn")


def _on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda


def _grads(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


def _frozen(v: Any, device: torch.device | None) -> Any:
    """A hyper-parameter as the captured graph sees it: a tensor on the parameters' device is read in place
    by the step (compare identity; its value may change), anything else is a value the capture copied."""
    if isinstance(v, torch.Tensor):
        return ("in-place", id(v)) if v.device == device else ("tensor", v.detach().double().tolist())
    if isinstance(v, (tuple, list)):  # e.g. Adam's betas
        return tuple(_frozen(x, device) for x in v)
    return v


def _device(group: dict) -> torch.device | None:
    return group["params"][0].device if group["params"] else None


class TrainStep:
    """The callable `train_step` returns: `step(x, y) -> loss`. See the module docstring."""

    def __init__(self, model: Callable, loss_fn: Callable | None, optimizer: torch.optim.Optimizer,
                 cuda_graph: bool | None, warmup: int, autocast: torch.dtype | None = None,
                 scaler: "torch.amp.GradScaler | None" = None) -> None:
        if warmup < 2:
            # Step 1 creates grads and optimizer state; fusednn's optimizers build their address tables (a host-to-
            # device copy, which capture forbids) for the steady state on step 2.
            raise ValueError(f"train_step: warmup must be >= 2 eager steps before capture, got {warmup}")
        if scaler is not None and cuda_graph:
            raise ValueError("train_step: a GradScaler reads its inf/NaN check on the host each step, which a CUDA "
                             "graph cannot capture; pass cuda_graph=False")
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.autocast, self.scaler = autocast, scaler
        self.cuda_graph, self.warmup = (False if scaler is not None else cuda_graph), warmup
        self.calls = 0
        self.captures = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.launches: list[_launch.Launch] = []  # fusednn launches of the captured step (kept alive with it)
        self._x: torch.Tensor | None = None  # static input, target and loss of the captured step
        self._y: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self._captured: list[tuple[dict, str, Any]] = []
        self._modes: list[tuple[torch.nn.Module, bool]] = []
        self._warned = False

    def eager(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Zero grads in place, forward, loss, backward, optimizer step; returns the detached loss."""
        grads = _grads(self.optimizer)
        if grads:
            torch._foreach_zero_(grads)  # in place: the .grad tensors (and their addresses) persist
        # no cast cache: a captured graph must not keep casts made for one replay (torch's CUDA graphs notes)
        with torch.autocast(x.device.type, dtype=self.autocast, enabled=self.autocast is not None, cache_enabled=False):
            loss = self.model(x, y) if self.loss_fn is None else self.loss_fn(self.model(x), y)
        if self.scaler is None:
            loss.backward()
            self.optimizer.step()
        else:  # scaled loss; the step unscales the gradients and is skipped when any is inf or NaN
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        return loss.detach()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Run one training step on batch (x, y); returns the loss (the static loss tensor when replaying)."""
        self.calls += 1
        if self.graph is not None:
            self._check_batch(x, y)
            if self._changed():
                self._recapture_notice()
                self._capture(x, y)
            return self._replay(x, y)
        if not (_on_cuda(x) if self.cuda_graph is None else self.cuda_graph):
            return self.eager(x, y)
        if not (_on_cuda(x) and torch.cuda.is_available()):
            raise ValueError(f"train_step: cuda_graph=True needs CUDA tensors, got x on {x.device}")
        if self.calls <= self.warmup:
            return self._warm(x, y)
        self._capture(x, y)
        return self._replay(x, y)

    @property
    def graphed(self) -> bool:
        """True once the step runs as a CUDA graph replay."""
        return self.graph is not None

    # -- the graph path ------------------------------------------------------------------------------
    def _warm(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            loss = self.eager(x, y)
        torch.cuda.current_stream(x.device).wait_stream(side)
        return loss

    def _capture(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self._x is None:
            self._x, self._y = torch.empty_like(x), torch.empty_like(y)  # outside the graph's memory pool
        self._x.copy_(x)  # not read by the capture, but a real batch is the safe thing to capture on
        self._y.copy_(y)
        self.graph = None  # free the previous graph's memory pool before capturing anew
        graph = torch.cuda.CUDAGraph()
        with _launch.recording() as rec:
            with torch.cuda.graph(graph):  # capture records kernels, runs nothing: the caller replays
                loss = self.eager(self._x, self._y)
        self.graph, self._loss, self.launches = graph, loss, rec  # the records hold every tensor the graph reads
        self._captured = [(g, k, _frozen(v, _device(g))) for g in self.optimizer.param_groups
                          for k, v in g.items() if k != "params"]
        mods = list(self.model.modules()) if isinstance(self.model, torch.nn.Module) else []
        self._modes = [(m, m.training) for m in mods]
        self.captures += 1

    def _replay(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self._x.copy_(x)  # type: ignore[union-attr]
        self._y.copy_(y)  # type: ignore[union-attr]
        self.graph.replay()  # type: ignore[union-attr]
        return self._loss  # type: ignore[return-value]

    def _changed(self) -> bool:
        return (any(_frozen(g[k], _device(g)) != v for g, k, v in self._captured)
                or any(m.training != t for m, t in self._modes))

    def _check_batch(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for name, t, s in (("x", x, self._x), ("y", y, self._y)):
            assert s is not None
            if t.shape != s.shape or t.dtype != s.dtype or t.device != s.device:
                raise ValueError(
                    f"train_step: the step was captured in a CUDA graph for {name} {list(s.shape)} {s.dtype} on "
                    f"{s.device}, got {list(t.shape)} {t.dtype} on {t.device}; a captured graph has fixed shapes. "
                    "Pad or drop the last batch (DataLoader(drop_last=True)), or make a new train_step.")

    def _recapture_notice(self) -> None:
        msg = ("train_step: the optimizer's hyper-parameters or the model's train/eval mode changed since the "
               "CUDA graph was captured (the graph holds Python-float hyper-parameters such as the lr as "
               "constants); re-capturing. Changing them every step re-captures every step: give the "
               "optimizer a tensor lr on the parameters' device to change it without re-capture.")
        if self._warned:
            log.info(msg)
        else:
            log.warning(msg)
            self._warned = True


def train_step(model: Callable, loss_fn: Callable | None, optimizer: torch.optim.Optimizer, *,
               cuda_graph: bool | None = None, warmup: int = 3, autocast: torch.dtype | None = None,
               scaler: "torch.amp.GradScaler | None" = None) -> TrainStep:
    """A callable `step(x, y) -> loss` running one whole training step, captured in a CUDA graph on CUDA.

    Args:
        model: a fusednn CompiledModule / compiled function or a plain torch module or function.
        loss_fn: `loss_fn(model(x), y)`; None when `model(x, y)` itself returns the loss (e.g.
            `fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))`, which runs the loss in fusednn too).
        optimizer: any torch optimizer over the model's parameters (e.g. `fusednn.optim.SGD`).
        cuda_graph: capture the step in a CUDA graph; None means yes for CUDA inputs, no for CPU inputs.
        warmup: eager steps (on a side stream, with the caller's batches) before the capture; at least 2.
        autocast: run forward and loss under torch.autocast(dtype=autocast) (e.g. torch.float16).
        scaler: a torch.amp.GradScaler: the loss is scaled, the step unscales and skips non-finite
            gradients; its host-side check rules out a CUDA graph (cuda_graph None means no).
    """
    return TrainStep(model, loss_fn, optimizer, cuda_graph, warmup, autocast, scaler)
