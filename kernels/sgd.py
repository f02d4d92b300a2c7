"""Fused multi-tensor SGD: one Triton launch updates every parameter of a parameter group.

Design (after apex's multi_tensor_apply and torch's `_foreach` kernels): the launcher builds one small
int64 table per group holding, per tensor, the addresses of its parameter, gradient and momentum
buffer, its element count and a "first step" flag, plus a chunk table that maps each program to
(tensor, first element of its chunk). Each program loads its row, turns the addresses back into
`*fp32` pointers (`.to(tl.pointer_type(tl.float32), bitcast=True)`, an `int_to_ptr` on the GPU) and
updates one chunk of one tensor in place. Nothing is copied: the user's parameters, gradients and
buffers are read and written where they live.

Checked on the CPU machine: the pointer table works in Triton 3.9's interpreter (the interpreter keeps
CPU tensors in place, so the raw addresses are valid) and the kernel compiles for sm_90 with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` (tests/test_sgd.py keeps that check).
The interpreter cannot follow raw CUDA addresses (it copies CUDA tensors to the host), so interpreting
with CUDA tensors is refused with an error.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from fusednn._backend import interpreting
from fusednn.compiler import configs
from fusednn.launch import launch

# ---------------------------------------------------------------------------------------------------
# The update, exactly torch.optim.SGD's (torch/optim/sgd.py, `_single_tensor_sgd`), per element:
#
#   g = -grad if maximize else grad
#   g = g + weight_decay * p                          (only when weight_decay != 0: 0 * inf is NaN)
#   with momentum (momentum != 0):
#       buf = g                                        on the tensor's first step (buffer created then)
#       buf = momentum * buf + (1 - dampening) * g     afterwards
#       g   = g + momentum * buf if nesterov else buf
#   p = p - lr * g
#
# lr, weight_decay, momentum and (1 - dampening) are runtime fp32 arguments, so a scheduler that
# changes the lr every step never recompiles. The branches (maximize, weight decay on/off, momentum
# on/off, nesterov) are constexpr: they are fixed for a group in practice and torch takes the same
# branches on the same conditions. "First step" is per tensor and at runtime, because a group can hold
# tensors with a buffer next to tensors that get their first gradient only now; on a first step the
# buffer is write-only (its load is masked off), so the caller may pass uninitialised memory.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def _sgd_step_kernel(
    p_addr_ptr,  # int64 [T]: address of each fp32 parameter (updated in place)
    g_addr_ptr,  # int64 [T]: address of each fp32 gradient (read only)
    buf_addr_ptr,  # int64 [T]: address of each fp32 momentum buffer (read/written; unused without momentum)
    numel_ptr,  # int64 [T]: elements in each tensor
    first_ptr,  # int64 [T]: 1 where this is the tensor's first step with momentum (buf = g)
    chunk_tensor_ptr,  # int64 [C]: which tensor program c updates
    chunk_start_ptr,  # int64 [C]: first element of program c's chunk in that tensor
    lr,  # fp32 learning rate
    weight_decay,  # fp32
    momentum,  # fp32
    one_minus_dampening,  # fp32: 1 - dampening, computed on the host as torch does
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0
    MOMENTUM: tl.constexpr,  # momentum != 0
    NESTEROV: tl.constexpr,
    BLOCK: tl.constexpr,
):
    c = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + c)
    start = tl.load(chunk_start_ptr + c)
    n = tl.load(numel_ptr + t)
    p_ptr = tl.load(p_addr_ptr + t).to(tl.pointer_type(tl.float32), bitcast=True)
    g_ptr = tl.load(g_addr_ptr + t).to(tl.pointer_type(tl.float32), bitcast=True)

    offs = start + tl.arange(0, BLOCK)  # int64: a tensor may exceed 2**31 elements
    mask = offs < n
    p = tl.load(p_ptr + offs, mask=mask)
    g = tl.load(g_ptr + offs, mask=mask)
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        g = g + weight_decay * p
    if MOMENTUM:
        buf_ptr = tl.load(buf_addr_ptr + t).to(tl.pointer_type(tl.float32), bitcast=True)
        first = tl.load(first_ptr + t)
        # On a first step the buffer holds no data yet: read none of it.
        buf = tl.load(buf_ptr + offs, mask=offs < tl.where(first != 0, 0, n), other=0.0)
        buf = tl.where(first != 0, g, momentum * buf + one_minus_dampening * g)
        tl.store(buf_ptr + offs, buf, mask=mask)
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    tl.store(p_ptr + offs, p - lr * g, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _even(n: int) -> int:
    return n + (n & 1)


@functools.lru_cache(maxsize=64)
def _tables(
    device: torch.device,
    p_addrs: tuple[int, ...],
    g_addrs: tuple[int, ...],
    buf_addrs: tuple[int, ...],
    numels: tuple[int, ...],
    firsts: tuple[int, ...],
    block: int,
) -> tuple[tuple[torch.Tensor, ...], int]:
    """The tensor and chunk tables, as row views of one int64 tensor (one host-to-device copy).

    Cached on everything the tables encode, so a hit is correct by construction; parameters, and with
    the caching allocator usually gradients, keep their addresses from step to step, so steady-state
    steps copy nothing. Rows are padded to an even length: every view then starts 16-byte aligned and
    Triton specialises the kernel the same way whatever the number of tensors (no recompiles).
    """
    chunk_tensor = [i for i, n in enumerate(numels) for _ in range(0, n, block)]
    chunk_start = [s for n in numels for s in range(0, n, block)]
    t, c = _even(len(numels)), _even(len(chunk_tensor))
    pad_t, pad_c = [0] * (t - len(numels)), [0] * (c - len(chunk_tensor))
    flat = [
        *p_addrs, *pad_t, *g_addrs, *pad_t, *buf_addrs, *pad_t, *numels, *pad_t, *firsts, *pad_t,
        *chunk_tensor, *pad_c, *chunk_start, *pad_c,
    ]
    table = torch.tensor(flat, dtype=torch.int64, device=device)
    rows = [table[i * t:(i + 1) * t] for i in range(5)]
    rows += [table[5 * t:5 * t + c], table[5 * t + c:5 * t + 2 * c]]
    return tuple(rows), len(chunk_tensor)


def _check(name: str, tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor]) -> None:
    if len(tensors) != len(params):
        raise ValueError(f"sgd_step: {len(params)} params but {len(tensors)} {name}")
    for i, (x, p) in enumerate(zip(tensors, params)):
        if x.is_sparse:
            raise RuntimeError(f"sgd_step: {name}[{i}] is sparse; fusednn's SGD supports dense tensors only")
        if x.dtype != torch.float32 or x.device != p.device or x.shape != p.shape:
            raise ValueError(
                f"sgd_step: {name}[{i}] is {x.dtype} {tuple(x.shape)} on {x.device}; expected float32 "
                f"{tuple(p.shape)} on {p.device} like params[{i}]"
            )


def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    bufs: Sequence[torch.Tensor] | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    first_step: bool | Sequence[bool],
) -> None:
    """Apply one torch.optim.SGD step to every tensor of `params` in place, in one kernel launch.

    Args:
        params: contiguous float32 tensors on one device, updated in place.
        grads: their gradients (same shapes; dense).
        bufs: momentum buffers, updated in place; None when momentum == 0. Where it is a tensor's first
            step the buffer's contents are ignored and overwritten with the (decayed) gradient, so it
            may come from `torch.empty_like`.
        first_step: one flag for all tensors, or one per tensor (a group can mix tensors that already
            have a buffer with tensors seeing their first gradient).
    """
    params, grads = list(params), list(grads)
    if not params:
        return
    dev = params[0].device
    _check("grads", grads, params)
    for i, p in enumerate(params):
        if p.dtype != torch.float32 or p.device != dev:
            raise ValueError(f"sgd_step: params[{i}] is {p.dtype} on {p.device}; expected float32 on {dev}")
        if not p.is_contiguous():
            raise ValueError(f"sgd_step: params[{i}] {tuple(p.shape)} is not contiguous; it is updated in place")
    if interpreting() and dev.type != "cpu":
        raise RuntimeError("sgd_step: Triton's interpreter cannot follow device addresses; use CPU tensors")
    use_momentum = momentum != 0
    if use_momentum:
        if bufs is None:
            raise ValueError("sgd_step: momentum != 0 needs momentum buffers (bufs)")
        bufs = list(bufs)
        _check("bufs", bufs, params)
        if not all(b.is_contiguous() for b in bufs):
            raise ValueError("sgd_step: momentum buffers must be contiguous; they are updated in place")
    firsts = [bool(first_step)] * len(params) if isinstance(first_step, bool) else [bool(f) for f in first_step]
    if len(firsts) != len(params):
        raise ValueError(f"sgd_step: {len(params)} params but {len(firsts)} first_step flags")

    # Gradients are only read, so a strided one may be copied; the copies live until the kernel is
    # enqueued, and the caching allocator orders their reuse after it on the stream.
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    numels = tuple(p.numel() for p in params)
    cfg = configs.elementwise(max(numels))
    rows, n_chunks = _tables(
        dev,
        tuple(p.data_ptr() for p in params),
        tuple(g.data_ptr() for g in grads),
        tuple(b.data_ptr() for b in bufs) if use_momentum else (0,) * len(params),
        numels,
        tuple(int(f) for f in firsts) if use_momentum else (0,) * len(params),
        cfg["BLOCK"],
    )
    # Bytes the update must move: read p and g, write p; with momentum also read and write the buffer.
    moved = sum(numels) * params[0].element_size() * (5 if use_momentum else 3)
    moved += sum(r.numel() * r.element_size() for r in rows if isinstance(r, torch.Tensor))
    launch(
        _sgd_step_kernel,
        (n_chunks,),
        *rows,
        float(lr),
        float(weight_decay),
        float(momentum),
        1.0 - float(dampening),
        MAXIMIZE=bool(maximize),
        WEIGHT_DECAY=weight_decay != 0,
        MOMENTUM=use_momentum,
        NESTEROV=bool(nesterov),
        nbytes=moved,
        **cfg,
    )
