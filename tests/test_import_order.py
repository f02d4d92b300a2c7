"""fusednn works whatever was imported first: triton itself, or torch._dynamo / torch._inductor (which
import triton), before `import fusednn` on a machine where fusednn switches Triton's interpreter on.
Each case runs in a fresh process: a LeNet training step (every forward and backward kernel family, the
loss and the fused SGD) and a gate with broadcasting must match the same process's torch eager."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

_SCRIPT = textwrap.dedent(
    """
    {first}
    import torch, torch.nn.functional as F
    import fusednn
    from fusednn.models import LeNet
    torch.manual_seed(0)
    net, ref = LeNet(), LeNet()
    ref.load_state_dict(net.state_dict())
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    loss = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))(x, y)
    loss.backward()
    fusednn.optim.SGD(net.parameters(), lr=0.1, momentum=0.9).step()
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9).step()
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * abs(ref_loss.item()), (loss.item(), ref_loss.item())
    for p, q in zip(net.parameters(), ref.parameters()):
        assert (p - q).norm() <= 1e-5 * q.norm(), "parameters differ after one step"
    a, b = torch.randn(3, 4), torch.randn(4)
    g = fusednn.compile(lambda a, b: torch.tanh(a + b) * torch.sigmoid(b))(a, b)
    assert (g - torch.tanh(a + b) * torch.sigmoid(b)).abs().max() <= 1e-6
    print("ok")
    """
)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is switched on only without CUDA")
@pytest.mark.parametrize("first", ["import triton", "import triton.language as tl", "import torch._dynamo",
                                   "import torch._inductor.config", "pass"])
def test_any_import_order_runs_the_kernels(first, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # fusednn decides, as for a user
    env["FUSEDNN_CACHE_DIR"] = os.environ.get("FUSEDNN_CACHE_DIR", str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", _SCRIPT.format(first=first)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]
