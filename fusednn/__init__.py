"""fusednn: trace a PyTorch model, fuse conv/linear chains, run it through generated Triton kernels."""
from __future__ import annotations

from fusednn import _backend

_backend.setup()  # before any @triton.jit runs: picks Triton's interpreter on CPU-only machines

from fusednn.api import CompiledFunction, CompiledModule, compile  # noqa: E402
from fusednn.errors import CompileError, FusednnError, InputMismatchError, UnsupportedOpError  # noqa: E402
from fusednn import optim  # noqa: E402
from fusednn.step import train_step  # noqa: E402

__version__ = "0.1.0"
__all__ = ["compile", "optim", "train_step", "CompiledModule", "CompiledFunction", "CompileError", "FusednnError", "InputMismatchError",
           "UnsupportedOpError", "__version__"]
