"""Chooses how Triton kernels run: natively on CUDA, or in Triton's interpreter on a CPU-only machine.

The interpreter switch (TRITON_INTERPRET=1) is read when `@triton.jit` decorates a function, so this
module runs before any fusednn kernel module is imported (fusednn/__init__.py imports it first).
"""
from __future__ import annotations

import logging
import os
import sys

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
    if interpreting() and "triton" in sys.modules:
        _reinterpret_triton()


def _reinterpret_triton() -> None:
    """Make the @triton.jit functions Triton itself defined before the interpreter was switched on
    interpretable.

    Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function. When triton was imported
    first (directly, or by `import torch._dynamo` / `torch._inductor`, as any script using torch.compile
    does), its own helpers (the combine functions of tl.sum and tl.max, tl.cdiv, ...) are compiled-mode
    JITFunctions, and the interpreter fails on the first kernel that calls one ("Cannot call @triton.jit'd
    outside of the scope of a kernel"). Each is replaced, wherever triton's modules and tensor class hold
    it, by the InterpretedFunction that `@triton.jit` would have made."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    swapped: dict[int, InterpretedFunction] = {}
    holders = [m for name, m in list(sys.modules.items()) if m is not None and name.split(".")[0] == "triton"]
    holders += [c for m in holders for c in vars(m).values()
                if isinstance(c, type) and getattr(c, "__module__", "").startswith("triton.language")]
    for holder in holders:
        for key, value in list(vars(holder).items()):
            if isinstance(value, JITFunction):
                new = swapped.setdefault(id(value), InterpretedFunction(value.fn))
                setattr(holder, key, new)
    if swapped:
        log.info("fusednn: triton was imported before fusednn; %d of Triton's own jit functions now run in "
                 "the interpreter", len(swapped))


def default_device() -> torch.device:
    """The device fusednn's tools use when none is named: CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def debug_level() -> int:
    """FUSEDNN_DEBUG: 1 = IR after each pass, 2 = per-kernel launch summary, 4 = generated source."""
    try:
        return int(os.environ.get("FUSEDNN_DEBUG", "0"))
    except ValueError:
        return 0
