"""Hand-written Triton kernels: the backward pass of every pattern and op, and the fused SGD update."""
