"""The runtime: run a compiled graph's generated forward kernels and its backward plan under autograd.

One `torch.autograd.Function` wraps the whole graph: its forward runs every generated kernel and saves
only what the backward plan reads; its backward runs the plan's hand-written kernels and returns a
gradient for every graph input (user inputs, parameters), so `loss.backward()` fills `param.grad` and
accumulates as torch does. Under `torch.no_grad()` / `inference_mode()` nothing is saved.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch

from fusednn import launch, prebuilt
from fusednn._backend import debug_level
from fusednn.compiler import autodiff, codegen, configs
from fusednn.compiler.ir import Env, Graph, Node, Value
from fusednn.compiler.ops import REGISTRY
from fusednn.errors import CompileError, InputMismatchError

log = logging.getLogger("fusednn")


class _GraphFunction(torch.autograd.Function):
    """forward: the generated kernels of one graph; backward: its backward plan."""

    @staticmethod
    def forward(ctx, exe: "TritonExecutable", *tensors: torch.Tensor):  # type: ignore[override]
        steady = exe.steady_forward(tensors)
        if steady is not None:  # the recorded forward's results, in a fixed order: no Env, no lookups
            whole, out, ctx.batch = steady
            ctx.exe, ctx.extra_ints = exe, {}
            ctx.val_keys, ctx.extra_keys = whole.saved_keys
            ctx.save_for_backward(*[out[i] for i in whole.saved_at])
            outs = tuple([out[i] for i in whole.outputs_at])
            if exe.integer_outputs:
                ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
            return outs
        env = exe.forward(tensors)
        ctx.exe = exe
        ctx.batch = env.batch
        values, ext = env.values, env.extra
        saves = exe.saves_at.get(env.batch)
        if saves is None:  # what of the saved keys a forward at this batch has: the same on every call
            vals, extra = exe.saved_keys
            saves = exe.saves_at[env.batch] = (
                [v for v in vals if v in values], [k for k in extra if isinstance(ext.get(k), torch.Tensor)],
                [k for k in extra if k in ext and not isinstance(ext[k], torch.Tensor)])
        ctx.val_keys, ctx.extra_keys, int_keys = saves
        ctx.extra_ints = {k: ext[k] for k in int_keys}  # a dropout's seed: read on every call
        ctx.save_for_backward(*[values[v] for v in ctx.val_keys], *[ext[k] for k in ctx.extra_keys])
        outs = tuple(values[v] for v in exe.graph.outputs)
        if exe.integer_outputs:
            ctx.mark_non_differentiable(*[o for o in outs if not o.is_floating_point()])
        return outs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # autograd enables grad in backward only for create_graph=True
            raise RuntimeError(
                "fusednn: double backward (create_graph=True, or torch.autograd.grad of a gradient) is not supported: "
                "fusednn's backward kernels are not themselves differentiable. Compile with backend='reference' "
                "for higher-order gradients.")
        exe: TritonExecutable = ctx.exe
        saved = ctx.saved_tensors
        g = {}
        for v, d in zip(exe.graph.outputs, grads):
            if d is not None and v.type.dtype.is_floating_point:
                g[v] = d if v not in g else g[v] + d
        needs = tuple(ctx.needs_input_grad[1:])
        key = (ctx.batch, configs.target(), needs, tuple(v in g for v in exe.graph.outputs))
        recorded = exe.backward_programs.get(key)
        if recorded is not None and recorded[0] is not None and not launch._recorders and key in exe.backward_seen:
            # the steady state: the whole backward's prebuilt launches, nothing else (as `_Counter` would)
            exe.backward_counts = exe.backward_seen[key]
            return (None, *recorded[0].run(_backward_reads(g, saved, ctx.extra_ints)))
        nv = len(ctx.val_keys)
        env = Env(dict(zip(ctx.val_keys, saved[:nv])), dict(zip(ctx.extra_keys, saved[nv:])), ctx.batch,
                  exe.graph.dynamic)
        env.extra.update(ctx.extra_ints)
        with exe.tiles_at(env.batch), _Counter(exe.backward_seen, key) as counter:
            if counter.steady and recorded is not None:
                whole, vjps = recorded
                if whole is not None:
                    out = whole.run(_backward_reads(g, saved, ctx.extra_ints))
                else:
                    out = exe.plan.run(env, g, needs, exe.precision, vjp=_replayer(vjps))
            elif recorded is None:
                g = {v: d.contiguous() for v, d in g.items()}
                # alias classes: each output gradient its own, a saved value its value's, an extra its key
                classes = ([("gradient", i) for i in range(len(g))] + [exe.alias.get(v, v) for v in ctx.val_keys]
                           + list(ctx.extra_keys) + [("number", k) for k in ctx.extra_ints])
                vjps: dict[tuple[Node, ...], tuple | None] = {}
                with prebuilt.Capture(_backward_reads(g, saved, ctx.extra_ints), classes) as cap:
                    out = exe.plan.run(env, dict(g), needs, exe.precision, vjp=_recorder(vjps, exe.alias))
                exe.backward_programs[key] = (cap.build(list(out)), vjps)
            else:  # observed: the general path, as recorded by the observer
                out = exe.plan.run(env, g, needs, exe.precision)
        exe.backward_counts = counter.counts
        return (None, *out)


class TritonExecutable:
    """A graph lowered to generated Triton kernels, with its backward plan."""

    def __init__(self, graph: Graph, options: Any,
                 inference: Callable[[], "TritonExecutable | None"] | None = None) -> None:
        """inference: builds, on the first call autograd does not record, the executable of the graph such
        calls run (batch norm folded into convs; see passes.fuse_conv_inference), or None where it would be
        this one."""
        self.graph = graph
        self._make_inference = inference
        self._inference: TritonExecutable | None = None
        self.last_run: TritonExecutable = self  # the executable of the last call's forward (stats)
        self.precision = options.precision
        self.debug = debug_level()
        self.steps = codegen.lower(graph, options.precision, self.debug)
        self.labels = [s.node.label() for s in self.steps]  # launch tags, built once
        self.plan = autodiff.plan(graph)
        vals, extra = self.plan.saved()
        self.saved_keys = (tuple(vals), tuple(extra))  # iterated on every call: tuples, in a fixed order
        self.saves_at: dict[int | None, tuple[list, list, list]] = {}  # per batch: the saved keys a call has
        self._param_names = [v.name for v in graph.inputs if v.kind != "input"]
        self.integer_outputs = any(not v.type.dtype.is_floating_point for v in graph.outputs)
        # Counts only: keeping the launches themselves would pin every tensor of the last step (LeNet at
        # batch 4096: ~67 MB of intermediates) until the next one. Tools that need the launches with their
        # arguments record them explicitly (launch.recording()).
        self.forward_counts = launch.LaunchCounts()
        self.backward_counts = launch.LaunchCounts()
        # What a forward or backward launched, by what fixes it (batch, launch-config target, and for a
        # backward which gradients flow): counted on the first such call, then reused (`_Counter`).
        self.forward_seen: dict[tuple, launch.LaunchCounts] = {}
        self.backward_seen: dict[tuple, launch.LaunchCounts] = {}
        # The forward as a list of prebuilt launches (fusednn/prebuilt.py) per such key, and the general
        # path's steps where a step could not be captured.
        self.programs: dict[tuple, Callable[..., Env]] = {}
        # The backward recorded per key: as one Prebuilt where it could be, and each node's VJP (None: a
        # VJP that keeps the general path) for where it could not.
        self.backward_programs: dict[tuple, tuple[prebuilt.Prebuilt | None, dict[Node, tuple | None]]] = {}
        self.alias = _alias_classes(graph)
        # Batch polymorphism: the graph's IR shapes hold the nominal batch; a call reads its own from the
        # first user input that follows the batch, and every kernel keeps the tiles of the nominal batch.
        dyn = [i for i, v in enumerate(graph.inputs) if v.name in graph.dynamic]
        self.batch_input = dyn[0] if dyn else None
        self.nominal = graph.inputs[dyn[0]].type.shape[0] if dyn else None
        self._batches_checked = {self.nominal}

    def tiles_at(self, batch: int | None) -> Any:
        """Launch configs chosen as at the nominal batch while a call of another batch runs."""
        if batch is None or batch == self.nominal:
            return contextlib.nullcontext()
        return configs.nominal_batch(self.nominal, batch)

    def _batch_of(self, tensors: tuple[torch.Tensor, ...]) -> int | None:
        if self.batch_input is None:
            return None
        batch = tensors[self.batch_input].shape[0]
        if batch not in self._batches_checked:
            codegen.check_batch(self.graph, batch)
            self._batches_checked.add(batch)
        return batch

    def forward(self, tensors: tuple[torch.Tensor, ...]) -> Env:
        batch = self._batch_of(tensors)
        key = (batch, configs.target())
        with self.tiles_at(batch), _Counter(self.forward_seen, key) as counter:
            if counter.steady:  # nobody observes: the prebuilt launches, no labels, no per-launch bookkeeping
                env = self.programs[key](tensors, batch)
            else:
                env = Env(dict(zip(self.graph.inputs, tensors)), batch=batch, dynamic=self.graph.dynamic)
                if key in self.programs:  # observed: the general path, labelled
                    for step, label in zip(self.steps, self.labels):
                        with launch.tagged(label):
                            step.run(env)
                else:
                    self.programs[key] = self._record_forward(env, tensors)
        self.forward_counts = counter.counts
        if self.debug >= 2:
            log.warning("fusednn: forward launches:\n%s", summary(counter.counts))
        return env

    def steady_forward(self, tensors: tuple[torch.Tensor, ...]) -> tuple["_WholeForward", list, int | None] | None:
        """The steady state of `forward`: where a call at this batch recorded the whole forward and nothing
        observes launches, its prebuilt launches and nothing else (the counts as `_Counter` would keep
        them): (the whole forward, its results, the batch); else None."""
        batch = self._batch_of(tensors)
        key = (batch, configs.target())
        program = self.programs.get(key)
        if type(program) is _WholeForward and not launch._recorders and self.debug < 2 and key in self.forward_seen:
            self.forward_counts = self.forward_seen[key]
            return program, program.prebuilt.run(list(tensors)), batch
        return None

    def _record_forward(self, env: Env, tensors: tuple[torch.Tensor, ...]) -> Callable[..., Env]:
        """Run the forward's general path on env, recording it: the whole forward as one Prebuilt where it
        can be, else each step's where it can be (fusednn/prebuilt.py). Returns what later calls run."""
        runs = []
        with prebuilt.Capture(list(tensors)) as whole:
            for step, label in zip(self.steps, self.labels):
                if step.replayable:
                    runs.append(_recorded_step(step, label, env, self.alias))
                    continue
                with launch.tagged(label):
                    step.run(env)
                runs.append(step.run)
        keys = [v for v in dict.fromkeys((*self.saved_keys[0], *self.graph.outputs)) if v in env.values]
        extra = [k for k in self.saved_keys[1] if k in env.extra]
        pb = whole.build([env.values[v] for v in keys] + [env.extra[k] for k in extra])
        if pb is None:
            return _Program(self.graph, runs)
        return _WholeForward(pb, keys, extra, self.graph.dynamic, len(runs), self.saved_keys, self.graph.outputs)

    def _check(self, tensors: list[torch.Tensor]) -> None:
        for v, t in zip(self.graph.inputs, tensors):
            if t.is_floating_point() and t.dtype != v.type.dtype:
                raise InputMismatchError(
                    f"{v.kind} '{v.name}' is {t.dtype}, but this graph was compiled for {v.type.dtype}")

    def __call__(self, user: list[torch.Tensor], named: dict[str, torch.Tensor],
                 checked: bool = False) -> list[torch.Tensor]:
        """Run on the user's tensors and the live parameters/buffers by name; `checked`: the caller has
        seen these dtypes pass this check before (api._Guard), so it is skipped."""
        tensors = user + [named[n] for n in self._param_names]
        if not checked:
            self._check(tensors)
        return self.run_inputs(tensors, any(t.requires_grad for t in tensors))

    def run_inputs(self, tensors: list[torch.Tensor], requires_grad: bool) -> list[torch.Tensor]:
        """Run on the graph's inputs in order, their dtypes checked; requires_grad: whether any of them does."""
        if requires_grad and torch.is_grad_enabled():
            self.last_run = self
            return list(_GraphFunction.apply(self, *tensors))
        exe = self.inference_executable()
        self.last_run = exe
        steady = exe.steady_forward(tuple(tensors))
        if steady is not None:
            whole, out, _ = steady
            return [out[i] for i in whole.outputs_at]
        env = exe.forward(tuple(tensors))
        return [env.values[v] for v in exe.graph.outputs]

    def inference_executable(self) -> "TritonExecutable":
        """What calls autograd does not record run: the inference graph's executable, or this one."""
        if self._make_inference is not None:
            inf, self._make_inference = self._make_inference(), None
            if inf is not None:
                if [v.name for v in inf.graph.inputs] != [v.name for v in self.graph.inputs]:
                    raise CompileError("the inference graph's inputs differ from the training graph's")
                self._inference = inf
        return self._inference or self

    def apply(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the graph under autograd on all its inputs (user inputs, then parameters and buffers, in
        graph.inputs order), as a call does; tools use it to record a training step."""
        return _GraphFunction.apply(self, *tensors)

    def stats(self) -> dict:
        """Kernel groups, launches and bytes of the last call's forward (the inference executable's where
        that call ran it: "inference" says so) and of the last backward."""
        last = self.last_run
        kernels = [s.kernel.name for s in last.steps if s.kernel is not None]
        return {
            "groups": len(kernels),
            "kernels": kernels,
            "inference": last is not self,
            "forward": last.forward_counts.as_dict(),
            "backward": self.backward_counts.as_dict(),
        }


def _alias_classes(graph: Graph) -> dict[Value, Any]:
    """Each value's alias class: the value whose memory it is a view of on every call (a reshape's input's
    class, a counter's buffer's, a pool's indices' extra key), else itself. Reads of one class may overlap
    in a record (fusednn/prebuilt.py); a strict=False call or an empty node's torch result gets a class of
    its own even where it is a view: overlapping anything then refuses the record."""
    classes: dict[Value, Any] = {v: v for v in graph.inputs}
    for n in graph.nodes:
        family = REGISTRY[n.op].lower
        if family in ("reshape", "counter"):
            classes[n.out] = classes.get(n.inputs[0], n.inputs[0])
        elif family == "pool_indices":
            classes[n.out] = (n.inputs[1], "idx")
        else:
            classes[n.out] = n.out
    return classes


class _WholeForward:
    """A forward recorded as one Prebuilt: what it reads is the graph's inputs, what it hands back the
    values and extra tensors the backward reads and the outputs."""

    def __init__(self, pb: prebuilt.Prebuilt, keys: list, extra: list, dynamic: frozenset[str], steps: int,
                 saved: tuple[tuple, tuple], outputs: list[Value]) -> None:
        self.prebuilt, self.keys, self.extra, self.dynamic = pb, keys, extra, dynamic
        self.replayed = steps  # steps whose launches replay: all
        # Where in the results lie what the backward reads (`saved`: the executable's saved keys; those this
        # forward has, as `_GraphFunction.forward` saves them) and the graph's outputs.
        at = {k: i for i, k in enumerate(keys)}
        at.update((k, len(keys) + i) for i, k in enumerate(extra))
        self.saved_keys = ([v for v in saved[0] if v in at],  # extras only where a tensor, as the general path
                           [k for k in saved[1] if k in at and pb.results[at[k]] is not None])
        self.saved_at = [at[k] for k in (*self.saved_keys[0], *self.saved_keys[1])]
        self.outputs_at = [at[v] for v in outputs]

    def __call__(self, tensors: tuple[torch.Tensor, ...], batch: int | None) -> Env:
        out = self.prebuilt.run(list(tensors))
        nv = len(self.keys)
        return Env(dict(zip(self.keys, out)), dict(zip(self.extra, out[nv:])), batch, self.dynamic)


class _Program:
    """A forward run step by step: each step's Prebuilt where it has one, else its general path."""

    def __init__(self, graph: Graph, runs: list[Callable[[Env], None]]) -> None:
        self.graph, self.runs = graph, runs
        self.replayed = sum(hasattr(r, "prebuilt") for r in runs)  # steps whose launches replay

    def __call__(self, tensors: tuple[torch.Tensor, ...], batch: int | None) -> Env:
        env = Env(dict(zip(self.graph.inputs, tensors)), batch=batch, dynamic=self.graph.dynamic)
        for run in self.runs:
            run(env)
        return env


def _recorded_step(step: codegen.Step, label: str, env: Env, alias: dict[Value, Any]) -> Callable[[Env], None]:
    """Run a forward step on env, recording it: what later calls at this batch run instead of step.run."""
    before_values, before_extra = set(env.values), set(env.extra)
    # what the step reads: its node's inputs, and those of the nodes its kernel also implements (a counter)
    ins = list(dict.fromkeys(v for a in (*step.also, step.node) for v in a.inputs if v is not None))
    keys = [k for k in step.extra_reads if k in env.extra]
    reads = [env.values[v] for v in ins] + [env.extra[k] for k in keys]
    with launch.tagged(label), prebuilt.Capture(reads, [alias.get(v, v) for v in ins] + keys) as cap:
        step.run(env)
    values = [v for v in env.values if v not in before_values]
    extra = [k for k in env.extra if k not in before_extra]
    pb = cap.build([env.values[v] for v in values] + [env.extra[k] for k in extra])
    if pb is None:
        return step.run
    nv = len(values)

    def run(env: Env) -> None:
        vals = env.values
        out = pb.run([vals[v] for v in ins] + [env.extra[k] for k in keys])
        for v, t in zip(values, out):
            vals[v] = t
        if extra:
            env.extra.update(zip(extra, out[nv:]))

    run.prebuilt = pb  # type: ignore[attr-defined]
    return run


def _backward_reads(g: dict, saved: tuple, ints: dict) -> list:
    """What a whole backward reads: the output gradients (contiguous, as each VJP takes them), the saved
    tensors, and the numbers saved (a dropout's seed: a number read makes a capture refuse itself)."""
    return [d.contiguous() for d in g.values()] + list(saved) + list(ints.values())


def _read_keys(nodes: tuple[Node, ...], env: Env) -> list[tuple[bool, Any]]:
    """What the VJP of `nodes` (one node, or a batch norm and its conv) reads besides its output gradient:
    what their rules save that this call has, as (in env.extra, key); once per Value or key (not per
    tensor: two inputs one call passes the same tensor for must stay two reads)."""
    keys: dict[tuple[bool, Any], None] = {}
    for n in nodes:
        for s in autodiff.rule(n).saves(n):
            extra = isinstance(s, str)
            key = (n.out, s) if extra else s
            if (env.extra if extra else env.values).get(key) is not None:
                keys[(extra, key)] = None
    return list(keys)


def _recorder(programs: dict, alias: dict[Value, Any]) -> Callable[..., list]:
    """A BackwardPlan.run vjp that runs each VJP's general path and records it into `programs`."""
    def vjp(nodes: tuple[Node, ...], env: Env, dy: torch.Tensor, needs: list[bool], general: Callable[[], list],
            into: torch.Tensor | None) -> list:
        keys = _read_keys(nodes, env)
        added = [] if into is None else [into]  # the gradient the VJP adds into, its own alias class
        reads = [dy] + added + [(env.extra if extra else env.values)[k] for extra, k in keys]
        classes = [("gradient",)] + [("into",)] * len(added) + [k if extra else alias.get(k, k) for extra, k in keys]
        with prebuilt.Capture(reads, classes) as cap:
            outs = list(general())
        pb = cap.build(outs)
        programs[nodes] = None if pb is None else (pb, keys, into is not None)
        return outs

    return vjp


def _replayer(programs: dict) -> Callable[..., list]:
    """A BackwardPlan.run vjp that replays each recorded VJP (the general path where none was)."""
    def vjp(nodes: tuple[Node, ...], env: Env, dy: torch.Tensor, needs: list[bool], general: Callable[[], list],
            into: torch.Tensor | None) -> list:
        entry = programs.get(nodes)
        if entry is None or entry[2] != (into is not None):
            return general()
        pb, keys, _ = entry
        values, extras = env.values, env.extra
        return pb.run([dy] + ([] if into is None else [into]) + [(extras if extra else values)[k] for extra, k in keys])

    return vjp


class _Counter:
    """Count the launches of the block unless a call with the same key already did and nothing else
    observes launches now: the launches and bytes of a graph's forward (or backward) are fixed by the
    batch, the launch-config target and which gradients flow (bytes are measured once per launch site and
    batch: kernels/plan.py), so the steady state skips the per-launch bookkeeping. `counts` after the block;
    `steady` inside it when they are reused (and the recorded launches may replay)."""

    __slots__ = ("seen", "key", "counts", "steady", "_counting")

    def __init__(self, seen: dict[tuple, launch.LaunchCounts], key: tuple) -> None:
        self.seen, self.key = seen, key
        known = seen.get(key)
        self.steady = known is not None and not launch.observed()
        self.counts = known if self.steady else launch.LaunchCounts()
        self._counting: launch.counting | None = None

    def __enter__(self) -> "_Counter":
        if not self.steady:
            self._counting = launch.counting()
            self.counts = self._counting.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._counting is not None:
            self._counting.__exit__(*exc)
            if exc[0] is None:
                self.seen[self.key] = self.counts


def launch_stats(launches: list[launch.Launch]) -> dict:
    """Totals and a per-kernel breakdown of launches and bytes moved, of a recorded launch list."""
    counts = launch.LaunchCounts()
    for r in launches:
        counts.add(r)
    return counts.as_dict()


def summary(counts: launch.LaunchCounts) -> str:
    """A per-kernel table of launch counts (FUSEDNN_DEBUG=2)."""
    lines = [f"  {'kernel':<40} {'launches':>8} {'bytes':>12}"]
    for name, e in counts.per_kernel.items():
        lines.append(f"  {name:<40} {e['launches']:>8} {e['bytes']:>12}")
    return "\n".join(lines)
