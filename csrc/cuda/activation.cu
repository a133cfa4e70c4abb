// CUDA kernels of the activation family (the host side is csrc/activation.h). Every elementwise
// kernel gives each thread 8 elements (one mask byte): one 16-byte load for float16/bfloat16, two
// for float32, four for float64, when every pointer is 16-byte aligned; scalar loads otherwise and
// at the tail. Math in opmath_type.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "activation.h"
#include "common/act.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/launch_plan.h"

namespace pyops {
namespace {

constexpr int kThreads = int(plan::act::kThreads);  // grids and blocks: csrc/common/launch_plan.h
constexpr int kElems = int(plan::act::kElems);

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Elements [base, base + 8) of p, whole 16-byte vectors when `vec` (then base + 8 <= n too).
template <typename T>
__device__ __forceinline__ void load8(const T* p, int64_t base, int64_t n, bool vec, T (&v)[kElems]) {
  if (vec && base + kElems <= n) {
    constexpr int kVecs = kElems * sizeof(T) / 16;
    const uint4* q = reinterpret_cast<const uint4*>(p + base);
    uint4 tmp[kVecs];
#pragma unroll
    for (int i = 0; i < kVecs; ++i) tmp[i] = q[i];
    memcpy(&v, &tmp, sizeof(v));
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) v[i] = base + i < n ? p[base + i] : T(0);
  }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, int64_t base, int64_t n, bool vec, const T (&v)[kElems]) {
  if (vec && base + kElems <= n) {
    constexpr int kVecs = kElems * sizeof(T) / 16;
    uint4 tmp[kVecs];
    memcpy(&tmp, &v, sizeof(v));
    uint4* q = reinterpret_cast<uint4*>(p + base);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) q[i] = tmp[i];
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i)
      if (base + i < n) p[base + i] = v[i];
  }
}

#define PYOPS_GRID_STRIDE(i, count) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (count); i += int64_t(gridDim.x) * blockDim.x)

// out = pass ? x : out_other(x); mask bit = pass = act_pass(op.act, x) (the gradient flows unchanged)
template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads)
    masked_fwd_kernel(const T* x, T* out, uint8_t* mask, int64_t n, bool vec, Op op) {
  using opmath_t = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(b, (n + kElems - 1) / kElems) {
    T v[kElems], o[kElems];
    load8(x, b * kElems, n, vec, v);
    uint8_t bits = 0;
#pragma unroll
    for (int j = 0; j < kElems; ++j) {
      const opmath_t a = v[j];
      const bool pos = act_pass(op.act, a);
      o[j] = pos ? a : op.out_other(a);
      bits |= uint8_t(pos) << j;
    }
    store8(out, b * kElems, n, vec, o);
    mask[b] = bits;
  }
}

// grad_in = bit ? g : grad_other(g)
template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads)
    masked_bwd_kernel(const T* g, const uint8_t* mask, T* gi, int64_t n, bool vec, Op op) {
  using opmath_t = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(b, (n + kElems - 1) / kElems) {
    T v[kElems], o[kElems];
    load8(g, b * kElems, n, vec, v);
    const uint8_t bits = mask[b];
#pragma unroll
    for (int j = 0; j < kElems; ++j) {
      const opmath_t a = v[j];
      o[j] = ((bits >> j) & 1) ? a : op.grad_other(a);
    }
    store8(gi, b * kElems, n, vec, o);
  }
}

template <typename T, typename F>
__global__ void __launch_bounds__(kThreads) unary_kernel(const T* x, T* out, int64_t n, bool vec, F f) {
  using opmath_t = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(b, (n + kElems - 1) / kElems) {
    T v[kElems], o[kElems];
    load8(x, b * kElems, n, vec, v);
#pragma unroll
    for (int j = 0; j < kElems; ++j) o[j] = f(opmath_t(v[j]));
    store8(out, b * kElems, n, vec, o);
  }
}

template <typename T, typename F>
__global__ void __launch_bounds__(kThreads) binary_kernel(const T* a, const T* s, T* out, int64_t n, bool vec, F f) {
  using opmath_t = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(b, (n + kElems - 1) / kElems) {
    T va[kElems], vs[kElems], o[kElems];
    load8(a, b * kElems, n, vec, va);
    load8(s, b * kElems, n, vec, vs);
#pragma unroll
    for (int j = 0; j < kElems; ++j) o[j] = f(opmath_t(va[j]), opmath_t(vs[j]));
    store8(out, b * kElems, n, vec, o);
  }
}

// ---- the math of each op (see pyops/ops/activation.py) -------------------------------------------
// Explicit float/double overloads, so that float math never goes through the double functions.
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float tanh_(float x) { return tanhf(x); }
__device__ __forceinline__ double tanh_(double x) { return tanh(x); }

struct Math {  // for the device struct below (csrc/activation.h); shared activations: common/act.h
  // The mask bit is act_pass(act, x): where the gradient flows unchanged, as torch decides it.
  struct Relu {
    static constexpr Act act = Act::kRelu;
    // the output where x <= 0: 0, but -0.0 stays itself (torch's relu is x < 0 ? 0 : x)
    template <typename T>
    __device__ T out_other(T v) const {
      return v == T(0) ? v : T(0);
    }
    template <typename T>
    __device__ T grad_other(T) const {
      return T(0);
    }
  };
  struct Leaky {  // forward's and gradient's other branch: * slope
    static constexpr Act act = Act::kLeakyRelu;
    double slope;
    template <typename T>
    __device__ T out_other(T v) const {
      return v * T(slope);
    }
    template <typename T>
    __device__ T grad_other(T v) const {
      return v * T(slope);
    }
  };
  struct Elu {
    double alpha;
    template <typename T>
    __device__ T operator()(T x) const {
      return act_forward(Act::kElu, x, T(alpha));
    }
  };
  struct EluBwdResult {  // d out / dx = out + alpha where out <= 0
    double alpha;
    template <typename T>
    __device__ T operator()(T g, T y) const {
      return act_grad(Act::kElu, g, y, T(alpha));
    }
  };
  struct EluBwdInput {
    double alpha;
    template <typename T>
    __device__ T operator()(T g, T x) const {
      return x <= T(0) ? g * T(alpha) * exp_(x) : g;
    }
  };
  struct Sigmoid {
    template <typename T>
    __device__ T operator()(T x) const {
      return T(1) / (T(1) + exp_(-x));
    }
  };
  struct SigmoidBwd {
    template <typename T>
    __device__ T operator()(T g, T y) const {
      return g * (T(1) - y) * y;
    }
  };
  struct Tanh {
    template <typename T>
    __device__ T operator()(T x) const {
      return tanh_(x);
    }
  };
  struct TanhBwd {
    template <typename T>
    __device__ T operator()(T g, T y) const {
      return g * (T(1) - y * y);
    }
  };
};

// ---- Maxout: one thread per output element, first maximum wins, NaN propagates ------------------
template <typename T>
__global__ void __launch_bounds__(kThreads)
    maxout_fwd_kernel(const T* x, T* out, uint8_t* idx, int64_t count, int64_t inner, int64_t pieces) {
  PYOPS_GRID_STRIDE(e, count) {
    const int64_t grp = e / inner, i = e - grp * inner;
    const T* src = x + grp * pieces * inner + i;
    T best = src[0];
    uint8_t bi = 0;
    for (int64_t k = 1; k < pieces; ++k) {
      const T v = src[k * inner];
      if (v > best || (v != v && best == best)) {
        best = v;
        bi = uint8_t(k);
      }
    }
    out[e] = best;
    idx[e] = bi;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    maxout_bwd_kernel(const T* g, const uint8_t* idx, T* gi, int64_t count, int64_t inner, int64_t pieces) {
  PYOPS_GRID_STRIDE(e, count) {
    const int64_t grp = e / inner, i = e - grp * inner;
    T* dst = gi + grp * pieces * inner + i;
    const T v = g[e];
    const int64_t k0 = idx[e];
    for (int64_t k = 0; k < pieces; ++k) dst[k * inner] = k == k0 ? v : T(0);
  }
}

// ---- launchers: the CUDA device of csrc/activation.h ------------------------------------------------
#define PYOPS_LAUNCH(kernel, launch, ...)                                                                       \
  do {                                                                                                          \
    const plan::Launch l_ = (launch);                                                                           \
    kernel<<<plan::grid_of(l_), plan::block_of(l_), l_.smem, c10::cuda::getCurrentCUDAStream()>>>(__VA_ARGS__); \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                                                             \
  } while (0)

struct Cuda : Math {
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };

  template <typename Op>
  static void masked_forward(const at::Tensor& in, const at::Tensor& out, const at::Tensor& mask, Op op) {
    const int64_t n = in.numel();
    const bool vec = aligned16(in.const_data_ptr()) && aligned16(out.const_data_ptr());
    PYOPS_DISPATCH_FLOATING(in.scalar_type(), [&] {
      PYOPS_LAUNCH(masked_fwd_kernel, plan::act_masked_fwd(n), in.const_data_ptr<scalar_t>(),
                   out.mutable_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(), n, vec, op);
    });
  }
  template <typename Op>
  static void masked_backward(const at::Tensor& g, const at::Tensor& mask, const at::Tensor& gi, Op op) {
    const int64_t n = g.numel();
    const bool vec = aligned16(g.const_data_ptr()) && aligned16(gi.const_data_ptr());
    PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
      PYOPS_LAUNCH(masked_bwd_kernel, plan::act_masked_bwd(n), g.const_data_ptr<scalar_t>(),
                   mask.const_data_ptr<uint8_t>(), gi.mutable_data_ptr<scalar_t>(), n, vec, op);
    });
  }
  template <typename F>
  static void unary(const at::Tensor& in, const at::Tensor& out, F f) {
    const int64_t n = in.numel();
    const bool vec = aligned16(in.const_data_ptr()) && aligned16(out.const_data_ptr());
    PYOPS_DISPATCH_FLOATING(in.scalar_type(), [&] {
      PYOPS_LAUNCH(unary_kernel, plan::act_unary(n), in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n,
                   vec, f);
    });
  }
  template <typename F>
  static void binary(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, F f) {
    const int64_t n = a.numel();
    const bool vec = aligned16(a.const_data_ptr()) && aligned16(b.const_data_ptr()) && aligned16(out.const_data_ptr());
    PYOPS_DISPATCH_FLOATING(a.scalar_type(), [&] {
      PYOPS_LAUNCH(binary_kernel, plan::act_binary(n), a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                   out.mutable_data_ptr<scalar_t>(), n, vec, f);
    });
  }
  static void maxout_forward(const at::Tensor& x, const at::Tensor& out, const at::Tensor& idx, const MaxoutShape& s,
                             int64_t pieces) {
    const int64_t count = out.numel();
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      PYOPS_LAUNCH(maxout_fwd_kernel<scalar_t>, plan::act_maxout_fwd(count), x.const_data_ptr<scalar_t>(),
                   out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<uint8_t>(), count, s.inner, pieces);
    });
  }
  static void maxout_backward(const at::Tensor& g, const at::Tensor& idx, const at::Tensor& gi, const MaxoutShape& s,
                              int64_t pieces) {
    const int64_t count = g.numel();
    PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
      PYOPS_LAUNCH(maxout_bwd_kernel<scalar_t>, plan::act_maxout_bwd(count), g.const_data_ptr<scalar_t>(),
                   idx.const_data_ptr<uint8_t>(), gi.mutable_data_ptr<scalar_t>(), count, s.inner, pieces);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_ACTIVATION(m, ::pyops::Cuda, ""); }

}  // namespace pyops
