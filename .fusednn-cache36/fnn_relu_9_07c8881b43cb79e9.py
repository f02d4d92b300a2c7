# fusednn generated kernel fnn_relu_9
# implements: %9 relu   (module: relu)
# backward: kernels/activation.py
import triton
import triton.language as tl

from fusednn.compiler import configs as _configs
from fusednn.kernels.activation import _relu
from fusednn.launch import launch as _launch


@triton.jit(do_not_specialize=["numel"])  # numel follows the batch: one kernel for every batch size
def fnn_relu_9(
    x_ptr,  # [7680] input x
    v9_ptr,  # [7680] output of %9 relu
    numel,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    # %9 relu
    v9 = _relu(x)
    tl.store(v9_ptr + offs, v9, mask=mask)


def launch(x, v9, nbytes=None):
    """Run fnn_relu_9 over the outputs' elements (7680 at the nominal batch, which picks the block); outputs are preallocated contiguous tensors."""
    numel = v9.numel()
    meta = _configs.elementwise(7680)
    _launch(fnn_relu_9, (_configs.cdiv(numel, meta["BLOCK"]),), x, v9, numel, nbytes=nbytes, **meta)
