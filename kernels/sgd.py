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
# lr, weight_decay and momentum are each either a runtime fp32 argument (a Python float) or a pointer to
# a 1-element tensor on the parameters' device that the kernel loads (`load_hyper`, LR_PTR etc.): a scheduler
# that changes a float lr never recompiles, and one that `fill_`s a tensor lr in place changes what a
# captured CUDA graph reads without re-capture. (1 - dampening) is a float computed on the host as torch
# does. With a tensor momentum or weight decay the host cannot see whether it is 0 without a device sync
# (which capture forbids), so those branches are taken: a tensor momentum keeps buffers like momentum != 0. The branches (maximize, weight decay on/off, momentum
# on/off, nesterov) are constexpr: they are fixed for a group in practice and torch takes the same
# branches on the same conditions. "First step" is per tensor and at runtime, because a group can hold
# tensors with a buffer next to tensors that get their first gradient only now; on a first step the
# buffer is write-only (its load is masked off), so the caller may pass uninitialised memory.
# ---------------------------------------------------------------------------------------------------


@triton.jit
def load_hyper(x, PTR: tl.constexpr):
    """A hyper-parameter as fp32: loaded through its pointer (a device tensor), or the scalar argument."""
    # One return: Triton's compiler rejects a second return after a constexpr-if that returned.
    if PTR:
        v = tl.load(x).to(tl.float32)
    else:
        v = x
    return v


@triton.jit
def _sgd_step_kernel(
    p_addr_ptr,  # int64 [T]: address of each fp32 parameter (updated in place)
    g_addr_ptr,  # int64 [T]: address of each fp32 gradient (read only)
    buf_addr_ptr,  # int64 [T]: address of each fp32 momentum buffer (read/written; unused without momentum)
    numel_ptr,  # int64 [T]: elements in each tensor
    first_ptr,  # int64 [T]: 1 where this is the tensor's first step with momentum (buf = g)
    chunk_tensor_ptr,  # int64 [C]: which tensor program c updates
    chunk_start_ptr,  # int64 [C]: first element of program c's chunk in that tensor
    lr,  # fp32 learning rate, or a pointer to it (LR_PTR)
    weight_decay,  # fp32, or a pointer to it (WD_PTR)
    momentum,  # fp32, or a pointer to it (MOMENTUM_PTR)
    one_minus_dampening,  # fp32: 1 - dampening, computed on the host as torch does
    LR_PTR: tl.constexpr,
    WD_PTR: tl.constexpr,
    MOMENTUM_PTR: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    WEIGHT_DECAY: tl.constexpr,  # weight_decay != 0 (always for a tensor)
    MOMENTUM: tl.constexpr,  # momentum != 0 (always for a tensor)
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
        g = g + load_hyper(weight_decay, WD_PTR) * p
    if MOMENTUM:
        mom = load_hyper(momentum, MOMENTUM_PTR)
        buf_ptr = tl.load(buf_addr_ptr + t).to(tl.pointer_type(tl.float32), bitcast=True)
        first = tl.load(first_ptr + t)
        # On a first step the buffer holds no data yet: read none of it.
        buf = tl.load(buf_ptr + offs, mask=offs < tl.where(first != 0, 0, n), other=0.0)
        buf = tl.where(first != 0, g, mom * buf + one_minus_dampening * g)
        tl.store(buf_ptr + offs, buf, mask=mask)
        if NESTEROV:
            g = g + mom * buf
        else:
            g = buf
    tl.store(p_ptr + offs, p - load_hyper(lr, LR_PTR) * g, mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------


def _even(n: int) -> int:
    return n + (n & 1)


@functools.lru_cache(maxsize=64)
def multi_tensor_tables(
    device: torch.device,
    columns: tuple[tuple[int, ...], ...],
    numels: tuple[int, ...],
    block: int,
) -> tuple[tuple[torch.Tensor, ...], int]:
    """The tensor and chunk tables of a multi-tensor launch, as row views of one int64 tensor.

    Rows: each of `columns` (per tensor: an address or a flag), then `numels`, then the chunk table
    (tensor index, first element) of every BLOCK-sized chunk. One host-to-device copy builds them all.
    Cached on everything the tables encode, so a hit is correct by construction; parameters, and with
    the caching allocator usually gradients, keep their addresses from step to step, so steady-state
    steps copy nothing. Rows are padded to an even length: every view then starts 16-byte aligned and
    Triton specialises the kernel the same way whatever the number of tensors (no recompiles).
    """
    chunk_tensor = [i for i, n in enumerate(numels) for _ in range(0, n, block)]
    chunk_start = [s for n in numels for s in range(0, n, block)]
    t, c = _even(len(numels)), _even(len(chunk_tensor))
    pad_t, pad_c = [0] * (t - len(numels)), [0] * (c - len(chunk_tensor))
    flat = [x for col in (*columns, numels) for x in (*col, *pad_t)]
    flat += [*chunk_tensor, *pad_c, *chunk_start, *pad_c]
    table = torch.tensor(flat, dtype=torch.int64, device=device)
    k = len(columns) + 1
    rows = [table[i * t:(i + 1) * t] for i in range(k)]
    rows += [table[k * t:k * t + c], table[k * t + c:k * t + 2 * c]]
    return tuple(rows), len(chunk_tensor)


def hyper_arg(value: float | torch.Tensor, device: torch.device, name: str, who: str) -> tuple[float | torch.Tensor, bool]:
    """(kernel argument, is a pointer) for one hyper-parameter of a launch on `device`.

    A 1-element float tensor on `device` is passed as a pointer and read by the kernel at run time (a
    scheduler's in-place `fill_` reaches a captured CUDA graph). Anything else is read on the host now
    and passed as an fp32 scalar: a Python float, or a tensor elsewhere (a CPU lr for CUDA parameters:
    reading it needs no device sync; a captured graph keeps the value it was captured with).
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{who}: tensor {name} must have 1 element, got shape {tuple(value.shape)}")
        if value.device == device:
            if value.dtype not in (torch.float32, torch.float64):
                raise ValueError(f"{who}: tensor {name} is {value.dtype}; expected float32 or float64")
            return value, True
    return float(value), False


def check_like(name: str, tensors: Sequence[torch.Tensor], params: Sequence[torch.Tensor], who: str = "sgd_step") -> None:
    """Refuse `tensors` unless each is dense float32 with the shape and device of its parameter."""
    if len(tensors) != len(params):
        raise ValueError(f"{who}: {len(params)} params but {len(tensors)} {name}")
    for i, (x, p) in enumerate(zip(tensors, params)):
        if x.is_sparse:
            raise RuntimeError(f"{who}: {name}[{i}] is sparse; fusednn's optimizers support dense tensors only")
        if x.dtype != torch.float32 or x.device != p.device or x.shape != p.shape:
            raise ValueError(
                f"{who}: {name}[{i}] is {x.dtype} {tuple(x.shape)} on {x.device}; expected float32 "
                f"{tuple(p.shape)} on {p.device} like params[{i}]"
            )


def sgd_step(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    bufs: Sequence[torch.Tensor] | None,
    *,
    lr: float | torch.Tensor,
    momentum: float | torch.Tensor,
    dampening: float,
    weight_decay: float | torch.Tensor,
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
        lr, momentum, weight_decay: floats, or 1-element tensors; a tensor on the parameters' device is
            read by the kernel (see `hyper_arg`), and a tensor momentum or weight decay counts as nonzero.
    """
    params, grads = list(params), list(grads)
    if not params:
        return
    dev = params[0].device
    check_like("grads", grads, params)
    for i, p in enumerate(params):
        if p.dtype != torch.float32 or p.device != dev:
            raise ValueError(f"sgd_step: params[{i}] is {p.dtype} on {p.device}; expected float32 on {dev}")
        if not p.is_contiguous():
            raise ValueError(f"sgd_step: params[{i}] {tuple(p.shape)} is not contiguous; it is updated in place")
    if interpreting() and dev.type != "cpu":
        raise RuntimeError("sgd_step: Triton's interpreter cannot follow device addresses; use CPU tensors")
    lr_arg, lr_ptr = hyper_arg(lr, dev, "lr", "sgd_step")
    wd_arg, wd_ptr = hyper_arg(weight_decay, dev, "weight_decay", "sgd_step")
    mom_arg, mom_ptr = hyper_arg(momentum, dev, "momentum", "sgd_step")
    use_momentum = mom_ptr or mom_arg != 0
    if use_momentum:
        if bufs is None:
            raise ValueError("sgd_step: momentum != 0 needs momentum buffers (bufs)")
        bufs = list(bufs)
        check_like("bufs", bufs, params)
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
    no_bufs = (0,) * len(params)
    (p_row, g_row, buf_row, first_row, numel_row, *chunk_rows), n_chunks = multi_tensor_tables(
        dev,
        (
            tuple(p.data_ptr() for p in params),
            tuple(g.data_ptr() for g in grads),
            tuple(b.data_ptr() for b in bufs) if use_momentum else no_bufs,
            tuple(int(f) for f in firsts) if use_momentum else no_bufs,
        ),
        numels,
        cfg["BLOCK"],
    )
    rows = (p_row, g_row, buf_row, numel_row, first_row, *chunk_rows)
    # Bytes the update must move: read p and g, write p; with momentum also read and write the buffer.
    moved = sum(numels) * params[0].element_size() * (5 if use_momentum else 3)
    moved += sum(r.numel() * r.element_size() for r in rows)
    launch(
        _sgd_step_kernel,
        (n_chunks,),
        *rows,
        lr_arg,
        wd_arg,
        mom_arg,
        1.0 - float(dampening),
        LR_PTR=lr_ptr,
        WD_PTR=wd_ptr,
        MOMENTUM_PTR=mom_ptr,
        MAXIMIZE=bool(maximize),
        WEIGHT_DECAY=wd_ptr or wd_arg != 0,
        MOMENTUM=use_momentum,
        NESTEROV=bool(nesterov),
        nbytes=moved,
        **cfg,
    )
