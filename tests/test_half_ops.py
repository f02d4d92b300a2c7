"""torch's own OpInfo samples (op_db) of the ops with half-precision kernels, in float16, through fusednn:
output and every gradient against torch in float64, within torch's float16 tolerance (1e-3) or 4x eager
float16's own error (tests/opcheck.py). At most `PER_OP` samples per op: each one compiles its own kernels
in Triton's interpreter."""
from __future__ import annotations

import pytest
import torch
from torch.utils import _pytree as pytree

import fusednn
from fusednn.compiler.codegen import HALF_OPS
from tests.opcheck import check_fn, describe, sample_fn

PER_OP = 10
# op_db name -> the fusednn op it traces to (each in codegen.HALF_OPS, or an activation)
OPS = {
    "nn.functional.conv2d": "conv2d", "nn.functional.linear": "linear", "nn.functional.relu": "relu",
    "nn.functional.gelu": "gelu", "nn.functional.silu": "silu", "sigmoid": "sigmoid", "tanh": "tanh",
    "nn.functional.hardswish": "hardswish", "nn.functional.elu": "elu", "nn.functional.leaky_relu": "leaky_relu",
    "nn.functional.relu6": "relu6", "nn.functional.mish": "mish", "nn.functional.softplus": "softplus",
    "add": "add", "mul": "mul", "sub": "sub", "nn.functional.max_pool2d": "max_pool2d",
    "nn.functional.avg_pool2d": "avg_pool2d", "nn.functional.adaptive_avg_pool2d": "adaptive_avg_pool2d",
    "nn.functional.batch_norm": "batch_norm", "mean": "mean", "amax": "amax",
    "nn.functional.cross_entropy": "cross_entropy",
}


def _samples():
    from torch.testing._internal.common_methods_invocations import op_db

    out = []
    for name in OPS:
        info = next(o for o in op_db if o.name == name and o.variant_test_name == "")
        samples = list(info.sample_inputs("cpu", torch.float64, requires_grad=True))
        out += [pytest.param(info, s, id=f"{name}-{i}") for i, s in enumerate(samples[:PER_OP])]
    return out


def test_every_op_here_has_half_precision_kernels():
    from fusednn.compiler.ops import REGISTRY

    assert all(op in HALF_OPS or (REGISTRY[op].kind == "act" and op != "prelu") for op in OPS.values())


def _values(fn):
    """A pool with return_indices=True returns (values, indices): check the values (the indices are integers
    torch and fusednn pick among ties each their own way)."""
    def values(*ts):
        out = fn(*ts)
        return out[0] if isinstance(out, tuple) else out

    return values


@pytest.mark.parametrize("info, sample", _samples())
def test_op_db_samples_in_float16_match_torch_float64(info, sample):
    fn, tensors = sample_fn(info.op, sample)
    fn = _values(fn)
    stats = [id(t) for t in sample.args[:2]] if info.name == "nn.functional.batch_norm" else []  # running stats
    grads = [id(t) not in stats for t in pytree.tree_leaves((sample.input, sample.args, sample.kwargs))
             if isinstance(t, torch.Tensor)]
    try:
        check_fn(fn, tensors, grads=grads, dtype=torch.float16)
    except fusednn.FusednnError as e:  # refused by name is fine only for what float32 refuses too
        check = pytest.raises(fusednn.FusednnError)
        with check:
            fusednn.compile(fn)(*[t.float() if t.is_floating_point() else t for t in tensors])
        assert type(check.value) is type(e), f"{describe(sample)}: float16 refused but not float32: {e}"
