"""Every kernel of a LeNet training step compiles for the H100 (sm_90): no spills, tensor cores in tf32.

Triton's interpreter, which runs every other kernel test here, never runs Triton's compiler. This file
records (runs nothing) one training step of the tutorial LeNet: forward, backward with every gradient
(the input's too) and one `fusednn.optim.SGD(momentum=0.9)` step, with the launch configs the GPU path
would choose, at batch 64 and at batch 8 (where GEMM M dimensions are small), fused and unfused, in
ieee and tf32 precision. Every distinct kernel then goes through Triton's real compiler for sm_90 in
one `aot.compile_launches` call (one worker process under the interpreter; in-process in the triton
3.6 venv of .ci/aot_triton36.sh) and its cubin is read back for registers, local memory and SASS.
"""
from __future__ import annotations

import itertools
import re

import pytest
import torch

import fusednn
from fusednn.tools import aot
from fusednn.launch import Launch, kernel_name
from fusednn.models import LeNet
from fusednn.optim import SGD

pytestmark = pytest.mark.aot

_REASON = aot.unavailable_reason(90)
if _REASON is not None:
    pytest.skip(f"cannot compile for sm_90 here: {_REASON}", allow_module_level=True)

BATCHES = (64, 8)
MODES = {"fused": True, "unfused": False}
PRECISIONS = ("ieee", "tf32")
CASES = list(itertools.product(BATCHES, MODES, PRECISIONS))

# The GEMM-shaped kernels: generated conv/linear forwards and the hand-written dx/dw backward kernels.
_GEMM = re.compile(r"fnn_(conv|linear)\w*|_(conv_relu_pool|linear_relu)_bwd_d[xw]_kernel")

def record_training_step(batch: int, fuse: bool, precision: str) -> list[Launch]:
    """The launches of one LeNet training step (forward, backward, SGD), with GPU configs, run nowhere."""
    model = LeNet()
    net = fusednn.compile(model, fuse=fuse, precision=precision)
    opt = SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, 32, 32, requires_grad=True)

    def step() -> None:
        out = net(x)
        out.backward(torch.randn_like(out))
        opt.step()

    launches = aot.collect(step)  # nothing runs, so CPU tensors are fine without the interpreter
    # every gradient was asked for (the recorded ones hold garbage: nothing ran)
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())
    return launches


@pytest.fixture(scope="module")
def steps() -> dict[tuple, list[Launch]]:
    """Each case's recorded training step."""
    return {case: record_training_step(case[0], MODES[case[1]], case[2]) for case in CASES}


@pytest.fixture(scope="module")
def compiled(steps) -> dict[tuple, list[aot.Compiled]]:
    """Each case's distinct kernels, compiled for sm_90 (all cases in one compile_launches call)."""
    everything = aot.compile_launches([rec for launches in steps.values() for rec in launches])
    by_job = {c.job: c for c in everything}
    return {case: [by_job[aot.job_of(rec)] for rec in aot.unique(launches)] for case, launches in steps.items()}


def _table(kernels: list[aot.Compiled]) -> str:
    return "\n" + aot.report_table(kernels)


@pytest.mark.parametrize("batch, mode, precision", CASES)
def test_lenet_training_step_records_every_gemm_and_the_sgd_step(steps, batch, mode, precision):
    launches = steps[batch, mode, precision]
    names = [kernel_name(rec.kernel) for rec in launches]
    # 5 layers x (forward, dx, dw with db), conv1's dx being the input's gradient
    assert len([n for n in names if _GEMM.fullmatch(n)]) == 15, names
    conv_dx = [rec for rec in launches if kernel_name(rec.kernel) == "_conv_relu_pool_bwd_dx_kernel"]
    assert sorted(rec.meta["C"] for rec in conv_dx) == [1, 6]
    assert names.count("_sgd_step_kernel") == 1, names
    assert all(rec.meta["PRECISION"] == precision for rec in launches if "PRECISION" in rec.meta)


@pytest.mark.parametrize("batch, mode, precision", CASES)
def test_lenet_training_kernels_compile_for_sm90_without_spills(compiled, batch, mode, precision):
    kernels = compiled[batch, mode, precision]
    spilled = [c for c in kernels if c.resources.spills]
    assert not spilled, _table(spilled)


@pytest.mark.parametrize("batch, mode, precision", CASES)
def test_lenet_gemm_kernels_use_tensor_cores_in_tf32_and_only_then(compiled, batch, mode, precision):
    kernels = compiled[batch, mode, precision]
    gemm = {c.name for c in kernels if _GEMM.fullmatch(c.name)}
    assert gemm == {c.name for c in kernels if "tt.dot" in c.ttir}  # the names find every tl.dot
    on_tensor_cores = {c.name for c in kernels if c.resources.tensor_core > 0}
    assert on_tensor_cores == (gemm if precision == "tf32" else set()), _table(kernels)
