"""Codegen and inspection: generated files (header, labels, valid Python), the on-disk cache, dump(), DEBUG."""
from __future__ import annotations

import ast
import json
import logging

import torch

import fusednn
from fusednn.compiler import source
from tests.models import LeNet


def _compiled_lenet(**kw):
    c = fusednn.compile(LeNet(), **kw)
    c(torch.randn(2, 1, 32, 32)).sum().backward()
    return c


def test_every_generated_kernel_has_header_labels_and_parses():
    c = _compiled_lenet()
    steps = [s for s in c._last().executable.steps if s.kernel is not None]
    assert [s.kernel.name for s in steps] == ["fnn_conv_relu_pool_3", "fnn_conv_relu_pool_6", "fnn_linear_relu_9",
                                              "fnn_linear_relu_11", "fnn_linear_12"]
    for s in steps:
        text = s.kernel.source
        ast.parse(text)
        head = text.splitlines()[:3]
        assert head[0] == f"# fusednn generated kernel {s.kernel.name}"
        assert head[1].startswith("# implements: " + ", ".join(a.label() for a in s.node.absorbed or (s.node,)))
        assert head[2].startswith("# backward: kernels/")
        for a in s.node.absorbed or (s.node,):
            assert f"# {a.label()}" in text


def test_generated_files_live_in_the_cache_and_a_second_compile_reuses_them(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDNN_CACHE_DIR", str(tmp_path))
    c1 = _compiled_lenet()
    files = sorted(p.name for p in tmp_path.glob("*.py"))
    assert len(files) == 5
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.py")}
    c2 = _compiled_lenet()
    assert sorted(p.name for p in tmp_path.glob("*.py")) == files
    assert {p: p.stat().st_mtime_ns for p in tmp_path.glob("*.py")} == mtimes
    k1 = [s.kernel.module for s in c1._last().executable.steps if s.kernel]
    k2 = [s.kernel.module for s in c2._last().executable.steps if s.kernel]
    assert all(a is b for a, b in zip(k1, k2))  # imported once, reused


def test_dump_writes_ir_kernels_plan_stats_and_graph(tmp_path):
    c = _compiled_lenet()
    written = c.dump(str(tmp_path), aot=False)
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"traced.ir", "fused.ir", "backward.ir", "graph.dot", "stats.json"} <= names
    assert {f"kernels/{k}.py" for k in c.stats()["kernels"]} <= names
    assert set(map(str, tmp_path.rglob("*.*"))) >= set(written)
    assert "conv_relu_pool[bias,relu,max_pool2d(2,2)]" in (tmp_path / "fused.ir").read_text()
    assert "conv2d(%x" in (tmp_path / "traced.ir").read_text()
    plan = (tmp_path / "backward.ir").read_text()
    assert "conv_relu_pool_backward" in plan and "idx(%3)" in plan
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["forward"]["launches"] == 5 and stats["backward"]["launches"] == 9
    assert stats["forward"]["bytes"] == sum(k["bytes"] for k in stats["forward"]["per_kernel"].values())


def test_unfused_dump_has_one_kernel_per_op(tmp_path):
    c = _compiled_lenet(fuse=False)
    c.dump(str(tmp_path), aot=False)
    kernels = sorted(p.stem for p in (tmp_path / "kernels").glob("*.py"))
    assert len(kernels) == 11 and "fnn_relu_2" in kernels and "fnn_max_pool2d_3" in kernels


def test_dump_to_unwritable_path_raises_clear_error(tmp_path):
    c = _compiled_lenet()
    target = tmp_path / "file"
    target.write_text("not a directory")
    try:
        c.dump(str(target / "sub"), aot=False)
    except fusednn.CompileError as e:
        assert "cannot write" in str(e) and str(target) in str(e)
    else:
        raise AssertionError("expected CompileError")


def test_debug_levels_log_ir_launches_and_source(monkeypatch, caplog):
    monkeypatch.setenv("FUSEDNN_DEBUG", "4")
    with caplog.at_level(logging.WARNING, logger="fusednn"):
        _compiled_lenet()
    text = caplog.text
    assert "IR after fuse" in text and "forward launches" in text and "fnn_linear_12" in text
    assert "@triton.jit" in text


def test_source_header_format():
    h = source.header("fnn_x_1", ["%1 conv2d", "%2 relu"], ["conv1", "relu"], "kernels/conv_relu_pool.py")
    assert h.splitlines() == ["# fusednn generated kernel fnn_x_1", "# implements: %1 conv2d, %2 relu   (module: conv1, relu)",
                              "# backward: kernels/conv_relu_pool.py"]
