// One dtype dispatch for every kernel template: float64, float32, float16, bfloat16.
// (The dispatch name must be a literal; callers check dtypes first, so it never shows.)
#pragma once
#include <ATen/Dispatch.h>

#define PYOPS_DISPATCH_FLOATING(TYPE, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, "pyops", __VA_ARGS__)
