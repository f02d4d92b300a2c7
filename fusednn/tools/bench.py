"""Training-step benchmark: torch eager, torch.compile and fusednn (fused, unfused), each with and without
the whole step in one CUDA graph, on one model at several batch sizes, in one process.

Protocol (benchmarks/README.md): every variant starts from the same weights and sees the same batches;
its first step (tracing, Triton / inductor compilation) is timed apart as compile time; a few checked
steps compare its losses with torch eager's; warm-up steps follow and are not timed; then `trials` rounds
in which each variant runs `steps` steps back to back, variants interleaved (the order rotates every
round) so drift of clocks and temperature spreads over all of them; the figure is the median round.
On a GPU: 5 rounds of >= 200 steps, timed with host clocks around synchronised loops, then a short
torch.profiler window per variant for device-kernel counts and a per-kernel time table.
Launches and bytes per step of the fusednn variants come from `fusednn.launch.recording()` (bytes: a model,
the memory each kernel's tensor arguments span, each byte once; benchmarks/README.md); FLOPs and the minimum bytes of a step are computed
from the model's shapes. On a CPU, fusednn's kernels run in Triton's interpreter: times there are not
performance figures; only the launch and byte counts mean something.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn import launch
from fusednn._backend import default_device, interpreting
from fusednn.models import MODELS
from fusednn.optim import SGD
from fusednn.runtime import launch_stats
from fusednn.step import TrainStep, train_step

log = logging.getLogger("fusednn")

INPUT = (1, 32, 32)  # both reference models take 1x32x32 images, 10 classes
LR, MOMENTUM = 0.01, 0.9
N_BATCHES = 4  # distinct batches cycled through (kept on the device: no host-to-device copy is timed)
PROFILE_STEPS = 5
INTERP_NOTE = ("fusednn's kernels ran in Triton's interpreter (NumPy on the CPU): the times below are not "
               "performance figures; compare the launch and byte counts only.")


@dataclass(frozen=True, slots=True)
class Variant:
    """One way of running the training step."""

    name: str
    kind: str  # "torch" (eager), "inductor" (torch.compile) or "fusednn"
    graph: bool = False  # the whole step in one CUDA graph (fusednn.step.train_step)
    fuse: bool = True  # fusednn only
    mode: str = "default"  # torch.compile mode


VARIANTS = {v.name: v for v in (
    Variant("torch_eager", "torch"),
    Variant("torch_eager_graph", "torch", graph=True),
    Variant("torch_compile", "inductor"),
    Variant("torch_compile_ro", "inductor", mode="reduce-overhead"),
    Variant("fusednn_fused", "fusednn"),
    Variant("fusednn_fused_graph", "fusednn", graph=True),
    Variant("fusednn_unfused", "fusednn", fuse=False),
    Variant("fusednn_unfused_graph", "fusednn", graph=True, fuse=False),
)}


def step_cost(model: nn.Module, batch: int, momentum: bool = True) -> dict:
    """FLOPs and minimum DRAM bytes of one SGD training step of `model` on `batch` images, from its shapes.

    FLOPs count the GEMMs (conv, linear): forward 2·MACs, backward 2·MACs for dW and 2·MACs for dX except
    for the first layer (the images need no gradient); pointwise ops, pools, loss and update are ignored.
    Minimum bytes: what even a single kernel doing the whole step must move: read the images and targets,
    read and write every parameter (and momentum buffer) once.
    """
    meta = copy.deepcopy(model).to("meta")
    layers: list[tuple[nn.Module, torch.Size]] = []
    hooks = [m.register_forward_hook(lambda m, i, o: layers.append((m, o.shape)))
             for m in meta.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        meta(torch.empty(batch, *INPUT, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    flops = 0
    for i, (m, out) in enumerate(layers):
        per_out = (m.in_channels // m.groups) * math.prod(m.kernel_size) if isinstance(m, nn.Conv2d) else m.in_features
        macs = math.prod(out) * per_out
        flops += 2 * macs * (2 if i == 0 else 3)
    params = sum(p.numel() for p in model.parameters())
    min_bytes = 4 * batch * math.prod(INPUT) + 8 * batch + 4 * params * (4 if momentum else 2)
    return {"flops_per_step": flops, "min_bytes_per_step": min_bytes, "params": params}


@contextlib.contextmanager
def torch_precision(precision: str) -> Iterator[None]:
    """Strict fp32 ("ieee") or TF32 for torch's own matmuls and cuDNN convolutions inside the block."""
    on = precision == "tf32"
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        # cuDNN's through its flags() context: setting the global is refused once a process has called
        # torch.backends.disable_global_flags() (torch's own test utilities do, on import)
        cudnn = torch.backends.cudnn
        with cudnn.flags(enabled=cudnn.enabled, benchmark=cudnn.benchmark, deterministic=cudnn.deterministic,
                         allow_tf32=on):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def skip_reason(v: Variant, device: torch.device) -> str | None:
    """Why variant `v` cannot run on `device` here, or None."""
    if v.graph and device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if v.kind == "inductor" and device.type != "cuda":
        return "GPU only: torch.compile needs a working inductor backend, not set up on this CPU machine"
    if v.kind == "fusednn" and (device.type == "cpu") != interpreting():
        return ("fusednn runs CPU tensors only in Triton's interpreter and CUDA tensors only natively "
                f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r})")
    return None


PRECISIONS = ("ieee", "tf32", "fp16")


def build(v: Variant, base: nn.Module, precision: str) -> tuple[Callable, TrainStep]:
    """A fresh copy of `base` with its optimizer, wrapped as one training-step callable for variant `v`.

    precision "fp16": every variant's forward and loss under torch.autocast(float16), fp32 weights; no
    GradScaler (its inf check would add a host sync per step to what is timed)."""
    net = copy.deepcopy(base)
    amp = torch.float16 if precision == "fp16" else None
    precision = "ieee" if amp is not None else precision

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(net(x), y)

    if v.kind == "fusednn":  # the loss runs in fusednn too: every kernel of the step is Triton
        model = fusednn.compile(loss_of, fuse=v.fuse, precision=precision)
        opt: torch.optim.Optimizer = SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    else:
        model = loss_of
        if v.kind == "inductor":
            cfg = torch._dynamo.config
            for name in ("recompile_limit", "cache_size_limit"):  # one compile per batch size and precision
                if hasattr(cfg, name):
                    setattr(cfg, name, max(getattr(cfg, name), 64))
            model = torch.compile(loss_of, mode=v.mode, dynamic=False)
        opt = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, foreach=True)
    step = train_step(model, None, opt, cuda_graph=v.graph, autocast=amp)
    if v.mode == "reduce-overhead":
        def call(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: earlier graph outputs may be reused
            return step(x, y)
        return call, step
    return step, step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_step(call: Callable, data: list, device: torch.device, n: int = PROFILE_STEPS) -> dict:
    """Device kernels, memcpy/memset and host launch calls per step, and per-kernel device time (torch.profiler)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            call(*data[i % len(data)])
        _sync(device)
    calls: dict[str, int] = defaultdict(int)
    us: dict[str, float] = defaultdict(float)
    memops = host = 0
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            if e.name.startswith(("Memcpy", "Memset")):
                memops += 1
            else:
                calls[e.name] += 1
                us[e.name] += e.time_range.elapsed_us()
        elif e.name.startswith("cu") and "Launch" in e.name:  # cudaLaunchKernel, cuLaunchKernel, cudaGraphLaunch
            host += 1
    table = sorted(({"kernel": k, "calls_per_step": calls[k] / n, "us_per_step": us[k] / n} for k in calls),
                   key=lambda r: -r["us_per_step"])
    return {"gpu_kernels_per_step": sum(calls.values()) / n, "gpu_memops_per_step": memops / n,
            "host_launch_calls_per_step": host / n, "gpu_kernel_us_per_step": sum(us.values()) / n,
            "per_kernel": table}


def _first_steps(v: Variant, base: nn.Module, precision: str, data: list, check_steps: int) -> tuple[Callable, dict]:
    """Build variant `v`, time its first step (compilation) apart, run the checked steps, count launches."""
    call, step = build(v, base, precision)
    t0 = time.perf_counter()
    losses = [call(*data[0]).item()]
    r: dict = {"status": "ok", "compile_s": time.perf_counter() - t0}
    for i in range(1, check_steps):
        with launch.recording() as rec:  # the last one, a steady-state step, is the one counted
            losses.append(call(*data[i % N_BATCHES]).item())
    if v.kind == "fusednn":
        st = launch_stats(step.launches if v.graph else rec)  # a replay launches nothing through fusednn
        r.update(launches_per_step=st["launches"], bytes_per_step=st["bytes"],
                 launch_source="fusednn.launch.recording", kernels=st["per_kernel"])
    else:  # torch's launches are counted by the profiler on a GPU; its bytes are not known
        r.update(launches_per_step=None, bytes_per_step=None, launch_source=None)
    r["losses"] = losses
    return call, r


def _time_interleaved(live: dict[str, Callable], out: dict, data: list, device: torch.device,
                      steps: int, trials: int) -> dict[str, list[float]]:
    """ms per step of every live variant in each of `trials` rounds; the order rotates every round."""
    times: dict[str, list[float]] = {n: [] for n in live}
    for t in range(trials):
        names = list(live)
        k = t % len(names) if names else 0
        for name in names[k:] + names[:k]:
            try:
                call = live[name]
                _sync(device)
                t0 = time.perf_counter()
                for i in range(steps):
                    call(*data[i % N_BATCHES])
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3 / steps)
            except Exception as e:
                log.exception("bench: %s failed while timed", name)
                out[name].update(status="error", error=f"{type(e).__name__}: {e}"[:500])
                del live[name]
    return times


def run_config(model: str, batch: int, precision: str, device: torch.device, names: Sequence[str], *,
               steps: int, trials: int, check_steps: int, warmup_steps: int) -> dict:
    """Benchmark every variant in `names` on one (batch size, precision); see the module docstring."""
    torch.manual_seed(0)
    base = MODELS[model]().to(device)
    data = [(torch.randn(batch, *INPUT, device=device), torch.randint(0, 10, (batch,), device=device))
            for _ in range(N_BATCHES)]
    res: dict = {"batch": batch, "precision": precision, **step_cost(base, batch), "variants": {}}
    out: dict[str, dict] = res["variants"]
    live: dict[str, Callable] = {}
    with torch_precision(precision):
        for name in names:
            v = VARIANTS[name]
            reason = skip_reason(v, device)
            if reason:
                out[name] = {"status": "skipped", "reason": reason}
                continue
            try:
                live[name], out[name] = _first_steps(v, base, precision, data, check_steps)
                for i in range(warmup_steps):  # not timed
                    live[name](*data[i % N_BATCHES])
            except Exception as e:  # one broken variant must not sink the others
                log.exception("bench: %s failed at batch %d (%s)", name, batch, precision)
                out[name] = {"status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
                live.pop(name, None)
        _sync(device)
        times = _time_interleaved(live, out, data, device, steps, trials)
        for name, call in live.items():
            ms = statistics.median(times[name])
            out[name].update(ms_per_step=ms, trials_ms=times[name], images_per_s=batch / ms * 1e3)
            if device.type == "cuda":
                out[name].update(_profiled(name, call, data, device))
    _compare(res)
    return res


def _profiled(name: str, call: Callable, data: list, device: torch.device) -> dict:
    try:
        prof = profile_step(call, data, device)
    except Exception as e:
        return {"profile_error": f"{type(e).__name__}: {e}"[:300]}
    if VARIANTS[name].kind != "fusednn":  # torch's launches are what the profiler saw
        del prof["per_kernel"]
        prof.update(launches_per_step=prof["gpu_kernels_per_step"] + prof["gpu_memops_per_step"],
                    launch_source="torch.profiler (device kernels + memcpy/memset)")
    return prof


def _compare(res: dict) -> None:
    """Losses of the checked steps against torch eager's, and graph variants against their twin."""
    vs = res["variants"]
    ref = vs.get("torch_eager", {}).get("losses")
    for name, r in vs.items():
        if "losses" not in r:
            continue
        if ref:
            r["loss_max_rel_diff_vs_torch_eager"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r["losses"], ref))
        twin = vs.get(name.removesuffix("_graph"), {}).get("losses") if name.endswith("_graph") else None
        if twin:
            r["losses_equal_to_non_graph"] = r["losses"] == twin


def environment(device: torch.device) -> dict:
    """Device and versions, for the record."""
    import numpy
    import triton

    dev = {"type": device.type, "interpreter": interpreting()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev.update(name=p.name, capability=f"{p.major}.{p.minor}", memory_gib=round(p.total_memory / 2**30, 1),
                   sms=p.multi_processor_count)
    else:
        dev.update(name=platform.processor() or platform.machine(), cores=os.cpu_count())
    versions = {"fusednn": fusednn.__version__, "torch": torch.__version__, "triton": triton.__version__,
                "numpy": numpy.__version__, "python": platform.python_version(), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None}
    return {"device": dev, "versions": versions, "TRITON_DEFAULT_FP_FUSION": os.environ.get("TRITON_DEFAULT_FP_FUSION")}


TARGETS = [  # (variant, against, batch, minimum speed-up) and the absolute one at batch 64
    ("fusednn_fused_graph", "torch_compile_ro", 64, 1.5), ("fusednn_fused_graph", "torch_compile_ro", 512, 1.5),
    ("fusednn_fused_graph", "torch_eager", 64, 8.0), ("fusednn_fused_graph", "torch_eager", 4096, 3.0),
]


def targets(result: dict) -> list[dict]:
    """The README's targets, evaluated where both sides were measured (GPU runs)."""
    rows = []
    for run in result["runs"]:
        vs, b = run["variants"], run["batch"]
        for name, against, batch, need in TARGETS:
            a, r = vs.get(name, {}).get("ms_per_step"), vs.get(against, {}).get("ms_per_step")
            if b == batch and a and r:
                rows.append({"target": f"{name} vs {against} >= {need}x", "batch": b, "precision": run["precision"],
                             "value": r / a, "met": r / a >= need})
        a = vs.get("fusednn_fused_graph", {}).get("ms_per_step")
        if b == 64 and a:
            rows.append({"target": "fusednn_fused_graph <= 40 us/step (H100)", "batch": b,
                         "precision": run["precision"], "value": a * 1e3, "met": a * 1e3 <= 40})
    return rows


def table(result: dict) -> str:
    """The summary table printed last."""
    head = (f"{'batch':>5} {'prec':<4} {'variant':<22} {'status':<7} {'ms/step':>9} {'img/s':>10} {'x eager':>7} "
            f"{'launches':>8} {'MB/step':>8} {'compile s':>9} {'loss vs eager':>13}")
    lines = [head, "-" * len(head)]
    for run in result["runs"]:
        eager = run["variants"].get("torch_eager", {}).get("ms_per_step")
        for name, r in run["variants"].items():
            ms = r.get("ms_per_step")
            f = lambda k, fmt: format(r[k], fmt) if r.get(k) is not None else "-"  # noqa: E731
            lines.append(
                f"{run['batch']:>5} {run['precision']:<4} {name:<22} {r['status']:<7} {f('ms_per_step', '.4f'):>9} "
                f"{f('images_per_s', '.0f'):>10} {format(eager / ms, '.2f') if eager and ms else '-':>7} "
                f"{f('launches_per_step', '.0f'):>8} "
                f"{format(r['bytes_per_step'] / 1e6, '.2f') if r.get('bytes_per_step') else '-':>8} "
                f"{f('compile_s', '.2f'):>9} {f('loss_max_rel_diff_vs_torch_eager', '.1e'):>13}")
        lines.append(f"      GEMM GFLOP/step {run['flops_per_step'] / 1e9:.4f}, minimum MB/step "
                     f"{run['min_bytes_per_step'] / 1e6:.3f}")
    why = {f"{n}: {r.get('reason') or r.get('error')}" for run in result["runs"] for n, r in run["variants"].items()
           if r["status"] != "ok"}
    lines += [f"  {w}" for w in sorted(why)]
    return "\n".join(lines)


def matrix(result: dict) -> str:
    """A short table: µs per step of every variant (columns) per batch size and precision (rows)."""
    names = [n for n in VARIANTS if any(n in run["variants"] for run in result["runs"])]
    short = {n: n.replace("fusednn_", "").replace("torch_", "").replace("_graph", "+g") for n in names}
    lines = [f"{'batch':>5} {'prec':<4} " + " ".join(f"{short[n]:>10}" for n in names) + "   (us/step)"]
    for run in result["runs"]:
        cells = []
        for n in names:
            r = run["variants"].get(n, {})
            cells.append(f"{r['ms_per_step'] * 1e3:>10.1f}" if r.get("ms_per_step") else f"{r.get('status', '-'):>10}")
        lines.append(f"{run['batch']:>5} {run['precision']:<4} " + " ".join(cells))
    return "\n".join(lines)


def chart(result: dict, path: Path) -> str | None:
    """A PNG of ms per step (GPU runs), launches and MB per step per variant; None without matplotlib."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        log.warning("bench: matplotlib is not installed; no chart")
        return None
    panels = [("launches_per_step", "launches / step"), ("bytes_per_step", "MB / step (fusednn kernels)")]
    if result["device"]["type"] == "cuda":
        panels.insert(0, ("ms_per_step", "ms / step (log)"))
    fig = Figure(figsize=(5 * len(panels), 4.5))
    FigureCanvasAgg(fig)
    runs = result["runs"]
    names = [n for n in VARIANTS if any(r["variants"].get(n, {}).get("status") == "ok" for r in runs)]
    width = 0.8 / max(len(names), 1)
    for k, (key, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for j, n in enumerate(names):
            vals = [run["variants"].get(n, {}).get(key) or 0 for run in runs]
            vals = [v / 1e6 for v in vals] if key == "bytes_per_step" else vals
            ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(runs))], vals, width, label=n)
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels([f"batch {r['batch']}\n{r['precision']}" for r in runs])
        ax.set_title(title)
        if key == "ms_per_step":
            ax.set_yscale("log", nonpositive="clip")
    fig.axes[0].legend(fontsize=7)
    dev = result["device"]
    fig.suptitle(f"{result['model']} training step on {dev['name']}" + ("  (interpreter: counts only)" if dev["interpreter"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return str(path)


def main(out: str, batch_sizes: list[int], steps: int, device: str | None, model: str, *,
         precisions: Sequence[str] | None = None, variants: Sequence[str] | None = None,
         trials: int | None = None, warmup_steps: int | None = None, budget_s: float | None = None) -> int:
    """Run the benchmark; write `bench.json` and `bench.png` under `out`; print the table last.

    Args:
        batch_sizes: e.g. [64, 512, 4096] on a GPU, [8] on a CPU.
        steps: timed steps per trial (>= 200 on a GPU for the protocol; a few on a CPU).
        device: "cuda", "cpu" or None (CUDA when present).
        model: a name in fusednn.models.MODELS ("lenet", "lenet5").
        precisions: among PRECISIONS; default ("ieee", "tf32") on CUDA, ("ieee",) on CPU (tf32 means nothing to
            the interpreter); "fp16": the step under torch.autocast(float16).
        variants: names from VARIANTS (default all; those that cannot run here are listed as skipped).
        trials: timed rounds (default 5 on CUDA, 1 on CPU).
        budget_s: stop starting new (batch, precision) runs when the last one would not fit.
    Returns 0, or 1 when some variant failed (its error is in bench.json).
    """
    if model not in MODELS:
        raise ValueError(f"bench: unknown model {model!r}; choose from {sorted(MODELS)}")
    dev = torch.device(device) if device else default_device()
    cuda = dev.type == "cuda"
    precisions = list(precisions or (("ieee", "tf32") if cuda else ("ieee",)))
    if any(p not in PRECISIONS for p in precisions):
        raise ValueError(f"bench: precisions must be among {PRECISIONS}, got {precisions}")
    names = list(variants or VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ValueError(f"bench: unknown variants {unknown}; choose from {list(VARIANTS)}")
    trials = trials or (5 if cuda else 1)
    warmup_steps = (20 if cuda else 0) if warmup_steps is None else warmup_steps
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    result = {"schema": 1, "model": model, **environment(dev),
              "protocol": {"steps": steps, "trials": trials, "warmup_steps": warmup_steps, "interleaved": True,
                           "statistic": "median of trials", "timer": "time.perf_counter around synchronised loops",
                           "check_steps": 6 if cuda else 2, "optimizer": f"SGD lr={LR} momentum={MOMENTUM}",
                           "meets_gpu_protocol": cuda and steps >= 200 and trials >= 5},
              "note": INTERP_NOTE if interpreting() else None, "runs": [], "skipped_runs": []}
    start, last = time.perf_counter(), 0.0
    for precision in precisions:
        for batch in batch_sizes:
            left = None if budget_s is None else budget_s - (time.perf_counter() - start)
            if left is not None and result["runs"] and left < last:
                result["skipped_runs"].append({"batch": batch, "precision": precision,
                                               "reason": f"time budget: {left:.0f} s left, the last run took {last:.0f} s"})
                continue
            t0 = time.perf_counter()
            log.info("bench: %s batch %d %s on %s", model, batch, precision, dev)
            result["runs"].append(run_config(model, batch, precision, dev, names, steps=steps, trials=trials,
                                             check_steps=result["protocol"]["check_steps"], warmup_steps=warmup_steps))
            last = time.perf_counter() - t0
            result["runs"][-1]["wall_s"] = last
            result["targets"] = targets(result)
            (outdir / "bench.json").write_text(json.dumps(result, indent=1))  # after every run: a kill keeps these
    result["targets"] = targets(result)
    result["chart"] = chart(result, outdir / "bench.png")
    (outdir / "bench.json").write_text(json.dumps(result, indent=1))
    for run in result["runs"]:  # per-kernel device times of the fusednn variants (GPU runs only)
        for name, r in run["variants"].items():
            if r.get("per_kernel") and VARIANTS[name].kind == "fusednn":
                print(f"\n{name}, batch {run['batch']}, {run['precision']}: device time per step by kernel")
                for k in r["per_kernel"]:
                    print(f"  {k['kernel'][:60]:<60} {k['calls_per_step']:>5.1f} x {k['us_per_step']:>9.2f} us")
    for t in result.get("targets", []):
        print(f"target {t['target']:<52} batch {t['batch']:>4} {t['precision']}: {t['value']:.2f} "
              f"{'met' if t['met'] else 'NOT met'}")
    for s in result["skipped_runs"]:
        print(f"skipped batch {s['batch']} {s['precision']}: {s['reason']}")
    if result["note"]:
        print("\nNOTE: " + result["note"])
    print(f"\n{model} training step, {result['device']['name']}, torch {torch.__version__}, "
          f"fusednn {fusednn.__version__}; results in {outdir / 'bench.json'}")
    print(table(result))
    failed = any(r["status"] == "error" for run in result["runs"] for r in run["variants"].values())
    return 1 if failed else 0
