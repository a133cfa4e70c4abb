"""pyops microbenchmarks: harness.py times cases, one module of cases per bench family
(pyops.testing.BENCH_FAMILIES): one per op family, and overhead.py, the fixed cost of a call."""
