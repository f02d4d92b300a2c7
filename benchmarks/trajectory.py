"""How far a fusednn training run drifts from torch eager float32, next to how far eager float32 drifts from
eager float64 on the same run: SGD with momentum from the same weights on the same random batches.

    python benchmarks/trajectory.py --model airbench --size 32 --batch 4 --steps 20 --lr 0.02

Prints, per step, the relative distance of the first parameter (the input layer's weight) of eager float64,
fusednn fused and fusednn unfused from eager float32. A sudden jump in one run alone is a max-pool argmax
flipping on a near tie: after it no two runs agree closely, whatever their precision. Runs in Triton's
interpreter on a CPU (slow: a MobileNetV2Tiny step at 8x8 takes ~28 s for the four runs).
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import fusednn
import fusednn.optim
from fusednn.models import MODELS


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="airbench")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    rgb = a.model in ("resnet8", "airbench", "mobilenet")
    base = MODELS[a.model](in_channels=3) if rgb else MODELS[a.model]()
    keys = ("eager64", "eager", "fused", "unfused")
    models = {k: copy.deepcopy(base) for k in keys}
    models["eager64"].double()
    run = {**models, "fused": fusednn.compile(models["fused"]), "unfused": fusednn.compile(models["unfused"], fuse=False)}
    opts = {k: (torch.optim.SGD if k.startswith("eager") else fusednn.optim.SGD)(models[k].parameters(), lr=a.lr,
                                                                                  momentum=0.9) for k in keys}
    print(f"{a.model}, batch {a.batch}, {3 if rgb else 1}x{a.size}x{a.size}, lr {a.lr}: distance of the first "
          "parameter from eager float32's")
    for step in range(a.steps):
        x, t = torch.randn(a.batch, 3 if rgb else 1, a.size, a.size), torch.randint(0, 10, (a.batch,))
        for k in keys:
            opts[k].zero_grad()
            F.cross_entropy(run[k](x.double() if k == "eager64" else x), t).backward()
            opts[k].step()
        w = {k: next(models[k].parameters()) for k in keys}
        print(f"step {step:>3}  " + "  ".join(f"{k} {rel(w[k], w['eager']):.1e}" for k in ("eager64", "fused", "unfused")))


if __name__ == "__main__":
    main()
