// pyops.functional's C functions (csrc/functional.cpp), added to the extension module at import.
#pragma once
#include <Python.h>

namespace pyops {

// Adds relu, leaky_relu, elu, sigmoid, tanh, maxout and _set_twins to `module`; -1 with a Python
// error set on failure.
int add_functional(PyObject* module);

}  // namespace pyops
