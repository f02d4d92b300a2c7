"""The inference kernels of ResNet8, AirbenchNet and MobileNetV2Tiny (conv + batch norm + residual + any
activation + pool folded, depthwise convs, the heads) compile for the H100 (sm_90): no spills, tensor cores
in tf32 and only then.

Records (runs nothing) one `torch.no_grad()` forward of each model in eval mode at batch 64, 3x32x32, with
the launch configs the GPU path would choose, in ieee and tf32 precision, and compiles every distinct
kernel with Triton's real compiler (see tests/test_aot_lenet.py for how).
"""
from __future__ import annotations

import pytest
import torch

import fusednn
from fusednn.launch import Launch
from fusednn.models import AirbenchNet, MobileNetV2Tiny, ResNet8
from fusednn.tools import aot

pytestmark = pytest.mark.aot

_REASON = aot.unavailable_reason(90)
if _REASON is not None:
    pytest.skip(f"cannot compile for sm_90 here: {_REASON}", allow_module_level=True)

PRECISIONS = ("ieee", "tf32")
MODELS = {"resnet8": ResNet8, "airbench": AirbenchNet, "mobilenet": MobileNetV2Tiny}
CASES = [(m, p) for m in MODELS for p in PRECISIONS]


def record_inference(model: str, precision: str) -> list[Launch]:
    net = fusednn.compile(MODELS[model](in_channels=3).eval(), precision=precision)
    x = torch.randn(64, 3, 32, 32)

    def forward() -> None:
        with torch.no_grad():
            net(x)

    return aot.collect(forward)


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], list[aot.Compiled]]:
    recs = {case: record_inference(*case) for case in CASES}
    everything = aot.compile_launches([r for launches in recs.values() for r in launches])
    by_job = {c.job: c for c in everything}
    return {case: [by_job[aot.job_of(r)] for r in aot.unique(launches)] for case, launches in recs.items()}


@pytest.mark.parametrize("model, precision", CASES)
def test_inference_kernels_compile_for_sm90_without_spills(compiled, model, precision):
    kernels = compiled[model, precision]
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in MODELS[model]().modules())
    assert sum(c.name.startswith("fnn_conv_infer") for c in kernels) == convs, [c.name for c in kernels]
    spilled = [c for c in kernels if c.resources.spills]
    assert not spilled, "\n" + aot.report_table(spilled)


@pytest.mark.parametrize("model, precision", CASES)
def test_inference_gemms_use_tensor_cores_in_tf32_and_only_then(compiled, model, precision):
    kernels = compiled[model, precision]
    gemm = {c.name for c in kernels if "tt.dot" in c.ttir}
    # every conv and linear is a GEMM but the depthwise convs: direct kernels, a multiply-add per tap
    depthwise = sum(isinstance(m, torch.nn.Conv2d) and 1 < m.groups == m.in_channels == m.out_channels
                    for m in MODELS[model]().modules())
    direct = {c.name for c in kernels if c.name.startswith(("fnn_conv_infer", "fnn_linear"))} - gemm
    assert len(direct) == depthwise and gemm <= {c.name for c in kernels if c.name.startswith(("fnn_conv", "fnn_linear"))}
    on_tensor_cores = {c.name for c in kernels if c.resources.tensor_core > 0}
    assert on_tensor_cores == (gemm if precision == "tf32" else set()), "\n" + aot.report_table(kernels)
