// CUDA kernels of the batch_norm family (host side: csrc/batch_norm.h). The data is [outer, C, inner]
// dense. Reductions are split over a grid of (channel or channel group, part of the positions) blocks
// so that a small C still fills the GPU (2 waves on an H100 where the tensor allows: the split is
// plan::bn_reduce, csrc/common/launch_plan.h); each block reduces in a fixed tree and writes its
// partial result, and a second kernel (a warp per channel) combines the parts of each channel in a
// fixed order: deterministic, no atomics, no host synchronisation. Statistics: per-thread Welford,
// merged with Chan's formula. Reduction blocks are 32 x 8 threads: for inner > 1 (NCHW) a block serves
// one channel and its 256 threads walk the positions (coalesced along a run); for inner == 1
// (channels_last) the 32 lanes are 32 adjacent channels (coalesced along a row) and the 8 rows of
// threads walk the rows. Every pass carries its position as a running index (one division per thread,
// none per element). Math in opmath_type.
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
#include "common/launch_plan.h"

namespace pyops {
namespace {

constexpr int kLanes = int(plan::bn::kLanes);  // threadIdx.x of a reduction block
constexpr int kRows = int(plan::bn::kRows);    // threadIdx.y
constexpr int kThreads = kLanes * kRows;
constexpr int kCombineThreads = int(plan::bn::kCombineChannels) * 32;  // a warp per channel
constexpr int kElemtThreads = int(plan::bn::kElemtThreads);
static_assert(kThreads == plan::bn::kThreads, "a reduction block is 32 x 8 threads");

// ---- the activation: common/act.h (act: its code, p its slope or alpha) ---------------------------------

// dz = act'(g, y) and v = x - center (or act^-1(y) - r - center from the output) at element k, from g
// and y loaded once (y: 0 where absent).
template <typename scalar_t, typename T>
__device__ __forceinline__ void dz_v(T gv, T yv, const scalar_t* x, const scalar_t* r, int64_t k, T cen, int act, T p,
                                     bool from_output, T& dz, T& v) {
  dz = act_grad(Act(act), gv, yv, p);
  if (from_output)
    v = act_inverse(Act(act), yv, p) - (r != nullptr ? T(r[k]) : T(0)) - cen;
  else
    v = T(x[k]) - cen;
}

// A reduction thread's walk over positions q = first, first + step, ... of channel c (blockIdx.x: the
// channel for inner > 1, 32 channels for inner == 1; blockIdx.y: the part). The element of position q
// is (o * C + c) * inner + i with q = o * inner + i; (o, i) advance without division.
struct Walk {
  int64_t c, q, step, o, i, so, si;
  bool active;
};
__device__ __forceinline__ Walk walk_of(int64_t C, int64_t inner, int64_t lo) {
  Walk w;
  if (inner > 1) {
    w.c = blockIdx.x;
    w.q = lo + threadIdx.y * kLanes + threadIdx.x;
    w.step = kThreads;
  } else {
    w.c = int64_t(blockIdx.x) * kLanes + threadIdx.x;
    w.q = lo + threadIdx.y;
    w.step = kRows;
  }
  w.active = w.c < C;
  w.o = w.q / inner;
  w.i = w.q - w.o * inner;
  w.so = w.step / inner;
  w.si = w.step - w.so * inner;
  return w;
}
__device__ __forceinline__ int64_t offset(const Walk& w, int64_t C, int64_t inner) {
  return (w.o * C + w.c) * inner + w.i;
}
__device__ __forceinline__ void advance(Walk& w, int64_t inner) {
  w.q += w.step;
  w.o += w.so;
  w.i += w.si;
  if (w.i >= inner) {
    w.i -= inner;
    ++w.o;
  }
}

// An elementwise thread's channel c = (k / inner) % C and i = k % inner, advanced by the plan's stride
// (plan::BnElemt: stride = step_channel-th channel and step_inner positions further, modulo).
struct Step {
  int64_t stride, inner, channel;
};
struct Position {
  int64_t c, i;
  __device__ __forceinline__ Position(int64_t k, int64_t C, int64_t inner) {
    const int64_t q = k / inner;
    i = k - q * inner;
    c = q % C;
  }
  __device__ __forceinline__ void advance(const Step& s, int64_t C, int64_t inner) {
    i += s.inner;
    c += s.channel;
    if (i >= inner) {
      i -= inner;
      ++c;
    }
    if (c >= C) c -= C;
  }
};

// Chan's merge; the mean as a weighted average, so that an infinite value keeps it infinite (as torch's)
// where the difference of two infinite means would make it NaN.
__device__ __forceinline__ void chan(double& n, double& mean, double& m2, double nb, double mb, double m2b) {
  if (nb == 0) return;
  const double total = n + nb, delta = mb - mean;
  mean = mean * (n / total) + mb * (nb / total);
  m2 += m2b + delta * delta * (n * nb / total);
  n = total;
}

__device__ __forceinline__ double shfl_down(double v, int d) { return __shfl_down_sync(0xffffffffu, v, d); }

// ---- statistics ----------------------------------------------------------------------------------------
// Partials: channel c's part `part` at c * parts + part.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    stats_partial_kernel(const scalar_t* x, double* pn, double* pmean, double* pm2, int64_t C, int64_t inner,
                         int64_t count, int64_t span, int64_t parts) {
  using T = at::opmath_type<scalar_t>;
  const int64_t part = blockIdx.y, lo = part * span, hi = ::min(lo + span, count);
  Walk w = walk_of(C, inner, lo);
  T n = 0, mean = 0, m2 = 0;
  if (w.active)
    for (; w.q < hi; advance(w, inner)) {
      const T v = T(x[offset(w, C, inner)]);
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
    const int64_t j = w.c * parts + part;
    pn[j] = sn[a];
    pmean[j] = smean[a];
    pm2[j] = sm2[a];
  }
}

// A warp per channel: lane l merges parts l, l + 32, ... in order, then a fixed shuffle tree.
template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    stats_combine_kernel(const double* pn, const double* pmean, const double* pm2, T* mean, T* var, int64_t C,
                         int64_t parts) {
  const int64_t c = int64_t(blockIdx.x) * (kCombineThreads / 32) + threadIdx.x / 32;  // the same in a warp
  const int lane = threadIdx.x % 32;
  double n = 0, mu = 0, m2 = 0;
  if (c < C)
    for (int64_t p = lane; p < parts; p += 32)
      chan(n, mu, m2, pn[c * parts + p], pmean[c * parts + p], pm2[c * parts + p]);
  for (int d = 16; d > 0; d /= 2) {
    const double nb = shfl_down(n, d), mb = shfl_down(mu, d), m2b = shfl_down(m2, d);
    chan(n, mu, m2, nb, mb, m2b);
  }
  if (lane == 0 && c < C) {
    mean[c] = T(mu);
    var[c] = T(m2 / n);
  }
}

// ---- forward, elementwise -----------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kElemtThreads)
    elemt_kernel(const scalar_t* x, const scalar_t* r, scalar_t* out, const at::opmath_type<scalar_t>* center,
                 const at::opmath_type<scalar_t>* scale, const at::opmath_type<scalar_t>* shift, int64_t n, int64_t C,
                 int64_t inner, Step step, int act, double param) {
  using T = at::opmath_type<scalar_t>;
  const T p = T(param);
  int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= n) return;
  for (Position pos(k, C, inner); k < n; k += step.stride, pos.advance(step, C, inner)) {
    const int64_t c = pos.c;
    T z = (T(x[k]) - center[c]) * scale[c] + shift[c];
    if (r != nullptr) z += T(r[k]);
    out[k] = scalar_t(act_forward(Act(act), z, p));
  }
}

// ---- backward -------------------------------------------------------------------------------------------
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    bwd_reduce_partial_kernel(const scalar_t* g, const scalar_t* x, const scalar_t* y, const scalar_t* r, scalar_t* dr,
                              const at::opmath_type<scalar_t>* center, double* p1, double* p2, int64_t C, int64_t inner,
                              int64_t count, int64_t span, int64_t parts, int act, double param, bool from_output) {
  using T = at::opmath_type<scalar_t>;
  const T p = T(param);
  const int64_t part = blockIdx.y, lo = part * span, hi = ::min(lo + span, count);
  Walk w = walk_of(C, inner, lo);
  T s1 = 0, s2 = 0;
  if (w.active) {
    const T cen = center[w.c];
    for (; w.q < hi; advance(w, inner)) {
      const int64_t k = offset(w, C, inner);
      T dz, v;
      dz_v(T(g[k]), y != nullptr ? T(y[k]) : T(0), x, r, k, cen, act, p, from_output, dz, v);
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
    p1[w.c * parts + part] = a1[a];
    p2[w.c * parts + part] = a2[a];
  }
}

template <typename T>
__global__ void __launch_bounds__(kCombineThreads)
    sum_combine_kernel(const double* p1, const double* p2, T* s1, T* s2, int64_t C, int64_t parts) {
  const int64_t c = int64_t(blockIdx.x) * (kCombineThreads / 32) + threadIdx.x / 32;  // the same in a warp
  const int lane = threadIdx.x % 32;
  double a = 0, b = 0;
  if (c < C)
    for (int64_t p = lane; p < parts; p += 32) a += p1[c * parts + p], b += p2[c * parts + p];
  for (int d = 16; d > 0; d /= 2) {
    a += shfl_down(a, d);
    b += shfl_down(b, d);
  }
  if (lane == 0 && c < C) {
    s1[c] = T(a);
    s2[c] = T(b);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kElemtThreads)
    bwd_elemt_kernel(const scalar_t* g, const scalar_t* x, const scalar_t* y, const scalar_t* r, scalar_t* gi,
                     const at::opmath_type<scalar_t>* center, const at::opmath_type<scalar_t>* ca,
                     const at::opmath_type<scalar_t>* cb, const at::opmath_type<scalar_t>* cc, int64_t n, int64_t C,
                     int64_t inner, Step step, int act, double param, bool from_output) {
  using T = at::opmath_type<scalar_t>;
  const T p = T(param);
  int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= n) return;
  for (Position pos(k, C, inner); k < n; k += step.stride, pos.advance(step, C, inner)) {
    const int64_t c = pos.c;
    const T gv = T(g[k]), yv = y != nullptr ? T(y[k]) : T(0);
    if (cb == nullptr) {  // eval
      gi[k] = scalar_t(ca[c] * act_grad(Act(act), gv, yv, p));
      continue;
    }
    T dz, v;
    dz_v(gv, yv, x, r, k, center[c], act, p, from_output, dz, v);
    gi[k] = scalar_t(ca[c] * dz + cb[c] * v + cc[c]);
  }
}

// ---- launchers: every configuration from csrc/common/launch_plan.h ------------------------------------
template <typename scalar_t>
const scalar_t* ptr(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr;
}

plan::BnShape shape_of(const BnLayout& l) { return {l.outer, l.channels, l.inner}; }

Step step_of(const plan::BnElemt& e) { return {e.stride, e.step_inner, e.step_channel}; }

void check_grid(const char* op, const plan::Launch& l, int64_t channels) {
  TORCH_CHECK(l.grid.x <= plan::kMaxGridX && l.grid.y <= plan::kMaxGridYZ, "pyops::", op, ": too many channels (",
              channels, ")");
}

struct Cuda {
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };

  static void stats(const at::Tensor& x, const BnLayout& l, const at::Tensor& mean, const at::Tensor& var) {
    const plan::BnReduce pl = plan::bn_stats(shape_of(l));
    check_grid("batch_norm_stats", pl.partial, l.channels);
    const auto opts = x.options().dtype(at::kDouble);
    at::Tensor pn = at::empty({pl.parts * l.channels}, opts), pmean = at::empty_like(pn), pm2 = at::empty_like(pn);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      using T = at::opmath_type<scalar_t>;
      stats_partial_kernel<scalar_t>
          <<<plan::grid_of(pl.partial), plan::block_of(pl.partial), pl.partial.smem, stream>>>(
              x.const_data_ptr<scalar_t>(), pn.mutable_data_ptr<double>(), pmean.mutable_data_ptr<double>(),
              pm2.mutable_data_ptr<double>(), l.channels, l.inner, l.count(), pl.span, pl.parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      stats_combine_kernel<T><<<plan::grid_of(pl.combine), plan::block_of(pl.combine), pl.combine.smem, stream>>>(
          pn.const_data_ptr<double>(), pmean.const_data_ptr<double>(), pm2.const_data_ptr<double>(),
          mean.mutable_data_ptr<T>(), var.mutable_data_ptr<T>(), l.channels, pl.parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void elemt(const BnPass& p, const at::Tensor& out) {
    const plan::BnElemt pl = plan::bn_elemt(shape_of(p.l));
    PYOPS_DISPATCH_FLOATING(out.scalar_type(), [&] {
      using T = at::opmath_type<scalar_t>;
      elemt_kernel<scalar_t>
          <<<plan::grid_of(pl.launch), plan::block_of(pl.launch), pl.launch.smem, c10::cuda::getCurrentCUDAStream()>>>(
              ptr<scalar_t>(p.input), ptr<scalar_t>(p.residual), out.mutable_data_ptr<scalar_t>(), ptr<T>(p.center),
              ptr<T>(p.scale), ptr<T>(p.shift), out.numel(), p.l.channels, p.l.inner, step_of(pl), int(p.act), p.param);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void bwd_reduce(const BnPass& p, const at::Tensor& sum_dz, const at::Tensor& sum_dzv, const at::Tensor& gr) {
    const plan::BnReduce pl = plan::bn_bwd_reduce(shape_of(p.l));
    check_grid("batch_norm_bwd_reduce", pl.partial, p.l.channels);
    const auto opts = p.grad.options().dtype(at::kDouble);
    at::Tensor p1 = at::empty({pl.parts * p.l.channels}, opts), p2 = at::empty_like(p1);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    PYOPS_DISPATCH_FLOATING(p.grad.scalar_type(), [&] {
      using T = at::opmath_type<scalar_t>;
      bwd_reduce_partial_kernel<scalar_t>
          <<<plan::grid_of(pl.partial), plan::block_of(pl.partial), pl.partial.smem, stream>>>(
              ptr<scalar_t>(p.grad), ptr<scalar_t>(p.input), ptr<scalar_t>(p.output), ptr<scalar_t>(p.residual),
              gr.defined() ? gr.mutable_data_ptr<scalar_t>() : nullptr, ptr<T>(p.center), p1.mutable_data_ptr<double>(),
              p2.mutable_data_ptr<double>(), p.l.channels, p.l.inner, p.l.count(), pl.span, pl.parts, int(p.act),
              p.param, p.from_output);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_combine_kernel<T><<<plan::grid_of(pl.combine), plan::block_of(pl.combine), pl.combine.smem, stream>>>(
          p1.const_data_ptr<double>(), p2.const_data_ptr<double>(), sum_dz.mutable_data_ptr<T>(),
          sum_dzv.mutable_data_ptr<T>(), p.l.channels, pl.parts);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // the two backward passes stay two kernels here (csrc/batch_norm.h runs them)
  static bool bwd_fused(const BnPass&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&) {
    return false;
  }
  static void bwd_elemt(const BnPass& p, const at::Tensor& gi) {
    const plan::BnElemt pl = plan::bn_bwd_elemt(shape_of(p.l));
    PYOPS_DISPATCH_FLOATING(gi.scalar_type(), [&] {
      using T = at::opmath_type<scalar_t>;
      bwd_elemt_kernel<scalar_t>
          <<<plan::grid_of(pl.launch), plan::block_of(pl.launch), pl.launch.smem, c10::cuda::getCurrentCUDAStream()>>>(
              ptr<scalar_t>(p.grad), ptr<scalar_t>(p.input), ptr<scalar_t>(p.output), ptr<scalar_t>(p.residual),
              gi.mutable_data_ptr<scalar_t>(), ptr<T>(p.center), ptr<T>(p.a), ptr<T>(p.b), ptr<T>(p.c), gi.numel(),
              p.l.channels, p.l.inner, step_of(pl), int(p.act), p.param, p.from_output);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_BATCH_NORM(m, ::pyops::Cuda, ""); }

}  // namespace pyops
