// CUDA kernels of the loss family (the host side is csrc/loss.h). Math in opmath_type; reductions
// accumulate in float32 (float64 for float64) and are deterministic: a grid whose size depends only
// on the element count writes one partial per block (a fixed shared-memory tree), and one block then
// adds the partials in a fixed order. No atomics, no host synchronisation.
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
#include "loss.h"

namespace pyops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 1024;  // partials of a reduction (the second level sums them)

inline int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, int64_t(1) << 20));
}

#define PYOPS_GRID_STRIDE(i, count) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (count); i += int64_t(gridDim.x) * blockDim.x)

template <typename T>
struct LossMath {
  int64_t kind;
  T delta;
  __device__ __forceinline__ T loss(T d) const {
    if (kind == int64_t(LossKind::kL1)) return ::abs(d);
    if (kind == int64_t(LossKind::kMse)) return d * d;
    const T a = ::abs(d);
    return a < delta ? T(0.5) * d * d : delta * (a - T(0.5) * delta);
  }
  __device__ __forceinline__ T deriv(T d) const {
    if (kind == int64_t(LossKind::kL1)) return d > T(0) ? T(1) : d < T(0) ? T(-1) : T(0);
    if (kind == int64_t(LossKind::kMse)) return d + d;
    return d < -delta ? -delta : d > delta ? delta : d;
  }
};

// The sum (or maximum) of v over the block, in a fixed tree; every thread gets the result.
template <typename A, bool kMax>
__device__ A block_reduce(A v, A* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) {
      const A a = shared[threadIdx.x], b = shared[threadIdx.x + s];
      shared[threadIdx.x] = kMax ? ((a > b || a != a) ? a : b) : a + b;
    }
    __syncthreads();
  }
  const A r = shared[0];
  __syncthreads();
  return r;
}

template <typename T>
__global__ void pointwise_kernel(const T* x, const T* t, T* out, int64_t n, LossMath<at::opmath_type<T>> m) {
  using O = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(i, n) { out[i] = T(m.loss(O(x[i]) - O(t[i]))); }
}

template <typename T>
__global__ void pointwise_bwd_kernel(const T* g, const T* x, const T* t, T* gi, int64_t n,
                                     LossMath<at::opmath_type<T>> m) {
  using O = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(i, n) { gi[i] = T(O(g[i]) * m.deriv(O(x[i]) - O(t[i]))); }
}

template <typename T>
__global__ void reduce_blocks_kernel(const T* x, const T* t, T* grad, at::opmath_type<T>* partials, int64_t n,
                                     LossMath<at::opmath_type<T>> m, at::opmath_type<T> scale) {
  using O = at::opmath_type<T>;
  __shared__ O shared[kThreads];
  O acc = 0;
  PYOPS_GRID_STRIDE(i, n) {
    const O d = O(x[i]) - O(t[i]);
    acc += m.loss(d);
    if (grad) grad[i] = T(m.deriv(d) * scale);
  }
  const O total = block_reduce<O, false>(acc, shared);
  if (threadIdx.x == 0) partials[blockIdx.x] = total;
}

template <typename T>
__global__ void sum_partials_kernel(const at::opmath_type<T>* partials, int64_t count, T* out,
                                    at::opmath_type<T> scale) {
  using O = at::opmath_type<T>;
  __shared__ O shared[kThreads];
  O acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc += partials[i];
  const O total = block_reduce<O, false>(acc, shared);
  if (threadIdx.x == 0) *out = T(total * scale);
}

// One block per row of C classes (csrc/loss.h has the math). Targets out of range read nothing out of
// bounds: the row's loss and gradient become NaN (raising would need a host synchronisation).
template <typename T>
__global__ void cross_entropy_kernel(const T* x, const int64_t* tidx, const T* tprob, const at::opmath_type<T>* w,
                                     const at::opmath_type<T>* inv_total, at::opmath_type<T>* loss_rows, T* grad,
                                     int64_t C, at::opmath_type<T> scale, int64_t ignore_index,
                                     at::opmath_type<T> eps) {
  using O = at::opmath_type<T>;
  __shared__ O shared[kThreads];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * C;
  const O eps_c = eps / O(C), keep = O(1) - eps;
  const O gscale = inv_total ? *inv_total : scale;
  int64_t tc = 0;
  O live = 1;
  if (tidx) {
    const int64_t t = tidx[row];
    if (t == ignore_index) {
      live = 0;
    } else if (t < 0 || t >= C) {
      live = NAN;
    } else {
      tc = t;
    }
  }
  O mx = -INFINITY;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const O v = O(xr[c]);
    mx = (v > mx || v != v) ? v : mx;
  }
  mx = block_reduce<O, true>(mx, shared);
  O s = 0, a = 0, b = 0, ws = 0;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const O xv = O(xr[c]) - mx;
    s += ::exp(xv);
    const O wc = w ? w[c] : O(1);
    ws += wc;
    if (tprob) {
      const O wq = (O(tprob[row * C + c]) * keep + eps_c) * wc;
      a += wq;
      b += wq * xv;
    } else {
      a += wc * xv;
    }
  }
  s = block_reduce<O, false>(s, shared);
  a = block_reduce<O, false>(a, shared);
  b = block_reduce<O, false>(b, shared);
  ws = block_reduce<O, false>(ws, shared);
  const O logs = ::log(s);
  O loss, coef_p, coef_w, wt = 0;
  if (tprob) {
    loss = a * logs - b;
    coef_p = a;
    coef_w = 1;
  } else {
    wt = w ? w[tc] : O(1);
    loss = keep * wt * (logs - (O(xr[tc]) - mx));
    if (eps != O(0)) loss += eps_c * (ws * logs - a);
    loss = live == O(0) ? O(0) : loss * live;
    coef_p = keep * wt + eps_c * ws;
    coef_w = eps_c;
  }
  if (threadIdx.x == 0) loss_rows[row] = loss;
  if (!grad) return;
  const O lscale = live == O(0) ? O(0) : live * gscale;  // all rows ignored: the mean's scale is inf
  const O fp = lscale * coef_p / s, fw = lscale * coef_w;
  for (int64_t c = threadIdx.x; c < C; c += kThreads) {
    const O wc = w ? w[c] : O(1);
    O sub = tprob ? (O(tprob[row * C + c]) * keep + eps_c) * wc * fw : wc * fw;
    if (!tprob && c == tc) sub += lscale * keep * wt;
    grad[row * C + c] = T(::exp(O(xr[c]) - mx) * fp - sub);
  }
}

struct Cuda {
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };

  static void pointwise(const at::Tensor& x, const at::Tensor& t, const at::Tensor& out, int64_t kind, double delta) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      using O = at::opmath_type<scalar_t>;
      pointwise_kernel<scalar_t><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), x.numel(),
          LossMath<O>{kind, O(delta)});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void pointwise_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& t, const at::Tensor& gi,
                            int64_t kind, double delta) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      using O = at::opmath_type<scalar_t>;
      pointwise_bwd_kernel<scalar_t><<<blocks_for(x.numel()), kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
          gi.mutable_data_ptr<scalar_t>(), x.numel(), LossMath<O>{kind, O(delta)});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void pointwise_reduce(const at::Tensor& x, const at::Tensor& t, const at::Tensor& out, const at::Tensor& g,
                               int64_t kind, double delta, double scale) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t n = x.numel();
    const int64_t blocks = std::min<int64_t>(kMaxBlocks, (n + kThreads - 1) / kThreads);
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      using O = at::opmath_type<scalar_t>;
      at::Tensor partials = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<O>::value));
      reduce_blocks_kernel<scalar_t>
          <<<blocks, kThreads, 0, stream>>>(x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                            g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr,
                                            partials.mutable_data_ptr<O>(), n, LossMath<O>{kind, O(delta)}, O(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<O>(), blocks,
                                                                out.mutable_data_ptr<scalar_t>(), O(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // Out-of-range targets are left to the kernel, which makes their rows NaN (raising would synchronise).
  static at::Tensor scan_targets(const at::Tensor& t, int64_t, int64_t ignore_index, const at::Tensor& w, bool total,
                                 at::ScalarType opmath) {
    return total ? target_weight_total(t, ignore_index, w, opmath) : at::Tensor();
  }

  static void cross_entropy(const at::Tensor& x, const at::Tensor& t, const at::Tensor& w, const at::Tensor& inv_total,
                            double scale, int64_t ignore_index, double smoothing, const at::Tensor& loss_rows,
                            const at::Tensor& g) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const bool probs = t.is_floating_point();
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      using O = at::opmath_type<scalar_t>;
      cross_entropy_kernel<scalar_t><<<x.size(0), kThreads, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), probs ? nullptr : t.const_data_ptr<int64_t>(),
          probs ? t.const_data_ptr<scalar_t>() : nullptr, w.defined() ? w.const_data_ptr<O>() : nullptr,
          inv_total.defined() ? inv_total.const_data_ptr<O>() : nullptr, loss_rows.mutable_data_ptr<O>(),
          g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr, x.size(1), O(scale), ignore_index, O(smoothing));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_LOSS(m, ::pyops::Cuda, ""); }

}  // namespace pyops
