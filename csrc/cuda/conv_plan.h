// The launch configuration of every CUDA conv kernel (csrc/cuda/conv.cu), as host functions that the
// launchers call and that a CPU-only build can call too (no CUDA types here): one function per launcher,
// so that a launch plan and the launch itself cannot drift, and conv2d_cuda_plan listing every pyops
// kernel one convolution launches, forward and (training) backward.
//
// Engines, by the input channels per group Cg (conv_cuda_engine):
// - Cg >= kCudnnChannels (8): torch's convolution (cuDNN: implicit GEMM on tensor cores), then pyops's
//   activation epilogue when an activation is fused; no other pyops kernel;
// - Cg == 1 (depthwise, any channel multiplier), stride 1 or 2, on an NCHW tensor: tiled kernels, one
//   output (or input-gradient) tile of one (n, channel) plane per 256-thread block, the input tile and
//   its halo in shared memory; the weight gradient as per-block partial sums and a fixed-order pass;
// - the rest (2-7 channels per group, other strides, channels_last): direct kernels, one thread per
//   output (input-gradient) element in the tensor's memory order, and a weight gradient split over
//   N * OH * OW into per-block partials and a fixed-order pass.
// Every launch is a 1-d grid (x only: it holds up to 2^31 - 1 blocks; the kernels fold the rest of
// their indices into x and loop over blocks when a grid is capped).
//
// Occupancy on an H100 (132 SMs, 2048 threads, 32 blocks, 64K registers and 228 KB of shared memory per
// SM): every kernel runs 256-thread blocks, so at most 8 blocks per SM (by threads; shared memory may
// allow fewer); a wave is then 132 * 8 = 1056 blocks. Registers allow fewer (ptxas, sm_90, float32):
// the tiled depthwise kernels 32-44 (5-8 blocks), the direct forward and input gradient 64 (4), the direct
// weight gradients 96-120 (2): fewer resident blocks, so kWave's count of waves is a lower bound. Launches that touch
// >= 1M elements have at least 2 waves, with these exceptions, by construction:
// - conv_reduce_partials_kernel touches at most kMaxPartials (512K) partial sums;
// - a kernel with one result per thread has results / 256 blocks: under 2 waves only when it has fewer
//   than 2 * 1056 * 256 = 540K results (a stride-2 convolution can read a 1M-element input for them);
// - a split weight gradient caps its chunks at one per unit of work (a tile, or 32 or 8 positions), so a
//   convolution with few output channels and positions has fewer blocks than kTargetBlocks.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

#include "common/launch_plan.h"
#include "conv.h"

namespace pyops {

// One kernel launch (name, grid, block, dynamic shared memory): the one struct of every CUDA plan.
using KernelLaunch = plan::Launch;

namespace conv_plan {

constexpr int64_t kThreads = 256;                                            // every kernel's block size
constexpr int64_t kWave = plan::kSms * (plan::kMaxThreadsPerSm / kThreads);  // 1056 resident 256-thread blocks
constexpr int64_t kTargetBlocks = 2 * kWave;                                 // what a split reduction aims for
constexpr int64_t kMaxGrid = plan::kMaxGridX;
constexpr int64_t kMaxElementBlocks = int64_t(65535) * 8;  // grid-stride elementwise kernels: 496 waves
constexpr int64_t kMaxSmem = 48 * 1024;                    // dynamic shared memory without an opt-in
constexpr int64_t kMaxPartials = int64_t(1) << 19;         // a weight gradient's partial sums, at most
constexpr int64_t kMaxDwTaps = 63;                         // KH * KW of the tiled depthwise weight gradient
constexpr int64_t kCudnnChannels = 8;                      // channels per group from which cuDNN runs it

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline KernelLaunch launch1d(const char* kernel, int64_t blocks, int64_t bx, int64_t by, int64_t smem) {
  KernelLaunch l = plan::launch_1d(kernel, blocks, bx, smem);
  l.block.y = by;
  return l;
}

// ---- engine choice --------------------------------------------------------------------------------------
enum class Engine { kCudnn, kDepthwise, kDirect };

// The tile of the depthwise kernels: tw x th = 256 threads (tw 32, 16 or 8: the narrowest that covers a
// row of `width`), and the input (forward, weight gradient) or output-gradient (input gradient) tile that
// a tile of results reads, halo included.
struct DwTile {
  int tw, th;      // the block: tw x th results
  int in_h, in_w;  // forward and weight gradient: the input tile
  int g_h, g_w;    // input gradient: the output-gradient tile
  int64_t tiles_w, tiles_h;
};

inline DwTile dw_tile(const ConvShape& s, int64_t width, int64_t rows_total, int64_t cols_total) {
  DwTile t;
  t.tw = width > 16 ? 32 : width > 8 ? 16 : 8;
  t.th = int(kThreads / t.tw);
  t.in_h = int((t.th - 1) * s.sh + (s.KH - 1) * s.dh + 1);
  t.in_w = int((t.tw - 1) * s.sw + (s.KW - 1) * s.dw + 1);
  // the output rows a tile of input-gradient rows reaches: an interval of th - 1 + (KH - 1) dh input
  // positions holds at most that / sh + 1 multiples of sh, and the tile starts one row early at most
  t.g_h = int((t.th - 1 + (s.KH - 1) * s.dh) / s.sh + 2);
  t.g_w = int((t.tw - 1 + (s.KW - 1) * s.dw) / s.sw + 2);
  t.tiles_w = cdiv(cols_total, t.tw);
  t.tiles_h = cdiv(rows_total, t.th);
  return t;
}

// Shared memory (bytes) of the three depthwise kernels, opmath elements of `bytes` each.
inline int64_t dw_fwd_smem(const ConvShape& s, const DwTile& t, int64_t bytes) {
  return (int64_t(t.in_h) * t.in_w + s.KH * s.KW) * bytes;
}
inline int64_t dw_bwd_input_smem(const ConvShape& s, const DwTile& t, int64_t bytes) {
  return (int64_t(t.g_h) * t.g_w + s.KH * s.KW) * bytes;
}
inline int64_t dw_bwd_weight_smem(const DwTile& t, int64_t bytes) {
  return (int64_t(t.in_h) * t.in_w + int64_t(t.tw) * t.th) * bytes;
}

// Whether the tiled depthwise kernels take this convolution: one input channel per group, stride 1 or 2,
// 32-bit tile arithmetic, the tiles within kMaxSmem in float64 too, and the weight gradient's taps
// within its per-warp accumulators.
inline bool dw_tiled_fits(const ConvShape& s) {
  if (s.Cg() != 1 || s.sh > 2 || s.sw > 2 || s.KH * s.KW > kMaxDwTaps) return false;
  const int64_t lim = int64_t(1) << 30;
  for (int64_t v : {s.H, s.W, s.OH, s.OW, s.ph, s.pw, s.dh * s.KH, s.dw * s.KW})
    if (v >= lim) return false;
  const DwTile fwd = dw_tile(s, s.OW, s.OH, s.OW), bwd = dw_tile(s, s.W, s.H, s.W);
  return dw_fwd_smem(s, fwd, 8) <= kMaxSmem && dw_bwd_weight_smem(fwd, 8) <= kMaxSmem &&
         dw_bwd_input_smem(s, bwd, 8) <= kMaxSmem;
}

// channels_last: the layout of the tensor the kernel writes (forward: the output; input gradient: the
// input gradient) or reads (weight gradient: grad_out).
inline Engine conv_cuda_engine(const ConvShape& s, bool channels_last) {
  if (s.Cg() >= kCudnnChannels) return Engine::kCudnn;
  if (!channels_last && dw_tiled_fits(s)) return Engine::kDepthwise;
  return Engine::kDirect;
}

// ---- one function per launcher ----------------------------------------------------------------------------
// Grid-stride elementwise kernels over n items, 256 threads.
inline KernelLaunch elementwise(const char* kernel, int64_t n) {
  return launch1d(kernel, std::min(cdiv(n, kThreads), kMaxElementBlocks), kThreads, 1, 0);
}

inline KernelLaunch direct_fwd(const ConvShape& s) { return elementwise("conv_fwd_kernel", s.N * s.K * s.OH * s.OW); }
inline KernelLaunch direct_bwd_input(const ConvShape& s) {
  return elementwise("conv_bwd_input_kernel", s.N * s.C * s.H * s.W);
}
// The mask: one thread per element, a warp's ballot making 4 bytes.
inline KernelLaunch mask(int64_t n) { return elementwise("conv_mask_kernel", n); }
// The cuDNN engine's activation epilogue, in place.
inline KernelLaunch act_epilogue(int64_t n) { return elementwise("conv_act_kernel", n); }

// Tiled depthwise forward: one block per (n, k, tile), capped (the kernel loops over blocks).
inline KernelLaunch dw_fwd(const ConvShape& s, int64_t bytes) {
  const DwTile t = dw_tile(s, s.OW, s.OH, s.OW);
  return launch1d("conv_dw_fwd_kernel", std::min(s.N * s.K * t.tiles_h * t.tiles_w, kMaxGrid), t.tw, t.th,
                  dw_fwd_smem(s, t, bytes));
}
// Tiled depthwise input gradient: one block per (n, c, tile of the input).
inline KernelLaunch dw_bwd_input(const ConvShape& s, int64_t bytes) {
  const DwTile t = dw_tile(s, s.W, s.H, s.W);
  return launch1d("conv_dw_bwd_input_kernel", std::min(s.N * s.C * t.tiles_h * t.tiles_w, kMaxGrid), t.tw, t.th,
                  dw_bwd_input_smem(s, t, bytes));
}

// A split weight gradient: E = K * T sums (T = Cg KH KW + 1 per output channel, the last the bias's),
// each over `work` units (positions, or tiles) split into S chunks; partials[chunk][e].
inline int64_t wgrad_taps(const ConvShape& s) { return s.Cg() * s.KH * s.KW + 1; }

// The chunk count: at least kTargetBlocks blocks of `blocks_per_chunk`, at most `max_per_block` units per
// block, at least `min_per_block` units per block, and at most kMaxPartials partial sums.
inline int64_t wgrad_chunks(int64_t work, int64_t blocks_per_chunk, int64_t E, int64_t min_per_block,
                            int64_t max_per_block) {
  int64_t S = std::max(cdiv(kTargetBlocks, blocks_per_chunk), cdiv(work, max_per_block));
  S = std::min(S, std::max<int64_t>(1, kMaxPartials / E));
  S = std::min(S, cdiv(work, min_per_block));
  S = std::min(S, kMaxGrid / blocks_per_chunk);
  return std::max<int64_t>(S, 1);
}

// Depthwise weight gradient: one block per (k, chunk of the N * tiles output tiles of channel k).
inline int64_t dw_bwd_weight_chunks(const ConvShape& s) {
  const DwTile t = dw_tile(s, s.OW, s.OH, s.OW);
  return wgrad_chunks(s.N * t.tiles_h * t.tiles_w, s.K, s.K * wgrad_taps(s), 1, int64_t(1) << 62);
}
inline KernelLaunch dw_bwd_weight(const ConvShape& s, int64_t bytes) {
  const DwTile t = dw_tile(s, s.OW, s.OH, s.OW);
  return launch1d("conv_dw_bwd_weight_kernel", s.K * dw_bwd_weight_chunks(s), t.tw, t.th, dw_bwd_weight_smem(t, bytes));
}

// Direct weight gradient, NCHW: one block per (k, group of 64 taps, chunk of N * OH * OW), each warp 8 taps,
// its lanes on positions (32 to 8,192 positions per block).
inline int64_t direct_bwd_weight_blocks_per_chunk(const ConvShape& s) { return s.K * cdiv(wgrad_taps(s), 64); }
inline int64_t direct_bwd_weight_chunks(const ConvShape& s) {
  return wgrad_chunks(s.N * s.OH * s.OW, direct_bwd_weight_blocks_per_chunk(s), s.K * wgrad_taps(s), 32, 8192);
}
inline KernelLaunch direct_bwd_weight(const ConvShape& s) {
  return launch1d("conv_bwd_weight_kernel", direct_bwd_weight_blocks_per_chunk(s) * direct_bwd_weight_chunks(s),
                  kThreads, 1, 0);
}

// Direct weight gradient, channels_last: one block per (32 output channels, group of 8 taps, chunk); 32 x 8
// threads, the lanes on consecutive channels (coalesced), 8 rows of positions, each thread 8 taps.
inline int64_t direct_bwd_weight_cl_blocks_per_chunk(const ConvShape& s) {
  return cdiv(s.K, 32) * cdiv(wgrad_taps(s), 8);
}
inline int64_t direct_bwd_weight_cl_chunks(const ConvShape& s) {
  return wgrad_chunks(s.N * s.OH * s.OW, direct_bwd_weight_cl_blocks_per_chunk(s), s.K * wgrad_taps(s), 8, 8192);
}
inline KernelLaunch direct_bwd_weight_cl(const ConvShape& s) {
  return launch1d("conv_bwd_weight_cl_kernel",
                  direct_bwd_weight_cl_blocks_per_chunk(s) * direct_bwd_weight_cl_chunks(s), 32, 8, 0);
}

// The fixed-order pass: one thread per weight or bias element, summing its S partials in chunk order
// (S * E <= kMaxPartials: under 1M elements, whatever its waves).
inline KernelLaunch reduce_partials(const ConvShape& s) {
  return launch1d("conv_reduce_partials_kernel", cdiv(s.K * wgrad_taps(s), kThreads), kThreads, 1, 0);
}

// What the plan needs beyond the sizes.
struct ConvPlanOptions {
  bool channels_last = false;  // the input (and so the output and gradients) in channels_last
  bool float64 = false;        // opmath float64 (8-byte shared memory elements), else float32
  int act = 0;                 // conv2d_fwd's activation code: 0 none, 1 relu, 2 leaky_relu, 3 elu
};

}  // namespace conv_plan

// Every pyops kernel launched by one convolution's forward and, when training, its backward (input and
// weight gradients), in launch order. Kernels are launched only for non-empty results (the host side);
// the cuDNN engine launches none of its own unless an activation is fused.
inline std::vector<KernelLaunch> conv2d_cuda_plan(const ConvShape& s, bool training,
                                                  const conv_plan::ConvPlanOptions& o = {}) {
  using namespace conv_plan;
  std::vector<KernelLaunch> plan;
  const int64_t bytes = o.float64 ? 8 : 4, out_numel = s.N * s.K * s.OH * s.OW;
  const Engine e = conv_cuda_engine(s, o.channels_last);
  if (out_numel == 0) return plan;
  if (s.C > 0) {
    if (e == Engine::kCudnn && o.act != 0) plan.push_back(act_epilogue(out_numel));
    if (e == Engine::kDepthwise) plan.push_back(dw_fwd(s, bytes));
    if (e == Engine::kDirect) plan.push_back(direct_fwd(s));
  }
  if (o.act == 1 || o.act == 2) plan.push_back(mask(out_numel));
  if (!training || s.C == 0) return plan;
  if (e == Engine::kDepthwise) {
    plan.push_back(dw_bwd_input(s, bytes));
    plan.push_back(dw_bwd_weight(s, bytes));
    plan.push_back(reduce_partials(s));
  } else if (e == Engine::kDirect) {
    plan.push_back(direct_bwd_input(s));
    plan.push_back(o.channels_last ? direct_bwd_weight_cl(s) : direct_bwd_weight(s));
    plan.push_back(reduce_partials(s));
  }
  return plan;
}

// The same from the arguments of torch's conv2d: input [N, C, H, W], weight [K, C / groups, kh, kw], square
// stride, padding and dilation. Checks as conv2d_fwd does.
inline std::vector<KernelLaunch> conv2d_cuda_plan(int64_t N, int64_t C, int64_t H, int64_t W, int64_t K, int64_t groups,
                                                  int64_t kh, int64_t kw, int64_t stride, int64_t pad, int64_t dilation,
                                                  bool training, const conv_plan::ConvPlanOptions& o = {}) {
  TORCH_CHECK(groups > 0 && C % groups == 0, "pyops::conv2d_cuda_plan: groups=", groups, " must divide C=", C);
  const ConvShape s = conv_shape("conv2d_cuda_plan", {N, C, H, W}, {K, C / groups, kh, kw}, {stride, stride},
                                 {pad, pad}, {dilation, dilation}, groups);
  return conv2d_cuda_plan(s, training, o);
}

}  // namespace pyops
