"""fusednn.compile: shared parameters, state_dict keys, the specialisation cache, errors on bad input."""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn as nn

import fusednn
from tests.models import LeNet, Mixed


def test_compiled_module_shares_parameters_and_state_dict_keys():
    net = LeNet()
    c = fusednn.compile(net, backend="reference")
    assert list(c.state_dict().keys()) == list(net.state_dict().keys())
    assert [id(p) for p in c.parameters()] == [id(p) for p in net.parameters()]
    c.load_state_dict(LeNet().state_dict())  # loads into the user's own parameters
    assert all(a is b for a, b in zip(c.parameters(), net.parameters()))


def test_train_and_eval_reach_the_user_module():
    m = Mixed()
    c = fusednn.compile(m, backend="reference")
    c.eval()
    assert not m.training and not m.bn.training
    c.train()
    assert m.training and m.drop.training


def test_same_signature_never_retraces_and_new_batch_traces_once(caplog):
    c = fusednn.compile(LeNet(), backend="reference")
    x = torch.randn(4, 1, 32, 32)
    c(x)
    c(torch.randn(4, 1, 32, 32))
    assert c.trace_count == 1
    with caplog.at_level(logging.INFO, logger="fusednn"):
        c(torch.randn(2, 1, 32, 32))
    assert c.trace_count == 2
    assert "x: shape [4,1,32,32] -> [2,1,32,32]" in caplog.text
    c(torch.randn(2, 1, 32, 32))
    c(x)
    assert c.trace_count == 2


def test_mode_change_is_a_new_specialisation():
    m = Mixed()
    c = fusednn.compile(m, backend="reference")
    x = torch.randn(2, 3, 16, 16)
    c(x)
    c.eval()
    c(x)
    assert c.trace_count == 2 and c.graph.nodes[1].attrs["training"] is False


def test_wrong_channels_names_module_expected_and_actual():
    c = fusednn.compile(LeNet(), backend="reference")
    with pytest.raises(fusednn.InputMismatchError) as e:
        c(torch.randn(2, 3, 32, 32))
    msg = str(e.value)
    assert "conv2d in module 'conv1'" in msg and "[2, 3, 32, 32]" in msg and "expected input with 1 channels" in msg
    assert isinstance(e.value, RuntimeError)  # torch's type for this error


def test_spatial_size_too_small_and_wrong_rank_raise_clear_errors():
    c = fusednn.compile(LeNet(), backend="reference")
    with pytest.raises(fusednn.InputMismatchError, match="module 'conv2'"):
        c(torch.randn(2, 1, 12, 12))  # conv1 -> 8x8 -> pool 4x4, smaller than conv2's 5x5 kernel
    with pytest.raises(fusednn.InputMismatchError, match="conv2d in module 'conv1'"):
        c(torch.randn(1, 2, 1, 32, 32))


def test_dtype_mismatch_raises_and_module_is_untouched():
    net = LeNet()
    before = copy.deepcopy(net.state_dict())
    c = fusednn.compile(net, backend="reference")
    with pytest.raises(fusednn.InputMismatchError, match="conv1"):
        c(torch.randn(2, 1, 32, 32, dtype=torch.float64))
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_bad_compile_options_raise():
    with pytest.raises(ValueError, match="backend"):
        fusednn.compile(LeNet(), backend="cuda")
    with pytest.raises(ValueError, match="precision"):
        fusednn.compile(LeNet(), precision="fp8")
    with pytest.raises(TypeError):
        fusednn.compile(3)


def test_specialisation_cap_warns_what_keeps_changing(caplog):
    c = fusednn.compile(nn.Linear(3, 2), backend="reference", max_specializations=2)
    with caplog.at_level(logging.WARNING, logger="fusednn"):
        for n in range(1, 5):
            c(torch.randn(n, 3))
    assert "keeps changing" in caplog.text and "input: shape" in caplog.text
