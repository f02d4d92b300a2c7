"""Chooses how Triton kernels run: natively on CUDA, or in Triton's interpreter on a CPU-only machine.

The interpreter switch (TRITON_INTERPRET=1) is read when `@triton.jit` decorates a function, so this
module runs before any fusednn kernel module is imported (fusednn/__init__.py imports it first).
"""
from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger("fusednn")


def interpreting() -> bool:
    """True when Triton kernels run in Triton's interpreter (NumPy on the CPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def setup() -> None:
    """Turn Triton's interpreter on when no CUDA device is present and the user did not decide.

    Says so once, at WARNING level: logging's last-resort handler shows warnings even where the application
    configured no logging, and a run far slower than expected should explain itself unasked. Once: the
    variable set here makes every later call (and child processes, which inherit it) skip this branch.
    """
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
        log.warning("fusednn: no CUDA device, so Triton kernels run in Triton's interpreter on the CPU "
                    "(TRITON_INTERPRET=1): complete and correct, but slow")


def default_device() -> torch.device:
    """The device fusednn's tools use when none is named: CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
