"""The tools built on fusednn's library: the `fusednn` command line (cli), training (train, data), the
benchmark (bench), the dump and what it writes (dump, aot, repro, kernel_table). The library never imports
them, except that `CompiledModule.dump()` hands over to `tools.dump`."""
