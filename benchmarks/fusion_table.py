"""Launches and bytes per step of fusednn's models, fused and unfused, in training and inference, counted
by `stats()` with the launch configs of the GPU path and no kernel executed (so it runs anywhere, fast).

    python benchmarks/fusion_table.py [--batch 64] [--models lenet,resnet8] [--json FILE]

train: a forward and backward with autograd recording (batch norm with batch statistics);
eval: `model.eval()` under `torch.no_grad()` (the inference graph: batch norm folded into the conv).
Bytes are the distinct memory each launch is given (fusednn.launch.tensor_bytes), summed over launches.

minimum: the analytic minimum bytes of the step (fusednn.compiler.bounds: compute and recomputation free, nothing
kept on chip between kernels; what a training batch norm's batch statistics and gradient sums force to
memory), and its number of kernels.

eager: the same step in torch eager on the CPU, counted at the aten level (a TorchDispatchMode below
autograd): every aten op that computes (views, detach and allocations excluded) and the distinct memory of
its tensor arguments and results. It stands for eager's launches and bytes (one kernel per aten op); on a
GPU, cuDNN and cuBLAS may split an op into several kernels.
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import fusednn
from fusednn import launch
from fusednn.compiler.bounds import groups, minimum_bytes
from fusednn.compiler.configs import use_target
from fusednn.models import MODELS

_RGB = ("resnet8", "airbench", "mobilenet")  # built with in_channels=3, run on 3x32x32


def _model(name: str) -> torch.nn.Module:
    return MODELS[name](in_channels=3) if name in _RGB else MODELS[name]()


_NO_COMPUTE = {"detach", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "alias",
               "lift_fresh"}


class _AtenOps(TorchDispatchMode):
    """Counts the aten ops that compute, and the distinct bytes each one's tensors span."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not func.is_view and name not in _NO_COMPUTE:
            tensors = tuple(t for t in pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor))
            self.ops += 1
            self.bytes += launch.tensor_bytes(tensors)
        return out


def eager(name: str, batch: int, mode: str) -> dict:
    """Aten ops and MB of one eager forward (and backward in train) of model `name`."""
    torch.manual_seed(0)
    net = _model(name).train(mode == "train")
    x = torch.randn(batch, 3 if name in _RGB else 1, 32, 32)
    with _AtenOps() as fwd:
        if mode == "train":
            y = net(x)
        else:
            with torch.no_grad():
                net(x)
    row = {"forward_launches": fwd.ops, "forward_MB": fwd.bytes / 1e6}
    if mode == "train":
        g = torch.ones_like(y)
        with _AtenOps() as bwd:
            y.backward(g)
        row |= {"backward_launches": bwd.ops, "backward_MB": bwd.bytes / 1e6}
    return row


def measure(name: str, batch: int) -> dict:
    out: dict = {}
    for fuse in (True, False):
        for mode in ("train", "eval"):
            torch.manual_seed(0)
            net = _model(name).train(mode == "train")
            c = fusednn.compile(net, fuse=fuse)
            x = torch.randn(batch, 3 if name in _RGB else 1, 32, 32)
            with use_target("gpu"), launch.recording(execute=False):
                if mode == "train":
                    y = c(x)
                    y.backward(torch.ones_like(y))
                else:
                    with torch.no_grad():
                        c(x)
            st = c.stats()
            row = {"forward_launches": st["forward"]["launches"], "forward_MB": st["forward"]["bytes"] / 1e6}
            if mode == "train":
                row |= {"backward_launches": st["backward"]["launches"], "backward_MB": st["backward"]["bytes"] / 1e6}
            out[f"{'fused' if fuse else 'unfused'}/{mode}"] = row
            if not fuse:
                m, gs = minimum_bytes(c.graph, train=mode == "train"), groups(c.graph)
                row = {"forward_launches": len(gs), "forward_MB": m["forward"] / 1e6}
                if mode == "train":  # a kernel with a batch norm inside takes two passes
                    row |= {"backward_launches": sum(1 + bool(g.normalized) for g in gs),
                            "backward_MB": m["backward"] / 1e6}
                out[f"minimum/{mode}"] = row
    for mode in ("train", "eval"):
        out[f"eager/{mode}"] = eager(name, batch, mode)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--models", default="lenet,resnet8")
    p.add_argument("--json")
    a = p.parse_args()
    results = {m: measure(m, a.batch) for m in a.models.split(",")}
    print(f"batch {a.batch}; launches / MB per forward and backward (GPU launch configs, kernels not executed; "
          "eager: aten ops that compute / MB)")
    kinds = ("fused", "unfused", "eager", "minimum")
    print(f"{'model':<9} {'mode':<6} " + " ".join(f"{k + ' ' + d:>16}" for d in ("fwd", "bwd") for k in kinds))
    for m, r in results.items():
        for mode in ("train", "eval"):
            cells = []
            for d in ("forward", "backward"):
                for k in kinds:
                    e = r[f"{k}/{mode}"]
                    cells.append(f"{e[d + '_launches']} / {e[d + '_MB']:.2f}" if d + "_launches" in e else "-")
            print(f"{m:<9} {mode:<6} " + " ".join(f"{c:>16}" for c in cells))
        f, u, lo = (r[f"{k}/train"] for k in ("fused", "unfused", "minimum"))
        step = {k: e["forward_MB"] + e["backward_MB"] for k, e in (("fused", f), ("unfused", u), ("minimum", lo))}
        print(f"{'':<16} train step: fused / unfused bytes {step['fused'] / step['unfused']:.2f}, "
              f"fused / minimum {step['fused'] / step['minimum']:.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"batch": a.batch, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
