"""fusednn.tools.bench on the CPU: main() writes bench.json (device, versions, batch, per-variant launches and bytes,
fused below unfused) and a PNG; the analytic step cost; the README targets and tables from a result dict."""
from __future__ import annotations

import json

import pytest

import fusednn
from fusednn.tools import bench
from fusednn.models import LeNet


def _lenet_flops(n: int) -> int:
    # MACs per image: conv1 6x28x28 outputs x 1*5*5, conv2 16x10x10 x 6*5*5, fc 400x120, 120x84, 84x10.
    # Forward + dW for every layer, dX for all but conv1 (the images need no gradient): 2 FLOPs per MAC.
    first = 6 * 28 * 28 * 25
    rest = 16 * 10 * 10 * 150 + 400 * 120 + 120 * 84 + 84 * 10
    return 2 * n * (2 * first + 3 * rest)


@pytest.mark.parametrize("batch", [1, 3, 64])
def test_step_cost_counts_lenet_gemm_flops_and_minimum_bytes(batch):
    cost = bench.step_cost(LeNet(), batch)
    assert cost["params"] == 61706
    assert cost["flops_per_step"] == _lenet_flops(batch)
    # images + int64 targets + parameters and momentum buffers, each read and written once
    assert cost["min_bytes_per_step"] == 4 * batch * 1024 + 8 * batch + 4 * 61706 * 4
    assert bench.step_cost(LeNet(), batch, momentum=False)["min_bytes_per_step"] == 4 * batch * 1024 + 8 * batch + 8 * 61706


def test_bench_main_on_cpu_writes_counts_fused_below_unfused_and_a_png(tmp_path, capsys):
    assert bench.main(str(tmp_path), [3], 1, "cpu", "lenet") == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert res["device"]["type"] == "cpu" and res["device"]["interpreter"] is True
    assert res["versions"]["fusednn"] == fusednn.__version__ and res["versions"]["torch"] and res["versions"]["triton"]
    assert "not performance figures" in res["note"] and res["model"] == "lenet"
    [run] = res["runs"]
    assert (run["batch"], run["precision"]) == (3, "ieee") and run["flops_per_step"] == _lenet_flops(3)
    v = run["variants"]
    fused, unfused, eager = v["fusednn_fused"], v["fusednn_unfused"], v["torch_eager"]
    assert fused["status"] == unfused["status"] == eager["status"] == "ok"
    # 5 fused groups + cross-entropy forward, its backward kernel, LeNet's 9 backward kernels, 1 SGD launch
    assert fused["launches_per_step"] == 17 and fused["launch_source"] == "fusednn.launch.recording"
    assert unfused["launches_per_step"] > fused["launches_per_step"]
    assert unfused["bytes_per_step"] > fused["bytes_per_step"] > run["min_bytes_per_step"]
    for r in (fused, unfused):
        assert r["bytes_per_step"] == sum(k["bytes"] for k in r["kernels"].values())
        assert r["ms_per_step"] > 0 and len(r["trials_ms"]) == 1
        assert r["loss_max_rel_diff_vs_torch_eager"] <= 1e-5  # same weights, same batches as torch eager
    assert eager["launches_per_step"] is None and eager["bytes_per_step"] is None  # profiler counts: GPU only
    for name in ("torch_eager_graph", "fusednn_fused_graph", "fusednn_unfused_graph", "torch_compile", "torch_compile_ro"):
        assert v[name]["status"] == "skipped" and v[name]["reason"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and res["chart"].endswith("bench.png")
    out = capsys.readouterr().out.rstrip().splitlines()
    assert "not performance figures" in "\n".join(out)
    tail = "\n".join(out[-20:])
    assert "fusednn_unfused" in tail and "ms/step" in tail and "launches" in tail  # the table comes last


def test_bench_fp16_runs_every_variant_under_autocast_with_fewer_bytes(tmp_path):
    """--precision fp16: the step under torch.autocast(float16) for torch eager and fusednn alike; the losses
    agree within float16's tolerance and fusednn's kernels move fewer bytes than in fp32."""
    names = ["torch_eager", "fusednn_fused"]
    assert bench.main(str(tmp_path), [3], 1, "cpu", "lenet", precisions=["ieee", "fp16"], variants=names) == 0
    runs = {r["precision"]: r["variants"] for r in json.loads((tmp_path / "bench.json").read_text())["runs"]}
    assert runs["fp16"]["torch_eager"]["status"] == runs["fp16"]["fusednn_fused"]["status"] == "ok"
    assert runs["fp16"]["fusednn_fused"]["loss_max_rel_diff_vs_torch_eager"] <= 1e-3
    assert runs["fp16"]["fusednn_fused"]["launches_per_step"] == runs["ieee"]["fusednn_fused"]["launches_per_step"]
    assert runs["fp16"]["fusednn_fused"]["bytes_per_step"] < runs["ieee"]["fusednn_fused"]["bytes_per_step"]
    with pytest.raises(ValueError, match="precisions"):
        bench.main(str(tmp_path), [3], 1, "cpu", "lenet", precisions=["bf16"])


def test_bench_budget_skips_later_runs_but_always_runs_the_first(tmp_path):
    assert bench.main(str(tmp_path), [2, 4], 1, "cpu", "lenet", variants=["torch_eager"], budget_s=0) == 0
    res = json.loads((tmp_path / "bench.json").read_text())
    assert [r["batch"] for r in res["runs"]] == [2]
    assert res["skipped_runs"][0]["batch"] == 4 and "budget" in res["skipped_runs"][0]["reason"]


def test_bench_refuses_unknown_model_and_variant(tmp_path):
    with pytest.raises(ValueError, match="unknown model"):
        bench.main(str(tmp_path), [2], 1, "cpu", "resnet")
    with pytest.raises(ValueError, match="unknown variants"):
        bench.main(str(tmp_path), [2], 1, "cpu", "lenet", variants=["fusednn_fastest"])


def _gpu_like_result() -> dict:
    def ok(ms):
        return {"status": "ok", "ms_per_step": ms}
    runs = []
    for batch, eager, ro, fg in ((64, 0.40, 0.09, 0.035), (512, 0.50, 0.12, 0.10), (4096, 3.0, 1.1, 0.9)):
        runs.append({"batch": batch, "precision": "ieee", "flops_per_step": 1, "min_bytes_per_step": 1,
                     "variants": {"torch_eager": ok(eager), "torch_compile_ro": ok(ro), "fusednn_fused_graph": ok(fg)}})
    return {"runs": runs}


def test_targets_compare_fused_graph_with_reduce_overhead_eager_and_40us():
    rows = {(t["target"], t["batch"]): t for t in bench.targets(_gpu_like_result())}
    ro64 = rows[("fusednn_fused_graph vs torch_compile_ro >= 1.5x", 64)]
    assert ro64["value"] == pytest.approx(0.09 / 0.035) and ro64["met"]
    assert not rows[("fusednn_fused_graph vs torch_compile_ro >= 1.5x", 512)]["met"]  # 1.2x
    assert rows[("fusednn_fused_graph vs torch_eager >= 8.0x", 64)]["met"]  # 11.4x
    assert rows[("fusednn_fused_graph vs torch_eager >= 3.0x", 4096)]["value"] == pytest.approx(3.0 / 0.9)
    assert rows[("fusednn_fused_graph <= 40 us/step (H100)", 64)]["value"] == pytest.approx(35.0)
    assert len(rows) == 5  # no eager target at 512, no reduce-overhead target at 4096


def test_matrix_lists_microseconds_per_variant_and_batch():
    text = bench.matrix(_gpu_like_result())
    lines = text.splitlines()
    assert "fused+g" in lines[0] and len(lines) == 4
    assert lines[1].split()[:2] == ["64", "ieee"] and "35.0" in lines[1] and "400.0" in lines[1]
