"""Inference: conv2d -> batch norm (running statistics) -> [+ residual] -> [activation] -> [pool] as one kernel.

Calls autograd does not record (`torch.no_grad()`, `inference_mode()`, or nothing requiring a gradient) run
the inference graph, where passes.fuse_conv_inference folds every eval-mode batch norm into the conv before it;
the epilogue reads the live running statistics and affine parameters on every call. Every numeric check
compares with torch in float64 (rel_err <= 1e-5); launch counts come from `stats()`.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusednn
from fusednn import launch
from fusednn.models import ResNet8
from tests.helpers import rel_err

TOL = 1e-5


def _randomize_bn(model: nn.Module) -> nn.Module:
    """Running statistics and affine parameters away from 0 / 1, so a missing term shows."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            if m.running_mean is not None:
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
            if m.weight is not None:
                nn.init.uniform_(m.weight, 0.5, 1.5)
            if m.bias is not None:
                nn.init.uniform_(m.bias, -0.5, 0.5)
    return model.eval()


def _infer(c, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return c(x)


def _check(model: nn.Module, x: torch.Tensor, folded: int) -> fusednn.CompiledModule:
    c = fusednn.compile(model)
    y = _infer(c, x)
    assert rel_err(y, copy.deepcopy(model).double()(x.double())) <= TOL
    st = c.stats()
    assert st["inference"] is (folded > 0)  # no fold: the one graph serves every call
    assert sum(k.startswith("fnn_conv_infer") for k in st["kernels"]) == folded, st["kernels"]
    return c


class Unit(nn.Module):
    """conv -> bn -> [act] -> [pool], with the variants a model writes."""

    def __init__(self, act: str = "relu", pool: str = "none", conv_bias: bool = False, affine: bool = True,
                 groups: int = 1, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, bias=conv_bias, groups=2 if groups == 2 else 1)
        self.bn = nn.BatchNorm2d(6, affine=affine)
        self.act, self.pool = act, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        if self.act == "relu":
            y = F.relu(y)
        elif self.act == "leaky_relu":
            y = F.leaky_relu(y, 0.2)
        elif self.act == "tanh":
            y = torch.tanh(y)
        if self.pool == "max":
            y = F.max_pool2d(y, 2)
        elif self.pool == "avg":
            y = F.avg_pool2d(y, 2)
        return y


@pytest.mark.parametrize("act, pool, conv_bias, affine, groups, stride", [
    ("none", "none", False, True, 1, 1),
    ("relu", "none", False, True, 1, 1),
    ("relu", "max", True, True, 1, 1),
    ("tanh", "avg", False, True, 1, 1),
    ("leaky_relu", "none", True, False, 2, 2),
])
def test_conv_bn_units_match_torch_float64(act, pool, conv_bias, affine, groups, stride):
    torch.manual_seed(0)
    m = _randomize_bn(Unit(act, pool, conv_bias, affine, groups, stride))
    c = _check(m, torch.randn(3, 4, 8, 8), folded=1)
    assert c.stats()["forward"]["launches"] == 1


def test_weight_only_and_bias_only_batch_norm_fold():
    torch.manual_seed(0)
    for drop in ("weight", "bias"):
        m = _randomize_bn(Unit())
        setattr(m.bn, drop, None)
        _check(m, torch.randn(2, 4, 8, 8), folded=1)


class Residual(nn.Module):
    """relu(bn(conv(x)) + shortcut), the shortcut first or second, `+` or `+=`, identity or conv+bn."""

    def __init__(self, order: str, project: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.short = nn.Sequential(nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6)) if project else nn.Identity()
        self.order = order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.conv(x))
        if self.order == "first":
            out = out + self.short(x)
        elif self.order == "second":
            out = self.short(x) + out
        else:
            out += self.short(x)
        return F.relu(out)


@pytest.mark.parametrize("order", ["first", "second", "inplace"])
@pytest.mark.parametrize("project", [False, True], ids=["identity", "projection"])
def test_residual_add_folds_into_the_conv_epilogue(order, project):
    torch.manual_seed(0)
    m = _randomize_bn(Residual(order, project))
    c = _check(m, torch.randn(2, 6, 8, 8), folded=1 + project)
    assert c.stats()["forward"]["launches"] == 1 + project


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.AvgPool2d(2)], ids=["max", "avg"])
@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU(), None], ids=["gelu", "relu", "none"])
def test_batch_norm_after_the_pool_folds_in_airbench_order(pool, act):
    """conv -> pool -> bn -> [act]: the pool reduces the conv's values, the batch norm (a negative weight
    included, which does not commute with max) and the activation run on the pooled tile."""
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 4, 3, padding=1), pool, nn.BatchNorm2d(4)] + ([act] if act is not None else [])
    m = _randomize_bn(nn.Sequential(*layers))
    with torch.no_grad():
        m[2].weight[0] = -1.0
    c = _check(m, torch.randn(2, 3, 9, 9), folded=1)
    assert c.stats()["forward"]["launches"] == 1


class Neg(nn.Module):
    """-x: a kernel activation with no function of its own in kernels/activation.py (templates write -z)."""

    def forward(self, x):
        return -x


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU6(), nn.SiLU(), nn.Hardswish(),
                                 nn.ELU(0.5), nn.Mish(), Neg()], ids=lambda a: type(a).__name__)
def test_any_activation_folds_where_no_backward_reads_it(act):
    """With a batch norm, and without one (then the inference graph's conv_infer takes what the training
    graph's conv_relu_pool may not: a max pool after a non-monotone activation, one with parameters)."""
    torch.manual_seed(0)
    with_bn = _randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act, nn.MaxPool2d(2)))
    _check(with_bn, torch.randn(2, 3, 8, 8), folded=1)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), act).eval()
    _check(plain, torch.randn(2, 3, 8, 8), folded=1)


def test_a_conv_and_relu_without_batch_norm_keep_the_training_graphs_kernel():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)).eval()
    c = _check(m, torch.randn(2, 3, 8, 8), folded=0)
    assert c.stats()["kernels"] == ["fnn_conv_relu_pool_3"]


def test_resnet8_eval_is_one_launch_per_conv_plus_the_head_and_matches_torch():
    torch.manual_seed(0)
    m = _randomize_bn(ResNet8(in_channels=3))
    convs = sum(isinstance(x, nn.Conv2d) for x in m.modules())
    linears = sum(isinstance(x, nn.Linear) for x in m.modules())
    c = fusednn.compile(m)
    for batch in (4, 3):  # one specialisation serves both
        x = torch.randn(batch, 3, 32, 32)
        assert rel_err(_infer(c, x), copy.deepcopy(m).double()(x.double())) <= TOL
    assert c.trace_count == 1
    assert c.stats()["forward"]["launches"] <= convs + linears + 1
    with launch.recording(execute=False):  # the count at batch 64, nothing run
        _infer(c, torch.randn(64, 3, 32, 32))
    assert c.stats()["forward"]["launches"] == convs + linears + 1 == 11


def test_live_statistics_and_parameters_reach_the_next_call():
    torch.manual_seed(0)
    m = _randomize_bn(ResNet8(in_channels=1))
    c = fusednn.compile(m)
    x = torch.randn(2, 1, 32, 32)
    _infer(c, x)
    with torch.no_grad():
        m.layer2.bn2.running_mean.add_(0.3)
        m.layer1.bn1.running_var.mul_(2.0)
        m.bn1.weight.mul_(-1.0)
    assert rel_err(_infer(c, x), copy.deepcopy(m).double()(x.double())) <= TOL
    other = _randomize_bn(ResNet8(in_channels=1))
    c.load_state_dict(other.state_dict())
    assert rel_err(_infer(c, x), copy.deepcopy(other).double()(x.double())) <= TOL
    assert c.trace_count == 1


def test_calls_autograd_records_run_the_training_graph_with_every_gradient():
    """Eval mode with gradients (fine-tuning with frozen statistics): the unfolded graph and its backward."""
    torch.manual_seed(0)
    m = _randomize_bn(Residual("first", True))
    c = fusednn.compile(m)
    x = torch.randn(2, 6, 8, 8)
    _infer(c, x)
    xg = x.clone().requires_grad_()
    y = c(xg)
    assert c.stats()["inference"] is False
    ref = copy.deepcopy(m).double()
    x64 = x.double().requires_grad_()
    y64 = ref(x64)
    dy = torch.randn_like(y64)
    y.backward(dy.float())
    y64.backward(dy)
    assert rel_err(y, y64) <= TOL and rel_err(xg.grad, x64.grad) <= TOL
    for (name, p), p64 in zip(m.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, p64.grad) <= TOL, name
    assert not any(k.startswith("fnn_conv_infer") for k in c.stats()["kernels"])


def test_training_mode_and_unfused_compiles_never_fold():
    torch.manual_seed(0)
    m = _randomize_bn(Unit())
    x = torch.randn(2, 4, 8, 8)
    c = fusednn.compile(m, fuse=False)
    assert rel_err(_infer(c, x), copy.deepcopy(m).double()(x.double())) <= TOL
    assert not any(k.startswith("fnn_conv_infer") for k in c.stats()["kernels"])
    m.train()  # batch statistics, running statistics updated: nothing to fold
    ref = copy.deepcopy(m).double()
    c = fusednn.compile(m)
    y = _infer(c, x)
    assert not any(k.startswith("fnn_conv_infer") for k in c.stats()["kernels"])
    with torch.no_grad():
        assert rel_err(y, ref(x.double())) <= TOL
    assert rel_err(m.bn.running_mean, ref.bn.running_mean) <= TOL
    assert rel_err(m.bn.running_var, ref.bn.running_var) <= TOL


def test_dump_and_kernels_show_the_inference_graph(tmp_path):
    torch.manual_seed(0)
    m = _randomize_bn(Residual("first", True))
    c = fusednn.compile(m)
    x = torch.randn(2, 6, 8, 8)
    c(x.requires_grad_())  # a training-graph call: the inference graph is not built yet
    assert c.inference_graph is None
    _infer(c, x)
    assert "conv_infer[batch_norm,add,relu]" in str(c.inference_graph)
    assert any(k.startswith("fnn_conv_infer") for k in c.kernels())
    c.dump(str(tmp_path), aot=False)
    text = (tmp_path / "inference.ir").read_text()
    assert "conv_infer[batch_norm,add,relu]" in text and "conv_infer[batch_norm]" in text
    names = {p.stem for p in (tmp_path / "kernels").glob("*.py")}
    assert set(c.kernels()) <= names


def test_a_residual_without_batch_norm_folds_too():
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.conv(x))

    torch.manual_seed(0)
    c = _check(Plain().eval(), torch.randn(2, 4, 6, 6), folded=1)
    assert "conv_infer[bias,add,relu]" in str(c.inference_graph)
