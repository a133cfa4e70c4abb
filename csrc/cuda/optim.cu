// CUDA kernels of the optim family: one launch updates every tensor of a (device, dtype) group.
// A table in device memory (uploaded from pinned memory, without a host synchronisation) holds each
// tensor's pointers and size and the chunks (tensor, start) that the blocks take; step counts,
// lr, grad_scale and found_inf are read on the device. Step counts advance in a second, tiny launch
// (the update reads step and uses step + 1), as torch's fused optimizers do. Math as
// pyops/optim/fused.py and csrc/cpu/optim.cpp.
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstring>
#include <map>
#include <mutex>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"

namespace pyops {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 4096;  // elements per block

struct TensorMeta {
  void* p;
  void* g;
  void* s1;
  void* s2;
  void* s3;
  float* step;
  int64_t numel;
  int64_t first;  // SGD: the momentum buffer starts as the gradient
};

struct Hyper {  // per algorithm, a and b as the kernels below say
  double a, b, wd, eps;
  bool maximize, has_wd, flag1, flag2;
  const void* lr;
  bool lr_double;
  const float* grad_scale;
  const float* found_inf;
};

enum Algo { kSgd, kAdam, kAdagrad, kRmsprop };

__device__ __forceinline__ double read_lr(const Hyper& h) {
  return h.lr_double ? *static_cast<const double*>(h.lr) : double(*static_cast<const float*>(h.lr));
}

template <typename T, Algo A>
__global__ void multi_tensor_kernel(const TensorMeta* metas, const int64_t* chunks, Hyper h) {
  using opmath_t = at::opmath_type<T>;
  if (h.found_inf != nullptr && *h.found_inf != 0.f) return;
  const int64_t t = chunks[2 * blockIdx.x], start = chunks[2 * blockIdx.x + 1];
  const TensorMeta m = metas[t];
  const int64_t end = min(start + kChunk, m.numel);
  T* p = static_cast<T*>(m.p);
  T* g = static_cast<T*>(m.g);
  T* s1 = static_cast<T*>(m.s1);
  T* s2 = static_cast<T*>(m.s2);
  T* s3 = static_cast<T*>(m.s3);
  const opmath_t lr = read_lr(h);
  const opmath_t inv = h.grad_scale != nullptr ? opmath_t(1) / opmath_t(*h.grad_scale) : opmath_t(1);
  const opmath_t a = h.a, b = h.b, wd = h.wd, eps = h.eps;
  const double step = m.step != nullptr ? double(*m.step) + 1 : 0;
  opmath_t step_size = 0, inv_bc2 = 0, clr = 0;
  if constexpr (A == kAdam) {
    step_size = opmath_t(double(lr) / (1 - pow(h.a, step)));
    inv_bc2 = opmath_t(1 / sqrt(1 - pow(h.b, step)));
  }
  if constexpr (A == kAdagrad) clr = opmath_t(double(lr) / (1 + (step - 1) * h.a));
  for (int64_t j = start + threadIdx.x; j < end; j += blockDim.x) {
    opmath_t gj = g[j];
    if (h.grad_scale != nullptr) {
      gj *= inv;
      g[j] = gj;
    }
    if (h.maximize) gj = -gj;
    opmath_t pj = p[j];
    if constexpr (A == kSgd) {  // a momentum, b dampening; flag1: momentum != 0, flag2: nesterov
      if (h.has_wd) gj += wd * pj;
      if (h.flag1) {
        const opmath_t buf = m.first ? gj : a * opmath_t(s1[j]) + (1 - b) * gj;
        s1[j] = buf;
        gj = h.flag2 ? gj + a * opmath_t(s1[j]) : opmath_t(s1[j]);
      }
      p[j] = pj - lr * gj;
    } else if constexpr (A == kAdam) {  // a beta1, b beta2; flag1: amsgrad, flag2: decoupled
      if (h.has_wd) {
        if (h.flag2) {
          pj *= 1 - lr * wd;
        } else {
          gj += wd * pj;
        }
      }
      const opmath_t m0 = s1[j];
      s1[j] = m0 + (1 - a) * (gj - m0);
      s2[j] = opmath_t(s2[j]) * b + (1 - b) * gj * gj;
      opmath_t v = s2[j];
      if (h.flag1) {
        const opmath_t vmax = s3[j];
        s3[j] = (vmax != vmax || vmax > v) ? vmax : v;
        v = s3[j];
      }
      p[j] = pj - step_size * opmath_t(s1[j]) / (sqrt(v) * inv_bc2 + eps);
    } else if constexpr (A == kAdagrad) {  // a lr_decay
      if (h.has_wd) gj += wd * pj;
      s1[j] = opmath_t(s1[j]) + gj * gj;
      p[j] = pj - clr * gj / (sqrt(opmath_t(s1[j])) + eps);
    } else {  // RMSprop: a alpha, b momentum; flag1: centered, flag2: momentum > 0
      if (h.has_wd) gj += wd * pj;
      s1[j] = opmath_t(s1[j]) * a + (1 - a) * gj * gj;
      opmath_t avg;
      if (h.flag1) {
        const opmath_t ga = s2[j];
        s2[j] = ga + (1 - a) * (gj - ga);
        const opmath_t gaj = s2[j];
        avg = sqrt(opmath_t(s1[j]) - gaj * gaj) + eps;
      } else {
        avg = sqrt(opmath_t(s1[j])) + eps;
      }
      if (h.flag2) {
        s3[j] = opmath_t(s3[j]) * b + gj / avg;
        p[j] = pj - lr * opmath_t(s3[j]);
      } else {
        p[j] = pj - lr * gj / avg;
      }
    }
  }
}

__global__ void increment_steps(const TensorMeta* metas, int64_t n, const float* found_inf) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n && metas[i].step != nullptr && (found_inf == nullptr || *found_inf == 0.f)) *metas[i].step += 1.f;
}

void* data_or_null(at::TensorList list, size_t i) { return list.empty() ? nullptr : list[i].data_ptr(); }

const float* float_ptr(const std::optional<at::Tensor>& t, const char* op, const char* name, const at::Tensor& p) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1 && t->device() == p.device(), "pyops::", op, ": ",
              name, " must be a one-element float32 tensor on ", p.device());
  return t->const_data_ptr<float>();
}

template <Algo A>
void launch(const char* op, at::TensorList params, at::TensorList grads, at::TensorList s1, at::TensorList s2,
            at::TensorList s3, at::TensorList steps, const at::Tensor& lr, Hyper h, at::IntArrayRef first,
            const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  if (params.empty()) return;
  const at::Tensor& p0 = params[0];
  c10::cuda::CUDAGuard guard(p0.device());
  for (size_t i = 0; i < params.size(); ++i) {
    check_floating(op, "params", params[i]);
    check_like(op, "params", p0, "params", params[i]);
    TORCH_CHECK(params[i].is_non_overlapping_and_dense(), "pyops::", op, ": params[", i, "] is not dense");
    for (at::TensorList list : {grads, s1, s2, s3}) {
      if (list.empty()) continue;
      check_like(op, "params", params[i], "a gradient or state tensor", list[i]);
      TORCH_CHECK(list[i].strides() == params[i].strides(), "pyops::", op, ": tensor ", i,
                  " does not share its parameter's layout");
    }
    if (!steps.empty())
      TORCH_CHECK(steps[i].scalar_type() == at::kFloat && steps[i].device() == p0.device(), "pyops::", op,
                  ": steps must be float32 tensors on ", p0.device());
  }
  TORCH_CHECK(lr.numel() == 1 && lr.device() == p0.device() &&
                  (lr.scalar_type() == at::kFloat || lr.scalar_type() == at::kDouble),
              "pyops::", op, ": lr must be a one-element float32/float64 tensor on ", p0.device());
  h.lr = lr.const_data_ptr();
  h.lr_double = lr.scalar_type() == at::kDouble;
  h.grad_scale = float_ptr(grad_scale, op, "grad_scale", p0);
  h.found_inf = float_ptr(found_inf, op, "found_inf", p0);

  // Tables in device memory, filled in pinned memory and copied without a host synchronisation, and
  // cached while the tensors do not change: then a step uploads nothing, and CUDA graph capture of a
  // step (after a warm-up step, as graphs need anyway) records no host copy.
  const int64_t n = int64_t(params.size());
  std::vector<int64_t> key{p0.device().index()};
  std::vector<TensorMeta> metas(n);
  std::vector<int64_t> chunk_list;
  for (int64_t i = 0; i < n; ++i) {
    metas[i] = {params[i].data_ptr(), data_or_null(grads, i), data_or_null(s1, i), data_or_null(s2, i),
                data_or_null(s3, i), steps.empty() ? nullptr : steps[i].mutable_data_ptr<float>(),
                params[i].numel(), first.empty() ? 0 : first[i]};
    const void* ptrs[] = {metas[i].p, metas[i].g, metas[i].s1, metas[i].s2, metas[i].s3, metas[i].step};
    for (const void* q : ptrs) key.push_back(int64_t(reinterpret_cast<uintptr_t>(q)));
    key.push_back(metas[i].numel);
    key.push_back(metas[i].first);
    for (int64_t s = 0; s < params[i].numel(); s += kChunk) {
      chunk_list.push_back(i);
      chunk_list.push_back(s);
    }
  }
  static std::mutex mu;
  static std::map<std::vector<int64_t>, std::pair<at::Tensor, at::Tensor>> cache;
  at::Tensor meta_d, chunks_d;
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) {
      std::tie(meta_d, chunks_d) = it->second;
    } else {
      at::Tensor host = at::empty({int64_t(n * sizeof(TensorMeta))}, at::TensorOptions(at::kByte).pinned_memory(true));
      std::memcpy(host.mutable_data_ptr<uint8_t>(), metas.data(), n * sizeof(TensorMeta));
      meta_d = host.to(p0.device(), /*non_blocking=*/true);
      at::Tensor chunks_h = at::empty({int64_t(std::max<size_t>(chunk_list.size(), 2))},
                                      at::TensorOptions(at::kLong).pinned_memory(true));
      std::copy(chunk_list.begin(), chunk_list.end(), chunks_h.mutable_data_ptr<int64_t>());
      chunks_d = chunks_h.to(p0.device(), /*non_blocking=*/true);
      if (cache.size() >= 16) cache.clear();  // parameter lists change rarely; keep the last few
      cache.emplace(key, std::make_pair(meta_d, chunks_d));
    }
  }
  const auto* meta_ptr = reinterpret_cast<const TensorMeta*>(meta_d.const_data_ptr<uint8_t>());
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (!chunk_list.empty()) {
    PYOPS_DISPATCH_FLOATING(p0.scalar_type(), [&] {
      multi_tensor_kernel<scalar_t, A><<<unsigned(chunk_list.size() / 2), kThreads, 0, stream>>>(
          meta_ptr, chunks_d.const_data_ptr<int64_t>(), h);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (!steps.empty()) {
    increment_steps<<<unsigned((n + kThreads - 1) / kThreads), kThreads, 0, stream>>>(meta_ptr, n, h.found_inf);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList bufs, const at::Tensor& lr, double momentum,
               double dampening, double weight_decay, bool nesterov, bool maximize, at::IntArrayRef first,
               const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  Hyper h{momentum, dampening, weight_decay, 0, maximize, weight_decay != 0, momentum != 0, nesterov};
  launch<kSgd>("sgd_step_", params, grads, bufs, {}, {}, {}, lr, h, first, grad_scale, found_inf);
}

void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& lr, double beta1, double beta2,
                double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  Hyper h{beta1, beta2, weight_decay, eps, maximize, weight_decay != 0, amsgrad, decoupled};
  launch<kAdam>("adam_step_", params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr, h, {}, grad_scale,
                found_inf);
}

void adagrad_step_(at::TensorList params, at::TensorList grads, at::TensorList sums, at::TensorList steps,
                   const at::Tensor& lr, double lr_decay, double weight_decay, double eps, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  Hyper h{lr_decay, 0, weight_decay, eps, maximize, weight_decay != 0, false, false};
  launch<kAdagrad>("adagrad_step_", params, grads, sums, {}, {}, steps, lr, h, {}, grad_scale, found_inf);
}

void rmsprop_step_(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
                   at::TensorList bufs, at::TensorList steps, const at::Tensor& lr, double alpha, double eps,
                   double weight_decay, double momentum, bool centered, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  Hyper h{alpha, momentum, weight_decay, eps, maximize, weight_decay != 0, centered, momentum > 0};
  launch<kRmsprop>("rmsprop_step_", params, grads, square_avgs, grad_avgs, bufs, steps, lr, h, {}, grad_scale,
                   found_inf);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  m.impl("sgd_step_", &sgd_step_);
  m.impl("adam_step_", &adam_step_);
  m.impl("adagrad_step_", &adagrad_step_);
  m.impl("rmsprop_step_", &rmsprop_step_);
}

}  // namespace pyops
