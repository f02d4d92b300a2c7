"""backend="reference": run the IR with the ops registry's torch implementations (for checking).

Gradients flow through torch autograd of the reference ops, so this backend is the yardstick the
Triton backend is compared against: it must match torch eager bit for bit.
"""
from __future__ import annotations

import torch

from fusednn.compiler.ir import Graph, Node, Value
from fusednn.compiler.ops import REGISTRY


def run_node(n: Node, env: dict[Value, torch.Tensor]) -> torch.Tensor:
    """Evaluate one node (a fused node runs the nodes it absorbed, in order) with the torch references."""
    for a in n.absorbed or (n,):
        env[a.out] = REGISTRY[a.op].ref([None if v is None else env[v] for v in a.inputs], a.attrs)
    return env[n.out]


class ReferenceExecutable:
    """Evaluates a Graph node by node with torch ops."""

    def __init__(self, graph: Graph) -> None:
        self.graph = graph

    def __call__(self, user: list[torch.Tensor], named: dict[str, torch.Tensor],
                 checked: bool = False) -> list[torch.Tensor]:
        env: dict[Value, torch.Tensor] = dict(zip(self.graph.user_inputs, user))
        for v in self.graph.inputs:
            if v.kind != "input":
                env[v] = named[v.name]
        for n in self.graph.nodes:
            run_node(n, env)
        return [env[v] for v in self.graph.outputs]

    def stats(self) -> dict:
        return {"backend": "reference", "groups": len(self.graph.nodes)}
