"""`compiled.dump(dir)`: everything fusednn did to a model, as files a person can read.

    traced.ir        the IR as traced (with each node's file:line)
    fused.ir         the IR after the pass pipeline (fused groups list what they absorbed)
    inference.ir     where it differs, the IR of calls autograd does not record (conv epilogues folded:
                     batch norm in eval mode, residual add, any activation, pool); its kernels join kernels/
    backward.ir      the backward plan: each node's hand-written kernels and what it saved
    kernels/<name>.py  every generated forward kernel, as imported
    graph.dot        the fused graph for Graphviz (graph.svg too when `dot` is on PATH)
    stats.json       groups, launches and bytes per forward and backward, per kernel
    aot/             per kernel of a training step (forward and backward): Triton's TTIR, PTX and a
                     resource report for sm_90, compiled ahead of time (on a CPU machine too);
                     resources.txt is the summary table
    repro/<kernel>.py  per kernel of a training step: a standalone script that launches it with the recorded
                     arguments and checks it against torch (fusednn/tools/repro.py); src_*.py are the kernel files
    kernels.md       one row per kernel: where, IR nodes, grid/tiles/warps, registers/spills/shared, bytes,
                     FLOPs (fusednn/tools/kernel_table.py)
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import torch

from fusednn.errors import CompileError
from fusednn.tools.repro import example

log = logging.getLogger("fusednn")


def training_launches(spec: Any, named: dict[str, torch.Tensor]) -> list:
    """The launches of one forward and backward of `spec`, recorded (not run) with the GPU's launch configs."""
    from fusednn import launch
    from fusednn.compiler import configs

    exe = spec.executable
    device = next((t.device for t in named.values()), torch.device("cpu"))
    with torch.random.fork_rng(devices=[]), launch.recording(execute=False) as rec, configs.use_target("gpu"):
        ins = [example(v, named).to(device) for v in spec.graph.inputs]
        ins = [t.requires_grad_() if t.is_floating_point() else t for t in ins]
        outs = [o for o in exe.apply(*ins) if o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
    return rec


def _write(path: Path, text: str, written: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    written.append(str(path))


def dump(spec: Any, directory: str, named: dict[str, torch.Tensor] | None = None, aot: bool = True) -> list[str]:
    """Write the dump of one compiled specialisation into `directory`; returns the paths written."""
    d = Path(directory)
    try:
        d.mkdir(parents=True, exist_ok=True)
        (d / ".write-test").touch()
        (d / ".write-test").unlink()
    except OSError as e:
        raise CompileError(f"fusednn.tools.dump: cannot write to {directory}: {e.strerror or e}") from None
    written: list[str] = []
    # batch=True: a batch-polymorphic graph prints the dims that follow the batch as N=<traced batch>
    _write(d / "traced.ir", spec.traced.format(locations=True, batch=True) + "\n", written)
    _write(d / "fused.ir", spec.graph.format(locations=True, batch=True) + "\n", written)
    _write(d / "graph.dot", spec.graph.to_dot(), written)
    if shutil.which("dot"):
        svg = d / "graph.svg"
        subprocess.run(["dot", "-Tsvg", str(d / "graph.dot"), "-o", str(svg)], check=False, capture_output=True)
        if svg.exists():
            written.append(str(svg))
    exe = spec.executable
    stats = exe.stats()
    stats["options"] = {"fuse": spec.options.fuse, "backend": spec.options.backend, "precision": spec.options.precision}
    if hasattr(exe, "plan"):
        _write(d / "backward.ir", exe.plan.format() + "\n", written)
        inference = exe.inference_executable()
        steps = list(exe.steps)
        if inference is not exe:
            _write(d / "inference.ir", inference.graph.format(locations=True, batch=True) + "\n", written)
            steps += inference.steps
        for name, source in {s.kernel.name: s.kernel.source for s in steps if s.kernel is not None}.items():
            _write(d / "kernels" / f"{name}.py", source, written)
        if named is not None:
            from fusednn.tools import kernel_table, repro

            units = repro.record_step(spec, named)
            written.extend(repro.write(units, d / "repro"))
            stats["resources"] = _aot(spec, named, d / "aot", written) if aot else "skipped (aot=False)"
            _write(d / "kernels.md", f"# kernels of one training step of {spec.graph.name}\n\n"
                   + kernel_table.table(units, repro.kernel_files(units), stats["resources"]), written)
    _write(d / "stats.json", json.dumps(stats, indent=2, default=str) + "\n", written)
    return written


def _aot(spec: Any, named: dict[str, torch.Tensor], out: Path, written: list[str]) -> Any:
    """TTIR, PTX and resource reports for every kernel of a training step; a reason string when unavailable."""
    from fusednn.tools import aot

    reason = aot.unavailable_reason()
    if reason:
        log.warning("fusednn.tools.dump: no ahead-of-time reports: %s", reason)
        return f"unavailable: {reason}"
    launches = aot.unique(training_launches(spec, named))
    compiled = aot.compile_launches(launches)
    paths = aot.write_reports(compiled, out)
    written.extend(str(p) for p in paths)
    return [dataclasses.asdict(c.resources) for c in compiled]
