"""torch's own OpInfo samples (op_db) of the ops with half-precision kernels, in float16, through fusednn:
output and every gradient against torch in float64, within torch's float16 tolerance (1e-3) or 4x eager
float16's own error (tests/opcheck.py). At most `PER_OP` samples per op: each one compiles its own kernels
in Triton's interpreter."""
from __future__ import annotations

import pytest
import torch

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
    "nn.functional.cross_entropy": "cross_entropy", "nn.functional.prelu": "prelu", "softmax": "softmax",
    "log_softmax": "log_softmax", "nn.functional.layer_norm": "layer_norm", "nn.functional.group_norm": "group_norm",
    "sum": "sum", "cat": "cat", "nn.functional.nll_loss": "nll_loss", "nn.functional.mse_loss": "mse_loss",
    "nn.functional.l1_loss": "l1_loss", "nn.functional.instance_norm": "instance_norm", "rsub": "rsub",
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

    assert all(op in HALF_OPS or REGISTRY[op].kind == "act" for op in OPS.values())


def _values(fn):
    """A pool with return_indices=True returns (values, indices): check the values (the indices are integers
    torch and fusednn pick among ties each their own way)."""
    def values(*ts):
        out = fn(*ts)
        return out[0] if isinstance(out, tuple) else out

    return values


def _differentiable(fn, tensors) -> list[bool]:
    """Which floating tensors torch differentiates fn with respect to (not running statistics, nor a loss's
    class weights): one float64 backward per tensor."""
    flags = []
    for i, t in enumerate(tensors):
        ok = t.is_floating_point()
        if ok:
            ts = [u.detach().double().requires_grad_(j == i) if u.is_floating_point() else u for j, u in enumerate(tensors)]
            try:
                fn(*ts).sum().backward()
            except RuntimeError:
                ok = False
        flags.append(ok)
    return flags


@pytest.mark.parametrize("info, sample", _samples())
def test_op_db_samples_in_float16_match_torch_float64(info, sample):
    fn, tensors = sample_fn(info.op, sample)
    fn = _values(fn)
    grads = _differentiable(fn, tensors)
    try:
        check_fn(fn, tensors, grads=grads, dtype=torch.float16)
    except fusednn.FusednnError as e:  # refused by name is fine only for what float32 refuses too
        check = pytest.raises(fusednn.FusednnError)
        with check:
            fusednn.compile(fn)(*[t.float() if t.is_floating_point() else t for t in tensors])
        assert type(check.value) is type(e), f"{describe(sample)}: float16 refused but not float32: {e}"
