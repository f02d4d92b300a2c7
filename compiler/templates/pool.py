"""Standalone 2-D pools: max/avg with torch's full option set, and adaptive max/avg.

Used when fusion is off and for pools that cannot fuse into a conv epilogue (overlapping windows,
padding, dilation, ceil_mode, adaptive sizes). One program owns BLOCK outputs of the flattened
[N, C, OH, OW] tensor and walks its window; the window geometry is baked in as constexprs, so the
loops have constant trip counts. The backward kernels are hand-written in kernels/pool.py.

Semantics follow torch's reference kernels exactly:
- max: padding reads as -inf; a value replaces the running max when it is strictly greater or NaN
  (so the first of equal maxima wins and NaN propagates); idx starts at the window's first in-bounds
  position, so a window of -inf still points at a real input element. One deliberate difference: a
  dilated window that lies wholly in padding (torch allows it) gives -inf with idx -1, where torch's
  index points past the window and its backward writes there.
- avg: the divisor is `divisor_override` if given, else the window clipped to the padded input
  (count_include_pad; a ceil_mode window hanging past the padding is clipped) or to the input itself.
- adaptive: output o covers input [floor(o*H/OH), ceil((o+1)*H/OH)).
"""
from __future__ import annotations

from dataclasses import dataclass

from fusednn.compiler.source import Source
from fusednn.kernels.pool import adaptive_window, pool_out_size  # noqa: F401  (the one definition)


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """One F.max_pool2d / F.avg_pool2d call with concrete shapes; OH, OW come from the caller."""

    name: str
    header: str
    labels: tuple[str, ...]
    kind: str  # "max" | "avg" | "lp"
    N: int
    C: int
    H: int
    W: int
    OH: int
    OW: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int | None
    norm_type: float = 0.0  # lp: the p of (KH·KW · avg(x^p))^(1/p) (F.lp_pool2d)


@dataclass(frozen=True, slots=True)
class AdaptivePoolSpec:
    """One F.adaptive_max_pool2d / F.adaptive_avg_pool2d call with concrete shapes."""

    name: str
    header: str
    labels: tuple[str, ...]
    kind: str  # "max" | "avg"
    N: int
    C: int
    H: int
    W: int
    OH: int
    OW: int


def _check(spec: PoolSpec | AdaptivePoolSpec) -> None:
    kinds = ("max", "avg", "lp") if isinstance(spec, PoolSpec) else ("max", "avg")
    if spec.kind not in kinds:
        raise ValueError(f"{spec.name}: pool kind must be one of {kinds}, got {spec.kind!r}")
    if spec.kind == "lp" and (spec.norm_type <= 0 or tuple(spec.padding) != (0, 0) or not spec.count_include_pad):
        raise ValueError(f"{spec.name}: lp pool needs norm_type > 0, no padding, count_include_pad")
    if min(spec.N, spec.C, spec.H, spec.W, spec.OH, spec.OW) < 1:
        raise ValueError(f"{spec.name}: empty pool shape {spec}")
    if isinstance(spec, PoolSpec):
        if spec.kind != "max" and tuple(spec.dilation) != (1, 1):
            raise ValueError(f"{spec.name}: avg_pool2d has no dilation, got {spec.dilation}")
        if spec.divisor_override is not None and spec.divisor_override == 0:
            raise ValueError(f"{spec.name}: divisor_override must be non-zero")


def generate(spec: PoolSpec | AdaptivePoolSpec) -> str:
    """The source of one generated pool kernel file: header, @triton.jit `spec.name`, `launch`."""
    _check(spec)
    adaptive = isinstance(spec, AdaptivePoolSpec)
    is_max = spec.kind == "max"
    src = Source()
    for line in spec.header.rstrip("\n").splitlines():
        src.writeline(line)
    src.writelines('''
        from __future__ import annotations

        import triton
        import triton.language as tl

        from fusednn.compiler import configs
        from fusednn.kernels.pool import lp_pow
        from fusednn.launch import launch as _launch


        @triton.jit(do_not_specialize=["total"])  # total follows the batch: one kernel for every batch size
    ''')
    src.writeline(f"def {spec.name}(")
    with src.indent():
        src.writeline("x_ptr,  # input [N, C, H, W], contiguous fp32")
        src.writeline("y_ptr,  # output [N, C, OH, OW], fp32")
        if is_max:
            src.writeline("idx_ptr,  # output [N, C, OH, OW], int32 (int64 for return_indices): flat h*W+w of each window's max")
        src.writeline("total,  # N*C*OH*OW")
        consts = ["H", "W", "OH", "OW"]
        if not adaptive:
            consts += ["KH", "KW", "SH", "SW", "PH", "PW"]
            consts += ["DH", "DW"] if is_max else []
        else:
            consts += ["KH", "KW"]  # the largest adaptive window; smaller ones are masked
        for c in consts:
            src.writeline(f"{c}: tl.constexpr,")
        src.writeline("BLOCK: tl.constexpr,")
    src.writeline("):")
    with src.indent():
        # int64 offsets: N*C*H*W may pass 2**31 elements even when one plane is small
        src.writelines('''
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            live = offs < total
            ow = offs % OW
            oh = (offs // OW) % OH
            x_plane = x_ptr + (offs // (OH * OW)) * (H * W)
        ''')
        for label in spec.labels:
            src.writeline(f"# {label}")
        if adaptive:
            src.writelines('''
                h0 = (oh * H) // OH
                w0 = (ow * W) // OW
                h1 = ((oh + 1) * H + OH - 1) // OH
                w1 = ((ow + 1) * W + OW - 1) // OW
            ''')
        else:
            src.writelines('''
                h0 = oh * SH - PH
                w0 = ow * SW - PW
            ''')
        step_h, step_w = ("DH", "DW") if is_max and not adaptive else ("1", "1")
        if is_max:
            src.writelines('''
                best = tl.full([BLOCK], float("-inf"), tl.float32)
                arg = tl.full([BLOCK], -1, tl.int32)
            ''')
        else:
            src.writeline("acc = tl.zeros([BLOCK], tl.float32)")
        src.writeline("for i in range(KH):")
        with src.indent():
            src.writeline(f"ih = h0 + i * {step_h}" if step_h != "1" else "ih = h0 + i")
            src.writeline("for j in range(KW):")
            with src.indent():
                src.writeline(f"iw = w0 + j * {step_w}" if step_w != "1" else "iw = w0 + j")
                if adaptive:
                    src.writeline("ok = live & (ih < h1) & (iw < w1)")
                else:
                    src.writeline("ok = live & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)")
                if is_max:
                    src.writelines('''
                        v = tl.load(x_plane + ih * W + iw, mask=ok, other=float("-inf")).to(tl.float32)
                        # torch: strictly greater or NaN replaces, so the first of equal maxima wins
                        # and NaN propagates; arg < 0 takes the first in-bounds position even if -inf
                        take = ok & ((v > best) | (v != v) | (arg < 0))
                        best = tl.where(take, v, best)
                        arg = tl.where(take, (ih * W + iw).to(tl.int32), arg)
                    ''')
                elif spec.kind == "lp":
                    src.writeline(f"acc += tl.where(ok, lp_pow(tl.load(x_plane + ih * W + iw, mask=ok, other=1.0), "
                                  f"{float(spec.norm_type)!r}), 0.0)")
                else:
                    src.writeline("acc += tl.load(x_plane + ih * W + iw, mask=ok, other=0.0).to(tl.float32)")
        if is_max:
            src.writelines('''
                tl.store(y_ptr + offs, best, mask=live)
                tl.store(idx_ptr + offs, arg, mask=live)
            ''')
        elif adaptive:
            src.writelines('''
                tl.store(y_ptr + offs, acc / ((h1 - h0) * (w1 - w0)).to(tl.float32), mask=live)
            ''')
        elif spec.kind == "lp":
            _emit_avg_divisor(src, spec)
            p = float(spec.norm_type)
            src.writeline(f"# torch: (sign(A) relu(|A|) KH KW)^(1/p), A = avg_pool2d(x^p); that is S^(1/p), S = KH KW A")
            src.writeline(f"s = acc / div * {float(spec.kernel[0] * spec.kernel[1])!r}")
            src.writeline(f"tl.store(y_ptr + offs, tl.where(s == 0.0, 0.0, lp_pow(s, {1.0 / p!r})), mask=live)")
        else:
            _emit_avg_divisor(src, spec)
            src.writelines('''
                # a window that holds no input element averages to 0, as in torch
                y = tl.where(count > 0, acc / div, 0.0)
                tl.store(y_ptr + offs, y, mask=live)
            ''')
    src.writeline()
    src.writeline()
    _emit_launch(src, spec, consts)
    return src.getvalue()


def _emit_avg_divisor(src: Source, spec: PoolSpec) -> None:
    """torch's avg_pool2d divisor for each output of the block (the `div` and `count` temporaries)."""
    src.writelines('''
        # the window clipped to the padded input (a ceil_mode window may hang past it) ...
        h1 = tl.minimum(h0 + KH, H + PH)
        w1 = tl.minimum(w0 + KW, W + PW)
        # ... and clipped to the input itself
        count = (tl.minimum(h1, H) - tl.maximum(h0, 0)) * (tl.minimum(w1, W) - tl.maximum(w0, 0))
    ''')
    if spec.divisor_override is not None:
        src.writeline(f"div = {float(spec.divisor_override)!r}  # divisor_override")
    elif spec.count_include_pad:
        src.writeline("div = ((h1 - h0) * (w1 - w0)).to(tl.float32)  # count_include_pad")
    else:
        src.writeline("div = tl.maximum(count, 1).to(tl.float32)  # padding not counted")


def _emit_launch(src: Source, spec: PoolSpec | AdaptivePoolSpec, consts: list[str]) -> None:
    values = {"H": spec.H, "W": spec.W, "OH": spec.OH, "OW": spec.OW}
    if isinstance(spec, PoolSpec):
        values.update(KH=spec.kernel[0], KW=spec.kernel[1], SH=spec.stride[0], SW=spec.stride[1],
                      PH=spec.padding[0], PW=spec.padding[1], DH=spec.dilation[0], DW=spec.dilation[1])
    else:
        values.update(KH=adaptive_window(spec.H, spec.OH), KW=adaptive_window(spec.W, spec.OW))
    total = spec.N * spec.C * spec.OH * spec.OW
    is_max = spec.kind == "max"
    src.writeline("def launch(x, y, idx, nbytes=None):")
    with src.indent():
        what = "its int32 argmax into idx" if is_max else "idx is None"
        src.writeline(f'"""Pool x [N, {spec.C}, {spec.H}, {spec.W}] into y '
                      f'[N, {spec.C}, {spec.OH}, {spec.OW}] (any batch N; the block is picked at N = {spec.N}); '
                      f'{what}."""')
        if not is_max:
            src.writeline('assert idx is None, "avg pool has no argmax"')
        src.writeline(f"cfg = configs.window({total})  # a window of reads per output: 8 warps, no spill")
        args = "x, y, idx" if is_max else "x, y"
        src.writeline("total = y.numel()")
        src.writeline(f'_launch({spec.name}, (configs.cdiv(total, cfg["BLOCK"]),), {args}, total,')
        with src.indent():
            src.writeline(", ".join(f"{c}={values[c]}" for c in consts) + ", nbytes=nbytes, **cfg)")
