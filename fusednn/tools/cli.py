"""The `fusednn` command: train, dump, info, bench.

Expected errors (bad options, missing or corrupt data, unwritable paths, a checkpoint that does not fit)
are caught here, at the boundary, and reported as one `fusednn: error: ...` line on stderr with a
non-zero exit status; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Sequence, TextIO

import fusednn  # first: it picks Triton's interpreter before any kernel is defined
from fusednn.errors import FusednnError
from fusednn.models import MODELS
from fusednn.tools.train import DATASETS, DEFAULT_LR, OPTIMIZERS, SCHEDULES, Progress, TrainConfig

USAGE_EXIT, ERROR_EXIT, INTERRUPT_EXIT = 2, 1, 130


class _UsageError(Exception):
    """A bad command line (argparse's complaint, reported in one line)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse would print the usage block and exit; one line and a return code suit a tool better.
        raise _UsageError(f"{message} (see '{self.prog} --help')")


def _error(message: str) -> None:
    print(f"fusednn: error: {' '.join(str(message).splitlines())}", file=sys.stderr)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _int_list(text: str) -> list[int]:
    return [_positive_int(part) for part in text.split(",") if part.strip()]


# -- train -------------------------------------------------------------------------------------------

class _ProgressBar:
    """One line per epoch on stderr, redrawn in place on a terminal (throttled); elsewhere only the
    finished line is written, so logs are not filled with carriage returns."""

    def __init__(self, stream: TextIO, width: int = 24) -> None:
        self.stream = stream
        self.width = width
        self.live = getattr(stream, "isatty", lambda: False)()
        self.last: Progress | None = None
        self.drawn = 0.0

    def _line(self, p: Progress) -> str:
        filled = int(self.width * p.seen / max(p.total, 1))
        bar = "#" * filled + "-" * (self.width - filled)
        return (f"epoch {p.epoch}/{p.epochs} [{bar}] {p.seen}/{p.total} loss {p.loss:.4f} "
                f"acc {100 * p.acc:5.1f}% {p.images_per_s:7.1f} img/s")

    def update(self, p: Progress) -> None:
        self.last = p
        now = time.monotonic()
        if self.live and (now - self.drawn >= 0.1 or p.seen == p.total):
            self.drawn = now
            self.stream.write("\r" + self._line(p))
            self.stream.flush()

    def epoch_done(self, entry: dict) -> None:
        line = self._line(self.last) if self.last else f"epoch {entry['epoch']}"
        self.stream.write(("\r" if self.live else "") + f"{line}  test {100 * entry['test_acc']:.1f}%  "
                          f"({entry['seconds']:.0f} s)\n")
        self.stream.flush()
        self.last = None

    def interrupt(self) -> None:
        if self.live and self.last is not None:
            self.stream.write("\n")


def _announce(run: dict) -> None:
    todo = run["epochs"] - run["first_epoch"]
    resumed = f" (resuming after epoch {run['first_epoch']})" if run["first_epoch"] else ""
    interp = " through Triton's interpreter (slow)" if run["interpreter"] else ""
    procs = f" x {run['processes']} processes" if run["processes"] > 1 else ""
    print(f"fusednn train: {run['model']} on {run['dataset']} ({run['n_train']} train / {run['n_test']} test images), "
          f"{todo} epoch{'s' if todo != 1 else ''}{resumed}, batch {run['batch_size']}, "
          f"{'fused' if run['fuse'] else 'unfused'}, {run['device']}{procs}{interp}", file=sys.stderr)


def _without_nproc(argv: Sequence[str]) -> list[str]:
    """The command line minus --nproc-per-node (what each process of a data-parallel run gets)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc-per-node":
            skip = True
        elif not a.startswith("--nproc-per-node="):
            out.append(a)
    return out


def _launch(args: argparse.Namespace) -> int:
    """Start args.nproc_per_node processes of this command with torchrun's launcher (torch.distributed.run):
    gloo on the CPU, NCCL and one GPU each on CUDA; they rendezvous on this machine."""

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's own default, set here so it need not warn
    launcher = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={args.nproc_per_node}", "-m", "fusednn", *_without_nproc(args.argv)])
    try:
        run(launcher)
    except ChildFailedError as e:
        failed = ", ".join(f"rank {r} (exit {f.exitcode})" for r, f in sorted(e.failures.items()))
        _error(f"{len(e.failures)} of {args.nproc_per_node} training processes failed: {failed}; "
               "each one's error is above")
        return ERROR_EXIT
    return 0


def _train(args: argparse.Namespace) -> int:
    from fusednn.tools.train import fit, world_from_env

    world = world_from_env()
    if args.nproc_per_node > 1:
        if world.size > 1:
            raise ValueError("--nproc-per-node: this process is already one of a torchrun run of "
                             f"{world.size}; give the process count to torchrun only")
        return _launch(args)
    cfg = TrainConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer, momentum=args.momentum,
                      nesterov=args.nesterov,
                      schedule=args.schedule, fuse=not args.no_fuse, precision=args.precision, device=args.device,
                      seed=args.seed, limit=args.limit, dump=args.dump, save=args.save, resume=args.resume,
                      plot=args.plot, graph=not args.no_graph)
    bar = _ProgressBar(sys.stderr)
    try:
        result = fit(cfg, on_batch=bar.update, on_epoch=bar.epoch_done, on_start=_announce)
    except KeyboardInterrupt:
        bar.interrupt()
        if cfg.save and Path(cfg.save).is_file():
            raise KeyboardInterrupt(f"{cfg.save} holds the last completed epoch") from None
        raise
    if not world.lead:
        return _rank_exit(0)  # rank 0 prints the run's summary
    rows = [
        ("model", f"{result.model} ({'fused' if result.fuse else 'unfused'}, {result.precision})"),
        ("epochs", f"{result.epochs} ({result.trained_epochs} in this run)"),
        ("wall time", f"{result.seconds:.1f} s"),
        ("train loss", "-" if result.train_loss is None else f"{result.train_loss:.4f} (last epoch)"),
        ("test accuracy", f"{100 * result.test_acc:.2f}%"),
        ("device", f"{result.device}, Triton interpreter {'on' if result.interpreter else 'off'}"),
        ("processes", f"{result.processes} ({'DistributedDataParallel, ' if result.processes > 1 else ''}"
                      f"{'one CUDA graph per step' if result.graph else 'eager steps'})"),
    ]
    if cfg.save:
        rows.append(("checkpoint", cfg.save))
    if cfg.plot:
        rows.append(("plot", cfg.plot))
    if cfg.dump:
        rows.append(("dump", f"{len(result.dump_files)} files in {cfg.dump}"))
    for key, value in rows:
        print(f"{key:<14} {value}")
    return _rank_exit(0) if world.size > 1 else 0


def _rank_exit(status: int) -> int:
    """End a torchrun rank whose work is done (its process group destroyed) without the interpreter's
    teardown: there gloo's threads can still be joinable when their destructors run, which aborts the
    process ("terminate called without an active exception", 1 run in ~3 under load on 2 cores)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# -- dump --------------------------------------------------------------------------------------------

def _dump(args: argparse.Namespace) -> int:
    import torch
    import torch.nn.functional as F

    from fusednn.tools.train import build_model, check_writable, resolve_device

    device = resolve_device(None)
    check_writable(args.out, "dump directory", directory=True)
    model = build_model(args.model).to(device)
    compiled = fusednn.compile(model, fuse=not args.no_fuse)
    x = torch.randn(args.batch_size, 1, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    F.cross_entropy(compiled(x), y).backward()  # one training step's forward and backward, for the stats
    files = compiled.dump(args.out, aot=not args.no_aot)
    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(str(Path(f).parent), []).append(f)
    print(f"fusednn dump: {args.model} ({'fused' if not args.no_fuse else 'unfused'}, batch {args.batch_size}): "
          f"{len(files)} files")
    for folder, names in groups.items():
        print(f"\n{folder}/ ({len(names)})")
        for name in names:
            print(f"  {name}")
    if args.report:
        print("\n" + (Path(args.out) / "kernels.md").read_text(), end="")
    return 0


# -- info --------------------------------------------------------------------------------------------

def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # not installed, or no metadata
        return "not installed"


def _info(args: argparse.Namespace) -> int:
    import numpy
    import torch
    import triton

    from fusednn._backend import interpreting
    from fusednn.compiler.source import cache_dir

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        device = f"cuda: {torch.cuda.get_device_name(0)}" + (f" (and {n - 1} more)" if n > 1 else "")
    else:
        device = "cpu (no CUDA device)"
    rows = [
        ("fusednn", fusednn.__version__),
        ("torch", torch.__version__),
        ("triton", triton.__version__),
        ("numpy", numpy.__version__),
        ("python", f"{platform.python_version()} ({platform.python_implementation()})"),
        ("scikit-learn", _version("scikit-learn") + "  (train --dataset digits)"),
        ("matplotlib", _version("matplotlib") + "  (train --plot)"),
        ("device", device),
        ("interpreter", "on (Triton kernels run in NumPy on the CPU)" if interpreting() else "off"),
        ("cache dir", str(cache_dir())),
    ]
    for key, value in rows:
        print(f"{key:<13} {value}")
    return 0


# -- bench -------------------------------------------------------------------------------------------

def _bench(args: argparse.Namespace) -> int:
    import torch

    try:
        from fusednn.tools import bench
    except ImportError as e:
        raise ImportError(f"fusednn bench is not available in this installation ({e})") from None
    cuda = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    sizes = [b for group in args.batch_size for b in group] if args.batch_size else ([64, 512, 4096] if cuda else [8])
    steps = args.steps if args.steps is not None else (200 if cuda else 2)
    return bench.main(args.out, sizes, steps, args.device, args.model, precisions=args.precision)


# -- parser ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The `fusednn` argument parser (subcommands train, dump, info, bench)."""
    parser = _Parser(prog="fusednn", description="fusednn: trace, fuse and run PyTorch CNNs as Triton kernels.")
    parser.add_argument("--version", action="version", version=f"fusednn {fusednn.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    models = sorted(MODELS)

    t = sub.add_parser("train", help="train a model through fusednn and report its test accuracy",
                       description="Train a model compiled by fusednn (forward, loss and backward as Triton kernels, "
                                   "fusednn's fused SGD) and report its test accuracy. Progress goes to stderr, "
                                   "the summary to stdout.")
    t.add_argument("--model", choices=models, default="lenet", help="default: lenet (the PyTorch tutorial's LeNet)")
    t.add_argument("--dataset", choices=DATASETS, default="digits",
                   help="digits: scikit-learn's 8x8 UCI digits upsampled to 32x32, 80/20 stratified split "
                        "(default); mnist: IDX files from --data-dir; synthetic: a toy set")
    t.add_argument("--data-dir", help="directory of MNIST's IDX files (train-images-idx3-ubyte[.gz], ...)")
    t.add_argument("--epochs", type=int, help="total epochs, counting resumed ones "
                                              "(default: 2 under Triton's interpreter, 10 on a GPU)")
    t.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size,
                   help=f"default: {TrainConfig.batch_size}")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                   help="sgd: fusednn.optim.SGD with (Nesterov) momentum (default); adamw: fusednn.optim.AdamW, "
                        "weight decay 0.01")
    t.add_argument("--lr", type=float, help="peak learning rate (default: "
                   + ", ".join(f"{v} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    t.add_argument("--momentum", type=float, default=TrainConfig.momentum, help=f"SGD's (default: {TrainConfig.momentum})")
    t.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=True,
                   help="Nesterov momentum (default: on)")
    t.add_argument("--schedule", choices=SCHEDULES, default="cosine",
                   help="learning-rate decay over all steps (default: cosine)")
    t.add_argument("--no-fuse", action="store_true", help="run every op as its own kernel")
    t.add_argument("--precision", choices=("ieee", "tf32", "fp16", "bf16"), default="ieee",
                   help="ieee: fp32 (default); tf32: fp32 with tf32 tl.dot; fp16: torch.autocast(float16) and a "
                        "GradScaler (fp32 master weights); bf16: torch.autocast(bfloat16), no scaler (GPU only)")
    t.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    t.add_argument("--seed", type=int, default=0, help="seeds the split, the initial weights and the shuffling")
    t.add_argument("--limit", type=_positive_int, help="use at most N training and N test samples (quick runs)")
    t.add_argument("--dump", metavar="DIR", help="write the compiled model's dump here after the first step")
    t.add_argument("--save", metavar="PATH", help="write a checkpoint here after every epoch")
    t.add_argument("--resume", metavar="PATH", help="continue from this checkpoint's epoch")
    t.add_argument("--plot", metavar="PATH", help="write a PNG of loss and accuracy per epoch")
    t.add_argument("--no-graph", action="store_true",
                   help="run eager steps on CUDA instead of one captured CUDA graph per step")
    t.add_argument("--nproc-per-node", type=_positive_int, default=1, metavar="N",
                   help="data-parallel training on N local processes (torchrun's launcher; gloo on the CPU, "
                        "NCCL and one GPU each on CUDA); --batch-size is the global batch")
    t.set_defaults(func=_train)

    d = sub.add_parser("dump", help="compile a model, run one training step, write its dump",
                       description="Compile a model, run one forward and backward on a random batch and write "
                                   "what fusednn did (IR before/after fusion, backward plan, kernels, stats, graph).")
    d.add_argument("--model", choices=models, default="lenet", help="default: lenet")
    d.add_argument("--out", required=True, metavar="DIR", help="directory to write")
    d.add_argument("--no-fuse", action="store_true", help="run every op as its own kernel")
    d.add_argument("--batch-size", type=_positive_int, default=16, help="default: 16")
    d.add_argument("--no-aot", action="store_true",
                   help="skip the sm_90 ahead-of-time reports (TTIR, PTX, registers per kernel; ~1 s per kernel)")
    d.add_argument("--report", action="store_true", help="print the per-kernel table (kernels.md)")
    d.set_defaults(func=_dump)

    i = sub.add_parser("info", help="versions, device, interpreter, cache directory")
    i.set_defaults(func=_info)

    b = sub.add_parser("bench", help="benchmark a training step (torch eager, torch.compile, fusednn)")
    b.add_argument("--model", choices=models, default="lenet", help="default: lenet")
    b.add_argument("--batch-size", type=_int_list, action="append",
                   help="repeat or give a comma list (default: 64,512,4096 on a GPU, 8 on a CPU)")
    b.add_argument("--steps", type=_positive_int, help="timed steps per trial (default: 200 on a GPU, 2 on a CPU)")
    b.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    b.add_argument("--precision", action="append", choices=("ieee", "tf32", "fp16"),
                   help="repeat for several (default: ieee and tf32 on a GPU, ieee on a CPU); fp16: the step under "
                        "torch.autocast(float16)")
    b.add_argument("--out", default="bench", metavar="DIR", help="where bench.json and bench.png go (default: bench/)")
    b.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the `fusednn` command line; returns the exit status."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.argv = argv
    except _UsageError as e:
        _error(str(e))
        return USAGE_EXIT
    except SystemExit as e:  # --help, --version
        return int(e.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return USAGE_EXIT
    try:
        return args.func(args)
    except KeyboardInterrupt as e:
        _error(f"interrupted; {e}" if str(e) else "interrupted")
        return INTERRUPT_EXIT
    except (FusednnError, ValueError, OSError, ImportError) as e:
        _error(str(e))
        return ERROR_EXIT


if __name__ == "__main__":
    sys.exit(main())
