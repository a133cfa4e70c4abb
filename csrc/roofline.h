// The CPU's measured ceilings for the benchmarks' roofline (bench/harness.py), added to pyops._C.
#pragma once
#include <Python.h>

namespace pyops {

// _fma_peak(threads=1, seconds=0.2) -> GFLOP/s: `threads` threads each run independent vector FMAs on
// registers alone for `seconds`; 2 flops per lane per FMA, summed over the threads (csrc/cpu/roofline.cpp).
PyObject* py_fma_peak(PyObject* self, PyObject* args);

}  // namespace pyops
