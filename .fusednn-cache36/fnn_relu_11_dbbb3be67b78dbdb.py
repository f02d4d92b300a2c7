# fusednn generated kernel fnn_relu_11
# implements: %11 relu   (module: relu)
# backward: kernels/activation.py
import triton
import triton.language as tl

from fusednn.compiler import configs as _configs
from fusednn.kernels.activation import _relu
from fusednn.launch import launch as _launch


@triton.jit(do_not_specialize=["numel"])  # numel follows the batch: one kernel for every batch size
def fnn_relu_11(
    x_ptr,  # [672] input x
    v11_ptr,  # [672] output of %11 relu
    numel,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    # %11 relu
    v11 = _relu(x)
    tl.store(v11_ptr + offs, v11, mask=mask)


def launch(x, v11, nbytes=None):
    """Run fnn_relu_11 over the outputs' elements (672 at the nominal batch, which picks the block); outputs are preallocated contiguous tensors."""
    numel = v11.numel()
    meta = _configs.elementwise(672)
    _launch(fnn_relu_11, (_configs.cdiv(numel, meta["BLOCK"]),), x, v11, numel, nbytes=nbytes, **meta)
