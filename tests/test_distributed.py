"""Data-parallel training on torch.distributed: `DistributedDataParallel(fusednn.compile(model))` over
gloo on 2 CPU processes equals one process at the same global batch; `fusednn train --nproc-per-node 2`
(torchrun's launcher) shards each epoch as DistributedSampler does, reports once and writes one
checkpoint; `fusednn train`'s captured-step path (CUDA faked on the CPU) equals its eager path."""
from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

import fusednn
import fusednn.tools.train as train_mod
from fusednn.models import LeNet
from fusednn.optim import SGD
from fusednn.tools.train import TrainConfig, World, fit, shard
from tests.helpers import rel_err
from tests.test_step import fake_cuda  # noqa: F401  (fixture)

STEPS, GLOBAL_BATCH, LR = 5, 8, 0.05


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(STEPS * GLOBAL_BATCH, 1, 32, 32, generator=g), torch.randint(0, 10, (STEPS * GLOBAL_BATCH,), generator=g)


def _train(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, world: World) -> None:
    """STEPS fused SGD steps; each rank takes its half of every global batch."""
    cnet = fusednn.compile(net)
    model = torch.nn.parallel.DistributedDataParallel(cnet) if world.size > 1 else cnet
    opt = SGD(net.parameters(), lr=LR, momentum=0.9)
    local = GLOBAL_BATCH // world.size
    for s in range(STEPS):
        rows = slice(s * GLOBAL_BATCH + world.rank * local, s * GLOBAL_BATCH + (world.rank + 1) * local)
        opt.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()


def _worker(rank: int, size: int, port: int, seed: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        torch.manual_seed(seed)
        net = LeNet()
        _train(net, *_data(seed), World(rank, size, rank))
        if rank == 0:
            torch.save(net.state_dict(), out)
    finally:
        dist.destroy_process_group()


def test_ddp_of_a_compiled_model_on_2_processes_equals_1_process(tmp_path, fresh_seed):
    """DistributedDataParallel(fusednn.compile(model)) averages the ranks' gradients (gloo all-reduce on
    the parameters' .grad, which fusednn's backward fills): 5 steps on 2 processes of 4 images each equal
    5 steps of 8 images on one process."""
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, _free_port(), fresh_seed, str(out)), nprocs=2, join=True)
    torch.manual_seed(fresh_seed)
    net = LeNet()
    init = copy.deepcopy(net.state_dict())
    _train(net, *_data(fresh_seed), World())
    ddp = torch.load(out, weights_only=True)
    for k, v in net.state_dict().items():  # compare what the steps changed, not the weights themselves
        assert rel_err(ddp[k] - init[k], v - init[k]) <= 1e-5, k


@pytest.mark.parametrize("n,size", [(10, 2), (11, 2), (7, 3), (5, 1)])
def test_shard_is_distributed_samplers_order(n, size):
    for epoch in (0, 3):
        for rank in range(size):
            sampler = DistributedSampler(range(n), num_replicas=size, rank=rank, shuffle=True, seed=7 * 1_000_003)
            sampler.set_epoch(epoch)
            assert shard(n, World(rank, size, rank), 7, epoch).tolist() == list(sampler)


def _cli(args: list, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FUSEDNN_CACHE_DIR": os.environ.get("FUSEDNN_CACHE_DIR", str(tmp_path / "cache"))}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "fusednn", "train", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


def test_train_nproc_per_node_2_writes_one_checkpoint_equal_to_one_process(tmp_path):
    """The global batch is split over the 2 processes; rank 0 alone prints and saves."""
    common = ["--dataset", "synthetic", "--limit", STEPS * GLOBAL_BATCH, "--epochs", 1, "--batch-size", GLOBAL_BATCH]
    two = _cli(common + ["--nproc-per-node", 2, "--save", tmp_path / "two.pt"], tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("test accuracy") == 1 and "processes      2 (DistributedDataParallel" in two.stdout
    assert two.stderr.count("epoch 1/1") == 1, two.stderr
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".pt"] == ["two.pt"]
    one = _cli(common + ["--save", tmp_path / "one.pt"], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("one.pt", "two.pt"))
    plain = LeNet()
    plain.load_state_dict(b["model"])  # the plain model's keys
    with torch.random.fork_rng():
        torch.manual_seed(0)  # fusednn train seeds the initial weights with --seed (0)
        init = LeNet().state_dict()
    for k in init:
        assert rel_err(b["model"][k] - init[k], a["model"][k] - init[k]) <= 1e-5, k
    for key in ("train_loss", "train_acc", "test_acc"):
        assert abs(a["history"][0][key] - b["history"][0][key]) <= 1e-6, key


def test_train_refuses_a_global_batch_the_processes_cannot_share(tmp_path):
    r = _cli(["--dataset", "synthetic", "--limit", 8, "--epochs", 1, "--batch-size", 7, "--nproc-per-node", 2], tmp_path)
    assert r.returncode != 0
    assert "batch size 7 is the global batch and must be a multiple of the 2 processes" in r.stderr
    assert "Traceback" not in r.stderr.split("training processes failed")[-1]


def test_train_captured_step_path_equals_eager_steps(fake_cuda, monkeypatch):  # noqa: F811
    """fit's CUDA-graph path (warm-up, one capture, replays; the partial last batch eager) trains exactly as
    its eager path: CUDA's graph calls are faked on the CPU (tests/test_step.py)."""
    cfg = dict(dataset="synthetic", limit=44, epochs=2, batch_size=8, schedule="constant", seed=5, device="cpu")
    eager = fit(TrainConfig(**cfg, graph=False))
    steps = []

    def spy(*args, **kwargs):
        steps.append(fusednn.step.train_step(*args, **kwargs))
        fake_cuda.step = steps[-1]
        return steps[-1]

    monkeypatch.setattr(train_mod, "_use_graph", lambda cfg, device: cfg.graph)
    monkeypatch.setattr(fusednn, "train_step", spy)
    graphed = fit(TrainConfig(**cfg, graph=True))
    assert graphed.graph and steps[0].graphed and steps[0].captures == 1
    for a, b in zip(eager.history, graphed.history):
        assert a["train_loss"] == b["train_loss"] and a["train_acc"] == b["train_acc"] and a["test_acc"] == b["test_acc"]


@pytest.mark.gpu
def test_captured_step_with_a_cosine_schedule_replays_100_steps_with_one_capture():
    """torch's CosineAnnealingLR fills the optimizer's device-tensor lr in place; the captured step reads it
    at every replay, so 100 scheduled steps are 1 capture, and they track eager steps."""
    torch.manual_seed(0)
    nets = [LeNet().cuda() for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    opts = [SGD(n.parameters(), lr=torch.tensor(0.05, device="cuda"), momentum=0.9) for n in nets]
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=100) for o in opts]
    eager = fusednn.train_step(fusednn.compile(nets[0]), F.cross_entropy, opts[0], cuda_graph=False)
    graph = fusednn.train_step(fusednn.compile(nets[1]), F.cross_entropy, opts[1], cuda_graph=True)
    x, y = torch.randn(16, 1, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    for _ in range(100):
        eager(x, y), graph(x, y)
        for s in scheds:
            s.step()
    assert graph.captures == 1
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert rel_err(q, p) <= 1e-4


@pytest.mark.gpu
def test_train_on_cuda_reads_the_device_only_for_progress_and_epoch_ends():
    """Inside an epoch the host waits for the GPU only when it reads the progress figures (about once a
    second) and at the epoch's end; counted with torch's sync debug mode."""
    import warnings

    cfg = TrainConfig(dataset="synthetic", limit=512, epochs=1, batch_size=16, device="cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fit(cfg)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    steps = 512 // 16
    assert result.graph and len(syncs) < steps // 2, [str(w.message) for w in syncs[:5]]
