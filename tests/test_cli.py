"""The `fusednn` command line through `fusednn.tools.cli.main([...])`: train (checkpoints that load into plain
torch models, resume equal to an uninterrupted run, plot, dump), dump, info, bench option parsing, and bad
input reported as one line on stderr with a non-zero exit and no traceback."""
from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import pytest
import torch

import fusednn
import fusednn.tools.aot
from fusednn.tools.cli import main
from fusednn.models import LeNet, LeNet5
from fusednn.optim import SGD
from fusednn.tools.train import load_checkpoint, lr_at, save_checkpoint
from tests.helpers import rel_err

TINY = ["train", "--dataset", "synthetic", "--limit", "16", "--batch-size", "8", "--schedule", "constant",
        "--seed", "3"]


def run_cli(argv: list) -> tuple[int, str, str]:
    """main(argv) with stdout and stderr captured (usable from module-scoped fixtures, unlike capsys)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny runs: 2 epochs straight (with --plot and --dump), 1 epoch, and that 1 epoch resumed to 2."""
    d = tmp_path_factory.mktemp("train")
    with pytest.MonkeyPatch.context() as mp:
        # The dump's sm_90 reports take ~15 s here; `fusednn dump` tests them, this run only the dump's timing.
        mp.setattr(fusednn.tools.aot, "unavailable_reason", lambda arch=90: "skipped by the test")
        a = run_cli(TINY + ["--epochs", 2, "--save", d / "a.pt", "--plot", d / "a.png", "--dump", d / "dump"])
    b = run_cli(TINY + ["--epochs", 1, "--save", d / "b.pt"])
    c = run_cli(TINY + ["--epochs", 2, "--resume", d / "b.pt", "--save", d / "c.pt"])
    return {"dir": d, "a": a, "b": b, "c": c}


def test_train_returns_0_with_progress_on_stderr_and_summary_on_stdout(runs):
    rc, out, err = runs["a"]
    assert rc == 0, err
    assert "epoch 1/2" in err and "epoch 2/2" in err and "test" in err
    for key in ("epochs", "wall time", "train loss", "test accuracy", "device", "Triton interpreter"):
        assert key in out
    assert "2 (2 in this run)" in out


def test_checkpoint_holds_the_documented_keys_and_loads_into_plain_lenet(runs):
    ckpt = torch.load(runs["dir"] / "a.pt", weights_only=True)
    assert {"model", "optimizer", "epoch", "model_name", "history"} <= set(ckpt)
    assert ckpt["epoch"] == 2 and ckpt["model_name"] == "lenet" and len(ckpt["history"]) == 2
    plain = LeNet()
    plain.load_state_dict(ckpt["model"])  # strict: the plain model's keys exactly
    torch.manual_seed(3)
    assert not torch.equal(LeNet().conv1.weight, plain.conv1.weight)  # the run trained the seeded weights
    # torch -> fusednn: the compiled model sees the same weights and computes the same function.
    compiled = fusednn.compile(plain)
    assert all(torch.equal(compiled.state_dict()[k], v) for k, v in ckpt["model"].items())
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        assert rel_err(compiled(x), plain.double()(x.double())) <= 1e-5
    # fusednn -> torch: a state dict loaded through a compiled model lands in, and comes back from, plain torch.
    other = LeNet()
    fusednn.compile(other).load_state_dict(ckpt["model"])
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ckpt["model"].items())


def test_checkpoint_optimizer_state_loads_into_torch_sgd(runs):
    ckpt = torch.load(runs["dir"] / "a.pt", weights_only=True)
    net = LeNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    opt.load_state_dict(ckpt["optimizer"])
    bufs = [opt.state[p]["momentum_buffer"] for p in net.parameters()]
    assert [b.shape for b in bufs] == [p.shape for p in net.parameters()]


def test_resume_continues_from_the_saved_epoch_and_equals_an_uninterrupted_run(runs):
    rc, _, err = runs["c"]
    assert rc == 0, err
    assert "resuming after epoch 1" in err and "epoch 2/2" in err and "epoch 1/2" not in err
    a = torch.load(runs["dir"] / "a.pt", weights_only=True)
    b = torch.load(runs["dir"] / "b.pt", weights_only=True)
    c = torch.load(runs["dir"] / "c.pt", weights_only=True)
    assert b["epoch"] == 1 and c["epoch"] == 2
    assert c["history"][0] == b["history"][0] and len(c["history"]) == 2
    # Same batches, restored momentum, deterministic kernels: bit-identical to training 2 epochs in one go.
    assert all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    for pa, pc in zip(a["optimizer"]["state"].values(), c["optimizer"]["state"].values()):
        assert torch.equal(pa["momentum_buffer"], pc["momentum_buffer"])
    assert a["history"][1]["train_loss"] == c["history"][1]["train_loss"]


def test_resume_of_a_finished_run_trains_nothing_and_reports_its_accuracy(runs):
    rc, out, err = run_cli(TINY + ["--epochs", 2, "--resume", runs["dir"] / "c.pt"])
    assert rc == 0, err
    assert "2 (0 in this run)" in out and "epoch 2/2 [" not in err
    acc = torch.load(runs["dir"] / "c.pt", weights_only=True)["history"][-1]["test_acc"]
    assert f"{100 * acc:.2f}%" in out


def test_train_reads_mnist_idx_files_from_data_dir(tmp_path):
    from tests.test_data import _mnist_dir

    _mnist_dir(tmp_path, n_train=6, n_test=3)
    rc, out, err = run_cli(["train", "--dataset", "mnist", "--data-dir", tmp_path, "--epochs", 1, "--batch-size", 6])
    assert rc == 0, err
    assert "mnist (6 train / 3 test images)" in err and "test accuracy" in out


def test_plot_writes_a_png(runs):
    data = (runs["dir"] / "a.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_train_dump_writes_the_dump_after_the_first_step(runs):
    d = runs["dir"] / "dump"
    for name in ("traced.ir", "fused.ir", "backward.ir", "stats.json", "graph.dot"):
        assert (d / name).is_file(), name
    stats = json.loads((d / "stats.json").read_text())
    assert stats["backward"]["launches"] > 0  # written after a backward ran
    assert "dump" in runs["a"][1]


def test_dump_command_writes_ir_kernels_stats_and_graph_and_lists_them(tmp_path, capsys):
    out = tmp_path / "dump"
    assert main(["dump", "--model", "lenet", "--out", str(out), "--batch-size", "2"]) == 0
    printed = capsys.readouterr().out
    for name in ("traced.ir", "fused.ir", "backward.ir", "stats.json", "graph.dot"):
        assert (out / name).is_file(), name
        assert str(out / name) in printed
    kernels = sorted((out / "kernels").glob("*.py"))
    assert len(kernels) == 5  # LeNet fused: 2 conv+relu+pool, 2 linear+relu, 1 linear
    assert all(str(k) in printed for k in kernels)
    aot = sorted((out / "aot").glob("*.ptx"))  # sm_90 reports, forward and backward kernels
    assert len(aot) > len(kernels) and all(str(p) in printed for p in aot)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["groups"] == 5 and stats["forward"]["launches"] == 5 and stats["backward"]["launches"] > 0
    assert "conv_relu_pool" in (out / "fused.ir").read_text()


def test_dump_command_no_fuse_writes_one_kernel_per_op(tmp_path, capsys):
    out = tmp_path / "dump"
    assert main(["dump", "--out", str(out), "--no-fuse", "--batch-size", "1", "--no-aot"]) == 0
    assert len(list((out / "kernels").glob("*.py"))) > 5
    assert not (out / "aot").exists()
    assert json.loads((out / "stats.json").read_text())["forward"]["launches"] > 5  # more than fused LeNet's 5


def test_info_prints_versions_device_interpreter_and_cache_dir(capsys):
    import numpy
    import triton

    from fusednn.compiler.source import cache_dir

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for text in (f"fusednn       {fusednn.__version__}", torch.__version__, triton.__version__, numpy.__version__,
                 str(cache_dir())):
        assert text in out
    assert ("interpreter   on" if fusednn._backend.interpreting() else "interpreter   off") in out
    assert ("cuda" if torch.cuda.is_available() else "cpu (no CUDA device)") in out


def test_bench_parses_repeated_and_comma_batch_sizes_and_calls_bench_main(monkeypatch, tmp_path):
    import fusednn.tools.bench

    calls = []
    monkeypatch.setattr(fusednn.tools.bench, "main", lambda *a, **k: calls.append((a, k)) or 7)
    argv = ["bench", "--model", "lenet5", "--batch-size", "8,16", "--batch-size", "32", "--steps", "3",
            "--device", "cpu", "--out", str(tmp_path)]
    assert main(argv) == 7  # bench's exit status is passed through
    assert calls == [((str(tmp_path), [8, 16, 32], 3, "cpu", "lenet5"), {"precisions": None})]
    calls.clear()
    assert main(argv + ["--precision", "fp16", "--precision", "ieee"]) == 7
    assert calls[-1][1] == {"precisions": ["fp16", "ieee"]}
    calls.clear()
    assert main(["bench"]) == 7
    (out, sizes, steps, device, model), _ = calls[0]
    assert out == "bench" and model == "lenet" and device is None and sizes and steps >= 1


def test_help_and_version_exit_0(capsys):
    assert main(["--version"]) == 0
    assert fusednn.__version__ in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    assert "--resume" in capsys.readouterr().out


def _bad_inputs(d: Path) -> dict:
    """Each bad command line with the phrase its error must contain."""
    (d / "blocker").write_text("a file where a directory is needed")
    (d / "mnist").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (d / "mnist" / name).write_bytes(b"\x12\x34\x08\x01" + b"\x00\x00\x00\x01" + b"\x05")  # bad magic
    (d / "garbage.pt").write_bytes(b"not a checkpoint at all")
    net5 = LeNet5()
    save_checkpoint(d / "lenet5.pt", model=net5, optimizer=SGD(net5.parameters(), lr=0.1), epoch=1,
                    model_name="lenet5", history=[])
    save_checkpoint(d / "mislabelled.pt", model=net5, optimizer=SGD(net5.parameters(), lr=0.1), epoch=1,
                    model_name="lenet", history=[])  # says lenet, holds LeNet5's weights
    blocked = d / "blocker" / "sub"
    return {
        "unknown model": (TINY + ["--model", "resnet"], "invalid choice: 'resnet'"),
        "unknown dataset": (TINY + ["--dataset", "cifar"], "invalid choice: 'cifar'"),
        "bad batch size": (TINY + ["--batch-size", "0"], "must be at least 1"),
        "unknown command": (["bogus"], "invalid choice: 'bogus'"),
        "missing mnist dir": (["train", "--dataset", "mnist", "--data-dir", d / "none"], "does not exist"),
        "mnist without dir": (["train", "--dataset", "mnist"], "--data-dir"),
        "corrupt mnist": (["train", "--dataset", "mnist", "--data-dir", d / "mnist"], "train-images-idx3-ubyte"),
        "unwritable save": (TINY + ["--save", blocked / "c.pt"], "cannot write checkpoint"),
        "save is a directory": (TINY + ["--save", d], "is a directory"),
        "unwritable plot": (TINY + ["--plot", blocked / "p.png"], "cannot write plot"),
        "unwritable dump": (TINY + ["--dump", blocked], "cannot write dump directory"),
        "other model's checkpoint": (TINY + ["--resume", d / "lenet5.pt"], "holds a 'lenet5' checkpoint"),
        "mismatched state dict": (TINY + ["--resume", d / "mislabelled.pt"], "does not fit model 'lenet'"),
        "garbage checkpoint": (TINY + ["--resume", d / "garbage.pt"], "not a readable checkpoint"),
        "missing checkpoint": (TINY + ["--resume", d / "nope.pt"], "not found"),
        "dump unwritable": (["dump", "--out", blocked], "cannot write dump directory"),
        "dump without out": (["dump"], "--out"),
        "cuda without gpu": (TINY + ["--device", "cuda"], "no CUDA device"),
    }


BAD = ["unknown model", "unknown dataset", "bad batch size", "unknown command", "missing mnist dir",
       "mnist without dir", "corrupt mnist", "unwritable save", "save is a directory", "unwritable plot",
       "unwritable dump", "other model's checkpoint", "mismatched state dict", "garbage checkpoint",
       "missing checkpoint", "dump unwritable", "dump without out", "cuda without gpu"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gives_one_error_line_and_nonzero_exit_without_traceback(case, tmp_path, capsys):
    if case == "cuda without gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    argv, phrase = _bad_inputs(tmp_path)[case]
    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("fusednn: error: "), captured.err
    assert phrase in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_interrupt_gives_one_line_and_exit_130(monkeypatch, capsys):
    import fusednn.tools.train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fusednn.tools.train, "fit", interrupted)
    assert main(TINY) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["fusednn: error: interrupted"]


def test_checkpoint_write_interrupted_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    net = LeNet()
    opt = SGD(net.parameters(), lr=0.1)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, model=net, optimizer=opt, epoch=1, model_name="lenet", history=[{"epoch": 1}])

    def torn_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=net, optimizer=opt, epoch=2, model_name="lenet", history=[])
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


@pytest.mark.parametrize("schedule,mid", [("constant", 0.1), ("linear", 0.05), ("cosine", 0.05)])
def test_lr_schedules_start_at_lr_and_decay_to_zero(schedule, mid):
    assert lr_at(0.1, schedule, 0, 10) == 0.1
    assert math.isclose(lr_at(0.1, schedule, 5, 10), mid)
    assert math.isclose(lr_at(0.1, schedule, 10, 10), 0.1 if schedule == "constant" else 0.0, abs_tol=1e-12)
    assert lr_at(0.1, schedule, 2, 10) >= lr_at(0.1, schedule, 7, 10)


def test_train_adamw_matches_torch_adamw_eager(tmp_path):
    """--optimizer adamw: fusednn.optim.AdamW in the same loop as torch eager with torch.optim.AdamW (same
    initial weights, batches and lr) ends at the same weights; its state loads into torch's AdamW."""
    from fusednn.tools.train import load_dataset, shard

    rc, _, err = run_cli(TINY + ["--epochs", 1, "--optimizer", "adamw", "--lr", "0.003", "--save", tmp_path / "a.pt"])
    assert rc == 0, err
    ckpt = torch.load(tmp_path / "a.pt", weights_only=True)
    with torch.random.fork_rng():
        torch.manual_seed(3)  # TINY's --seed
        net = LeNet()
    init = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(net.parameters(), lr=0.003, weight_decay=0.01)
    x, y = load_dataset("synthetic", seed=3, limit=16)[0].tensors
    order = shard(len(y), __import__("fusednn.tools.train", fromlist=["World"]).World(), 3, 0)
    for b in range(2):
        idx = order[b * 8:(b + 1) * 8]
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
        opt.step()
    for k, v in net.state_dict().items():
        assert rel_err(ckpt["model"][k] - init[k], v - init[k]) <= 1e-4, k
    torch.optim.AdamW(LeNet().parameters()).load_state_dict(ckpt["optimizer"])


def test_train_fp16_is_autocast_with_a_grad_scaler_like_torch_amp(tmp_path):
    """--precision fp16: forward and loss under torch.autocast(float16), a GradScaler, fp32 master weights.
    The same loop in torch eager (autocast, GradScaler, torch.optim.SGD) and in float64 (no autocast): the
    weights fusednn reaches are as close to float64's as 4x eager AMP's, or within float16's 1e-3. bf16 is
    refused up front."""
    from fusednn.tools.train import World, load_dataset, shard

    rc, out, err = run_cli(TINY + ["--epochs", 1, "--precision", "fp16", "--lr", "0.05", "--save", tmp_path / "h.pt"])
    assert rc == 0, err
    assert "fp16" in out
    ckpt = torch.load(tmp_path / "h.pt", weights_only=True)
    x, y = load_dataset("synthetic", seed=3, limit=16)[0].tensors
    order = shard(len(y), World(), 3, 0)
    ends = {}
    for amp in (True, False):
        with torch.random.fork_rng():
            torch.manual_seed(3)  # TINY's --seed
            net = LeNet() if amp else LeNet().double()
        init = {k: v.clone() for k, v in net.state_dict().items()}
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, nesterov=True)
        scaler = torch.amp.GradScaler("cpu", enabled=amp)
        for b in range(2):
            idx = order[b * 8:(b + 1) * 8]
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
                loss = torch.nn.functional.cross_entropy(net(x[idx].to(next(net.parameters()).dtype)), y[idx])
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        ends[amp] = {k: v - init[k] for k, v in net.state_dict().items()}
    for k in ends[True]:
        ours = ckpt["model"][k] - init[k].float()
        assert ckpt["model"][k].dtype == torch.float32, k
        assert rel_err(ours, ends[False][k]) <= max(1e-3, 4 * rel_err(ends[True][k], ends[False][k])), k
    if not torch.cuda.is_available():  # bfloat16 needs a GPU: refused up front, saying why
        rc, _, err = run_cli(TINY + ["--epochs", 1, "--precision", "bf16"])
        assert rc != 0 and "bf16" in err and "needs a GPU" in err
