"""Primitive ops of each backend, their fake kernels, and the autograd functions (one module per family)."""
