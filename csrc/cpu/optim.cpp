// CPU kernels of the optim family (the CPU device of csrc/optim.h): one pass over every tensor of a
// parameter group, each element read and written once, in parallel over a table of chunks across
// all tensors when the group is large enough to repay the threads. The math follows torch.optim's
// for-loop implementations; see pyops/optim/fused.py.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

#include "common/dispatch.h"
#include "common/stochastic_round.h"
#include "optim.h"

namespace pyops {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task
// Below this many elements in a group the step runs on the calling thread: waking the pool costs more
// than it saves (62 tensors of 64 elements: 10 us serial; a parallel region's wake-up alone is several
// microseconds and, on a loaded machine, can stall for milliseconds).
constexpr int64_t kParallelMinElements = 1 << 15;

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> chunk_table(at::TensorList params, int64_t* total) {
  std::vector<Chunk> table;
  *total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    *total += n;
    for (int64_t b = 0; b < n; b += kChunk) table.push_back({int64_t(i), b, std::min(n, b + kChunk)});
  }
  return table;
}

// The grad scaler's contract: found_inf set -> skip; else gradients scaled by 1 / grad_scale. On the
// CPU these tensors are read directly (no device synchronisation).
double scalar_value(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>() : double(*t.const_data_ptr<float>());
}
bool skip_step(const GroupStep& s) { return has(s.found_inf) && scalar_value(*s.found_inf) != 0; }

// lr and the grad scaler's factor, read once per step.
struct StepScalars {
  double lr, inv;
  bool unscale, lr_is_float;
};
StepScalars step_scalars(const GroupStep& s) {
  const bool unscale = has(s.grad_scale);
  return {scalar_value(s.lr), unscale ? 1.0 / scalar_value(*s.grad_scale) : 1.0, unscale,
          s.lr.scalar_type() == at::kFloat};
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
T sqrt_(T x) {
  return std::sqrt(x);
}
template <typename T>
Vectorized<T> sqrt_(const Vectorized<T>& x) {
  return x.sqrt();
}
template <typename T>
T maximum_(T a, T b) {
  return a != a ? a : (b != b ? b : std::max(a, b));
}  // NaN wins, as torch.maximum
template <typename T>
Vectorized<T> maximum_(const Vectorized<T>& a, const Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}

// A parameter's new value, stored as every optimizer stores it: rounded to nearest, or for bfloat16
// parameters under bf16_stochastic_round stochastically (csrc/common/stochastic_round.h; bfloat16
// takes the scalar loop, so v is a float there).
struct ParamStore {
  bool stochastic;
  uint64_t seed;
  explicit ParamStore(const GroupStep& s) : stochastic(s.stochastic_round), seed(uint64_t(s.seed)) {}

  // The key of a tensor's random bits, once per chunk.
  uint32_t key(int64_t tensor) const { return stochastic ? stochastic_round_key(seed, uint64_t(tensor)) : 0; }

  template <typename T, typename W>
  void operator()(T* p, uint32_t key, int64_t j, const W& v) const {
    if constexpr (std::is_same_v<T, at::BFloat16> && std::is_arithmetic_v<W>) {
      if (stochastic) {
        p[j] = c10::BFloat16(bfloat16_round_stochastic(float(v), stochastic_round_bits(key, uint64_t(j))),
                             c10::BFloat16::from_bits());
        return;
      }
    }
    st(p + j, v);
  }
};

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

// The gradient at j as the update uses it: unscaled (and written back so), negated to maximize.
template <typename W, typename T, typename O>
W grad_at(T* g, int64_t j, const StepScalars& sc, bool maximize) {
  W gj = ld<W>(g + j);
  if (sc.unscale) gj = stored(g + j, gj * W(O(sc.inv)));  // the update uses the gradient as written back
  return maximize ? W(0) - gj : gj;
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

// step_t += 1 and its new value, read and written in place (steps are checked one-element float32
// or float64 CPU tensors): an op dispatch per tensor cost ~3 ms of a 10 ms Adam step on 1000 tensors.
double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kDouble) return ++*step.mutable_data_ptr<double>();
  float* v = step.mutable_data_ptr<float>();
  *v += 1.0f;
  return *v;
}

template <typename T>
T* ptr(at::TensorList list, int64_t i) {
  return list.empty() ? nullptr : list[i].mutable_data_ptr<T>();
}

// Runs body(scalar_t*, chunk) for every chunk of the group, dtype dispatched; in parallel when the
// group is large.
template <typename Body>
void for_each_chunk(at::TensorList params, const Body& body) {
  int64_t total = 0;
  const auto table = chunk_table(params, &total);
  if (table.empty()) return;
  PYOPS_DISPATCH_FLOATING(params[0].scalar_type(), [&] {
    auto run = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) body(static_cast<scalar_t*>(nullptr), table[c]);
    };
    if (total < kParallelMinElements) {
      run(0, int64_t(table.size()));
    } else {
      at::parallel_for(0, int64_t(table.size()), 1, run);
    }
  });
}

struct Cpu {
  static constexpr bool kStochasticRound = true;  // ParamStore
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static void sgd(const SgdStep& s) {
    if (skip_step(s)) return;
    const StepScalars sc = step_scalars(s);
    const double lr = sc.lr, momentum = s.momentum, dampening = s.dampening, weight_decay = s.weight_decay;
    const bool nesterov = s.nesterov, maximize = s.maximize;
    const ParamStore store(s);
    std::vector<char> is_new(s.params.size(), 0);
    for (size_t i = 0; i < s.new_buffers.size(); ++i)
      is_new[i] = *static_cast<const uint8_t*>(s.new_buffers[i].const_data_ptr()) != 0;
    for_each_chunk(s.params, [&](auto* tag, const Chunk& ch) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using opmath_t = at::opmath_type<T>;
      T* p = ptr<T>(s.params, ch.tensor);
      const uint32_t key = store.key(ch.tensor);
      T* g = ptr<T>(s.grads, ch.tensor);
      T* m = momentum != 0 ? ptr<T>(s.momentum_buffers, ch.tensor) : nullptr;
      const bool first = is_new[ch.tensor];
      for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
        using W = decltype(w);
        W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
        const W pj = ld<W>(p + j);
        if (weight_decay != 0) gj = gj + W(opmath_t(weight_decay)) * pj;
        if (momentum != 0) {
          const W buf =
              stored(m + j, first ? gj : W(opmath_t(momentum)) * ld<W>(m + j) + W(opmath_t(1 - dampening)) * gj);
          gj = nesterov ? gj + W(opmath_t(momentum)) * buf : buf;
        }
        store(p, key, j, pj - W(opmath_t(lr)) * gj);
      });
    });
    for (const at::Tensor& f : s.new_buffers) *static_cast<uint8_t*>(f.mutable_data_ptr()) = 0;
  }

  static void adam(const AdamStep& s) {
    if (skip_step(s)) return;
    const StepScalars sc = step_scalars(s);
    const size_t n = s.params.size();
    std::vector<double> step_size(n), inv_bc2(n);
    for (size_t i = 0; i < n; ++i) {  // step_t += 1, then torch's bias corrections in double
      const double step = increment_step(s.steps[i]);
      step_size[i] = adam_step_size(sc.lr, sc.lr_is_float, s.beta1, step);
      inv_bc2[i] = adam_inv_bias_correction2_sqrt(s.beta2, step);
    }
    const double decay = decoupled_decay(sc.lr, sc.lr_is_float, s.weight_decay);
    const double weight_decay = s.weight_decay, eps = s.eps;
    const bool amsgrad = s.amsgrad, decoupled = s.decoupled, maximize = s.maximize;
    const ParamStore store(s);
    for_each_chunk(s.params, [&](auto* tag, const Chunk& ch) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using opmath_t = at::opmath_type<T>;
      T* p = ptr<T>(s.params, ch.tensor);
      const uint32_t key = store.key(ch.tensor);
      T* g = ptr<T>(s.grads, ch.tensor);
      T* m = ptr<T>(s.exp_avgs, ch.tensor);
      T* v = ptr<T>(s.exp_avg_sqs, ch.tensor);
      T* vmax = amsgrad ? ptr<T>(s.max_exp_avg_sqs, ch.tensor) : nullptr;
      const opmath_t b1 = s.beta1, b2 = s.beta2, ss = step_size[ch.tensor], inv_bc2_t = inv_bc2[ch.tensor];
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
        const W denom = sqrt_(vu) * W(inv_bc2_t) + W(opmath_t(eps));  // one division per element, not two
        store(p, key, j, pj - W(ss) * mj / denom);
      });
    });
  }

  static void adagrad(const AdagradStep& s) {
    if (skip_step(s)) return;
    const StepScalars sc = step_scalars(s);
    std::vector<double> clr(s.params.size());
    for (size_t i = 0; i < s.params.size(); ++i)
      clr[i] = adagrad_clr(sc.lr, sc.lr_is_float, s.lr_decay, increment_step(s.steps[i]));
    const double weight_decay = s.weight_decay, eps = s.eps;
    const bool maximize = s.maximize;
    const ParamStore store(s);
    for_each_chunk(s.params, [&](auto* tag, const Chunk& ch) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using opmath_t = at::opmath_type<T>;
      T* p = ptr<T>(s.params, ch.tensor);
      const uint32_t key = store.key(ch.tensor);
      T* g = ptr<T>(s.grads, ch.tensor);
      T* sum = ptr<T>(s.sums, ch.tensor);
      const opmath_t c = clr[ch.tensor];
      for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
        using W = decltype(w);
        W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
        const W pj = ld<W>(p + j);
        if (weight_decay != 0) gj = gj + W(opmath_t(weight_decay)) * pj;
        const W sj = stored(sum + j, ld<W>(sum + j) + gj * gj);
        store(p, key, j, pj - W(c) * gj / (sqrt_(sj) + W(opmath_t(eps))));
      });
    });
  }

  static void rmsprop(const RmspropStep& s) {
    if (skip_step(s)) return;
    const StepScalars sc = step_scalars(s);
    for (const at::Tensor& step : s.steps) increment_step(step);
    const double lr = sc.lr, weight_decay = s.weight_decay, eps = s.eps, momentum = s.momentum;
    const bool centered = s.centered, maximize = s.maximize;
    const ParamStore store(s);
    for_each_chunk(s.params, [&](auto* tag, const Chunk& ch) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using opmath_t = at::opmath_type<T>;
      T* p = ptr<T>(s.params, ch.tensor);
      const uint32_t key = store.key(ch.tensor);
      T* g = ptr<T>(s.grads, ch.tensor);
      T* sq = ptr<T>(s.square_avgs, ch.tensor);
      T* ga = centered ? ptr<T>(s.grad_avgs, ch.tensor) : nullptr;
      T* m = momentum > 0 ? ptr<T>(s.momentum_buffers, ch.tensor) : nullptr;
      const opmath_t alpha = s.alpha;
      for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
        using W = decltype(w);
        W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
        const W pj = ld<W>(p + j);
        if (weight_decay != 0) gj = gj + W(opmath_t(weight_decay)) * pj;
        const W sqj = stored(sq + j, ld<W>(sq + j) * W(alpha) + W(1 - alpha) * gj * gj);
        W avg;
        if (centered) {
          const W ga0 = ld<W>(ga + j);
          const W gaj = stored(ga + j, ga0 + W(1 - alpha) * (gj - ga0));  // lerp
          avg = sqrt_(sqj - gaj * gaj) + W(opmath_t(eps));
        } else {
          avg = sqrt_(sqj) + W(opmath_t(eps));
        }
        if (momentum > 0) {
          const W mj = stored(m + j, ld<W>(m + j) * W(opmath_t(momentum)) + gj / avg);
          store(p, key, j, pj - W(opmath_t(lr)) * mj);
        } else {
          store(p, key, j, pj - W(opmath_t(lr)) * gj / avg);
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_OPTIM(m, ::pyops::Cpu, ""); }

}  // namespace pyops
