// The optim family's host side, written once for every device: argument checks, version counters,
// the per-step scalar formulas (torch's rounding) and the list of ops each device registers.
// One call updates every tensor of a parameter group in place (see csrc/primitives.h for the lists).
// A device D (csrc/cpu/optim.cpp, csrc/cuda/optim.cu, csrc/triton/optim.cpp) supplies:
//   D::Guard(tensor)                          device guard (a no-op on CPU)
//   D::sgd(const SgdStep&), D::adam(const AdamStep&), D::adagrad(const AdagradStep&),
//   D::rmsprop(const RmspropStep&)            the update, on checked, non-empty lists
//   D::adam_8bit(const Adam8bitStep&)         optional: the 8-bit state Adam (PYOPS_REGISTER_OPTIM_8BIT)
//   D::kBf16AdamStates                        optional, true: D::adam takes bfloat16 state for float32 params
// The device reads lr, grad_scale and found_inf where they live (no host read on a GPU), skips
// everything when found_inf != 0, and otherwise advances the step counts and clears the SGD
// new-buffer flags it applied. A device that rounds bfloat16 parameters stochastically
// (bf16_stochastic_round, csrc/common/stochastic_round.h) says so with
// `static constexpr bool kStochasticRound = true` (every device does today); a device without it
// refuses the flag for bfloat16 groups.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <initializer_list>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/checks.h"

namespace pyops {

// What every step reads besides its own state: the group's parameters and gradients, the learning
// rate (a one-element float32 or float64 tensor on the parameters' device) and the grad scaler's
// tensors (one-element float32 or float64, or absent).
struct GroupStep {
  at::TensorList params, grads;
  at::Tensor lr;
  bool maximize = false;
  std::optional<at::Tensor> grad_scale, found_inf;
  // bfloat16 parameters: the final store rounds stochastically, from random bits hashed from
  // (seed, tensor index, element index) (csrc/common/stochastic_round.h); set only for bfloat16.
  bool stochastic_round = false;
  int64_t seed = 0;
};

struct SgdStep : GroupStep {
  at::TensorList momentum_buffers, new_buffers;
  double momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false;
};

struct AdamStep : GroupStep {
  at::TensorList exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps;
  double beta1 = 0, beta2 = 0, weight_decay = 0, eps = 0;
  bool amsgrad = false, decoupled = false;
};

// Adam/AdamW with 8-bit blockwise states (pyops::adam_step_8bit_): per parameter, exp_avg and exp_avg_sq
// as uint8 codes (the parameter's shape and layout) into a 256-entry float32 map (signed for exp_avg,
// unsigned for exp_avg_sq), and one float32 absmax per block of kQuantBlock elements in memory order:
// state = map[code] * absmax. The step dequantizes, applies the float32 Adam update, and requantizes
// each block against its new absmax (code = the number of the map's float32 midpoints below
// state / absmax: the nearest map value, ties to the lower one).
constexpr int64_t kQuantBlock = 256;    // bitsandbytes' blockwise optimizers and torchao's AdamW8bit
constexpr int64_t kQuantMapSize = 256;  // every uint8 code
struct Adam8bitStep : GroupStep {
  at::TensorList exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs, steps;
  at::Tensor qmap_signed, qmap_unsigned;
  int64_t block_size = kQuantBlock;
  double beta1 = 0, beta2 = 0, weight_decay = 0, eps = 0;
  bool decoupled = false;
};
inline int64_t quant_blocks(int64_t numel) { return (numel + kQuantBlock - 1) / kQuantBlock; }
// A map in host memory holds finite values sorted ascending (the binary searches assume it); a device
// whose maps live on a GPU does not read them on the host (no synchronisation): unsorted maps give other
// codes there, never an access out of bounds.
inline void check_quant_map_on_host(const at::Tensor& map, const char* name) {
  const float* values = map.const_data_ptr<float>();
  for (int64_t c = 0; c < kQuantMapSize; ++c)
    TORCH_CHECK(std::isfinite(values[c]) && (c == 0 || values[c - 1] <= values[c]), "pyops::adam_step_8bit_: ", name,
                " must hold finite values sorted ascending, got ", values[c], " at ", c,
                c > 0 ? c10::str(" after ", values[c - 1]) : std::string());
}

// Whether device D's adam kernel takes bfloat16 state (exp_avg, exp_avg_sq, max_exp_avg_sq) for float32
// parameters (D::kBf16AdamStates = true; csrc/cpu/optim.cpp). Other devices refuse it in adam_step_'s checks.
template <class D, class = void>
struct takes_bf16_adam_states : std::false_type {};
template <class D>
struct takes_bf16_adam_states<D, std::void_t<decltype(D::kBf16AdamStates)>> : std::bool_constant<D::kBf16AdamStates> {};

struct AdagradStep : GroupStep {
  at::TensorList sums, steps;
  double lr_decay = 0, weight_decay = 0, eps = 0;
};

struct RmspropStep : GroupStep {
  at::TensorList square_avgs, grad_avgs, momentum_buffers, steps;
  double alpha = 0, eps = 0, weight_decay = 0, momentum = 0;
  bool centered = false;
};

// ---- per-step scalars, as torch computes them: with a tensor lr, torch computes lr / bias
// correction and 1 - lr * wd in the tensor's dtype, so a float32 lr rounds them to float32; each
// product is rounded before the sum, as torch's separate ops (and Python's float arithmetic) do,
// never fused into one multiply-add (which GCC with -mfma and nvcc would otherwise emit) ------------
template <typename T>
C10_HOST_DEVICE inline T mul_rounded(T a, T b) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fmul_rn(a, b);
  } else {
    return __dmul_rn(a, b);
  }
#else
  volatile T product = a * b;  // a store forces the rounding; these run once per tensor and step
  return product;
#endif
}
C10_HOST_DEVICE inline double adam_step_size(double lr, bool lr_is_float, double beta1, double step) {
  const double bias_correction1 = 1 - ::pow(beta1, step);
  return lr_is_float ? double(float(lr) / float(bias_correction1)) : lr / bias_correction1;
}
C10_HOST_DEVICE inline double adam_inv_bias_correction2_sqrt(double beta2, double step) {
  return 1 / ::sqrt(1 - ::pow(beta2, step));
}
C10_HOST_DEVICE inline double decoupled_decay(double lr, bool lr_is_float, double weight_decay) {
  return lr_is_float ? double(1.0f - mul_rounded(float(lr), float(weight_decay))) : 1 - mul_rounded(lr, weight_decay);
}
C10_HOST_DEVICE inline double adagrad_clr(double lr, bool lr_is_float, double lr_decay, double step) {
  const double denominator = 1 + mul_rounded(step - 1, lr_decay);
  return lr_is_float ? double(float(lr) / float(denominator)) : lr / denominator;
}

// ---- checks ---------------------------------------------------------------------------------------

// A state (or gradient) list of a step: empty where no option needs it; `needed_by` names the option
// that makes it required (nullptr: always required).
struct StateList {
  const char* name;
  at::TensorList list;
  bool required;
  const char* needed_by = nullptr;
  // A dtype the state may have besides its parameter's, where the parameter is float32 (Adam's
  // bfloat16 states on a device that takes them); Undefined: none.
  at::ScalarType also = at::ScalarType::Undefined;
};

// Two tensors of one shape walk memory alike when their strides agree on every dimension of size
// above one (a size-1 dimension's stride is never used).
inline bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  if (a.sizes() != b.sizes()) return false;
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

inline bool is_step_dtype(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }

// A one-element float32/float64 tensor on `device` (lr, grad_scale, found_inf).
inline void check_scalar_tensor(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.defined() && t.numel() == 1 && is_step_dtype(t.scalar_type()) && t.device() == device, "pyops::", op,
              ": ", name, " must be a one-element float32 or float64 tensor on ", device, ", got ",
              t.defined() ? c10::toString(t.scalar_type()) : "an undefined tensor", " with ",
              t.defined() ? t.numel() : 0, " elements on ", t.defined() ? t.device() : device);
}

// Why one call cannot step the group as given, or "" when it can: parameters dense, floating and of one
// device and dtype; every gradient and state tensor of its parameter's device, dtype, shape and memory
// layout (the kernels walk memory in order); steps one-element float32/float64 tensors on the
// parameters' device. The optimizers ask first (fused_step_fits below) and take the careful per-tensor
// path where it is not ""; the primitive raises it. Lists have params' length (checked before).
inline std::string group_misfit(const char* op, at::TensorList params, at::TensorList grads,
                                c10::ArrayRef<StateList> states, at::TensorList steps) {
  const size_t n = params.size();
  if (n == 0) return {};
  const at::Tensor& p0 = params[0];
  if (!is_kernel_dtype(p0.scalar_type()))
    return c10::str("pyops::", op, ": params must be float64, float32, float16 or bfloat16, got ", p0.scalar_type());
  const at::Device device = p0.device();
  auto like_param = [&](const char* name, const at::Tensor& t, const at::Tensor& p, size_t i,
                        at::ScalarType also = at::ScalarType::Undefined) -> std::string {
    if (t.device() != device)
      return c10::str("pyops::", op, ": ", name, " is on ", t.device(), " but params is on ", device, " (tensor ", i,
                      ")");
    const bool also_ok = also != at::ScalarType::Undefined && p.scalar_type() == at::kFloat && t.scalar_type() == also;
    if (t.scalar_type() != p.scalar_type() && !also_ok)
      return c10::str("pyops::", op, ": ", name, " has dtype ", t.scalar_type(), " but params has dtype ",
                      p.scalar_type(), " (tensor ", i, ")");
    if (!same_layout(t, p))
      return c10::str("pyops::", op, ": ", name, "[", i, "] has shape ", t.sizes(), " and strides ", t.strides(),
                      " but params[", i, "] has shape ", p.sizes(), " and strides ", p.strides());
    return {};
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    if (p.device() != device || p.scalar_type() != p0.scalar_type())
      return c10::str("pyops::", op, ": params[", i, "] is ", p.scalar_type(), " on ", p.device(), " but params[0] is ",
                      p0.scalar_type(), " on ", device, " (one call takes one device and dtype)");
    if (!p.is_non_overlapping_and_dense())
      return c10::str("pyops::", op, ": params[", i,
                      "] is not dense (its elements must fill its memory without gaps or overlaps)");
    std::string why = like_param("grads", grads[i], p, i);
    for (const auto& s : states)
      if (why.empty() && !s.list.empty()) why = like_param(s.name, s.list[i], p, i, s.also);
    if (!why.empty()) return why;
    if (!steps.empty()) {
      const at::Tensor& s = steps[i];
      if (!(s.numel() == 1 && is_step_dtype(s.scalar_type()) && s.device() == device))
        return c10::str("pyops::", op, ": steps[", i, "] must be a one-element float32 or float64 tensor on ", device,
                        ", got ", s.scalar_type(), " with ", s.numel(), " elements on ", s.device());
    }
  }
  return {};
}

// Every list matches params in length (else a caller's bug: raised), the group fits one call
// (group_misfit), SGD's new-buffer flags are one-element bool/uint8 tensors on the parameters' device,
// and lr, grad_scale and found_inf one-element float32/float64 tensors there.
inline void check_group(const char* op, const GroupStep& g, std::initializer_list<StateList> states,
                        at::TensorList steps = {}, bool steps_required = false, at::TensorList flags = {}) {
  const at::TensorList params = g.params;
  const size_t n = params.size();
  auto check_length = [&](const char* name, at::TensorList list, bool required, const char* needed_by) {
    if (list.empty() && !required) return;
    if (list.empty() && n > 0) {
      TORCH_CHECK(false, "pyops::", op, ": ", name, " is empty but ", needed_by ? needed_by : "the step",
                  " needs one tensor per parameter (params has ", n, ")");
    }
    TORCH_CHECK(list.size() == n, "pyops::", op, ": ", name, " has ", list.size(), " tensors but params has ", n);
  };
  check_length("grads", g.grads, true, nullptr);
  for (const auto& s : states) check_length(s.name, s.list, s.required, s.needed_by);
  check_length("steps", steps, steps_required, nullptr);
  check_length("new_buffers", flags, false, nullptr);
  if (n == 0) return;
  const std::string why = group_misfit(op, params, g.grads, states, steps);
  TORCH_CHECK(why.empty(), why);
  const at::Device device = params[0].device();
  for (size_t i = 0; i < flags.size(); ++i) {
    const at::Tensor& f = flags[i];
    TORCH_CHECK(
        f.numel() == 1 && (f.scalar_type() == at::kBool || f.scalar_type() == at::kByte) && f.device() == device,
        "pyops::", op, ": new_buffers[", i, "] must be a one-element bool or uint8 tensor on ", device, ", got ",
        f.scalar_type(), " with ", f.numel(), " elements on ", f.device());
  }
  check_scalar_tensor(op, "lr", g.lr, device);
  if (g.grad_scale.has_value() && g.grad_scale->defined()) check_scalar_tensor(op, "grad_scale", *g.grad_scale, device);
  if (g.found_inf.has_value() && g.found_inf->defined()) check_scalar_tensor(op, "found_inf", *g.found_inf, device);
}

// Whether one call of an optimizer primitive steps the group as given: group_misfit, the primitive's
// first check, exported to Python as pyops._C._fused_step_fits (csrc/ops.cpp), which the optimizers ask
// before they call. `states` holds the state lists one after another, each of params' length (a tensor
// the step creates stands in as its parameter). Lists of another length are a caller's bug: raised.
inline bool fused_step_fits(at::TensorList params, at::TensorList grads, at::TensorList states, at::TensorList steps) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && (n == 0 || states.size() % n == 0) && (steps.empty() || steps.size() == n),
              "pyops._fused_step_fits: lists must have params' length (", n, "), got grads ", grads.size(), ", states ",
              states.size(), ", steps ", steps.size());
  if (n == 0) return true;
  std::vector<StateList> lists;
  for (size_t k = 0; k < states.size(); k += n) lists.push_back({"states", states.slice(k, n), true});
  return group_misfit("fused_step_fits", params, grads, lists, steps).empty();
}

// In-place writes bump version counters, as torch's optimizers' own in-place ops do, so that a
// backward that saved a parameter before the step raises instead of using the new value. Gradients
// are written only when the grad scaler's factor is applied.
inline void bump_versions(std::initializer_list<at::TensorList> lists) {
  for (at::TensorList list : lists)
    for (const at::Tensor& t : list) t.unsafeGetTensorImpl()->bump_version();
}
inline bool has(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

template <class D, class = void>
struct rounds_stochastically : std::false_type {};
template <class D>
struct rounds_stochastically<D, std::void_t<decltype(D::kStochasticRound)>>
    : std::integral_constant<bool, D::kStochasticRound> {};

template <class D>
struct Optim {
  using Tensor = at::Tensor;
  using TensorList = at::TensorList;
  using Opt = std::optional<at::Tensor>;

  static void set_group(GroupStep& g, TensorList params, TensorList grads, const Tensor& lr, bool maximize,
                        const Opt& grad_scale, const Opt& found_inf) {
    g.params = params;
    g.grads = grads;
    g.lr = lr;
    g.maximize = maximize;
    g.grad_scale = grad_scale;
    g.found_inf = found_inf;
  }

  // bf16_stochastic_round applies to bfloat16 parameters only (others round as they always do).
  static void set_rounding(const char* op, GroupStep& g, bool stochastic_round, int64_t seed) {
    g.stochastic_round = stochastic_round && !g.params.empty() && g.params[0].scalar_type() == at::kBFloat16;
    g.seed = seed;
    TORCH_CHECK(!g.stochastic_round || rounds_stochastically<D>::value, "pyops::", op,
                ": bf16_stochastic_round=True is not implemented on this backend (bfloat16 parameters on ",
                g.params[0].device(), "); use the native backend on the CPU, or master_weights=True");
  }

  static void sgd_step_(TensorList params, TensorList grads, TensorList momentum_buffers, const Tensor& lr,
                        double momentum, double dampening, double weight_decay, bool nesterov, bool maximize,
                        TensorList new_buffers, const Opt& grad_scale, const Opt& found_inf, bool bf16_stochastic_round,
                        int64_t seed) {
    SgdStep s;
    set_group(s, params, grads, lr, maximize, grad_scale, found_inf);
    s.momentum_buffers = momentum_buffers;
    s.new_buffers = new_buffers;
    s.momentum = momentum;
    s.dampening = dampening;
    s.weight_decay = weight_decay;
    s.nesterov = nesterov;
    check_group("sgd_step_", s, {{"momentum_buffers", momentum_buffers, momentum != 0, "momentum != 0"}}, {}, false,
                new_buffers);
    if (params.empty()) return;
    set_rounding("sgd_step_", s, bf16_stochastic_round, seed);
    typename D::Guard guard(params[0]);
    D::sgd(s);
    bump_versions(
        {params, momentum != 0 ? momentum_buffers : TensorList(), new_buffers, has(grad_scale) ? grads : TensorList()});
  }

  static void adam_step_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                         TensorList max_exp_avg_sqs, TensorList steps, const Tensor& lr, double beta1, double beta2,
                         double weight_decay, double eps, bool amsgrad, bool maximize, bool decoupled,
                         const Opt& grad_scale, const Opt& found_inf, bool bf16_stochastic_round, int64_t seed) {
    AdamStep s;
    set_group(s, params, grads, lr, maximize, grad_scale, found_inf);
    s.exp_avgs = exp_avgs;
    s.exp_avg_sqs = exp_avg_sqs;
    s.max_exp_avg_sqs = max_exp_avg_sqs;
    s.steps = steps;
    s.beta1 = beta1;
    s.beta2 = beta2;
    s.weight_decay = weight_decay;
    s.eps = eps;
    s.amsgrad = amsgrad;
    s.decoupled = decoupled;
    // bfloat16 state for float32 parameters where the device takes it (one dtype per parameter's state)
    const at::ScalarType also = takes_bf16_adam_states<D>::value ? at::kBFloat16 : at::ScalarType::Undefined;
    check_group("adam_step_", s,
                {{"exp_avgs", exp_avgs, true, nullptr, also},
                 {"exp_avg_sqs", exp_avg_sqs, true, nullptr, also},
                 {"max_exp_avg_sqs", max_exp_avg_sqs, amsgrad, "amsgrad", also}},
                steps, true);
    for (size_t i = 0; i < params.size(); ++i) {
      const at::ScalarType m = exp_avgs[i].scalar_type();
      TORCH_CHECK(exp_avg_sqs[i].scalar_type() == m && (!amsgrad || max_exp_avg_sqs[i].scalar_type() == m),
                  "pyops::adam_step_: a parameter's states must share one dtype, got exp_avgs[", i, "] ", m,
                  " and exp_avg_sqs[", i, "] ", exp_avg_sqs[i].scalar_type());
    }
    if (params.empty()) return;
    set_rounding("adam_step_", s, bf16_stochastic_round, seed);
    typename D::Guard guard(params[0]);
    D::adam(s);
    bump_versions({params, exp_avgs, exp_avg_sqs, amsgrad ? max_exp_avg_sqs : TensorList(), steps,
                   has(grad_scale) ? grads : TensorList()});
  }

  static void adam_step_8bit_(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs,
                              TensorList exp_avg_absmaxs, TensorList exp_avg_sq_absmaxs, TensorList steps,
                              const Tensor& qmap_signed, const Tensor& qmap_unsigned, int64_t block_size,
                              const Tensor& lr, double beta1, double beta2, double weight_decay, double eps,
                              bool maximize, bool decoupled, const Opt& grad_scale, const Opt& found_inf) {
    constexpr const char* op = "adam_step_8bit_";
    Adam8bitStep s;
    set_group(s, params, grads, lr, maximize, grad_scale, found_inf);
    s.exp_avgs = exp_avgs;
    s.exp_avg_sqs = exp_avg_sqs;
    s.exp_avg_absmaxs = exp_avg_absmaxs;
    s.exp_avg_sq_absmaxs = exp_avg_sq_absmaxs;
    s.steps = steps;
    s.qmap_signed = qmap_signed;
    s.qmap_unsigned = qmap_unsigned;
    s.block_size = block_size;
    s.beta1 = beta1;
    s.beta2 = beta2;
    s.weight_decay = weight_decay;
    s.eps = eps;
    s.decoupled = decoupled;
    const size_t n = params.size();
    for (const auto& [name, list] : {std::pair<const char*, TensorList>{"exp_avgs", exp_avgs},
                                     {"exp_avg_sqs", exp_avg_sqs},
                                     {"exp_avg_absmaxs", exp_avg_absmaxs},
                                     {"exp_avg_sq_absmaxs", exp_avg_sq_absmaxs}})
      TORCH_CHECK(list.size() == n, "pyops::", op, ": ", name, " has ", list.size(), " tensors but params has ", n);
    TORCH_CHECK(block_size == kQuantBlock, "pyops::", op, ": block_size must be ", kQuantBlock,
                " (the block the kernels quantize, one float32 absmax each), got ", block_size);
    check_group(op, s, {}, steps, true);  // params, grads, steps, lr and the grad scaler's tensors
    if (n == 0) return;
    const at::Device device = params[0].device();
    for (const auto& [name, map] :
         {std::pair<const char*, const Tensor&>{"qmap_signed", qmap_signed}, {"qmap_unsigned", qmap_unsigned}})
      TORCH_CHECK(map.scalar_type() == at::kFloat && map.dim() == 1 && map.numel() == kQuantMapSize &&
                      map.is_contiguous() && map.device() == device,
                  "pyops::", op, ": ", name, " must be a contiguous 1-d float32 tensor of ", kQuantMapSize,
                  " sorted values on ", device, ", got ", map.scalar_type(), " of shape ", map.sizes(), " on ",
                  map.device());
    for (size_t i = 0; i < n; ++i) {
      const Tensor& p = params[i];
      for (const auto& [name, codes] :
           {std::pair<const char*, const Tensor&>{"exp_avgs", exp_avgs[i]}, {"exp_avg_sqs", exp_avg_sqs[i]}})
        TORCH_CHECK(codes.scalar_type() == at::kByte && codes.device() == device && same_layout(codes, p),
                    "pyops::", op, ": ", name, "[", i, "] must be uint8 codes of params[", i, "]'s shape ", p.sizes(),
                    " and strides ", p.strides(), " on ", device, ", got ", codes.scalar_type(), " of shape ",
                    codes.sizes(), " and strides ", codes.strides(), " on ", codes.device());
      const int64_t blocks = quant_blocks(p.numel());
      for (const auto& [name, absmax] : {std::pair<const char*, const Tensor&>{"exp_avg_absmaxs", exp_avg_absmaxs[i]},
                                         {"exp_avg_sq_absmaxs", exp_avg_sq_absmaxs[i]}})
        TORCH_CHECK(absmax.scalar_type() == at::kFloat && absmax.dim() == 1 && absmax.numel() == blocks &&
                        absmax.is_contiguous() && absmax.device() == device,
                    "pyops::", op, ": ", name, "[", i, "] must be a contiguous 1-d float32 tensor of ", blocks,
                    " elements (one per block of ", kQuantBlock, " of params[", i, "]'s ", p.numel(), ") on ", device,
                    ", got ", absmax.scalar_type(), " of shape ", absmax.sizes(), " on ", absmax.device());
    }
    typename D::Guard guard(params[0]);
    D::adam_8bit(s);
    bump_versions({params, exp_avgs, exp_avg_sqs, exp_avg_absmaxs, exp_avg_sq_absmaxs, steps,
                   has(grad_scale) ? grads : TensorList()});
  }

  static void adagrad_step_(TensorList params, TensorList grads, TensorList sums, TensorList steps, const Tensor& lr,
                            double lr_decay, double weight_decay, double eps, bool maximize, const Opt& grad_scale,
                            const Opt& found_inf, bool bf16_stochastic_round, int64_t seed) {
    AdagradStep s;
    set_group(s, params, grads, lr, maximize, grad_scale, found_inf);
    s.sums = sums;
    s.steps = steps;
    s.lr_decay = lr_decay;
    s.weight_decay = weight_decay;
    s.eps = eps;
    check_group("adagrad_step_", s, {{"sums", sums, true}}, steps, true);
    if (params.empty()) return;
    set_rounding("adagrad_step_", s, bf16_stochastic_round, seed);
    typename D::Guard guard(params[0]);
    D::adagrad(s);
    bump_versions({params, sums, steps, has(grad_scale) ? grads : TensorList()});
  }

  static void rmsprop_step_(TensorList params, TensorList grads, TensorList square_avgs, TensorList grad_avgs,
                            TensorList momentum_buffers, TensorList steps, const Tensor& lr, double alpha, double eps,
                            double weight_decay, double momentum, bool centered, bool maximize, const Opt& grad_scale,
                            const Opt& found_inf, bool bf16_stochastic_round, int64_t seed) {
    RmspropStep s;
    set_group(s, params, grads, lr, maximize, grad_scale, found_inf);
    s.square_avgs = square_avgs;
    s.grad_avgs = grad_avgs;
    s.momentum_buffers = momentum_buffers;
    s.steps = steps;
    s.alpha = alpha;
    s.eps = eps;
    s.weight_decay = weight_decay;
    s.momentum = momentum;
    s.centered = centered;
    check_group("rmsprop_step_", s,
                {{"square_avgs", square_avgs, true},
                 {"grad_avgs", grad_avgs, centered, "centered"},
                 {"momentum_buffers", momentum_buffers, momentum > 0, "momentum > 0"}},
                steps, true);
    if (params.empty()) return;
    set_rounding("rmsprop_step_", s, bf16_stochastic_round, seed);
    typename D::Guard guard(params[0]);
    D::rmsprop(s);
    bump_versions({params, square_avgs, centered ? grad_avgs : TensorList(),
                   momentum > 0 ? momentum_buffers : TensorList(), steps, has(grad_scale) ? grads : TensorList()});
  }
};

}  // namespace pyops

// Every optim op of device D, registered inside TORCH_LIBRARY_IMPL(pyops, <key>, m) under the
// native names (SUFFIX "") or the Triton twins' (SUFFIX "_triton", the trailing "_" after it).
#define PYOPS_REGISTER_OPTIM(m, D, SUFFIX)                \
  do {                                                    \
    using O = ::pyops::Optim<D>;                          \
    m.impl("sgd_step" SUFFIX "_", &O::sgd_step_);         \
    m.impl("adam_step" SUFFIX "_", &O::adam_step_);       \
    m.impl("adagrad_step" SUFFIX "_", &O::adagrad_step_); \
    m.impl("rmsprop_step" SUFFIX "_", &O::rmsprop_step_); \
  } while (0)

// The 8-bit Adam primitive of a device D that supplies D::adam_8bit(const Adam8bitStep&) (for now the
// CPU's; a device without it has no kernel for pyops::adam_step_8bit_, and the optimizers take their
// torch-ops path there: pyops/optim/quantized.py).
#define PYOPS_REGISTER_OPTIM_8BIT(m, D, SUFFIX) m.impl("adam_step_8bit" SUFFIX "_", &::pyops::Optim<D>::adam_step_8bit_)
