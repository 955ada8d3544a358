"""Hand-scheduled TVM kernels for the integer graph (untuned TVM has no good int8 matmul rule)."""
