"""Nothing of a training step outlives it: after forward, backward and the optimizer step, with the loss
dropped, the only tensors left are the parameters, their gradients and the optimizer's state. The runtime
keeps launch counts for stats(), never the launches' tensors (LeNet at batch 4096 pinned ~67 MB of
intermediates between steps when it did). CPU: by weak references to every tensor a launch received;
GPU (marked): by torch.cuda.memory_allocated()."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F

import fusednn
from fusednn import launch
from fusednn.optim import SGD
from tests.models import LeNet


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _state_tensors(net: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Parameters, their gradients and the optimizer's per-parameter state: what a step may leave behind."""
    out = []
    for p in net.parameters():
        out += [p] + ([p.grad] if p.grad is not None else [])
        out += [v for v in opt.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
    return out


def _make_step(loss_inside: bool, fuse: bool, device: str = "cpu", set_to_none: bool = True):
    net = LeNet().to(device)
    opt = SGD(net.parameters(), lr=0.01, momentum=0.9)
    if loss_inside:
        c = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y), fuse=fuse)
        run = c
    else:
        c = fusednn.compile(net, fuse=fuse)
        run = lambda x, y: F.cross_entropy(c(x), y)  # noqa: E731

    def step(x: torch.Tensor, y: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=set_to_none)
        loss = run(x, y)
        loss.backward()
        opt.step()
        return loss.item()  # the loss tensor itself is dropped here

    return net, opt, c, step


@pytest.mark.parametrize("fuse", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize("loss_inside", [True, False], ids=["loss_compiled", "loss_eager"])
def test_training_step_leaves_only_parameters_grads_and_optimizer_state_alive(loss_inside, fuse):
    net, opt, c, step = _make_step(loss_inside, fuse)
    x, y = torch.randn(4, 1, 32, 32), torch.randint(0, 10, (4,))
    step(x, y)  # compiles, creates the gradients and momentum buffers
    with launch.recording() as rec:
        step(x, y)
    assert len(rec) > 0
    refs = [(weakref.ref(a), launch.kernel_name(r.kernel), tuple(a.shape))
            for r in rec for a in r.args if isinstance(a, torch.Tensor)]
    del rec
    gc.collect()
    keep = {_storage(t) for t in _state_tensors(net, opt) + [x, y]}
    leaked = []
    for ref, kernel, shape in refs:
        t = ref()
        # The SGD kernel's address tables are cached by kernels/sgd.py, keyed by the parameters' addresses.
        if t is not None and _storage(t) not in keep and kernel != "_sgd_step_kernel":
            leaked.append((kernel, shape))
    assert not leaked, f"tensors of the step still alive after it: {leaked}"
    s = c.stats()  # the counts survive without the tensors
    assert s["forward"]["launches"] > 0 and s["backward"]["launches"] > 0 and s["backward"]["bytes"] > 0


def test_stats_hold_counts_not_launches():
    net, opt, c, step = _make_step(loss_inside=True, fuse=True)
    step(torch.randn(2, 1, 32, 32), torch.randint(0, 10, (2,)))
    exe = c._last().executable
    for counts in (exe.forward_counts, exe.backward_counts):
        assert isinstance(counts, launch.LaunchCounts)  # totals and per-kernel dicts: no Launch, no tensor
    s = c.stats()
    # 5 fused groups + cross-entropy forward; its backward kernel + LeNet's 9 (conv1 needs no dx)
    assert (s["forward"]["launches"], s["backward"]["launches"]) == (6, 10)


@pytest.mark.gpu
def test_cuda_memory_between_steps_is_parameters_grads_and_optimizer_state():
    torch.manual_seed(0)
    # Gradients zeroed in place, as the benchmark does: they keep their addresses, so kernels/sgd.py's
    # address tables (cached by address) stop changing after the first step.
    net, opt, c, step = _make_step(loss_inside=True, fuse=True, device="cuda", set_to_none=False)
    x = torch.randn(4096, 1, 32, 32, device="cuda")
    y = torch.randint(0, 10, (4096,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()  # parameters and the batch
    step(x, y)
    step(x, y)
    torch.cuda.synchronize()
    after_2 = torch.cuda.memory_allocated()
    for _ in range(3):
        step(x, y)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == after_2  # nothing grows from step to step
    # Gradients and momentum buffers, each rounded up to the caching allocator's 512-byte blocks; the
    # SGD kernel's two address tables (first step, later steps: ~1.5 KB each for LeNet) fit in 64 KiB.
    # The leak this pins was ~67 MB at this batch.
    state = sum(-(-t.nbytes // 512) * 512 for p in net.parameters()
                for t in (p.grad, opt.state[p]["momentum_buffer"]))
    assert state <= after_2 - base <= state + 64 * 1024, (after_2 - base, state)
