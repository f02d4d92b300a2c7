"""Writing and loading generated Triton source: an indented emitter, the file header, the on-disk cache.

Triton needs kernels to live in real source files (it reads them with `inspect`), so every generated
kernel file is written to a content-hashed cache directory and imported from there; a second compile of
the same graph finds the file and the already-imported module.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Iterator

_loaded: dict[str, ModuleType] = {}


class Source:
    """An indented text buffer for emitting Python/Triton source (after Inductor's IndentedBuffer)."""

    def __init__(self, indent: str = "    ") -> None:
        self._lines: list[str] = []
        self._level = 0
        self._indent = indent

    def writeline(self, line: str = "") -> None:
        """Append one line at the current indentation."""
        self._lines.append(self._indent * self._level + line if line else "")

    def writelines(self, lines: str) -> None:
        """Append a block of lines (a dedented multi-line string) at the current indentation."""
        import textwrap

        for line in textwrap.dedent(lines).strip("\n").splitlines():
            self.writeline(line)

    @contextlib.contextmanager
    def indent(self) -> Iterator[None]:
        """Lines written inside the block are indented one more level."""
        self._level += 1
        try:
            yield
        finally:
            self._level -= 1

    def getvalue(self) -> str:
        return "\n".join(self._lines) + "\n"


def header(name: str, implements: list[str], modules: list[str], backward: str) -> str:
    """The comment block every generated kernel file starts with: its name, the IR nodes it implements (with
    their modules) and its backward file."""
    mods = ", ".join(modules) if modules else "-"
    return (
        f"# fusednn generated kernel {name}\n"
        f"# implements: {', '.join(implements)}   (module: {mods})\n"
        f"# backward: {backward}\n"
    )


def cache_dir() -> Path:
    """Where generated kernels are written: $FUSEDNN_CACHE_DIR, else the user's cache dir."""
    env = os.environ.get("FUSEDNN_CACHE_DIR")
    if env:
        base = Path(env)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "fusednn" / "kernels"
    base.mkdir(parents=True, exist_ok=True)
    return base


def load(text: str, name: str) -> ModuleType:
    """Write `text` to the cache (named by its content hash) and import it; reuse it when already there."""
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    key = f"{name}_{digest}"
    path = cache_dir() / f"{key}.py"
    if str(path) in _loaded and path.exists():
        return _loaded[str(path)]
    if not path.exists() or path.read_text() != text:
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    modname = f"fusednn_generated.{key}"
    spec = importlib.util.spec_from_file_location(modname, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[modname] = module
    spec.loader.exec_module(module)
    _loaded[str(path)] = module
    return module
