// CUDA kernels of the activation family. Every elementwise kernel gives each thread 8 elements
// (one mask byte): one 16-byte load for float16/bfloat16, two for float32, four for float64, when
// every pointer is 16-byte aligned; scalar loads otherwise and at the tail. Math in opmath_type.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "common/checks.h"
#include "common/dispatch.h"

namespace pyops {
namespace {

constexpr int kThreads = 256;
constexpr int kElems = 8;

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

inline int64_t blocks_for(int64_t units) {
  // grid-stride loops below; a million blocks saturates any current GPU
  return std::min<int64_t>((units + kThreads - 1) / kThreads, int64_t(1) << 20);
}

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

// out = pass(x) ? x : neg(x); mask bit = pass(x) (where the gradient flows unchanged)
template <typename T, typename Op>
__global__ void masked_fwd_kernel(const T* x, T* out, uint8_t* mask, int64_t n, bool vec, Op op) {
  using opmath_t = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(b, (n + kElems - 1) / kElems) {
    T v[kElems], o[kElems];
    load8(x, b * kElems, n, vec, v);
    uint8_t bits = 0;
#pragma unroll
    for (int j = 0; j < kElems; ++j) {
      const opmath_t a = v[j];
      const bool pos = op.pass(a);
      o[j] = pos ? a : op.neg(a);
      bits |= uint8_t(pos) << j;
    }
    store8(out, b * kElems, n, vec, o);
    mask[b] = bits;
  }
}

// grad_in = bit ? g : neg(g)
template <typename T, typename Op>
__global__ void masked_bwd_kernel(const T* g, const uint8_t* mask, T* gi, int64_t n, bool vec, Op op) {
  using opmath_t = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(b, (n + kElems - 1) / kElems) {
    T v[kElems], o[kElems];
    load8(g, b * kElems, n, vec, v);
    const uint8_t bits = mask[b];
#pragma unroll
    for (int j = 0; j < kElems; ++j) {
      const opmath_t a = v[j];
      o[j] = ((bits >> j) & 1) ? a : op.neg(a);
    }
    store8(gi, b * kElems, n, vec, o);
  }
}

template <typename T, typename F>
__global__ void unary_kernel(const T* x, T* out, int64_t n, bool vec, F f) {
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
__global__ void binary_kernel(const T* a, const T* s, T* out, int64_t n, bool vec, F f) {
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
// pass(x): where the gradient flows unchanged, as torch decides it: relu's backward tests the output
// (!(y <= 0): NaN passes and stays NaN), leaky_relu's the input (x > 0: NaN takes the slope).
struct ReluOp {
  template <typename T> __device__ bool pass(T v) const { return !(v <= T(0)); }
  template <typename T> __device__ T neg(T) const { return T(0); }
};
struct LeakyOp {  // forward's and gradient's other branch: * slope
  double slope;
  template <typename T> __device__ bool pass(T v) const { return v > T(0); }
  template <typename T> __device__ T neg(T v) const { return v * T(slope); }
};
struct EluFwd {
  double alpha;
  template <typename T> __device__ T operator()(T x) const { return x > T(0) ? x : T(alpha) * ::expm1(x); }
};
struct EluBwdResult {  // d out / dx = out + alpha where out <= 0
  double alpha;
  template <typename T> __device__ T operator()(T g, T y) const { return y <= T(0) ? g * (y + T(alpha)) : g; }
};
struct EluBwdInput {
  double alpha;
  template <typename T> __device__ T operator()(T g, T x) const { return x <= T(0) ? g * T(alpha) * ::exp(x) : g; }
};
struct SigmoidFwd {
  template <typename T> __device__ T operator()(T x) const { return T(1) / (T(1) + ::exp(-x)); }
};
struct SigmoidBwd {
  template <typename T> __device__ T operator()(T g, T y) const { return g * (T(1) - y) * y; }
};
struct TanhFwd {
  template <typename T> __device__ T operator()(T x) const { return ::tanh(x); }
};
struct TanhBwd {
  template <typename T> __device__ T operator()(T g, T y) const { return g * (T(1) - y * y); }
};

// ---- launchers ---------------------------------------------------------------------------------
template <typename Op>
std::tuple<at::Tensor, at::Tensor> masked_fwd_impl(const char* op, const at::Tensor& self,
                                                   const at::Tensor& dst, Op fn) {
  check_floating(op, "self", self);
  c10::cuda::CUDAGuard guard(self.device());
  auto d = dense_like(self);
  at::Tensor out = dst.defined() ? d.in : d.out;  // in place: write over the dense input
  const int64_t n = self.numel();
  at::Tensor mask = at::empty({(n + 7) / 8}, self.options().dtype(at::kByte));
  if (n > 0) {
    PYOPS_DISPATCH_FLOATING(self.scalar_type(), [&] {
      const bool vec = aligned16(d.in.const_data_ptr()) && aligned16(out.const_data_ptr());
      masked_fwd_kernel<<<blocks_for((n + 7) / 8), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          d.in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
          mask.mutable_data_ptr<uint8_t>(), n, vec, fn);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (dst.defined() && !out.is_same(dst)) dst.copy_(out);
  return {dst.defined() ? dst : out, mask};
}

template <typename Op>
at::Tensor masked_bwd_impl(const char* op, const at::Tensor& grad_out, const at::Tensor& mask, Op fn) {
  check_floating(op, "grad_out", grad_out);
  check_mask(op, grad_out, mask);
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto d = dense_like(grad_out);
  const int64_t n = grad_out.numel();
  if (n > 0) {
    PYOPS_DISPATCH_FLOATING(grad_out.scalar_type(), [&] {
      const bool vec = aligned16(d.in.const_data_ptr()) && aligned16(d.out.const_data_ptr());
      masked_bwd_kernel<<<blocks_for((n + 7) / 8), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          d.in.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(),
          d.out.mutable_data_ptr<scalar_t>(), n, vec, fn);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return d.out;
}

template <typename F>
void unary_launch(const at::Tensor& in, const at::Tensor& out, F f) {
  const int64_t n = in.numel();
  if (n == 0) return;
  PYOPS_DISPATCH_FLOATING(in.scalar_type(), [&] {
    const bool vec = aligned16(in.const_data_ptr()) && aligned16(out.const_data_ptr());
    unary_kernel<<<blocks_for((n + 7) / 8), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, vec, f);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename F>
at::Tensor unary_fwd(const char* op, const at::Tensor& self, F f) {
  check_floating(op, "self", self);
  c10::cuda::CUDAGuard guard(self.device());
  auto d = dense_like(self);
  unary_launch(d.in, d.out, f);
  return d.out;
}

template <typename F>
at::Tensor binary_bwd(const char* op, const at::Tensor& grad_out, const at::Tensor& saved, F f) {
  check_floating(op, "grad_out", grad_out);
  check_like(op, "grad_out", grad_out, "saved", saved);
  check_same_shape(op, "grad_out", grad_out, "saved", saved);
  c10::cuda::CUDAGuard guard(grad_out.device());
  auto d = dense_like(saved);
  at::Tensor g = as_layout_of(grad_out, d.out);
  const int64_t n = g.numel();
  if (n > 0) {
    PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
      const bool vec = aligned16(g.const_data_ptr()) && aligned16(d.in.const_data_ptr()) &&
                       aligned16(d.out.const_data_ptr());
      binary_kernel<<<blocks_for((n + 7) / 8), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), d.in.const_data_ptr<scalar_t>(), d.out.mutable_data_ptr<scalar_t>(),
          n, vec, f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return d.out;
}

std::tuple<at::Tensor, at::Tensor> relu_fwd(const at::Tensor& self) {
  return masked_fwd_impl("relu_fwd", self, at::Tensor(), ReluOp{});
}
at::Tensor relu_fwd_(at::Tensor& self) { return std::get<1>(masked_fwd_impl("relu_fwd_", self, self, ReluOp{})); }
at::Tensor relu_bwd(const at::Tensor& grad_out, const at::Tensor& mask) {
  return masked_bwd_impl("relu_bwd", grad_out, mask, ReluOp{});
}
std::tuple<at::Tensor, at::Tensor> leaky_relu_fwd(const at::Tensor& self, double slope) {
  return masked_fwd_impl("leaky_relu_fwd", self, at::Tensor(), LeakyOp{slope});
}
at::Tensor leaky_relu_fwd_(at::Tensor& self, double slope) {
  return std::get<1>(masked_fwd_impl("leaky_relu_fwd_", self, self, LeakyOp{slope}));
}
at::Tensor leaky_relu_bwd(const at::Tensor& grad_out, const at::Tensor& mask, double slope) {
  return masked_bwd_impl("leaky_relu_bwd", grad_out, mask, LeakyOp{slope});
}
at::Tensor elu_fwd(const at::Tensor& self, double alpha) { return unary_fwd("elu_fwd", self, EluFwd{alpha}); }
void elu_fwd_(at::Tensor& self, double alpha) {
  check_floating("elu_fwd_", "self", self);
  c10::cuda::CUDAGuard guard(self.device());
  auto d = dense_like(self);
  unary_launch(d.in, d.in, EluFwd{alpha});
  if (!d.in.is_same(self)) self.copy_(d.in);
}
at::Tensor elu_bwd(const at::Tensor& grad_out, const at::Tensor& saved, double alpha, bool is_result) {
  if (is_result) return binary_bwd("elu_bwd", grad_out, saved, EluBwdResult{alpha});
  return binary_bwd("elu_bwd", grad_out, saved, EluBwdInput{alpha});
}
at::Tensor sigmoid_fwd(const at::Tensor& self) { return unary_fwd("sigmoid_fwd", self, SigmoidFwd{}); }
at::Tensor sigmoid_bwd(const at::Tensor& grad_out, const at::Tensor& out) {
  return binary_bwd("sigmoid_bwd", grad_out, out, SigmoidBwd{});
}
at::Tensor tanh_fwd(const at::Tensor& self) { return unary_fwd("tanh_fwd", self, TanhFwd{}); }
at::Tensor tanh_bwd(const at::Tensor& grad_out, const at::Tensor& out) {
  return binary_bwd("tanh_bwd", grad_out, out, TanhBwd{});
}

// ---- Maxout: one thread per output element, first maximum wins, NaN propagates ------------------
template <typename T>
__global__ void maxout_fwd_kernel(const T* x, T* out, uint8_t* idx, int64_t count, int64_t inner, int64_t pieces) {
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
__global__ void maxout_bwd_kernel(const T* g, const uint8_t* idx, T* gi, int64_t count, int64_t inner, int64_t pieces) {
  PYOPS_GRID_STRIDE(e, count) {
    const int64_t grp = e / inner, i = e - grp * inner;
    T* dst = gi + grp * pieces * inner + i;
    const T v = g[e];
    const int64_t k0 = idx[e];
    for (int64_t k = 0; k < pieces; ++k) dst[k * inner] = k == k0 ? v : T(0);
  }
}

std::tuple<at::Tensor, at::Tensor> maxout_fwd(const at::Tensor& self, int64_t pieces, int64_t dim) {
  check_floating("maxout_fwd", "self", self);
  const auto s = maxout_shape("maxout_fwd", self, pieces, dim);
  c10::cuda::CUDAGuard guard(self.device());
  auto sizes = self.sizes().vec();
  sizes[s.dim] /= pieces;
  at::Tensor out = at::empty(sizes, self.options());
  at::Tensor idx = at::empty(sizes, self.options().dtype(at::kByte));
  const at::Tensor x = self.contiguous();
  const int64_t count = out.numel();
  if (count > 0) {
    PYOPS_DISPATCH_FLOATING(self.scalar_type(), [&] {
      maxout_fwd_kernel<<<blocks_for(count), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<uint8_t>(), count,
          s.inner, pieces);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {out, idx};
}

at::Tensor maxout_bwd(const at::Tensor& grad_out, const at::Tensor& indices, int64_t pieces, int64_t dim) {
  check_floating("maxout_bwd", "grad_out", grad_out);
  TORCH_CHECK(indices.scalar_type() == at::kByte, "pyops::maxout_bwd: indices must be uint8, got ",
              indices.scalar_type());
  TORCH_CHECK(indices.device() == grad_out.device(), "pyops::maxout_bwd: indices is on ", indices.device(),
              " but grad_out is on ", grad_out.device());
  check_same_shape("maxout_bwd", "grad_out", grad_out, "indices", indices);
  TORCH_CHECK(grad_out.dim() > 0, "pyops::maxout_bwd: grad_out must have at least one dimension");
  c10::cuda::CUDAGuard guard(grad_out.device());
  const int64_t d = c10::maybe_wrap_dim(dim, grad_out.dim());
  auto sizes = grad_out.sizes().vec();
  sizes[d] *= pieces;
  at::Tensor gi = at::empty(sizes, grad_out.options());
  const auto s = maxout_shape("maxout_bwd", gi, pieces, d);
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor ix = indices.contiguous();
  const int64_t count = g.numel();
  if (count > 0) {
    PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
      maxout_bwd_kernel<<<blocks_for(count), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), ix.const_data_ptr<uint8_t>(), gi.mutable_data_ptr<scalar_t>(), count,
          s.inner, pieces);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return gi;
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("relu_fwd", &relu_fwd);
  m.impl("relu_fwd_", &relu_fwd_);
  m.impl("relu_bwd", &relu_bwd);
  m.impl("leaky_relu_fwd", &leaky_relu_fwd);
  m.impl("leaky_relu_fwd_", &leaky_relu_fwd_);
  m.impl("leaky_relu_bwd", &leaky_relu_bwd);
  m.impl("elu_fwd", &elu_fwd);
  m.impl("elu_fwd_", &elu_fwd_);
  m.impl("elu_bwd", &elu_bwd);
  m.impl("sigmoid_fwd", &sigmoid_fwd);
  m.impl("sigmoid_bwd", &sigmoid_bwd);
  m.impl("tanh_fwd", &tanh_fwd);
  m.impl("tanh_bwd", &tanh_bwd);
  m.impl("maxout_fwd", &maxout_fwd);
  m.impl("maxout_bwd", &maxout_bwd);
}

}  // namespace pyops
