"""Ahead-of-time compilation for sm_90 (H100) without a GPU: fusednn.tools.aot.

These tests compile with Triton's real compiler (never the interpreter), so they also run in the triton 3.6
venv of .ci/aot_triton36.sh, where TRITON_INTERPRET=0 and kernels compile in-process; under the main venv's
interpreter they compile in one subprocess per call.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

import fusednn  # noqa: F401  (before any kernel is defined: picks the interpreter on CPU-only machines)
from fusednn.tools import aot
from fusednn.compiler import configs
from fusednn.launch import launch

pytestmark = pytest.mark.aot

_REASON = aot.unavailable_reason(90)
if _REASON is not None:
    pytest.skip(f"cannot compile for sm_90 here: {_REASON}", allow_module_level=True)

_TRITON = tuple(int(p) for p in triton.__version__.split(".")[:2])


# --------------------------------------------------------------------------------------------------
# Kernels compiled by the tests (module level: the AOT worker re-imports them by module and name).
# --------------------------------------------------------------------------------------------------

@triton.jit
def _relu(x):
    return tl.maximum(x, 0.0)


@triton.jit
def _relu_copy_kernel(
    x_ptr,  # [n] input
    y_ptr,  # [n] output: relu(x), through a @triton.jit helper so helper calls must compile too
    n,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, _relu(tl.load(x_ptr + offs, mask=mask)), mask=mask)


@triton.jit
def _matmul_kernel(
    a_ptr,  # [M, K] row-major
    b_ptr,  # [K, N] row-major
    c_ptr,  # [M, N] row-major output
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        a = tl.load(a_ptr + rm[:, None] * K + kk[None, :], mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
        b = tl.load(b_ptr + kk[:, None] * N + rn[None, :], mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


@triton.jit
def _bad_arange_kernel(
    y_ptr,  # [10] output
):
    offs = tl.arange(0, 10)  # not a power of two: every Triton version refuses it
    tl.store(y_ptr + offs, offs.to(tl.float32))


@triton.jit
def _signature_kernel(
    a_ptr,  # fp32 tensor
    b_ptr,  # uint8 tensor
    c_ptr,  # int32 tensor, misaligned view
    d_ptr,  # int64 tensor
    one,  # the int 1: the JIT makes it a constexpr
    n16,  # a multiple of 16: divisible
    n17,
    big,  # needs 64 bits
    scale,  # a float
    opt,  # None
    BLOCK: tl.constexpr,
):
    pass


# --------------------------------------------------------------------------------------------------
# Launchers: every launch goes through fusednn.launch.launch, block sizes from fusednn's configs.
# --------------------------------------------------------------------------------------------------

def relu_copy(x: torch.Tensor, y: torch.Tensor) -> None:
    meta = configs.elementwise(x.numel())
    launch(_relu_copy_kernel, (triton.cdiv(x.numel(), meta["BLOCK"]),), x, y, x.numel(), **meta)


def matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, precision: str, block_m: int) -> None:
    (M, K), N = a.shape, b.shape[1]
    meta = dict(BLOCK_M=block_m, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=3)
    launch(_matmul_kernel, (triton.cdiv(M, block_m), triton.cdiv(N, 32)), a, b, c, M, N, K, PRECISION=precision,
           **meta)


def cli_program() -> None:
    """What `python -m fusednn.tools.aot tests.test_aot:cli_program` records: two specialisations of one kernel."""
    relu_copy(torch.empty(100), torch.empty(100))
    relu_copy(torch.empty(4096), torch.empty(4096))


def _by_name_and(compiled: list[aot.Compiled], name: str, **constexprs) -> aot.Compiled:
    hits = [c for c in compiled
            if c.name == name and all(dict(c.job.constexprs)[k] == v for k, v in constexprs.items())]
    assert len(hits) == 1, [c.job for c in compiled]
    return hits[0]


@pytest.fixture(scope="module")
def compiled() -> list[aot.Compiled]:
    """One batch (one worker process) holding every kernel variant the tests below inspect."""
    from fusednn.kernels.linear_relu import linear_relu_backward

    def program():
        x = torch.empty(1000)
        relu_copy(x, torch.empty_like(x))
        a, b, c = torch.empty(100, 70), torch.empty(70, 50), torch.empty(100, 50)
        matmul(a, b, c, "ieee", 16)
        matmul(a, b, c, "tf32", 16)
        matmul(a, b, c, "tf32", 64)
        # project kernels (docs/KERNELS.md contract) that call a @triton.jit helper of their module
        x, w, y = torch.empty(64, 120), torch.empty(84, 120), torch.empty(64, 84)
        linear_relu_backward(y, x, w, y, act="relu", act_param=0.0, needs_dx=True, needs_dw=True, needs_db=True,
                             precision="ieee")

    return aot.compile_launches(aot.collect(program))


# --------------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------------

def test_tiny_kernel_compiles_for_sm90_without_spills(compiled):
    c = _by_name_and(compiled, "_relu_copy_kernel")
    assert ".target sm_90a" in c.ptx
    assert "tt.func public @_relu_copy_kernel" in c.ttir
    assert c.cubin[:4] == b"\x7fELF"
    r = c.resources
    assert r.kernel == "_relu_copy_kernel" and r.num_warps == 4
    assert r.registers > 0 and not r.spills
    assert r.ldg > 0 and r.stg > 0


def test_dot_kernel_compiles_for_sm90_without_spills(compiled):
    for prec, bm in (("ieee", 16), ("tf32", 16), ("tf32", 64)):
        r = _by_name_and(compiled, "_matmul_kernel", PRECISION=prec, BLOCK_M=bm).resources
        assert r.registers > 0 and not r.spills, (prec, bm, r)
        assert r.ldgsts > 0 and r.shared > 0, (prec, bm, r)  # num_stages=3 pipelines loads through shared


def test_dot_uses_tensor_cores_in_tf32_and_not_in_ieee(compiled):
    ieee = _by_name_and(compiled, "_matmul_kernel", PRECISION="ieee", BLOCK_M=16).resources
    tf32 = _by_name_and(compiled, "_matmul_kernel", PRECISION="tf32", BLOCK_M=16).resources
    assert tf32.hmma > 0, tf32.opcodes
    assert ieee.tensor_core == 0 and ieee.ffma > 0, ieee.opcodes  # exact fp32: FMAs, no tensor cores
    # 64-row tiles over 4 warps take sm_90's warpgroup MMA (wgmma, SASS HGMMA) instead of mma.sync
    wide = _by_name_and(compiled, "_matmul_kernel", PRECISION="tf32", BLOCK_M=64).resources
    assert wide.hgmma > 0, wide.opcodes


def test_project_kernels_calling_jit_helpers_compile(compiled):
    for name in ("_linear_relu_bwd_dx_kernel", "_linear_relu_bwd_dw_kernel"):
        c = _by_name_and(compiled, name)
        assert c.resources.registers > 0 and c.resources.ffma > 0, c.resources  # ieee dot: fp32 FMAs


def test_collect_runs_nothing_and_picks_gpu_configs():
    x, y = torch.randn(300), torch.zeros(300)
    launches = aot.collect(relu_copy, x, y)
    assert torch.equal(y, torch.zeros(300))  # recorded, not executed
    assert len(launches) == 1
    with configs.use_target("gpu"):  # the GPU's block, whatever this process would pick for itself
        assert launches[0].meta == configs.elementwise(300)


def test_signature_follows_the_jit_specialisation():
    a = torch.empty(8)
    c_view = torch.empty(9, dtype=torch.int32)[1:]  # 4-byte offset: not 16-byte aligned
    args = (a, torch.empty(8, dtype=torch.uint8), c_view, torch.empty(8, dtype=torch.int64), 1, 32, 17, 2**40 + 3,
            0.5, None)
    job = aot.job_of(aot.collect(lambda: launch(_signature_kernel, (1,), *args, BLOCK=64, num_warps=2))[0])
    assert dict(job.signature) == {"a_ptr": "*fp32", "b_ptr": "*u8", "c_ptr": "*i32", "d_ptr": "*i64",
                                   "one": "constexpr", "n16": "i32", "n17": "i32", "big": "i64",
                                   "scale": "fp32", "opt": "constexpr", "BLOCK": "constexpr"}
    assert dict(job.constexprs) == {"one": 1, "opt": None, "BLOCK": 64}
    assert set(job.divisible) == {"a_ptr", "b_ptr", "d_ptr", "n16"}
    assert dict(job.options)["num_warps"] == 2 and "num_warps" not in dict(job.constexprs)
    # the same rules as the JIT that runs these kernels on the GPU: job_of asks Triton's own function, and
    # the expectations above pin what it answers, so a Triton that changes them fails here
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    for name, value in zip(dict(job.signature), args):
        ty, spec = native(BaseBackend, value, False, True, True)
        assert dict(job.signature)[name] == ty, name
        assert (name in job.divisible) == (spec == "D"), name


def test_identical_launches_compile_once():
    def program():
        relu_copy(torch.empty(17), torch.empty(17))
        relu_copy(torch.empty(4001), torch.empty(4001))  # other grid and n, same specialisation
        relu_copy(torch.empty(4000), torch.empty(4000))  # n divisible by 16: another specialisation

    launches = aot.collect(program)
    assert len(launches) == 3
    uniq = aot.unique(launches)
    assert uniq == [launches[0], launches[2]]


def test_reports_hold_one_row_and_four_files_per_kernel(compiled, tmp_path):
    paths = aot.write_reports(compiled, tmp_path)
    table = (tmp_path / "resources.txt").read_text().splitlines()
    rows = [line for line in table[2:] if line.strip()]
    assert len(rows) == len(compiled)
    assert table[1].split()[:3] == ["kernel", "warps", "regs"]
    names = {p.name for p in paths}
    assert "_relu_copy_kernel.ttir" in names and "_relu_copy_kernel.ptx" in names
    matmul_res = sorted(n for n in names if n.startswith("_matmul_kernel-") and n.endswith(".res.txt"))
    assert len(matmul_res) == 3  # one kernel, three variants: file names carry the variant id
    res = (tmp_path / "_relu_copy_kernel.res.txt").read_text()
    assert "registers" in res and "SASS opcodes" in res and "constexprs  BLOCK=1024" in res
    assert aot.report_table(compiled).splitlines() == table[1:]


def test_compile_error_names_the_kernel():
    launches = aot.collect(lambda: launch(_bad_arange_kernel, (1,), torch.empty(10)))
    with pytest.raises(aot.AotCompileError) as err:
        aot.compile_launch(launches[0])
    msg = str(err.value)
    assert "_bad_arange_kernel" in msg and "sm_90" in msg and "power of 2" in msg


@pytest.mark.skipif(_TRITON >= (3, 7), reason=f"triton {triton.__version__} accepts K=8 dots; "
                    "the triton 3.6 venv of .ci/aot_triton36.sh checks this")
def test_triton36_rejects_dot_with_8_wide_operand():
    a, b, c = torch.empty(16, 8), torch.empty(8, 16), torch.empty(16, 16)
    launches = aot.collect(lambda: launch(_matmul_kernel, (1, 1), a, b, c, 16, 16, 8, BLOCK_M=16, BLOCK_N=16,
                                          BLOCK_K=8, PRECISION="ieee"))
    with pytest.raises(aot.AotCompileError) as err:
        aot.compile_launch(launches[0])
    msg = str(err.value)
    assert "_matmul_kernel" in msg and "K >= 16" in msg


def test_cli_writes_reports_for_what_a_function_launches(tmp_path):
    root = Path(__file__).resolve().parents[1]
    # TRITON_INTERPRET=0: the CLI compiles in-process (the fixture above covers the worker subprocess)
    env = dict(os.environ, PYTHONPATH=str(root), TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "fusednn.tools.aot", "tests.test_aot:cli_program", "-o", str(tmp_path)],
                          cwd=root, check=False, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "2 launches, 2 distinct kernels" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("_relu_copy_kernel-")]
    # n = 100 and n = 4096: only the latter is specialised as a multiple of 16
    assert [r.split()[-1] for r in rows] == ["div16=x_ptr,y_ptr", "div16=x_ptr,y_ptr,n"]
    assert (tmp_path / "resources.txt").read_text().splitlines()[1:] == proc.stdout.splitlines()[1:]
    assert len(list(tmp_path.glob("_relu_copy_kernel-*.ptx"))) == 2
