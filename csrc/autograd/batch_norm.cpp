// The batch_norm family above the kernels: the public op pyops::batch_norm (picks the backend, computes
// the statistics, updates the running ones, normalizes) and its derivative, written once as a C++
// autograd node over the primitives of either backend. Math: pyops/ops/batch_norm.py's docstring.
// The statistics enter the function as inputs; its backward is the full derivative through them
// (one reduction pass, one elementwise pass), so they need no derivative of their own there. Every other
// derivative (the forward's tangent, the backward's own derivative, an outer torch.func level's view of
// the primitives) is built from differentiable ATen ops, only when asked for.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/batch_norm.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/elu_backward.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/leaky_relu_backward.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/var_mean.h>
#include <torch/library.h>

#include <array>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

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

// ---- the derivatives of every order, from differentiable ATen ops --------------------------------------
// What the first-order path never runs: the forward's tangent (forward mode), and the backward as a
// function of its inputs for the next order (create_graph=True) or its tangent. (mean, invstd) enter as
// values; their own derivatives, where they have any, come with them.
std::vector<int64_t> reduce_dims(const Tensor& x) {  // every dimension but the channels'
  std::vector<int64_t> dims{0};
  for (int64_t d = 2; d < x.dim(); ++d) dims.push_back(d);
  return dims;
}
c10::SymDimVector channel_shape(const Tensor& x) {  // a per-channel vector, broadcast against x
  c10::SymDimVector shape(x.dim(), 1);
  shape[1] = x.sym_size(1);
  return shape;
}
Tensor per_channel(const Tensor& t, const Tensor& x, at::ScalarType type) {
  return t.to(type).view_symint(channel_shape(x));
}
Tensor opt_value(const Opt& t) { return t.has_value() ? *t : Tensor(); }

// act applied to y, as torch's own ops (the activation unfused, or a differentiable composite).
Tensor apply_activation(const Tensor& y, Act act, double param) {
  switch (act) {
    case Act::kRelu:
      return at::relu(y);
    case Act::kLeakyRelu:
      return at::leaky_relu(y, param);
    case Act::kElu:
      return at::elu(y, param);
    default:
      return y;
  }
}

// The statistics as torch computes them: mean and biased variance per channel, op-math dtype.
std::tuple<Tensor, Tensor> stats_composite(const Tensor& x) {
  auto [var, mean] = at::var_mean(x.to(bn_opmath(x.scalar_type())), reduce_dims(x), /*correction=*/0,
                                  /*keepdim=*/false);
  return {mean, var};
}

// The tangents of the statistics: d mean = mean(dx), d var = 2 mean((x - mean) dx).
std::tuple<Tensor, Tensor> stats_tangent(const Tensor& xp, const Tensor& dx, const Tensor& mean) {
  const auto opmath = bn_opmath(xp.scalar_type());
  const auto dims = reduce_dims(xp);
  const Tensor d = dx.to(opmath);
  return {d.mean(dims), ((xp.to(opmath) - per_channel(mean, xp, opmath)) * d).mean(dims) * 2};
}

// z = (x - mean) invstd w + b + r, op-math dtype.
Tensor z_composite(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Tensor& w, const Tensor& b,
                   const Tensor& r) {
  const auto opmath = bn_opmath(x.scalar_type());
  Tensor z = (x.to(opmath) - per_channel(mean, x, opmath)) * per_channel(invstd, x, opmath);
  if (w.defined()) z = z * per_channel(w, x, opmath);
  if (b.defined()) z = z + per_channel(b, x, opmath);
  if (r.defined()) z = z + r.to(opmath);
  return z;
}

// The tangent of out = act(z): act'(z) dz with act' read from the output (as the backward kernels do,
// where the activation is fused) and dz from the tangents of x, w, b, r (their own) and of mean, invstd
// (given: their tangents, or those the statistics of x get from dx).
Tensor elemt_tangent(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Opt& weight, const Opt& bias,
                     const Opt& residual, const Tensor& dmean, const Tensor& dinvstd, Act act, double param,
                     const Tensor& out) {
  const auto opmath = bn_opmath(x.scalar_type());
  const Tensor xp = primal(x).to(opmath), m = per_channel(mean, x, opmath), is = per_channel(invstd, x, opmath);
  const Tensor dx = tangent(x), dw = tangent(weight), db = tangent(bias), dr = tangent(residual);
  Tensor dxhat;  // d((x - mean) invstd)
  if (dx.defined()) dxhat = dx.to(opmath) * is;
  if (dmean.defined()) dxhat = add_tangents(dxhat, -per_channel(dmean, x, opmath) * is);
  if (dinvstd.defined()) dxhat = add_tangents(dxhat, (xp - m) * per_channel(dinvstd, x, opmath));
  Tensor dz = dxhat;
  if (dz.defined() && weight.has_value() && weight->defined()) dz = dz * per_channel(primal(*weight), x, opmath);
  if (dw.defined()) dz = add_tangents(dz, (xp - m) * is * per_channel(dw, x, opmath));
  if (db.defined()) dz = add_tangents(dz, per_channel(db, x, opmath));
  if (dr.defined()) dz = add_tangents(dz, dr.to(opmath));
  if (!dz.defined()) return dz;
  dz = dz.expand_symint(x.sym_sizes()).to(out.scalar_type());
  switch (act) {
    case Act::kRelu:
      return at::threshold_backward(dz, out, 0);
    case Act::kLeakyRelu:
      return at::leaky_relu_backward(dz, out, param, /*self_is_result=*/true);
    case Act::kElu:
      return at::elu_backward(dz, param, 1, 1, /*is_result=*/true, out);
    default:
      return dz;
  }
}

// The gradients (dx, dw, db, dr) of out = act(z) given g, from differentiable ATen ops: in training the
// statistics recomputed from x (their derivatives are part of dx's), in evaluation the saved running ones;
// act' read from the saved output, whose own derivative is this node's (elu: act' depends on it).
variable_list backward_composite(const Tensor& g, const Tensor& x, const Tensor& out, const Tensor& weight,
                                 const Tensor& mean, const Tensor& invstd, bool training, double eps, Act act,
                                 double param, const std::array<bool, 4>& need, at::ScalarType bias_type,
                                 at::ScalarType residual_type) {
  const auto opmath = bn_opmath(x.scalar_type());
  const auto dims = reduce_dims(x);
  const Tensor xo = x.to(opmath);
  Tensor m, is;
  if (training) {
    auto [var, batch_mean] = at::var_mean(xo, dims, /*correction=*/0, /*keepdim=*/true);
    m = batch_mean;
    is = (var + eps).rsqrt();
  } else {
    m = per_channel(mean, x, opmath);
    is = per_channel(invstd, x, opmath);
  }
  const Tensor xhat = (xo - m) * is;
  const Tensor go = g.to(opmath);
  Tensor dz;
  switch (act) {
    case Act::kRelu:
      dz = at::threshold_backward(go, out.to(opmath), 0);
      break;
    case Act::kLeakyRelu:
      dz = at::leaky_relu_backward(go, out.to(opmath), param, /*self_is_result=*/true);
      break;
    case Act::kElu:
      dz = at::elu_backward(go, param, 1, 1, /*is_result=*/true, out.to(opmath));
      break;
    default:
      dz = go;
  }
  variable_list result(4);
  if (need[0]) {
    const Tensor scale = weight.defined() ? per_channel(weight, x, opmath) * is : is;
    result[0] = (training ? scale * (dz - dz.mean(dims, true) - xhat * (dz * xhat).mean(dims, true)) : scale * dz)
                    .to(x.scalar_type());
  }
  if (need[1]) result[1] = (dz * xhat).sum(dims).to(weight.scalar_type());
  if (need[2]) result[2] = dz.sum(dims).to(bias_type);
  if (need[3]) result[3] = dz.to(residual_type);
  return result;
}

// ---- the derivative ---------------------------------------------------------------------------------
// out = act((x - mean) * invstd * w + b + r) with (mean, invstd) the batch's statistics (training) or
// the running ones. Saves x (and the output when act is not the identity), or only the output (and r)
// in the memory-efficient form. A hand-written node (csrc/common/node.h); its edges are x, weight,
// bias, residual (an absent one has none). The first-order path runs the backward primitives; where
// the result must be differentiable itself (create_graph=True, torch.func, tangents) it is built from
// differentiable ATen ops instead (backward_composite), from the saved input.
template <Backend B>
struct BatchNormBackward : Node {
  SavedVariable x_, out_, residual_, mean_, invstd_, weight_, bias_;
  bool training_ = false;
  Act act_ = Act::kNone;
  double param_ = 0, eps_ = 0;
  at::ScalarType bias_type_ = at::kFloat, residual_type_ = at::kFloat;  // their gradients' dtypes

  variable_list apply(variable_list&& grads) override {
    const Tensor x = x_.unpack(), out = out_.unpack(getptr()), residual = residual_.unpack(), mean = mean_.unpack(),
                 invstd = invstd_.unpack(), weight = weight_.unpack(), bias = bias_.unpack();
    const Tensor& g = grads[0];
    variable_list result(4);
    if (!g.defined()) return result;
    const bool need_x = should_compute_output(0), need_w = should_compute_output(1), need_b = should_compute_output(2),
               need_r = should_compute_output(3);
    if (at::GradMode::is_enabled() || has_tangent(g, x, out, weight, bias)) {
      TORCH_CHECK(x.defined(), "pyops.batch_norm: memory_efficient=True saves the output, not the input, and ",
                  "its gradient cannot be differentiated again (create_graph=True, torch.func transforms, ",
                  "forward-mode AD through the backward); use memory_efficient=False");
      return backward_composite(g, x, out, weight, mean, invstd, training_, eps_, act_, param_,
                                {need_x, need_w, need_b, need_r}, bias_type_, residual_type_);
    }
    const c10::string_view name = act_name(act_);
    at::AutoDispatchBelowADInplaceOrView below;
    // with the identity, dr = dz = g itself
    const bool kernel_r = need_r && act_ != Act::kNone;
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

// The tangent of the public op's result (forward mode) at this level, its statistics (training) functions
// of x: where a graph is recorded too, recomputed from differentiable ops so that the tangent's own
// derivative (reverse over forward) reaches x through them.
Tensor forward_tangent(const Tensor& x, const Opt& weight, const Opt& bias, const Opt& residual, const Tensor& mean,
                       const Tensor& invstd, bool training, double eps, bool recorded, Act act, double param,
                       const Tensor& out) {
  Tensor m = mean, is = invstd, dmean, dinvstd;
  if (training) {
    const Tensor xp = primal(x);
    if (recorded) {
      std::tie(m, is) = stats_composite(xp);
      is = (is + eps).rsqrt();
    }
    const Tensor dx = tangent(x);
    if (dx.defined()) {
      Tensor dvar;
      std::tie(dmean, dvar) = stats_tangent(xp, dx, m);
      dinvstd = is * is * is * dvar * -0.5;  // d (var + eps)^(-1/2)
    }
  }
  return elemt_tangent(x, m, is, weight, bias, residual, dmean, dinvstd, act, param, out);
}

// The forward, recorded: out gets a BatchNormBackward node (and its tangent, before it is saved).
template <Backend B>
Tensor batch_norm_recorded(const Tensor& x, const Opt& weight, const Opt& bias, const Opt& residual, const Tensor& mean,
                           const Tensor& invstd, bool training, double eps, c10::string_view activation, double param,
                           bool memory_efficient, bool fw) {
  Tensor out;
  {
    at::AutoDispatchBelowADInplaceOrView below;
    out = bn_elemt[B].call(x, mean, invstd, weight, bias, residual, activation, param);
  }
  auto node = make_node<BatchNormBackward<B>>();
  record(node, out, x, weight, bias, residual);
  const Act act = parse_act("batch_norm", activation);
  node->training_ = training;
  node->act_ = act;
  node->param_ = param;
  node->eps_ = eps;
  if (bias.has_value() && bias->defined()) node->bias_type_ = bias->scalar_type();
  if (residual.has_value() && residual->defined()) node->residual_type_ = residual->scalar_type();
  if (fw)
    set_tangent(out, forward_tangent(x, weight, bias, residual, mean, invstd, training, eps, true, act, param, out));
  const auto save = [](SavedVariable& slot, const Opt& t) {
    if (t.has_value() && t->defined()) slot = SavedVariable(*t, /*is_output=*/false);
  };
  if (memory_efficient) {
    node->out_ = SavedVariable(out, /*is_output=*/true);
    save(node->residual_, residual);
  } else {
    node->x_ = SavedVariable(x, /*is_output=*/false);
    if (act != Act::kNone) node->out_ = SavedVariable(out, /*is_output=*/true);
  }
  node->mean_ = SavedVariable(mean, /*is_output=*/false);
  node->invstd_ = SavedVariable(invstd, /*is_output=*/false);
  save(node->weight_, weight);
  save(node->bias_, bias);
  return out;
}

// ---- the Autograd kernels of the primitives. The public op differentiates its own level (the node above,
// the forward's tangent) and calls them below autograd; an outer torch.func level, or a direct call, sees
// them here: the statistics and the elementwise pass record differentiable ATen ops where a graph is built
// and set tangents in forward mode. The backward primitives have no derivative of their own (the node
// differentiates the backward from ATen ops) and refuse to be differentiated. ---------------------------
template <class... T>
void refuse_derivative(const char* op, const T&... t) {
  TORCH_CHECK(!differentiable(t...), "pyops::", op, ": is not differentiable (create_graph=True, forward-mode ",
              "AD); pyops.batch_norm differentiates its backward from differentiable ops");
}

template <Backend B>
struct Kernels {
  static Pair stats(const Tensor& x) {
    const bool rec = graph_of(x), fw = has_tangent(x);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(bn_stats[B].call(x));
    if (rec) return stats_composite(x);
    auto [mean, var] = below_autograd([&] { return bn_stats[B].call(x); });
    auto [dmean, dvar] = stats_tangent(primal(x), tangent(x), mean);
    set_tangent(mean, dmean);
    set_tangent(var, dvar);
    return {mean, var};
  }
  static Tensor elemt(const Tensor& x, const Tensor& mean, const Tensor& invstd, const Opt& w, const Opt& b,
                      const Opt& r, c10::string_view act, double param) {
    const bool rec = graph_of(x, mean, invstd, w, b, r), fw = has_tangent(x, mean, invstd, w, b, r);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(bn_elemt[B].call(x, mean, invstd, w, b, r, act, param));
    const Act a = parse_act("batch_norm_elemt", act);
    if (rec)
      return apply_activation(z_composite(x, mean, invstd, opt_value(w), opt_value(b), opt_value(r)), a, param)
          .to(x.scalar_type());
    Tensor out = below_autograd([&] { return bn_elemt[B].call(x, mean, invstd, w, b, r, act, param); });
    set_tangent(out,
                elemt_tangent(x, primal(mean), primal(invstd), w, b, r, tangent(mean), tangent(invstd), a, param, out));
    return out;
  }
  static Triple bwd_reduce(const Tensor& g, const Opt& x, const Opt& y, const Opt& r, const Tensor& mean,
                           const Tensor& invstd, const Opt& w, const Opt& b, c10::string_view act, double param,
                           bool grad_residual) {
    refuse_derivative("batch_norm_bwd_reduce", g, x, y, r, mean, invstd, w, b);
    PYOPS_BELOW_AUTOGRAD(bn_bwd_reduce[B].call(g, x, y, r, mean, invstd, w, b, act, param, grad_residual));
  }
  static Quad bwd(const Tensor& g, const Opt& x, const Opt& y, const Opt& r, const Tensor& mean, const Tensor& invstd,
                  const Opt& w, const Opt& b, c10::string_view act, double param, bool grad_residual) {
    refuse_derivative("batch_norm_bwd", g, x, y, r, mean, invstd, w, b);
    PYOPS_BELOW_AUTOGRAD(bn_bwd[B].call(g, x, y, r, mean, invstd, w, b, act, param, grad_residual));
  }
  static Tensor bwd_elemt(const Tensor& g, const Opt& x, const Opt& y, const Opt& r, const Tensor& mean,
                          const Tensor& invstd, const Opt& w, const Opt& b, const Opt& mdz, const Opt& mdx,
                          c10::string_view act, double param) {
    refuse_derivative("batch_norm_bwd_elemt", g, x, y, r, mean, invstd, w, b, mdz, mdx);
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

Tensor batch_norm(const Tensor& input, const Opt& running_mean, const Opt& running_var, const Opt& weight,
                  const Opt& bias, bool training, double momentum, double eps,
                  std::optional<c10::string_view> activation, double negative_slope, double alpha, const Opt& residual,
                  bool memory_efficient);

// given_mean / given_var (training only): the input's batch statistics, computed by the caller (a
// convolution's epilogue, pyops::conv2d_stats), used on a pyops backend; else undefined.
Tensor batch_norm_impl(const Tensor& input, const Opt& running_mean, const Opt& running_var, const Opt& weight,
                       const Opt& bias, bool training, double momentum, double eps,
                       std::optional<c10::string_view> activation, double negative_slope, double alpha,
                       const Opt& residual, bool memory_efficient, const Tensor& given_mean_in,
                       const Tensor& given_var) {
  const Act act = activation.has_value() ? parse_act("batch_norm", *activation) : Act::kNone;
  const double param = act == Act::kLeakyRelu ? negative_slope : act == Act::kElu ? alpha : 0.0;
  TORCH_CHECK_VALUE(!memory_efficient || act_invertible(act, param), "pyops.batch_norm: memory_efficient=True ",
                    "needs an invertible activation (none, leaky_relu with negative_slope > 0, elu with alpha > 0), ",
                    "got ", act_name(act), act == Act::kNone || act == Act::kRelu ? "" : " with parameter ",
                    act == Act::kRelu ? std::string(": relu's output cannot be inverted")
                                      : (act == Act::kNone ? std::string() : std::to_string(param)));
  for (const auto& [name, t] : {std::pair<const char*, const Opt&>{"running_mean", running_mean},
                                {"running_var", running_var},
                                {"weight", weight},
                                {"bias", bias},
                                {"residual", residual}})
    check_operand_device("batch_norm", name, t, input);
  TORCH_CHECK_VALUE(!residual.has_value() || !residual->defined() || residual->sym_sizes() == input.sym_sizes(),
                    "pyops.batch_norm: residual must have the input's shape ", input.sym_sizes(), ", got ",
                    residual.has_value() && residual->defined() ? residual->sym_sizes() : input.sym_sizes());
  // act' is read from the output; where it cannot be, the activation follows as its own op
  const bool fused = act_from_output(act, param);
  const bool has_residual = residual.has_value() && residual->defined();
  Facts facts;
  facts.training = training;
  facts.fused = (fused && act != Act::kNone) || has_residual;
  facts.memory_efficient = memory_efficient;
  facts.variant = int64_t(act);
  // fewer than 2 dimensions (no channel dimension): torch's batch norm decides (it takes an empty 1-d input).
  // Timed on clones of the running statistics, which training would move.
  const Backend b =
      input.dim() < 2
          ? Backend::kTorch
          : choose(
                Op::batch_norm, "batch_norm", input, &facts,
                [&] {
                  const auto copy = [&](const Opt& t) {
                    return training && t.has_value() && t->defined() ? Opt(t->clone()) : t;
                  };
                  return pyops::batch_norm(input, copy(running_mean), copy(running_var), weight, bias, training,
                                           momentum, eps, activation, negative_slope, alpha, residual,
                                           memory_efficient);
                },
                {&input, weight ? &*weight : nullptr, bias ? &*bias : nullptr, residual ? &*residual : nullptr});
  const Tensor rm = running_mean.value_or(Tensor()), rv = running_var.value_or(Tensor());
  const Tensor given_mean = training && b != Backend::kTorch ? given_mean_in : Tensor();
  if (b == Backend::kTorch) {
    Tensor y = at::batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, true);
    if (has_residual) y = y + *residual;
    return apply_activation(y, act, param);
  }
  const c10::SymInt count = bn_count(input);
  const auto known = count.maybe_as_int();
  if (training)
    TORCH_CHECK_VALUE(!known || *known != 1, "pyops.batch_norm: expected more than 1 value per channel when ",
                      "training, got input size ", input.sym_sizes());
  // This level's derivatives are the op's own (a recorded node, the forward's tangent); the primitives run
  // below autograd, where an outer torch.func level sees them.
  const bool recorded = at::GradMode::is_enabled() &&
                        (input.requires_grad() || wants_grad(weight) || wants_grad(bias) || wants_grad(residual));
  const bool fw = has_tangent(input, weight, bias, residual);
  Tensor mean, invstd;
  if (training) {
    Tensor var;
    if (given_mean.defined()) {
      mean = given_mean;
      var = given_var;
    } else {
      std::tie(mean, var) = below_autograd([&] { return bn_stats[b].call(input); });
    }
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
  const c10::string_view kernel_act = act_name(fused ? act : Act::kNone);
  Tensor out;
  if (recorded) {
    out = b == Backend::kTriton
              ? batch_norm_recorded<Backend::kTriton>(input, weight, bias, residual, mean, invstd, training, eps,
                                                      kernel_act, param, memory_efficient, fw)
              : batch_norm_recorded<Backend::kNative>(input, weight, bias, residual, mean, invstd, training, eps,
                                                      kernel_act, param, memory_efficient, fw);
  } else {
    out = below_autograd(
        [&] { return bn_elemt[b].call(input, mean, invstd, weight, bias, residual, kernel_act, param); });
    if (fw)
      set_tangent(out, forward_tangent(input, weight, bias, residual, mean, invstd, training, eps, false,
                                       fused ? act : Act::kNone, param, out));
  }
  return fused ? out : apply_activation(out, act, param);
}

Tensor batch_norm(const Tensor& input, const Opt& running_mean, const Opt& running_var, const Opt& weight,
                  const Opt& bias, bool training, double momentum, double eps,
                  std::optional<c10::string_view> activation, double negative_slope, double alpha, const Opt& residual,
                  bool memory_efficient) {
  return batch_norm_impl(input, running_mean, running_var, weight, bias, training, momentum, eps, activation,
                         negative_slope, alpha, residual, memory_efficient, Tensor(), Tensor());
}

// batch_norm in training with the input's batch statistics given (pyops::conv2d_stats's), used on a pyops
// backend; empty statistics, or the torch backend, compute them as batch_norm does.
Tensor batch_norm_given(const Tensor& input, const Tensor& batch_mean, const Tensor& batch_var, const Opt& running_mean,
                        const Opt& running_var, const Opt& weight, const Opt& bias, double momentum, double eps,
                        std::optional<c10::string_view> activation, double negative_slope, double alpha,
                        const Opt& residual, bool memory_efficient) {
  const bool given = batch_mean.numel() > 0;
  if (given) {
    const int64_t channels = input.dim() >= 2 ? input.size(1) : -1;
    const auto stat_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    for (const auto& [name, t] :
         {std::pair<const char*, const Tensor&>{"batch_mean", batch_mean}, {"batch_var", batch_var}})
      TORCH_CHECK_VALUE(
          t.dim() == 1 && t.size(0) == channels && t.scalar_type() == stat_type && t.device() == input.device(),
          "pyops.batch_norm: ", name, " must be a 1-d ", stat_type, " tensor of the input's ", channels,
          " channels on ", input.device(), ", got ", t.scalar_type(), " of sizes ", t.sizes(), " on ", t.device());
  }
  return batch_norm_impl(input, running_mean, running_var, weight, bias, true, momentum, eps, activation,
                         negative_slope, alpha, residual, memory_efficient, given ? batch_mean : Tensor(),
                         given ? batch_var : Tensor());
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  PYOPS_REGISTER_BATCH_NORM_AUTOGRAD(m, Backend::kNative, "");
  PYOPS_REGISTER_BATCH_NORM_AUTOGRAD(m, Backend::kTriton, "_triton");
}

TORCH_LIBRARY_IMPL(pyops, CompositeImplicitAutograd, m) {
  m.impl("batch_norm", &batch_norm);
  m.impl("batch_norm.given_stats", &batch_norm_given);
}

TORCH_LIBRARY_IMPL(pyops, CompositeExplicitAutograd, m) { m.impl("batch_norm_running_update", &running_update); }

}  // namespace pyops
