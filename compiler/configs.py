"""The one place that decides launch configurations (block sizes, warps) for every kernel.

Two targets: "gpu" (NVIDIA heuristics) and "interp" (Triton's interpreter, where each program instance
costs ~milliseconds of Python/NumPy overhead whatever its size, so blocks are as large as memory allows).
`target()` follows the interpreter switch; `use_target("gpu")` overrides it, e.g. to compile ahead of time
for sm_90 on a CPU machine with the configs the GPU path would choose.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import triton

from fusednn._backend import interpreting

_forced: list[str] = []


_switch: list[str] = []  # the interpreter switch, read on first use: it runs on every launch


def target() -> str:
    """"gpu" or "interp": whose launch configs to use now."""
    if _forced:
        return _forced[-1]
    if not _switch:  # kernels are interpreted or not from their decoration on, so it cannot change later
        _switch.append("interp" if interpreting() else "gpu")
    return _switch[0]


@contextlib.contextmanager
def use_target(name: str) -> Iterator[None]:
    """Choose launch configs for `name` ("gpu" | "interp") inside the block."""
    if name not in ("gpu", "interp"):
        raise ValueError(f"launch-config target must be 'gpu' or 'interp', got {name!r}")
    _forced.append(name)
    try:
        yield
    finally:
        _forced.pop()


# (nominal, actual) batch while a batch-polymorphic specialisation runs (fusednn/runtime.py sets it).
_batch: tuple[int, int] | None = None


@contextlib.contextmanager
def nominal_batch(nominal: int, actual: int) -> Iterator[None]:
    """Inside the block, `nominal(size)` maps sizes that grow with a batch of `actual` to `nominal`."""
    global _batch
    prev, _batch = _batch, (nominal, actual)
    try:
        yield
    finally:
        _batch = prev


def nominal(size: int) -> int:
    """A size proportional to the batch (rows N*H*W, a numel), as it is at the nominal batch.

    Tiles are constexprs: chosen from the actual batch, every batch size would compile its own kernel.
    Launchers pass the batch-proportional sizes they pick tiles from through here, and use the actual
    size for grids and bounds, so one compiled kernel serves every batch. A size the actual batch does not
    divide cannot be proportional to it and is returned unchanged; a batch-independent size that it divides
    (batch 1 divides all) is scaled too: that changes tiles, so costs a compile, never a result.
    """
    if _batch is None or size % _batch[1]:
        return size
    return size // _batch[1] * _batch[0]


def _per_target(fn: Callable) -> Callable:
    """Memoise a config function per (target, arguments): it runs on every launch, and three
    next_power_of_2 calls cost ~8 us of host time. The returned dicts are shared: never mutate them."""
    cached = functools.lru_cache(maxsize=4096)(lambda _target, args, kwargs: fn(*args, **dict(kwargs)))

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return cached(target(), args, tuple(kwargs.items()))

    return wrapper


def memo(fn: Callable) -> Callable:
    """Memoise a launcher's plan: a pure function of hashable arguments (shapes, flags) that picks configs
    and grids, per target and nominal batch (what `nominal` reads), so a steady-state launch reuses it."""
    cached = functools.lru_cache(maxsize=1024)(lambda _target, _batch, args: fn(*args))

    @functools.wraps(fn)
    def wrapper(*args: Any) -> Any:
        return cached(target(), _batch, args)

    return wrapper


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for the grids: triton.cdiv is a @jit function whose Python call costs ~2 us a launch."""
    return -(-a // b)


def pow2(n: int, lo: int = 1, hi: int | None = None) -> int:
    """next_power_of_2(n) clamped to [lo, hi]."""
    p = max(lo, triton.next_power_of_2(max(int(n), 1)))
    return min(p, hi) if hi is not None else p


@_per_target
def gemm(M: int, N: int, K: int, gather: bool = False, heavy_epilogue: bool = False,
         heavy_prologue: bool = False) -> dict:
    """Tiles for a GEMM-shaped kernel (implicit-GEMM conv included): out[M, N] = A[M, K] @ B[K, N].

    Every tile side is >= 16 because tl.dot on NVIDIA (triton 3.6) refuses smaller operands.
    gather: an operand is gathered element by element (implicit-GEMM convs: im2col of x, or dz read
    through the pool's argmax), so each element of its tile costs its own address and mask registers in
    every pipeline stage, and an ieee tl.dot (FFMAs) holds a whole BLOCK_K slice of rows and columns per
    thread. Such tiles stay within 32 x 32 x 16 (at most 4 gathered elements per thread per operand).
    Measured on sm_90, ieee: LeNet conv1's forward at batch 64 with 64x16x32 took 255 registers and
    spilled under triton 3.9, at 32x16x16 about 100 under 3.9 and 3.6; conv2's at batch 8 spilled at
    16x16x32, not at 16x16x16. Under the interpreter `gather` changes nothing.
    heavy_epilogue: the epilogue evaluates a long formula per element (GELU's erf, Mish, ...): 8 warps share
    the tile, so each thread holds half the elements. Measured on sm_90 (triton 3.9, ieee): airbench's conv
    -> max pool -> batch norm -> GELU at 32x32x16 with 4 warps took 128 registers and a 16-byte stack; with
    8 warps, 80 registers and none. A training max pool's epilogue (the max and its argmax, both stored)
    counts too: airbench's conv -> max pool in training (24 -> 32 channels, 31x31) at 32x32x16 took 128
    registers and an 8-byte stack with 4 warps, 80 and none with 8.
    heavy_prologue: a long formula makes an operand tile element by element in every K step (a conv's dw
    GEMM making dz = dy * gelu'(z)): 8 warps at any tile. Measured on sm_90 (triton 3.9, tf32): the dw of a
    16 -> 32 channel 3x3 conv + GELU at batch 64, 32x32 (16x32x16 tiles) took 80 registers and a 16-byte
    stack with 4 warps, none with 8.
    """
    if target() == "interp":
        bm = pow2(M, 16, 1024)
        bn = pow2(N, 16, 128)
        bk = pow2(K, 16, 256)
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=4)
    bm = 64 if M >= 4096 else 32 if M >= 512 else 16
    bn = pow2(N, 16, 64)
    bk = pow2(K, 16, 32)
    if gather:
        bm, bn, bk = min(bm, 32), min(bn, 32), 16
    heavy = heavy_prologue or (heavy_epilogue and bm * bn >= 1024)
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=8 if heavy else 4)


@_per_target
def depthwise(rows: int, channels: int, heavy_epilogue: bool = False) -> dict:
    """Tiles for a direct depthwise conv kernel (groups == channels: each output channel reads only its own
    input channel) and its backward: BLOCK_M positions x BLOCK_N channels per program, one FMA per tap and
    element, no tl.dot (an implicit GEMM would pad each one-channel group to 16 columns and its 9 taps to
    16). BLOCK_K is unused; the kernels share the GEMM kernels' signature. heavy_epilogue as `gemm`."""
    if target() == "interp":
        return dict(BLOCK_M=pow2(rows, 16, 1024), BLOCK_N=pow2(channels, 16, 128), BLOCK_K=16, num_warps=4)
    bm = 64 if rows >= 4096 else 32
    return dict(BLOCK_M=bm, BLOCK_N=pow2(channels, 16, 32), BLOCK_K=16,
                num_warps=8 if heavy_epilogue and bm >= 64 else 4)


@_per_target
def elementwise(n: int) -> dict:
    """Block for a 1-D pointwise kernel over n elements."""
    if target() == "interp":
        return dict(BLOCK=pow2(n, 16, 1 << 16), num_warps=4)
    return dict(BLOCK=1024, num_warps=4)


@_per_target
def window(n: int) -> dict:
    """Block for a kernel that reads a window of inputs for each of its n outputs (a standalone pool).

    On the GPU, `elementwise`'s 1024 outputs over 8 warps instead of 4: each thread walks the window for 4
    outputs, not 8. With 4 warps the standalone max pool of LeNet's unfused conv1 (2x2 window, int64
    offsets) spilled under triton 3.6 (56 registers, 8-byte stack); with 8 it takes 42 and none.
    """
    if target() == "interp":
        return elementwise(n)
    return dict(BLOCK=1024, num_warps=8)


@_per_target
def rows(n_rows: int, row_len: int) -> dict:
    """Tiles for a kernel that reduces each of n_rows rows of row_len elements (softmax, losses, norms)."""
    bc = pow2(row_len, 16)
    if target() == "interp":
        return dict(BLOCK_R=pow2(n_rows, 1, max(1, (1 << 16) // bc)), BLOCK_C=bc, num_warps=4)
    return dict(BLOCK_R=max(1, min(pow2(n_rows), 4096 // bc)), BLOCK_C=bc, num_warps=4)


@_per_target
def norm_rows(n_rows: int, row_len: int) -> dict:
    """Tiles for a row normalization (layer/group/instance norm, forward and dx): each program owns BLOCK_R
    rows and walks them in BLOCK_L steps, so a row of any length fits."""
    if target() == "interp":
        bl = pow2(row_len, 16, 1 << 14)
        return dict(BLOCK_R=pow2(n_rows, 1, max(1, (1 << 16) // bl)), BLOCK_L=bl, num_warps=4)
    bl = pow2(row_len, 16, 1024)
    return dict(BLOCK_R=max(1, min(pow2(n_rows), 2048 // bl)), BLOCK_L=bl, num_warps=4)


@_per_target
def norm_cols(n_rows: int, n_cols: int) -> dict:
    """Tiles for a row normalization's dweight/dbias: as `reduce_cols`, but each tile element also gathers
    its row's three statistics, so GPU tiles are a quarter of reduce_cols' (no spills on sm_90)."""
    if target() == "interp":
        return reduce_cols(n_rows, n_cols)
    return dict(BLOCK_R=32, BLOCK_C=pow2(n_cols, 16, 32), num_warps=4)


@_per_target
def reduce_cols(n_rows: int, n_cols: int, heavy: bool = False) -> dict:
    """Tiles for a deterministic column reduction (bias gradients, batch-norm statistics): each program
    owns BLOCK_C columns and walks all rows in BLOCK_R steps, in a fixed order.

    heavy: each element also evaluates a long formula (a batch norm's fused GELU, SiLU, ... and its
    derivative): half the rows per step over twice the warps. Measured on sm_90 (triton 3.6, airbench's
    batch norm + GELU, 64 channels): at 64 x 64 with 4 warps the forward took 255 registers and a 40-byte
    stack, its backward reduction a 384-byte one; at 32 x 64 with 8 warps 80 and 119 registers, no stack."""
    if target() == "interp":
        return dict(BLOCK_R=pow2(n_rows, 16, 4096), BLOCK_C=pow2(n_cols, 16, 256), num_warps=4)
    if heavy:
        return dict(BLOCK_R=32, BLOCK_C=pow2(n_cols, 16, 64), num_warps=8)
    return dict(BLOCK_R=64, BLOCK_C=pow2(n_cols, 16, 64), num_warps=4)


@_per_target
def reduce_split(n_rows: int, col_blocks: int, block_r: int) -> int:
    """Row slices for a deterministic two-level column reduction (batch-norm sums): each of `col_blocks`
    column blocks cuts its rows into this many slices of whole BLOCK_R steps, one program each, which
    write partial sums; the consumer adds the partials of a column in slice order (no atomics, the same
    bits on every run). One program walking all rows of a 16-channel batch norm at batch 64 (65,536 rows)
    would leave all but one SM idle."""
    if target() == "interp":
        return 1  # a program costs the interpreter ~ms whatever its size: one pass over the rows is cheapest
    # at least 8 steps a slice, about 2 waves on a 132-SM H100, at most 128 partials a column
    return max(1, min(-(-n_rows // (block_r * 8)), -(-264 // max(col_blocks, 1)), 128))


@_per_target
def normalize_split(n_rows: int, col_blocks: int, block_r: int, tiles: int) -> int:
    """Row slices of a training batch norm that normalises with a conv's per-tile partial statistics:
    every program first combines all `tiles` partials of its channels, so the slices are few enough that
    those reads stay within twice the rows' own (slices x tiles <= 2 rows)."""
    if target() == "interp":
        return 1
    return max(1, min(-(-n_rows // block_r), -(-264 // max(col_blocks, 1)), 2 * n_rows // max(tiles, 1)))


@_per_target
def split_k(tiles: int, steps: int) -> int:
    """Slices for a deterministic split-K reduction (weight gradients): `steps` BLOCK_K steps over
    `tiles` output tiles are cut into this many slices, each writing a partial tile that a second pass
    adds up in a fixed order (no atomics)."""
    if target() == "interp":
        return 1  # a program costs the interpreter ~ms whatever its size: one pass over the rows is cheapest
    # at least 8 steps a slice (the partial tiles cost a round trip), about 2 waves on a 132-SM H100
    return max(1, min(steps // 8, -(-264 // max(tiles, 1))))


@_per_target
def sum_to(n_out: int, n_sum: int) -> dict:
    """Tiles for summing a broadcast gradient (kernels/broadcast.py): each program owns BLOCK_M outputs and
    walks the n_sum positions of each in BLOCK_R steps, in a fixed order."""
    br = pow2(n_sum, 16, 4096 if target() == "interp" else 128)
    cap = (1 << 16) if target() == "interp" else 4096
    return dict(BLOCK_M=pow2(n_out, 1, max(1, cap // br)), BLOCK_R=br, num_warps=4)
