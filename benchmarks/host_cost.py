"""fusednn's own host (Python) cost per kernel launch in a training step (LeNet by default), kernels not run.

Every launch goes through `fusednn.launch.launch`; inside `launch.suppressed()` it returns just before
Triton's launcher, so what is timed is fusednn's Python as a training loop runs it (specialisation lookup,
allocation, shape checks, launch configs, the runtime's launch counting, the autograd node) plus torch's
autograd bookkeeping, and none of Triton's launcher, the driver or the kernel. The step is forward (LeNet + cross-entropy compiled as one
graph), backward, and `fusednn.optim.SGD.step()`; each phase is reported in microseconds per launch. The
specialisation-key cost (live parameters, the signature, the batch wildcard) is timed separately per call.

    python benchmarks/host_cost.py [--batch 64] [--steps 300] [--unfused] [--model resnet8]

Timings live here, never in tests. They depend on the machine; numbers are medians of `--rounds` rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fusednn
from fusednn import api, launch
from fusednn.compiler import batch as batching
from fusednn.models import MODELS
from fusednn.optim import SGD


def _median_us(phase: Callable[[], None], steps: int, rounds: int, before: Callable[[], None] | None = None) -> float:
    """Median over rounds of the mean time of `phase` in microseconds (`before`, untimed, runs first)."""
    per = []
    for _ in range(rounds):
        total = 0.0
        for _ in range(steps):
            if before is not None:
                before()
            t0 = time.perf_counter()
            phase()
            total += time.perf_counter() - t0
        per.append(total / steps * 1e6)
    return statistics.median(per)


class _Nothing(torch.autograd.Function):
    """torch's own cost of a custom autograd function of n inputs that computes nothing."""

    @staticmethod
    def forward(ctx, *ts: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(*ts)
        return ts[0].new_empty(())

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple:  # type: ignore[override]
        _ = ctx.saved_tensors
        return (None,) * len(_)


def _torch_floor(n_inputs: int, steps: int, rounds: int, opt: torch.optim.Optimizer) -> dict:
    """What torch itself costs around fusednn's Python, per call: a custom autograd function's forward and
    backward with as many inputs as the step's graph, and torch.optim.Optimizer.step's wrapper around a step
    that does nothing. fusednn cannot go below these; its own cost is the phase minus the floor."""
    ts = [torch.zeros(1, requires_grad=True) for _ in range(n_inputs)]
    state: dict = {}

    def fwd() -> None:
        state["y"] = _Nothing.apply(*ts)

    class _Empty(torch.optim.Optimizer):  # torch wraps every optimizer's step (hooks, profiler label)
        @torch.no_grad()
        def step(self, closure=None):  # type: ignore[override]
            return None

    empty = _Empty([p for g in opt.param_groups for p in g["params"]], {})
    return {"forward": round(_median_us(fwd, steps, rounds), 1),
            "backward": round(_median_us(lambda: state["y"].backward(), steps, rounds, fwd), 1),
            "optimizer": round(_median_us(empty.step, steps, rounds), 1)}


_RGB = ("resnet8", "airbench", "mobilenet")  # built with in_channels=3, run on 3x32x32


def measure(batch: int = 64, steps: int = 300, rounds: int = 5, fuse: bool = True, model: str = "lenet") -> dict:
    """{phase: {"us_per_call", "launches", "us_per_launch"}} for forward, backward and optimizer, and the
    specialisation key's cost per call."""
    torch.manual_seed(0)
    net = MODELS[model](in_channels=3) if model in _RGB else MODELS[model]()
    step_fn = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y), fuse=fuse)
    opt = SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 3 if model in _RGB else 1, 32, 32), torch.randint(0, 10, (batch,))
    state: dict = {}

    def forward() -> None:
        state["loss"] = step_fn(x, y)

    def backward() -> None:
        state["loss"].backward()

    def forward_fresh_grads() -> None:
        # Gradients set to None, as a training loop's zero_grad does: autograd then keeps fusednn's gradient
        # tensors instead of adding them into old ones (which, never computed here, may hold denormals that
        # make the CPU's additions ~100x slower).
        opt.zero_grad(set_to_none=True)
        forward()

    phases = {"forward": (forward, None), "backward": (backward, forward_fresh_grads), "optimizer": (opt.step, None)}
    out: dict = {}
    with launch.suppressed():
        forward(), backward(), opt.step()  # compile, and create the momentum buffers
        for name, (phase, before) in phases.items():
            if before is not None:
                before()
            with launch.recording(execute=False) as rec:  # the phase's launches, counted once
                phase()
            n = len(rec)
            us = _median_us(phase, steps, rounds, before)
            out[name] = {"us_per_call": round(us, 1), "launches": n, "us_per_launch": round(us / n, 2)}

    def full_key() -> None:
        tensors = step_fn._tensors()
        _, at = batching.batch_of((x, y))
        api._signature((x, y), tensors, step_fn._fnn_named_modules(), at)

    guard = step_fn._fnn_guard
    assert guard is not None and guard.tensors((x, y)) is not None, "the steady-state guard must accept the call"
    out["key"] = {"us_per_call": round(_median_us(lambda: guard.tensors((x, y)), steps, rounds), 1)}
    out["full_key"] = {"us_per_call": round(_median_us(full_key, steps, rounds), 1)}
    out["floor"] = _torch_floor(len(step_fn._tensors()) + 2, steps, rounds, opt)
    out["config"] = {"model": model, "batch": batch, "fuse": fuse, "steps": steps, "rounds": rounds, "torch": torch.__version__,
                     "kernels": "not executed (launch.suppressed())"}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--unfused", action="store_true", help="fuse=False: one kernel per op")
    p.add_argument("--model", default="lenet", choices=sorted(MODELS))
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args()
    r = measure(a.batch, a.steps, a.rounds, fuse=not a.unfused, model=a.model)
    print(f"{a.model} training step, batch {a.batch}, {'unfused' if a.unfused else 'fused'}, kernels not executed")
    print(f"{'phase':<10} {'launches':>8} {'us/call':>9} {'us/launch':>10} {'torch floor':>12} {'fusednn us/launch':>18}")
    for name in ("forward", "backward", "optimizer"):
        e, floor = r[name], r["floor"][name]
        own = (e["us_per_call"] - floor) / e["launches"]
        e["fusednn_us_per_launch"] = round(own, 2)
        print(f"{name:<10} {e['launches']:>8} {e['us_per_call']:>9} {e['us_per_launch']:>10} {floor:>12} {own:>18.2f}")
    print(f"{'key':<10} {'':>8} {r['key']['us_per_call']:>9}   (steady-state specialisation check per call; part of forward)")
    print(f"{'full key':<10} {'':>8} {r['full_key']['us_per_call']:>9}   (the full key, on a call after a change)")
    print("torch floor: a custom autograd.Function of as many inputs that computes nothing (forward, backward) and "
          "torch.optim's step wrapper around an empty step; fusednn us/launch = (us/call - floor) / launches")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=1)

if __name__ == "__main__":
    main()
