"""`kernels.md` in a dump: one row per kernel a training step launches (`fusednn dump --report` prints it).

Columns: where (module path, the user's file:line), the kernel's source file:line, the IR nodes it implements,
grid, tile sizes and warps (recorded launch), registers / spills / shared memory (sm_90 AOT build; "-" without
it), bytes (the launch record's) and FLOPs (GEMM-shaped kernels, from the IR shapes; "-" otherwise), and a
measured column that only a GPU can fill (the repro scripts measure it there).
"""
from __future__ import annotations

import math
from typing import Any

from fusednn.launch import kernel_name


def _gemm_flops(node: Any) -> int | None:
    """2*M*N*K of a conv2d or linear node (the dx and dw GEMMs of its backward have the same count)."""
    for a in node.absorbed or (node,):
        if a.op == "conv2d":
            w = a.inputs[1].type.shape
            return 2 * math.prod(a.out.type.shape) * math.prod(w[1:])
        if a.op == "linear":
            return 2 * math.prod(a.out.type.shape) * a.inputs[1].type.shape[1]
    return None


def table(units: list, files: dict[str, str], resources: Any) -> str:
    """The markdown table; `resources` is the dump's AOT result (a list of dicts, or a reason string)."""
    res = {r["kernel"]: r for r in resources} if isinstance(resources, list) else {}
    head = ["kernel", "where", "source", "implements", "grid", "tiles", "warps", "regs", "spills", "shared",
            "bytes", "FLOPs", "measured µs / roofline"]
    rows, seen = [], set()
    for u in units:
        for rec in u.launches:
            name = kernel_name(rec.kernel)
            if name in seen:
                continue
            seen.add(name)
            tiles = " ".join(f"{k}={v}" for k, v in rec.meta.items() if k.startswith("BLOCK"))
            r = res.get(name)
            flops = _gemm_flops(u.nodes[0]) if u.nodes and "sum_to" not in name else None
            rows.append([name, " ".join(w for w in (u.module, u.source) if w) or "-", files.get(name, "-"),
                         f"{u.kind}: {u.label}" + "".join(f", {a.label()}" for n in u.nodes for a in n.absorbed), "x".join(map(str, rec.grid)), tiles or "-",
                         str(rec.meta.get("num_warps", "-")), str(r["registers"]) if r else "-",
                         ("yes" if r["stack"] or r["local"] or r["ldl_stl"] else "no") if r else "-",
                         str(r["shared"]) if r else "-", str(rec.bytes), "-" if flops is None else str(flops),
                         "GPU only"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
