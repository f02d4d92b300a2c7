"""The training-step kernels of ResNet8 and AirbenchNet (convs, batch norm fused with the residual add and the
activation, forward and backward) compile for the H100 (sm_90): no spills, tensor cores in tf32 and only then.

Records (runs nothing) one forward and backward of each model in training mode at batch 64, 3x32x32, with the
launch configs the GPU path would choose, and compiles every distinct kernel with Triton's real compiler (see
tests/test_aot_lenet.py for how).
"""
from __future__ import annotations

import pytest
import torch

import fusednn
from fusednn.launch import Launch
from fusednn.models import AirbenchNet, ResNet8
from fusednn.tools import aot

pytestmark = pytest.mark.aot

_REASON = aot.unavailable_reason(90)
if _REASON is not None:
    pytest.skip(f"cannot compile for sm_90 here: {_REASON}", allow_module_level=True)

PRECISIONS = ("ieee", "tf32")
MODELS = {"resnet8": ResNet8, "airbench": AirbenchNet}
CASES = [(m, p) for m in MODELS for p in PRECISIONS]


def record_training_step(model: str, precision: str) -> list[Launch]:
    net = fusednn.compile(MODELS[model](in_channels=3), precision=precision)
    x = torch.randn(64, 3, 32, 32)

    def step() -> None:
        y = net(x)
        y.backward(torch.ones_like(y))

    return aot.collect(step)


@pytest.fixture(scope="module")
def compiled() -> dict[tuple[str, str], list[aot.Compiled]]:
    recs = {case: record_training_step(*case) for case in CASES}
    everything = aot.compile_launches([r for launches in recs.values() for r in launches])
    by_job = {c.job: c for c in everything}
    return {case: [by_job[aot.job_of(r)] for r in aot.unique(launches)] for case, launches in recs.items()}


@pytest.mark.parametrize("model, precision", CASES)
def test_training_kernels_compile_for_sm90_without_spills(compiled, model, precision):
    kernels = compiled[model, precision]
    names = {c.name for c in kernels}
    assert any(n.startswith("fnn_batch_norm_act") for n in names), sorted(names)
    assert "_batch_norm_bwd_dwdb_kernel" in names, sorted(names)
    # a batch norm's dx made in the conv's GEMM prologue; the split-K sums in the dx launch
    assert {c.name for c in kernels if dict(c.job.constexprs).get("BN")} == {"_conv_relu_pool_bwd_dw_kernel",
                                                                  "_conv_relu_pool_bwd_dx_kernel"}, sorted(names)
    assert any(dict(c.job.constexprs).get("SUM_DW") for c in kernels), sorted(names)
    if model == "airbench":  # the whitening conv + GELU: its backward's prologue makes dz from the saved z
        gelu = {c.name for c in kernels if dict(c.job.constexprs).get("ACT") == "gelu" and c.name.startswith("_conv")}
        assert gelu == {"_conv_relu_pool_bwd_dw_kernel"}, sorted(names)  # (the first conv: no dx)
        forward = [c for c in kernels if c.name.startswith("fnn_conv_relu_pool")]
        assert any("= _gelu(" in open(c.job.file).read() for c in forward), sorted(names)
    spilled = [c for c in kernels if c.resources.spills]
    assert not spilled, "\n" + aot.report_table(spilled)


@pytest.mark.parametrize("model, precision", CASES)
def test_training_gemms_use_tensor_cores_in_tf32_and_only_then(compiled, model, precision):
    kernels = compiled[model, precision]
    gemm = {c.name for c in kernels if "tt.dot" in c.ttir}
    assert gemm, [c.name for c in kernels]
    on_tensor_cores = {c.name for c in kernels if c.resources.tensor_core > 0}
    assert on_tensor_cores == (gemm if precision == "tf32" else set()), "\n" + aot.report_table(kernels)
