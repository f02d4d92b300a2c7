"""Training loop behind `fusednn train`: a model compiled by fusednn (forward, loss and backward run as
Triton kernels), fusednn's fused SGD, per-epoch evaluation, atomic checkpoints, resume and a plot.

Data parallel: run under torchrun (`torchrun --nproc-per-node N -m fusednn train ...`, or
`fusednn train --nproc-per-node N`, which starts torchrun's launcher), every process trains
`DistributedDataParallel(fusednn.compile(model))` on its shard of each epoch (DistributedSampler's
semantics: one shuffle seeded alike on every rank, padded to a multiple of the world size, rank r takes
every world-th index from r). `batch_size` is the global batch; only rank 0 reports, checkpoints, plots
and dumps; train and test figures are summed over the ranks.

The step is `fusednn.train_step`: on CUDA it is captured whole into a CUDA graph (`graph=False` opts out),
with the lr a device tensor the schedule fills before each replay. Loss and accuracy are summed on the
device and read on the host about once a second (`PROGRESS_EVERY_S`) and at the end of each epoch.

Library code: it reports progress through callbacks and raises exceptions with clear messages; the CLI
(`fusednn/tools/cli.py`) draws and prints.

Defaults (batch 8, lr 0.02, momentum 0.9, Nesterov, cosine decay per step, 2 epochs under the interpreter)
come from a torch-eager sweep on the digits split with this loop's batch order (24 initialisation seeds, 2
epochs): test accuracy 95.9% mean, 93.6% worst, >= 95% for 21 of 24 seeds. Batch 64 with a constant lr 0.05
reached 54% mean after 2 epochs and 73% after 3. Two epochs because Triton's interpreter costs 0.12-0.15 s of
CPU per training image for LeNet whatever the batch size (2-core machine, 2026-11): a third would not fit
in 10 minutes.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import fusednn
from fusednn.tools import data as datasets
from fusednn._backend import default_device, interpreting
from fusednn.models import MODELS
from fusednn.optim import SGD, AdamW

DATASETS = ("digits", "mnist", "synthetic")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("sgd", "adamw")
# Peak lr per optimizer when --lr is not given. AdamW's from an eager sweep like SGD's (digits, batch 8,
# cosine, 2 epochs, weight decay 0.01, 4 seeds): 0.001 -> 93.5% mean test accuracy, 0.002 -> 95.3%,
# 0.004 -> 96.5% (worst seed 96.1%).
DEFAULT_LR = {"sgd": 0.02, "adamw": 0.004}
SYNTHETIC_SIZES = (1024, 256)  # train, test
EVAL_BATCH = 256  # forward only under no_grad: larger batches mean fewer, larger launches
PROGRESS_EVERY_S = 1.0  # how often the loss and accuracy summed on the device are read by the host


def default_epochs(device: torch.device) -> int:
    """2 under Triton's interpreter (it must finish in minutes on a CPU), 10 on a GPU."""
    return 2 if device.type == "cpu" else 10


@dataclass
class TrainConfig:
    """Everything `fusednn train` takes; None for epochs/device means the default for this machine."""

    model: str = "lenet"
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int | None = None
    batch_size: int = 8
    lr: float | None = None  # None: DEFAULT_LR[optimizer]
    optimizer: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "cosine"
    fuse: bool = True
    precision: str = "ieee"  # ieee, tf32 (fp32 tl.dot), or fp16 / bf16 (torch.autocast and a GradScaler)
    device: str | None = None
    seed: int = 0
    limit: int | None = None
    dump: str | None = None
    save: str | None = None
    resume: str | None = None
    plot: str | None = None
    graph: bool = True  # capture the whole step in a CUDA graph on CUDA


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def lead(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """The run's ranks as torchrun sets them (RANK, WORLD_SIZE, LOCAL_RANK); one process otherwise."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ValueError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from None
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={size}")
    return World(rank, size, local)


def shard(n: int, world: World, seed: int, epoch: int) -> torch.Tensor:
    """This rank's sample indices for one epoch, as torch's DistributedSampler(shuffle=True, drop_last=False)
    gives them: one permutation seeded alike on every rank, padded with its own head to a multiple of the
    world size, then every world.size-th index from world.rank. One process gets the whole permutation."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    total = -(-n // world.size) * world.size
    if total > n:
        order = torch.cat([order, order[: total - n]])
    return order[world.rank::world.size]


def _all_sum(world: World, *values: torch.Tensor) -> list[torch.Tensor]:
    """Each value summed over the ranks (float64 on the values' device)."""
    t = torch.stack([v.double() for v in values])
    if world.size > 1:
        dist.all_reduce(t)
    return list(t.unbind())


@dataclass
class Progress:
    """One training batch done (what a progress bar shows)."""

    epoch: int  # 1-based
    epochs: int
    seen: int  # training images so far this epoch
    total: int
    loss: float  # mean over the images seen this epoch
    acc: float  # fraction correct over the images seen this epoch
    images_per_s: float


@dataclass
class TrainResult:
    """What a run did: the per-epoch history (resumed epochs included) and the run's totals."""

    model: str
    dataset: str
    epochs: int  # total epochs the model has now been trained for
    trained_epochs: int  # epochs trained by this run
    seconds: float
    device: str
    interpreter: bool
    fuse: bool
    precision: str
    test_acc: float
    train_loss: float | None
    n_train: int = 0
    n_test: int = 0
    history: list[dict] = field(default_factory=list)
    dump_files: list[str] = field(default_factory=list)
    processes: int = 1
    graph: bool = False


def build_model(name: str) -> nn.Module:
    """A fresh model by name (fusednn.models.MODELS)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name]()


def load_dataset(name: str, *, data_dir: str | None = None, seed: int = 0,
                 limit: int | None = None) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) for `name` in DATASETS; `limit` keeps at most that many samples of each."""
    if name == "digits":
        train, test = datasets.load_digits(seed)
    elif name == "mnist":
        if data_dir is None:
            raise ValueError("the mnist dataset needs a data directory holding its IDX files (--data-dir)")
        train, test = datasets.load_mnist(data_dir)
    elif name == "synthetic":
        train, test = datasets.synthetic(SYNTHETIC_SIZES[0], 2 * seed), datasets.synthetic(SYNTHETIC_SIZES[1], 2 * seed + 1)
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        train, test = (TensorDataset(*(t[:limit] for t in d.tensors)) for d in (train, test))
    return train, test


def resolve_device(name: str | None) -> torch.device:
    """The device to train on; refuses one that cannot run fusednn's Triton kernels."""
    try:
        dev = torch.device(name) if name else default_device()
    except RuntimeError as e:
        raise ValueError(f"bad device {name!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is available")
    if dev.type == "cpu" and not interpreting():
        raise ValueError("device cpu: fusednn's Triton kernels run on the CPU only in Triton's interpreter "
                         "(TRITON_INTERPRET=1)")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: fusednn runs on cuda or (interpreted) cpu")
    return dev


def lr_at(base: float, schedule: str, step: int, total: int) -> float:
    """The learning rate for global step `step` of `total` under `schedule` (decays to 0 at the end)."""
    if schedule == "constant" or total <= 0:
        return base
    t = min(step / total, 1.0)
    if schedule == "linear":
        return base * (1.0 - t)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")


def check_writable(path: str | os.PathLike, what: str, directory: bool = False) -> Path:
    """Fail now, not after an epoch, when `path` (a file, or a directory when `directory`) cannot be written.
    Missing parent directories are created."""
    p = Path(path)
    folder = p if directory else p.parent
    try:
        if not directory and p.is_dir():
            raise IsADirectoryError(f"{p} is a directory")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".fusednn-write-test-"):
            pass
    except OSError as e:
        raise OSError(f"cannot write {what} {p}: {e.strerror or e}") from None
    return p


def save_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int,
                    model_name: str, history: list[dict], config: dict | None = None) -> None:
    """torch.save the checkpoint to a temporary file beside `path`, then rename it over `path`: an
    interruption leaves the previous complete checkpoint in place."""
    path = Path(path)
    ckpt = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "model_name": model_name, "history": history, "config": config or {}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(ckpt, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by `save_checkpoint`; ValueError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    need = ("model", "optimizer", "epoch", "model_name")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in need):
        raise ValueError(f"{path} is not a fusednn checkpoint (it needs the keys {', '.join(need)})")
    return ckpt


def check_state_dict(state: dict, model: nn.Module, model_name: str, path: str | os.PathLike) -> None:
    """ValueError naming the differences when `state` does not fit `model` (keys or shapes)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}" for k in own
              if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                parts.append(f"{label}: {', '.join(items[:3])}{' ...' if len(items) > 3 else ''}")
        raise ValueError(f"{path} does not fit model {model_name!r} ({'; '.join(parts)})")


def evaluate(model: nn.Module, data: TensorDataset, device: torch.device, batch_size: int = EVAL_BATCH,
             world: World = World(), autocast: torch.dtype | None = None) -> float:
    """Fraction of `data` the model classifies correctly (eval mode, no_grad, under torch.autocast(dtype=
    autocast) when given; the model's mode is restored).

    In a data-parallel run each rank scores every world.size-th sample and the counts are summed."""
    x_all, y_all = (t[world.rank::world.size] for t in data.tensors)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            for i in range(0, len(y_all), batch_size):
                x = x_all[i:i + batch_size].to(device)
                y = y_all[i:i + batch_size].to(device)
                correct += (model(x).argmax(dim=1) == y).sum()
    finally:
        model.train(was_training)
    hits, total = _all_sum(world, correct, torch.tensor(float(len(y_all)), device=device))
    return float(hits / total) if total > 0 else float("nan")


def plot_history(history: list[dict], path: str | os.PathLike, title: str = "") -> None:
    """A PNG with the training loss and the train/test accuracy per epoch (matplotlib, Agg, no pyplot)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("--plot needs matplotlib: pip install matplotlib") from e
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 3.6))
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("cross-entropy")
    ax_loss.legend()
    ax_acc.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * h["test_acc"] for h in history], "s-", label="test")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if len(epochs) <= 12:
            ax.set_xticks(epochs)  # whole epochs only
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)


def _peak_lr(cfg: TrainConfig) -> float:
    return DEFAULT_LR[cfg.optimizer] if cfg.lr is None else cfg.lr


def _nesterov(cfg: TrainConfig) -> bool:
    return cfg.nesterov and cfg.momentum > 0  # Nesterov needs momentum; without it, plain SGD


def _restore(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> tuple[int, list[dict]]:
    ckpt = load_checkpoint(cfg.resume, map_location=device)
    if ckpt["model_name"] != cfg.model:
        raise ValueError(f"{cfg.resume} holds a {ckpt['model_name']!r} checkpoint, not {cfg.model!r} "
                         f"(pass --model {ckpt['model_name']})")
    check_state_dict(ckpt["model"], model, cfg.model, cfg.resume)
    model.load_state_dict(ckpt["model"])
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"{cfg.resume}: optimizer state does not fit {cfg.model!r} ({e})") from None
    if cfg.optimizer == "sgd":  # this run's command line decides the hyper-parameters
        for group in optimizer.param_groups:
            group.update(momentum=cfg.momentum, nesterov=_nesterov(cfg))
    return int(ckpt["epoch"]), list(ckpt.get("history", []))


def _check(cfg: TrainConfig, world: World = World()) -> tuple[torch.device, int]:
    """Validate the options and the output paths before any work is done; (device, total epochs)."""
    if cfg.batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {cfg.batch_size}")
    if cfg.batch_size % world.size:
        raise ValueError(f"the batch size {cfg.batch_size} is the global batch and must be a multiple of the "
                         f"{world.size} processes")
    if cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
    if cfg.lr is not None and not cfg.lr >= 0:
        raise ValueError(f"learning rate must be >= 0, got {cfg.lr}")
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {cfg.schedule!r}; choose from {', '.join(SCHEDULES)}")
    if cfg.model not in MODELS:
        raise ValueError(f"unknown model {cfg.model!r}; choose from {', '.join(sorted(MODELS))}")
    device = resolve_device(cfg.device)
    if world.size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)  # one GPU per process
    epochs = default_epochs(device) if cfg.epochs is None else cfg.epochs
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    for path, what in ((cfg.save, "checkpoint"), (cfg.plot, "plot")):
        if path and world.lead:
            check_writable(path, what)
    if cfg.dump and world.lead:
        check_writable(cfg.dump, "dump directory", directory=True)
    if cfg.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    return device, epochs


AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}  # --precision values that train under autocast


def _precision(precision: str) -> tuple[str, torch.dtype | None]:
    """(fusednn.compile's precision, the torch.autocast dtype or None) of a --precision value."""
    if precision == "bf16" and interpreting():
        from fusednn.compiler.codegen import BF16_ON_INTERPRETER

        raise ValueError(f"--precision bf16: {BF16_ON_INTERPRETER}")
    if precision in AUTOCAST:
        return "ieee", AUTOCAST[precision]
    return precision, None


class _Step:
    """One training step (`fusednn.train_step`: a CUDA graph replay on CUDA) that also counts the batch's
    correct predictions into a device tensor, so nothing is read back to the host per step."""

    def __init__(self, model: nn.Module, loss_fn: Callable, optimizer: torch.optim.Optimizer, device: torch.device,
                 graph: bool, autocast: torch.dtype | None = None) -> None:
        self.correct = torch.zeros((), dtype=torch.int64, device=device)

        def loss_and_hits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            self.correct.copy_((logits.detach().argmax(dim=1) == y).sum())  # captured with the step
            return loss_fn(logits, y)

        # float16 needs loss scaling (its range ends at 65504); bfloat16 has float32's range and does not
        scaler = torch.amp.GradScaler(device.type) if autocast == torch.float16 else None
        self.step = fusednn.train_step(model, loss_and_hits, optimizer, cuda_graph=graph, autocast=autocast,
                                       scaler=scaler)
        self.graph = graph
        self.shape: torch.Size | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.shape is None:
            self.shape = x.shape
        if self.graph and x.shape != self.shape:  # the last, partial batch: a graph has fixed shapes
            return self.step.eager(x, y)
        return self.step(x, y)


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)  # in place, on the device: a captured step reads it at every replay
        else:
            group["lr"] = lr


def _train_epoch(cfg: TrainConfig, step: _Step, compiled: nn.Module, optimizer: torch.optim.Optimizer,
                 train: tuple[torch.Tensor, torch.Tensor], epoch: int, epochs: int, world: World, dump: str | None,
                 on_batch: Callable[[Progress], None] | None) -> tuple[dict, list[str]]:
    """One pass over this rank's shard of the training set; its history entry (without test_acc, summed over
    the ranks) and the files of the dump it writes after its first step when `dump` names a directory."""
    x_all, y_all = train
    n = len(y_all)
    local = cfg.batch_size // world.size
    order = shard(n, world, cfg.seed, epoch).to(x_all.device)
    steps = -(-len(order) // local)
    t0 = last_read = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=x_all.device)
    correct = torch.zeros((), dtype=torch.int64, device=x_all.device)
    seen, dumped = 0, []
    for b in range(steps):
        idx = order[b * local:(b + 1) * local]
        x, y = x_all[idx], y_all[idx]
        _set_lr(optimizer, lr_at(_peak_lr(cfg), cfg.schedule, epoch * steps + b, epochs * steps))
        loss = step(x, y)
        loss_sum += loss.detach().double() * len(y)  # device-side sums: no host sync per step
        correct += step.correct
        seen += len(y)
        if dump and b == 0:
            dumped = compiled.dump(dump)
        now = time.perf_counter()
        if on_batch is not None and now - last_read >= PROGRESS_EVERY_S and b < steps - 1:
            last_read = now  # rank 0's own figures, read from the device about once a second
            on_batch(Progress(epoch + 1, epochs, seen * world.size, len(order) * world.size,
                              float(loss_sum) / seen, float(correct) / seen, seen * world.size / max(now - t0, 1e-9)))
    seconds = time.perf_counter() - t0
    total_loss, total_hits, total_seen = _all_sum(world, loss_sum, correct, torch.tensor(float(seen), device=x_all.device))
    total_seen = max(float(total_seen), 1.0)
    entry = {"epoch": epoch + 1, "train_loss": float(total_loss) / total_seen, "train_acc": float(total_hits) / total_seen,
             "seconds": seconds, "images_per_s": total_seen / max(seconds, 1e-9)}
    if on_batch is not None and steps:  # the epoch's last line: every rank's figures
        on_batch(Progress(epoch + 1, epochs, int(total_seen), len(order) * world.size, entry["train_loss"],
                          entry["train_acc"], entry["images_per_s"]))
    return entry, dumped


def _use_graph(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the step is captured in a CUDA graph: on CUDA unless cfg.graph is off, or a GradScaler
    (--precision fp16) checks for inf on the host each step."""
    return cfg.graph and device.type == "cuda" and cfg.precision != "fp16"


def fit(cfg: TrainConfig, on_batch: Callable[[Progress], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None, on_start: Callable[[dict], None] | None = None) -> TrainResult:
    """Train `cfg.model` on `cfg.dataset` through fusednn; evaluate after every epoch.

    Args:
        on_start: called once every input has been checked and loaded, before the first step, with a dict
            (model, dataset, n_train, n_test, epochs, first_epoch, batch_size, fuse, device, interpreter).
        on_batch: called after every training batch with a Progress.
        on_epoch: called after every epoch with its history entry (epoch, train_loss, train_acc, test_acc,
            seconds (training and evaluation), images_per_s (training)).
    Raises ValueError / OSError / ImportError with a clear message on bad input (unknown model or dataset,
    missing or corrupt data, unwritable paths, a checkpoint that does not fit).
    """
    start = time.perf_counter()
    world = world_from_env()
    device, epochs = _check(cfg, world)
    joined = world.size > 1 and not dist.is_initialized()
    if joined:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        result = _fit(cfg, world, device, epochs, start, on_batch, on_epoch, on_start)
        if joined:
            # every rank is done (rank 0 saves and plots after the others) before the group is torn down: a
            # gloo process whose peer is still mid-run can abort in its teardown ("terminate called without
            # an active exception", seen under load)
            dist.barrier()
        return result
    finally:
        if joined:
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, world: World, device: torch.device, epochs: int, start: float,
         on_batch: Callable[[Progress], None] | None, on_epoch: Callable[[dict], None] | None,
         on_start: Callable[[dict], None] | None) -> TrainResult:
    if not world.lead:  # rank 0 reports for the run
        on_batch = on_epoch = on_start = None
    train, test = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed, limit=cfg.limit)
    with torch.random.fork_rng(devices=[]):  # seeded initial weights without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model).to(device)
    graph = _use_graph(cfg, device)
    # A captured step reads the lr from a device tensor that the schedule fills: no re-capture per step.
    peak = _peak_lr(cfg)
    lr = torch.tensor(peak, dtype=torch.float32, device=device) if graph else peak
    if cfg.optimizer == "adamw":
        optimizer: torch.optim.Optimizer = AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    else:
        optimizer = SGD(model.parameters(), lr=lr, momentum=cfg.momentum, nesterov=_nesterov(cfg))
    first_epoch, history = _restore(cfg, model, optimizer, device) if cfg.resume else (0, [])
    for group in optimizer.param_groups:  # this run's lr (and its device tensor), not a checkpoint's
        group["lr"] = lr
    precision, amp = _precision(cfg.precision)
    compiled = fusednn.compile(model, fuse=cfg.fuse, precision=precision)
    trained_model: nn.Module = compiled
    if world.size > 1:  # gradients are averaged over the ranks by torch's DDP hooks on the parameters
        trained_model = nn.parallel.DistributedDataParallel(
            compiled, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = fusednn.compile(lambda logits, target: F.cross_entropy(logits, target), fuse=cfg.fuse,
                              precision=precision)
    step = _Step(trained_model, loss_fn, optimizer, device, graph, amp)
    xy = tuple(t.to(device) for t in train.tensors)
    if on_start is not None:
        on_start({"model": cfg.model, "dataset": cfg.dataset, "n_train": len(train), "n_test": len(test),
                  "epochs": epochs, "first_epoch": first_epoch, "batch_size": cfg.batch_size, "fuse": cfg.fuse,
                  "device": str(device), "interpreter": interpreting(), "processes": world.size, "graph": graph})
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("save", "resume", "plot", "dump")}
    title = f"fusednn train: {cfg.model} on {cfg.dataset}"
    dump_files: list[str] = []
    compiled.train()
    for epoch in range(first_epoch, epochs):
        t0 = time.perf_counter()
        dump = cfg.dump if epoch == first_epoch and world.lead else None
        entry, dumped = _train_epoch(cfg, step, compiled, optimizer, xy, epoch, epochs, world, dump, on_batch)
        dump_files = dump_files or dumped
        entry["test_acc"] = evaluate(compiled, test, device, world=world, autocast=amp)
        entry["seconds"] = time.perf_counter() - t0
        history.append(entry)
        if cfg.save and world.lead:
            save_checkpoint(cfg.save, model=model, optimizer=optimizer, epoch=epoch + 1, model_name=cfg.model,
                            history=history, config=config)
        if cfg.plot and world.lead:
            plot_history(history, cfg.plot, title)
        if on_epoch is not None:
            on_epoch(entry)

    trained = max(epochs - first_epoch, 0)
    test_acc = history[-1]["test_acc"] if trained else evaluate(compiled, test, device, world=world, autocast=amp)
    if cfg.plot and not trained and history and world.lead:
        plot_history(history, cfg.plot, title)
    return TrainResult(model=cfg.model, dataset=cfg.dataset, epochs=max(epochs, first_epoch), trained_epochs=trained,
                       seconds=time.perf_counter() - start, device=str(device), interpreter=interpreting(),
                       fuse=cfg.fuse, precision=cfg.precision, test_acc=test_acc,
                       train_loss=history[-1]["train_loss"] if history else None, n_train=len(train),
                       n_test=len(test), history=history, dump_files=dump_files, processes=world.size, graph=graph)
