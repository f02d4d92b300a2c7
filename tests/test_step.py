"""fusednn.step.train_step: a whole training step as one callable; on CUDA one CUDA-graph replay.

CPU: the step with a compiled LeNet and fusednn's SGD tracks float64 torch step by step; gradients stay in
the same tensors (set_to_none=False semantics); nested launch recording. GPU (marked, skipped on CPU): the
graph replay matches the eager step step by step, re-captures when the lr changes, refuses a new shape.
"""
from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
import torch.nn.functional as F

import fusednn
from fusednn import step as step_mod
from fusednn.optim import SGD
from fusednn.launch import recording
from fusednn.step import train_step
from tests.helpers import rel_err
from tests.models import LeNet

TOL = 1e-5


def _batch(n: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)


def _ref_step(ref: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    opt.zero_grad()
    loss = F.cross_entropy(ref(x.double()), t)
    loss.backward()
    opt.step()
    return loss.detach()


def test_train_step_with_compiled_lenet_and_fusednn_sgd_tracks_float64_torch():
    net = LeNet()
    ref = copy.deepcopy(net).double()
    step = train_step(fusednn.compile(net), F.cross_entropy, SGD(net.parameters(), lr=0.05, momentum=0.9))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05, momentum=0.9)
    for i in range(3):
        x, t = _batch(5)
        loss = step(x, t)
        loss_ref = _ref_step(ref, ref_opt, x, t)
        assert loss.grad_fn is None and rel_err(loss, loss_ref) <= TOL, i
        for (name, p), q in zip(net.named_parameters(), ref.parameters()):
            assert rel_err(p.grad, q.grad) <= TOL, (i, name)
            assert rel_err(p, q) <= TOL, (i, name)
    assert not step.graphed and step.calls == 3


def test_train_step_with_loss_inside_the_compiled_function_matches_float64_torch():
    net = LeNet()
    ref = copy.deepcopy(net).double()
    fn = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y), fuse=False)
    step = train_step(fn, None, SGD(net.parameters(), lr=0.1))
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for i in range(2):
        x, t = _batch(3)
        assert rel_err(step(x, t), _ref_step(ref, ref_opt, x, t)) <= TOL, i
        for p, q in zip(net.parameters(), ref.parameters()):
            assert rel_err(p, q) <= TOL, i


def test_train_step_zeroes_grads_in_place_so_grad_tensors_persist():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 10))
    step = train_step(net, F.cross_entropy, torch.optim.SGD(net.parameters(), lr=0.1))
    step(*_batch(4))
    ptrs = [p.grad.data_ptr() for p in net.parameters()]
    x, t = _batch(4)
    probe = copy.deepcopy(net)  # the weights this step starts from, with the previous step's grads
    probe.zero_grad(set_to_none=True)
    F.cross_entropy(probe(x), t).backward()
    step(x, t)
    assert [p.grad.data_ptr() for p in net.parameters()] == ptrs
    for p, q in zip(net.parameters(), probe.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-6  # this batch's gradient alone: zeroed, not accumulated


def test_train_step_refuses_cuda_graph_for_cpu_tensors_and_short_warmup():
    net = LeNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="CUDA tensors"):
        train_step(net, F.cross_entropy, opt, cuda_graph=True)(*_batch(2))
    with pytest.raises(ValueError, match="warmup"):
        train_step(net, F.cross_entropy, opt, warmup=1)


def test_recording_counts_the_whole_step_around_the_runtimes_own_recordings():
    net = LeNet()
    c = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))
    step = train_step(c, None, SGD(net.parameters(), lr=0.1, momentum=0.9))
    with recording() as outer:
        with recording() as rec:
            step(*_batch(2))
    # 5 forward groups + cross-entropy, its backward kernel, LeNet's 9, one SGD launch
    assert len(rec) == 17 and outer == rec
    s = c.stats()
    assert s["forward"]["launches"] == 6 and s["backward"]["launches"] == 10  # the runtime's lists stay its own
    assert all(r is not None for r in rec)


# ---------------------------------------------------------------------------------------------------
# The graph path's control flow on the CPU, with CUDA's stream and graph calls faked: a fake capture runs
# the step and then undoes it (a real capture runs nothing), a fake replay runs the step on the static
# buffers and writes the captured loss tensor. What this cannot check (the CUDA calls) the GPU tests do.
# ---------------------------------------------------------------------------------------------------


class _FakeCuda:
    def __init__(self) -> None:
        self.step = None  # the TrainStep whose graph is faked

    def _tensors(self) -> list[torch.Tensor]:
        opt = self.step.optimizer
        params = [p for g in opt.param_groups for p in g["params"]]
        state = [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
        return params + [p.grad for p in params if p.grad is not None] + state

    @contextlib.contextmanager
    def graph(self, g):
        live = self._tensors()
        saved = [t.detach().clone() for t in live]
        yield
        with torch.no_grad():
            for t, c in zip(live, saved):
                t.copy_(c)

    def replay(self) -> None:
        s = self.step
        s._loss.copy_(s.eager(s._x, s._y))


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = _FakeCuda()

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    class Graph:
        def replay(self):
            fake.replay()

    monkeypatch.setattr(step_mod, "_on_cuda", lambda x: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", fake.graph)
    return fake


def _mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(1024, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def test_graph_path_warms_up_captures_once_then_replays_like_eager_steps(fake_cuda, caplog):
    base = _mlp()
    nets = [copy.deepcopy(base) for _ in range(2)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9) for n in nets]
    eager = train_step(nets[0], F.cross_entropy, opts[0], cuda_graph=False)
    graph = fake_cuda.step = train_step(nets[1], F.cross_entropy, opts[1], cuda_graph=True)
    losses = []
    with caplog.at_level(logging.WARNING, logger="fusednn"):
        for i in range(9):
            if i == 6:  # a schedule's lr change: the graph holds the old lr as a constant
                for opt in opts:
                    opt.param_groups[0]["lr"] = 0.02
            x, t = _batch(4)
            a, b = eager(x, t), graph(x, t)
            assert a.item() == b.item(), i
            assert graph.captures == (0 if i < 3 else 1 if i < 6 else 2), i
            losses.append(b)
            assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters())), i
    assert losses[3] is losses[5] and losses[2] is not losses[3]  # replays return the captured loss tensor
    assert sum("re-capturing" in r.getMessage() for r in caplog.records) == 1
    nets[1].eval()  # train/eval mode is part of what was captured
    graph(*_batch(4))
    assert graph.captures == 3
    with pytest.raises(ValueError, match="fixed shapes"):
        graph(*_batch(5))


def test_graph_path_keeps_the_fusednn_launches_of_the_capture(fake_cuda):
    net = LeNet()
    c = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))
    step = fake_cuda.step = train_step(c, None, SGD(net.parameters(), lr=0.1, momentum=0.9), warmup=2)
    x, t = _batch(2)
    for _ in range(3):
        step(x, t)
    assert step.graphed and step.captures == 1
    assert len(step.launches) == 17  # forward, loss, backward and SGD of the captured step


# ---------------------------------------------------------------------------------------------------
# GPU: the CUDA-graph path
# ---------------------------------------------------------------------------------------------------


def _pair(make_model, fuse: bool | None, loss_inside: bool):
    """Two identical (step, net) pairs from the same initial weights: eager and CUDA graph."""
    base = make_model().cuda()
    out = []
    for graph in (False, True):
        net = copy.deepcopy(base)
        if fuse is None:  # plain torch eager model with torch's foreach SGD
            model, opt = net, torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9, foreach=True)
        else:
            model = fusednn.compile((lambda n: lambda x, y: F.cross_entropy(n(x), y))(net), fuse=fuse) \
                if loss_inside else fusednn.compile(net, fuse=fuse)
            opt = SGD(net.parameters(), lr=0.05, momentum=0.9)
        out.append((train_step(model, None if loss_inside else F.cross_entropy, opt, cuda_graph=graph), net, opt))
    return out


# One batch size (7) for every fusednn GPU test: the Triton kernels compile once for all of them.
@pytest.mark.gpu
@pytest.mark.parametrize("fuse,loss_inside", [(True, False), (False, False), (True, True)])
def test_cuda_graph_replay_matches_eager_steps_bit_for_bit_with_fusednn(fuse, loss_inside):
    (eager, net_e, _), (graph, net_g, _) = _pair(LeNet, fuse, loss_inside)
    for i in range(7):  # 3 warm-up steps, the capture, then replays
        x, t = _batch(7, "cuda")
        a, b = eager(x, t).item(), graph(x, t).item()
        assert a == b, (i, a, b)  # same kernels, same order, fixed-order reductions: bit-identical
        assert all(torch.equal(p, q) for p, q in zip(net_e.parameters(), net_g.parameters())), i
    assert graph.graphed and graph.captures == 1 and len(graph.launches) > 0
    assert not eager.graphed


@pytest.mark.gpu
def test_cuda_graph_replay_matches_eager_steps_with_torch_model_and_foreach_sgd():
    (eager, net_e, _), (graph, net_g, _) = _pair(LeNet, None, False)
    for i in range(6):
        x, t = _batch(9, "cuda")
        a, b = eager(x, t), graph(x, t)
        assert rel_err(b, a) <= TOL, i  # cuDNN's weight-gradient sums may run in another order
        assert all(rel_err(q, p) <= TOL for p, q in zip(net_e.parameters(), net_g.parameters())), i
    assert graph.captures == 1


@pytest.mark.gpu
def test_cuda_graph_recaptures_with_a_warning_when_the_lr_changes(caplog):
    (eager, net_e, opt_e), (graph, net_g, opt_g) = _pair(LeNet, True, False)
    batches = [_batch(7, "cuda") for _ in range(8)]
    with caplog.at_level(logging.WARNING, logger="fusednn"):
        for i, (x, t) in enumerate(batches):
            if i == 5:  # after two replays of the first capture
                for opt in (opt_e, opt_g):
                    opt.param_groups[0]["lr"] = 0.01
            assert eager(x, t).item() == graph(x, t).item(), i
    assert graph.captures == 2
    assert sum("re-capturing" in r.getMessage() for r in caplog.records) == 1
    assert all(torch.equal(p, q) for p, q in zip(net_e.parameters(), net_g.parameters()))


@pytest.mark.gpu
def test_cuda_graph_step_refuses_a_new_batch_shape_and_returns_one_static_loss_tensor():
    (_, _, _), (graph, _, _) = _pair(LeNet, True, False)
    losses = [graph(*_batch(7, "cuda")) for _ in range(5)]
    assert losses[3] is losses[4]  # replays write the captured loss tensor
    with pytest.raises(ValueError, match="fixed shapes"):
        graph(*_batch(6, "cuda"))


def test_graph_path_tensor_lr_driven_by_a_scheduler_never_recaptures_but_a_float_lr_change_does(fake_cuda, caplog):
    # The lr tensor lives on the parameters' device (here the CPU standing in for CUDA): fusednn's SGD
    # passes its address to the kernel, so a captured graph reads each value the scheduler fill_s in.
    base = _mlp()
    nets = [copy.deepcopy(base) for _ in range(3)]
    tensor_opt = SGD(nets[1].parameters(), lr=torch.tensor(0.1), momentum=0.9)
    float_opt = SGD(nets[2].parameters(), lr=0.1, momentum=0.9)
    eager_opt = SGD(nets[0].parameters(), lr=torch.tensor(0.1), momentum=0.9)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5) for o in (eager_opt, tensor_opt)]
    eager = train_step(nets[0], F.cross_entropy, eager_opt, cuda_graph=False, warmup=2)
    graphed = train_step(nets[1], F.cross_entropy, tensor_opt, cuda_graph=True, warmup=2)
    float_graphed = train_step(nets[2], F.cross_entropy, float_opt, cuda_graph=True, warmup=2)
    with caplog.at_level(logging.WARNING, logger="fusednn"):
        for i in range(6):
            x, t = _batch(4)
            fake_cuda.step = graphed
            a, b = eager(x, t), graphed(x, t)
            fake_cuda.step = float_graphed
            float_graphed(x, t)
            for s in scheds:
                s.step()
            float_opt.param_groups[0]["lr"] = float(tensor_opt.param_groups[0]["lr"])  # the same schedule as floats
            assert a.item() == b.item(), i
            assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters())), i
    assert graphed.graphed and graphed.captures == 1  # captured at call 3, replayed through 4 lr changes
    assert float_graphed.captures == 4  # captured at call 3, re-captured at calls 4, 5 and 6
    assert sum("re-capturing" in r.getMessage() for r in caplog.records) == 1  # warned once, by float_graphed
    assert tensor_opt.param_groups[0]["lr"].item() == pytest.approx(0.1 * 0.5 ** 6, rel=1e-6)  # float32 tensor
