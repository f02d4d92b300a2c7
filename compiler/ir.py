"""fusednn's IR: a Graph of SSA Nodes, every value typed with dtype and shape.

Graph inputs are the user's inputs followed by the parameters and buffers the graph reads, under their
qualified names (`conv1.weight`). Each Node is one op of the registry in `ops.py`; after fusion a Node may
stand for a group of original nodes (`absorbed`), printed beneath it as a comment. The text form is
documented in docs/IR.md:

    graph Net(%x: f32[64,1,32,32], %conv1.weight: f32[6,1,5,5], ...) {
      %1 = conv2d(%x, %conv1.weight, %conv1.bias, stride=[1,1], padding=[0,0], dilation=[1,1], groups=1) : f32[64,6,28,28]  # conv1
      ...
      return %9
    }
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPE_NAMES = {
    torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short dtype name used in the IR text (f32, i64, ...)."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


@dataclass(frozen=True, slots=True)
class TensorType:
    """The static type of an IR value: shape and dtype (the device is part of the compile signature)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def __str__(self) -> str:
        return f"{dtype_name(self.dtype)}[{','.join(str(s) for s in self.shape)}]"

    def format(self, batch: bool = False) -> str:
        """batch=True marks dim 0 as the batch of a batch-polymorphic graph: f32[N=8,6,28,28]."""
        if not batch or not self.shape:
            return str(self)
        return f"{dtype_name(self.dtype)}[N={','.join(str(s) for s in self.shape)}]"


@dataclass(eq=False, slots=True)
class Value:
    """One SSA value. kind: "input" (a user input), "param", "buffer", or "node" (an op's result)."""

    name: str
    type: TensorType
    kind: str = "node"

    def __str__(self) -> str:
        return f"%{self.name}"


@dataclass(eq=False, slots=True)
class Node:
    """One op application. `inputs` may hold None for an absent optional tensor (a conv without bias).

    module: the qualified module path the op ran in (`conv1`, `features.0`; "" at the top level).
    source: the user's file:line of the call. absorbed: for a fused node, the original nodes it replaced.
    """

    op: str
    inputs: tuple[Value | None, ...]
    attrs: dict[str, Any]
    out: Value
    module: str = ""
    source: str = ""
    absorbed: tuple["Node", ...] = ()
    tag: str = ""  # e.g. "bias,relu,max_pool2d(2,2)" for a fused node, printed as op[tag]

    def label(self) -> str:
        """`%3 max_pool2d`: how generated code and comments name this node."""
        return f"%{self.out.name} {self.op}"

    def format(self, locations: bool = False, dynamic: frozenset[str] = frozenset()) -> str:
        """One line of IR text; values named in `dynamic` print their dim 0 as the batch (N=...)."""
        args = [("None" if v is None else str(v)) for v in self.inputs]
        batched = self.out.name in dynamic
        args += [f"{k}={format_attr(('N', *v[1:]) if batched and k == 'shape' else v)}" for k, v in self.attrs.items()]
        op = f"{self.op}[{self.tag}]" if self.tag else self.op
        line = f"{self.out} = {op}({', '.join(args)}) : {self.out.type.format(batched)}"
        where = [w for w in (self.module, self.source if locations else "") if w]
        if where:
            line += "  # " + " ".join(where)
        return line


def format_attr(v: Any) -> str:
    """Attribute values in the IR text: tuples as [a,b], floats as repr, strings bare."""
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(format_attr(x) for x in v) + "]"
    if isinstance(v, torch.dtype):
        return dtype_name(v)
    return str(v)


@dataclass(eq=False)
class Graph:
    """A traced (or transformed) model: inputs, nodes in execution order, outputs.

    out_spec: the pytree spec that rebuilds the user's output structure from `outputs`.
    """

    name: str
    inputs: list[Value]
    nodes: list[Node]
    outputs: list[Value]
    out_spec: Any = None
    meta: dict[str, Any] = field(default_factory=dict)
    # Batch polymorphism (fusednn/batch.py): the names of the values whose dim 0 is the batch, when one
    # compiled graph serves every batch size; empty when the batch is fixed. Their IR shapes hold the
    # batch the graph was traced at.
    dynamic: frozenset[str] = frozenset()

    # -- queries -----------------------------------------------------------------------------
    def users(self) -> dict[Value, list[Node]]:
        """Map each value to the nodes that read it (graph outputs count as a user `None`)."""
        use: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for v in n.inputs:
                if v is not None:
                    use.setdefault(v, []).append(n)
        for v in self.outputs:
            use.setdefault(v, []).append(None)  # type: ignore[arg-type]
        return use

    def input(self, name: str) -> Value:
        for v in self.inputs:
            if v.name == name:
                return v
        raise KeyError(name)

    @property
    def user_inputs(self) -> list[Value]:
        return [v for v in self.inputs if v.kind == "input"]

    # -- text -------------------------------------------------------------------------------
    def format(self, locations: bool = False, batch: bool = False) -> str:
        """The stable text form (docs/IR.md); locations=True adds each node's file:line; batch=True marks
        the dims that follow the batch in a batch-polymorphic graph (`f32[N=8,6,28,28]`)."""
        dyn = self.dynamic if batch else frozenset()
        head = ", ".join(f"{v}: {v.type.format(v.name in dyn)}" for v in self.inputs)
        lines = [f"graph {self.name}({head}) {{"]
        for n in self.nodes:
            lines.append("  " + n.format(locations, dyn))
            if n.absorbed:
                parts = []
                for a in n.absorbed:
                    parts.append(a.label() + (f" ({a.module})" if a.module else ""))
                lines.append("      # " + ", ".join(parts))
        lines.append("  return " + ", ".join(str(v) for v in self.outputs))
        lines.append("}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def to_dot(self) -> str:
        """Graphviz source: one box per node (fused nodes list what they absorbed), edges by value."""
        q = lambda s: '"' + s.replace('"', r"\"") + '"'  # noqa: E731
        lines = [f"digraph {q(self.name)} {{", "  rankdir=TB;", '  node [fontname="monospace", fontsize=10];']
        for v in self.inputs:
            shape = "ellipse" if v.kind == "input" else "note"
            lines.append(f"  {q('v_' + v.name)} [label={q(f'%{v.name}' + chr(10) + str(v.type))}, shape={shape}];")
        for n in self.nodes:
            text = f"%{n.out.name} = {n.op}" + (f"[{n.tag}]" if n.tag else "") + "\n" + str(n.out.type)
            if n.absorbed:
                text += "\n" + ", ".join(a.label() for a in n.absorbed)
            color = ', style=filled, fillcolor="#dbeafe"' if n.absorbed else ""
            lines.append(f"  {q('v_' + n.out.name)} [label={q(text)}, shape=box{color}];")
            for v in n.inputs:
                if v is not None:
                    lines.append(f"  {q('v_' + v.name)} -> {q('v_' + n.out.name)};")
        for i, v in enumerate(self.outputs):
            lines.append(f"  {q('out' + str(i))} [label={q('output ' + str(i))}, shape=plaintext];")
            lines.append(f"  {q('v_' + v.name)} -> {q('out' + str(i))};")
        lines.append("}")
        return "\n".join(lines) + "\n"


def topo_check(graph: Graph) -> None:
    """Assert every node reads only values defined before it (passes call this in tests)."""
    defined = set(graph.inputs)
    for n in graph.nodes:
        for v in n.inputs:
            assert v is None or v in defined, f"{n.format()} reads {v} before it is defined"
        defined.add(n.out)
    for v in graph.outputs:
        assert v in defined, f"output {v} is never defined"



@dataclass
class Env:
    """The tensors of one call of a compiled graph: values by IR Value, and the extra tensors/ints a
    backward needs by (value, key) (a pool's argmax "idx", a cross-entropy's "lse", a dropout "seed")."""

    values: dict[Value, torch.Tensor] = field(default_factory=dict)
    extra: dict[tuple[Value, str], Any] = field(default_factory=dict)
    batch: int | None = None  # this call's batch, when the graph is batch-polymorphic
    dynamic: frozenset[str] = frozenset()  # Graph.dynamic

    def shape(self, v: Value) -> tuple[int, ...]:
        """v's shape in this call: its IR shape, with dim 0 this call's batch where v follows the batch."""
        if self.batch is None or v.name not in self.dynamic:
            return v.type.shape
        return (self.batch,) + v.type.shape[1:]
