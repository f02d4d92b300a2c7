"""The analytic minimum bytes of a step: what any schedule of kernels must move, from the traced graph.

The model (a lower bound under these rules, not a simulation):
- arithmetic and recomputation are free, and nothing stays on chip from one kernel to the next;
- a kernel reads each tensor it needs once and writes each tensor it makes once;
- per-channel statistics and sums are free (they are a few hundred bytes).

What forces traffic is the batch. A batch norm that normalizes with batch statistics (training, or no
running statistics) needs its whole input before it can normalize any element, so that input is a
*barrier*: it is written once, and read once by each kernel that consumes it. The user's inputs are
barriers too. Everything else is recomputed, inside the kernel that needs it, from the barriers it
depends on (its *sources*). Kernels are the groups of barriers (and graph outputs) computed from
overlapping sources, so that a source is read once per group.

Forward: each group reads its sources and parameters and writes what it makes.
Backward: each group reads its outputs' gradients (dO) and its sources (S), once, to recompute and
differentiate; with a batch norm inside, the batch norm's two gradient sums need all of that first, so
the group then reads S again (x̂) and either dO again or the batch norm's output gradient, written once
and read once (whichever is smaller). It writes its sources' gradients (k groups sharing a source:
k writes and k - 1 reads to add them) and its parameters' gradients, and reads its parameters.

In inference (no batch statistics) the whole network is one group: input, parameters, output. That bound
is reached only by one kernel per network; it says how far from the floor a schedule is, not that it
should be one kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

from fusednn.compiler.ir import Graph, Node, Value


def batch_statistics(n: Node) -> bool:
    """Whether a batch_norm node normalizes with its batch's statistics (a barrier on its input)."""
    return n.op == "batch_norm" and (bool(n.attrs["training"]) or n.inputs[1] is None)


def nbytes(v: Value) -> int:
    return v.type.numel * v.type.dtype.itemsize


@dataclass
class Group:
    """One kernel of the minimal schedule: what it reads, what it writes, its batch norms' outputs."""

    outputs: list[Value]
    sources: set[Value]
    params: set[Value]
    normalized: set[Value]  # outputs of the batch-statistics batch norms inside it


def groups(graph: Graph) -> list[Group]:
    """The minimal schedule's kernels, in graph order: barriers and graph outputs grouped by shared sources
    (never a group that reads what another of its outputs depends on)."""
    producer = {n.out: n for n in graph.nodes}
    barriers = {v for v in graph.inputs if v.kind == "input"}
    barriers |= {n.inputs[0] for n in graph.nodes if batch_statistics(n)}
    made = [v for v in dict.fromkeys([*(n.inputs[0] for n in graph.nodes if batch_statistics(n)), *graph.outputs])
            if v in producer]
    memo: dict[Value, tuple[frozenset, frozenset, frozenset]] = {}

    def reach(v: Value) -> tuple[frozenset, frozenset, frozenset]:
        """(sources, parameters, batch-norm outputs) the value v is recomputed from."""
        if v in memo:
            return memo[v]
        srcs, params, norm = set(), set(), set()
        n = producer[v]
        if batch_statistics(n):
            norm.add(v)
        for u in n.inputs:
            if u is None:
                continue
            if u.kind in ("param", "buffer"):
                params.add(u)
            elif u in barriers or u not in producer:
                srcs.add(u)
            else:
                s, p, b = reach(u)
                srcs |= s
                params |= p
                norm |= b
        memo[v] = (frozenset(srcs), frozenset(params), frozenset(norm))
        return memo[v]

    ancestors: dict[Value, set[Value]] = {}  # every barrier a made value depends on, through other barriers
    for v in made:
        s = reach(v)[0]
        ancestors[v] = set(s).union(*(ancestors.get(u, ()) for u in s))
    out: list[Group] = []
    for v in made:
        s, p, b = reach(v)
        g = next((g for g in out if g.sources & s and not (set(g.outputs) & ancestors[v])
                  and not any(v in ancestors[o] for o in g.outputs)), None)
        if g is None:
            out.append(Group([v], set(s), set(p), set(b)))
        else:
            g.outputs.append(v)
            g.sources |= s
            g.params |= p
            g.normalized |= b
    return out


def minimum_bytes(graph: Graph, train: bool = True, input_grads: bool = False) -> dict[str, int]:
    """{"forward", "backward"} bytes of the minimal schedule (module docstring); backward is 0 unless
    train. input_grads: whether the user's inputs need gradients."""
    gs = groups(graph)
    forward = sum(sum(map(nbytes, g.sources)) + sum(map(nbytes, g.params)) + sum(map(nbytes, g.outputs))
                  for g in gs)
    if not train:
        return {"forward": forward, "backward": 0}
    readers: dict[Value, int] = {}
    for g in gs:
        for s in g.sources:
            readers[s] = readers.get(s, 0) + 1
    backward = 0
    for g in gs:
        d_out, srcs = sum(map(nbytes, g.outputs)), sum(map(nbytes, g.sources))
        backward += d_out + srcs  # recompute and differentiate
        if g.normalized:  # after the batch norms' gradient sums: x̂ again, and dO again or their output gradient
            backward += srcs + min(d_out, 2 * sum(map(nbytes, g.normalized)))
        weights = [p for p in g.params if p.kind == "param"]
        backward += sum(map(nbytes, g.params)) + sum(map(nbytes, weights))
        backward += sum(nbytes(s) for s in g.sources if s.kind != "input" or input_grads)
    backward += sum((k - 1) * nbytes(s) for s, k in readers.items() if s.kind != "input" or input_grads)
    return {"forward": forward, "backward": backward}
