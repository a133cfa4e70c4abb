// CUDA kernels of the loss family (the host side is csrc/loss.h). Math in opmath_type; reductions
// accumulate in float32 (float64 for float64) and are deterministic: a grid whose size depends only
// on the element count writes one partial per block (a fixed shared-memory tree), and one block then
// adds the partials in a fixed order. No atomics, no host synchronisation. Every launch's grid and
// block come from csrc/common/launch_plan.h.
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
#include "common/launch_plan.h"
#include "loss.h"

namespace pyops {
namespace {

constexpr int kThreads = int(plan::loss::kThreads);
constexpr int kMaxRowThreads = int(plan::loss::kWideThreads);  // cross_entropy's widest block

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

template <typename A, bool kMax>
__device__ __forceinline__ A combine(A a, A b) {
  return kMax ? ((a > b || a != a) ? a : b) : a + b;  // the maximum lets NaN through
}

// The sum (or maximum) of v over the block (a power of two of threads), in a fixed tree; every thread
// gets the result.
template <typename A, bool kMax>
__device__ A block_reduce(A v, A* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] = combine<A, kMax>(shared[threadIdx.x], shared[threadIdx.x + s]);
    __syncthreads();
  }
  const A r = shared[0];
  __syncthreads();
  return r;
}

// The same over the `lanes` threads of one row: the block when lanes is blockDim.x, else aligned
// segments of a warp (lanes a power of two <= 32; every lane of the warp takes part), a fixed shuffle
// tree whose result the segment's first lane gives to the others.
template <typename A, bool kMax>
__device__ A row_reduce(A v, A* shared, int lanes) {
  if (lanes > 32) return block_reduce<A, kMax>(v, shared);
  for (int d = lanes / 2; d > 0; d /= 2) v = combine<A, kMax>(v, __shfl_down_sync(0xffffffffu, v, d, lanes));
  return __shfl_sync(0xffffffffu, v, 0, lanes);
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pointwise_kernel(const T* x, const T* t, T* out, int64_t n, LossMath<at::opmath_type<T>> m) {
  using O = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(i, n) { out[i] = T(m.loss(O(x[i]) - O(t[i]))); }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    pointwise_bwd_kernel(const T* g, const T* x, const T* t, T* gi, int64_t n, LossMath<at::opmath_type<T>> m) {
  using O = at::opmath_type<T>;
  PYOPS_GRID_STRIDE(i, n) { gi[i] = T(O(g[i]) * m.deriv(O(x[i]) - O(t[i]))); }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    reduce_blocks_kernel(const T* x, const T* t, T* grad, at::opmath_type<T>* partials, int64_t n,
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
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const at::opmath_type<T>* partials, int64_t count, T* out, at::opmath_type<T> scale) {
  using O = at::opmath_type<T>;
  __shared__ O shared[kThreads];
  O acc = 0;
  for (int64_t i = threadIdx.x; i < count; i += kThreads) acc += partials[i];
  const O total = block_reduce<O, false>(acc, shared);
  if (threadIdx.x == 0) *out = T(total * scale);
}

// Rows of C classes (csrc/loss.h has the math), `lanes` threads a row (plan::cross_entropy: a power
// of two up to 32 for few classes, several rows a block; the whole block for many), a grid-stride loop
// over the rows (64-bit). Targets out of range read nothing out of bounds: the row's loss and gradient
// become NaN (raising would need a host synchronisation).
template <typename T>
__global__ void __launch_bounds__(kMaxRowThreads)
    cross_entropy_kernel(const T* x, const int64_t* tidx, const T* tprob, const at::opmath_type<T>* w,
                         const at::opmath_type<T>* inv_total, at::opmath_type<T>* loss_rows, T* grad, int64_t rows,
                         int64_t C, int lanes, at::opmath_type<T> scale, int64_t ignore_index, at::opmath_type<T> eps) {
  using O = at::opmath_type<T>;
  __shared__ O shared[kMaxRowThreads];
  const int rows_per_block = blockDim.x / lanes, lane = threadIdx.x % lanes;
  const O eps_c = eps / O(C), keep = O(1) - eps;
  const O gscale = inv_total ? *inv_total : scale;
  // the loop's bounds are the block's, so that every thread reaches every reduction
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t row = first + threadIdx.x / lanes;
    const bool active = row < rows;
    const int64_t end = active ? C : 0;  // classes this thread's row walks (none past the last row)
    const T* xr = x + (active ? row : 0) * C;
    int64_t tc = 0;
    O live = 1;
    if (tidx && active) {
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
    for (int64_t c = lane; c < end; c += lanes) {
      const O v = O(xr[c]);
      mx = (v > mx || v != v) ? v : mx;
    }
    mx = row_reduce<O, true>(mx, shared, lanes);
    O s = 0, a = 0, b = 0, ws = 0;
    for (int64_t c = lane; c < end; c += lanes) {
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
    s = row_reduce<O, false>(s, shared, lanes);
    a = row_reduce<O, false>(a, shared, lanes);
    b = row_reduce<O, false>(b, shared, lanes);
    ws = row_reduce<O, false>(ws, shared, lanes);
    if (!active) continue;  // (no reduction follows in this iteration)
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
    if (lane == 0) loss_rows[row] = loss;
    if (!grad) continue;
    const O lscale = live == O(0) ? O(0) : live * gscale;  // all rows ignored: the mean's scale is inf
    const O fp = lscale * coef_p / s, fw = lscale * coef_w;
    for (int64_t c = lane; c < C; c += lanes) {
      const O wc = w ? w[c] : O(1);
      O sub = tprob ? (O(tprob[row * C + c]) * keep + eps_c) * wc * fw : wc * fw;
      if (!tprob && c == tc) sub += lscale * keep * wt;
      grad[row * C + c] = T(::exp(O(xr[c]) - mx) * fp - sub);
    }
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
      const plan::Launch l = plan::loss_pointwise(x.numel());
      pointwise_kernel<scalar_t><<<plan::grid_of(l), plan::block_of(l), l.smem, stream>>>(
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
      const plan::Launch l = plan::loss_pointwise_bwd(x.numel());
      pointwise_bwd_kernel<scalar_t><<<plan::grid_of(l), plan::block_of(l), l.smem, stream>>>(
          g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
          gi.mutable_data_ptr<scalar_t>(), x.numel(), LossMath<O>{kind, O(delta)});
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void pointwise_reduce(const at::Tensor& x, const at::Tensor& t, const at::Tensor& out, const at::Tensor& g,
                               int64_t kind, double delta, double scale) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const int64_t n = x.numel();
    const plan::LossReduce pl = plan::loss_reduce(n);
    const int64_t blocks = pl.partial.grid.x;
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      using O = at::opmath_type<scalar_t>;
      at::Tensor partials = at::empty({blocks}, x.options().dtype(c10::CppTypeToScalarType<O>::value));
      reduce_blocks_kernel<scalar_t>
          <<<plan::grid_of(pl.partial), plan::block_of(pl.partial), pl.partial.smem, stream>>>(
              x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
              g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr, partials.mutable_data_ptr<O>(), n,
              LossMath<O>{kind, O(delta)}, O(scale));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      sum_partials_kernel<scalar_t><<<plan::grid_of(pl.sum), plan::block_of(pl.sum), pl.sum.smem, stream>>>(
          partials.const_data_ptr<O>(), blocks, out.mutable_data_ptr<scalar_t>(), O(scale));
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
    const plan::CrossEntropyPlan pl = plan::cross_entropy(x.size(0), x.size(1));
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      using O = at::opmath_type<scalar_t>;
      cross_entropy_kernel<scalar_t><<<plan::grid_of(pl.launch), plan::block_of(pl.launch), pl.launch.smem, stream>>>(
          x.const_data_ptr<scalar_t>(), probs ? nullptr : t.const_data_ptr<int64_t>(),
          probs ? t.const_data_ptr<scalar_t>() : nullptr, w.defined() ? w.const_data_ptr<O>() : nullptr,
          inv_total.defined() ? inv_total.const_data_ptr<O>() : nullptr, loss_rows.mutable_data_ptr<O>(),
          g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr, x.size(0), x.size(1), int(pl.lanes), O(scale),
          ignore_index, O(smoothing));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_LOSS(m, ::pyops::Cuda, ""); }

}  // namespace pyops
