// CUDA kernels of the batch_norm family (host side: csrc/batch_norm.h). The data is [outer, C, inner]
// dense. Reductions are split over a grid of (part of the positions, channel or channel group) blocks
// so that a small C still fills the GPU; each block reduces in a fixed tree and writes its partial
// result, and a second kernel combines the parts of each channel in part order: deterministic, no
// atomics, no host synchronisation. Statistics: per-thread Welford, merged with Chan's formula.
// Blocks are 32 x 8 threads: for inner > 1 (NCHW) a block serves one channel and its 256 threads walk
// the positions (coalesced along a run); for inner == 1 (channels_last) the 32 lanes are 32 adjacent
// channels (coalesced along a row) and the 8 rows of threads walk the rows. Math in opmath_type.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "batch_norm.h"
#include "common/dispatch.h"

namespace pyops {
namespace {

constexpr int kLanes = 32;  // threadIdx.x
constexpr int kRows = 8;    // threadIdx.y
constexpr int kThreads = kLanes * kRows;
constexpr int64_t kSpan = 16384;     // positions of a channel per block (at least)
constexpr int64_t kMaxParts = 1024;  // parts of a channel's positions at most
constexpr int kElementwiseThreads = 256;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Split {
  int64_t parts, span;
};
Split split_of(const BnLayout& l) {
  const int64_t parts = std::clamp<int64_t>(ceil_div(l.count(), kSpan), 1, kMaxParts);
  return {parts, ceil_div(l.count(), parts)};
}

// ---- the activation: common/act.h (act: its code, p its slope or alpha) ---------------------------------

struct Streams {  // optional operands: nullptr where absent
  const void *g, *x, *y, *r;
};

template <typename scalar_t, typename T>
__device__ __forceinline__ void dz_v(const scalar_t* g, const scalar_t* x, const scalar_t* y, const scalar_t* r,
                                     int64_t k, T cen, int act, T p, bool from_output, T& dz, T& v) {
  const T yv = y != nullptr ? T(y[k]) : T(0);
  dz = act_grad(Act(act), T(g[k]), yv, p);
  if (from_output)
    v = act_inverse(Act(act), yv, p) - (r != nullptr ? T(r[k]) : T(0)) - cen;
  else
    v = T(x[k]) - cen;
}

// Offset of position q of channel c.
__device__ __forceinline__ int64_t offset(int64_t q, int64_t c, int64_t C, int64_t inner) {
  const int64_t o = q / inner;
  return (o * C + c) * inner + (q - o * inner);
}

// The (channel, first position, position step) of this thread: one channel per block for inner > 1,
// 32 channels per block for inner == 1 (blockIdx.x: channels, blockIdx.y: the part).
struct Walk {
  int64_t c, first, step;
  bool active;
};
__device__ __forceinline__ Walk walk_of(int64_t C, int64_t inner, int64_t lo) {
  Walk w;
  if (inner > 1) {
    w.c = blockIdx.x;
    w.first = lo + threadIdx.y * kLanes + threadIdx.x;
    w.step = kThreads;
  } else {
    w.c = int64_t(blockIdx.x) * kLanes + threadIdx.x;
    w.first = lo + threadIdx.y;
    w.step = kRows;
  }
  w.active = w.c < C;
  return w;
}

// Chan's merge; the mean as a weighted average, so that an infinite value keeps it infinite (as torch's)
// where the difference of two infinite means would make it NaN.
__device__ __forceinline__ void chan(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  if (nb == 0) return;
  const double total = n + nb, delta = mb - mean;
  mean = mean * (n / total) + mb * (nb / total);
  m2 += m2b + delta * delta * (n * nb / total);
  n = total;
}

// ---- statistics ----------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void stats_partial_kernel(const scalar_t* x, double* pn, double* pmean, double* pm2, int64_t C,
                                     int64_t inner, int64_t count, int64_t span) {
  using T = at::opmath_type<scalar_t>;
  const int64_t part = blockIdx.y, lo = part * span, hi = ::min(lo + span, count);
  const Walk w = walk_of(C, inner, lo);
  T n = 0, mean = 0, m2 = 0;
  if (w.active)
    for (int64_t q = w.first; q < hi; q += w.step) {
      const T v = T(x[offset(q, w.c, C, inner)]);
      n += T(1);
      const T d = v - mean;
      // Welford's step; past an infinite value (d not finite) the weighted average keeps the mean
      // infinite where mean + d / n would turn inf - inf into NaN
      mean = ::isfinite(d) ? mean + d / n : mean * ((n - T(1)) / n) + v / n;
      m2 += d * (v - mean);
    }
  __shared__ double sn[kThreads], smean[kThreads], sm2[kThreads];
  const int t = threadIdx.y * kLanes + threadIdx.x;
  sn[t] = n, smean[t] = mean, sm2[t] = m2;
  __syncthreads();
  // fixed tree: over all 256 threads for inner > 1, over the 8 rows of each lane for inner == 1
  const int width = inner > 1 ? kThreads : kRows;
  const int stride = inner > 1 ? 1 : kLanes;
  const int i = inner > 1 ? t : threadIdx.y;
  for (int half = width / 2; half > 0; half /= 2) {
    if (i < half) {
      const int a = inner > 1 ? t : threadIdx.y * stride + threadIdx.x, b = a + half * stride;
      double nn = sn[a], mm = smean[a], vv = sm2[a];
      chan(nn, mm, vv, sn[b], smean[b], sm2[b]);
      sn[a] = nn, smean[a] = mm, sm2[a] = vv;
    }
    __syncthreads();
  }
  if (i == 0 && w.active) {
    const int a = inner > 1 ? 0 : threadIdx.x;
    pn[part * C + w.c] = sn[a];
    pmean[part * C + w.c] = smean[a];
    pm2[part * C + w.c] = sm2[a];
  }
}

template <typename T>
__global__ void stats_combine_kernel(const double* pn, const double* pmean, const double* pm2, T* mean, T* var,
                                     int64_t C, int64_t parts) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double n = 0, mu = 0, m2 = 0;
  for (int64_t p = 0; p < parts; ++p) chan(n, mu, m2, pn[p * C + c], pmean[p * C + c], pm2[p * C + c]);
  mean[c] = T(mu);
  var[c] = T(m2 / n);
}

// ---- forward, elementwise -----------------------------------------------------------------------------
template <typename scalar_t>
__global__ void elemt_kernel(const scalar_t* x, const scalar_t* r, scalar_t* out,
                             const at::opmath_type<scalar_t>* center, const at::opmath_type<scalar_t>* scale,
                             const at::opmath_type<scalar_t>* shift, int64_t n, int64_t C, int64_t inner, int act,
                             double param) {
  using T = at::opmath_type<scalar_t>;
  const T p = T(param);
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (k / inner) % C;
    T z = (T(x[k]) - center[c]) * scale[c] + shift[c];
    if (r != nullptr) z += T(r[k]);
    out[k] = scalar_t(act_forward(Act(act), z, p));
  }
}

// ---- backward -------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void bwd_reduce_partial_kernel(const scalar_t* g, const scalar_t* x, const scalar_t* y, const scalar_t* r,
                                          scalar_t* dr, const at::opmath_type<scalar_t>* center, double* p1, double* p2,
                                          int64_t C, int64_t inner, int64_t count, int64_t span, int act, double param,
                                          bool from_output) {
  using T = at::opmath_type<scalar_t>;
  const T p = T(param);
  const int64_t part = blockIdx.y, lo = part * span, hi = ::min(lo + span, count);
  const Walk w = walk_of(C, inner, lo);
  T s1 = 0, s2 = 0;
  if (w.active) {
    const T cen = center[w.c];
    for (int64_t q = w.first; q < hi; q += w.step) {
      const int64_t k = offset(q, w.c, C, inner);
      T dz, v;
      dz_v(g, x, y, r, k, cen, act, p, from_output, dz, v);
      s1 += dz;
      s2 += dz * v;
      if (dr != nullptr) dr[k] = scalar_t(dz);
    }
  }
  __shared__ double a1[kThreads], a2[kThreads];
  const int t = threadIdx.y * kLanes + threadIdx.x;
  a1[t] = s1, a2[t] = s2;
  __syncthreads();
  const int width = inner > 1 ? kThreads : kRows;
  const int stride = inner > 1 ? 1 : kLanes;
  const int i = inner > 1 ? t : threadIdx.y;
  for (int half = width / 2; half > 0; half /= 2) {
    if (i < half) {
      const int a = inner > 1 ? t : threadIdx.y * stride + threadIdx.x, b = a + half * stride;
      a1[a] += a1[b];
      a2[a] += a2[b];
    }
    __syncthreads();
  }
  if (i == 0 && w.active) {
    const int a = inner > 1 ? 0 : threadIdx.x;
    p1[part * C + w.c] = a1[a];
    p2[part * C + w.c] = a2[a];
  }
}

template <typename T>
__global__ void sum_combine_kernel(const double* p1, const double* p2, T* s1, T* s2, int64_t C, int64_t parts) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double a = 0, b = 0;
  for (int64_t p = 0; p < parts; ++p) a += p1[p * C + c], b += p2[p * C + c];
  s1[c] = T(a);
  s2[c] = T(b);
}

template <typename scalar_t>
__global__ void bwd_elemt_kernel(const scalar_t* g, const scalar_t* x, const scalar_t* y, const scalar_t* r,
                                 scalar_t* gi, const at::opmath_type<scalar_t>* center,
                                 const at::opmath_type<scalar_t>* ca, const at::opmath_type<scalar_t>* cb,
                                 const at::opmath_type<scalar_t>* cc, int64_t n, int64_t C, int64_t inner, int act,
                                 double param, bool from_output) {
  using T = at::opmath_type<scalar_t>;
  const T p = T(param);
  for (int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; k < n; k += int64_t(gridDim.x) * blockDim.x) {
    const int64_t c = (k / inner) % C;
    if (cb == nullptr) {  // eval
      gi[k] = scalar_t(ca[c] * act_grad(Act(act), T(g[k]), y != nullptr ? T(y[k]) : T(0), p));
      continue;
    }
    T dz, v;
    dz_v(g, x, y, r, k, center[c], act, p, from_output, dz, v);
    gi[k] = scalar_t(ca[c] * dz + cb[c] * v + cc[c]);
  }
}

// ---- launchers ------------------------------------------------------------------------------------------
template <typename scalar_t>
const scalar_t* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

int64_t elementwise_blocks(int64_t n) { return std::min<int64_t>(ceil_div(n, kElementwiseThreads), int64_t(1) << 20); }

dim3 reduce_grid(const BnLayout& l, const Split& s) {
  return dim3(unsigned(l.inner > 1 ? l.channels : ceil_div(l.channels, kLanes)), unsigned(s.parts));
}

struct Cuda {
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };

  static void stats(const at::Tensor& x, const BnLayout& l, const at::Tensor& mean, const at::Tensor& var) {
    TORCH_CHECK(l.channels < (int64_t(1) << 31) / kLanes, "pyops::batch_norm_stats: too many channels (", l.channels,
                ")");
    const Split s = split_of(l);
    const auto opts = x.options().dtype(at::kDouble);
    at::Tensor pn = at::empty({s.parts * l.channels}, opts), pmean = at::empty_like(pn), pm2 = at::empty_like(pn);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      using T = at::opmath_type<scalar_t>;
      stats_partial_kernel<scalar_t><<<reduce_grid(l, s), dim3(kLanes, kRows), 0, stream>>>(
          x.const_data_ptr<scalar_t>(), pn.mutable_data_ptr<double>(), pmean.mutable_data_ptr<double>(),
          pm2.mutable_data_ptr<double>(), l.channels, l.inner, l.count(), s.span);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      stats_combine_kernel<T><<<unsigned(ceil_div(l.channels, 256)), 256, 0, stream>>>(
          pn.const_data_ptr<double>(), pmean.const_data_ptr<double>(), pm2.const_data_ptr<double>(),
          mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>(), l.channels, s.parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void elemt(const BnPass& p, const at::Tensor& out) {
    const int64_t n = out.numel();
    PYOPS_DISPATCH_FLOATING(out.scalar_type(), [&] {
      using T = at::opmath_type<scalar_t>;
      elemt_kernel<scalar_t><<<elementwise_blocks(n), kElementwiseThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          ptr<scalar_t>(p.input), ptr<scalar_t>(p.residual), out.mutable_data_ptr<scalar_t>(), ptr<T>(p.center),
          ptr<T>(p.scale), ptr<T>(p.shift), n, p.l.channels, p.l.inner, int(p.act), p.param);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void bwd_reduce(const BnPass& p, const at::Tensor& sum_dz, const at::Tensor& sum_dzv, const at::Tensor& gr) {
    TORCH_CHECK(p.l.channels < (int64_t(1) << 31) / kLanes, "pyops::batch_norm_bwd_reduce: too many channels (",
                p.l.channels, ")");
    const Split s = split_of(p.l);
    const auto opts = p.grad.options().dtype(at::kDouble);
    at::Tensor p1 = at::empty({s.parts * p.l.channels}, opts), p2 = at::empty_like(p1);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    PYOPS_DISPATCH_FLOATING(p.grad.scalar_type(), [&] {
      using T = at::opmath_type<scalar_t>;
      bwd_reduce_partial_kernel<scalar_t><<<reduce_grid(p.l, s), dim3(kLanes, kRows), 0, stream>>>(
          ptr<scalar_t>(p.grad), ptr<scalar_t>(p.input), ptr<scalar_t>(p.output), ptr<scalar_t>(p.residual),
          gr.defined() ? gr.mutable_data_ptr<scalar_t>() : nullptr, ptr<T>(p.center), p1.mutable_data_ptr<double>(),
          p2.mutable_data_ptr<double>(), p.l.channels, p.l.inner, p.l.count(), s.span, int(p.act), p.param,
          p.from_output);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_combine_kernel<T><<<unsigned(ceil_div(p.l.channels, 256)), 256, 0, stream>>>(
          p1.const_data_ptr<double>(), p2.const_data_ptr<double>(), sum_dz.mutable_data_ptr<T>(),
          sum_dzv.mutable_data_ptr<T>(), p.l.channels, s.parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // the two backward passes stay two kernels here (csrc/batch_norm.h runs them)
  static bool bwd_fused(const BnPass&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&) {
    return false;
  }
  static void bwd_elemt(const BnPass& p, const at::Tensor& gi) {
    const int64_t n = gi.numel();
    PYOPS_DISPATCH_FLOATING(gi.scalar_type(), [&] {
      using T = at::opmath_type<scalar_t>;
      bwd_elemt_kernel<scalar_t><<<elementwise_blocks(n), kElementwiseThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          ptr<scalar_t>(p.grad), ptr<scalar_t>(p.input), ptr<scalar_t>(p.output), ptr<scalar_t>(p.residual),
          gi.mutable_data_ptr<scalar_t>(), ptr<T>(p.center), ptr<T>(p.a), ptr<T>(p.b), ptr<T>(p.c), n, p.l.channels,
          p.l.inner, int(p.act), p.param, p.from_output);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_BATCH_NORM(m, ::pyops::Cuda, ""); }

}  // namespace pyops
