"""pyops microbenchmarks: harness.py times cases, one module of cases per family."""
