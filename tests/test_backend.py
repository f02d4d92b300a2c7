"""fusednn switches Triton's interpreter on by itself where no CUDA device is present, and says so once per
process at WARNING level (visible without any logging set up). Each check runs in a fresh interpreter,
where the switch happens at `import fusednn`."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_COMPILE_AND_RUN = """
import torch, fusednn
from fusednn import _backend
_backend.setup()  # a second call says nothing more
lin = torch.nn.Linear(3, 2)
fusednn.compile(lin)(torch.randn(4, 3)).sum().backward()
assert lin.weight.grad is not None
"""


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA device, even on a GPU machine
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _interpreter_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "interpreter" in line]


def test_interpreter_is_announced_once_at_warning_level():
    code = ("import logging, sys\n"
            "logging.basicConfig(level=logging.WARNING, format='%(levelname)s:%(name)s:%(message)s')\n"
            + _COMPILE_AND_RUN)
    r = _run(code)
    assert r.returncode == 0, r.stderr
    [line] = _interpreter_lines(r.stderr)
    assert line.startswith("WARNING:fusednn:") and "TRITON_INTERPRET=1" in line and "slow" in line


def test_interpreter_notice_shows_without_any_logging_setup():
    r = _run(_COMPILE_AND_RUN)
    assert r.returncode == 0, r.stderr
    assert len(_interpreter_lines(r.stderr)) == 1


def test_no_notice_when_the_user_chose_the_interpreter():
    r = _run("import os; os.environ['TRITON_INTERPRET'] = '1'\n" + _COMPILE_AND_RUN)
    assert r.returncode == 0, r.stderr
    assert _interpreter_lines(r.stderr) == []
