// CPU kernels of the optim family: one parallel pass over every tensor of a parameter group
// (a table of chunks across all tensors), each element read and written once. The math follows
// torch.optim's for-loop implementations; see pyops/optim/fused.py.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/checks.h"
#include "common/dispatch.h"

namespace pyops {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task

struct Chunk {
  int64_t tensor, begin, end;
};

// Every list must match params in length; every tensor must share its param's device, dtype, shape
// and dense layout (the kernels walk memory order).
void check_group(const char* op, at::TensorList params, std::initializer_list<std::pair<const char*, at::TensorList>> lists) {
  for (const auto& [name, list] : lists) {
    TORCH_CHECK(list.empty() || list.size() == params.size(), "pyops::", op, ": ", name, " has ", list.size(),
                " tensors but params has ", params.size());
  }
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor& p = params[i];
    check_floating(op, "params", p);
    TORCH_CHECK(p.device().is_cpu(), "pyops::", op, ": params must be on the CPU here, got ", p.device());
    TORCH_CHECK(p.is_non_overlapping_and_dense(), "pyops::", op, ": params[", i, "] is not dense");
    for (const auto& [name, list] : lists) {
      if (list.empty()) continue;
      const at::Tensor& t = list[i];
      check_like(op, "params", p, name, t);
      TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), "pyops::", op, ": ", name, "[", i,
                  "] has shape ", t.sizes(), " and strides ", t.strides(), " but params[", i, "] has ", p.sizes(),
                  " and ", p.strides());
    }
  }
}

std::vector<Chunk> chunk_table(at::TensorList params) {
  std::vector<Chunk> table;
  for (size_t i = 0; i < params.size(); ++i)
    for (int64_t b = 0; b < params[i].numel(); b += kChunk)
      table.push_back({int64_t(i), b, std::min(params[i].numel(), b + kChunk)});
  return table;
}

// The grad scaler's contract: found_inf set -> skip; else gradients scaled by 1 / grad_scale.
bool skip_step(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0;
}
double inv_scale(const std::optional<at::Tensor>& grad_scale) {
  return grad_scale.has_value() && grad_scale->defined() ? 1.0 / grad_scale->item<double>() : 1.0;
}

// lr and the grad scaler's factor, read once per step (CPU tensors: no device synchronisation).
struct StepScalars {
  double lr, inv;
  bool unscale;
};
StepScalars step_scalars(const at::Tensor& lr, const std::optional<at::Tensor>& grad_scale) {
  return {lr.item<double>(), inv_scale(grad_scale), grad_scale.has_value() && grad_scale->defined()};
}

// One body serves the vector loop and the scalar tail: W is Vectorized<opmath_t> (float and double
// tensors) or opmath_t itself, and these helpers load, store and compute on either.
using at::vec::Vectorized;
template <typename W, typename T>
W ld(const T* p) {
  if constexpr (std::is_arithmetic_v<W>) {
    return W(*p);
  } else {
    return W::loadu(p);
  }
}
template <typename T, typename W>
void st(T* p, const W& v) {
  if constexpr (std::is_arithmetic_v<W>) {
    *p = T(v);
  } else {
    v.store(p);
  }
}
template <typename T>
T sqrt_(T x) { return std::sqrt(x); }
template <typename T>
Vectorized<T> sqrt_(const Vectorized<T>& x) { return x.sqrt(); }
template <typename T>
T maximum_(T a, T b) { return a != a ? a : (b != b ? b : std::max(a, b)); }  // NaN wins, as torch.maximum
template <typename T>
Vectorized<T> maximum_(const Vectorized<T>& a, const Vectorized<T>& b) { return at::vec::maximum(a, b); }

// The gradient at j as the update uses it: unscaled (and written back so), negated to maximize.
template <typename W, typename T, typename O>
W grad_at(T* g, int64_t j, const StepScalars& sc, bool maximize) {
  W gj = ld<W>(g + j);
  if (sc.unscale) {
    gj = gj * W(O(sc.inv));
    st(g + j, gj);
  }
  return maximize ? W(0) - gj : gj;
}

// v as stored in a T tensor and read back: itself unless T rounds (float16/bfloat16), so that the
// update uses what the state holds, as torch's does, without reloading it where nothing rounds.
template <typename T, typename W>
W stored(T* p, const W& v) {
  st(p, v);
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    return v;
  } else {
    return ld<W>(p);
  }
}

// body(j, W{}) for j in [begin, end): whole vectors first where the tensor's type is its opmath type.
template <typename T, typename Body>
void for_elements(int64_t begin, int64_t end, const Body& body) {
  using opmath_t = at::opmath_type<T>;
  int64_t j = begin;
  if constexpr (std::is_same_v<T, opmath_t>) {
    using V = Vectorized<T>;
    for (; j + V::size() <= end; j += V::size()) body(j, V());
  }
  for (; j < end; ++j) body(j, opmath_t());
}

// step_t += 1 and its new value, without an op dispatch per tensor (1000 small tensors made those
// ~3 ms of a 10 ms Adam step). Steps are torch's float32 scalars; others go through add_.
double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kFloat && step.device().is_cpu() && step.numel() == 1) {
    float* v = step.mutable_data_ptr<float>();
    *v += 1.0f;
    return *v;
  }
  step.add_(1);
  return step.item<double>();
}

template <typename T>
T* ptr(at::TensorList list, int64_t i) {
  return list.empty() ? nullptr : list[i].mutable_data_ptr<T>();
}

// Runs body(scalar_t*, chunk, i) for every chunk of the group in parallel, dtype dispatched.
template <typename Body>
void for_each_chunk(at::TensorList params, const Body& body) {
  const auto table = chunk_table(params);
  if (table.empty()) return;
  PYOPS_DISPATCH_FLOATING(params[0].scalar_type(), [&] {
    at::parallel_for(0, int64_t(table.size()), 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) body(static_cast<scalar_t*>(nullptr), table[c]);
    });
  });
}

void sgd_step_(at::TensorList params, at::TensorList grads, at::TensorList bufs, const at::Tensor& lr_t,
               double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
               at::IntArrayRef first, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  check_group("sgd_step_", params, {{"grads", grads}, {"momentum_buffers", bufs}});
  if (skip_step(found_inf)) return;
  const StepScalars sc = step_scalars(lr_t, grad_scale);
  const double lr = sc.lr;
  for_each_chunk(params, [&](auto* tag, const Chunk& ch) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using opmath_t = at::opmath_type<T>;
    T* p = ptr<T>(params, ch.tensor);
    T* g = ptr<T>(grads, ch.tensor);
    T* m = ptr<T>(bufs, ch.tensor);
    const bool is_first = !first.empty() && first[ch.tensor];
    for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
      using W = decltype(w);
      W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
      const W pj = ld<W>(p + j);
      if (weight_decay != 0) gj = gj + W(opmath_t(weight_decay)) * pj;
      if (momentum != 0) {
        const W buf = stored(m + j, is_first ? gj : W(opmath_t(momentum)) * ld<W>(m + j) + W(opmath_t(1 - dampening)) * gj);
        gj = nesterov ? gj + W(opmath_t(momentum)) * buf : buf;
      }
      st(p + j, pj - W(opmath_t(lr)) * gj);
    });
  });
}

void adam_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                at::TensorList max_exp_avg_sqs, at::TensorList steps, const at::Tensor& lr_t, double beta1,
                double beta2, double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled,
                const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_group("adam_step_", params, {{"grads", grads}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs},
                                     {"max_exp_avg_sqs", max_exp_avg_sqs}});
  TORCH_CHECK(steps.size() == params.size(), "pyops::adam_step_: steps has ", steps.size(), " tensors");
  if (skip_step(found_inf)) return;
  const StepScalars sc = step_scalars(lr_t, grad_scale);
  const double lr = sc.lr;
  // torch computes with a tensor lr in the tensor's dtype: lr / bias_correction1 and 1 - lr * wd
  // then round to float32 for a float32 lr.
  const bool lr_f32 = lr_t.scalar_type() == at::kFloat;
  std::vector<double> step_size(params.size()), bc2_sqrt(params.size());
  for (size_t i = 0; i < params.size(); ++i) {  // step_t += 1, then torch's bias corrections in double
    const double step = increment_step(steps[i]);
    const double bc1 = 1 - std::pow(beta1, step);
    step_size[i] = lr_f32 ? double(float(lr) / float(bc1)) : lr / bc1;
    bc2_sqrt[i] = std::sqrt(1 - std::pow(beta2, step));
  }
  const double decay = lr_f32 ? double(1.0f - float(lr) * float(weight_decay)) : 1 - lr * weight_decay;
  for_each_chunk(params, [&](auto* tag, const Chunk& ch) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using opmath_t = at::opmath_type<T>;
    T* p = ptr<T>(params, ch.tensor);
    T* g = ptr<T>(grads, ch.tensor);
    T* m = ptr<T>(exp_avgs, ch.tensor);
    T* v = ptr<T>(exp_avg_sqs, ch.tensor);
    T* vmax = amsgrad ? ptr<T>(max_exp_avg_sqs, ch.tensor) : nullptr;
    const opmath_t b1 = beta1, b2 = beta2, ss = step_size[ch.tensor], inv_bc2 = 1 / bc2_sqrt[ch.tensor];
    for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
      using W = decltype(w);
      W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
      W pj = ld<W>(p + j);
      if (weight_decay != 0) {
        if (decoupled) {
          pj = pj * W(opmath_t(decay));
        } else {
          gj = gj + W(opmath_t(weight_decay)) * pj;
        }
      }
      const W m0 = ld<W>(m + j);
      const W mj = stored(m + j, m0 + W(1 - b1) * (gj - m0));  // lerp
      W vu = stored(v + j, ld<W>(v + j) * W(b2) + W(1 - b2) * gj * gj);
      if (amsgrad) vu = stored(vmax + j, maximum_(ld<W>(vmax + j), vu));
      const W denom = sqrt_(vu) * W(inv_bc2) + W(opmath_t(eps));  // one division per element, not two
      st(p + j, pj - W(ss) * mj / denom);
    });
  });
}

void adagrad_step_(at::TensorList params, at::TensorList grads, at::TensorList sums, at::TensorList steps,
                   const at::Tensor& lr_t, double lr_decay, double weight_decay, double eps, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_group("adagrad_step_", params, {{"grads", grads}, {"sums", sums}});
  TORCH_CHECK(steps.size() == params.size(), "pyops::adagrad_step_: steps has ", steps.size(), " tensors");
  if (skip_step(found_inf)) return;
  const StepScalars sc = step_scalars(lr_t, grad_scale);
  const double lr = sc.lr;
  std::vector<double> clr(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    clr[i] = lr / (1 + (increment_step(steps[i]) - 1) * lr_decay);
  }
  for_each_chunk(params, [&](auto* tag, const Chunk& ch) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using opmath_t = at::opmath_type<T>;
    T* p = ptr<T>(params, ch.tensor);
    T* g = ptr<T>(grads, ch.tensor);
    T* s = ptr<T>(sums, ch.tensor);
    const opmath_t c = clr[ch.tensor];
    for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
      using W = decltype(w);
      W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
      const W pj = ld<W>(p + j);
      if (weight_decay != 0) gj = gj + W(opmath_t(weight_decay)) * pj;
      st(s + j, ld<W>(s + j) + gj * gj);
      st(p + j, pj - W(c) * gj / (sqrt_(ld<W>(s + j)) + W(opmath_t(eps))));
    });
  });
}

void rmsprop_step_(at::TensorList params, at::TensorList grads, at::TensorList square_avgs, at::TensorList grad_avgs,
                   at::TensorList bufs, at::TensorList steps, const at::Tensor& lr_t, double alpha, double eps,
                   double weight_decay, double momentum, bool centered, bool maximize,
                   const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf) {
  check_group("rmsprop_step_", params, {{"grads", grads}, {"square_avgs", square_avgs}, {"grad_avgs", grad_avgs},
                                        {"momentum_buffers", bufs}});
  TORCH_CHECK(steps.size() == params.size(), "pyops::rmsprop_step_: steps has ", steps.size(), " tensors");
  if (skip_step(found_inf)) return;
  const StepScalars sc = step_scalars(lr_t, grad_scale);
  const double lr = sc.lr;
  for (size_t i = 0; i < params.size(); ++i) increment_step(steps[i]);
  for_each_chunk(params, [&](auto* tag, const Chunk& ch) {
    using T = std::remove_pointer_t<decltype(tag)>;
    using opmath_t = at::opmath_type<T>;
    T* p = ptr<T>(params, ch.tensor);
    T* g = ptr<T>(grads, ch.tensor);
    T* sq = ptr<T>(square_avgs, ch.tensor);
    T* ga = centered ? ptr<T>(grad_avgs, ch.tensor) : nullptr;
    T* m = momentum > 0 ? ptr<T>(bufs, ch.tensor) : nullptr;
    const opmath_t a = alpha;
    for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
      using W = decltype(w);
      W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
      const W pj = ld<W>(p + j);
      if (weight_decay != 0) gj = gj + W(opmath_t(weight_decay)) * pj;
      st(sq + j, ld<W>(sq + j) * W(a) + W(1 - a) * gj * gj);
      W avg;
      if (centered) {
        const W ga0 = ld<W>(ga + j);
        st(ga + j, ga0 + W(1 - a) * (gj - ga0));  // lerp
        const W gaj = ld<W>(ga + j);
        avg = sqrt_(ld<W>(sq + j) - gaj * gaj) + W(opmath_t(eps));
      } else {
        avg = sqrt_(ld<W>(sq + j)) + W(opmath_t(eps));
      }
      if (momentum > 0) {
        st(m + j, ld<W>(m + j) * W(opmath_t(momentum)) + gj / avg);
        st(p + j, pj - W(opmath_t(lr)) * ld<W>(m + j));
      } else {
        st(p + j, pj - W(opmath_t(lr)) * gj / avg);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  m.impl("sgd_step_", &sgd_step_);
  m.impl("adam_step_", &adam_step_);
  m.impl("adagrad_step_", &adagrad_step_);
  m.impl("rmsprop_step_", &rmsprop_step_);
}

}  // namespace pyops
