"""Graph passes: canonicalise, fuse, eliminate dead code. Each pass is Graph -> Graph (in place).

The pipeline is one readable list, `pipeline(fuse)`. Fusion rules are patterns over single-user chains
(after torch.fx's `fuse()`): a rule refuses to fuse when an intermediate value has another user or is a
graph output, since the fused kernel never writes the intermediate to memory.
"""
from __future__ import annotations

import logging
from typing import Callable

from fusednn.compiler.ir import Graph, Node, Value
from fusednn.compiler.ops import REGISTRY
from fusednn.kernels.activation import saves_input
from fusednn.kernels.conv_relu_pool import conv_saves_act

log = logging.getLogger("fusednn")

Pass = Callable[[Graph], Graph]



def _replace_uses(graph: Graph, old: Value, new: Value) -> None:
    for n in graph.nodes:
        if any(v is old for v in n.inputs):
            n.inputs = tuple(new if v is old else v for v in n.inputs)
    graph.outputs = [new if v is old else v for v in graph.outputs]


def canonicalize(graph: Graph) -> Graph:
    """Drop identity ops (eval-mode or p=0 dropout, reshape to the same shape); fold reshape chains."""
    keep: list[Node] = []
    producer: dict[Value, Node] = {}
    for n in graph.nodes:
        x = n.inputs[0] if n.inputs else None
        identity = (n.op in ("dropout", "dropout2d") and (not n.attrs["training"] or n.attrs["p"] == 0.0)) or (
            n.op == "reshape" and x is not None and x.type.shape == n.out.type.shape)
        if identity and x is not None and n.out not in graph.outputs:
            _replace_uses(graph, n.out, x)
            continue
        if n.op == "reshape" and x in producer and producer[x].op == "reshape":
            n.inputs = (producer[x].inputs[0],)
        keep.append(n)
        producer[n.out] = n
    graph.nodes = keep
    return dce(graph)


def _has_side_effects(n: Node) -> bool:
    if REGISTRY[n.op].side_effect:
        return True
    if n.op == "instance_norm":  # running statistics updated in training
        return n.attrs["use_input_stats"] and n.inputs[1] is not None
    return n.op in ("batch_norm", "batch_norm_act") and n.attrs["training"] and n.inputs[1] is not None


def dce(graph: Graph) -> Graph:
    """Remove nodes whose results nothing reads (side-effecting nodes stay)."""
    live = set(graph.outputs)
    kept: list[Node] = []
    for n in reversed(graph.nodes):
        if n.out in live or _has_side_effects(n):
            kept.append(n)
            live.update(v for v in n.inputs if v is not None)
    graph.nodes = kept[::-1]
    return graph


# -- fusion ---------------------------------------------------------------------------------------------
def _sole_user(graph: Graph, v: Value, users: dict) -> Node | None:
    """The only node reading v, or None when v has several users or is a graph output."""
    us = users.get(v, [])
    return us[0] if len(us) == 1 and us[0] is not None else None


def _epilogue_act(n: Node | None) -> bool:
    """An activation a conv/linear epilogue can apply: monotone non-decreasing (the registry's `epilogue`
    trait; leaky_relu only with a non-negative slope), so act(max z) = max act(z) and the backward can read
    act' from the pooled output."""
    if n is None or not REGISTRY[n.op].epilogue:
        return False
    return n.op != "leaky_relu" or n.attrs["negative_slope"] >= 0.0


def fusable_pool(n: Node | None) -> bool:
    """A pool the conv template reduces in its epilogue: square, non-overlapping, unpadded, floor mode."""
    if n is None or n.op not in ("max_pool2d", "avg_pool2d") or n.attrs.get("indices"):
        return False  # a pool whose indices are read writes its int64 argmax itself
    a = n.attrs
    k = a["kernel"]
    ok = k[0] == k[1] and tuple(a["stride"]) == tuple(k) and tuple(a["padding"]) == (0, 0) and not a["ceil_mode"]
    if n.op == "max_pool2d":
        ok = ok and tuple(a["dilation"]) == (1, 1)
    else:
        ok = ok and a["divisor_override"] is None
    return ok and k[0] <= 15  # the window offset must fit the 1-byte argmax


def _input_act(n: Node | None) -> str | None:
    """The kernel activation a conv or linear epilogue applies although its output cannot give act' (GELU,
    SiLU, Mish, Hardswish, ...: kernels/activation.SAVES reads their input; no parameters): the training
    forward then also saves the GEMM's result before the activation for the backward (`saves_input`); None
    if n is no such activation."""
    if n is None or REGISTRY[n.op].kernel_act is None:
        return None
    kind, params = REGISTRY[n.op].kernel_act(n.attrs)
    return kind if saves_input(kind) and not params else None


def _fuse_chain(graph: Graph, head: Node, stem: str, users: dict, allow_pool: bool) -> Node | None:
    """Grow head -> [act] -> [pool] along sole users; return the fused node or None when nothing fuses.
    The activation may be one the backward reads from the GEMM's result (`_input_act`), then with no max
    pool after it (the argmax's act' would need the result at the argmax)."""
    chain = [head]
    nxt = _sole_user(graph, head.out, users)
    act = None
    kind = _input_act(nxt)
    if _epilogue_act(nxt) or kind is not None:
        act = nxt
        chain.append(nxt)
        nxt = _sole_user(graph, nxt.out, users)
    pool = None
    if allow_pool and fusable_pool(nxt) and (kind is None or nxt.op == "avg_pool2d"):
        pool = nxt
        chain.append(nxt)
    if len(chain) == 1:
        return None
    attrs = dict(head.attrs)
    attrs["act"] = kind or (act.op if act else "none")
    if act is not None and act.op == "leaky_relu":
        attrs["act_param"] = act.attrs["negative_slope"]
    if pool is not None:
        attrs["pool"] = "max" if pool.op == "max_pool2d" else "avg"
        attrs["pool_k"] = pool.attrs["kernel"][0]
    tag = ["bias"] if head.inputs[2] is not None else []
    if act is not None:
        tag.append(act.op)
    if pool is not None:
        tag.append(f"{pool.op}({pool.attrs['kernel'][0]},{pool.attrs['stride'][0]})")
    return Node(stem, head.inputs, attrs, chain[-1].out, module=head.module, source=head.source,
                absorbed=tuple(chain), tag=",".join(tag))


def fuse(graph: Graph, inference: bool = False) -> Graph:
    """conv2d -> [act] -> [pool] becomes conv_relu_pool; linear -> [act] becomes linear_relu. A linear whose
    activation's act' needs its input saves its result for the backward (attr save_input), except in an
    inference graph (`fuse_inference`)."""
    users = graph.users()
    absorbed: set[int] = set()
    out: list[Node] = []
    for n in graph.nodes:
        if id(n) in absorbed:
            continue
        fused = None
        if n.op == "conv2d":
            fused = _fuse_chain(graph, n, "conv_relu_pool", users, allow_pool=True)
        elif n.op == "linear":
            fused = _fuse_chain(graph, n, "linear_relu", users, allow_pool=False)
            if fused is not None and saves_input(fused.attrs["act"]):
                fused.attrs["save_input"] = not inference
        if fused is not None:
            absorbed.update(id(a) for a in fused.absorbed)
            out.append(fused)
        else:
            out.append(n)
    graph.nodes = out
    return graph


def fuse_inference(graph: Graph) -> Graph:
    """`fuse` for inference graphs (calls autograd does not record): nothing is saved for a backward."""
    return fuse(graph, inference=True)


def _inference_bn(n: Node | None, x: Value) -> bool:
    """A batch norm of x that normalises with its running statistics (eval mode, statistics tracked):
    a per-channel affine map a conv epilogue can apply."""
    return (n is not None and n.op == "batch_norm" and not n.attrs["training"] and n.inputs[0] is x
            and n.inputs[1] is not None and n.inputs[2] is not None)


def _residual(n: Node | None, x: Value) -> Value | None:
    """The other operand when n is `x + other` with other of x's shape and dtype (no broadcast, no alpha)."""
    if n is None or n.op != "add" or len(n.inputs) != 2 or n.inputs[1] is None or n.attrs.get("alpha", 1) != 1:
        return None
    a, b = n.inputs
    other = b if a is x else a if b is x else None
    if other is None or other is x or other.type != x.type:
        return None
    return other


def _kernel_act(n: Node | None, x: Value) -> bool:
    """An activation of x alone that a kernel formula computes (kernels/activation.py): any, where no
    backward reads the result."""
    return n is not None and REGISTRY[n.op].kernel_act is not None and n.inputs == (x,)


def fuse_conv_inference(graph: Graph) -> Graph:
    """Inference graphs only: a conv2d and the per-channel and elementwise work after it become one
    conv_infer node, a conv whose epilogue does the rest on the accumulator:

        conv2d -> [batch_norm] -> [+ residual] -> [activation] -> [pool]
        conv2d -> pool -> batch_norm -> [activation]                      (airbench's order)

    where the batch norm uses its running statistics (eval mode), the epilogue computes its per-channel
    scale and shift from the live statistics and affine parameters on every call (nothing is folded into
    the weights or copied), the residual is any value of the same shape (read once), the activation any
    kernel formula and the pool a non-overlapping one. A chain `fuse` would make the same
    (conv -> [relu-like act] -> [pool]) is left to it.

    Only for calls autograd does not record (the runtime's inference executable): the node has no
    backward. It runs where its last absorbed node ran, so the residual is computed before it.
    """
    users = graph.users()
    absorbed: set[int] = set()
    fused_at: dict[int, Node] = {}  # id(last absorbed node) -> the fused node that replaces the chain

    def user(v: Value) -> Node | None:
        n = _sole_user(graph, v, users)
        return None if n is None or id(n) in absorbed else n

    for head in graph.nodes:
        if head.op != "conv2d" or id(head) in absorbed:
            continue
        chain = [head]
        bn = pool = act = None
        residual = None
        nxt = user(head.out)
        if fusable_pool(nxt) and _inference_bn(user(nxt.out), nxt.out):
            pool, bn = nxt, user(nxt.out)
            chain += [pool, bn]
            nxt = user(bn.out)
        else:
            if _inference_bn(nxt, head.out):
                bn = nxt
                chain.append(bn)
                nxt = user(bn.out)
            residual = _residual(nxt, chain[-1].out)
            if residual is not None:
                chain.append(nxt)
                nxt = user(nxt.out)
        if _kernel_act(nxt, chain[-1].out):
            act = nxt
            chain.append(act)
            nxt = user(act.out)
        if pool is None and fusable_pool(nxt):
            pool = nxt
            chain.append(pool)
        if bn is None and residual is None and (act is None or _epilogue_act(act)):
            continue  # conv -> [act] -> [pool]: conv_relu_pool (`fuse`)
        kind, params = REGISTRY[act.op].kernel_act(act.attrs) if act is not None else ("none", ())
        attrs = dict(head.attrs, residual=residual is not None, act=kind, act_params=tuple(params),
                     pool="none", pool_k=1,
                     bn_after_pool=pool is not None and bn is not None and chain.index(pool) < chain.index(bn))
        if bn is not None:
            attrs["bn_eps"] = bn.attrs["eps"]
        if pool is not None:
            attrs["pool"] = "max" if pool.op == "max_pool2d" else "avg"
            attrs["pool_k"] = pool.attrs["kernel"][0]
        bn_inputs = list(bn.inputs[1:5]) if bn is not None else [None] * 4  # running mean, var, weight, bias
        inputs = (*head.inputs, *bn_inputs, residual)
        tag = ["bias"] if head.inputs[2] is not None else []
        for a in chain[1:]:
            tag.append(f"{a.op}({a.attrs['kernel'][0]},{a.attrs['stride'][0]})" if a is pool else a.op)
        absorbed.update(id(a) for a in chain)
        fused_at[id(chain[-1])] = Node("conv_infer", inputs, attrs, chain[-1].out, module=head.module,
                                       source=head.source, absorbed=tuple(chain), tag=",".join(tag))
    graph.nodes = [fused_at.get(id(n), n) for n in graph.nodes if id(n) not in absorbed or id(n) in fused_at]
    return graph


def fuse_batch_norm(graph: Graph) -> Graph:
    """A batch norm and the elementwise work after it become one batch_norm_act node, whose normalise pass
    applies the rest in registers (compiler/templates/batch_norm.py):

        batch_norm -> [+ residual] -> [activation]      (at least one of the two)

    with batch or running statistics, the residual any value of the same shape and dtype (read once) and the
    activation any kernel formula of kernels/activation.py. The backward (kernels/batch_norm.py) recomputes
    what act' needs from what the forward saved, so no intermediate is written.

    The node runs where its last absorbed node ran (the residual is computed before it). A batch norm is
    not moved past another node with side effects (two calls of one BatchNorm module update the same
    running statistics, in order) or one that reads the running statistics it updates.
    """
    users = graph.users()
    pos = {id(n): i for i, n in enumerate(graph.nodes)}
    absorbed: set[int] = set()
    fused_at: dict[int, Node] = {}

    def user(v: Value) -> Node | None:
        n = _sole_user(graph, v, users)
        return None if n is None or id(n) in absorbed else n

    for bn in graph.nodes:
        if bn.op != "batch_norm" or id(bn) in absorbed:
            continue
        chain = [bn]
        nxt = user(bn.out)
        residual = _residual(nxt, bn.out)
        if residual is not None:
            chain.append(nxt)
            nxt = user(nxt.out)
        act = nxt if _kernel_act(nxt, chain[-1].out) else None
        if act is not None:
            chain.append(act)
        between = graph.nodes[pos[id(bn)] + 1:pos[id(chain[-1])]]
        state = {v for v in bn.inputs[1:3] + bn.inputs[5:] if v is not None}  # what the update writes
        for n in graph.nodes[:pos[id(chain[-1])]]:  # and the views of it, which alias it
            if REGISTRY[n.op].kind == "view" and n.inputs[0] in state:
                state.add(n.out)
        if len(chain) == 1 or any(_has_side_effects(n) or state.intersection(n.inputs) for n in between):
            continue
        kind, params = REGISTRY[act.op].kernel_act(act.attrs) if act is not None else ("none", ())
        counter = bn.inputs[5] if len(bn.inputs) > 5 else None
        attrs = dict(bn.attrs, act=kind, act_params=tuple(params), residual=residual is not None)
        absorbed.update(id(a) for a in chain)
        fused_at[id(chain[-1])] = Node("batch_norm_act", (*bn.inputs[:5], counter, residual), attrs, chain[-1].out,
                                       module=bn.module, source=bn.source, absorbed=tuple(chain),
                                       tag=",".join(a.op for a in chain[1:]))
    graph.nodes = [fused_at.get(id(n), n) for n in graph.nodes if id(n) not in absorbed or id(n) in fused_at]
    return graph


def conv_batch_stats(graph: Graph) -> Graph:
    """A batch norm normalising a conv's output with batch statistics takes them from the conv: the conv's
    epilogue writes per-tile partial statistics of what it stores (attr stats, compiler/templates/conv.py)
    and the batch norm combines those instead of walking x (attr conv_stats, templates/batch_norm.py), so
    its own grid splits the rows. Runs after `fuse`: the conv's stored output (after a fused activation or
    pool) is what the batch norm reads. Not for a conv that also saves its activation (avg pool after an
    activation), nor an unbatched one."""
    producer = {n.out: n for n in graph.nodes}
    for bn in graph.nodes:
        if bn.op not in ("batch_norm", "batch_norm_act") or not (bn.attrs["training"] or bn.inputs[1] is None):
            continue
        conv = producer.get(bn.inputs[0])
        if conv is None or conv.op not in ("conv2d", "conv_relu_pool") or len(conv.out.type.shape) != 4:
            continue
        if conv_saves_act(conv.attrs.get("act", "none"), conv.attrs.get("pool", "none")):
            continue
        conv.attrs = dict(conv.attrs, stats=True)
        bn.attrs = dict(bn.attrs, conv_stats=True)
    return graph


def fuse_pointwise(graph: Graph) -> Graph:
    """Elementwise nodes fuse into `pointwise` groups: a node whose result only one elementwise node of the
    same shape reads joins that node's group, so a group is a tree of nodes (a gate `tanh(a + b) * sigmoid(c)`
    is one group). Its external inputs may be broadcast; its computed values all have the result's shape.

    The group runs where its last node (the root) ran: every external input of a member is defined before
    that member, hence before the root. It writes only its result and the intermediates the backward reads.
    """
    users = graph.users()
    root_of: dict[int, Node] = {}
    members: dict[int, list[Node]] = {}
    for n in reversed(graph.nodes):  # a user is visited before the nodes it reads
        if not REGISTRY[n.op].elementwise:
            continue
        u = _sole_user(graph, n.out, users)
        joins = u is not None and REGISTRY[u.op].elementwise and u.out.type.shape == n.out.type.shape
        root = root_of[id(u)] if joins else n
        root_of[id(n)] = root
        members.setdefault(id(root), []).append(n)
    out: list[Node] = []
    for n in graph.nodes:
        group = members.get(id(n), [])
        if len(group) > 1:
            group = group[::-1]  # execution order
            inside = {a.out for a in group}
            ins: list[Value] = []  # each external value once: the group's VJP returns one gradient per input
            for a in group:
                for v in a.inputs:
                    if v is not None and v not in inside and v not in ins:
                        ins.append(v)
            out.append(Node("pointwise", tuple(ins), {}, n.out, module=group[0].module, source=group[0].source,
                            absorbed=tuple(group), tag=",".join(a.op for a in group)))
        elif id(n) not in root_of or root_of[id(n)] is n:
            out.append(n)
    graph.nodes = out
    return graph


def pipeline(fuse_ops: bool, inference: bool = False) -> list[Pass]:
    """The pass list a compile runs, in order; `inference`: for calls autograd does not record (eval-mode
    batch norms, residual adds and any activation fold into the conv before them). Batch norms left
    (training ones, and those after no conv) take the residual add and activation after them."""
    if not fuse_ops:
        return [canonicalize, dce]
    return [canonicalize, *([fuse_conv_inference] if inference else []), fuse_batch_norm,
            fuse_inference if inference else fuse, conv_batch_stats, fuse_pointwise, dce]


def run(graph: Graph, passes: list[Pass], debug: bool = False) -> Graph:
    """Run passes in order; FUSEDNN_DEBUG>=1 logs the IR after each."""
    for p in passes:
        graph = p(graph)
        if debug:
            log.warning("fusednn: IR after %s:\n%s", p.__name__, graph)
    return graph
