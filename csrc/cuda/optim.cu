// CUDA kernels of the optim family (the CUDA device of csrc/optim.h): one launch updates every tensor
// of a (device, dtype) group. A table in device memory holds each tensor's pointers and size and the
// chunks (tensor, start) that the blocks take; lr, grad_scale, found_inf and the step counts are read
// on the device, in their own dtype (no host read anywhere). Step counts advance, and SGD's new-buffer
// flags clear, in a second tiny launch (the update reads step and uses step + 1), as torch's fused
// optimizers do. Math as pyops/optim/fused.py and csrc/cpu/optim.cpp; the per-step scalars come from
// csrc/optim.h, so every backend rounds them as torch does.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <math_constants.h>
#include <torch/library.h>

#include <cstring>
#include <initializer_list>
#include <optional>
#include <map>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/launch_plan.h"
#include "common/stochastic_round.h"
#include "optim.h"

namespace pyops {
namespace {

constexpr int kThreads = int(plan::optim::kThreads);  // grids and blocks: csrc/common/launch_plan.h
constexpr int64_t kChunk = plan::optim::kChunk;       // elements per block
constexpr int kMaxStates = 3;                         // state tensors per parameter (Adam with amsgrad, RMSprop)
// Cached device tables kept while parameter lists change (eviction spares those a CUDA graph uses).
constexpr size_t kMaxCachedTables = 16;

// One tensor of the group as the kernels see it. state[] slots are named by each algorithm below.
struct TensorMeta {
  void* param;
  void* grad;
  void* state[kMaxStates];
  void* step;           // nullptr: the algorithm keeps no step count
  uint8_t* new_buffer;  // SGD: nullptr, or a flag (bool/uint8) saying the momentum buffer is new
  int64_t numel;
  bool step_is_double;
};

// A one-element float32/float64 tensor read on the device (nullptr: absent).
struct DeviceScalar {
  const void* ptr = nullptr;
  bool is_double = false;
  __device__ double get() const {
    return is_double ? *static_cast<const double*>(ptr) : double(*static_cast<const float*>(ptr));
  }
};

DeviceScalar device_scalar(const std::optional<at::Tensor>& t) {
  if (!has(t)) return {};
  return {t->const_data_ptr(), t->scalar_type() == at::kDouble};
}

// What every algorithm's kernel reads besides its own hyper-parameters.
struct Common {
  DeviceScalar lr, grad_scale, found_inf;
  bool maximize;
  bool stochastic_round;  // bf16_stochastic_round on a bfloat16 group (csrc/common/stochastic_round.h)
  uint64_t seed;
};

// Element j of a tensor (its random bits' key: stochastic_round_key) takes its new value v: rounded to nearest, or
// stochastically (bfloat16 under bf16_stochastic_round), the one parameter store of every algorithm.
template <typename T, typename O>
__device__ __forceinline__ void store_param(T* p, uint32_t key, int64_t j, O v, const Common& c) {
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (c.stochastic_round) {
      p[j] = c10::BFloat16(bfloat16_round_stochastic(float(v), stochastic_round_bits(key, uint64_t(j))),
                           c10::BFloat16::from_bits());
      return;
    }
  }
  p[j] = v;
}

__device__ __forceinline__ double next_step(const TensorMeta& m) {
  return (m.step_is_double ? *static_cast<const double*>(m.step) : double(*static_cast<const float*>(m.step))) + 1;
}

template <typename T>
__device__ __forceinline__ T* state(const TensorMeta& m, int slot) {
  return static_cast<T*>(m.state[slot]);
}

// Each algorithm: its hyper-parameters, what a block computes once for its tensor (prepare), and the
// update of element j from the (unscaled, maximize-negated) gradient g: it writes the state and
// returns the parameter's new value, which the kernel stores (store_param).
struct SgdKernel {
  static constexpr int kMomentumBuffer = 0;
  double momentum, dampening, weight_decay;
  bool nesterov;
  struct PerTensor {
    bool new_buffer;
  };
  __device__ PerTensor prepare(const TensorMeta& m, double, bool) const {
    return {m.new_buffer != nullptr && *m.new_buffer != 0};
  }
  template <typename T, typename O>
  __device__ O update(const TensorMeta& m, int64_t j, T* p, O g, O lr, const PerTensor& t) const {
    const O pj = p[j];
    if (weight_decay != 0) g += O(weight_decay) * pj;
    if (momentum != 0) {
      T* buf = state<T>(m, kMomentumBuffer);
      buf[j] = t.new_buffer ? g : O(momentum) * O(buf[j]) + O(1 - dampening) * g;
      const O b = buf[j];
      g = nesterov ? g + O(momentum) * b : b;
    }
    return pj - lr * g;
  }
};

// S: the states' type (void: the parameters' own; at::BFloat16 for float32 parameters, rounded to nearest
// even when stored, and the update reads what they hold).
template <typename S = void>
struct AdamKernel {
  static constexpr int kExpAvg = 0, kExpAvgSq = 1, kMaxExpAvgSq = 2;
  double beta1, beta2, weight_decay, eps;
  bool amsgrad, decoupled;
  struct PerTensor {
    double step_size, inv_bias_correction2_sqrt, decay;
  };
  __device__ PerTensor prepare(const TensorMeta& m, double lr, bool lr_is_float) const {
    const double step = next_step(m);
    return {adam_step_size(lr, lr_is_float, beta1, step), adam_inv_bias_correction2_sqrt(beta2, step),
            decoupled_decay(lr, lr_is_float, weight_decay)};
  }
  template <typename T, typename O>
  __device__ O update(const TensorMeta& m, int64_t j, T* p, O g, O, const PerTensor& t) const {
    using St = std::conditional_t<std::is_void_v<S>, T, S>;
    O pj = p[j];
    if (weight_decay != 0) {
      if (decoupled) {
        pj *= O(t.decay);
      } else {
        g += O(weight_decay) * pj;
      }
    }
    const O b1 = beta1, b2 = beta2;
    St* exp_avg = state<St>(m, kExpAvg);
    St* exp_avg_sq = state<St>(m, kExpAvgSq);
    const O m0 = exp_avg[j];
    exp_avg[j] = m0 + (1 - b1) * (g - m0);  // lerp
    exp_avg_sq[j] = O(exp_avg_sq[j]) * b2 + (1 - b2) * g * g;
    O v = exp_avg_sq[j];
    if (amsgrad) {
      St* max_exp_avg_sq = state<St>(m, kMaxExpAvgSq);
      const O vmax = max_exp_avg_sq[j];
      max_exp_avg_sq[j] = (vmax != vmax || vmax > v) ? vmax : v;  // NaN wins, as torch.maximum
      v = max_exp_avg_sq[j];
    }
    return pj - O(t.step_size) * O(exp_avg[j]) / (sqrt(v) * O(t.inv_bias_correction2_sqrt) + O(eps));
  }
};

struct AdagradKernel {
  static constexpr int kSum = 0;
  double lr_decay, weight_decay, eps;
  struct PerTensor {
    double clr;
  };
  __device__ PerTensor prepare(const TensorMeta& m, double lr, bool lr_is_float) const {
    return {adagrad_clr(lr, lr_is_float, lr_decay, next_step(m))};
  }
  template <typename T, typename O>
  __device__ O update(const TensorMeta& m, int64_t j, T* p, O g, O, const PerTensor& t) const {
    const O pj = p[j];
    if (weight_decay != 0) g += O(weight_decay) * pj;
    T* sum = state<T>(m, kSum);
    sum[j] = O(sum[j]) + g * g;
    return pj - O(t.clr) * g / (sqrt(O(sum[j])) + O(eps));
  }
};

struct RmspropKernel {
  static constexpr int kSquareAvg = 0, kGradAvg = 1, kMomentumBuffer = 2;
  double alpha, eps, weight_decay, momentum;
  bool centered;
  struct PerTensor {};
  __device__ PerTensor prepare(const TensorMeta&, double, bool) const { return {}; }
  template <typename T, typename O>
  __device__ O update(const TensorMeta& m, int64_t j, T* p, O g, O lr, const PerTensor&) const {
    const O pj = p[j];
    const O a = alpha;
    if (weight_decay != 0) g += O(weight_decay) * pj;
    T* square_avg = state<T>(m, kSquareAvg);
    square_avg[j] = O(square_avg[j]) * a + (1 - a) * g * g;
    O avg;
    if (centered) {
      T* grad_avg = state<T>(m, kGradAvg);
      const O ga = grad_avg[j];
      grad_avg[j] = ga + (1 - a) * (g - ga);  // lerp
      const O gaj = grad_avg[j];
      avg = sqrt(O(square_avg[j]) - gaj * gaj) + O(eps);
    } else {
      avg = sqrt(O(square_avg[j])) + O(eps);
    }
    if (momentum > 0) {
      T* buf = state<T>(m, kMomentumBuffer);
      buf[j] = O(buf[j]) * O(momentum) + g / avg;
      return pj - lr * O(buf[j]);
    }
    return pj - lr * g / avg;
  }
};

template <typename T, typename K>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const TensorMeta* metas, const int64_t* chunks, Common c, K k) {
  using opmath_t = at::opmath_type<T>;
  if (c.found_inf.ptr != nullptr && c.found_inf.get() != 0) return;  // the grad scaler skips the step
  const int64_t t = chunks[2 * blockIdx.x], start = chunks[2 * blockIdx.x + 1];
  const TensorMeta m = metas[t];
  const int64_t end = min(start + kChunk, m.numel);
  const double lr = c.lr.get();
  const auto per_tensor = k.prepare(m, lr, !c.lr.is_double);
  const bool unscale = c.grad_scale.ptr != nullptr;
  const opmath_t inv = unscale ? opmath_t(1.0 / c.grad_scale.get()) : opmath_t(1);
  T* p = static_cast<T*>(m.param);
  T* g = static_cast<T*>(m.grad);
  const uint32_t key = c.stochastic_round ? stochastic_round_key(c.seed, uint64_t(t)) : 0;
  for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) {
    opmath_t gj = g[j];
    if (unscale) {
      g[j] = gj * inv;
      gj = g[j];  // the update uses the gradient as written back
    }
    if (c.maximize) gj = -gj;
    store_param(p, key, j, k.template update<T, opmath_t>(m, j, p, gj, opmath_t(lr), per_tensor), c);
  }
}

// After the update: step counts advance and applied new-buffer flags clear, unless the step was skipped.
__global__ void __launch_bounds__(kThreads) finish_step(const TensorMeta* metas, int64_t n, DeviceScalar found_inf) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n || (found_inf.ptr != nullptr && found_inf.get() != 0)) return;
  const TensorMeta& m = metas[i];
  if (m.step != nullptr) {
    if (m.step_is_double) {
      *static_cast<double*>(m.step) += 1;
    } else {
      *static_cast<float*>(m.step) += 1.f;
    }
  }
  if (m.new_buffer != nullptr) *m.new_buffer = 0;
}

// ---- device tables -----------------------------------------------------------------------------
// Filled in pinned memory, copied without a host synchronisation, and cached while the tensors do not
// change, so that a step over unchanged tensors uploads nothing. CUDA graphs replay the table a
// captured launch used, and a capture records the upload itself where it had to create one (a whole
// training step captured with zero_grad(set_to_none=True) gives gradients new addresses inside the
// capture): so an entry created or used during a capture keeps its host and device buffers for the
// life of the process (never evicted), and entries are per stream, so that a step on another stream
// never reads a table whose upload that stream has not ordered.
struct Tables {
  at::Tensor metas_host, chunks_host, metas_device, chunks_device;
  int64_t num_chunks = 0;
  bool used_by_graph = false;
};

void upload(const at::Tensor& host, const at::Tensor& device, bool capturing, cudaStream_t stream) {
  if (capturing) {  // recorded in the graph; the host buffer lives as long as the cache entry (forever)
    C10_CUDA_CHECK(cudaMemcpyAsync(device.mutable_data_ptr(), host.const_data_ptr(), host.nbytes(),
                                   cudaMemcpyHostToDevice, stream));
  } else {  // torch's copy orders the pinned buffer's reuse after the copy
    device.copy_(host, /*non_blocking=*/true);
  }
}

template <typename Fill>
at::Tensor pinned(int64_t bytes, bool capturing, const Fill& fill) {
  // Allocating pinned memory is not a stream operation: allowed while another capture is underway.
  std::optional<c10::cuda::CUDAStreamCaptureModeGuard> relaxed;
  if (capturing) relaxed.emplace(cudaStreamCaptureModeRelaxed);
  at::Tensor t = at::empty({std::max<int64_t>(bytes, 1)}, at::TensorOptions(at::kByte).pinned_memory(true));
  fill(t.mutable_data_ptr<uint8_t>());
  return t;
}

Tables tables_for(const std::vector<TensorMeta>& metas, const at::Device& device) {
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  std::vector<int64_t> key{device.index(), int64_t(stream.id())};
  key.reserve(2 + metas.size() * 10);
  for (const TensorMeta& m : metas) {
    for (const void* q :
         std::initializer_list<const void*>{m.param, m.grad, m.state[0], m.state[1], m.state[2], m.step, m.new_buffer})
      key.push_back(int64_t(reinterpret_cast<uintptr_t>(q)));
    key.push_back(m.numel);
    key.push_back(m.step_is_double);
  }
  static std::mutex mu;
  static std::map<std::vector<int64_t>, Tables> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it == cache.end()) {
    if (cache.size() >= kMaxCachedTables) {  // parameter lists change rarely; keep what graphs use
      for (auto e = cache.begin(); e != cache.end();) e = e->second.used_by_graph ? std::next(e) : cache.erase(e);
    }
    std::vector<int64_t> chunk_list;
    for (size_t i = 0; i < metas.size(); ++i)
      for (int64_t s = 0; s < metas[i].numel; s += kChunk) {
        chunk_list.push_back(int64_t(i));
        chunk_list.push_back(s);
      }
    Tables t;
    t.num_chunks = int64_t(chunk_list.size() / 2);
    const int64_t meta_bytes = int64_t(metas.size() * sizeof(TensorMeta));
    const int64_t chunk_bytes = int64_t(chunk_list.size() * sizeof(int64_t));
    t.metas_host = pinned(meta_bytes, capturing, [&](uint8_t* d) { std::memcpy(d, metas.data(), meta_bytes); });
    t.chunks_host = pinned(chunk_bytes, capturing, [&](uint8_t* d) { std::memcpy(d, chunk_list.data(), chunk_bytes); });
    t.metas_device = at::empty({t.metas_host.numel()}, at::TensorOptions(at::kByte).device(device));
    t.chunks_device = at::empty({t.chunks_host.numel()}, at::TensorOptions(at::kByte).device(device));
    upload(t.metas_host, t.metas_device, capturing, stream);
    upload(t.chunks_host, t.chunks_device, capturing, stream);
    it = cache.emplace(std::move(key), std::move(t)).first;
  }
  if (capturing) it->second.used_by_graph = true;
  return it->second;  // a copy (tensor handles): another thread may evict the entry once the lock is gone
}

void* data_or_null(at::TensorList list, size_t i) { return list.empty() ? nullptr : list[i].data_ptr(); }

template <typename K>
void launch(const GroupStep& s, const K& kernel, std::initializer_list<at::TensorList> states, at::TensorList steps,
            at::TensorList new_buffers = {}) {
  // A CUDA graph replays the seed it captured: every replay would round each element with the same
  // random bits, no longer independently from step to step (an element would stall as without the flag).
  TORCH_CHECK(
      !s.stochastic_round || c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
      "pyops: bf16_stochastic_round=True cannot be captured in a CUDA graph (each replay would reuse the "
      "captured seed); capture the step without it, or use master_weights=True");
  const at::Tensor& p0 = s.params[0];
  const size_t n = s.params.size();
  std::vector<TensorMeta> metas(n);
  for (size_t i = 0; i < n; ++i) {
    TensorMeta& m = metas[i];
    m.param = s.params[i].data_ptr();
    m.grad = s.grads[i].data_ptr();
    int slot = 0;
    for (at::TensorList list : states) m.state[slot++] = data_or_null(list, i);
    for (; slot < kMaxStates; ++slot) m.state[slot] = nullptr;
    m.step = data_or_null(steps, i);
    m.step_is_double = !steps.empty() && steps[i].scalar_type() == at::kDouble;
    m.new_buffer = new_buffers.empty() ? nullptr : static_cast<uint8_t*>(new_buffers[i].data_ptr());
    m.numel = s.params[i].numel();
  }
  const Tables t = tables_for(metas, p0.device());
  const auto* meta_ptr = reinterpret_cast<const TensorMeta*>(t.metas_device.const_data_ptr<uint8_t>());
  const auto* chunk_ptr = reinterpret_cast<const int64_t*>(t.chunks_device.const_data_ptr<uint8_t>());
  const Common common{device_scalar(s.lr), device_scalar(s.grad_scale), device_scalar(s.found_inf),
                      s.maximize,          s.stochastic_round,          uint64_t(s.seed)};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (t.num_chunks > 0) {
    std::vector<int64_t> numels(n);
    for (size_t i = 0; i < n; ++i) numels[i] = metas[i].numel;
    const plan::Launch l = plan::optim_update(numels);
    TORCH_CHECK(l.grid.x == t.num_chunks && l.grid.x <= plan::kMaxGridX, "pyops: an optimizer group of ", t.num_chunks,
                " chunks does not fit one launch");
    PYOPS_DISPATCH_FLOATING(p0.scalar_type(), [&] {
      multi_tensor_kernel<scalar_t, K>
          <<<plan::grid_of(l), plan::block_of(l), l.smem, stream>>>(meta_ptr, chunk_ptr, common, kernel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!steps.empty() || !new_buffers.empty()) {
    const plan::Launch l = plan::optim_finish(int64_t(n));
    finish_step<<<plan::grid_of(l), plan::block_of(l), l.smem, stream>>>(meta_ptr, int64_t(n), common.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

// ---- Adam/AdamW with 8-bit blockwise states (Adam8bitStep, csrc/optim.h) ---------------------------------
// A block of kQuantBlock threads per block of kQuantBlock elements, a thread per element: dequantize
// (map[code] * absmax), the update, the block's new absmaxs (warp shuffles, then the warps' maxima in
// shared memory, combined in a fixed order; NaN for both where a state is NaN), requantize (code = the
// number of the map's float32 midpoints below state * (1 / absmax): an 8-step binary search over the
// midpoints in shared memory). Every operation is one IEEE-rounded intrinsic (nvcc would contract a * b
// + c into fused multiply-adds), in the order csrc/optim.h states the update, so the codes are those of
// that float32 math bit for bit, as kernels/optim.py's _adam_8bit_kernel. The blocks take the update
// kernels' table: a chunk's kChunk / kQuantBlock blocks (those past the tensor's end return at once);
// the table's rows hold the exp_avg codes, exp_avg_sq codes and exp_avg absmaxs in the state slots, and
// rows [n, 2n) (size 0: no chunks) the exp_avg_sq absmaxs as their param.
constexpr int kQuantThreads = int(plan::optim::kQuantBlock);
constexpr int64_t kQuantBlocksPerChunk = kChunk / kQuantBlock;
static_assert(plan::optim::kQuantBlock == kQuantBlock && kChunk % kQuantBlock == 0 && kQuantThreads % 32 == 0,
              "whole warps per block, whole blocks per chunk");

template <typename O>
__device__ __forceinline__ O add_rn(O a, O b) {
  if constexpr (std::is_same_v<O, float>) {
    return __fadd_rn(a, b);
  } else {
    return __dadd_rn(a, b);
  }
}
template <typename O>
__device__ __forceinline__ O sub_rn(O a, O b) {
  if constexpr (std::is_same_v<O, float>) {
    return __fsub_rn(a, b);
  } else {
    return __dsub_rn(a, b);
  }
}
template <typename O>
__device__ __forceinline__ O div_rn(O a, O b) {
  if constexpr (std::is_same_v<O, float>) {
    return __fdiv_rn(a, b);
  } else {
    return __ddiv_rn(a, b);
  }
}
template <typename O>
__device__ __forceinline__ O sqrt_rn(O a) {
  if constexpr (std::is_same_v<O, float>) {
    return __fsqrt_rn(a);
  } else {
    return __dsqrt_rn(a);
  }
}

struct Adam8bitKernel {
  static constexpr int kExpAvg = 0, kExpAvgSq = 1, kExpAvgAbsmax = 2;
  double beta1, beta2, weight_decay, eps;
  bool decoupled;
  const float *qmap_signed, *qmap_unsigned;
};

// How many of the midpoints mid[0..254] lie below y (NaN: none).
__device__ __forceinline__ uint8_t quant_code(const float* mid, float y) {
  int c = 0;
#pragma unroll
  for (int half = 128; half > 0; half >>= 1) c += mid[c + half - 1] < y ? half : 0;
  return uint8_t(c);
}

template <typename T>
__global__ void __launch_bounds__(kQuantThreads)
    adam_8bit_kernel(const TensorMeta* metas, const int64_t* chunks, int64_t count, Common c, Adam8bitKernel k) {
  using O = at::opmath_type<T>;
  constexpr int kWarps = kQuantThreads / 32;
  __shared__ float mid_signed[kQuantMapSize], mid_unsigned[kQuantMapSize];
  __shared__ float warp_max[2][kWarps];
  __shared__ int warp_nan[kWarps];
  if (c.found_inf.ptr != nullptr && c.found_inf.get() != 0) return;  // the grad scaler skips the step
  const int64_t chunk = blockIdx.x / kQuantBlocksPerChunk;
  const int64_t t = chunks[2 * chunk];
  const int64_t start = chunks[2 * chunk + 1] + (blockIdx.x % kQuantBlocksPerChunk) * kQuantBlock;
  const TensorMeta m = metas[t];
  if (start >= m.numel) return;  // the whole block
  const int tid = threadIdx.x;
  if (tid + 1 < kQuantMapSize) {
    mid_signed[tid] = __fmul_rn(__fadd_rn(k.qmap_signed[tid], k.qmap_signed[tid + 1]), 0.5f);
    mid_unsigned[tid] = __fmul_rn(__fadd_rn(k.qmap_unsigned[tid], k.qmap_unsigned[tid + 1]), 0.5f);
  }
  const int64_t block = start / kQuantBlock, j = start + tid;
  const bool active = j < m.numel;
  float* m_absmax = state<float>(m, Adam8bitKernel::kExpAvgAbsmax) + block;
  float* v_absmax = static_cast<float*>(metas[count + t].param) + block;
  const float m_absmax0 = *m_absmax, v_absmax0 = *v_absmax;
  uint8_t* m_codes = state<uint8_t>(m, Adam8bitKernel::kExpAvg);
  uint8_t* v_codes = state<uint8_t>(m, Adam8bitKernel::kExpAvgSq);
  O mj = 0, vj = 0;
  if (active) {
    const double lr = c.lr.get(), step = next_step(m);
    const bool lr_is_float = !c.lr.is_double;
    T* p = static_cast<T*>(m.param);
    T* g = static_cast<T*>(m.grad);
    O gj = g[j];
    if (c.grad_scale.ptr != nullptr) {
      g[j] = T(mul_rounded(gj, O(1.0 / c.grad_scale.get())));
      gj = g[j];  // the update uses the gradient as written back
    }
    if (c.maximize) gj = -gj;
    O pj = p[j];
    if (k.weight_decay != 0) {
      if (k.decoupled) {
        pj = mul_rounded(pj, O(decoupled_decay(lr, lr_is_float, k.weight_decay)));
      } else {
        gj = add_rn(gj, mul_rounded(O(k.weight_decay), pj));
      }
    }
    const O m0 = O(__fmul_rn(k.qmap_signed[m_codes[j]], m_absmax0));
    const O v0 = O(__fmul_rn(k.qmap_unsigned[v_codes[j]], v_absmax0));
    const O b1 = O(k.beta1), b2 = O(k.beta2);
    mj = add_rn(m0, mul_rounded(sub_rn(O(1), b1), sub_rn(gj, m0)));
    vj = add_rn(mul_rounded(v0, b2), mul_rounded(mul_rounded(sub_rn(O(1), b2), gj), gj));
    const O denom = add_rn(mul_rounded(sqrt_rn(vj), O(adam_inv_bias_correction2_sqrt(k.beta2, step))), O(k.eps));
    const O step_size = O(adam_step_size(lr, lr_is_float, k.beta1, step));
    p[j] = T(sub_rn(pj, div_rn(mul_rounded(step_size, mj), denom)));
  }
  const float m32 = float(mj), v32 = float(vj);
  float m_max = fabsf(m32), v_max = fabsf(v32);  // (fmaxf drops a NaN: the flag keeps it)
  const int nan = __any_sync(0xffffffffu, isnan(m32) || isnan(v32));
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    m_max = fmaxf(m_max, __shfl_xor_sync(0xffffffffu, m_max, offset));
    v_max = fmaxf(v_max, __shfl_xor_sync(0xffffffffu, v_max, offset));
  }
  if (tid % 32 == 0) {
    warp_max[0][tid / 32] = m_max;
    warp_max[1][tid / 32] = v_max;
    warp_nan[tid / 32] = nan;
  }
  __syncthreads();  // (also: every thread has read the old absmaxs, and the midpoints are in place)
  bool any_nan = false;
  m_max = v_max = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    m_max = fmaxf(m_max, warp_max[0][w]);
    v_max = fmaxf(v_max, warp_max[1][w]);
    any_nan = any_nan || warp_nan[w] != 0;
  }
  if (any_nan) m_max = v_max = CUDART_NAN_F;
  if (tid == 0) {
    *m_absmax = m_max;
    *v_absmax = v_max;
  }
  if (active) {
    const float m_inv = m_max > 0 ? __fdiv_rn(1.0f, m_max) : 0.0f, v_inv = v_max > 0 ? __fdiv_rn(1.0f, v_max) : 0.0f;
    m_codes[j] = quant_code(mid_signed, __fmul_rn(m32, m_inv));
    v_codes[j] = quant_code(mid_unsigned, __fmul_rn(v32, v_inv));
  }
}

void launch_adam_8bit(const Adam8bitStep& s) {
  const at::Tensor& p0 = s.params[0];
  const size_t n = s.params.size();
  std::vector<TensorMeta> metas(2 * n);  // [n, 2n): the exp_avg_sq absmaxs, no elements
  for (size_t i = 0; i < n; ++i) {
    TensorMeta& m = metas[i];
    m.param = s.params[i].data_ptr();
    m.grad = s.grads[i].data_ptr();
    m.state[Adam8bitKernel::kExpAvg] = s.exp_avgs[i].data_ptr();
    m.state[Adam8bitKernel::kExpAvgSq] = s.exp_avg_sqs[i].data_ptr();
    m.state[Adam8bitKernel::kExpAvgAbsmax] = s.exp_avg_absmaxs[i].data_ptr();
    m.step = s.steps[i].data_ptr();
    m.step_is_double = s.steps[i].scalar_type() == at::kDouble;
    m.new_buffer = nullptr;
    m.numel = s.params[i].numel();
    TensorMeta& e = metas[n + i];
    e = TensorMeta{};
    e.param = s.exp_avg_sq_absmaxs[i].data_ptr();
  }
  const Tables t = tables_for(metas, p0.device());
  const auto* meta_ptr = reinterpret_cast<const TensorMeta*>(t.metas_device.const_data_ptr<uint8_t>());
  const auto* chunk_ptr = reinterpret_cast<const int64_t*>(t.chunks_device.const_data_ptr<uint8_t>());
  const Common common{device_scalar(s.lr), device_scalar(s.grad_scale), device_scalar(s.found_inf), s.maximize};
  const Adam8bitKernel k{s.beta1,
                         s.beta2,
                         s.weight_decay,
                         s.eps,
                         s.decoupled,
                         s.qmap_signed.const_data_ptr<float>(),
                         s.qmap_unsigned.const_data_ptr<float>()};
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (t.num_chunks > 0) {
    std::vector<int64_t> numels(n);
    for (size_t i = 0; i < n; ++i) numels[i] = metas[i].numel;
    const plan::Launch l = plan::optim_update_8bit(numels);
    TORCH_CHECK(l.grid.x == t.num_chunks * kQuantBlocksPerChunk && l.grid.x <= plan::kMaxGridX, "pyops: a group of ",
                t.num_chunks, " chunks does not fit one launch of adam_8bit_kernel");
    PYOPS_DISPATCH_FLOATING(p0.scalar_type(), [&] {
      adam_8bit_kernel<scalar_t>
          <<<plan::grid_of(l), plan::block_of(l), l.smem, stream>>>(meta_ptr, chunk_ptr, int64_t(n), common, k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  const plan::Launch l = plan::optim_finish(int64_t(n));
  finish_step<<<plan::grid_of(l), plan::block_of(l), l.smem, stream>>>(meta_ptr, int64_t(n), common.found_inf);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Cuda {
  static constexpr bool kStochasticRound = true;  // store_param
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& t) : guard(t.device()) {}
  };

  static void sgd(const SgdStep& s) {
    const SgdKernel k{s.momentum, s.dampening, s.weight_decay, s.nesterov};
    launch(s, k, {s.momentum != 0 ? s.momentum_buffers : at::TensorList()}, {}, s.new_buffers);
  }
  // D::adam takes bfloat16 state for float32 parameters (csrc/optim.h): a launch per states' dtype.
  static constexpr bool kBf16AdamStates = true;

  static void adam(const AdamStep& s) {
    auto run = [](const AdamStep& a, auto kernel) {
      launch(a, kernel, {a.exp_avgs, a.exp_avg_sqs, a.amsgrad ? a.max_exp_avg_sqs : at::TensorList()}, a.steps);
    };
    const AdamKernel<> own{s.beta1, s.beta2, s.weight_decay, s.eps, s.amsgrad, s.decoupled};
    const AdamKernel<at::BFloat16> bf16{s.beta1, s.beta2, s.weight_decay, s.eps, s.amsgrad, s.decoupled};
    std::vector<size_t> bf16_states, own_states;
    for (size_t i = 0; i < s.params.size(); ++i)
      (s.exp_avgs[i].scalar_type() != s.params[i].scalar_type() ? bf16_states : own_states).push_back(i);
    if (bf16_states.empty()) return run(s, own);
    if (own_states.empty()) {
      TORCH_CHECK(s.params[0].scalar_type() == at::kFloat, "pyops::adam_step_: bfloat16 states need float32 params");
      return run(s, bf16);
    }
    for (const auto* idx : {&own_states, &bf16_states}) {  // the group's tensors in two launches
      std::vector<at::Tensor> lists[6];
      for (size_t i : *idx) {
        lists[0].push_back(s.params[i]);
        lists[1].push_back(s.grads[i]);
        lists[2].push_back(s.exp_avgs[i]);
        lists[3].push_back(s.exp_avg_sqs[i]);
        if (s.amsgrad) lists[4].push_back(s.max_exp_avg_sqs[i]);
        lists[5].push_back(s.steps[i]);
      }
      AdamStep part = s;
      part.params = lists[0];
      part.grads = lists[1];
      part.exp_avgs = lists[2];
      part.exp_avg_sqs = lists[3];
      part.max_exp_avg_sqs = lists[4];
      part.steps = lists[5];
      if (idx == &own_states) {
        run(part, own);
      } else {
        run(part, bf16);
      }
    }
  }
  static void adam_8bit(const Adam8bitStep& s) { launch_adam_8bit(s); }
  static void adagrad(const AdagradStep& s) {
    const AdagradKernel k{s.lr_decay, s.weight_decay, s.eps};
    launch(s, k, {s.sums}, s.steps);
  }
  static void rmsprop(const RmspropStep& s) {
    const RmspropKernel k{s.alpha, s.eps, s.weight_decay, s.momentum, s.centered};
    launch(s, k,
           {s.square_avgs, s.centered ? s.grad_avgs : at::TensorList(),
            s.momentum > 0 ? s.momentum_buffers : at::TensorList()},
           s.steps);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  PYOPS_REGISTER_OPTIM(m, ::pyops::Cuda, "");
  PYOPS_REGISTER_OPTIM_8BIT(m, ::pyops::Cuda, "");
}

}  // namespace pyops
