"""Launches and bytes of a half-precision training step against the float32 one, counted by `stats()` with
the GPU path's launch configs and no kernel executed (so it runs anywhere, fast).

    python benchmarks/half_bytes.py

For LeNet and ResNet8 (forward, cross-entropy, backward): float32, `torch.autocast(float16)` and
`model.half()`, and the ratio of each half-precision step's bytes to the float32 step's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fusednn
from fusednn import launch
from fusednn.compiler.configs import use_target
from fusednn.models import LeNet, ResNet8

CASES = [("lenet", LeNet, (1, 32, 32), (64, 4096)), ("resnet8", lambda: ResNet8(in_channels=3), (3, 32, 32), (64, 512))]


def step_counts(make, shape: tuple, batch: int, mode: str) -> tuple[int, float]:
    """(launches, MB) of one training step in `mode`: "fp32", "autocast16" or "half"."""
    torch.manual_seed(0)
    net = make()
    if mode == "half":
        net = net.half()
    c = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))
    x = torch.randn(batch, *shape, dtype=torch.float16 if mode == "half" else torch.float32)
    y = torch.randint(0, 10, (batch,))
    with use_target("gpu"), launch.recording(execute=False):
        with torch.autocast("cpu", dtype=torch.float16, enabled=mode == "autocast16"):
            loss = c(x, y)
        loss.backward()
    st = c.stats()
    return (st["forward"]["launches"] + st["backward"]["launches"],
            (st["forward"]["bytes"] + st["backward"]["bytes"]) / 1e6)


def main() -> None:
    print(f"{'model':<8} {'batch':>5} {'fp32 launches/MB':>18} {'autocast16':>14} {'half':>14} {'ratio ac16':>10} {'ratio half':>10}")
    for name, make, shape, batches in CASES:
        for batch in batches:
            r = {m: step_counts(make, shape, batch, m) for m in ("fp32", "autocast16", "half")}
            cells = [f"{n} / {mb:.2f}" for n, mb in r.values()]
            print(f"{name:<8} {batch:>5} {cells[0]:>18} {cells[1]:>14} {cells[2]:>14} "
                  f"{r['autocast16'][1] / r['fp32'][1]:>10.3f} {r['half'][1] / r['fp32'][1]:>10.3f}")


if __name__ == "__main__":
    main()
