"""Prebuilt launches (fusednn/prebuilt.py): the first call at a batch records each forward step's launches,
later calls replay them. A replay must be exactly the general path: same results, forward and every
gradient and the running statistics, against float64 torch over several calls on fresh inputs; and where a
capture would not be exact (inputs sharing memory, a host-drawn seed) the general path runs instead."""
from __future__ import annotations

import copy
import dataclasses
import weakref

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

import fusednn
from fusednn import launch
from fusednn.compiler import autodiff
from fusednn.models import MODELS
from fusednn.prebuilt import Capture, Prebuilt
from tests.helpers import rel_err


def _replayed(compiled) -> int:
    """How many forward steps of the last specialisation's programs run prebuilt launches."""
    exe = compiled._last().executable
    return sum(int(p.replayed) for p in exe.programs.values())


def _prebuilts(exe) -> list[Prebuilt]:
    """Every Prebuilt an executable keeps: whole forwards, forward steps, whole backwards, backward VJPs."""
    out = []
    for p in exe.programs.values():
        out += [p.prebuilt] if hasattr(p, "prebuilt") else [r.prebuilt for r in p.runs if hasattr(r, "prebuilt")]
    for whole, vjps in exe.backward_programs.values():
        out += ([whole] if whole is not None else []) + [e[0] for e in vjps.values() if e is not None]
    return out


def _no_general_path(compiled, monkeypatch):
    """Make every generated launcher of the compiled graph, and every VJP rule of a node whose backward
    was recorded, raise: a replay calls none of them."""
    exe = compiled._last().executable
    for s in exe.steps:
        if s.kernel is not None and s.replayable:
            def boom(*a, _name=s.kernel.name, **k):
                raise AssertionError(f"{_name}: the general path ran where a replay was expected")

            monkeypatch.setattr(s.kernel.module, "launch", boom)
    # recorded VJPs by their nodes: (n,), or (batch norm, conv) for a pair (autodiff.BackwardPlan.pairs)
    recorded = {n for whole, vjps in exe.backward_programs.values() for n, entry in vjps.items() if entry is not None}
    assert recorded
    for fam, r in list(autodiff.VJPS.items()):
        def vjp(n, *a, _r=r, **k):
            assert (n,) not in recorded, f"{n.label()}: the general backward ran where a replay was expected"
            return _r.vjp(n, *a, **k)

        monkeypatch.setitem(autodiff.VJPS, fam, dataclasses.replace(r, vjp=vjp))
    pair = autodiff._bn_conv_vjp

    def pair_vjp(bn, conv, *a, **k):
        assert (bn, conv) not in recorded, f"{bn.label()}: the general backward ran where a replay was expected"
        return pair(bn, conv, *a, **k)

    monkeypatch.setattr(autodiff, "_bn_conv_vjp", pair_vjp)


def _tol(f32: torch.Tensor, f64: torch.Tensor) -> float:
    """The promise: 1e-5 relative, or 4x float32 torch's own error against float64 where that is larger."""
    return max(1e-5, 4 * rel_err(f32, f64))


@pytest.mark.parametrize("name", ["lenet", "resnet8"])  # MobileNetV2Tiny: a minute in the interpreter
def test_replayed_calls_match_float64_torch(name, monkeypatch):
    torch.manual_seed(0)
    rgb = name != "lenet"
    model = MODELS[name](in_channels=3) if rgb else MODELS[name]()
    ref64, ref32 = copy.deepcopy(model).double(), copy.deepcopy(model)
    c = fusednn.compile(model)
    shape = (2, 3, 16, 16) if rgb else (2, 1, 32, 32)
    for call in range(3):
        x = torch.randn(shape)
        xs = [x.clone().requires_grad_(), x.double().requires_grad_(), x.clone().requires_grad_()]
        outs = [m(t) for m, t in zip((c, ref64, ref32), xs)]
        g = torch.randn_like(outs[1])
        for o in outs:
            o.backward(g.to(o.dtype))
        assert rel_err(outs[0], outs[1]) <= _tol(outs[2], outs[1]), call
        assert rel_err(xs[0].grad, xs[1].grad) <= _tol(xs[2].grad, xs[1].grad), call
        for (n, p), q, r in zip(model.named_parameters(), ref64.parameters(), ref32.parameters()):
            assert rel_err(p.grad, q.grad) <= _tol(r.grad, q.grad), (call, n)
            p.grad = q.grad = r.grad = None
        for (n, b), b64, b32 in zip(model.named_buffers(), ref64.buffers(), ref32.buffers()):
            assert rel_err(b, b64) <= _tol(b32, b64), (call, n)
        if call == 0:  # recorded: from now on the general path must not run
            assert _replayed(c) > 0
            _no_general_path(c, monkeypatch)


def test_a_gradient_that_is_a_whole_allocation_is_allocated_with_its_shape():
    # LeNet's conv weight gradients are written as [1, K, C*R*S] and handed back as [K, C, R, S]: the replay
    # allocates them as [K, C, R, S] (no view per call); each matches torch on every replay.
    torch.manual_seed(0)
    model = MODELS["lenet"]()
    ref = copy.deepcopy(model).double()
    c = fusednn.compile(model)
    for call in range(3):
        x = torch.randn(2, 1, 32, 32)
        c(x).sum().backward()
        ref(x.double()).sum().backward()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            assert p.grad.shape == q.shape and rel_err(p.grad, q.grad) < 1e-5, (call, n)
            p.grad = q.grad = None
    [(whole, _)] = c._last().executable.backward_programs.values()
    conv_w = [d for d in whole.results if d is not None and len(d.shape) == 4]
    assert len(conv_w) == 2 and all(d.exact for d in conv_w)


class _TwiceCumulative(torch.nn.Module):
    """A cumulative-average batch norm (momentum=None: its factor is 1 / num_batches_tracked, read after the
    counter's in-place add) called twice per forward: the replayed adds must land between the right launches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4, momentum=None)

    def forward(self, x):
        return self.bn(torch.relu(self.bn(self.conv(x))) * 2.0)


def test_replayed_batch_norm_counters_and_cumulative_statistics_match_torch():
    torch.manual_seed(0)
    model = _TwiceCumulative()
    ref = copy.deepcopy(model).double()
    c = fusednn.compile(model)
    for call in range(4):
        x = torch.randn(2, 3, 6, 6)
        out, want = c(x), ref(x.double())
        assert rel_err(out, want) < 1e-5, call
        assert model.bn.num_batches_tracked.item() == ref.bn.num_batches_tracked.item() == 2 * (call + 1)
        assert rel_err(model.bn.running_mean, ref.bn.running_mean) < 1e-5, call
        assert rel_err(model.bn.running_var, ref.bn.running_var) < 1e-5, call
    assert hasattr(list(c._last().executable.programs.values())[0], "prebuilt")  # replayed whole


class _TwiceCounted(torch.nn.Module):
    """Batch norms with a momentum: each call of one counts a batch, in the next training batch norm's kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(4)
        self.bn2 = torch.nn.BatchNorm2d(4, momentum=0.3)

    def forward(self, x):
        return self.bn2(torch.relu(self.bn(torch.relu(self.bn(self.conv(x))))))


def _calls_match_torch(model: torch.nn.Module, shape: tuple, check, **options):
    """Compile model and call it 3 times on fresh inputs of `shape`: the output and every buffer (counters
    and running statistics) as float64 torch's, then check(call, ref) after each; returns the compiled model."""
    ref = copy.deepcopy(model).double()
    c = fusednn.compile(model, **options)
    for call in range(3):
        x = torch.randn(shape)
        assert rel_err(c(x), ref(x.double())) < 1e-5, call
        for b, r in zip(model.buffers(), ref.buffers()):
            assert rel_err(b, r) < 1e-5, call
        check(call, ref)
    return c


@pytest.mark.parametrize("fuse", [True, False])
def test_batch_counters_counted_in_batch_norm_kernels_match_torch(fuse):
    # No host `add_` per batch norm: each `num_batches_tracked.add_(1)` whose count nothing reads is made by
    # a batch norm's kernel; the same module called twice counts twice, on every replay.
    torch.manual_seed(0)
    model = _TwiceCounted()

    def counts(call, ref):
        assert model.bn.num_batches_tracked.item() == ref.bn.num_batches_tracked.item() == 2 * (call + 1)
        assert model.bn2.num_batches_tracked.item() == ref.bn2.num_batches_tracked.item() == call + 1

    c = _calls_match_torch(model, (2, 3, 6, 6), counts, fuse=fuse)
    whole = list(c._last().executable.programs.values())[0].prebuilt
    assert [a for ln in whole.launches for a in ln.adds] == [] and whole.adds_last == ()


class _CounterViewedBefore(torch.nn.Module):
    """A view of a batch counter taken before its count and read after it: the count must stay where the
    trace put it (a host add_), not move into the batch norm's kernel after the read."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("cnt", torch.zeros(1, dtype=torch.long))
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        v = self.cnt.view(1, 1)
        self.cnt.add_(1)
        return self.bn(x + v.float())


def test_a_counter_read_through_a_view_sees_its_count():
    torch.manual_seed(0)
    model = _CounterViewedBefore()

    def counts(call, ref):
        assert model.cnt.item() == ref.cnt.item() == call + 1

    _calls_match_torch(model, (4, 3), counts, strict=False)  # .float() of an integer buffer runs in torch


class _VectorCounter(torch.nn.Module):
    """An integer buffer of 3 elements counted like a batch counter: every element counts (host add_)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("hits", torch.zeros(3, dtype=torch.long))
        self.fc = torch.nn.Linear(4, 3)
        self.bn = torch.nn.BatchNorm1d(3)

    def forward(self, x):
        self.hits.add_(1)
        return self.bn(self.fc(x))


@pytest.mark.parametrize("fuse", [True, False])
def test_a_counter_of_several_elements_counts_every_one(fuse):
    torch.manual_seed(0)
    model = _VectorCounter()

    def counts(call, ref):
        assert model.hits.tolist() == ref.hits.tolist() == [call + 1] * 3
        assert model.bn.num_batches_tracked.item() == call + 1

    _calls_match_torch(model, (5, 4), counts, fuse=fuse)


def _alias_fn(a, b):
    return torch.tanh(a * 2.0 + b)


@pytest.mark.parametrize("first", ["shared", "distinct"])
def test_inputs_that_share_memory_on_one_call_but_not_another(first):
    """A capture cannot tell apart two inputs at one address: it is not taken there, and a capture of
    distinct inputs stays right when a later call passes one tensor for both."""
    c = fusednn.compile(_alias_fn)
    x, y = torch.randn(5, 7), torch.randn(5, 7)
    calls = [(x, x), (x, y), (y, x), (y, y)] if first == "shared" else [(x, y), (y, y), (x, x), (y, x)]
    for a, b in calls:
        ag = a.clone().requires_grad_()
        got = c(ag, ag if a is b else b.clone().requires_grad_())
        want = _alias_fn(a.double(), b.double())
        assert rel_err(got, want) < 1e-6
        got.backward(torch.ones_like(got))
        # d/da tanh(2a + b) with b = a when one tensor is passed for both: 3 (1 - tanh^2), else 2 (1 - tanh^2)
        assert rel_err(ag.grad, (3.0 if a is b else 2.0) * (1 - want ** 2)) < 1e-6
    assert (_replayed(c) == 0) == (first == "shared")


def test_a_view_of_one_input_sharing_memory_with_another_on_the_first_call():
    """`pred.flatten()` (a view the graph makes of one input) and `target` share memory on the recording
    call only: a replay must read each call's own tensors, forward and backward."""
    def loss(pred, target):
        return F.mse_loss(pred.flatten(), target)

    c = fusednn.compile(loss)
    t = torch.randn(20, requires_grad=True)
    assert c(t.view(4, 5), t.detach()).item() == 0.0  # the loss of a target against itself
    for _ in range(3):
        pred, target = torch.randn(4, 5, requires_grad=True), torch.randn(20)
        p64 = pred.detach().double().requires_grad_()
        got, want = c(pred, target), loss(p64, target.double())
        assert rel_err(got, want) < 1e-6
        got.backward()
        want.backward()
        assert rel_err(pred.grad, p64.grad) < 1e-6


def test_an_output_gradient_that_is_the_output_itself_on_the_first_backward():
    """`y.backward(y)` on the recording call: the gradient and the saved output share memory then, and
    never after."""
    def f(x):
        return torch.tanh(x * 2.0)

    c = fusednn.compile(f)
    for call in range(3):
        x = torch.randn(4, 8, requires_grad=True)
        x64 = x.detach().double().requires_grad_()
        y, y64 = c(x), f(x64)
        g, g64 = (y, y64) if call == 0 else (lambda g: (g, g.double()))(torch.randn(4, 8))
        y.backward(g)
        y64.backward(g64)
        assert rel_err(x.grad, x64.grad) < 1e-6, call


def test_dropout_draws_a_new_mask_on_every_call_forward_and_backward():
    """A dropout's seed is drawn on the host per call and read back by its backward: neither is replayed
    with the first call's seed."""
    torch.manual_seed(0)
    c = fusednn.compile(lambda x: F.dropout(torch.tanh(x), 0.5))
    x = torch.randn(8, 64)
    masks = []
    for _ in range(3):
        xg = x.clone().requires_grad_()
        out = c(xg)
        out.backward(torch.ones_like(out))
        keep = out != 0
        want = torch.where(keep, 2 * (1 - torch.tanh(x.double()) ** 2), 0.0)
        assert rel_err(xg.grad, want) < 1e-6
        masks.append(keep)
    assert _replayed(c) > 0  # the tanh is replayed
    assert not torch.equal(masks[1], masks[2]) and not torch.equal(masks[0], masks[1])


def test_an_observer_sees_the_general_path_with_labels():
    torch.manual_seed(0)
    net = MODELS["lenet"]()
    c = fusednn.compile(net)
    x = torch.randn(2, 1, 32, 32)
    c(x), c(x)
    with launch.recording() as rec:
        c(x)
    assert len(rec) == c.stats()["forward"]["launches"] == 5
    assert all(r.tag for r in rec)  # labelled by the IR group each implements


def test_prebuilt_launches_hold_no_tensor():
    """Replays allocate their results on every call: what a program keeps is shapes, kernels and constants."""
    torch.manual_seed(0)
    net = MODELS["lenet"]()
    c = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 10, (2,))
    c(x, y).backward()
    c(x, y).backward()
    exe = c._last().executable
    found = _prebuilts(exe)
    whole_forward, (whole_backward, _) = list(exe.programs.values())[0], list(exe.backward_programs.values())[0]
    assert hasattr(whole_forward, "prebuilt") and whole_backward is not None  # LeNet records whole
    for pb in found:
        for ln in pb.launches:
            assert not any(isinstance(a, torch.Tensor) for a in [*ln.args, *ln.meta.values()])
    assert len(found) == 2 + 7  # the whole forward and backward, and each backward node's VJP (the fallback)


def test_replays_allocate_when_first_used_and_free_temporaries_after_last_use():
    """A replayed backward holds its temporaries (split-K partials, intermediate gradients) no longer than
    the general path: each allocation is made before the launch that first uses it and dropped after the
    last one, unless a result lies in it."""
    torch.manual_seed(0)
    net = MODELS["lenet"]()
    c = fusednn.compile(lambda x, y: F.cross_entropy(net(x), y))
    x, y = torch.randn(2, 1, 32, 32), torch.randint(0, 10, (2,))
    c(x, y).backward()
    released = 0
    for pb in _prebuilts(c._last().executable):
        results = {d[0] for d in pb.results if d is not None}
        allocated = {a[0] for ln in pb.launches for a in ln.allocate} | {a[0] for a in pb.allocate_last}
        reads = pb.n_roots - len(allocated)
        made: set[int] = set()
        gone: set[int] = set()
        for ln in pb.launches:
            made |= {a[0] for a in ln.allocate}
            used = {d[0] for _, d in ln.fills}
            assert not used & gone, "a launch uses a freed temporary"
            assert all(i < reads or i in made for i in used), "a launch uses an allocation not made yet"
            gone |= set(ln.release)
        assert allocated <= gone | results and not gone & results
        released += len(gone)
    assert released > 0  # the whole backward frees its intermediate gradients as it goes


# -- the capture itself, on hand-made steps ---------------------------------------------------------------
@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, s, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * s + tl.load(y_ptr + offs, mask=mask), mask=mask)


def _accumulate(x, y, s):
    """y += s * x, launched through fusednn.launch."""
    launch.launch(_scale_kernel, (1,), x, y, x.numel(), s, BLOCK=64)


def test_a_step_that_computes_outside_its_launches_is_not_recorded():
    """y.zero_() runs in torch, not in a launch: a replay that only allocated and launched would add into
    uninitialised memory."""
    x = torch.randn(40)
    with Capture([x]) as cap:
        y = torch.empty_like(x)
        y.zero_()
        _accumulate(x, y, 2.0)
    assert torch.equal(y, 2.0 * x)
    assert cap.build([y]) is None


def test_a_step_that_reads_a_number_is_not_recorded():
    x = torch.randn(40)
    with Capture([x]) as cap:
        y = torch.zeros_like(x)
    assert cap.build([y]) is None  # zeros_like computes
    with Capture([x, 3]) as cap:
        y = torch.empty_like(x)
    assert cap.build([y]) is None  # a number read may change from call to call
    with Capture([x]) as cap:
        y = torch.empty_like(x)
    assert cap.build([y]) is not None


def test_replays_build_views_at_offsets_into_fresh_memory():
    """A result inside a larger allocation (a [dw | db] buffer's db) is the same view on replay, of memory
    allocated anew on every replay."""
    def step(x):
        buf = torch.empty(3 * x.numel())
        out = buf[x.numel():2 * x.numel()].view(x.shape)
        _write(x, out)
        return buf[: x.numel()], out

    x = torch.randn(5, 8)
    with Capture([x]) as cap:
        first = step(x)
    pb = cap.build(list(first))
    assert pb is not None
    x2 = torch.randn(5, 8)
    a = pb.run([x2])
    b = pb.run([x2])
    assert torch.equal(a[1], 3.0 * x2) and a[1].shape == (5, 8) and a[1].storage_offset() == 40
    assert a[1].data_ptr() != b[1].data_ptr() and a[1].data_ptr() != first[1].data_ptr()


@triton.jit
def _write_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * 3.0, mask=mask)


def _write(x, y):
    launch.launch(_write_kernel, (1,), x, y, x.numel(), BLOCK=64)


def test_a_recording_keeps_no_tensor_alive():
    """The recording call frees a temporary when the step drops it, as the general path does (a first
    backward holds no more gradients at once than later ones); the replay allocates and frees it again."""
    x = torch.randn(40)
    with Capture([x]) as cap:
        tmp = torch.empty_like(x)
        _write(x, tmp)
        out = torch.empty_like(x)
        _write(tmp, out)
        gone = weakref.ref(tmp)
        del tmp
        assert gone() is None
    pb = cap.build([out])
    assert pb is not None and torch.equal(out, (x * 3.0) * 3.0)
    x2 = torch.randn(40)
    assert torch.equal(pb.run([x2])[0], (x2 * 3.0) * 3.0)
    assert [ln.release for ln in pb.launches] == [(), (1,)]  # the temporary, root 1, after its last use


class _Copy:
    """A stand-in kernel (`_Copy()[grid](src, dst)`) for steps whose memory reuse a test arranges."""

    def __getitem__(self, grid):
        return lambda src, dst: dst.copy_(src)


def _reusing(make_step, attempts: int = 50):
    """Run make_step() under a Capture until the allocator hands a freed temporary's memory to the tensor the
    step reads or writes next (what the test is about); (capture, that tensor, the step's result)."""
    for _ in range(attempts):
        x, cap, seen, out, freed = make_step()
        if seen.data_ptr() == freed:
            return x, cap, out
    pytest.skip("the allocator did not reuse the freed temporary's memory")


@pytest.mark.parametrize("case", ["a view with another dtype", "a table built on the host"])
def test_memory_a_freed_temporary_gives_back_is_not_taken_for_it(case):
    """A tensor in memory a freed allocation gave back is not that allocation: a write through a float32 view
    of a new uint8 buffer, or a table torch.tensor() built from host data, is not recorded as the temporary
    (a replay would write the temporary, or read an earlier launch's output)."""
    def step():
        x = torch.randn(1000) if case.startswith("a view") else torch.arange(1000, dtype=torch.int64)
        with Capture([x]) as cap:
            tmp = torch.empty_like(x)
            launch.launch(_Copy(), (1,), x, tmp)
            freed = tmp.data_ptr()
            del tmp
            if case.startswith("a view"):
                out = torch.empty(4000, dtype=torch.uint8)
                seen = out
                launch.launch(_Copy(), (1,), x, out.view(torch.float32))
            else:
                seen = torch.tensor(list(range(5000, 6000)), dtype=torch.int64)
                out = torch.empty_like(x)
                launch.launch(_Copy(), (1,), seen, out)
        return x, cap, seen, out, freed

    x, cap, out = _reusing(step)
    pb = cap.build([out])
    assert pb is None or torch.equal(pb.run([x])[0], out)
