// The batch_norm family above the kernels: the public op pyops::batch_norm (picks the backend, computes
// the statistics, updates the running ones, normalizes) and its derivative, written once as a C++
// autograd node over the primitives of either backend. Math: pyops/ops/batch_norm.py's docstring.
// The statistics enter the function as inputs; its backward is the full derivative through them
// (one reduction pass, one elementwise pass), so they need no derivative of their own.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/relu.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>

#include "batch_norm.h"
#include "common/backend.h"
#include "common/checks.h"
#include "common/node.h"
#include "common/prim.h"

namespace pyops {
namespace {

using at::Tensor;
using Opt = std::optional<Tensor>;

// The primitives of each backend, looked up once.

using Pair = std::tuple<Tensor, Tensor>;
using Triple = std::tuple<Tensor, Tensor, Tensor>;
const Prim<Pair(const Tensor&)> bn_stats("pyops::batch_norm_stats", "pyops::batch_norm_stats_triton");
const Prim<Tensor(const Tensor&, const Tensor&, const Tensor&, const Opt&, const Opt&, const Opt&, c10::string_view,
                  double)>
    bn_elemt("pyops::batch_norm_elemt", "pyops::batch_norm_elemt_triton");
const Prim<Triple(const Tensor&, const Opt&, const Opt&, const Opt&, const Tensor&, const Tensor&, const Opt&,
                  const Opt&, c10::string_view, double, bool)>
    bn_bwd_reduce("pyops::batch_norm_bwd_reduce", "pyops::batch_norm_bwd_reduce_triton");
const Prim<Tensor(const Tensor&, const Opt&, const Opt&, const Opt&, const Tensor&, const Tensor&, const Opt&,
                  const Opt&, const Opt&, const Opt&, c10::string_view, double)>
    bn_bwd_elemt("pyops::batch_norm_bwd_elemt", "pyops::batch_norm_bwd_elemt_triton");
using Quad = std::tuple<Tensor, Tensor, Tensor, Tensor>;
const Prim<Quad(const Tensor&, const Opt&, const Opt&, const Opt&, const Tensor&, const Tensor&, const Opt&, const Opt&,
                c10::string_view, double, bool)>
    bn_bwd("pyops::batch_norm_bwd", "pyops::batch_norm_bwd_triton");

Opt opt(const Tensor& t) { return t.defined() ? Opt(t) : std::nullopt; }

// t in dtype `type`: t itself when it already is (no dispatcher round trip on the per-call path).
Tensor as_type(const Tensor& t, at::ScalarType type) { return t.scalar_type() == type ? t : t.to(type); }

// t / (elements per channel of ref), symbolic sizes included (no guard on them).
Tensor per_count(const Tensor& t, const Tensor& ref) {
  const c10::SymInt count = bn_count(ref);
  if (const auto n = count.maybe_as_int()) return t / double(*n);
  return t / at::Scalar(c10::SymFloat(count));
}

// ---- the derivative ---------------------------------------------------------------------------------
// out = act((x - mean) * invstd * w + b + r) with (mean, invstd) the batch's statistics (training) or
// the running ones. Saves x (and the output when act is not the identity), or only the output (and r)
// in the memory-efficient form. A hand-written node (csrc/common/node.h); its edges are x, weight,
// bias, residual (an absent one has none).
template <Backend B>
struct BatchNormBackward : Node {
  SavedVariable x_, out_, residual_, mean_, invstd_, weight_, bias_;
  bool training_ = false;
  BnAct act_ = BnAct::kNone;
  double param_ = 0;

  variable_list apply(variable_list&& grads) override {
    const Tensor x = x_.unpack(), out = out_.unpack(getptr()), residual = residual_.unpack(), mean = mean_.unpack(),
                 invstd = invstd_.unpack(), weight = weight_.unpack(), bias = bias_.unpack();
    const Tensor& g = grads[0];
    variable_list result(4);
    if (!g.defined()) return result;
    TORCH_CHECK(!(at::GradMode::is_enabled() && g.requires_grad()), "pyops.batch_norm: double backward ",
                "(create_graph=True) is not supported");
    const c10::string_view name = bn_act_name(act_);
    const bool need_x = should_compute_output(0), need_w = should_compute_output(1), need_b = should_compute_output(2),
               need_r = should_compute_output(3);
    at::AutoDispatchBelowADInplaceOrView below;
    // with the identity, dr = dz = g itself
    const bool kernel_r = need_r && act_ != BnAct::kNone;
    if (need_r && !kernel_r) result[3] = g;
    if (!(need_w || need_b || kernel_r || (need_x && training_))) {
      if (need_x)
        result[0] = bn_bwd_elemt[B].call(g, opt(x), opt(out), opt(residual), mean, invstd, opt(weight), opt(bias),
                                         std::nullopt, std::nullopt, name, param_);
      return result;
    }
    if (training_ && need_x) {  // both passes in one primitive (a device may fuse them)
      auto [gi, sum_dz, sum_dz_xhat, dr] = bn_bwd[B].call(g, opt(x), opt(out), opt(residual), mean, invstd, opt(weight),
                                                          opt(bias), name, param_, kernel_r);
      result[0] = gi;
      if (kernel_r) result[3] = dr;
      if (need_w) result[1] = as_type(sum_dz_xhat, weight.scalar_type());
      if (need_b) result[2] = as_type(sum_dz, bias.scalar_type());
      return result;
    }
    auto [sum_dz, sum_dz_xhat, dr] = bn_bwd_reduce[B].call(g, opt(x), opt(out), opt(residual), mean, invstd,
                                                           opt(weight), opt(bias), name, param_, kernel_r);
    if (kernel_r) result[3] = dr;
    if (need_w) result[1] = as_type(sum_dz_xhat, weight.scalar_type());
    if (need_b) result[2] = as_type(sum_dz, bias.scalar_type());
    if (need_x) {
      const Tensor& ref = x.defined() ? x : out;
      result[0] = training_
                      ? bn_bwd_elemt[B].call(g, opt(x), opt(out), opt(residual), mean, invstd, opt(weight), opt(bias),
                                             per_count(sum_dz, ref), per_count(sum_dz_xhat, ref), name, param_)
                      : bn_bwd_elemt[B].call(g, opt(x), opt(out), opt(residual), mean, invstd, opt(weight), opt(bias),
                                             std::nullopt, std::nullopt, name, param_);
    }
    return result;
  }
  std::string name() const override { return "pyops::BatchNormBackward"; }
  void release_variables() override {
    for (SavedVariable* v : {&x_, &out_, &residual_, &mean_, &invstd_, &weight_, &bias_}) v->reset_data();
  }
};

// The forward, recorded: out gets a BatchNormBackward node.
template <Backend B>
Tensor batch_norm_recorded(const Tensor& x, const Opt& weight, const Opt& bias, const Opt& residual, const Tensor& mean,
                           const Tensor& invstd, bool training, c10::string_view activation, double param,
                           bool memory_efficient) {
  Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = bn_elemt[B].call(x, mean, invstd, weight, bias, residual, activation, param);
  }
  auto node = make_node<BatchNormBackward<B>>();
  record(node, out, x, weight, bias, residual);
  const BnAct act = parse_bn_act("batch_norm", activation);
  node->training_ = training;
  node->act_ = act;
  node->param_ = param;
  const auto save = [](SavedVariable& slot, const Opt& t) {
    if (t.has_value() && t->defined()) slot = SavedVariable(*t, /*is_output=*/false);
  };
  if (memory_efficient) {
    node->out_ = SavedVariable(out, /*is_output=*/true);
    save(node->residual_, residual);
  } else {
    node->x_ = SavedVariable(x, /*is_output=*/false);
    if (act != BnAct::kNone) node->out_ = SavedVariable(out, /*is_output=*/true);
  }
  node->mean_ = SavedVariable(mean, /*is_output=*/false);
  node->invstd_ = SavedVariable(invstd, /*is_output=*/false);
  save(node->weight_, weight);
  save(node->bias_, bias);
  return out;
}

// ---- the Autograd kernels of the primitives: none is differentiable on its own (the statistics and
// the passes are differentiated together by BatchNormBackward); they run below autograd ----------------------
template <Backend B>
struct Kernels {
  static Pair stats(const Tensor& x) { PYOPS_BELOW_AUTOGRAD(bn_stats[B].call(x)); }
  static Tensor elemt(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Opt& w, const Opt& b,
                      const Opt& r, c10::string_view act, double param) {
    PYOPS_BELOW_AUTOGRAD(bn_elemt[B].call(x, mean, invstd, w, b, r, act, param));
  }
  static Triple bwd_reduce(const Tensor& g, const Opt& x, const Opt& y, const Opt& r, const Tensor& mean,
                           const Tensor& invstd, const Opt& w, const Opt& b, c10::string_view act, double param,
                           bool grad_residual) {
    PYOPS_BELOW_AUTOGRAD(bn_bwd_reduce[B].call(g, x, y, r, mean, invstd, w, b, act, param, grad_residual));
  }
  static Quad bwd(const Tensor& g, const Opt& x, const Opt& y, const Opt& r, const Tensor& mean, const Tensor& invstd,
                  const Opt& w, const Opt& b, c10::string_view act, double param, bool grad_residual) {
    PYOPS_BELOW_AUTOGRAD(bn_bwd[B].call(g, x, y, r, mean, invstd, w, b, act, param, grad_residual));
  }
  static Tensor bwd_elemt(const Tensor& g, const Opt& x, const Opt& y, const Opt& r, const Tensor& mean,
                          const Tensor& invstd, const Opt& w, const Opt& b, const Opt& mdz, const Opt& mdx,
                          c10::string_view act, double param) {
    PYOPS_BELOW_AUTOGRAD(bn_bwd_elemt[B].call(g, x, y, r, mean, invstd, w, b, mdz, mdx, act, param));
  }
};

#define PYOPS_REGISTER_BATCH_NORM_AUTOGRAD(m, B, SUFFIX)    \
  do {                                                      \
    using K = Kernels<B>;                                   \
    m.impl("batch_norm_stats" SUFFIX, &K::stats);           \
    m.impl("batch_norm_elemt" SUFFIX, &K::elemt);           \
    m.impl("batch_norm_bwd_reduce" SUFFIX, &K::bwd_reduce); \
    m.impl("batch_norm_bwd_elemt" SUFFIX, &K::bwd_elemt);   \
    m.impl("batch_norm_bwd" SUFFIX, &K::bwd);               \
  } while (0)

// ---- the running-average step: r = (1 - momentum) r + momentum s, for the mean and the (unbiased) variance,
// one op (pyops::batch_norm_running_update) of ATen calls, as torch's batch norm kernels update them ---------
// r += -momentum r, then r += momentum s: add_ takes its factor as is, where mul_(scalar) first wraps it in
// a tensor and converts that (four dispatcher calls, not one, on this per-call path).
void running_update(Tensor& rm, Tensor& rv, const Tensor& mean, const Tensor& var, double momentum, double var_factor) {
  rm.add_(rm, -momentum).add_(mean, momentum);
  rv.add_(rv, -momentum).add_(var, momentum * var_factor);
}

const c10::TypedOperatorHandle<void(Tensor&, Tensor&, const Tensor&, const Tensor&, double, double)>&
running_update_op() {
  static const auto handle = c10::Dispatcher::singleton()
                                 .findSchemaOrThrow("pyops::batch_norm_running_update", "")
                                 .typed<void(Tensor&, Tensor&, const Tensor&, const Tensor&, double, double)>();
  return handle;
}

// ---- the public op --------------------------------------------------------------------------------------
bool wants_grad(const Opt& t) { return t.has_value() && t->defined() && t->requires_grad(); }

Tensor apply_activation(const Tensor& y, BnAct act, double param) {
  switch (act) {
    case BnAct::kRelu:
      return at::relu(y);
    case BnAct::kLeakyRelu:
      return at::leaky_relu(y, param);
    case BnAct::kElu:
      return at::elu(y, param);
    default:
      return y;
  }
}

Tensor batch_norm(const Tensor& input, const Opt& running_mean, const Opt& running_var, const Opt& weight,
                  const Opt& bias, bool training, double momentum, double eps,
                  std::optional<c10::string_view> activation, double negative_slope, double alpha, const Opt& residual,
                  bool memory_efficient) {
  const BnAct act = activation.has_value() ? parse_bn_act("batch_norm", *activation) : BnAct::kNone;
  const double param = act == BnAct::kLeakyRelu ? negative_slope : act == BnAct::kElu ? alpha : 0.0;
  TORCH_CHECK_VALUE(!memory_efficient || bn_act_invertible(act, param), "pyops.batch_norm: memory_efficient=True ",
                    "needs an invertible activation (none, leaky_relu with negative_slope > 0, elu with alpha > 0), ",
                    "got ", bn_act_name(act), act == BnAct::kNone || act == BnAct::kRelu ? "" : " with parameter ",
                    act == BnAct::kRelu ? std::string(": relu's output cannot be inverted")
                                        : (act == BnAct::kNone ? std::string() : std::to_string(param)));
  for (const auto& [name, t] : {std::pair<const char*, const Opt&>{"running_mean", running_mean},
                                {"running_var", running_var},
                                {"weight", weight},
                                {"bias", bias},
                                {"residual", residual}})
    check_operand_device("batch_norm", name, t, input);
  TORCH_CHECK_VALUE(!residual.has_value() || !residual->defined() || residual->sym_sizes() == input.sym_sizes(),
                    "pyops.batch_norm: residual must have the input's shape ", input.sym_sizes(), ", got ",
                    residual.has_value() && residual->defined() ? residual->sym_sizes() : input.sym_sizes());
  TORCH_CHECK(!input._fw_grad(/*level=*/0).defined(),
              "pyops.batch_norm: forward-mode AD (dual tensors, torch.func.jvp) is not supported");
  // fewer than 2 dimensions (no channel dimension): torch's batch norm decides (it takes an empty 1-d input)
  const Backend b = input.dim() < 2 ? Backend::kTorch : resolve("batch_norm", input, auto_min_numel::batch_norm);
  const Tensor rm = running_mean.value_or(Tensor()), rv = running_var.value_or(Tensor());
  if (b == Backend::kTorch) {
    Tensor y = at::batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, true);
    if (residual.has_value() && residual->defined()) y = y + *residual;
    return apply_activation(y, act, param);
  }
  const c10::SymInt count = bn_count(input);
  const auto known = count.maybe_as_int();
  if (training)
    TORCH_CHECK_VALUE(!known || *known != 1, "pyops.batch_norm: expected more than 1 value per channel when ",
                      "training, got input size ", input.sym_sizes());
  Tensor mean, invstd;
  if (training) {
    Tensor var;
    std::tie(mean, var) = bn_stats[b].call(input);
    invstd = (var + eps).rsqrt();
    if (rm.defined() && (!known || *known > 0)) {
      at::NoGradGuard no_grad;
      Tensor m = rm, v = rv;  // (the buffers themselves, written in place)
      // the variance enters unbiased: var * n / (n - 1)
      if (known) {
        running_update_op().call(m, v, mean, var, momentum, double(*known) / double(*known - 1));
      } else {
        const Tensor unbiased = var * at::Scalar(c10::SymFloat(count) / c10::SymFloat(count - 1));
        running_update_op().call(m, v, mean, unbiased, momentum, 1.0);
      }
    }
  } else {
    TORCH_CHECK(rm.defined() && rv.defined(), "pyops.batch_norm: running_mean and running_var must be defined in ",
                "evaluation mode (training=False)");
    const auto opmath = bn_opmath(input.scalar_type());
    mean = as_type(rm, opmath);
    invstd = (as_type(rv, opmath) + eps).rsqrt();
  }
  // act' is read from the output; where it cannot be, the activation follows as its own op
  const bool fused = bn_act_from_output(act, param);
  const c10::string_view kernel_act = bn_act_name(fused ? act : BnAct::kNone);
  Tensor out;
  if (at::GradMode::is_enabled() &&
      (input.requires_grad() || wants_grad(weight) || wants_grad(bias) || wants_grad(residual))) {
    out = b == Backend::kTriton ? batch_norm_recorded<Backend::kTriton>(input, weight, bias, residual, mean, invstd,
                                                                        training, kernel_act, param, memory_efficient)
                                : batch_norm_recorded<Backend::kNative>(input, weight, bias, residual, mean, invstd,
                                                                        training, kernel_act, param, memory_efficient);
  } else {
    out = bn_elemt[b].call(input, mean, invstd, weight, bias, residual, kernel_act, param);
  }
  return fused ? out : apply_activation(out, act, param);
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  PYOPS_REGISTER_BATCH_NORM_AUTOGRAD(m, Backend::kNative, "");
  PYOPS_REGISTER_BATCH_NORM_AUTOGRAD(m, Backend::kTriton, "_triton");
}

TORCH_LIBRARY_IMPL(pyops, CompositeImplicitAutograd, m) { m.impl("batch_norm", &batch_norm); }

TORCH_LIBRARY_IMPL(pyops, CompositeExplicitAutograd, m) { m.impl("batch_norm_running_update", &running_update); }

}  // namespace pyops
