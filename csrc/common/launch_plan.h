// The launch configuration of every CUDA kernel of pyops, as host functions of the shapes: the
// launchers (csrc/cuda/<family>.cu) take their grid, block and dynamic shared memory from these and
// nothing else, and pyops._C._cuda_launch_plan(op, sizes) (csrc/launch_plan.cpp) returns the same
// values, so that a test on a machine without a GPU sees exactly what a GPU would be asked to run.
// Host-only C++ (no CUDA types): compiled in every build.
//
// Aim: every launch over a large tensor has at least 2 waves of blocks on an H100 (132 SMs). Waves are
// counted at the most blocks an SM can hold at the block's size (2048 threads, at most 32 blocks), so
// the count is a lower bound whatever registers ptxas gives a kernel. No grid dimension but x exceeds
// 65,535; grid x stays below 2^31 (grid-stride loops take the rest), so 64-bit sizes never truncate.
//
// The export: op -> the list of every kernel the op launches (forward and backward), from `sizes`:
//   batch_norm      shape (N, C, ...) ; channels_last (bool, default false) ; training (bool, default
//                   true) ; fused (bool, default true: batch_norm_bwd; false: bwd_reduce + bwd_elemt, as
//                   SyncBatchNorm; the CUDA kernels are the same either way)
//                   training: stats_partial_kernel, stats_combine_kernel, elemt_kernel,
//                   bwd_reduce_partial_kernel, sum_combine_kernel, bwd_elemt_kernel; eval: elemt_kernel,
//                   then for the weight's gradient bwd_reduce_partial_kernel, sum_combine_kernel, and
//                   bwd_elemt_kernel
//   l1_loss, mse_loss, huber_loss, rmse_loss
//                   numel ; reduction ("none", "mean" default, "sum"): none: pointwise_kernel,
//                   pointwise_bwd_kernel; mean/sum: reduce_blocks_kernel, sum_partials_kernel (the
//                   gradient is formed in the forward pass)
//   cross_entropy   rows, classes: cross_entropy_kernel (loss and gradient in one pass)
//   relu, leaky_relu                numel: masked_fwd_kernel, masked_bwd_kernel
//   elu, sigmoid, tanh              numel: unary_kernel, binary_kernel
//   maxout                          numel (the input's), pieces: maxout_fwd_kernel, maxout_bwd_kernel
//   sgd, adam, adamw, adagrad, rmsprop
//                   numels (each tensor's), or numel and tensors (that many of numel); new_buffers
//                   (sgd, bool, default false: whether new-buffer flags are passed): multi_tensor_kernel,
//                   then finish_step where the algorithm keeps step counts (or SGD's flags are passed)
//   adam_8bit       numels, or numel and tensors (Adam/AdamW with 8-bit states): adam_8bit_kernel,
//                   finish_step
// Another family adds its plan functions here and one entry to launch_plan_ops().
#pragma once
#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif

namespace pyops {
namespace plan {

// ---- the target GPU and launch limits ------------------------------------------------------------------
constexpr int64_t kSms = 132;  // H100 SXM
constexpr int64_t kMaxThreadsPerSm = 2048;
constexpr int64_t kMaxBlocksPerSm = 32;
constexpr int64_t kMaxGridX = (int64_t(1) << 31) - 1;
constexpr int64_t kMaxGridYZ = 65535;
// Grid-stride kernels: a million blocks saturates any current GPU; more only costs launch bookkeeping.
constexpr int64_t kMaxStrideBlocks = int64_t(1) << 20;

struct Dim {
  int64_t x = 1, y = 1, z = 1;
};

struct Launch {
  const char* kernel = "";  // the __global__ function's name
  Dim grid, block;
  int64_t smem = 0;           // dynamic shared memory, bytes
  int64_t elements = 0;       // elements the launch reads or writes (what makes it large, >= 1M)
  const char* why = nullptr;  // why a large launch may stay under 2 waves (nullptr: it may not)
};

// `l`, touching `n` elements
inline Launch touching(Launch l, int64_t n) {
  l.elements = n;
  return l;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The most blocks of `threads` threads an SM holds (registers and shared memory permitting).
inline int64_t blocks_per_sm(int64_t threads) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxBlocksPerSm, kMaxThreadsPerSm / threads));
}

// Blocks of `threads` threads that fill `waves` waves on the target GPU.
inline int64_t wave_blocks(int64_t threads, int64_t waves = 2) { return waves * kSms * blocks_per_sm(threads); }

inline Launch launch_1d(const char* kernel, int64_t blocks, int64_t threads, int64_t smem = 0) {
  Launch l;
  l.kernel = kernel;
  l.grid.x = std::max<int64_t>(1, blocks);
  l.block.x = threads;
  l.smem = smem;
  return l;
}

// A grid-stride kernel over `units` work items, one per thread per step.
inline Launch stride_1d(const char* kernel, int64_t units, int64_t threads) {
  return launch_1d(kernel, std::min<int64_t>(ceil_div(units, threads), kMaxStrideBlocks), threads);
}

// ---- batch_norm (csrc/cuda/batch_norm.cu) -----------------------------------------------------------------
// The data is [outer, C, inner] (csrc/batch_norm.h). Reductions: blocks of 32 x 8 threads; for
// inner > 1 a block serves one channel (grid x: C), for inner == 1 (channels_last) 32 adjacent channels
// (grid x: ceil(C / 32)); grid y splits each channel's outer * inner positions into `parts` spans, as
// many as 2 waves need but at least 4 positions a thread (so 2 waves from about 2.2M elements on); a
// second kernel (a warp per channel, 8 per block) combines a channel's parts in a fixed order. Elementwise passes:
// grid-stride, 4 elements a thread, the channel carried as a running index (no division per element).
namespace bn {
constexpr int64_t kLanes = 32, kRows = 8, kThreads = kLanes * kRows;
constexpr int64_t kPerThread = 4;        // positions a reduction thread takes at least
constexpr int64_t kMaxParts = 4096;      // grid y of the reductions
constexpr int64_t kCombineChannels = 8;  // channels (warps) a combine block serves
constexpr int64_t kElemtThreads = 256;
constexpr int64_t kElemtItems = 4;  // elements per thread of the elementwise passes (grid-stride)
}  // namespace bn

struct BnShape {
  int64_t outer = 0, channels = 0, inner = 0;
  int64_t count() const { return outer * inner; }
  int64_t numel() const { return outer * channels * inner; }
};

// The working layout of an input of `shape`, as bn_input (csrc/batch_norm.h) chooses it: channels_last
// (channels_last_3d for 5 dimensions) where the tensor is in it, contiguous otherwise.
inline BnShape bn_shape(const std::vector<int64_t>& shape, bool channels_last) {
  if (shape.size() < 2) throw std::invalid_argument("batch_norm needs a shape of at least 2 dimensions (N, C, ...)");
  BnShape s;
  s.channels = shape[1];
  int64_t spatial = 1;
  for (size_t d = 2; d < shape.size(); ++d) spatial *= shape[d];
  if (!channels_last || (shape.size() != 4 && shape.size() != 5) || s.channels == 1) {
    s.outer = shape[0];
    s.inner = spatial;
  } else {
    s.outer = shape[0] * spatial;
    s.inner = 1;
  }
  return s;
}

// A split reduction: `partial` writes parts x C partial results (channel-major: c * parts + part),
// `combine` reduces each channel's parts in order.
struct BnReduce {
  Launch partial, combine;
  int64_t parts = 1, span = 0;  // span: positions of a channel per part (the last parts may be empty)
};

inline BnReduce bn_reduce(const BnShape& s, const char* partial_name, const char* combine_name) {
  BnReduce r;
  const bool rows = s.inner == 1;  // lanes over channels
  const int64_t channel_blocks = rows ? ceil_div(s.channels, bn::kLanes) : s.channels;
  const int64_t min_span = (rows ? bn::kRows : bn::kThreads) * bn::kPerThread;
  int64_t parts = ceil_div(wave_blocks(bn::kThreads), std::max<int64_t>(channel_blocks, 1));
  parts = std::min(parts, ceil_div(s.count(), min_span));
  r.parts = std::clamp<int64_t>(parts, 1, bn::kMaxParts);
  r.span = ceil_div(s.count(), r.parts);
  r.partial.kernel = partial_name;
  r.partial.grid = {channel_blocks, r.parts, 1};
  r.partial.block = {bn::kLanes, bn::kRows, 1};
  r.combine = launch_1d(combine_name, ceil_div(s.channels, bn::kCombineChannels), bn::kCombineChannels * 32);
  return r;
}

inline BnReduce bn_stats(const BnShape& s) { return bn_reduce(s, "stats_partial_kernel", "stats_combine_kernel"); }
inline BnReduce bn_bwd_reduce(const BnShape& s) {
  return bn_reduce(s, "bwd_reduce_partial_kernel", "sum_combine_kernel");
}

// An elementwise pass over [outer, C, inner]: a thread's next element is `stride` further on, its
// position within the channel (k % inner) advances by step_inner and its channel by step_channel.
struct BnElemt {
  Launch launch;
  int64_t stride = 0, step_inner = 0, step_channel = 0;
};

inline BnElemt bn_elementwise(const BnShape& s, const char* name) {
  BnElemt e;
  e.launch = launch_1d(name, std::min(ceil_div(s.numel(), bn::kElemtThreads * bn::kElemtItems), kMaxStrideBlocks),
                       bn::kElemtThreads);
  e.stride = e.launch.grid.x * bn::kElemtThreads;
  if (s.inner > 0 && s.channels > 0) {
    e.step_inner = e.stride % s.inner;
    e.step_channel = (e.stride / s.inner) % s.channels;
  }
  return e;
}

inline BnElemt bn_elemt(const BnShape& s) { return bn_elementwise(s, "elemt_kernel"); }
inline BnElemt bn_bwd_elemt(const BnShape& s) { return bn_elementwise(s, "bwd_elemt_kernel"); }

// ---- losses (csrc/cuda/loss.cu) --------------------------------------------------------------------------
namespace loss {
constexpr int64_t kThreads = 256;
// Partials of a reduction: at most 4096 blocks of 256 threads, ~3.9 waves on the target GPU (a function
// of the element count only, so the sum's order, and its bits, never change).
constexpr int64_t kMaxBlocks = 4096;
// cross_entropy: up to 32 classes a row takes the next power of two of lanes (several rows per
// block), up to 256 a warp, more a block: 256 threads, 1024 from 4096 classes on.
constexpr int64_t kRowsMaxClassesPerLane = 8;  // 32 lanes x 8 = 256 classes: a warp per row at most
constexpr int64_t kWideClasses = 4096;
constexpr int64_t kWideThreads = 1024;
}  // namespace loss

inline Launch loss_pointwise(int64_t n) { return stride_1d("pointwise_kernel", n, loss::kThreads); }
inline Launch loss_pointwise_bwd(int64_t n) { return stride_1d("pointwise_bwd_kernel", n, loss::kThreads); }

struct LossReduce {
  Launch partial, sum;
};
inline LossReduce loss_reduce(int64_t n) {
  return {launch_1d("reduce_blocks_kernel", std::min(loss::kMaxBlocks, ceil_div(n, loss::kThreads)), loss::kThreads),
          launch_1d("sum_partials_kernel", 1, loss::kThreads)};
}

// cross_entropy: `lanes` threads per row (a power of two), blockDim / lanes rows per block; a
// grid-stride loop over the rows. Fewer rows than 2 waves need (a few rows of many classes) leave SMs
// idle: splitting a row over blocks needs a cross-block logsumexp pass, not done.
struct CrossEntropyPlan {
  Launch launch;
  int64_t lanes = 0;  // threads per row
};
inline CrossEntropyPlan cross_entropy(int64_t rows, int64_t classes) {
  CrossEntropyPlan p;
  int64_t threads = loss::kThreads;
  if (classes <= 32 * loss::kRowsMaxClassesPerLane) {
    p.lanes = 1;
    while (p.lanes < std::min<int64_t>(classes, 32)) p.lanes *= 2;
  } else {
    if (classes >= loss::kWideClasses) threads = loss::kWideThreads;
    p.lanes = threads;
  }
  const int64_t rows_per_block = threads / p.lanes;
  p.launch = launch_1d("cross_entropy_kernel", std::min(ceil_div(rows, rows_per_block), kMaxStrideBlocks), threads);
  p.launch.why =
      "a block per row of many classes: fewer rows than 2 waves of blocks leave SMs idle; splitting a row over "
      "blocks needs a cross-block logsumexp pass, not built";
  return p;
}

// ---- activations (csrc/cuda/activation.cu) ----------------------------------------------------------------
// Each thread takes 8 elements (16-byte vectors, one mask byte): 2 waves from 4.3M elements on; a
// smaller tensor is one partial wave, every thread with its two or four vector loads in flight.
namespace act {
constexpr int64_t kThreads = 256;
constexpr int64_t kElems = 8;
}  // namespace act
inline Launch act_elementwise(const char* name, int64_t n) {
  Launch l = stride_1d(name, ceil_div(n, act::kElems), act::kThreads);
  l.why =
      "streaming, 8 elements (16-32 bytes of loads) in flight a thread: below 4.3M elements the launch is under 2 "
      "waves, but every SM already holds more loads in flight than its share of memory bandwidth needs; more, smaller "
      "blocks would add scheduling, not bandwidth (unmeasured on a GPU)";
  return l;
}
inline Launch act_masked_fwd(int64_t n) { return act_elementwise("masked_fwd_kernel", n); }
inline Launch act_masked_bwd(int64_t n) { return act_elementwise("masked_bwd_kernel", n); }
inline Launch act_unary(int64_t n) { return act_elementwise("unary_kernel", n); }
inline Launch act_binary(int64_t n) { return act_elementwise("binary_kernel", n); }
// maxout: a thread per output element (count = the output's elements)
inline Launch act_maxout_fwd(int64_t count) { return stride_1d("maxout_fwd_kernel", count, act::kThreads); }
inline Launch act_maxout_bwd(int64_t count) { return stride_1d("maxout_bwd_kernel", count, act::kThreads); }

// ---- optimizers (csrc/cuda/optim.cu) ------------------------------------------------------------------
// One block per chunk of 4096 elements of each tensor, all tensors of a group in one launch; then a
// thread per tensor advances the step counts.
namespace optim {
constexpr int64_t kThreads = 256;
constexpr int64_t kChunk = 4096;
}  // namespace optim
inline int64_t optim_chunks(const std::vector<int64_t>& numels) {
  int64_t chunks = 0;
  for (int64_t n : numels) chunks += ceil_div(n, optim::kChunk);
  return chunks;
}
inline Launch optim_update(const std::vector<int64_t>& numels) {
  return launch_1d("multi_tensor_kernel", optim_chunks(numels), optim::kThreads);
}
inline Launch optim_finish(int64_t tensors) {
  return launch_1d("finish_step", ceil_div(tensors, optim::kThreads), optim::kThreads);
}
// Adam with 8-bit states (pyops::adam_step_8bit_): a block of kQuantBlock threads per block of kQuantBlock
// elements (one absmax each), kChunk / kQuantBlock of them per chunk of the same table (those past a
// tensor's end return at once), then finish_step.
namespace optim {
constexpr int64_t kQuantBlock = 256;  // csrc/optim.h's kQuantBlock
}  // namespace optim
inline Launch optim_update_8bit(const std::vector<int64_t>& numels) {
  return launch_1d("adam_8bit_kernel", optim_chunks(numels) * (optim::kChunk / optim::kQuantBlock), optim::kQuantBlock);
}

// ---- the export's table -----------------------------------------------------------------------------------
// `sizes` as the caller gave them: integers (bools as 0/1, tuples as several) and strings.
struct Sizes {
  std::string op;
  std::map<std::string, std::vector<int64_t>> ints;
  std::map<std::string, std::string> strs;

  [[noreturn]] void missing(const std::string& key, const char* what) const {
    throw std::invalid_argument("op '" + op + "' needs sizes['" + key + "'] (" + what + ")");
  }
  bool has(const std::string& key) const { return ints.count(key) > 0 || strs.count(key) > 0; }
  int64_t get(const std::string& key) const {
    auto it = ints.find(key);
    if (it == ints.end() || it->second.size() != 1) missing(key, "an integer");
    return it->second[0];
  }
  int64_t get(const std::string& key, int64_t fallback) const { return has(key) ? get(key) : fallback; }
  const std::vector<int64_t>& list(const std::string& key) const {
    auto it = ints.find(key);
    if (it == ints.end()) missing(key, "a tuple of integers");
    return it->second;
  }
  std::string str(const std::string& key, const std::string& fallback) const {
    if (!has(key)) return fallback;
    auto it = strs.find(key);
    if (it == strs.end()) missing(key, "a string");
    return it->second;
  }
};

inline std::vector<Launch> batch_norm_plans(const Sizes& s) {
  const BnShape shape = bn_shape(s.list("shape"), s.get("channels_last", 0) != 0);
  std::vector<Launch> out;
  if (shape.numel() == 0) return out;  // the host side launches nothing
  const BnReduce stats = bn_stats(shape), grad = bn_bwd_reduce(shape);
  const int64_t n = shape.numel();
  if (s.get("training", 1) != 0)
    out.insert(out.end(), {touching(stats.partial, n), touching(stats.combine, stats.parts * shape.channels)});
  out.push_back(touching(bn_elemt(shape).launch, n));
  out.insert(out.end(), {touching(grad.partial, n), touching(grad.combine, grad.parts * shape.channels),
                         touching(bn_bwd_elemt(shape).launch, n)});
  return out;
}

inline std::vector<Launch> pointwise_loss_plans(const Sizes& s) {
  const int64_t n = s.get("numel");
  const std::string reduction = s.str("reduction", "mean");
  if (reduction != "none" && reduction != "mean" && reduction != "sum")
    throw std::invalid_argument("reduction must be 'none', 'mean' or 'sum', got '" + reduction + "'");
  if (n == 0) return {};
  if (reduction == "none") return {touching(loss_pointwise(n), n), touching(loss_pointwise_bwd(n), n)};
  const LossReduce r = loss_reduce(n);
  return {touching(r.partial, n), touching(r.sum, r.partial.grid.x)};
}

inline std::vector<Launch> cross_entropy_plans(const Sizes& s) {
  const int64_t rows = s.get("rows"), classes = s.get("classes");
  if (rows == 0 || classes == 0) return {};
  return {touching(cross_entropy(rows, classes).launch, rows * classes)};
}

inline std::vector<Launch> masked_activation_plans(const Sizes& s) {
  const int64_t n = s.get("numel");
  if (n == 0) return {};
  return {touching(act_masked_fwd(n), n), touching(act_masked_bwd(n), n)};
}

inline std::vector<Launch> unary_activation_plans(const Sizes& s) {
  const int64_t n = s.get("numel");
  if (n == 0) return {};
  return {touching(act_unary(n), n), touching(act_binary(n), n)};
}

inline std::vector<Launch> maxout_plans(const Sizes& s) {
  const int64_t n = s.get("numel"), pieces = s.get("pieces");
  if (pieces <= 0 || n % pieces != 0)
    throw std::invalid_argument("maxout needs pieces > 0 dividing numel, got " + std::to_string(pieces));
  if (n == 0) return {};
  return {touching(act_maxout_fwd(n / pieces), n), touching(act_maxout_bwd(n / pieces), n)};
}

inline std::vector<int64_t> optim_numels(const Sizes& s) {
  if (s.has("numels")) return s.list("numels");
  return std::vector<int64_t>(size_t(s.get("tensors")), s.get("numel"));
}

// keeps_steps: whether the algorithm has step counts (or flags) for finish_step to advance; quantized:
// Adam with 8-bit states (adam_8bit_kernel)
inline std::vector<Launch> optim_plans(const Sizes& s, bool keeps_steps, bool quantized = false) {
  const std::vector<int64_t> numels = optim_numels(s);
  std::vector<Launch> out;
  if (numels.empty()) return out;
  int64_t total = 0;
  for (int64_t n : numels) total += n;
  if (optim_chunks(numels) > 0)
    out.push_back(touching(quantized ? optim_update_8bit(numels) : optim_update(numels), total));
  if (keeps_steps) out.push_back(touching(optim_finish(int64_t(numels.size())), int64_t(numels.size())));
  return out;
}

using PlanFn = std::function<std::vector<Launch>(const Sizes&)>;

// Every op the export knows, by name.
inline const std::map<std::string, PlanFn>& launch_plan_ops() {
  static const std::map<std::string, PlanFn> ops = {
      {"batch_norm", batch_norm_plans},
      {"l1_loss", pointwise_loss_plans},
      {"mse_loss", pointwise_loss_plans},
      {"huber_loss", pointwise_loss_plans},
      {"rmse_loss", pointwise_loss_plans},
      {"cross_entropy", cross_entropy_plans},
      {"relu", masked_activation_plans},
      {"leaky_relu", masked_activation_plans},
      {"elu", unary_activation_plans},
      {"sigmoid", unary_activation_plans},
      {"tanh", unary_activation_plans},
      {"maxout", maxout_plans},
      {"sgd", [](const Sizes& s) { return optim_plans(s, s.get("new_buffers", 0) != 0); }},
      {"adam", [](const Sizes& s) { return optim_plans(s, true); }},
      {"adamw", [](const Sizes& s) { return optim_plans(s, true); }},
      {"adam_8bit", [](const Sizes& s) { return optim_plans(s, true, true); }},
      {"adagrad", [](const Sizes& s) { return optim_plans(s, true); }},
      {"rmsprop", [](const Sizes& s) { return optim_plans(s, true); }},
  };
  return ops;
}

#if defined(__CUDACC__)
// The launch's dims for <<<>>> (a plan's values fit: grid x < 2^31, the rest <= 65,535).
inline dim3 grid_of(const Launch& l) { return dim3(unsigned(l.grid.x), unsigned(l.grid.y), unsigned(l.grid.z)); }
inline dim3 block_of(const Launch& l) { return dim3(unsigned(l.block.x), unsigned(l.block.y), unsigned(l.block.z)); }
#endif

}  // namespace plan
}  // namespace pyops
