"""fusednn's compiler: IR, ops registry, tracer, passes, autodiff plan and Triton code generation."""
