"""Template for the conv_relu_pool stem: conv2d (+bias) (+activation) (+non-overlapping pool) forward.

The generated kernel is an implicit-GEMM convolution after Triton's matmul tutorial: rows are output
positions (pool windows when a pool is fused), columns are one group's output channels, and the reduction
runs over that group's (c, r, s) flattened into one axis, so a 1-channel input still fills BLOCK_K. The
epilogue (bias, activation, pool) runs on the fp32 accumulator in registers; a fused pool evaluates the
conv tile once per window offset and reduces across them, so the full-size activation is never written
unless `save_act` asks for it (avg pool with an activation needs it for backward). The window loop is a
rolled `range`, not `tl.static_range`: unrolled, LeNet conv1's four ieee-fp32 conv tiles spilled on sm_90
(triton 3.9, 64x16x32 tiles: 255 registers, 200 bytes of stack, 98 local loads/stores; rolled: 8 bytes
and 2; rolled at the 32x16x16 tiles of `configs.gemm(..., gather=True)`: 96 registers, no stack).

Shapes are baked into the generated text as constexpr arguments of the launch, so the source reads with
its shapes, except the batch N: a runtime int (not specialised), so one compiled kernel serves every batch
size. Block sizes come from `configs.gemm(..., gather=True)` at the spec's (nominal) batch N, so they do not
change with the batch either; the grid and the bounds use the actual batch, read from x.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from fusednn.compiler.source import Source, header as file_header
from fusednn.kernels.activation import EPILOGUE_ACTS as ACTS, SAVES, saves_input
from fusednn.kernels.conv_relu_pool import conv_out_hw

_BACKWARD = "kernels/conv_relu_pool.py"

POOLS = ("none", "max", "avg")


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


@dataclass(frozen=True, slots=True)
class ConvSpec:
    """One fused conv2d [+bias] [+activation] [+non-overlapping pool] forward kernel.

    Args:
        N, C, H, W: input shape; K, R, S: filters [K, C // groups, R, S].
        stride, padding, dilation: (h, w) pairs (an int means both); padding is explicit zeros.
        groups: C and K are split into this many groups (groups == C is depthwise).
        bias: whether the conv adds a bias [K].
        act: one of ACTS; act_param: leaky_relu's negative slope. With save_act (training), also an
            activation without parameters whose act' needs its input (`saves_input`: GELU, SiLU, ...).
        pool: one of POOLS; pool_k: window == stride, no padding, floor mode.
        save_act: also write, full-size [N, K, OH, OW], what the backward reads act' from: a = act(z), or
            z itself for an activation whose act' needs its input (then no max pool, batch norm or residual).
        bn: a batch norm with running statistics follows the conv (inference): (z - mean) * scale + shift
            per channel, scale = weight / sqrt(var + bn_eps) and shift = bias, from the live tensors on
            every call; bn_weight, bn_bias: whether it has each affine parameter.
        residual: a tensor of the conv output's shape is added after the batch norm, before the activation.
        bn_after_pool: the order conv -> pool -> batch norm -> [act] (the pool reduces the conv's own values;
            no residual).
        inference: no backward reads this kernel's outputs (the inference graph): any kernel activation of
            kernels/activation.py (`act_params`: its parameters), and a max pool stores no argmax.
        stats: a training batch norm normalises y: the epilogue also writes, per tile of rows and output
            channel, the mean of the values stored and the sum of their squared deviations from it, and each
            tile's row count (`STATS` below); the batch norm adds the tiles' in a fixed order.
        precision: "ieee" (exact fp32 tl.dot) or "tf32".
        compute: the dtype of the conv's own result, which its tl.dot operands take (kernels/precision.py),
            where it differs from the kernel's output (an epilogue op in float32 under CUDA autocast); "":
            the output's.
        name: the kernel's name; header: the file's comment header (compiler.source.header).
        labels: the IR labels of the stages present, in order: conv2d, batch norm, add, act, pool (with
            bn_after_pool: conv2d, pool, batch norm, act).
    """

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    act: str = "none"
    act_param: float = 0.0
    pool: str = "none"
    pool_k: int = 1
    save_act: bool = False
    bn: bool = False
    bn_weight: bool = False
    bn_bias: bool = False
    bn_eps: float = 1e-5
    residual: bool = False
    bn_after_pool: bool = False
    inference: bool = False
    act_params: tuple[float, ...] = ()
    stats: bool = False
    precision: str = "ieee"
    compute: str = ""  # the conv's own result dtype ("float16", ...), where the kernel's output differs from it
    name: str = "fnn_conv"
    header: str = ""
    labels: tuple[str, ...] = ("%1 conv2d",)

    def __post_init__(self) -> None:
        for f in ("stride", "padding", "dilation"):
            object.__setattr__(self, f, _pair(getattr(self, f)))
        object.__setattr__(self, "labels", tuple(self.labels))
        if not self.header:
            object.__setattr__(self, "header", file_header(self.name, list(self.labels), [], _BACKWARD))
        if self.C % self.groups or self.K % self.groups:
            raise ValueError(f"ConvSpec {self.name}: groups={self.groups} must divide C={self.C} and K={self.K}")
        known_act = self.act in ACTS or (self.inference and self.act in SAVES) or (
            self.save_act and saves_input(self.act) and not self.act_params)
        if not known_act or self.pool not in POOLS or self.precision not in ("ieee", "tf32"):
            raise ValueError(f"ConvSpec {self.name}: act {self.act!r} / pool {self.pool!r} / precision "
                             f"{self.precision!r} not in {ACTS} / {POOLS} / ('ieee', 'tf32')")
        oh, ow = self.out_hw
        if oh < 1 or ow < 1:
            raise ValueError(f"ConvSpec {self.name}: empty conv output {oh}x{ow}")
        if self.pool != "none" and (self.pool_k < 1 or min(self.pooled_hw) < 1):
            raise ValueError(f"ConvSpec {self.name}: pool_k={self.pool_k} does not fit conv output {oh}x{ow}")
        if (self.bn_weight or self.bn_bias) and not self.bn:
            raise ValueError(f"ConvSpec {self.name}: bn_weight / bn_bias without bn")
        if self.bn_after_pool and (not self.bn or self.pool == "none" or self.residual or self.save_act):
            raise ValueError(f"ConvSpec {self.name}: bn_after_pool needs a batch norm and a pool, no residual or save_act")
        if saves_input(self.act) and self.save_act and (self.pool == "max" or self.bn or self.residual
                                                             or self.inference):
            raise ValueError(f"ConvSpec {self.name}: saving z for {self.act}'s backward is for a training conv "
                             "with no max pool, batch norm or residual")
        if self.stats and (self.bn or self.inference or self.save_act):
            raise ValueError(f"ConvSpec {self.name}: stats are for a training batch norm of y (no bn, inference or save_act)")
        n_stages = 1 + self.bn + self.residual + (self.act != "none") + (self.pool != "none")
        if len(self.labels) != n_stages:
            raise ValueError(f"ConvSpec {self.name}: {n_stages} stages but labels {self.labels}")

    @property
    def roles(self) -> dict[str, str]:
        """The IR label of each stage present: conv, bn, add, act, pool."""
        order = ["conv"]
        if self.bn_after_pool:
            order += ["pool", "bn"] + (["act"] if self.act != "none" else [])
        else:
            order += ["bn"] * self.bn + ["add"] * self.residual + ["act"] * (self.act != "none")
            order += ["pool"] * (self.pool != "none")
        return dict(zip(order, self.labels))

    @property
    def depthwise(self) -> bool:
        """Each output channel filters its own input channel (groups == C == K): the direct kernel."""
        return 1 < self.groups == self.C == self.K

    @property
    def plain_gemm(self) -> bool:
        """A 1x1 conv with stride 1 and no padding is a plain GEMM: nothing to gather, larger tiles. Not with
        save_act: a fused pool then also visits partial windows past the input, which only the gather masks."""
        return self.R == self.S == 1 and self.stride == (1, 1) and self.padding == (0, 0) and not self.save_act

    @property
    def out_hw(self) -> tuple[int, int]:
        """The conv output (OH, OW)."""
        return conv_out_hw((self.H, self.W), (self.R, self.S), self.stride, self.padding, self.dilation)

    @property
    def pooled_hw(self) -> tuple[int, int]:
        """The kernel's y spatial shape: (PH, PW) after the floor-mode pool, else (OH, OW)."""
        oh, ow = self.out_hw
        return (oh // self.pool_k, ow // self.pool_k) if self.pool != "none" else (oh, ow)


def _temp(label: str, fallback: str) -> str:
    """The temporary named after an IR label: "%2 relu" -> relu_2."""
    m = re.match(r"\s*%(\w+)\s+([A-Za-z_]\w*)", label)
    return f"{m.group(2)}_{m.group(1)}" if m else fallback


def _act_lines(spec: ConvSpec, z: str, out: str) -> list[str]:
    """Activation of the fp32 tile `z` into `out`, through the one definition of each formula in
    kernels/activation.py (shared with the pointwise and linear kernels); NaN propagates as in torch."""
    if spec.act == "leaky_relu" and not spec.act_params:
        return [f"{out} = _leaky_relu({z}, ACT_PARAM)"]
    if spec.act == "neg":
        return [f"{out} = -{z}"]
    if spec.act in ACTS and not spec.act_params:
        return [f"{out} = _{spec.act}({z})"]
    if spec.act in SAVES:
        params = "".join(f", {float(p)!r}" for p in spec.act_params)
        return [f"{out} = _{spec.act}({z}{params})"]
    raise ValueError(f"unknown activation {spec.act!r}")


def _bn_lines(conv: str, out: str, spec: ConvSpec) -> list[str]:
    """The batch norm of a tile with the running statistics, the same expression as the batch norm kernel's
    (fused and unfused agree). Its per-channel vectors are loaded here, after the main loop, not before it:
    live across the loop they spilled on sm_90 (airbench's conv -> pool -> batch norm -> GELU, triton 3.9:
    2 registers to an 8-byte stack)."""
    lines = [f"# {spec.roles['bn']} with the running statistics, per output channel, read on every call",
             "bn_mean = tl.load(rm_ptr + k, mask=j_ok, other=0.0).to(tl.float32)",
             "bn_scale = 1.0 / tl.sqrt(tl.load(rv_ptr + k, mask=j_ok, other=1.0).to(tl.float32) + BN_EPS)"]
    if spec.bn_weight:
        lines.append("bn_scale = bn_scale * tl.load(bnw_ptr + k, mask=j_ok, other=0.0)")
    expr = f"({conv} - bn_mean[None, :]) * bn_scale[None, :]"
    if spec.bn_bias:
        expr += " + tl.load(bnb_ptr + k, mask=j_ok, other=0.0)[None, :]"
    return lines + [f"{out} = {expr}"]


def generate(spec: ConvSpec) -> str:
    """The complete source of the kernel file for `spec`: header, the @triton.jit kernel, `launch`."""
    pooled = spec.pool != "none"
    roles = spec.roles
    conv_t = _temp(roles["conv"], "z")
    # what the pool reduces: the activation (or the last stage before it), or with bn_after_pool the conv
    pre_pool = conv_t
    if not spec.bn_after_pool:
        for role, fallback in (("bn", "bn"), ("add", "r"), ("act", "a")):
            if role in roles:
                pre_pool = _temp(roles[role], fallback)
    act_t = pre_pool
    pool_t = _temp(roles["pool"], "p") if pooled else pre_pool
    OH, OW = spec.out_hw
    PH, PW = spec.pooled_hw
    # With save_act a fused pool also visits the partial windows past the floor-mode output, so `a` is
    # written everywhere; those rows store no y.
    partial = pooled and spec.save_act and (OH % spec.pool_k or OW % spec.pool_k)
    rows_h, rows_w = ("WIN_H", "WIN_W") if partial else ("PH", "PW") if pooled else ("OH", "OW")
    ri, rj = ("ph", "pw") if pooled else ("oh", "ow")

    src = Source()
    src.writelines(spec.header)
    src.writelines("""
        from __future__ import annotations

        import triton
        import triton.language as tl

        from fusednn.compiler import configs
        from fusednn.kernels.activation import _leaky_relu, _relu, _sigmoid, _tanh
        from fusednn.kernels.precision import _dot_in
        from fusednn.launch import launch as launch_kernel
    """)
    if spec.act not in (*ACTS, "neg"):
        src.writeline(f"from fusednn.kernels.activation import _{spec.act}")
    src.writeline()
    src.writeline()

    # ---- the kernel signature: only the buffers this variant touches
    ptrs = [("x_ptr", "input [N, C, H, W]"), ("w_ptr", "filters [K, C // GROUPS, R, S]")]
    if spec.bias:
        ptrs.append(("b_ptr", "bias [K]"))
    if spec.bn:
        ptrs += [("rm_ptr", "batch norm running mean [K]"), ("rv_ptr", "batch norm running variance [K]")]
        if spec.bn_weight:
            ptrs.append(("bnw_ptr", "batch norm weight [K]"))
        if spec.bn_bias:
            ptrs.append(("bnb_ptr", "batch norm bias [K]"))
    if spec.residual:
        ptrs.append(("r_ptr", "residual [N, K, OH, OW], added after the batch norm"))
    ptrs.append(("y_ptr", "pooled output [N, K, PH, PW]" if pooled else "output [N, K, OH, OW]"))
    store_idx = spec.pool == "max" and not spec.inference
    if store_idx:
        ptrs.append(("idx_ptr", "uint8 [N, K, PH, PW]: window offset dh * POOL_K + dw of each max"))
    if spec.save_act:
        ptrs.append(("a_ptr", "the conv's result before the activation [N, K, OH, OW], saved for backward"
                     if saves_input(spec.act) else "activation before the pool [N, K, OH, OW], saved for backward"))
    if spec.stats:
        ptrs.append(("st_ptr", "float32 [T * (2 * K + 1)], T row tiles: the tiles' means [T, K], sums of "
                               "squared deviations [T, K], row counts [T]"))
    consts = [
        ("C, H, W", "input shape [N, C, H, W]"),
        ("K, R, S, GROUPS", "filters"),
        ("STRIDE_H, STRIDE_W, PAD_H, PAD_W", "stride, zero padding"),
        ("DIL_H, DIL_W", "dilation"),
        ("OH, OW", "conv output"),
    ]
    if pooled:
        consts.append(("POOL_K, PH, PW", "pool window (== stride) and pooled output"))
    if partial:
        consts.append(("WIN_H, WIN_W", "pool windows visited, partial ones included (for a)"))
    if spec.act == "leaky_relu":
        consts.append(("ACT_PARAM", "negative slope"))
    if spec.bn:
        consts.append(("BN_EPS", "batch norm epsilon"))
    consts += [("BLOCK_M, BLOCK_N, BLOCK_K", ""), ("PRECISION", '"ieee" or "tf32"')]
    src.writeline('@triton.jit(do_not_specialize=["N"])')
    src.writeline(f"def {spec.name}(")
    with src.indent():
        for p, doc in ptrs:
            src.writeline(f"{p},  # {doc}")
        src.writeline("N,  # batch, a runtime int: one compiled kernel serves every batch size")
        for names, doc in consts:
            line = ", ".join(f"{c}: tl.constexpr" for c in names.split(", ")) + ","
            src.writeline(f"{line}  # {doc}" if doc else line)
    src.writeline("):")

    with src.indent():
        if spec.depthwise:
            src.writelines(f"""
                # Direct depthwise conv (GROUPS == C == K): each output channel k filters its own input
                # channel k, so the columns are all K channels (one program along axis 2: g = 0) and each
                # of the R * S taps is one multiply-add per element, no GEMM:
                #   rows     m = (n, {ri}, {rj})  {'pool windows' if pooled else 'output positions'}
                #   columns  j = k            output channels (= input channels)
                KG: tl.constexpr = K
            """)
        else:
            src.writelines(f"""
                # Implicit GEMM, one group g per program along axis 2:
                #   rows     m = (n, {ri}, {rj})  {'pool windows' if pooled else 'output positions'}
                #   columns  j = k            the group's K // GROUPS output channels
                #   reduce   q = (c, r, s)    the group's C // GROUPS * R * S taps, one axis so that a
                #                             1-channel input still fills BLOCK_K
                CG: tl.constexpr = C // GROUPS
                KG: tl.constexpr = K // GROUPS
                CRS: tl.constexpr = CG * R * S
            """)
        src.writelines(f"""
            pid_m = tl.program_id(0)
            pid_n = tl.program_id(1)
            g = tl.program_id(2)

            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            m_ok = offs_m < N * {rows_h} * {rows_w}
            # rows past the end repeat the last one: every load stays in bounds without a row mask (with
            # the batch a runtime value, row predicates live through the main loop and spill on sm_90);
            # only the stores are masked
            rows = tl.minimum(offs_m, N * {rows_h} * {rows_w} - 1)
            n = rows // ({rows_h} * {rows_w})
            {ri} = (rows // {rows_w}) % {rows_h}
            {rj} = rows % {rows_w}
            offs_j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            j_ok = offs_j < KG
            k = g * KG + offs_j  # output channel
        """)
        if not spec.depthwise:
            src.writeline("offs_q = tl.arange(0, BLOCK_K)")
        if spec.bias:
            src.writeline("bias = tl.load(b_ptr + k, mask=j_ok, other=0.0)")
        src.writeline()

        if pooled:
            if spec.pool == "max":
                src.writelines(f"""
                    # {roles["conv"]} is evaluated once per offset (dh, dw) of the pool window and
                    # {roles["pool"]} keeps the running max{"" if spec.inference else " and where it was"}
                    {pool_t} = tl.full((BLOCK_M, BLOCK_N), float("-inf"), tl.float32)
                """)
                if store_idx:
                    src.writeline("win = tl.zeros((BLOCK_M, BLOCK_N), tl.int32)")
            else:
                src.writelines(f"""
                    # {roles["conv"]} is evaluated once per offset (dh, dw) of the pool window and
                    # {roles["pool"]} sums the window
                    {pool_t} = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
                """)
            src.writeline("for dh in range(POOL_K):")
            with src.indent():
                src.writeline("for dw in range(POOL_K):")
                with src.indent():
                    src.writelines("""
                        oh = ph * POOL_K + dh
                        ow = pw * POOL_K + dw
                    """)
                    _conv_body(src, spec, conv_t, pre_pool, pool_t, partial)
        else:
            _conv_body(src, spec, conv_t, pre_pool, pool_t, partial)
        src.writeline()
        final = f"{pool_t} / (POOL_K * POOL_K)" if spec.pool == "avg" else pool_t
        if spec.bn_after_pool:  # conv -> pool -> batch norm -> [act], on the pooled tile
            if spec.pool == "avg":
                src.writeline(f"{pool_t} = {final}")
                final = pool_t
            bn_t = _temp(roles["bn"], "bn")
            for line in _bn_lines(final, bn_t, spec):
                src.writeline(line)
            final = bn_t
            if "act" in roles:
                act_t = _temp(roles["act"], "a")
                src.writeline(f"# {roles['act']}")
                for line in _act_lines(spec, bn_t, act_t):
                    src.writeline(line)
                final = act_t

        y_h, y_w = ("PH", "PW") if pooled else ("OH", "OW")
        src.writeline(f"y_off = ((n[:, None] * K + k[None, :]) * {y_h} + {ri}[:, None]) * {y_w} + {rj}[:, None]")
        if partial:
            src.writeline("y_ok = (m_ok & (ph < PH) & (pw < PW))[:, None] & j_ok[None, :]  # full windows only")
        else:
            src.writeline("y_ok = m_ok[:, None] & j_ok[None, :]")
        src.writeline(f"tl.store(y_ptr + y_off, {final}, mask=y_ok)")
        if store_idx:
            src.writeline("tl.store(idx_ptr + y_off, win.to(tl.uint8), mask=y_ok)")
        if spec.save_act and not pooled:  # what act' is read from: z where it needs the input, else act(z)
            src.writeline(f"tl.store(a_ptr + y_off, {conv_t if saves_input(spec.act) else act_t}, mask=y_ok)")
        if spec.stats:
            _stats_lines(src, final, f"{rows_h} * {rows_w}")
    src.writeline()
    src.writeline()
    _launch_fn(src, spec, rows_h, rows_w, partial)
    return src.getvalue()


def _stats_lines(src: Source, final: str, rows: str) -> None:
    """The batch statistics of this tile of y, per channel, for the training batch norm that normalises y:
    the values as stored (rounded to y's dtype), their mean and the sum of squared deviations from it
    (corrected two-pass over registers, as the batch norm's own: no E[y²] − E[y]² cancellation, and the
    mean corrected for the rounding of its sum), and the tile's row count. Tile pid_m's
    entries sit at pid_m of each [T, ...] part; the batch norm combines them in tile order (Chan et al.)."""
    src.writelines(f"""
        # batch statistics of the tile for the training batch norm of y (STATS)
        st_y = ({final}).to(y_ptr.dtype.element_ty).to(tl.float32)
        st_rows = tl.minimum(N * {rows} - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        st_mean = tl.sum(tl.where(m_ok[:, None], st_y, 0.0), axis=0) / st_rows
        st_dev = tl.where(m_ok[:, None], st_y - st_mean[None, :], 0.0)
        st_sum_dev = tl.sum(st_dev, axis=0)  # corrects the mean for the rounding of the first sum
        st_m2 = tl.sum(st_dev * st_dev, axis=0) - st_sum_dev * st_sum_dev / st_rows
        st_tiles = tl.num_programs(0)
        tl.store(st_ptr + pid_m * K + k, st_mean + st_sum_dev / st_rows, mask=j_ok)
        tl.store(st_ptr + (st_tiles + pid_m) * K + k, st_m2, mask=j_ok)
        if (pid_n == 0) & (g == 0):
            tl.store(st_ptr + 2 * st_tiles * K + pid_m, st_rows)
    """)


def _conv_body(src: Source, spec: ConvSpec, conv_t: str, act_t: str, pool_t: str, partial: bool) -> None:
    """The GEMM main loop at conv positions (oh, ow), then bias, [batch norm, residual add, activation]
    (unless the batch norm follows the pool), the save of a and the pool step (reducing `act_t`)."""
    roles = spec.roles
    ok = "conv_ok" if partial else "m_ok"
    if partial:
        src.writeline("conv_ok = m_ok & (oh < OH) & (ow < OW)")
    ct = f"tl.{spec.compute}" if spec.compute else "y_ptr.dtype.element_ty"
    if spec.depthwise:
        src.writelines(f"""
            # {roles["conv"]}, depthwise: tap (r, s) of channel k reads input channel k
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for rs in range(R * S):
                ih = oh * STRIDE_H - PAD_H + (rs // S) * DIL_H
                iw = ow * STRIDE_W - PAD_W + (rs % S) * DIL_W
                x_ok = ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[:, None] & j_ok[None, :]
                x_tile = tl.load(x_ptr + ((n[:, None] * C + k[None, :]) * H + ih[:, None]) * W + iw[:, None],
                                 mask=x_ok, other=0.0)
                w_tap = tl.load(w_ptr + k * (R * S) + rs, mask=j_ok, other=0.0)  # w is [K, 1, R, S]
                # operands rounded as tl.dot takes them (float16 in), products and sums in fp32
                acc += _dot_in(x_tile, {ct}).to(tl.float32) * _dot_in(w_tap, {ct}).to(tl.float32)[None, :]
            {conv_t} = acc{' + bias[None, :]' if spec.bias else ''}
        """)
    else:
        _gemm_lines(src, spec, conv_t, ct)
    _epilogue_lines(src, spec, conv_t, act_t, pool_t, partial, ok)


def _gemm_lines(src: Source, spec: ConvSpec, conv_t: str, ct: str) -> None:
    """The implicit-GEMM main loop of one group's tile, into `conv_t` (bias added); a plain GEMM for a 1x1
    conv with stride 1 and no padding."""
    if spec.plain_gemm:
        src.writelines(f"""
            # {spec.roles["conv"]}, 1x1 with stride 1 and no padding: a plain GEMM over x viewed as
            # [N, C, H * W] (nothing gathered: each row's channels are H * W apart, its positions contiguous)
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for q0 in range(0, CRS, BLOCK_K):
                c = g * CG + q0 + offs_q  # input channel
                q_ok = q0 + offs_q < CRS
                x_tile = tl.load(x_ptr + (n[:, None] * C + c[None, :]) * (H * W) + (oh * W + ow)[:, None],
                                 mask=q_ok[None, :], other=0.0)
                w_tile = tl.load(w_ptr + k[None, :] * CRS + (q0 + offs_q)[:, None], mask=q_ok[:, None] & j_ok[None, :],
                                 other=0.0)
                acc = tl.dot(_dot_in(x_tile, {ct}), _dot_in(w_tile, {ct}), acc, input_precision=PRECISION)
            {conv_t} = acc{' + bias[None, :]' if spec.bias else ''}
        """)
        return
    src.writelines(f"""
        # {spec.roles["conv"]}
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for q0 in range(0, CRS, BLOCK_K):
            q = q0 + offs_q
            q_ok = q < CRS
            c = g * CG + q // (R * S)  # input channel
            ih = oh[:, None] * STRIDE_H - PAD_H + ((q // S) % R)[None, :] * DIL_H
            iw = ow[:, None] * STRIDE_W - PAD_W + (q % S)[None, :] * DIL_W
            x_ok = q_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_tile = tl.load(x_ptr + ((n[:, None] * C + c[None, :]) * H + ih) * W + iw, mask=x_ok, other=0.0)
            # w is [K, CG * R * S] row-major: the (c, r, s) taps of channel k are contiguous
            w_tile = tl.load(w_ptr + k[None, :] * CRS + q[:, None], mask=q_ok[:, None] & j_ok[None, :], other=0.0)
            # operands in the output's precision (float16 in, fp32 accumulation), the epilogue in fp32
            acc = tl.dot(_dot_in(x_tile, {ct}), _dot_in(w_tile, {ct}), acc, input_precision=PRECISION)
        {conv_t} = acc{' + bias[None, :]' if spec.bias else ''}
    """)


def _epilogue_lines(src: Source, spec: ConvSpec, conv_t: str, act_t: str, pool_t: str, partial: bool, ok: str) -> None:
    """What follows the conv at conv positions: [batch norm, residual add, activation] (unless the batch
    norm follows the pool), the save of a and the pool step (reducing `act_t`)."""
    roles = spec.roles
    pre = conv_t
    if spec.bn and not spec.bn_after_pool:
        bn_t = _temp(roles["bn"], "bn")
        for line in _bn_lines(conv_t, bn_t, spec):
            src.writeline(line)
        pre = bn_t
    if spec.residual:
        add_t = _temp(roles["add"], "r")
        src.writelines(f"""
            # {roles["add"]}: the residual at the conv output positions
            r_off = ((n[:, None] * K + k[None, :]) * OH + oh[:, None]) * OW + ow[:, None]
            {add_t} = {pre} + tl.load(r_ptr + r_off, mask={"conv_ok[:, None] & " if partial else ""}j_ok[None, :], other=0.0)
        """)
        pre = add_t
    if spec.act != "none" and not spec.bn_after_pool:
        src.writeline(f"# {roles['act']}")
        for line in _act_lines(spec, pre, act_t):
            src.writeline(line)
    if spec.save_act and spec.pool != "none":
        saved, what = (pre, "z") if saves_input(spec.act) else (act_t, "a = act(z)")
        src.writelines(f"""
            # {what} at every conv position, saved for backward (avg pool's act' needs them all)
            a_off = ((n[:, None] * K + k[None, :]) * OH + oh[:, None]) * OW + ow[:, None]
            tl.store(a_ptr + a_off, {saved}, mask={ok}[:, None] & j_ok[None, :])
        """)
    if spec.pool == "max":
        src.writelines(f"""
            # {roles["pool"]}: a strict > keeps the first max in scan order; a NaN always takes over,
            # as in torch (so the last NaN of a window is the one recorded)
            take = ({act_t} > {pool_t}) | ({act_t} != {act_t})
            {pool_t} = tl.where(take, {act_t}, {pool_t})
        """)
        if not spec.inference:
            src.writeline("win = tl.where(take, dh * POOL_K + dw, win)")
    elif spec.pool == "avg":
        src.writelines(f"""
            # {roles["pool"]}
            {pool_t} += {act_t}
        """)


def _launch_fn(src: Source, spec: ConvSpec, rows_h: str, rows_w: str, partial: bool) -> None:
    """The plain `launch(x, w, b, y, idx, a)` that picks tiles and launches the kernel once."""
    OH, OW = spec.out_hw
    PH, PW = spec.pooled_hw
    dims = {"OH": OH, "OW": OW, "PH": PH, "PW": PW,
            "WIN_H": -(-OH // spec.pool_k), "WIN_W": -(-OW // spec.pool_k)}
    per_image = dims[rows_h] * dims[rows_w]
    kg = spec.K // spec.groups
    crs = spec.C // spec.groups * spec.R * spec.S
    (sh, sw), (ph, pw), (dh, dw) = spec.stride, spec.padding, spec.dilation
    args = ["x", "w"] + (["b"] if spec.bias else [])
    if spec.bn:
        args += ["rm", "rv"] + (["bn_w"] if spec.bn_weight else []) + (["bn_b"] if spec.bn_bias else [])
    args += (["r"] if spec.residual else []) + ["y"]
    args += (["idx"] if spec.pool == "max" and not spec.inference else []) + (["a"] if spec.save_act else [])
    args += ["st"] if spec.stats else []
    meta = [f"C={spec.C}, H={spec.H}, W={spec.W}, K={spec.K}, R={spec.R}, S={spec.S}, "
            f"GROUPS={spec.groups},",
            f"STRIDE_H={sh}, STRIDE_W={sw}, PAD_H={ph}, PAD_W={pw}, DIL_H={dh}, DIL_W={dw}, "
            f"OH={OH}, OW={OW},"]
    if spec.pool != "none":
        meta.append(f"POOL_K={spec.pool_k}, PH={PH}, PW={PW},")
    if partial:
        meta.append(f"WIN_H={dims['WIN_H']}, WIN_W={dims['WIN_W']},")
    if spec.act == "leaky_relu":
        meta.append(f"ACT_PARAM={float(spec.act_param)!r},")
    if spec.bn:
        meta.append(f"BN_EPS={float(spec.bn_eps)!r},")
    meta.append(f'PRECISION="{spec.precision}", **cfg,')
    stages = ", ".join(spec.labels)
    # A long activation formula, or a max pool that also writes its argmax (training), per tile element
    heavy = ", heavy_epilogue=True" if spec.act not in ("none", *ACTS) or (spec.pool == "max" and not spec.inference) else ""
    if spec.depthwise:
        cfg, cols, axis2 = f"configs.depthwise({spec.N * per_image}, {spec.K}{heavy})", spec.K, 1
    else:
        gather = "" if spec.plain_gemm else ", gather=True"
        cfg, cols, axis2 = f"configs.gemm({spec.N * per_image}, {kg}, {crs}{gather}{heavy})", kg, spec.groups
    bn_args = spec.inference or spec.bn or spec.residual
    extra = ", rm=None, rv=None, bn_w=None, bn_b=None, r=None" if bn_args else ""
    extra_doc = " (the batch norm's rm, rv, bn_w, bn_b; the residual r)" if bn_args else ""
    if spec.stats:
        extra += ", st=None"
        extra_doc += " (st: the statistics partials, `stats_size(n)` floats)"
    src.writelines(f'''
        def launch(x, w, b, y, idx, a{extra}, nbytes=None):
            """{stages} in one launch; b, idx, a{extra_doc} are None where this variant has none."""
            # GEMM view: M = N * {per_image} rows, N = {kg} channels per group, K = {crs} taps; tiles for
            # the nominal batch {spec.N}, whatever x's batch
            n = x.shape[0]
            cfg = {cfg}
            grid = (configs.cdiv(n * {per_image}, cfg["BLOCK_M"]), configs.cdiv({cols}, cfg["BLOCK_N"]), {axis2})
            launch_kernel(
                {spec.name}, grid, {", ".join(args)}, n, nbytes=nbytes,
    ''')
    with src.indent(), src.indent():
        for line in meta:
            src.writeline(line)
    with src.indent():
        src.writeline(")")
    if spec.stats:
        src.writeline()
        src.writeline()
        src.writelines(f'''
            def stats_size(n):
                """Floats of the statistics partials `st` at batch n: T row tiles x (2 K + 1)."""
                cfg = {cfg}
                return configs.cdiv(n * {per_image}, cfg["BLOCK_M"]) * {2 * spec.K + 1}
        ''')
