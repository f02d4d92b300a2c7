"""The linear_relu forward template: y[M, N] = act(x[M, K] @ w[N, K]ᵀ + b) as one tiled Triton GEMM.

Modelled on Triton's 03-matrix-multiplication tutorial: grouped program order, fp32 accumulator, and the
bias + activation epilogue applied while the accumulator is still fp32 in registers. Shapes, bias and
activation are fixed per spec, so the generated file holds only the code of the stages present. The
row count M (the batch, times any middle dims) is a runtime int the kernel does not specialise on, and
the tiles are chosen for the spec's nominal M: one compiled kernel serves every batch size.
Backward: kernels/linear_relu.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from fusednn.compiler.source import Source
from fusednn.kernels.activation import EPILOGUE_ACTS as ACTS, NPARAMS, saves_input

PRECISIONS = ("ieee", "tf32")

# Activation epilogues: the line computing the activation `{v}` of the linear stage's value `{z}`, through
# the one definition of each formula in kernels/activation.py (shared with the pointwise kernels).
_EPILOGUES = {
    "relu": ["{v} = _relu({z})"],
    "leaky_relu": ["{v} = _leaky_relu({z}, {slope})"],
    "sigmoid": ["{v} = _sigmoid({z})"],
    "tanh": ["{v} = _tanh({z})"],
}


@dataclass(frozen=True, slots=True)
class LinearSpec:
    """One fused linear (+bias) (+activation) kernel: what `generate` needs to write it.

    labels: IR labels of the stages present, linear first, e.g. ("%7 linear", "%8 relu");
    act: one of ACTS, or a parameter-free activation whose act' needs its input (kernels/activation
        .saves_input: gelu, silu, mish, hardswish, ...);
    act_param: negative slope of leaky_relu (ignored by other activations);
    precision: "ieee" (exact fp32 tl.dot) or "tf32";
    save_input: also write the result before the activation, z [M, N], which such an activation's
        backward reads (a training graph).
    """

    name: str
    header: str
    labels: tuple[str, ...]
    M: int
    N: int
    K: int
    bias: bool
    act: str
    act_param: float
    precision: str
    save_input: bool = False


def _check(spec: LinearSpec) -> None:
    if spec.act not in ACTS and not (saves_input(spec.act) and not NPARAMS.get(spec.act)):
        raise ValueError(f"{spec.name}: act must be one of {ACTS} or a parameter-free activation whose act' "
                         f"needs its input, got {spec.act!r}")
    if spec.save_input and not saves_input(spec.act):
        raise ValueError(f"{spec.name}: save_input is for an activation whose act' needs its input, not {spec.act!r}")
    if spec.precision not in PRECISIONS:
        raise ValueError(f"{spec.name}: precision must be one of {PRECISIONS}, got {spec.precision!r}")
    if min(spec.M, spec.N, spec.K) < 1:
        raise ValueError(f"{spec.name}: M, N, K must be >= 1, got {spec.M}, {spec.N}, {spec.K}")
    stages = 1 if spec.act == "none" else 2
    if len(spec.labels) != stages:
        raise ValueError(f"{spec.name}: expected {stages} labels (linear, then act), got {spec.labels}")
    if spec.act == "leaky_relu" and not spec.act_param >= 0.0:
        raise ValueError(f"{spec.name}: leaky_relu needs negative_slope >= 0, got {spec.act_param}")
    if not spec.name.isidentifier():
        raise ValueError(f"kernel name must be a Python identifier, got {spec.name!r}")


def _var(label: str) -> str:
    """The Python name of an IR value: "%7 linear" -> "v7"."""
    return "v" + re.sub(r"\W", "_", label.split()[0].lstrip("%"))


def generate(spec: LinearSpec) -> str:
    """The text of a Python file with the Triton kernel `spec.name` and its `launch(x, w, b, y)`."""
    _check(spec)
    z = _var(spec.labels[0])
    extra_import = "" if spec.act in ACTS else f", _{spec.act}"
    s = Source()
    s.writelines(spec.header)
    s.writelines(
        f"""
        from __future__ import annotations

        import triton
        import triton.language as tl

        from fusednn.compiler import configs
        from fusednn.kernels.activation import _leaky_relu, _relu, _sigmoid, _tanh{extra_import}
        from fusednn.kernels.precision import _dot_in
        from fusednn.launch import launch as _launch

        M, N, K = {spec.M}, {spec.N}, {spec.K}  # M: rows at the nominal batch (tiles are chosen for it)
        # Programs walk output tiles in groups of GROUP_M rows so that neighbours share w tiles in L2
        # (the tutorial's swizzle); an ordering choice, not a tile size.
        GROUP_M = 8


        @triton.jit(do_not_specialize=["M"])  # M follows the batch
        def {spec.name}(
        """
    )
    with s.indent():
        s.writeline("x_ptr,  # [M, K] input activations")
        s.writeline("w_ptr,  # [N, K] weight, nn.Linear layout (y = x @ w.T)")
        if spec.bias:
            s.writeline("b_ptr,  # [N] bias")
        s.writelines(
            """
            y_ptr,  # [M, N] output
            """
        )
        if spec.save_input:
            s.writeline("z_ptr,  # [M, N] the result before the activation, saved for backward (y's strides)")
        s.writelines(
            """
            M, N, K,
            stride_xm, stride_xk,
            stride_wn, stride_wk,
            stride_ym, stride_yn,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
            GROUP_M: tl.constexpr, PRECISION: tl.constexpr,
            """
        )
    s.writeline("):")
    with s.indent():
        s.writelines(
            """
            pid = tl.program_id(axis=0)
            num_pid_m = tl.cdiv(M, BLOCK_M)
            num_pid_n = tl.cdiv(N, BLOCK_N)
            num_pid_in_group = GROUP_M * num_pid_n
            group_id = pid // num_pid_in_group
            first_pid_m = group_id * GROUP_M
            group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
            pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
            pid_n = (pid % num_pid_in_group) // group_size_m

            offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            offs_k = tl.arange(0, BLOCK_K)
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk
            # w is [N, K]; reading it through these strides gives the [BLOCK_K, BLOCK_N] tile of w.T
            wt_ptrs = w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn
            """
        )
        s.writeline()
        s.writeline(f"# {spec.labels[0]}")
        s.writelines(
            """
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(0, tl.cdiv(K, BLOCK_K)):
                k_left = K - k * BLOCK_K  # masks the K remainder: its zeros add nothing
                x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < k_left), other=0.0)
                wt = tl.load(wt_ptrs, mask=(offs_k[:, None] < k_left) & (offs_n[None, :] < N), other=0.0)
                acc = tl.dot(_dot_in(x, y_ptr.dtype.element_ty), _dot_in(wt, y_ptr.dtype.element_ty), acc, input_precision=PRECISION)
                x_ptrs += BLOCK_K * stride_xk
                wt_ptrs += BLOCK_K * stride_wk
            """
        )
        if spec.bias:
            s.writeline("b = tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0)")
            s.writeline(f"{z} = acc + b[None, :]")
        else:
            s.writeline(f"{z} = acc")
        out = z
        if spec.act != "none":
            out = _var(spec.labels[1])
            s.writeline()
            s.writeline(f"# {spec.labels[1]}")
            for line in _EPILOGUES.get(spec.act, ["{v} = _" + spec.act + "({z})"]):
                s.writeline(line.format(v=out, z=z, slope=repr(float(spec.act_param))))
        s.writeline()
        s.writelines(
            f"""
            y_off = offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
            y_ok = (offs_m[:, None] < M) & (offs_n[None, :] < N)
            tl.store(y_ptr + y_off, {out}, mask=y_ok)
            """
        )
        if spec.save_input:
            s.writeline(f"tl.store(z_ptr + y_off, {z}, mask=y_ok)  # what act' is read from")
    what = "x @ w.T + b" if spec.bias else "x @ w.T"
    if spec.act != "none":
        what = f"{spec.act}({what})"
    b_check = "b is not None and b.shape == (N,)" if spec.bias else "b is None"
    b_doc = "[N]" if spec.bias else "None"
    b_pass = "b, " if spec.bias else ""
    z_pass = "z, " if spec.save_input else ""
    z_check = " and z is not None and z.shape == y.shape and z.stride() == y.stride()" if spec.save_input else ""
    s.writeline()
    s.writeline()
    s.writelines(
        f"""
        def launch(x, w, b, y, z=None, nbytes=None):
            \"\"\"y[m, N] = {what}; x [m, K], w [N, K], b {b_doc}; fp32, contiguous; any row count m;
            z: the result before the activation, written where this variant saves it (else None).\"\"\"
            m = x.shape[0]
            if not (x.shape == (m, K) and w.shape == (N, K) and y.shape == (m, N) and {b_check}{z_check}):
                shapes = [None if t is None else tuple(t.shape) for t in (x, w, b, y)]
                raise ValueError(f"{spec.name}: launch(x, w, b, y) got shapes {{shapes}}, "
                                 f"built for [rows, K={{K}}] @ [N={{N}}, K]")
            cfg = configs.gemm(M, N, K)
            grid = (configs.cdiv(m, cfg["BLOCK_M"]) * configs.cdiv(N, cfg["BLOCK_N"]),)
            _launch(
                {spec.name}, grid,
                x, w, {b_pass}y, {z_pass}m, N, K,
                x.stride(0), x.stride(1), w.stride(0), w.stride(1), y.stride(0), y.stride(1),
                GROUP_M=GROUP_M, PRECISION={spec.precision!r}, nbytes=nbytes, **cfg,
            )
        """
    )
    return s.getvalue()
