"""Run the training-step benchmark (fusednn.tools.bench.main) from the command line, or summarise results.

    python benchmarks/run.py --out results/                     # GPU: batch 64, 512, 4096; fp32 and tf32
    python benchmarks/run.py --out /tmp/b --batch-sizes 8 --steps 2   # CPU: counts only (interpreter)
    python benchmarks/run.py --summarize OUT/bench_ieee/bench.json OUT/bench_tf32/bench.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t]


def summarize(paths: list[str], full: bool) -> int:
    """Print the targets and a table of each bench.json (e.g. of a run cut short by a timeout)."""
    from fusednn.tools.bench import matrix, table, targets

    status = 0
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{path}: no results ({e})")
            status = 1
            continue
        dev, ver = result["device"], result["versions"]
        print(f"\n== {path}: {result['model']} on {dev['name']}, torch {ver['torch']}, triton {ver['triton']}")
        for s in result.get("skipped_runs", []):
            print(f"skipped batch {s['batch']} {s['precision']}: {s['reason']}")
        for t in targets(result):
            print(f"target {t['target']:<52} batch {t['batch']:>4} {t['precision']}: {t['value']:.2f} "
                  f"{'met' if t['met'] else 'NOT met'}")
        if result.get("note"):
            print("NOTE: " + result["note"])
        print(table(result) if full else matrix(result))
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results", help="directory for bench.json and bench.png")
    p.add_argument("--batch-sizes", type=_ints, default=None, help="comma-separated (default 64,512,4096 on CUDA, 8 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per trial (default 200 on CUDA, 2 on CPU)")
    p.add_argument("--trials", type=int, default=None, help="timed rounds (default 5 on CUDA, 1 on CPU)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--model", default="lenet", help="lenet or lenet5")
    p.add_argument("--precision", choices=["ieee", "tf32", "fp16", "both"], default=None,
                   help="default: both on CUDA, ieee on CPU")
    p.add_argument("--variants", default=None, help="comma-separated subset of fusednn.tools.bench.VARIANTS")
    p.add_argument("--budget-s", type=float, default=None, help="start no new run that would not fit")
    p.add_argument("--summarize", nargs="+", metavar="BENCH_JSON", help="print tables of existing results")
    p.add_argument("--full", action="store_true", help="with --summarize: the full table, not the short one")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if a.summarize:
        return summarize(a.summarize, a.full)

    import torch

    from fusednn.tools import bench

    cuda = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    precisions = None if a.precision in (None, "both") else [a.precision]
    if a.precision == "both":
        precisions = ["ieee", "tf32"]
    return bench.main(a.out, a.batch_sizes or ([64, 512, 4096] if cuda else [8]),
                      a.steps or (200 if cuda else 2), a.device, a.model, precisions=precisions,
                      variants=a.variants.split(",") if a.variants else None, trials=a.trials,
                      budget_s=a.budget_s)


if __name__ == "__main__":
    sys.exit(main())
