"""fusednn's own host (Python) cost per kernel launch in a LeNet training step, kernels not run.

Every launch goes through `fusednn.launch.launch`; inside `launch.recording(execute=False)` it records the
launch and returns before Triton's launcher, so what is timed is fusednn's Python (specialisation lookup,
allocation, shape checks, launch configs, the autograd node) plus torch's autograd bookkeeping, and none of
Triton's launcher, the driver or the kernel. The step is forward (LeNet + cross-entropy compiled as one
graph), backward, and `fusednn.optim.SGD.step()`; each phase is reported in microseconds per launch. The
specialisation-key cost (live parameters, the signature, the batch wildcard) is timed separately per call.

    python benchmarks/host_cost.py [--batch 64] [--steps 300] [--unfused]

Timings live here, never in tests. They depend on the machine; numbers are medians of `--rounds` rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fusednn
from fusednn import api, launch
from fusednn.compiler import batch as batching
from fusednn.models import LeNet
from fusednn.optim import SGD


def _median_us(phase: Callable[[], None], steps: int, rounds: int, before: Callable[[], None] | None = None,
               rec: list | None = None) -> float:
    """Median over rounds of the mean time of `phase` in microseconds (`before`, untimed, runs first)."""
    per = []
    for _ in range(rounds):
        total = 0.0
        for _ in range(steps):
            if before is not None:
                before()
            if rec is not None:
                del rec[:]  # the recording keeps every launch: drop them between calls
            t0 = time.perf_counter()
            phase()
            total += time.perf_counter() - t0
        per.append(total / steps * 1e6)
    return statistics.median(per)


def measure(batch: int = 64, steps: int = 300, rounds: int = 5, fuse: bool = True) -> dict:
    """{phase: {"us_per_call", "launches", "us_per_launch"}} for forward, backward and optimizer, and the
    specialisation key's cost per call."""
    torch.manual_seed(0)
    net = LeNet()
    step_fn = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y), fuse=fuse)
    opt = SGD(net.parameters(), lr=0.01, momentum=0.9)
    x, y = torch.randn(batch, 1, 32, 32), torch.randint(0, 10, (batch,))
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
    with launch.recording(execute=False) as rec:
        forward(), backward(), opt.step()  # compile, and create the momentum buffers
        for name, (phase, before) in phases.items():
            if before is not None:
                before()
            del rec[:]
            phase()
            n = len(rec)
            us = _median_us(phase, steps, rounds, before, rec)
            out[name] = {"us_per_call": round(us, 1), "launches": n, "us_per_launch": round(us / n, 2)}

    def key() -> None:
        tensors = step_fn._tensors()
        _, at = batching.batch_of((x, y))
        api._signature((x, y), tensors, step_fn._fnn_named_modules(), at)

    out["key"] = {"us_per_call": round(_median_us(key, steps, rounds), 1)}
    out["config"] = {"batch": batch, "fuse": fuse, "steps": steps, "rounds": rounds, "torch": torch.__version__,
                     "kernels": "not executed (launch.recording(execute=False))"}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--unfused", action="store_true", help="fuse=False: one kernel per op")
    a = p.parse_args()
    r = measure(a.batch, a.steps, a.rounds, fuse=not a.unfused)
    print(f"LeNet training step, batch {a.batch}, {'unfused' if a.unfused else 'fused'}, kernels not executed")
    print(f"{'phase':<10} {'launches':>8} {'us/call':>9} {'us/launch':>10}")
    for name in ("forward", "backward", "optimizer"):
        e = r[name]
        print(f"{name:<10} {e['launches']:>8} {e['us_per_call']:>9} {e['us_per_launch']:>10}")
    print(f"{'key':<10} {'':>8} {r['key']['us_per_call']:>9}   (specialisation key, per call; part of forward)")


if __name__ == "__main__":
    main()
