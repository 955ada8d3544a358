"""NumPy-callable harnesses compiled from the kernels in `repq_tvm.kernels`, one module per kernel family.

Each class compiles a kernel for a target and runs it on NumPy arrays (operand preparation, calls, timings,
assembly): what the kernel tests and benchmarks need to check a kernel bit for bit against the NumPy
reference and to time it.  The compiler never uses them: its passes take the kernels' PrimFuncs and
schedules, so `repq_tvm.kernels` holds only computes, schedules and PrimFunc builders.
"""
