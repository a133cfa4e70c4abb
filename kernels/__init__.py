"""Triton kernels and their launchers, installed as pyops.kernels (one module per family)."""
