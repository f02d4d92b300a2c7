"""Every kernel of a half-precision LeNet training step compiles for the H100 (sm_90): no spills, and every
GEMM-shaped kernel on tensor cores (half-precision operands go to the tensor cores whatever the precision flag).

Records (runs nothing) the forward and backward of `LeNet().half()` with every gradient, with the launch
configs the GPU path would choose, at batch 64 and 8, fused and unfused, and compiles every distinct kernel
with Triton's real compiler (see tests/test_aot_lenet.py for how). bfloat16, which fusednn still refuses
(Triton's interpreter cannot check it here), is compiled from the same launches with every float16 tensor
argument made bfloat16: the kernels are dtype-generic, so this is the step a bfloat16 model would launch.
"""
from __future__ import annotations

import dataclasses
import itertools
import re

import pytest
import torch

import fusednn
from fusednn.launch import Launch
from fusednn.models import LeNet
from fusednn.tools import aot

pytestmark = pytest.mark.aot

_REASON = aot.unavailable_reason(90)
if _REASON is not None:
    pytest.skip(f"cannot compile for sm_90 here: {_REASON}", allow_module_level=True)

CASES = list(itertools.product((64, 8), ("fused", "unfused"), ("float16", "bfloat16")))
_GEMM = re.compile(r"fnn_(conv|linear)\w*|_(conv_relu_pool|linear_relu)_bwd_d[xw]_kernel")


def _as_bfloat16(rec: Launch) -> Launch:
    args = tuple(torch.empty(a.shape, dtype=torch.bfloat16) if isinstance(a, torch.Tensor) and a.dtype == torch.float16
                 else a for a in rec.args)
    return dataclasses.replace(rec, args=args)


def record_half_step(batch: int, mode: str, dtype: str) -> list[Launch]:
    model = LeNet().half()
    net = fusednn.compile(model, fuse=mode == "fused")
    x = torch.randn(batch, 1, 32, 32, dtype=torch.float16, requires_grad=True)

    def step() -> None:
        out = net(x)
        out.backward(torch.randn_like(out))

    launches = aot.collect(step)
    return launches if dtype == "float16" else [_as_bfloat16(r) for r in launches]


@pytest.fixture(scope="module")
def compiled() -> dict[tuple, list[aot.Compiled]]:
    recs = {case: record_half_step(*case) for case in CASES}
    everything = aot.compile_launches([r for launches in recs.values() for r in launches])
    by_job = {c.job: c for c in everything}
    return {case: [by_job[aot.job_of(r)] for r in aot.unique(launches)] for case, launches in recs.items()}


@pytest.mark.parametrize("batch, mode, dtype", CASES)
def test_half_lenet_kernels_compile_for_sm90_without_spills(compiled, batch, mode, dtype):
    spilled = [c for c in compiled[batch, mode, dtype] if c.resources.spills]
    assert not spilled, "\n" + aot.report_table(spilled)


@pytest.mark.parametrize("batch, mode, dtype", CASES)
def test_half_lenet_gemms_use_tensor_cores(compiled, batch, mode, dtype):
    kernels = compiled[batch, mode, dtype]
    gemm = {c.name for c in kernels if _GEMM.fullmatch(c.name)}
    assert len(gemm) >= 6 and gemm == {c.name for c in kernels if "tt.dot" in c.ttir}
    on_tensor_cores = {c.name for c in kernels if c.resources.tensor_core > 0}
    assert on_tensor_cores == gemm, "\n" + aot.report_table(kernels)
