"""The README's example runs as written."""
from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, capsys):
    block = re.search(r"## Ten lines\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "conv_relu_pool[bias,relu,max_pool2d(2,2)]" in out and "# fusednn generated kernel" in out
    assert out.strip().splitlines()[-1] == "5"
    assert (tmp_path / "dump" / "fused.ir").exists()
