# fusednn generated kernel fnn_relu_5
# implements: %5 relu   (module: relu)
# backward: kernels/activation.py
import triton
import triton.language as tl

from fusednn.compiler import configs as _configs
from fusednn.kernels.activation import _relu
from fusednn.launch import launch as _launch


@triton.jit(do_not_specialize=["numel"])  # numel follows the batch: one kernel for every batch size
def fnn_relu_5(
    x_ptr,  # [102400] input x
    v5_ptr,  # [102400] output of %5 relu
    numel,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    # %5 relu
    v5 = _relu(x)
    tl.store(v5_ptr + offs, v5, mask=mask)


def launch(x, v5, nbytes=None):
    """Run fnn_relu_5 over the outputs' elements (102400 at the nominal batch, which picks the block); outputs are preallocated contiguous tensors."""
    numel = v5.numel()
    meta = _configs.elementwise(102400)
    _launch(fnn_relu_5, (_configs.cdiv(numel, meta["BLOCK"]),), x, v5, numel, nbytes=nbytes, **meta)
