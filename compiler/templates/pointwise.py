"""Template: a group of elementwise ops (activations, neg, prelu, add/mul/sub) fused into one 1-D Triton kernel.

Every value computed in the group has `numel` elements. An input may be smaller and broadcast under
torch's rules: it is read through its own index expression (`broadcast_index`, e.g. `(offs // 64) % 16`
for a [16, 1, 1] operand of an [N, 16, 8, 8] result), so a broadcast operand is never expanded in memory;
prelu weights (`channels` elements over an [outer, channels, inner] view) likewise. Each step becomes one
line named after its IR value, under its label comment; only `spec.outputs` are written to memory.
Backward: kernels/activation.py, kernels/broadcast.py (the gradient of a broadcast operand).
"""
from __future__ import annotations

import keyword
import math
from dataclasses import dataclass

from fusednn.compiler.source import Source
from fusednn.kernels.activation import NPARAMS, SAVES

# Activations: `_<op>(x, *params)` from kernels/activation.py; neg is written `-x`.
UNARY = tuple(SAVES)
BINARY = ("add", "mul", "sub")
OPS = UNARY + BINARY + ("prelu",)

_SYMBOL = {"add": "+", "mul": "*", "sub": "-"}
_HELPERS = tuple(f"_{a}" for a in UNARY if a != "neg")
# Names the generated kernel and launcher use themselves; IR values must not shadow them.
_RESERVED = {"pid", "offs", "mask", "numel", "nbytes", "BLOCK", "meta", "tl", "triton", *_HELPERS, "_configs", "_launch",
             "launch"}


@dataclass(frozen=True, slots=True)
class PwStep:
    """One elementwise op: `out = op(*args)`.

    Args:
        label: the IR node's label comment, e.g. "%4 relu".
        out: the value's name (a Python identifier), e.g. "v4".
        op: one of OPS.
        args: value names (str) or Python float scalars; prelu takes (x, weight input name).
        param: an activation's parameters, NPARAMS[op] floats in its helper's order (a float for one:
            leaky_relu's negative slope; elu: (alpha, scale, input_scale); hardtanh: (lo, hi); ...).
        channels, inner: prelu's weight layout: element i uses weight[(i // inner) % channels].
    """

    label: str
    out: str
    op: str
    args: tuple
    param: float | tuple[float, ...] = 0.0
    channels: int = 1
    inner: int = 1


@dataclass(frozen=True, slots=True)
class PointwiseSpec:
    """A fused elementwise group: launch(*inputs, *outputs) over `numel` elements.

    index: (input name, index expression) for inputs read through a broadcast (`broadcast_index`); the
    others are read at `offs`.
    """

    name: str
    header: str
    numel: int
    inputs: tuple[str, ...]
    steps: tuple[PwStep, ...]
    outputs: tuple[str, ...]
    index: tuple[tuple[str, str], ...] = ()


def broadcast_index(shape: tuple[int, ...], out: tuple[int, ...]) -> str:
    """The index into a contiguous tensor of `shape`, broadcast to `out`, at flat result position `offs`.

    Runs of dims the operand keeps become `((offs // inner) % size) * stride`; the modulo is left out for a
    run that starts the result (nothing outer to wrap), so the expression does not depend on the size of
    the outermost dim (a batch that changes between calls). A same-size operand reads `offs`; one that
    broadcasts everywhere (a 0-dim tensor) reads `offs * 0`, its single element in every lane.
    """
    shape = (1,) * (len(out) - len(shape)) + tuple(shape)
    if math.prod(shape) == math.prod(out):
        return "offs"
    keep = [s == o and o != 1 for s, o in zip(shape, out)]
    terms = []
    d = 0
    while d < len(out):
        if not keep[d]:
            d += 1
            continue
        start = d
        while d + 1 < len(out) and (keep[d + 1] or out[d + 1] == 1):
            d += 1
        inner, size, stride = math.prod(out[d + 1:]), math.prod(out[start:d + 1]), math.prod(shape[d + 1:])
        outer = math.prod(out[:start]) == 1
        e = "offs" if inner == 1 else f"(offs // {inner})"
        e = e if outer else f"({e} % {size})"
        terms.append(e if stride == 1 else f"{e} * {stride}")
        d += 1
    return " + ".join(terms) if terms else "offs * 0"


def _literal(v: float, where: str) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{where}: scalar must be a finite float, got {v!r}")
    return repr(float(v))


def _params(s: PwStep) -> tuple[float, ...]:
    """The NPARAMS[op] parameters of an activation step (none for other ops)."""
    p = s.param if isinstance(s.param, tuple) else (s.param,)
    n = NPARAMS.get(s.op, 0)
    if len(p) < n:
        raise ValueError(f"step {s.label!r}: {s.op} takes {n} parameter(s), got {s.param!r}")
    return tuple(p[:n])


def _prelu_weights(spec: PointwiseSpec) -> dict[str, int]:
    """Prelu weight inputs and their element counts (channels)."""
    return {s.args[1]: s.channels for s in spec.steps if s.op == "prelu" and len(s.args) == 2}


def _check(spec: PointwiseSpec) -> None:
    """Reject specs that would generate wrong or non-compiling code (a compiler bug, not a user error)."""
    if not spec.name.isidentifier() or keyword.iskeyword(spec.name):
        raise ValueError(f"kernel name {spec.name!r} is not a Python identifier")
    if not isinstance(spec.numel, int) or not 0 <= spec.numel < 2**31:
        raise ValueError(f"{spec.name}: numel must be an int in [0, 2**31), got {spec.numel!r}")
    weights = _prelu_weights(spec)
    for s in spec.steps:
        if s.op == "prelu" and len(s.args) == 2 and weights.get(s.args[1]) != s.channels:
            raise ValueError(f"{spec.name}: prelu weight {s.args[1]!r} is used with different channel counts")
    names = [*spec.inputs, *(s.out for s in spec.steps)]
    taken = set(_RESERVED) | {spec.name}
    for n in names:
        if not (isinstance(n, str) and n.isidentifier()) or keyword.iskeyword(n) or n in taken:
            raise ValueError(f"{spec.name}: value name {n!r} is not a free Python identifier")
        taken.add(n)
    # Derived names (pointers, prelu weight temporaries) must not collide with value names either.
    for n in [f"{v}_ptr" for v in (*spec.inputs, *spec.outputs)] + [
            f"{s.out}_w" for s in spec.steps if s.op == "prelu"]:
        if n in taken:
            raise ValueError(f"{spec.name}: generated name {n!r} collides with a value name")
        taken.add(n)
    defined = {n for n in spec.inputs if n not in weights}
    for s in spec.steps:
        where = f"{spec.name} step {s.label!r}"
        if s.op not in OPS:
            raise ValueError(f"{where}: unknown op {s.op!r} (known: {', '.join(OPS)})")
        nargs = 1 if s.op in UNARY else 2
        if len(s.args) != nargs:
            raise ValueError(f"{where}: {s.op} takes {nargs} argument(s), got {s.args!r}")
        tensors = [a for a in s.args if isinstance(a, str)]
        for a in tensors:
            if a in weights and not (s.op == "prelu" and a == s.args[1]):
                raise ValueError(f"{where}: {a!r} is a prelu weight and cannot be used as a full tensor")
            if a not in defined and not (s.op == "prelu" and a == s.args[1] and a in spec.inputs):
                raise ValueError(f"{where}: argument {a!r} is not an input or an earlier step")
        if s.op in UNARY or s.op == "prelu":
            if len(tensors) != nargs:
                raise ValueError(f"{where}: {s.op} takes tensor arguments, got {s.args!r}")
        elif not tensors:
            raise ValueError(f"{where}: {s.op} needs at least one tensor argument, got {s.args!r}")
        for a in s.args:
            if not isinstance(a, str):
                _literal(a, where)
        for p in _params(s):
            _literal(p, where)
        if s.op == "prelu" and not (isinstance(s.channels, int) and isinstance(s.inner, int)
                                    and s.channels >= 1 and s.inner >= 1):
            raise ValueError(f"{where}: prelu needs channels >= 1 and inner >= 1")
        defined.add(s.out)
    steps = {s.out for s in spec.steps}
    if len(set(spec.outputs)) != len(spec.outputs) or not set(spec.outputs) <= steps:
        raise ValueError(f"{spec.name}: outputs {spec.outputs!r} must be distinct step values")


def _expr(s: PwStep) -> list[str]:
    """The line(s) computing step `s` (the last one assigns s.out)."""
    arg = [a if isinstance(a, str) else _literal(a, s.label) for a in s.args]
    if s.op == "neg":
        return [f"{s.out} = -{arg[0]}"]
    if s.op in UNARY:
        params = "".join(f", {_literal(p, s.label)}" for p in _params(s))
        return [f"{s.out} = _{s.op}({arg[0]}{params})"]
    if s.op == "prelu":
        x, w = arg
        if s.channels == 1:
            load = f"{s.out}_w = tl.load({w}_ptr).to(tl.float32)  # one weight for every element"
        else:
            idx = "offs" if s.inner == 1 else f"(offs // {s.inner})"
            load = f"{s.out}_w = tl.load({w}_ptr + {idx} % {s.channels}, mask=mask).to(tl.float32)  # weight of the channel"
        return [load, f"{s.out} = tl.where({x} > 0, {x}, {s.out}_w * {x})"]
    return [f"{s.out} = {arg[0]} {_SYMBOL[s.op]} {arg[1]}"]


def generate(spec: PointwiseSpec) -> str:
    """The source of a module defining kernel `spec.name` and `launch(*inputs, *outputs)`."""
    _check(spec)
    weights = _prelu_weights(spec)
    labels = {s.out: s.label for s in spec.steps}
    src = Source()
    for line in spec.header.rstrip("\n").splitlines():
        src.writeline(line)
    used = sorted({f"_{s.op}" for s in spec.steps if s.op in UNARY and s.op != "neg"})
    src.writeline("import triton")
    src.writeline("import triton.language as tl")
    src.writeline()
    src.writeline("from fusednn.compiler import configs as _configs")
    if used:  # the activations this group applies, each defined once in kernels/activation.py
        src.writeline(f"from fusednn.kernels.activation import {', '.join(used)}")
    src.writeline("from fusednn.launch import launch as _launch")
    src.writeline()
    src.writeline()
    src.writeline('@triton.jit(do_not_specialize=["numel"])  # numel follows the batch: one kernel for every batch size')
    src.writeline(f"def {spec.name}(")
    with src.indent():
        for n in spec.inputs:
            what = (f"[{weights[n]}] prelu weight" if n in weights else "broadcast input" if n in dict(spec.index)
                    else f"[{spec.numel}] input")
            src.writeline(f"{n}_ptr,  # {what} {n}")
        for n in spec.outputs:
            src.writeline(f"{n}_ptr,  # [{spec.numel}] output of {labels[n]}")
        src.writeline("numel,")
        src.writeline("BLOCK: tl.constexpr,")
    src.writeline("):")
    with src.indent():
        src.writeline("pid = tl.program_id(0)")
        src.writeline("offs = pid * BLOCK + tl.arange(0, BLOCK)")
        src.writeline("mask = offs < numel")
        index = dict(spec.index)
        for n in spec.inputs:
            if n in index:
                src.writeline(f"{n} = tl.load({n}_ptr + {index[n]}, mask=mask).to(tl.float32)  # broadcast")
            elif n not in weights:
                src.writeline(f"{n} = tl.load({n}_ptr + offs, mask=mask).to(tl.float32)")
        for s in spec.steps:
            src.writeline(f"# {s.label}")
            for line in _expr(s):
                src.writeline(line)
        for n in spec.outputs:
            src.writeline(f"tl.store({n}_ptr + offs, {n}, mask=mask)")
    src.writeline()
    src.writeline()
    params = ", ".join((*spec.inputs, *spec.outputs))
    src.writeline(f"def launch({params}, nbytes=None):")
    with src.indent():
        src.writeline(f'"""Run {spec.name} over the outputs\' elements ({spec.numel} at the nominal batch, '
                      f'which picks the block); outputs are preallocated contiguous tensors."""')
        src.writeline(f"numel = {spec.outputs[-1]}.numel()")
        src.writeline(f"meta = _configs.elementwise({spec.numel})")
        src.writeline(f'_launch({spec.name}, (_configs.cdiv(numel, meta["BLOCK"]),), {params}, numel, nbytes=nbytes, '
                      f'**meta)')
    return src.getvalue()
