"""ResNet8's inference kernels (conv + batch norm + residual + activation folded, the head) compile for the H100
(sm_90): no spills, tensor cores in tf32 and only then.

Records (runs nothing) one `torch.no_grad()` forward of ResNet8 in eval mode at batch 64, 3x32x32, with the
launch configs the GPU path would choose, in ieee and tf32 precision, and compiles every distinct kernel
with Triton's real compiler (see tests/test_aot_lenet.py for how).
"""
from __future__ import annotations

import pytest
import torch

import fusednn
from fusednn.launch import Launch
from fusednn.models import ResNet8
from fusednn.tools import aot

pytestmark = pytest.mark.aot

_REASON = aot.unavailable_reason(90)
if _REASON is not None:
    pytest.skip(f"cannot compile for sm_90 here: {_REASON}", allow_module_level=True)

PRECISIONS = ("ieee", "tf32")


def record_inference(precision: str) -> list[Launch]:
    net = fusednn.compile(ResNet8(in_channels=3).eval(), precision=precision)
    x = torch.randn(64, 3, 32, 32)

    def forward() -> None:
        with torch.no_grad():
            net(x)

    return aot.collect(forward)


@pytest.fixture(scope="module")
def compiled() -> dict[str, list[aot.Compiled]]:
    recs = {p: record_inference(p) for p in PRECISIONS}
    everything = aot.compile_launches([r for launches in recs.values() for r in launches])
    by_job = {c.job: c for c in everything}
    return {p: [by_job[aot.job_of(r)] for r in aot.unique(launches)] for p, launches in recs.items()}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resnet8_inference_kernels_compile_for_sm90_without_spills(compiled, precision):
    kernels = compiled[precision]
    assert sum(c.name.startswith("fnn_conv_infer") for c in kernels) == 9, [c.name for c in kernels]
    spilled = [c for c in kernels if c.resources.spills]
    assert not spilled, "\n" + aot.report_table(spilled)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_resnet8_inference_gemms_use_tensor_cores_in_tf32_and_only_then(compiled, precision):
    kernels = compiled[precision]
    gemm = {c.name for c in kernels if "tt.dot" in c.ttir}
    assert {c.name for c in kernels if c.name.startswith(("fnn_conv_infer", "fnn_linear"))} == gemm
    on_tensor_cores = {c.name for c in kernels if c.resources.tensor_core > 0}
    assert on_tensor_cores == (gemm if precision == "tf32" else set()), "\n" + aot.report_table(kernels)
