"""Integer reference semantics (NumPy): the oracle for the compiled integer kernels."""
