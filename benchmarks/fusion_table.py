"""Launches and bytes per step of fusednn's models, fused and unfused, in training and inference, counted
by `stats()` with the launch configs of the GPU path and no kernel executed (so it runs anywhere, fast).

    python benchmarks/fusion_table.py [--batch 64] [--models lenet,resnet8] [--json FILE]

train: a forward and backward with autograd recording (batch norm with batch statistics);
eval: `model.eval()` under `torch.no_grad()` (the inference graph: batch norm folded into the conv).
Bytes are the distinct memory each launch is given (fusednn.launch.tensor_bytes), summed over launches.
"""
from __future__ import annotations

import argparse
import json

import torch

import fusednn
from fusednn import launch
from fusednn.compiler.configs import use_target
from fusednn.models import MODELS

_RGB = ("resnet8", "airbench", "mobilenet")  # built with in_channels=3, run on 3x32x32


def _model(name: str) -> torch.nn.Module:
    return MODELS[name](in_channels=3) if name in _RGB else MODELS[name]()


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
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--models", default="lenet,resnet8")
    p.add_argument("--json")
    a = p.parse_args()
    results = {m: measure(m, a.batch) for m in a.models.split(",")}
    print(f"batch {a.batch}; launches / MB per forward and backward (GPU launch configs, kernels not executed)")
    print(f"{'model':<9} {'mode':<6} {'fused fwd':>16} {'unfused fwd':>16} {'fused bwd':>16} {'unfused bwd':>16}")
    for m, r in results.items():
        for mode in ("train", "eval"):
            f, u = r[f"fused/{mode}"], r[f"unfused/{mode}"]
            cells = [f"{f['forward_launches']} / {f['forward_MB']:.2f}", f"{u['forward_launches']} / {u['forward_MB']:.2f}"]
            if mode == "train":
                cells += [f"{f['backward_launches']} / {f['backward_MB']:.2f}",
                          f"{u['backward_launches']} / {u['backward_MB']:.2f}"]
            else:
                cells += ["-", "-"]
            print(f"{m:<9} {mode:<6} " + " ".join(f"{c:>16}" for c in cells))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"batch": a.batch, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
