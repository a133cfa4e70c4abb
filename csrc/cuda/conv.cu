// CUDA kernels of the conv family (host side: csrc/conv.h; math: pyops/ops/conv.py; launch configurations:
// csrc/cuda/conv_plan.h, which the launchers below call, so a launch plan is the launch). Three engines, by
// the input channels per group Cg (conv_plan::conv_cuda_engine):
// - Cg >= 8: torch's own convolution (at::convolution / at::convolution_backward: cuDNN). Dense and
//   grouped convolutions with that many channels are matrix products (implicit GEMM on tensor cores,
//   what cuDNN does and what a hand-written kernel here would have to match); TF32 follows
//   torch.backends.cudnn.allow_tf32, the algorithm choice torch.backends.cudnn.benchmark and the
//   run-to-run determinism torch.backends.cudnn.deterministic, through torch's own call. The fused
//   activation then runs as one in-place elementwise pass (conv_act_kernel), the mask as another. When
//   torch's result has the strides the host side chose, it becomes the output (no copy).
// - Cg == 1 (depthwise, any channel multiplier), stride 1 or 2, NCHW: tiled kernels, 256 threads per block
//   on a tile of one (n, channel) plane (32x8, 16x16 or 8x32 results, the narrowest that covers a row):
//   the forward stages the input tile and its halo and the channel's filter in shared memory, then bias
//   and the activation; the input gradient stages the output-gradient tile its transposed stencil reads
//   (stride a template constant: no division by a runtime value); the weight gradient gives each block a
//   fixed run of output tiles of one channel, each warp a fixed set of taps (the bias last), and writes
//   the block's sums to a partials buffer; conv_reduce_partials_kernel adds them in chunk order.
// - the rest (2-7 channels per group, other strides, channels_last): direct kernels, one thread per
//   output (input-gradient) element walked in the tensor's memory order (channels fastest in
//   channels_last, so that a warp's loads are consecutive channels: this is the channels_last depthwise
//   path too), the input gradient stepping its output position per tap (the quotient and remainder by
//   the stride carried, not recomputed), and a weight gradient split over N * OH * OW into per-block
//   partials (NCHW: a block per output channel, 64 taps and chunk, each warp 8 taps with its lanes on
//   positions; channels_last: a block per 32 output channels, 8 taps and chunk, the lanes on channels),
//   each position's grad_out read once for 8 taps, summed by the same fixed-order pass.
// Every reduction has a fixed order and no kernel uses atomics: results are bitwise run-to-run
// deterministic (on the cuDNN engine as torch.backends.cudnn.deterministic says). Accumulation in opmath;
// offsets into tensors int64; inputs read through their strides (any layout); outputs dense as allocated.
#include <ATen/OpMathType.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <array>
#include <cstdint>

#include "common/dispatch.h"
#include "conv.h"
#include "cuda/conv_plan.h"

namespace pyops {
namespace {

using conv_plan::DwTile;
using conv_plan::Engine;
constexpr int kThreads = int(conv_plan::kThreads);

struct Strides4 {
  int64_t s0, s1, s2, s3;
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

bool channels_last(const at::Tensor& t) { return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast; }

using plan::block_of;
using plan::grid_of;

#define PYOPS_GRID_STRIDE(i, count) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (count); i += int64_t(gridDim.x) * blockDim.x)

// floor(a / b) for b > 0
__device__ __forceinline__ int floor_div(int a, int b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }

// The sum of v over a warp, lane 0 holding it: a fixed tree.
template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// ---- direct engine -----------------------------------------------------------------------------------------
// i -> (n, channel, h, w) of a [N, Ch, Hh, Ww] tensor, walked in NCHW order or, kCL, channels fastest.
template <bool kCL>
__device__ __forceinline__ void unflatten(int64_t i, int64_t Ch, int64_t Hh, int64_t Ww, int64_t& n, int64_t& ch,
                                          int64_t& h, int64_t& w) {
  if (kCL) {
    ch = i % Ch, i /= Ch;
    w = i % Ww, i /= Ww;
    h = i % Hh, n = i / Hh;
  } else {
    w = i % Ww, i /= Ww;
    h = i % Hh, i /= Hh;
    ch = i % Ch, n = i / Ch;
  }
}

// (4 blocks per SM: 64 registers at most)
template <typename scalar_t, bool kCL>
__global__ __launch_bounds__(256, 4) void conv_fwd_kernel(const scalar_t* __restrict__ x, Strides4 xs,
                                                          const scalar_t* __restrict__ w,
                                                          const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                                          Strides4 os, ConvShape s, Act act, double scalar) {
  using T = at::opmath_type<scalar_t>;
  const int64_t total = s.N * s.K * s.OH * s.OW;
  const int64_t Cg = s.C / s.groups, Kg = s.K / s.groups;
  PYOPS_GRID_STRIDE(i, total) {
    int64_t n, k, oh, ow;
    unflatten<kCL>(i, s.K, s.OH, s.OW, n, k, oh, ow);
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

// grad_in[n, ci, ih, iw] = sum over the group's k and the taps with oh * sh = ih + ph - kh * dh (and the
// same for w) of grad_out[n, k, oh, ow] * w[k, c, kh, kw]. The quotient and remainder of ih + ph - kh * dh
// by sh are stepped as kh grows (dh = dq * sh + dr), so no tap divides.
template <typename scalar_t, bool kCL>
__global__ __launch_bounds__(256) void conv_bwd_input_kernel(const scalar_t* __restrict__ g, Strides4 gs,
                                                             const scalar_t* __restrict__ w, scalar_t* __restrict__ gi,
                                                             Strides4 is, ConvShape s) {
  using T = at::opmath_type<scalar_t>;
  const int64_t total = s.N * s.C * s.H * s.W;
  const int64_t Cg = s.C / s.groups, Kg = s.K / s.groups;
  const int64_t dqh = s.dh / s.sh, drh = s.dh % s.sh, dqw = s.dw / s.sw, drw = s.dw % s.sw;
  PYOPS_GRID_STRIDE(i, total) {
    int64_t n, ci, ih, iw;
    unflatten<kCL>(i, s.C, s.H, s.W, n, ci, ih, iw);
    const int64_t grp = ci / Cg, c = ci - grp * Cg;
    // kh = 0 and kw = 0: ih + ph = qh0 * sh + rh0, both non-negative
    const int64_t qh0 = (ih + s.ph) / s.sh, rh0 = (ih + s.ph) - qh0 * s.sh;
    const int64_t qw0 = (iw + s.pw) / s.sw, rw0 = (iw + s.pw) - qw0 * s.sw;
    T acc = 0;
    for (int64_t kl = 0; kl < Kg; ++kl) {
      const int64_t k = grp * Kg + kl;
      const scalar_t* gp = g + n * gs.s0 + k * gs.s1;
      const scalar_t* wp = w + ((k * Cg + c) * s.KH) * s.KW;
      int64_t qh = qh0, rh = rh0;  // (ih + ph - kh dh) = qh sh + rh, 0 <= rh < sh
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        if (rh == 0 && qh >= 0 && qh < s.OH) {
          int64_t qw = qw0, rw = rw0;
          for (int64_t kw = 0; kw < s.KW; ++kw) {
            if (rw == 0 && qw >= 0 && qw < s.OW) acc += T(gp[qh * gs.s2 + qw * gs.s3]) * T(wp[kh * s.KW + kw]);
            rw -= drw, qw -= dqw;
            if (rw < 0) rw += s.sw, --qw;
          }
        }
        rh -= drh, qh -= dqh;
        if (rh < 0) rh += s.sh, --qh;
      }
    }
    gi[n * is.s0 + ci * is.s1 + ih * is.s2 + iw * is.s3] = scalar_t(acc);
  }
}

// Weight-gradient chunk bounds: chunk `ch` of S over `work` units.
__device__ __forceinline__ void chunk_range(int64_t work, int64_t S, int64_t ch, int64_t& lo, int64_t& hi) {
  lo = work / S * ch + std::min(work % S, ch);
  hi = lo + work / S + (ch < work % S ? 1 : 0);
}

// The operands of the direct weight gradient. Its sums: T = Cg KH KW + 1 taps per output channel k, tap
// t < T - 1 the weight element (k, c, kh, kw) = sum over positions m of N * OH * OW of
// grad_out[n, k, oh, ow] * x[n, k / Kg * Cg + c, oh sh - ph + kh dh, ow sw - pw + kw dw] (0 outside x),
// tap T - 1 the bias's, the sum of grad_out[n, k, oh, ow].
template <typename scalar_t>
struct WgradArgs {
  const scalar_t* g;
  Strides4 gs;
  const scalar_t* x;
  Strides4 xs;
  ConvShape s;
};

constexpr int kTapGroup = 64;   // NCHW: a block's taps, 8 per warp
constexpr int kThreadTaps = 8;  // channels_last: a thread's taps

// Tap t of output channel k: tap_c = its input channel within the group (-1: the bias, -2: past the
// last tap), tap_dh = kh dh, tap_dw = kw dw.
__device__ __forceinline__ void tap_of(const ConvShape& s, int64_t t, int64_t taps, int64_t& c, int64_t& oh_off,
                                       int64_t& ow_off) {
  oh_off = ow_off = 0;
  if (t >= taps) {
    c = -2;
  } else if (t == taps - 1) {
    c = -1;
  } else {
    c = t / (s.KH * s.KW);
    const int64_t r = t - c * s.KH * s.KW, kh = r / s.KW, kw = r - kh * s.KW;
    oh_off = kh * s.dh, ow_off = kw * s.dw;
  }
}

// NCHW: blockIdx.x = (k * TG + tg) * S + chunk (TG = ceil(T / 64) groups of 64 taps); warp w sums taps
// 64 tg + w + 8 j (j < 8) over the chunk's positions, its lanes on consecutive positions (coalesced along
// ow), each position's grad_out read once per warp for its 8 taps; then a fixed shuffle tree;
// partials[chunk][k * T + t].
// (96-120 registers: 2 blocks per SM, each thread with 8 independent sums in flight; capping the registers
// at 80 spills)
template <typename scalar_t>
__global__ __launch_bounds__(256) void conv_bwd_weight_kernel(WgradArgs<scalar_t> a,
                                                              at::opmath_type<scalar_t>* __restrict__ partials,
                                                              int64_t S) {
  using T = at::opmath_type<scalar_t>;
  __shared__ int64_t tap_ci[kTapGroup], tap_dh[kTapGroup], tap_dw[kTapGroup];
  const ConvShape& s = a.s;
  const int64_t Cg = s.C / s.groups, Kg = s.K / s.groups, taps = Cg * s.KH * s.KW + 1;
  const int64_t TG = (taps + kTapGroup - 1) / kTapGroup;
  const int64_t chunk = blockIdx.x % S, r = blockIdx.x / S, tg = r % TG, k = r / TG;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (threadIdx.x < kTapGroup) {
    int64_t c;
    tap_of(s, tg * kTapGroup + threadIdx.x, taps, c, tap_dh[threadIdx.x], tap_dw[threadIdx.x]);
    tap_ci[threadIdx.x] = c >= 0 ? k / Kg * Cg + c : c;  // the input channel, or -1 / -2
  }
  __syncthreads();
  T acc[kTapGroup / 8];
#pragma unroll
  for (int j = 0; j < kTapGroup / 8; ++j) acc[j] = 0;
  int64_t lo, hi;
  chunk_range(s.N * s.OH * s.OW, S, chunk, lo, hi);
  for (int64_t m = lo + lane; m < hi; m += 32) {
    const int64_t ow = m % s.OW, q = m / s.OW, oh = q % s.OH, n = q / s.OH;
    const T gv = T(a.g[n * a.gs.s0 + k * a.gs.s1 + oh * a.gs.s2 + ow * a.gs.s3]);
    const int64_t ih0 = oh * s.sh - s.ph, iw0 = ow * s.sw - s.pw;
#pragma unroll
    for (int j = 0; j < kTapGroup / 8; ++j) {
      const int i = warp + 8 * j;
      const int64_t ci = tap_ci[i], ih = ih0 + tap_dh[i], iw = iw0 + tap_dw[i];
      if (ci == -1)
        acc[j] += gv;
      else if (ci >= 0 && ih >= 0 && ih < s.H && iw >= 0 && iw < s.W)
        acc[j] += gv * T(a.x[n * a.xs.s0 + ci * a.xs.s1 + ih * a.xs.s2 + iw * a.xs.s3]);
    }
  }
#pragma unroll
  for (int j = 0; j < kTapGroup / 8; ++j) {
    const int i = warp + 8 * j;
    const T v = warp_sum(acc[j]);  // every lane takes part: the tap test comes after
    if (lane == 0 && tap_ci[i] != -2) partials[chunk * s.K * taps + k * taps + tg * kTapGroup + i] = v;
  }
}

// channels_last: 32 x 8 threads; blockIdx.x = (kb * TG + tg) * S + chunk (32 output channels kb, TG =
// ceil(T / 8) groups of 8 taps); lane x on channel 32 kb + x (coalesced), row y on positions lo + y,
// lo + y + 8, ..., each position's grad_out read once for the 8 taps; then the 8 rows summed in order;
// partials[chunk][k * T + t].
// (96-120 registers: 2 blocks per SM, each thread with 8 independent sums in flight; capping the registers
// at 80 spills)
template <typename scalar_t>
__global__ __launch_bounds__(256) void conv_bwd_weight_cl_kernel(WgradArgs<scalar_t> a,
                                                                 at::opmath_type<scalar_t>* __restrict__ partials,
                                                                 int64_t S) {
  using T = at::opmath_type<scalar_t>;
  __shared__ int64_t tap_c[kThreadTaps], tap_dh[kThreadTaps], tap_dw[kThreadTaps];
  __shared__ T rows[8][kThreadTaps][32];
  const ConvShape& s = a.s;
  const int64_t Cg = s.C / s.groups, Kg = s.K / s.groups, taps = Cg * s.KH * s.KW + 1;
  const int64_t TG = (taps + kThreadTaps - 1) / kThreadTaps;
  const int64_t chunk = blockIdx.x % S, r = blockIdx.x / S, tg = r % TG, kb = r / TG;
  const int64_t k = kb * 32 + threadIdx.x;
  if (threadIdx.y == 0 && threadIdx.x < kThreadTaps)
    tap_of(s, tg * kThreadTaps + threadIdx.x, taps, tap_c[threadIdx.x], tap_dh[threadIdx.x], tap_dw[threadIdx.x]);
  __syncthreads();
  T acc[kThreadTaps];
#pragma unroll
  for (int j = 0; j < kThreadTaps; ++j) acc[j] = 0;
  int64_t lo, hi;
  chunk_range(s.N * s.OH * s.OW, S, chunk, lo, hi);
  if (k < s.K) {
    const int64_t c0 = k / Kg * Cg;
    for (int64_t m = lo + threadIdx.y; m < hi; m += 8) {
      const int64_t ow = m % s.OW, q = m / s.OW, oh = q % s.OH, n = q / s.OH;
      const T gv = T(a.g[n * a.gs.s0 + k * a.gs.s1 + oh * a.gs.s2 + ow * a.gs.s3]);
      const int64_t ih0 = oh * s.sh - s.ph, iw0 = ow * s.sw - s.pw;
#pragma unroll
      for (int j = 0; j < kThreadTaps; ++j) {
        const int64_t c = tap_c[j], ih = ih0 + tap_dh[j], iw = iw0 + tap_dw[j];
        if (c == -1)
          acc[j] += gv;
        else if (c >= 0 && ih >= 0 && ih < s.H && iw >= 0 && iw < s.W)
          acc[j] += gv * T(a.x[n * a.xs.s0 + (c0 + c) * a.xs.s1 + ih * a.xs.s2 + iw * a.xs.s3]);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kThreadTaps; ++j) rows[threadIdx.y][j][threadIdx.x] = acc[j];
  __syncthreads();
  const int j = threadIdx.y;  // thread (x, y) adds tap j = y of channel k over the 8 rows
  if (k < s.K && tap_c[j] != -2) {
    T total = 0;
    for (int y = 0; y < 8; ++y) total += rows[y][j][threadIdx.x];
    partials[chunk * s.K * taps + k * taps + tg * kThreadTaps + j] = total;
  }
}

// gw[k, c, kh, kw] (= e over k * (T - 1) + t) and gb[k] = the sum over chunks 0..S-1, in order, of
// partials[chunk][k * T + t].
template <typename scalar_t>
__global__ __launch_bounds__(256) void conv_reduce_partials_kernel(
    const at::opmath_type<scalar_t>* __restrict__ partials, int64_t S, int64_t K, int64_t taps,
    scalar_t* __restrict__ gw, scalar_t* __restrict__ gb) {
  using T = at::opmath_type<scalar_t>;
  const int64_t E = K * taps;
  PYOPS_GRID_STRIDE(e, E) {
    T acc = 0;
    for (int64_t chunk = 0; chunk < S; ++chunk) acc += partials[chunk * E + e];
    const int64_t k = e / taps, t = e - k * taps;
    if (t < taps - 1)
      gw[k * (taps - 1) + t] = scalar_t(acc);
    else if (gb)
      gb[k] = scalar_t(acc);
  }
}

// ---- tiled depthwise engine ------------------------------------------------------------------------------
// A block's tile: blockDim = (tw, th) results; `tiles_w` x `tiles_h` tiles per plane.
struct TileIndex {
  int64_t plane;  // n * channels + channel
  int r0, c0;     // the tile's first row and column
};

__device__ __forceinline__ TileIndex tile_index(int64_t b, const DwTile& t) {
  const int64_t tc = b % t.tiles_w, r = b / t.tiles_w;
  return {r / t.tiles_h, int(r % t.tiles_h) * t.th, int(tc) * t.tw};
}

// tile[r][c] = x[n, ci, r0 + r, c0 + c] (0 outside the input), rows x cols elements, all threads.
template <typename scalar_t, typename T>
__device__ __forceinline__ void stage(T* tile, int rows, int cols, const scalar_t* xp, int64_t sr, int64_t sc, int r0,
                                      int c0, int64_t R, int64_t Cc) {
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int j = tid; j < rows * cols; j += kThreads) {
    const int r = j / cols, c = j - r * cols, y = r0 + r, z = c0 + c;
    tile[j] = (y >= 0 && y < R && z >= 0 && z < Cc) ? T(xp[y * sr + z * sc]) : T(0);
  }
}

// out[n, k] tile: the input tile of channel k / multiplier from row oh0 sh - ph, column ow0 sw - pw.
template <typename scalar_t>
__global__ __launch_bounds__(256) void conv_dw_fwd_kernel(const scalar_t* __restrict__ x, Strides4 xs,
                                                          const scalar_t* __restrict__ w,
                                                          const scalar_t* __restrict__ bias, scalar_t* __restrict__ out,
                                                          Strides4 os, ConvShape s, DwTile t, Act act, double scalar) {
  using T = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* tile = reinterpret_cast<T*>(smem_raw);
  T* wt = tile + t.in_h * t.in_w;
  const int taps = int(s.KH * s.KW), KW = int(s.KW), sh = int(s.sh), sw = int(s.sw), dh = int(s.dh), dw = int(s.dw);
  const int64_t mult = s.K / s.C, blocks = s.N * s.K * t.tiles_h * t.tiles_w;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const TileIndex ti = tile_index(b, t);
    const int64_t n = ti.plane / s.K, k = ti.plane % s.K, ci = k / mult;
    __syncthreads();  // the previous tile's reads are done
    stage(tile, t.in_h, t.in_w, x + n * xs.s0 + ci * xs.s1, xs.s2, xs.s3, ti.r0 * sh - int(s.ph),
          ti.c0 * sw - int(s.pw), s.H, s.W);
    for (int j = tid; j < taps; j += kThreads) wt[j] = T(w[k * taps + j]);
    __syncthreads();
    const int oh = ti.r0 + threadIdx.y, ow = ti.c0 + threadIdx.x;
    if (oh < s.OH && ow < s.OW) {
      T acc = bias ? T(bias[k]) : T(0);
      const T* base = tile + threadIdx.y * sh * t.in_w + threadIdx.x * sw;
      for (int kh = 0; kh < int(s.KH); ++kh)
        for (int kw = 0; kw < KW; ++kw) acc += wt[kh * KW + kw] * base[kh * dh * t.in_w + kw * dw];
      out[n * os.s0 + k * os.s1 + oh * os.s2 + ow * os.s3] = scalar_t(act_forward(act, acc, T(scalar)));
    }
  }
}

// grad_in[n, c] tile (rows ih0.., columns iw0..): for each of the channel's `multiplier` output channels,
// the grad_out tile from row oh_lo = floor((ih0 + ph - (KH - 1) dh) / SH) (0 outside grad_out) and its
// filter; tap (kh, kw) of input row ih reads output row oh_lo + u / SH when u = ih + ph - kh dh - oh_lo SH
// (>= 0 by the choice of oh_lo) is a multiple of SH.
template <typename scalar_t, int SH, int SW>
__global__ __launch_bounds__(256) void conv_dw_bwd_input_kernel(const scalar_t* __restrict__ g, Strides4 gs,
                                                                const scalar_t* __restrict__ w,
                                                                scalar_t* __restrict__ gi, Strides4 is, ConvShape s,
                                                                DwTile t) {
  using T = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* tile = reinterpret_cast<T*>(smem_raw);
  T* wt = tile + t.g_h * t.g_w;
  const int taps = int(s.KH * s.KW), KH = int(s.KH), KW = int(s.KW), dh = int(s.dh), dw = int(s.dw);
  const int ph = int(s.ph), pw = int(s.pw);
  const int64_t mult = s.K / s.C, blocks = s.N * s.C * t.tiles_h * t.tiles_w;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const TileIndex ti = tile_index(b, t);
    const int64_t n = ti.plane / s.C, c = ti.plane % s.C;
    const int oh_lo = floor_div(ti.r0 + ph - (KH - 1) * dh, SH), ow_lo = floor_div(ti.c0 + pw - (KW - 1) * dw, SW);
    const int ih = ti.r0 + threadIdx.y, iw = ti.c0 + threadIdx.x;
    const int uh = ih + ph - oh_lo * SH, uw = iw + pw - ow_lo * SW;  // kh = kw = 0
    T acc = 0;
    for (int64_t m = 0; m < mult; ++m) {
      const int64_t k = c * mult + m;
      __syncthreads();
      stage(tile, t.g_h, t.g_w, g + n * gs.s0 + k * gs.s1, gs.s2, gs.s3, oh_lo, ow_lo, s.OH, s.OW);
      for (int j = tid; j < taps; j += kThreads) wt[j] = T(w[k * taps + j]);
      __syncthreads();
      for (int kh = 0; kh < KH; ++kh) {
        const unsigned u = unsigned(uh - kh * dh);
        if (u % SH != 0) continue;
        const T* row = tile + (u / SH) * t.g_w;
        for (int kw = 0; kw < KW; ++kw) {
          const unsigned v = unsigned(uw - kw * dw);
          if (v % SW == 0) acc += row[v / SW] * wt[kh * KW + kw];
        }
      }
    }
    if (ih < s.H && iw < s.W) gi[n * is.s0 + c * is.s1 + ih * is.s2 + iw * is.s3] = scalar_t(acc);
  }
}

constexpr int kDwTapsPerWarp = int((conv_plan::kMaxDwTaps + 1) / 8);  // taps w, w + 8, ... of warp w

// blockIdx.x = k * S + chunk: the chunk's output tiles (of N * tiles_h * tiles_w, n slowest) of channel k;
// per tile the input tile (as the forward) and the grad_out tile; warp w sums taps w, w + 8, ... (tap
// KH KW: the bias), its lanes over the tile's results in a fixed pattern, then a fixed shuffle tree;
// partials[chunk * K * T + k * T + tap], T = KH KW + 1.
template <typename scalar_t>
__global__ __launch_bounds__(256) void conv_dw_bwd_weight_kernel(const scalar_t* __restrict__ g, Strides4 gs,
                                                                 const scalar_t* __restrict__ x, Strides4 xs,
                                                                 at::opmath_type<scalar_t>* __restrict__ partials,
                                                                 ConvShape s, DwTile t, int64_t S) {
  using T = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* xt = reinterpret_cast<T*>(smem_raw);
  T* gt = xt + t.in_h * t.in_w;
  const int taps = int(s.KH * s.KW) + 1, KW = int(s.KW), sh = int(s.sh), sw = int(s.sw), dh = int(s.dh), dw = int(s.dw);
  const int64_t mult = s.K / s.C, chunk = blockIdx.x % S, k = blockIdx.x / S, ci = k / mult;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x, warp = tid / 32, lane = tid % 32;
  // lane -> results (py, px) of the tile: px = lane % tw, rows py = lane / tw, + 32 / tw, ... (8 of them)
  const int px = lane % t.tw, py0 = lane / t.tw, dy = 32 / t.tw;
  T acc[kDwTapsPerWarp];
#pragma unroll
  for (int j = 0; j < kDwTapsPerWarp; ++j) acc[j] = 0;
  int64_t lo, hi;
  chunk_range(s.N * t.tiles_h * t.tiles_w, S, chunk, lo, hi);
  for (int64_t u = lo; u < hi; ++u) {
    const TileIndex ti = tile_index(u, t);  // plane = n
    const int64_t n = ti.plane;
    __syncthreads();
    stage(xt, t.in_h, t.in_w, x + n * xs.s0 + ci * xs.s1, xs.s2, xs.s3, ti.r0 * sh - int(s.ph), ti.c0 * sw - int(s.pw),
          s.H, s.W);
    stage(gt, t.th, t.tw, g + n * gs.s0 + k * gs.s1, gs.s2, gs.s3, ti.r0, ti.c0, s.OH, s.OW);
    __syncthreads();
    // only the tile's results inside the output: past OH or OW the gradient is a staged 0, but the input
    // there may be inf or NaN, and 0 * inf would make the tap NaN where torch's is finite
    const int rows = int(min(int64_t(t.th), s.OH - ti.r0));
    if (ti.c0 + px >= s.OW) continue;  // no barrier follows in this iteration: the lane may skip it
#pragma unroll
    for (int j = 0; j < kDwTapsPerWarp; ++j) {
      const int tap = warp + 8 * j;
      if (tap >= taps) break;
      T a = 0;
      if (tap == taps - 1) {
        for (int py = py0; py < rows; py += dy) a += gt[py * t.tw + px];
      } else {
        const int kh = tap / KW, kw = tap - kh * KW;
        const T* xb = xt + kh * dh * t.in_w + kw * dw + px * sw;
        for (int py = py0; py < rows; py += dy) a += gt[py * t.tw + px] * xb[py * sh * t.in_w];
      }
      acc[j] += a;
    }
  }
#pragma unroll
  for (int j = 0; j < kDwTapsPerWarp; ++j) {
    const int tap = warp + 8 * j;
    const T v = warp_sum(acc[j]);  // every lane takes part: the tap test comes after
    if (lane == 0 && tap < taps) partials[chunk * s.K * taps + k * taps + tap] = v;
  }
}

// ---- elementwise: the mask and the cuDNN engine's activation ----------------------------------------------
// One thread per element; each warp's ballot is 32 mask bits, written as 4 bytes (common/act.h: bit j of
// byte i is element 8 i + j in memory order).
template <typename scalar_t>
__global__ __launch_bounds__(256) void conv_mask_kernel(const scalar_t* __restrict__ y, uint8_t* __restrict__ mask,
                                                        int64_t n, Act act) {
  using T = at::opmath_type<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t bytes = (n + 7) / 8, warps = int64_t(gridDim.x) * (blockDim.x / 32);
  for (int64_t base = (int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32) * 32; base < n; base += warps * 32) {
    const int64_t i = base + lane;
    const unsigned bits = __ballot_sync(0xffffffffu, i < n && act_pass(act, T(y[i < n ? i : 0])));
    const int64_t byte = base / 8 + lane;
    if (lane < 4 && byte < bytes) mask[byte] = uint8_t(bits >> (8 * lane));
  }
}

template <typename scalar_t>
__global__ __launch_bounds__(256) void conv_act_kernel(scalar_t* __restrict__ y, int64_t n, Act act, double scalar) {
  using T = at::opmath_type<scalar_t>;
  PYOPS_GRID_STRIDE(i, n) y[i] = scalar_t(act_forward(act, T(y[i]), T(scalar)));
}

// ---- launchers --------------------------------------------------------------------------------------------
at::Tensor partials_for(const at::Tensor& like, int64_t count) {
  return at::empty({count}, like.options().dtype(like.scalar_type() == at::kDouble ? at::kDouble : at::kFloat));
}

std::array<int64_t, 2> pair(int64_t a, int64_t b) { return {a, b}; }

int64_t opmath_bytes(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? 8 : 4; }

void reduce_partials(const ConvShape& s, const at::Tensor& partials, int64_t S, const at::Tensor& gw,
                     const at::Tensor& gb) {
  const KernelLaunch l = conv_plan::reduce_partials(s);
  PYOPS_DISPATCH_FLOATING(gw.scalar_type(), [&] {
    using T = at::opmath_type<scalar_t>;
    conv_reduce_partials_kernel<scalar_t><<<grid_of(l), block_of(l), l.smem, c10::cuda::getCurrentCUDAStream()>>>(
        partials.const_data_ptr<T>(), S, s.K, conv_plan::wgrad_taps(s), gw.mutable_data_ptr<scalar_t>(),
        gb.defined() ? gb.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The cuDNN engine calls torch's convolution as a kernel: in the caller's dtypes (no autocast) and
// recording nothing.
struct TorchConv {
  c10::impl::ExcludeDispatchKeyGuard no_autocast{c10::autocast_dispatch_keyset};
  at::AutoDispatchBelowADInplaceOrView below;
};

// torch's result r becomes `out` (the host side's allocation) when it has out's dtype, sizes and
// strides, else is copied into it.
void adopt(at::Tensor& out, const at::Tensor& r) {
  if (r.scalar_type() == out.scalar_type() && r.sizes() == out.sizes() && r.strides() == out.strides())
    out = r;
  else
    out.copy_(r);
}

struct Cuda {
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };

  // `out` is the host side's allocation; the cuDNN engine may replace it by torch's result when that has
  // the same strides (then the host side returns it).
  static void forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                      at::Tensor& out, Act act, double scalar) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    switch (conv_plan::conv_cuda_engine(s, channels_last(out))) {
      case Engine::kCudnn: {
        const TorchConv below;
        at::Tensor r =
            at::convolution(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, pair(s.sh, s.sw),
                            pair(s.ph, s.pw), pair(s.dh, s.dw), false, pair(0, 0), s.groups);
        adopt(out, r);
        if (act == Act::kNone) return;
        const KernelLaunch l = conv_plan::act_epilogue(out.numel());
        PYOPS_DISPATCH_FLOATING(out.scalar_type(), [&] {
          conv_act_kernel<scalar_t>
              <<<grid_of(l), block_of(l), l.smem, stream>>>(out.mutable_data_ptr<scalar_t>(), out.numel(), act, scalar);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
      case Engine::kDepthwise: {
        const KernelLaunch l = conv_plan::dw_fwd(s, opmath_bytes(x));
        const DwTile t = conv_plan::dw_tile(s, s.OW, s.OH, s.OW);
        PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
          conv_dw_fwd_kernel<scalar_t><<<grid_of(l), block_of(l), l.smem, stream>>>(
              x.const_data_ptr<scalar_t>(), strides_of(x), w.const_data_ptr<scalar_t>(),
              bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
              strides_of(out), s, t, act, scalar);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
      case Engine::kDirect: {
        const KernelLaunch l = conv_plan::direct_fwd(s);
        const bool cl = channels_last(out);
        PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
          auto kernel = cl ? conv_fwd_kernel<scalar_t, true> : conv_fwd_kernel<scalar_t, false>;
          kernel<<<grid_of(l), block_of(l), l.smem, stream>>>(
              x.const_data_ptr<scalar_t>(), strides_of(x), w.const_data_ptr<scalar_t>(),
              bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
              strides_of(out), s, act, scalar);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
    }
  }

  // no statistics epilogue yet: the forward, then the batch_norm family's CUDA statistics kernel
  static void forward_stats(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            at::Tensor& out, const at::Tensor& mean, const at::Tensor& var) {
    forward(s, x, w, bias, out, Act::kNone, 0);
    stats_by_op("pyops::batch_norm_stats", out, mean, var);
  }

  static void mask(const at::Tensor& out, const at::Tensor& mask, Act act) {
    const KernelLaunch l = conv_plan::mask(out.numel());
    PYOPS_DISPATCH_FLOATING(out.scalar_type(), [&] {
      conv_mask_kernel<scalar_t><<<grid_of(l), block_of(l), l.smem, c10::cuda::getCurrentCUDAStream()>>>(
          out.const_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(), out.numel(), act);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  // `gi` as in forward: the cuDNN engine may replace it by torch's result of the same strides. (torch's
  // input gradient reads the input's sizes and layout only: gi stands in for it.)
  static void backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, at::Tensor& gi) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    switch (conv_plan::conv_cuda_engine(s, channels_last(gi))) {
      case Engine::kCudnn: {
        const TorchConv below;
        at::Tensor r =
            std::get<0>(at::convolution_backward(g, gi, w, std::nullopt, pair(s.sh, s.sw), pair(s.ph, s.pw),
                                                 pair(s.dh, s.dw), false, pair(0, 0), s.groups, {true, false, false}));
        adopt(gi, r);
        return;
      }
      case Engine::kDepthwise: {
        const KernelLaunch l = conv_plan::dw_bwd_input(s, opmath_bytes(g));
        const DwTile t = conv_plan::dw_tile(s, s.W, s.H, s.W);
        PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
          auto kernel =
              s.sh == 1
                  ? (s.sw == 1 ? conv_dw_bwd_input_kernel<scalar_t, 1, 1> : conv_dw_bwd_input_kernel<scalar_t, 1, 2>)
                  : (s.sw == 1 ? conv_dw_bwd_input_kernel<scalar_t, 2, 1> : conv_dw_bwd_input_kernel<scalar_t, 2, 2>);
          kernel<<<grid_of(l), block_of(l), l.smem, stream>>>(g.const_data_ptr<scalar_t>(), strides_of(g),
                                                              w.const_data_ptr<scalar_t>(),
                                                              gi.mutable_data_ptr<scalar_t>(), strides_of(gi), s, t);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
      case Engine::kDirect: {
        const KernelLaunch l = conv_plan::direct_bwd_input(s);
        const bool cl = channels_last(gi);
        PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
          auto kernel = cl ? conv_bwd_input_kernel<scalar_t, true> : conv_bwd_input_kernel<scalar_t, false>;
          kernel<<<grid_of(l), block_of(l), l.smem, stream>>>(g.const_data_ptr<scalar_t>(), strides_of(g),
                                                              w.const_data_ptr<scalar_t>(),
                                                              gi.mutable_data_ptr<scalar_t>(), strides_of(gi), s);
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
        return;
      }
    }
  }

  static void backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                              const at::Tensor& gb) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    const bool cl = channels_last(g);
    const Engine engine = conv_plan::conv_cuda_engine(s, cl);
    if (engine == Engine::kCudnn) {
      // torch's weight gradient reads the weight's sizes and layout only: gw stands in for it
      const TorchConv below;
      const std::array<int64_t, 1> bias_sizes{s.K};
      const at::OptionalIntArrayRef bias_opt =
          gb.defined() ? at::OptionalIntArrayRef(at::IntArrayRef(bias_sizes)) : at::OptionalIntArrayRef();
      auto r = at::convolution_backward(g, x, gw, bias_opt, pair(s.sh, s.sw), pair(s.ph, s.pw), pair(s.dh, s.dw), false,
                                        pair(0, 0), s.groups, {false, true, gb.defined()});
      gw.copy_(std::get<1>(r));
      if (gb.defined()) gb.copy_(std::get<2>(r));
      return;
    }
    const int64_t taps = conv_plan::wgrad_taps(s);
    at::Tensor partials;
    int64_t S = 0;
    if (engine == Engine::kDepthwise) {
      const KernelLaunch l = conv_plan::dw_bwd_weight(s, opmath_bytes(g));
      const DwTile t = conv_plan::dw_tile(s, s.OW, s.OH, s.OW);
      S = conv_plan::dw_bwd_weight_chunks(s);
      partials = partials_for(g, S * s.K * taps);
      PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
        using T = at::opmath_type<scalar_t>;
        conv_dw_bwd_weight_kernel<scalar_t><<<grid_of(l), block_of(l), l.smem, stream>>>(
            g.const_data_ptr<scalar_t>(), strides_of(g), x.const_data_ptr<scalar_t>(), strides_of(x),
            partials.mutable_data_ptr<T>(), s, t, S);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else {
      const KernelLaunch l = cl ? conv_plan::direct_bwd_weight_cl(s) : conv_plan::direct_bwd_weight(s);
      S = cl ? conv_plan::direct_bwd_weight_cl_chunks(s) : conv_plan::direct_bwd_weight_chunks(s);
      partials = partials_for(g, S * s.K * taps);
      PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
        using T = at::opmath_type<scalar_t>;
        const WgradArgs<scalar_t> a{g.const_data_ptr<scalar_t>(), strides_of(g), x.const_data_ptr<scalar_t>(),
                                    strides_of(x), s};
        auto kernel = cl ? conv_bwd_weight_cl_kernel<scalar_t> : conv_bwd_weight_kernel<scalar_t>;
        kernel<<<grid_of(l), block_of(l), l.smem, stream>>>(a, partials.mutable_data_ptr<T>(), S);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    reduce_partials(s, partials, S, gw, gb);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_CONV(m, ::pyops::Cuda, ""); }

}  // namespace pyops
