"""Ahead-of-time compilation of fusednn's launches for an NVIDIA target (sm_90) on a machine without a GPU.

Triton's interpreter skips Triton's compiler, so a kernel can pass every CPU test and still fail to compile
for the GPU (e.g. triton 3.6 refuses `tl.dot` operands under 16) or spill registers. This module takes
the launches fusednn would make (recorded at `fusednn.launch.launch`, never executed), compiles each
distinct one with `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`, and reads the
cubin back with the `cuobjdump`/`nvdisasm` that Triton's wheel ships: registers, stack, local memory,
shared memory and a count of SASS instruction classes per kernel.

Under TRITON_INTERPRET=1 every `@triton.jit` object is an interpreter wrapper that Triton's compiler cannot
take, so the compile then runs in one subprocess with TRITON_INTERPRET=0 that re-imports each kernel's
module (`python -m fusednn.tools.aot --worker`). With TRITON_INTERPRET=0 (a GPU machine, the triton 3.6 CI venv)
it runs in-process.

    launches = aot.collect(step, model, batch)         # records, runs nothing
    compiled = aot.compile_launches(launches)           # deduplicated, one subprocess
    aot.write_reports(compiled, "dump/aot")             # <kernel>.ttir/.ttgir/.ptx/.res.txt, resources.txt

CLI: `python -m fusednn.tools.aot MODULE:FUNCTION [-o DIR] [--arch 90]` calls FUNCTION() under `collect`,
compiles what it launched and prints the resource table.
"""
from __future__ import annotations

import argparse
import collections
import functools
import hashlib
import importlib
import importlib.util
import inspect
import os
import pickle
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from fusednn.errors import CompileError, FusednnError
from fusednn.launch import Launch, kernel_name, recording

# Launch keywords that are compile options, not kernel parameters (the JIT takes them the same way).
_OPTION_KEYS = ("num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion", "launch_pdl",
                "launch_cooperative_grid", "debug")

_WORKER_TIMEOUT_S = 1800  # ~1 s per kernel; a hung ptxas must not hang CI

_TORCH_TO_TRITON = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.uint8: "u8", torch.bool: "u1",
}


class AotCompileError(CompileError):
    """A kernel did not compile for the target; the message names the kernel, its file and Triton's reason."""


class AotUnavailable(FusednnError, RuntimeError):
    """Compiling for the NVIDIA target is impossible in this environment (the message says why)."""


# --------------------------------------------------------------------------------------------------
# Triton version differences (3.6 on the GPU machines, 3.9 here) live in this section only.
# Both take ASTSource(fn, signature, constexprs, attrs) with attrs {(i,): [["tt.divisibility", 16]]},
# GPUTarget("cuda", arch, 32), and ship ptxas/cuobjdump/nvdisasm in triton/backends/nvidia/bin.
# --------------------------------------------------------------------------------------------------

def _triton_version() -> str:
    import triton

    return triton.__version__


def _tool(name: str) -> Path:
    """Path of an NVIDIA tool Triton uses (honours TRITON_<NAME>_PATH through triton.knobs where present)."""
    try:
        from triton import knobs

        return Path(getattr(knobs.nvidia, name.replace("-", "_")).path)
    except (ImportError, AttributeError, RuntimeError):
        import triton.backends.nvidia as nv

        return Path(nv.__file__).parent / "bin" / name


def _default_fp_fusion() -> bool:
    """What the GPU runtime would use: TRITON_DEFAULT_FP_FUSION if set, else Triton's default (on) in 3.6-3.9.

    Passing it explicitly keeps triton 3.9 from warning that the default will change in 3.10.
    """
    env = os.environ.get("TRITON_DEFAULT_FP_FUSION")
    if env is None:
        return True
    return env.strip().lower() in ("1", "true", "on", "yes")


def _triton_compile(fn: Any, signature: dict, constexprs: dict, attrs: dict, options: dict, arch: int) -> Any:
    """triton.compile for cuda:arch; returns Triton's CompiledKernel (asm dict + metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def _is_jit(kernel: Any) -> bool:
    from triton.runtime.jit import JITFunction

    return isinstance(kernel, JITFunction)


@functools.cache
def unavailable_reason(arch: int = 90) -> str | None:
    """Why compiling for sm_<arch> cannot work here, or None when it can (Triton's NVIDIA backend and tools)."""
    try:
        import triton.backends.nvidia.compiler  # noqa: F401
    except Exception as e:  # noqa: BLE001  (any import failure means the same: no NVIDIA backend)
        return f"triton's NVIDIA backend is not importable: {e}"
    try:  # the JIT's own argument specialisation, which job_of follows
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError as e:
        return f"this triton has no native_specialize_impl, which fusednn.tools.aot uses to specialise as the JIT does: {e}"
    for name in ("ptxas", "cuobjdump", "nvdisasm"):
        path = _tool(name)
        if not path.is_file() or not os.access(path, os.X_OK):
            return f"{name} not found at {path} (triton's wheel normally ships it)"
    try:
        out = subprocess.run([str(_tool("ptxas")), "--help"], check=False, capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"ptxas does not run: {e}"
    if f"sm_{arch}" not in out:
        return f"this ptxas does not list sm_{arch}"
    return None


# --------------------------------------------------------------------------------------------------
# What to compile: a launch record becomes a Job (plain data), the unit of deduplication.
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Job:
    """One distinct compilation: which kernel, with which argument types, constexprs and options."""

    name: str
    qualname: str
    module: str
    file: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    divisible: tuple[str, ...]  # parameters specialised as multiples of 16 (pointers: 16-byte aligned)
    options: tuple[tuple[str, Any], ...]
    arch: int

    @property
    def variant(self) -> str:
        """Short stable id of this specialisation (kernels compiled with several constexpr sets)."""
        text = repr((self.module, self.name, self.signature, self.constexprs, self.divisible, self.options))
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        return False
    return "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann)))


def _no_specialize(kernel: Any, names: list[str], key: str) -> set[str]:
    """Parameter names listed in the kernel's do_not_specialize / do_not_specialize_on_alignment."""
    items = getattr(kernel, key, None)
    if items is None:
        items = getattr(kernel, "kwargs", {}).get(key)
    return {names[i] if isinstance(i, int) else i for i in (items or ())}


def _arg_type(value: Any, specialize: bool, align: bool) -> tuple[str, Any, bool]:
    """(triton type, constexpr value or None, divisible by 16) of one runtime argument, as Triton's JIT
    specialises it: Triton's own `native_specialize_impl` decides (integers equal to 1 become constexprs,
    multiples of 16 and 16-byte-aligned pointers are marked divisible), so nothing here mirrors it.
    Strings, dtypes and constexpr objects, which the JIT passes as constexprs, are handled here."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    if isinstance(value, str) or type(value).__name__ == "dtype":  # tl.float32 etc.
        return "constexpr", value, False
    if type(value).__name__ == "constexpr":
        return "constexpr", value.value, False
    if isinstance(value, torch.Tensor) and value.dtype not in _TORCH_TO_TRITON:
        raise TypeError(f"no Triton pointer type for tensor dtype {value.dtype}")
    try:
        ty, key = native_specialize_impl(CUDABackend, value, False, specialize, align)
    except Exception as e:  # Triton raises TypeError or ValueError for what it cannot pass
        raise TypeError(f"Triton cannot pass {type(value).__name__} {value!r:.40}: {e}") from None
    if ty == "constexpr":
        return ty, key, False
    return ty, None, key == "D"


def job_of(rec: Launch, arch: int = 90) -> Job:
    """The compilation a launch record needs: argument types from the recorded values, meta → constexprs."""
    fn = getattr(rec.kernel, "fn", None)
    if not callable(fn) or not hasattr(fn, "__code__"):
        raise AotCompileError(f"{rec.kernel!r} is not a @triton.jit kernel; AOT compiles only those")
    name = kernel_name(rec.kernel)
    params = inspect.signature(fn).parameters
    names = list(params)
    kwargs = {k: v for k, v in rec.meta.items() if k in params}
    options = {k: v for k, v in rec.meta.items() if k not in params}
    unknown = sorted(set(options) - set(_OPTION_KEYS))
    if unknown:
        raise AotCompileError(f"kernel {name}: launch keywords {unknown} are neither parameters nor options")
    options.setdefault("enable_fp_fusion", _default_fp_fusion())
    try:
        bound = inspect.signature(fn).bind(*rec.args, **kwargs)
    except TypeError as e:
        raise AotCompileError(f"kernel {name}: recorded arguments do not fit its signature: {e}") from None
    bound.apply_defaults()
    no_spec = _no_specialize(rec.kernel, names, "do_not_specialize")
    no_align = _no_specialize(rec.kernel, names, "do_not_specialize_on_alignment")
    signature, constexprs, divisible = [], [], []
    for pname, value in bound.arguments.items():
        if _is_constexpr(params[pname]):
            ty, const, div = "constexpr", getattr(value, "value", value), False
        else:
            try:
                ty, const, div = _arg_type(value, pname not in no_spec, pname not in no_align)
            except TypeError as e:
                raise AotCompileError(f"kernel {name}, argument {pname}: {e}") from None
        signature.append((pname, ty))
        if ty == "constexpr":
            constexprs.append((pname, const))
        if div:
            divisible.append(pname)
    file = inspect.getsourcefile(fn) or fn.__code__.co_filename
    return Job(name, fn.__qualname__, fn.__module__, os.path.realpath(file), tuple(signature),
               tuple(constexprs), tuple(divisible), tuple(sorted(options.items())), arch)


def unique(launches: Sequence[Launch], arch: int = 90) -> list[Launch]:
    """The launches that compile differently (first of each); grids and tensor sizes do not matter."""
    seen: set[Job] = set()
    out = []
    for rec in launches:
        job = job_of(rec, arch)
        if job not in seen:
            seen.add(job)
            out.append(rec)
    return out


def collect(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> list[Launch]:
    """Run fn(*args, **kwargs) with GPU launch configs, recording every fusednn launch and executing none."""
    from fusednn.compiler.configs import use_target

    with use_target("gpu"), recording(execute=False) as launches:
        fn(*args, **kwargs)
    return list(launches)


# --------------------------------------------------------------------------------------------------
# Compiling and reading the cubin back.
# --------------------------------------------------------------------------------------------------

_SASS_CLASSES = {  # SASS opcode (before the first '.') -> column of the report
    "FFMA": "ffma", "FMUL": "fmul_fadd", "FADD": "fmul_fadd", "HMMA": "hmma", "HGMMA": "hgmma",
    "LDG": "ldg", "STG": "stg", "LDS": "lds_sts", "STS": "lds_sts", "LDSM": "lds_sts", "STSM": "lds_sts",
    "LDGSTS": "ldgsts", "BRA": "bra", "LDL": "ldl_stl", "STL": "ldl_stl",
}
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")
_RES_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass(frozen=True, slots=True)
class Resources:
    """What one compiled kernel uses on the target, read from its cubin.

    Register, stack and local figures come from `cuobjdump -res-usage`; `shared` is the dynamic shared
    memory Triton requests at launch (metadata.shared) and `static_shared` the cubin's static part.
    The instruction counts are static (in the code, not executed): FFMA = fp32 FMA, HMMA = mma.sync
    tensor-core MMA, HGMMA = sm_90 warpgroup MMA (wgmma), LDGSTS = async global->shared copies,
    LDL/STL = local-memory traffic (register spills); `other` counts the rest, NOPs excluded.
    """

    kernel: str
    registers: int
    stack: int
    local: int
    shared: int
    static_shared: int
    num_warps: int
    ffma: int = 0
    fmul_fadd: int = 0
    hmma: int = 0
    hgmma: int = 0
    ldg: int = 0
    stg: int = 0
    lds_sts: int = 0
    ldgsts: int = 0
    bra: int = 0
    ldl_stl: int = 0
    other: int = 0
    opcodes: tuple[tuple[str, int], ...] = ()

    @property
    def spills(self) -> bool:
        """True when the kernel touches local memory (spilled registers or a stack frame)."""
        return self.stack > 0 or self.local > 0 or self.ldl_stl > 0

    @property
    def tensor_core(self) -> int:
        """Tensor-core MMA instructions of either kind (HMMA + HGMMA)."""
        return self.hmma + self.hgmma


def _run_tool(name: str, *args: str) -> str:
    proc = subprocess.run([str(_tool(name)), *args], check=False, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AotCompileError(f"{name} {' '.join(args)} failed: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def read_resources(cubin: bytes, kernel: str, num_warps: int, shared: int) -> Resources:
    """Resources of the one kernel in `cubin` (cuobjdump -res-usage, nvdisasm opcode counts)."""
    with tempfile.TemporaryDirectory(prefix="fusednn-aot-") as tmp:
        path = Path(tmp) / f"{kernel}.cubin"
        path.write_bytes(cubin)
        res = _RES_LINE.search(_run_tool("cuobjdump", "-res-usage", str(path)))
        sass = _run_tool("nvdisasm", "-c", str(path))
    if res is None:
        raise AotCompileError(f"kernel {kernel}: cuobjdump printed no resource line")
    reg, stack, static_shared, local = (int(g) for g in res.groups())
    opcodes = collections.Counter(m.group(1) for m in map(_SASS_LINE.match, sass.splitlines()) if m)
    opcodes.pop("NOP", None)
    classes: collections.Counter[str] = collections.Counter()
    for op, n in opcodes.items():
        classes[_SASS_CLASSES.get(op, "other")] += n
    return Resources(kernel, reg, stack, local, shared, static_shared, num_warps, **classes,
                     opcodes=tuple(sorted(opcodes.items(), key=lambda kv: (-kv[1], kv[0]))))


@dataclass(frozen=True, slots=True)
class Compiled:
    """One kernel compiled for the target: its IR, PTX, cubin and what it uses."""

    name: str
    job: Job
    triton_version: str
    ttir: str
    ttgir: str
    ptx: str
    cubin: bytes
    resources: Resources

    @property
    def variant(self) -> str:
        """The job's short specialisation id (used in file names when a kernel has several)."""
        return self.job.variant


def _compile_job(job: Job, kernel: Any) -> Compiled:
    """Compile one job with a real JITFunction; errors name the kernel, its file and Triton's message."""
    signature = dict(job.signature)
    attrs = {(i,): [["tt.divisibility", 16]] for i, (p, _) in enumerate(job.signature) if p in job.divisible}
    try:
        ck = _triton_compile(kernel, signature, dict(job.constexprs), attrs, dict(job.options), job.arch)
    except Exception as e:  # noqa: BLE001  (Triton raises many types; all mean "did not compile")
        msg = str(e).strip() or type(e).__name__
        raise AotCompileError(f"kernel {job.name} ({job.file}) does not compile for sm_{job.arch} with "
                              f"triton {_triton_version()}: {type(e).__name__}: {msg}") from None
    md = ck.metadata
    res = read_resources(ck.asm["cubin"], job.name, int(md.num_warps), int(md.shared))
    return Compiled(job.name, job, _triton_version(), ck.asm["ttir"], ck.asm.get("ttgir", ""), ck.asm["ptx"],
                    ck.asm["cubin"], res)


def _import_kernel(job: Job) -> Any:
    """The kernel object `job` names, imported afresh (in the worker, where @triton.jit makes JITFunctions)."""
    if job.qualname != job.name:
        raise AotCompileError(f"kernel {job.name} in {job.file} is not defined at module level; AOT re-imports "
                              "kernels by module and name")

    def same_file(m: Any) -> bool:
        return os.path.realpath(getattr(m, "__file__", None) or "") == job.file

    module = sys.modules.get(job.module)
    if module is None or not same_file(module):
        try:
            module = importlib.import_module(job.module)
            if not same_file(module):
                raise ImportError(f"{job.module} resolves to {module.__file__}")
        except ImportError:
            # generated kernels (fusednn_generated.*) and scripts are only reachable by path
            spec = importlib.util.spec_from_file_location(job.module, job.file)
            if spec is None or spec.loader is None:
                raise AotCompileError(f"kernel {job.name}: cannot import {job.file}") from None
            module = importlib.util.module_from_spec(spec)
            sys.modules[job.module] = module
            spec.loader.exec_module(module)
    kernel = getattr(module, job.name, None)
    if kernel is None:
        raise AotCompileError(f"kernel {job.name} not found in {job.file}")
    return kernel


def _compile_in_process(jobs: Sequence[Job], kernels: Sequence[Any] | None = None) -> list[Compiled | str]:
    """Compile each job; a failure becomes its error message so one bad kernel does not hide the others."""
    out: list[Compiled | str] = []
    for i, job in enumerate(jobs):
        try:
            kernel = kernels[i] if kernels is not None else _import_kernel(job)
            if not _is_jit(kernel):
                raise AotCompileError(f"kernel {job.name} is a {type(kernel).__name__}, not a JITFunction "
                                      "(TRITON_INTERPRET must be 0 where kernels are compiled)")
            out.append(_compile_job(job, kernel))
        except AotCompileError as e:
            out.append(str(e))
        except Exception as e:  # noqa: BLE001  (an import or tool failure still belongs to this kernel)
            out.append(f"kernel {job.name} ({job.file}): {type(e).__name__}: {e}")
    return out


def _compile_in_subprocess(jobs: Sequence[Job]) -> list[Compiled | str]:
    """Run `python -m fusednn.tools.aot --worker` with TRITON_INTERPRET=0 on the jobs; return its results."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p)
    with tempfile.TemporaryDirectory(prefix="fusednn-aot-") as tmp:
        jobs_path, results_path = Path(tmp) / "jobs.pkl", Path(tmp) / "results.pkl"
        jobs_path.write_bytes(pickle.dumps(list(jobs)))
        cmd = [sys.executable, "-m", "fusednn.tools.aot", "--worker", str(jobs_path), str(results_path)]
        try:
            proc = subprocess.run(cmd, check=False, env=env, capture_output=True, text=True,
                                  timeout=_WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise AotCompileError(f"the AOT compile worker ran past {_WORKER_TIMEOUT_S} s on "
                                  f"{len(jobs)} kernels") from None
        if proc.returncode != 0 or not results_path.exists():
            names = ", ".join(sorted({j.name for j in jobs}))
            raise AotCompileError(f"the AOT compile worker for {names} failed (exit {proc.returncode}):\n"
                                  f"{proc.stderr.strip()[-4000:]}")
        return pickle.loads(results_path.read_bytes())


def compile_launches(launches: Sequence[Launch], arch: int = 90) -> list[Compiled]:
    """Compile every distinct launch for sm_<arch>; raises AotCompileError naming each kernel that fails.

    Kernels that are real JITFunctions (TRITON_INTERPRET=0) compile in this process; interpreter-wrapped
    ones compile together in one subprocess that re-imports them.
    """
    reason = unavailable_reason(arch)
    if reason is not None:
        raise AotUnavailable(f"cannot compile for sm_{arch} here: {reason}")
    recs = unique(launches, arch)
    jobs = [job_of(r, arch) for r in recs]
    native = [i for i, r in enumerate(recs) if _is_jit(r.kernel)]
    remote = [i for i, r in enumerate(recs) if not _is_jit(r.kernel)]
    results: list[Compiled | str] = [""] * len(recs)
    for i, res in zip(native, _compile_in_process([jobs[i] for i in native], [recs[i].kernel for i in native])):
        results[i] = res
    if remote:
        for i, res in zip(remote, _compile_in_subprocess([jobs[i] for i in remote])):
            results[i] = res
    errors = [r for r in results if isinstance(r, str)]
    if errors:
        raise AotCompileError("\n".join(errors))
    return [r for r in results if isinstance(r, Compiled)]


def compile_launch(rec: Launch, arch: int = 90) -> Compiled:
    """Compile one recorded launch for sm_<arch> (Triton's CUDA backend; no GPU needed)."""
    return compile_launches([rec], arch)[0]


# --------------------------------------------------------------------------------------------------
# Reports.
# --------------------------------------------------------------------------------------------------

_COLUMNS = [("warps", "num_warps"), ("regs", "registers"), ("stack", "stack"), ("local", "local"),
            ("shared", "shared"), ("FFMA", "ffma"), ("FMUL/FADD", "fmul_fadd"), ("HMMA", "hmma"),
            ("HGMMA", "hgmma"), ("LDG", "ldg"), ("STG", "stg"), ("LDS/STS", "lds_sts"),
            ("LDGSTS", "ldgsts"), ("BRA", "bra"), ("LDL/STL", "ldl_stl"), ("other", "other")]


def _stems(compiled: Sequence[Compiled]) -> list[str]:
    """File stems: the kernel name, plus the variant id where one kernel was compiled more than once."""
    counts = collections.Counter(c.name for c in compiled)
    return [c.name if counts[c.name] == 1 else f"{c.name}-{c.variant}" for c in compiled]


def _differences(compiled: Sequence[Compiled]) -> list[str]:
    """Per kernel, the constexprs/options that tell its variants apart ("" for a kernel compiled once)."""
    def knobs(c: Compiled) -> dict:
        return {**dict(c.job.constexprs), **dict(c.job.options), "div16": ",".join(c.job.divisible) or "-"}

    by_name: dict[str, list[dict]] = collections.defaultdict(list)
    for c in compiled:
        by_name[c.name].append(knobs(c))
    out = []
    for c in compiled:
        mine, all_ = knobs(c), by_name[c.name]
        keys = [k for k in mine if len(all_) > 1 and any(d.get(k) != mine[k] for d in all_)]
        out.append(" ".join(f"{k}={mine[k]}" for k in keys))
    return out


def report_table(compiled: Sequence[Compiled]) -> str:
    """A fixed-width table, one row per compiled kernel (variant), of the resources it uses."""
    head = ["kernel"] + [h for h, _ in _COLUMNS] + ["variant"]
    rows = [[stem] + [str(getattr(c.resources, f)) for _, f in _COLUMNS] + [diff]
            for stem, c, diff in zip(_stems(compiled), compiled, _differences(compiled))]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    last = len(head) - 1
    lines = ["  ".join(v.ljust(w) if i in (0, last) else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             .rstrip() for r in [head, *rows]]
    return "\n".join(lines) + "\n"


def _res_text(c: Compiled) -> str:
    r, j = c.resources, c.job
    lines = [f"kernel      {c.name}  (variant {c.variant})", f"source      {j.file}",
             f"target      sm_{j.arch}, triton {c.triton_version}",
             "signature   " + ", ".join(f"{p}: {t}" for p, t in j.signature),
             "constexprs  " + ", ".join(f"{p}={v!r}" for p, v in j.constexprs),
             "divisible   " + ", ".join(j.divisible), "options     " + ", ".join(f"{k}={v!r}" for k, v in j.options),
             ""]
    for f in fields(Resources):
        if f.name not in ("kernel", "opcodes"):
            lines.append(f"{f.name:<14}{getattr(r, f.name)}")
    lines += ["", "SASS opcodes (static count):"] + [f"  {op:<12}{n}" for op, n in r.opcodes]
    return "\n".join(lines) + "\n"


def write_reports(compiled: Sequence[Compiled], out_dir: str | os.PathLike) -> list[Path]:
    """Write <kernel>.ttir/.ttgir/.ptx/.res.txt per kernel and the summary `resources.txt`; return the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, c in zip(_stems(compiled), compiled):
        for ext, text in ((".ttir", c.ttir), (".ttgir", c.ttgir), (".ptx", c.ptx), (".res.txt", _res_text(c))):
            path = out / f"{stem}{ext}"
            path.write_text(text)
            written.append(path)
    table = out / "resources.txt"
    table.write_text(f"# sm_{compiled[0].job.arch if compiled else '?'}, triton {_triton_version()}\n"
                     + report_table(compiled))
    written.append(table)
    return written


# --------------------------------------------------------------------------------------------------
# Entry points: the subprocess worker and the CLI.
# --------------------------------------------------------------------------------------------------

def _resolve(target: str) -> Callable[[], Any]:
    module, _, attr = target.partition(":")
    if not attr:
        raise SystemExit(f"expected MODULE:FUNCTION, got {target!r}")
    fn: Any = importlib.import_module(module)
    for part in attr.split("."):
        fn = getattr(fn, part)
    return fn


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fusednn.tools.aot MODULE:FUNCTION [-o DIR] [--arch N]` (or the internal --worker mode)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        jobs = pickle.loads(Path(argv[1]).read_bytes())
        Path(argv[2]).write_bytes(pickle.dumps(_compile_in_process(jobs)))
        return 0
    ap = argparse.ArgumentParser(prog="python -m fusednn.tools.aot", description=__doc__.splitlines()[0])
    ap.add_argument("target", help="MODULE:FUNCTION to call (no arguments) while recording its launches")
    ap.add_argument("-o", "--out", default="dump/aot", help="report directory (default dump/aot)")
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90 for H100")
    ns = ap.parse_args(argv)
    launches = collect(_resolve(ns.target))
    try:
        compiled = compile_launches(launches, ns.arch)
    except (AotCompileError, AotUnavailable) as e:
        print(e, file=sys.stderr)
        return 1
    write_reports(compiled, ns.out)
    print(f"{len(launches)} launches, {len(compiled)} distinct kernels; reports in {ns.out}")
    print(report_table(compiled), end="")
    return 0


if __name__ == "__main__":
    from fusednn.tools.aot import main as _main  # the package's module, so pickled results name fusednn.tools.aot

    sys.exit(_main())
