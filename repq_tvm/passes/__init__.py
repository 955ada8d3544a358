"""Relax passes that lower the canonical fake-quant graph (repq_tvm.frontends) to integer kernels."""
