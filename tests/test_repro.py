"""`repro/<kernel>.py` in a dump (fusednn/tools/repro.py): every script of LeNet's and ResNet8's training-step dump
runs alone (a subprocess, Triton's interpreter, no fusednn on its path) and its kernel matches the float64
torch reference; a corrupted kernel makes its script fail."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import fusednn
from fusednn.models import MODELS


def _dump(model: str, out: Path) -> Path:
    net = fusednn.compile(MODELS[model]())
    net(torch.randn(2, 1, 32, 32))
    net.dump(str(out), aot=False)
    return out / "repro"


def _run(script: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TRITON_INTERPRET"] = "1"
    # -I: isolated, so neither the worktree nor site's editable fusednn install can be imported
    return subprocess.run([sys.executable, "-I", script.name], cwd=script.parent, env=env, capture_output=True,
                          text=True, timeout=600)


def _scripts(d: Path) -> list[Path]:
    return sorted(p for p in d.glob("*.py") if not p.name.startswith("src_"))


def _assert_pass(scripts: list[Path]) -> None:
    """Each script runs alone and its kernel matches the float64 reference."""
    for script in scripts:
        r = _run(script)
        assert r.returncode == 0, f"{script.name}:\n{r.stdout}\n{r.stderr[-3000:]}"
        assert "max error" in r.stdout


@pytest.mark.parametrize("model,kernels", [("lenet", 10), ("resnet8", None)])
def test_every_repro_script_of_the_training_step_runs_standalone_and_matches_torch(tmp_path, model, kernels):
    d = _dump(model, tmp_path)
    scripts = _scripts(d)
    if kernels is not None:
        # 5 generated forward kernels, 4 hand-written backward ones (dx, dw of conv and linear; the conv's
        # split-K sums run in its dx launch), SGD
        assert len(scripts) == kernels
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(_run, scripts))
    for script, r in zip(scripts, results):
        assert r.returncode == 0, f"{script.name}:\n{r.stdout}\n{r.stderr[-3000:]}"
        assert "max error" in r.stdout
    sources = "".join(p.read_text() for p in d.glob("src_*.py"))
    assert not re.search(r"^\s*(from|import) fusednn", sources, re.M)


def test_repro_scripts_of_a_batch_norm_with_its_own_statistics_kernel_match_torch(tmp_path):
    # Linear -> BatchNorm1d -> ReLU: the fused batch norm group computes its batch statistics with a kernel
    # of its own (no conv epilogue); both scripts rebuild the partials from the batch norm's input.
    torch.manual_seed(0)
    net = fusednn.compile(torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                                              torch.nn.Linear(6, 3)))
    net(torch.randn(5, 4))
    net.dump(str(tmp_path), aot=False)
    scripts = [p for p in _scripts(tmp_path / "repro") if "batch_norm" in p.name and "bwd" not in p.name]
    assert len(scripts) == 2  # the statistics kernel and the normalising one
    for script in scripts:
        r = _run(script)
        assert r.returncode == 0, f"{script.name}:\n{r.stdout}\n{r.stderr[-3000:]}"


def test_a_repro_script_fails_when_its_kernel_is_wrong(tmp_path):
    d = _dump("lenet", tmp_path)
    src = d / "src_linear_relu.py"
    text = src.read_text()
    assert "tl.store(dx_ptrs, acc," in text
    src.write_text(text.replace("tl.store(dx_ptrs, acc,", "tl.store(dx_ptrs, acc * 1.001,"))
    r = _run(d / "_linear_relu_bwd_dx_kernel.py")
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_repro_scripts_of_convs_that_save_what_their_activation_needs_match_torch(tmp_path):
    # conv -> GELU saves z (GELU' needs its input); conv -> SiLU -> avg pool saves z at every conv position;
    # conv -> tanh -> avg pool saves tanh(z); linear -> Mish saves z: each forward script rebuilds the saved
    # tensor from the reference.
    torch.manual_seed(0)
    nn = torch.nn
    net = fusednn.compile(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 5, 3, padding=1),
                                        nn.SiLU(), nn.AvgPool2d(2), nn.Conv2d(5, 4, 1), nn.Tanh(), nn.AvgPool2d(2),
                                        nn.Flatten(), nn.Linear(16, 6), nn.Mish(), nn.Linear(6, 3)))
    y = net(torch.randn(2, 3, 8, 8))
    y.sum().backward()
    net.dump(str(tmp_path), aot=False)
    scripts = [p for p in _scripts(tmp_path / "repro") if p.name.startswith(("fnn_conv_relu_pool", "fnn_linear_relu"))]
    assert len(scripts) == 4
    _assert_pass(scripts)


def test_repro_scripts_of_a_pool_kernel_and_of_split_k_partials_match_torch(tmp_path):
    # A max pool kernel of its own writes torch's flat h * W + w argmax (a fused conv's is a 1-byte window
    # offset); the conv's dw kernel at batch 16 writes split-K partials (SPLIT > 1 at the recorded GPU
    # configs), which its script compares by their sum over the splits.
    torch.manual_seed(0)
    nn = torch.nn
    net = fusednn.compile(nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1)))
    net(torch.randn(16, 8, 16, 16, requires_grad=True)).sum().backward()
    net.dump(str(tmp_path), aot=False)
    scripts = [p for p in _scripts(tmp_path / "repro") if "pool" in p.name]
    dw = next(p for p in scripts if p.name == "_conv_relu_pool_bwd_dw_kernel.py")
    assert re.search(r"'SPLIT': ([2-9]|\d\d)", dw.read_text())
    assert {p.name for p in scripts} >= {"fnn_max_pool2d_1.py", "_pool_bwd_dx_kernel.py", dw.name}
    _assert_pass(scripts)


def test_repro_scripts_of_a_batch_norm_with_running_statistics_match_torch(tmp_path):
    # conv -> BatchNorm2d (eval) -> ReLU recorded under autograd: the batch norm normalises with its running
    # statistics, which its scripts rebuild (not the batch's).
    torch.manual_seed(0)
    nn = torch.nn
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        m[1].running_mean.uniform_(-1, 1)
        m[1].running_var.uniform_(0.5, 2)
    net = fusednn.compile(m.eval())
    net(torch.randn(2, 3, 8, 8, requires_grad=True)).sum().backward()
    net.dump(str(tmp_path), aot=False)
    scripts = [p for p in _scripts(tmp_path / "repro") if "batch_norm" in p.name]
    assert len(scripts) >= 2
    _assert_pass(scripts)
