"""fusednn's exception types: every message names what, where (module path, file:line) and what to do."""
from __future__ import annotations


class FusednnError(Exception):
    """Base class of every error fusednn raises on purpose."""


class CompileError(FusednnError, RuntimeError):
    """A model could not be compiled; the user's module is left untouched."""


class UnsupportedOpError(CompileError):
    """The traced model calls an op fusednn has no rule for."""


class InputMismatchError(FusednnError, ValueError, RuntimeError):
    """An input does not fit the compiled model (rank, channels, dtype, device, size).

    It is both a ValueError and a RuntimeError, so code that catches torch's error for the same bad input
    (torch raises RuntimeError for most shape mismatches) keeps working.
    """
