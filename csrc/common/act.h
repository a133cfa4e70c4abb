// The activations that pyops fuses, written once for every family and device: the codes, the
// forward f, the gradient read from the output, the inverse, the 1-bit mask of relu/leaky_relu,
// as scalar functions (host and CUDA device) and, on the CPU, as at::vec::Vectorized functions.
// The activation family (csrc/cpu/activation.cpp, csrc/cuda/activation.cu), conv2d's epilogue and
// batch_norm's epilogue and backward all call these; the Triton kernels' twin is kernels/_common.py.
//
// Math (p: leaky_relu's negative_slope or elu's alpha), with torch's rules at 0 and NaN:
//   relu:       f(z) = z < 0 ? 0 : z               (NaN and -0.0 kept)
//   leaky_relu: f(z) = z > 0 ? z : p z
//   elu:        f(z) = z >= 0 ? z : p (exp(z) - 1) (at +-0 the input itself, whatever p)
//   gradient from y = f(z):   relu y <= 0 ? 0 : g;  leaky_relu y > 0 ? g : p g;
//                             elu y <= 0 ? g (y + p) : g   (NaN takes the positive branch)
//   inverse (p > 0):          leaky_relu y > 0 ? y : y / p;
//                             elu y > 0 ? y : log1p(max(y / p, -1 + eps))  (saturation maps finite)
//   mask bit (where the gradient flows unchanged): relu !(v <= 0) (NaN passes), leaky_relu v > 0,
//   the same read from the input or the output (for p >= 0 the output's sign is the input's).
// The mask format: bit j of byte i is element 8 i + j in memory order; a block of 64 elements fills
// one little-endian uint64.
#pragma once
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#if !defined(__CUDACC__)
#include <ATen/cpu/vec/vec.h>

#include <cstring>
#include <limits>

#include "vec.h"
#endif

namespace pyops {

// Numbered as conv2d_fwd's `act` argument and the Triton kernels' codes.
enum class Act : int8_t { kNone = 0, kRelu = 1, kLeakyRelu = 2, kElu = 3 };

inline const char* act_name(Act a) {
  static const char* names[] = {"none", "relu", "leaky_relu", "elu"};
  return names[int(a)];
}

inline Act parse_act(const char* op, c10::string_view name) {
  for (Act a : {Act::kNone, Act::kRelu, Act::kLeakyRelu, Act::kElu})
    if (name == act_name(a)) return a;
  TORCH_CHECK_VALUE(false, "pyops::", op, ": activation must be one of none, relu, leaky_relu, elu; got '",
                    std::string(name), "'");
}

inline Act act_of_code(const char* op, int64_t code) {
  TORCH_CHECK(code >= 0 && code <= int64_t(Act::kElu), "pyops::", op,
              ": activation must be 0 (none), 1 (relu), 2 (leaky_relu) or 3 (elu), got ", code);
  return Act(code);
}

// Whether relu/leaky_relu's 1-bit mask is what backward saves (elu saves its output).
inline bool act_masked(Act a) { return a == Act::kRelu || a == Act::kLeakyRelu; }

// Whether the gradient can be read from the output: relu always, leaky_relu for a slope >= 0 and elu
// for alpha >= 0 (then the output's sign is the input's).
inline bool act_from_output(Act a, double p) { return a == Act::kNone || a == Act::kRelu || p >= 0; }

// Whether the input can be recovered from the output (batch_norm's memory-efficient form).
inline bool act_invertible(Act a, double p) {
  return a == Act::kNone || ((a == Act::kLeakyRelu || a == Act::kElu) && p > 0);
}

// ---- scalar forms (host and CUDA device); float math stays in float --------------------------------
C10_HOST_DEVICE inline float act_expm1(float x) { return ::expm1f(x); }
C10_HOST_DEVICE inline double act_expm1(double x) { return ::expm1(x); }
C10_HOST_DEVICE inline float act_log1p(float x) { return ::log1pf(x); }
C10_HOST_DEVICE inline double act_log1p(double x) { return ::log1p(x); }
template <typename T>
C10_HOST_DEVICE constexpr T act_epsilon() {
  return std::is_same_v<T, float> ? T(1.1920928955078125e-07) : T(2.220446049250313e-16);
}

// The functions below switch on `a`; called with a constant (a template argument) they fold to one
// branch.
template <typename T>
C10_HOST_DEVICE inline T act_forward(Act a, T z, T p) {
  switch (a) {
    case Act::kRelu:
      return z < T(0) ? T(0) : z;
    case Act::kLeakyRelu:
      return z > T(0) ? z : z * p;
    case Act::kElu:
      return z >= T(0) ? z : p * act_expm1(z);
    default:
      return z;
  }
}

template <typename T>
C10_HOST_DEVICE inline T act_grad(Act a, T g, T y, T p) {
  switch (a) {
    case Act::kRelu:
      return y <= T(0) ? T(0) : g;
    case Act::kLeakyRelu:
      return y > T(0) ? g : g * p;
    case Act::kElu:
      return y <= T(0) ? g * (y + p) : g;
    default:
      return g;
  }
}

template <typename T>
C10_HOST_DEVICE inline T act_inverse(Act a, T y, T p) {
  if (!(y <= T(0))) return y;
  if (a == Act::kLeakyRelu) return y / p;
  if (a == Act::kElu) {
    const T t = y / p, lo = T(-1) + act_epsilon<T>();
    return act_log1p(t < lo ? lo : t);
  }
  return y;
}

template <typename T>
C10_HOST_DEVICE inline bool act_pass(Act a, T v) {
  return a == Act::kRelu ? !(v <= T(0)) : v > T(0);
}

#if !defined(__CUDACC__)
// ---- CPU vector forms --------------------------------------------------------------------------------
using at::vec::Vectorized;

// expm1 for elu. Sleef's float expm1 runs ~10x slower than its exp (measured: 17.8 ms against 1.7 ms at
// 4M floats, AVX512), so float uses exp(x) - 1, which loses at most ~3 bits above |x| = 0.15, and its
// Taylor series below (truncation < 1e-12 relative). float64 keeps Sleef's.
template <typename T>
inline Vectorized<T> act_expm1(const Vectorized<T>& x) {
  if constexpr (std::is_same_v<T, double>) {
    return x.expm1();
  } else {
    using V = Vectorized<T>;
    V series(T(1.0 / 40320));
    for (T c : {T(1.0 / 5040), T(1.0 / 720), T(1.0 / 120), T(1.0 / 24), T(1.0 / 6), T(0.5), T(1)})
      series = at::vec::fmadd(series, x, V(c));
    series = series * x;
    return V::blendv(x.exp() - V(1), series, x.abs() < V(T(0.15)));
  }
}

template <typename T>
inline Vectorized<T> act_forward(Act a, const Vectorized<T>& z, T p) {
  using V = Vectorized<T>;
  const V zero(T(0));
  switch (a) {
    case Act::kRelu:
      return V::blendv(z, zero, z < zero);
    case Act::kLeakyRelu:
      return V::blendv(z * V(p), z, z > zero);
    case Act::kElu:
      return V::blendv(V(p) * act_expm1(z), z, z >= zero);
    default:
      return z;
  }
}

template <typename T>
inline Vectorized<T> act_grad(Act a, const Vectorized<T>& g, const Vectorized<T>& y, T p) {
  using V = Vectorized<T>;
  const V zero(T(0));
  switch (a) {
    case Act::kRelu:
      return V::blendv(g, zero, y <= zero);
    case Act::kLeakyRelu:
      return V::blendv(g * V(p), g, y > zero);
    case Act::kElu:
      return V::blendv(g, g * (y + V(p)), y <= zero);
    default:
      return g;
  }
}

template <typename T>
inline Vectorized<T> act_inverse(Act a, const Vectorized<T>& y, T p) {
  using V = Vectorized<T>;
  if (a == Act::kLeakyRelu) return V::blendv(y / V(p), y, y > V(T(0)));
  if (a == Act::kElu) {
    const V t = at::vec::maximum(y / V(p), V(T(-1) + std::numeric_limits<T>::epsilon()));
    return V::blendv(t.log1p(), y, y > V(T(0)));
  }
  return y;
}

// The lanes' mask bits as a comparison mask.
template <typename T>
inline Vectorized<T> act_pass(Act a, const Vectorized<T>& v) {
  using V = Vectorized<T>;
  return a == Act::kRelu ? (v > V(T(0))) | v.isnan() : v > V(T(0));
}

// ---- the 1-bit mask ----------------------------------------------------------------------------------
constexpr int64_t kMaskBlock = 64;

// The mask word of one block of 64 op-math values, through `lanes(j)`: the comparison mask of the
// vector at element j (the caller may store results as it goes).
template <typename T, typename Lanes>
inline uint64_t mask_word(const Lanes& lanes) {
  using V = Vectorized<T>;
  uint64_t bits = 0;
  for (int64_t j = 0; j < kMaskBlock; j += V::size()) bits |= uint64_t(vec::movemask(lanes(j))) << j;
  return bits;
}

inline void store_mask_word(uint8_t* mask, int64_t block, uint64_t bits) {
  std::memcpy(mask + block * 8, &bits, 8);  // little-endian: byte k holds elements 8k..8k+7
}
inline uint64_t load_mask_word(const uint8_t* mask, int64_t block) {
  uint64_t bits;
  std::memcpy(&bits, mask + block * 8, 8);
  return bits;
}

// The mask bytes of elements [from, n) (from a multiple of 64), one element at a time through
// `pass(i)`, which may store the element's result.
template <typename Pass>
inline void mask_tail(uint8_t* mask, int64_t from, int64_t n, const Pass& pass) {
  for (int64_t base = from; base < n; base += 8) {
    uint8_t bits = 0;
    for (int64_t j = 0; j < 8 && base + j < n; ++j) bits |= uint8_t(pass(base + j)) << j;
    mask[base / 8] = bits;
  }
}
#endif

}  // namespace pyops
