// CUDA kernels of the conv family (host side: csrc/conv.h; math: pyops/ops/conv.py). Direct kernels,
// one template over the four dtypes, accumulating in opmath:
// - forward: one thread per output element, the sum over its group's channels and the kernel taps, then
//   bias and activation;
// - input gradient: one thread per input element, gathering the output positions its taps reach (no
//   atomics);
// - weight and bias gradients: one block per weight element (per bias element), each thread summing a
//   fixed strided slice of N * OH * OW, then a tree reduction in shared memory: a fixed order.
// Inputs are read through their strides (any layout); outputs are dense as the host side allocates them.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "common/dispatch.h"
#include "conv.h"

namespace pyops {
namespace {

constexpr int kThreads = 256;

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

template <typename scalar_t>
__global__ void conv_fwd_kernel(const scalar_t* __restrict__ x, Strides4 xs, const scalar_t* __restrict__ w,
                                const scalar_t* __restrict__ bias, scalar_t* __restrict__ out, Strides4 os, ConvShape s,
                                Act act, double scalar) {
  using T = at::opmath_type<scalar_t>;
  const int64_t total = s.N * s.K * s.OH * s.OW;
  const int64_t Cg = s.C / s.groups, Kg = s.K / s.groups;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ow = i % s.OW, oh = i / s.OW % s.OH, k = i / (s.OW * s.OH) % s.K, n = i / (s.OW * s.OH * s.K);
    const int64_t c0 = k / Kg * Cg;
    T acc = bias ? T(bias[k]) : T(0);
    for (int64_t c = 0; c < Cg; ++c) {
      const scalar_t* xp = x + n * xs.s0 + (c0 + c) * xs.s1;
      const scalar_t* wp = w + ((k * Cg + c) * s.KH) * s.KW;
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
        if (ih < 0 || ih >= s.H) continue;
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const int64_t iw = ow * s.sw - s.pw + kw * s.dw;
          if (iw < 0 || iw >= s.W) continue;
          acc += T(wp[kh * s.KW + kw]) * T(xp[ih * xs.s2 + iw * xs.s3]);
        }
      }
    }
    out[n * os.s0 + k * os.s1 + oh * os.s2 + ow * os.s3] = scalar_t(act_forward(act, acc, T(scalar)));
  }
}

// the mask bits of out (common/act.h: bit j of byte i is element 8 i + j in memory order)
template <typename scalar_t>
__global__ void conv_mask_kernel(const scalar_t* __restrict__ y, uint8_t* __restrict__ mask, int64_t n, Act act) {
  using T = at::opmath_type<scalar_t>;
  const int64_t bytes = (n + 7) / 8;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < bytes; b += int64_t(gridDim.x) * blockDim.x) {
    uint8_t bits = 0;
    for (int j = 0; j < 8 && b * 8 + j < n; ++j) {
      const T v = T(y[b * 8 + j]);
      bits |= uint8_t(act_pass(act, v)) << j;
    }
    mask[b] = bits;
  }
}

template <typename scalar_t>
__global__ void conv_bwd_input_kernel(const scalar_t* __restrict__ g, Strides4 gs, const scalar_t* __restrict__ w,
                                      scalar_t* __restrict__ gi, Strides4 is, ConvShape s) {
  using T = at::opmath_type<scalar_t>;
  const int64_t total = s.N * s.C * s.H * s.W;
  const int64_t Cg = s.C / s.groups, Kg = s.K / s.groups;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t iw = i % s.W, ih = i / s.W % s.H, ci = i / (s.W * s.H) % s.C, n = i / (s.W * s.H * s.C);
    const int64_t grp = ci / Cg, c = ci % Cg;
    T acc = 0;
    for (int64_t kl = 0; kl < Kg; ++kl) {
      const int64_t k = grp * Kg + kl;
      const scalar_t* gp = g + n * gs.s0 + k * gs.s1;
      const scalar_t* wp = w + ((k * Cg + c) * s.KH) * s.KW;
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t th = ih + s.ph - kh * s.dh;
        if (th < 0 || th % s.sh != 0 || th / s.sh >= s.OH) continue;
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const int64_t tw = iw + s.pw - kw * s.dw;
          if (tw < 0 || tw % s.sw != 0 || tw / s.sw >= s.OW) continue;
          acc += T(gp[(th / s.sh) * gs.s2 + (tw / s.sw) * gs.s3]) * T(wp[kh * s.KW + kw]);
        }
      }
    }
    gi[n * is.s0 + ci * is.s1 + ih * is.s2 + iw * is.s3] = scalar_t(acc);
  }
}

// The block's sum of v, thread 0 holding it; a fixed tree.
template <typename T>
__device__ T block_sum(T v, T* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

// blockIdx.x: a weight element (k, c, kh, kw), then K bias elements when bias is wanted.
template <typename scalar_t>
__global__ void conv_bwd_weight_kernel(const scalar_t* __restrict__ g, Strides4 gs, const scalar_t* __restrict__ x,
                                       Strides4 xs, scalar_t* __restrict__ gw, scalar_t* __restrict__ gb, ConvShape s) {
  using T = at::opmath_type<scalar_t>;
  __shared__ T shared[kThreads];
  const int64_t Cg = s.C / s.groups, Kg = s.K / s.groups;
  const int64_t wsize = s.K * Cg * s.KH * s.KW, M = s.N * s.OH * s.OW;
  const int64_t e = blockIdx.x;
  T acc = 0;
  if (e < wsize) {
    const int64_t kw = e % s.KW, kh = e / s.KW % s.KH, c = e / (s.KW * s.KH) % Cg, k = e / (s.KW * s.KH * Cg);
    const int64_t ci = k / Kg * Cg + c;
    for (int64_t m = threadIdx.x; m < M; m += kThreads) {
      const int64_t ow = m % s.OW, oh = m / s.OW % s.OH, n = m / (s.OW * s.OH);
      const int64_t ih = oh * s.sh - s.ph + kh * s.dh, iw = ow * s.sw - s.pw + kw * s.dw;
      if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
      acc += T(g[n * gs.s0 + k * gs.s1 + oh * gs.s2 + ow * gs.s3]) *
             T(x[n * xs.s0 + ci * xs.s1 + ih * xs.s2 + iw * xs.s3]);
    }
  } else {
    const int64_t k = e - wsize;
    for (int64_t m = threadIdx.x; m < M; m += kThreads) {
      const int64_t ow = m % s.OW, oh = m / s.OW % s.OH, n = m / (s.OW * s.OH);
      acc += T(g[n * gs.s0 + k * gs.s1 + oh * gs.s2 + ow * gs.s3]);
    }
  }
  const T total = block_sum(acc, shared);
  if (threadIdx.x == 0) {
    if (e < wsize)
      gw[e] = scalar_t(total);
    else
      gb[e - wsize] = scalar_t(total);
  }
}

int64_t blocks_for(int64_t n) {
  return std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, 65535 * 8));
}

struct Cuda {
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };

  static void forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                      const at::Tensor& out, Act act, double scalar) {
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      conv_fwd_kernel<scalar_t><<<blocks_for(out.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          x.const_data_ptr<scalar_t>(), strides_of(x), w.const_data_ptr<scalar_t>(),
          bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), strides_of(out),
          s, act, scalar);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void mask(const at::Tensor& out, const at::Tensor& mask, Act act) {
    PYOPS_DISPATCH_FLOATING(out.scalar_type(), [&] {
      conv_mask_kernel<scalar_t><<<blocks_for(mask.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          out.const_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(), out.numel(), act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
    PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
      conv_bwd_input_kernel<scalar_t><<<blocks_for(gi.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), strides_of(g), w.const_data_ptr<scalar_t>(), gi.mutable_data_ptr<scalar_t>(),
          strides_of(gi), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                              const at::Tensor& gb) {
    const int64_t blocks = gw.numel() + (gb.defined() ? s.K : 0);
    PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
      conv_bwd_weight_kernel<scalar_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          g.const_data_ptr<scalar_t>(), strides_of(g), x.const_data_ptr<scalar_t>(), strides_of(x),
          gw.mutable_data_ptr<scalar_t>(), gb.defined() ? gb.mutable_data_ptr<scalar_t>() : nullptr, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_CONV(m, ::pyops::Cuda, ""); }

}  // namespace pyops
