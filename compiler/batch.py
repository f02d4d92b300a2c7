"""Batch polymorphism: which values of a graph have the batch as dim 0, so one compiled graph serves
every batch size.

The tracer sees concrete shapes, so a graph traced at batch 8 has an 8 wherever the batch went. Tracing
the same function again at other batch sizes (on meta tensors: cheap, nothing computed) and comparing the
graphs tells which 8s were the batch: a value whose dim 0 is the batch in every trace, with everything
else equal, is *dynamic in dim 0*. If anything else differs between the traces (`x.view(-1)` folds the
batch into another dim, a reshape's target changes otherwise, a Python branch on the batch size picks
other ops), the graph is not polymorphic and the batch stays in the specialisation key.

What two traces cannot show, codegen must refuse: a kernel that reduces along dim 0 with its length as a
constexpr (softmax over dim 0, cross-entropy of one unbatched row). `polymorphic` checks those per node.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from fusednn.compiler.ir import Graph, Node, Value
from fusednn.compiler.ops import EagerCall


def batch_of(args: tuple) -> tuple[int, tuple[int, ...]]:
    """(batch, positions): dim 0 of the first tensor argument with a dim, and the positions of the tensor
    arguments whose dim 0 equals it (those are traced again at other batch sizes); (0, ()) if none."""
    batch = next((a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0), None)
    if batch is None:
        return 0, ()
    return batch, tuple(i for i, a in enumerate(args)
                        if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch)


def at_batch(args: tuple, positions: tuple[int, ...], n: int) -> tuple:
    """The arguments with dim 0 of those at `positions` set to n, as meta tensors (tracing reads only
    shapes and dtypes)."""
    out = list(args)
    for i in positions:
        a = args[i]
        out[i] = torch.empty((n, *a.shape[1:]), dtype=a.dtype, device="meta").requires_grad_(a.requires_grad)
    return tuple(out)


def _values(g: Graph) -> list[Value]:
    vals = list(g.inputs)
    for n in g.nodes:
        vals += [a.out for a in n.absorbed] + [n.out]
    return vals + list(g.outputs)


def _attrs(n: Node) -> dict[str, Any]:
    """A node's attributes in comparable form; a reshape's target shape is its output type (compared as a
    value), an eager call compares by function, argument layout and captured arguments."""
    out = {}
    for k, v in n.attrs.items():
        if n.op == "reshape" and k == "shape" and tuple(v) == n.out.type.shape:
            continue
        if isinstance(v, EagerCall):  # which function, and each argument in its place (keyword or position)
            v = (v.fn, v.name, str(v.spec), repr(v.leaves), v.slots)
        elif callable(v):
            v = getattr(v, "__qualname__", repr(v))
        out[k] = v
    return out


def _nodes(g: Graph) -> list[tuple]:
    """Everything about each node except its output type, in order (absorbed nodes included)."""
    rows = []
    for n in g.nodes:
        for a in (*n.absorbed, n):
            rows.append((a.op, a.tag, a.module, tuple(None if v is None else v.name for v in a.inputs),
                         a.out.name, _attrs(a)))
    return rows


def dynamic_values(graphs: list[tuple[int, Graph]]) -> frozenset[str] | None:
    """Given one function's graphs traced at distinct batch sizes [(batch, graph), ...], the names of the
    values whose dim 0 is the batch in every graph, or None when the graphs differ in anything else."""
    structure = [(g.name, [v.name for v in g.inputs], [v.name for v in g.outputs], _nodes(g), str(g.out_spec))
                 for _, g in graphs]
    if any(s != structure[0] for s in structure[1:]):
        return None
    dynamic = set()
    columns = zip(*[_values(g) for _, g in graphs])
    for vs in columns:
        types = [v.type for v in vs]
        if any(t.dtype != types[0].dtype or len(t.shape) != len(types[0].shape) for t in types):
            return None
        if all(t.shape == types[0].shape for t in types):
            continue
        if all(t.shape and t.shape[0] == b and t.shape[1:] == types[0].shape[1:]
               for (b, _), t in zip(graphs, types)):
            dynamic.add(vs[0].name)
            continue
        return None
    return frozenset(dynamic)


def _refuses(n: Node, dynamic: frozenset[str]) -> bool:
    """A node whose kernel would take the batch as a constexpr length: it reduces along dim 0."""
    x = n.inputs[0] if n.inputs else None
    if x is None or x.name not in dynamic:
        return False
    if n.op in ("softmax", "log_softmax"):
        return n.attrs["dim"] % len(x.type.shape) == 0
    if n.op in ("cross_entropy", "nll_loss"):
        return len(x.type.shape) == 1  # [C] logits: dim 0 holds the classes
    return False


def polymorphic(build: Callable[[int], Graph], batches: list[int]) -> frozenset[str] | None:
    """The dynamic values of the graphs `build(b)` makes at each batch b (the first one is the graph that
    is compiled), or None when they do not follow the batch alone, a trace fails, or a node would need
    the batch as a constexpr."""
    graphs = []
    for b in batches:
        try:
            graphs.append((b, build(b)))
        except Exception:  # noqa: BLE001 - a function that cannot run at this batch is not polymorphic
            return None
    dynamic = dynamic_values(graphs)
    if dynamic is None:
        return None
    for n in graphs[0][1].nodes:
        if any(_refuses(a, dynamic) for a in (*n.absorbed, n)):
            return None
    return dynamic
