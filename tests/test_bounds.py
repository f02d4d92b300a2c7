"""The analytic minimum bytes of a step (compiler/bounds.py): the schedule it assumes, worked by hand on a
small graph, and a floor under what fusednn's kernels move on the models."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusednn
from fusednn import launch
from fusednn.compiler.bounds import groups, minimum_bytes
from fusednn.compiler.configs import use_target
from fusednn.models import MODELS


def _graph(model: nn.Module, x: torch.Tensor, fuse: bool = False):
    c = fusednn.compile(model, fuse=fuse)
    with launch.recording(execute=False):
        y = c(x)
        if model.training:
            y.sum().backward()
    return c


class _Two(nn.Module):
    """conv -> batch norm -> relu -> conv: two kernels in the minimal schedule (the batch norm's input is
    the barrier)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn(self.conv1(x))))


def test_the_minimum_of_a_conv_batch_norm_conv_step_worked_by_hand():
    g = _graph(_Two().train(), torch.randn(2, 3, 6, 6)).graph
    f32 = 4
    x, z, out = 2 * 3 * 36 * f32, 2 * 4 * 36 * f32, 2 * 5 * 36 * f32  # 864, 1152, 1440
    w1, w2, bn = 4 * 3 * 9 * f32, 5 * 4 * 9 * f32, 4 * 4 * f32  # bn: weight, bias, running mean and var
    assert [(len(k.outputs), len(k.sources), len(k.normalized)) for k in groups(g)] == [(1, 1, 0), (1, 1, 1)]
    forward = (x + w1 + z) + (z + bn + w2 + out)
    backward = (
        (z + x) + w1 + w1  # first kernel: dz and x once, its weight read and its gradient written
        + (out + z) + (z + min(out, 2 * z))  # second: dO and z, then after the sums z again and dO again
        + (bn + w2) + (2 * f32 * 4 + w2)  # its parameters read, the gradients of the affine ones and w2 written
        + z  # dz written
    )
    assert minimum_bytes(g) == {"forward": forward, "backward": backward}
    # In eval the whole network is one kernel: input, parameters, output.
    e = _graph(_Two().eval(), torch.randn(2, 3, 6, 6)).graph
    assert minimum_bytes(e, train=False) == {"forward": x + w1 + bn + w2 + out, "backward": 0}


class _Shared(nn.Module):
    """Two batch norms over one conv output, each feeding its own conv, summed: the conv output is read by
    one kernel (both convs), and its gradient has one writer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn1, self.bn2 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)
        self.a, self.b = nn.Conv2d(4, 4, 1, bias=False), nn.Conv2d(4, 4, 1, bias=False)
        self.bn3, self.bn4 = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        z = self.conv(x)
        za, zb = self.a(torch.relu(self.bn1(z))), self.b(torch.relu(self.bn2(z)))
        return self.bn3(za) + self.bn4(zb)


def test_kernels_that_share_a_source_are_one_and_a_source_read_by_two_kernels_adds_its_gradients():
    g = _graph(_Shared().train(), torch.randn(2, 3, 4, 4)).graph
    ks = groups(g)
    assert [len(k.outputs) for k in ks] == [1, 2, 1]  # conv; both convs (one read of z); the sum
    assert [len(k.sources) for k in ks] == [1, 1, 2]
    # za and zb are each read by one kernel: no gradient to add. Reading z twice would add z once more.
    n = 2 * 4 * 16 * 4
    base = minimum_bytes(g)["backward"]

    class _Twice(_Shared):
        def forward(self, x):  # the same, plus z itself in the output: a third kernel now reads z
            z = self.conv(x)
            za, zb = self.a(torch.relu(self.bn1(z))), self.b(torch.relu(self.bn2(z)))
            return self.bn3(za) + self.bn4(zb) + self.bn3(z)

    gt = _graph(_Twice().train(), torch.randn(2, 3, 4, 4)).graph
    z = gt.nodes[0].out
    assert [sorted(s.name for s in k.sources) for k in groups(gt)][2].count(z.name) == 1
    assert sum(z in k.sources for k in groups(gt)) == 2  # the two-conv kernel and the sum's kernel
    # The sum's kernel reads z in both passes and writes its gradient, which the first kernel's adds into.
    assert minimum_bytes(gt)["backward"] == base + 4 * n


@pytest.mark.parametrize("name", ["resnet8", "airbench"])
def test_the_minimum_is_below_what_fusednn_moves(name):
    """A bound above what the kernels move is a wrong bound (or a wrong byte count)."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    with use_target("gpu"):
        c = _graph(MODELS[name](in_channels=3).train(), x, fuse=True)
    st, m = c.stats(), minimum_bytes(c.graph)
    assert 0 < m["forward"] < st["forward"]["bytes"] and 0 < m["backward"] < st["backward"]["bytes"]
