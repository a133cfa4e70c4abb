// The loss family above the kernels: the public ops (pyops::l1_loss, ...: pick the backend, call its
// primitive) and the derivatives, written once here as Autograd kernels of the primitives of both
// backends. The reduced forms compute the gradient in the forward pass (csrc/loss.h), so backward
// only scales it by the incoming 0-d gradient, and hands it on as it is when that is 1 (on the CPU,
// where reading it costs no synchronisation). Where a backward must be differentiable itself
// (create_graph=True, torch.func) the saved gradient becomes a function of the inputs through a node
// that knows its derivative, recovered from the gradient itself and the target; forward mode computes
// the tangents from the same gradient. Math: pyops/ops/loss.py's docstring.
#include <ATen/TensorOperators.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/broadcast_tensors.h>
#include <ATen/ops/cross_entropy_loss.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/huber_loss.h>
#include <ATen/ops/l1_loss.h>
#include <ATen/ops/mse_loss.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <limits>
#include <mutex>
#include <optional>
#include <tuple>

#include "common/backend.h"
#include "common/checks.h"
#include "common/node.h"
#include "common/prim.h"
#include "loss.h"

namespace pyops {
namespace {

using at::Tensor;

// ---- the primitives of each backend, looked up once ----------------------------------------------

using Pair = std::tuple<Tensor, Tensor>;
const Prim<Pair(const Tensor&, const Tensor&, int64_t, int64_t, double, bool)> pointwise_loss_fwd(
    "pyops::pointwise_loss_fwd", "pyops::pointwise_loss_fwd_triton");
const Prim<Tensor(const Tensor&, const Tensor&, const Tensor&, int64_t, double)> pointwise_loss_bwd(
    "pyops::pointwise_loss_bwd", "pyops::pointwise_loss_bwd_triton");
const Prim<Pair(const Tensor&, const Tensor&, const std::optional<Tensor>&, int64_t, int64_t, double, bool)>
    cross_entropy_fwd("pyops::cross_entropy_fwd", "pyops::cross_entropy_fwd_triton");

const char* const kKindNames[] = {"l1_loss", "mse_loss", "huber_loss"};

// ---- helpers ----------------------------------------------------------------------------------------
bool grad_recorded(const Tensor& t) { return at::GradMode::is_enabled() && t.defined() && t.requires_grad(); }

// A real CPU tensor (not a fake, functional or batched wrapper), whose value can be read for free.
bool readable_on_host(const Tensor& t) {
  constexpr auto wrappers =
      c10::DispatchKeySet({c10::DispatchKey::Python, c10::DispatchKey::Functionalize,
                           c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper});
  return t.is_cpu() && t.dim() == 0 && !t.key_set().has_any(wrappers) && t.has_storage();
}

// saved * g for a 0-d incoming gradient g: saved itself when g is 1 (autograd then hands it on or
// into .grad without a copy; the engine clones it where the graph is kept and it is still saved).
Tensor scale_saved(const Tensor& saved, const Tensor& g) {
  if (readable_on_host(g) && g.item<double>() == 1.0) return saved;
  return saved * g;
}

// data's values as a new tensor (sharing its storage) whose history is `node` and whose tangent is data's:
// a saved gradient made a differentiable function of the loss's inputs, for the next order.
template <class P>
Tensor with_history(const Tensor& data, const P& node) {
  Tensor v = torch::autograd::make_variable(data, /*requires_grad=*/false);
  torch::autograd::set_history(v, NodePtr(node));
  set_tangent(v, tangent(data));
  return v;
}

// a - b for tangents, either of which may be absent (zero).
Tensor sub_tangents(const Tensor& a, const Tensor& b) { return !b.defined() ? a : !a.defined() ? -b : a - b; }

// The reduction's factor: 1 / numel for mean (the gradient's scale), else 1.
double mean_scale(int64_t reduction, const Tensor& t) {
  if (reduction != int64_t(Reduction::kMean)) return 1.0;
  return 1.0 / double(t.sym_numel().guard_int(__FILE__, __LINE__));
}

// ---- L1 / MSE / Huber: the second derivative ---------------------------------------------------------
// loss(x - t) has a diagonal second derivative h = loss''(x - t): 0 (l1, almost everywhere, as torch's),
// 2 (mse), [|x - t| < delta] (huber, as torch's huber_loss_double_backward), each constant where it is
// defined, so that every higher derivative is zero. h * v from x and t (reduction none):
Tensor pointwise_hv(const Tensor& v, const Tensor& x, const Tensor& t, int64_t kind, double delta) {
  switch (LossKind(kind)) {
    case LossKind::kL1:
      return at::zeros_like(v);
    case LossKind::kMse:
      return v * 2;
    default:
      return at::where((x - t).abs() < delta, v, 0);
  }
}

// The value the kernels store for G = scale * clamp(d, -delta, delta) where |d| >= delta: delta * scale in
// the op-math type, rounded to G's dtype (csrc/cpu/loss.cpp, csrc/cuda/loss.cu, kernels/loss.py alike).
double huber_saturated(at::ScalarType type, double delta, double scale) {
  const float f = float(delta) * float(scale);
  switch (type) {
    case at::kDouble:
      return delta * scale;
    case at::kHalf:
      return double(float(c10::Half(f)));
    case at::kBFloat16:
      return double(float(c10::BFloat16(f)));
    default:
      return double(f);
  }
}

// The same from the reduced forms' saved gradient G = scale * loss'(x - t) alone, h * scale * v: huber's
// |x - t| < delta is |G| < scale * delta as the kernels round it (G is exactly that value wherever
// |x - t| >= delta). Where scale * |x - t| rounds to the saturated value though |x - t| < delta (within one
// rounding of G's dtype below delta; never for float64/float32 with scale 1 or a power of two) it reads as
// saturated, a rounding of the kink's position as torch's own |x - t| < delta computed in the input's dtype.
Tensor pointwise_hv_from_grad(const Tensor& v, const Tensor& G, int64_t kind, double delta, double scale) {
  switch (LossKind(kind)) {
    case LossKind::kL1:
      return at::zeros_like(v);
    case LossKind::kMse:
      return v * (2 * scale);
    default:
      return at::where(G.abs() < huber_saturated(G.scalar_type(), delta, scale), v * scale, 0);
  }
}

// The saved gradient G of a reduced form as a function of x and t (edges x, t): dG/dx = h scale, dG/dt =
// -h scale (diagonal). Recorded only by a backward that builds a graph (create_graph=True, torch.func).
struct SavedPointwiseGradBackward : Node {
  SavedVariable g_;
  int64_t kind_;
  double delta_, scale_;
  SavedPointwiseGradBackward(const Tensor& g, int64_t kind, double delta, double scale)
      : g_(g, /*is_output=*/false), kind_(kind), delta_(delta), scale_(scale) {}
  variable_list apply(variable_list&& grads) override {
    variable_list out(2);
    if (!grads[0].defined()) return out;
    const Tensor hv = pointwise_hv_from_grad(grads[0], g_.unpack(), kind_, delta_, scale_);
    if (should_compute_output(0)) out[0] = hv;
    if (should_compute_output(1)) out[1] = -hv;
    return out;
  }
  std::string name() const override { return "pyops::PointwiseLossGradBackward"; }
  void release_variables() override { g_.reset_data(); }
};

// pointwise_loss_bwd(g, x, t), through its primitive's Autograd kernel where the result must be
// differentiable itself, else straight to the kernel.
template <Backend B>
Tensor pointwise_grad(const Tensor& g, const Tensor& x, const Tensor& t, int64_t kind, double delta) {
  if (differentiable(g, x, t)) return pointwise_loss_bwd[B].call(g, x, t, kind, delta);
  return below_autograd([&] { return pointwise_loss_bwd[B].call(g, x, t, kind, delta); });
}

// The derivative of pointwise_loss_bwd (double backward), edges g, x, t: d/dg is pointwise_loss_bwd itself
// (linear in g), d/dx = g h, d/dt = -g h.
template <Backend B>
struct PointwiseLossBwdBackward : Node {
  SavedVariable g_, x_, t_;
  int64_t kind_;
  double delta_;
  PointwiseLossBwdBackward(const Tensor& g, const Tensor& x, const Tensor& t, int64_t kind, double delta)
      : g_(g, false), x_(x, false), t_(t, false), kind_(kind), delta_(delta) {}
  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    const Tensor& v = grads[0];
    if (!v.defined()) return out;
    const Tensor g = g_.unpack(), x = x_.unpack(), t = t_.unpack();
    if (should_compute_output(0)) out[0] = pointwise_grad<B>(v, x, t, kind_, delta_);
    if (should_compute_output(1) || should_compute_output(2)) {
      const Tensor d = g * pointwise_hv(v, x, t, kind_, delta_);
      if (should_compute_output(1)) out[1] = d;
      if (should_compute_output(2)) out[2] = -d;
    }
    return out;
  }
  std::string name() const override { return "pyops::PointwiseLossBackwardBackward"; }
  void release_variables() override {
    g_.reset_data();
    x_.reset_data();
    t_.reset_data();
  }
};

// ---- L1 / MSE / Huber: hand-written nodes (csrc/common/node.h), edges x and t -----------------------
template <Backend B>
struct PointwiseLossBackward : Node {
  SavedVariable a_, b_;  // x and t (reduction none: backward needs both, as torch's), or the gradient
  int64_t kind_ = 0, reduction_ = 0;
  double delta_ = 1.0;
  bool none_ = false;

  variable_list apply(variable_list&& grads) override {
    const Tensor& g = grads[0];
    if (!g.defined()) return {Tensor(), Tensor()};
    Tensor gi;
    if (none_) {
      gi = pointwise_grad<B>(g, a_.unpack(), b_.unpack(), kind_, delta_);
    } else {
      const Tensor saved = a_.unpack();
      if (!at::GradMode::is_enabled() && !has_tangent(g, saved)) {
        gi = scale_saved(saved, g);
      } else {  // the next order's derivative (create_graph=True) or tangent: saved as a function of x, t
        Tensor G = saved;
        if (at::GradMode::is_enabled()) {
          auto node = make_node<SavedPointwiseGradBackward>(saved, kind_, delta_, mean_scale(reduction_, saved));
          node->set_next_edges({next_edge(0), next_edge(1)});
          G = with_history(saved, node);
        }
        gi = G * g;
      }
    }
    // loss(x - t): the target's gradient is the input's, negated
    return {should_compute_output(0) ? gi : Tensor(), should_compute_output(1) ? -gi : Tensor()};
  }
  std::string name() const override { return "pyops::PointwiseLossBackward"; }
  void release_variables() override {
    a_.reset_data();
    b_.reset_data();
  }
};

// ---- softmax cross entropy: the second derivative ------------------------------------------------------
// Per row (classes along `cdim`), the saved gradient is G = s (a p - b) with p the softmax, s the
// reduction's scale (1 / the weight of the rows not ignored, or 1 / rows for probabilities, under mean;
// else 1) and, with class weights w (1 when none), smoothing e over C classes:
//   class index t: a = (1 - e) w_t + e W / C (W = sum w), b = (1 - e) w_t onehot(t) + e w / C (0 if ignored)
//   probabilities q: q' = (1 - e) q + e / C, a = sum_c w_c q'_c, b = w q'
// so p = (G + s b) / (s a), and d G / dx applied to v is s a (p v - p sum_c(p v)). These need the target and
// the class weights (saved with G: one int64 a row for class indices), never the input.
struct CrossEntropySpec {
  int64_t ignore_index = -100, reduction = 1;
  double smoothing = 0;
};

Tensor cross_entropy_hv(const Tensor& v, const Tensor& G, const Tensor& t, const Tensor& w,
                        const CrossEntropySpec& spec) {
  // (sizes as SymInts: torch.compile traces this with symbolic ones)
  const int64_t cdim = G.dim() == 1 ? 0 : 1;
  const c10::SymFloat classes(G.sym_size(cdim));
  const auto opmath = at::toOpMathType(G.scalar_type());
  const double e = spec.smoothing;
  const at::Scalar ec(c10::SymFloat(e) / classes);  // e / C
  const bool mean = spec.reduction == int64_t(Reduction::kMean);
  const Tensor Gf = G.to(opmath);
  c10::SymDimVector wshape(G.dim(), 1);
  wshape[cdim] = G.sym_size(cdim);
  const Tensor wc = w.defined() ? w.to(opmath).view_symint(wshape) : Tensor();  // w along the class dimension
  Tensor sa, sb;
  if (t.is_floating_point()) {
    const Tensor q = t.to(opmath) * (1 - e) + ec;
    const Tensor b = wc.defined() ? q * wc : q;
    sa = b.sum(cdim, /*keepdim=*/true);
    sb = b;
    if (mean) {  // 1 / rows
      const at::Scalar s(classes / c10::SymFloat(G.sym_numel()));
      sa = sa * s;
      sb = sb * s;
    }
  } else {
    const Tensor valid = t != spec.ignore_index;
    const Tensor tc = t.masked_fill(~valid, 0);
    const Tensor validf = valid.to(opmath);
    const Tensor wt = w.defined() ? w.to(opmath).index_select(0, tc.reshape({-1})).reshape_as(t) * validf : validf;
    Tensor a = wt * (1 - e);
    Tensor b = at::zeros_like(Gf).scatter(cdim, tc.unsqueeze(cdim), 1) * a.unsqueeze(cdim);  // (1 - e) w_t onehot(t)
    if (e != 0) {
      a = a + (w.defined() ? validf * w.to(opmath).sum() * ec : validf * e);  // e W / C, W = C without weights
      b = b + (wc.defined() ? validf.unsqueeze(cdim) * wc * ec : validf.unsqueeze(cdim) * ec);
    }
    a = a.unsqueeze(cdim);
    if (mean) {
      const Tensor total =
          target_weight_total(t.reshape({-1}), spec.ignore_index, w.defined() ? w.to(opmath) : w, opmath);
      a = a / total;
      b = b / total;
    }
    sa = a;
    sb = b;
  }
  const Tensor live = sa != 0;  // ignored rows (a = 0): no derivative, and no 0 / 0
  const Tensor p = at::where(live, (Gf + sb) / at::where(live, sa, 1), 0);
  const Tensor pv = p * v.to(opmath);
  return (sa * (pv - p * pv.sum(cdim, /*keepdim=*/true))).to(v.scalar_type());
}

// The saved gradient G of cross entropy as a function of x (edge x), for the next order; its own
// derivative reads G through another such node, so that every order is exact.
struct SavedCrossEntropyGradBackward : Node {
  SavedVariable g_, t_, w_;
  CrossEntropySpec spec_;
  SavedCrossEntropyGradBackward(const Tensor& g, const Tensor& t, const Tensor& w, const CrossEntropySpec& spec)
      : g_(g, false), t_(t, false), w_(w, false), spec_(spec) {}
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {Tensor()};
    Tensor G = g_.unpack();
    const Tensor t = t_.unpack(), w = w_.unpack();
    if (at::GradMode::is_enabled()) {
      auto node = make_node<SavedCrossEntropyGradBackward>(G, t, w, spec_);
      node->set_next_edges({next_edge(0)});
      G = with_history(G, node);
    }
    return {cross_entropy_hv(grads[0], G, t, w, spec_)};
  }
  std::string name() const override { return "pyops::CrossEntropyGradBackward"; }
  void release_variables() override {
    g_.reset_data();
    t_.reset_data();
    w_.reset_data();
  }
};

// ---- softmax cross entropy: saves the gradient (input's dtype), and the target and class weights for
// the next order; nothing else of the input's size ----------------------------------------------------------
template <Backend B>
struct CrossEntropyBackward : Node {
  SavedVariable g_, t_, w_;
  CrossEntropySpec spec_;
  bool none_ = false, batched_ = false;

  variable_list apply(variable_list&& grads) override {
    const Tensor& g = grads[0];
    if (!g.defined()) return {Tensor()};
    Tensor saved = g_.unpack();
    if (!at::GradMode::is_enabled() && !has_tangent(g, saved)) {
      if (!none_) return {scale_saved(saved, g)};
      return {saved * (batched_ ? g.unsqueeze(1) : g)};  // one gradient a row: broadcast over the classes
    }
    if (at::GradMode::is_enabled()) {  // the next order (create_graph=True): G as a function of x
      auto node = make_node<SavedCrossEntropyGradBackward>(saved, t_.unpack(), w_.unpack(), spec_);
      node->set_next_edges({next_edge(0)});
      saved = with_history(saved, node);
    }
    return {saved * (none_ && batched_ ? g.unsqueeze(1) : g)};
  }
  std::string name() const override { return "pyops::CrossEntropyBackward"; }
  void release_variables() override {
    g_.reset_data();
    t_.reset_data();
    w_.reset_data();
  }
};

// ---- the Autograd kernels of the primitives: record a node when a graph is built and set the results'
// tangents when an operand has one, else go straight to the kernel ------------------------------------------
template <Backend B>
struct Kernels {
  static Pair pointwise_loss_fwd_k(const Tensor& x, const Tensor& t, int64_t kind, int64_t reduction, double delta,
                                   bool grad) {
    const bool rec = grad_recorded(x) || grad_recorded(t), fw = has_tangent(x, t);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(pointwise_loss_fwd[B].call(x, t, kind, reduction, delta, grad));
    const bool none = reduction == int64_t(Reduction::kNone);
    Tensor out, second;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, second) = pointwise_loss_fwd[B].call(x, t, kind, reduction, delta, !none);
    }
    // The reduced forms' gradient G, where a graph is recorded and G is read (by the tangent, or by an inner
    // torch.func level's recorded forward, which asks for it): a function of x and t, for the next order.
    Tensor G = second;
    if (!none && rec && (fw || grad)) {
      auto node = make_node<SavedPointwiseGradBackward>(second, kind, delta, mean_scale(reduction, x));
      node->set_next_edges(torch::autograd::collect_next_edges(x, t));
      G = with_history(second, node);
    }
    if (fw) {  // d loss = loss'(x - t) (dx - dt), reduced as the loss: G (dx - dt) summed; dG = h scale (dx - dt)
      const Tensor d = sub_tangents(tangent(x), tangent(t));
      if (none) {
        set_tangent(out, pointwise_grad<B>(d, primal(x), primal(t), kind, delta));
      } else {
        Tensor dloss = (G * d).sum();
        if (reduction == int64_t(Reduction::kMean) && x.sym_numel().maybe_as_int() == 0)
          dloss = at::full({}, std::numeric_limits<double>::quiet_NaN(), dloss.options());  // 0 / 0, as torch's
        set_tangent(out, dloss);
        const Tensor dG = pointwise_hv_from_grad(d, second, kind, delta, mean_scale(reduction, x));
        set_tangent(second, dG);
        if (!G.is_same(second)) set_tangent(G, dG);
      }
    }
    if (!rec) return {out, none || grad ? second : at::empty({0}, x.options())};
    auto node = make_node<PointwiseLossBackward<B>>();
    record(node, out, x, t);
    node->kind_ = kind;
    node->reduction_ = reduction;
    node->delta_ = delta;
    node->none_ = none;
    if (none) {  // elementwise: backward needs x and t, as torch's
      node->a_ = SavedVariable(x, /*is_output=*/false);
      node->b_ = SavedVariable(t, /*is_output=*/false);
      return {out, second};
    }
    node->a_ = SavedVariable(second, /*is_output=*/false);
    return {out, grad ? G : at::empty({0}, x.options())};
  }
  static Tensor pointwise_loss_bwd_k(const Tensor& g, const Tensor& x, const Tensor& t, int64_t kind, double delta) {
    const bool rec = graph_of(g, x, t), fw = has_tangent(g, x, t);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(pointwise_loss_bwd[B].call(g, x, t, kind, delta));
    Tensor gi = below_autograd([&] { return pointwise_loss_bwd[B].call(g, x, t, kind, delta); });
    if (rec) record(make_node<PointwiseLossBwdBackward<B>>(g, x, t, kind, delta), gi, g, x, t);
    if (fw) {
      const Tensor dg = tangent(g), d = sub_tangents(tangent(x), tangent(t));
      const Tensor xp = primal(x), tp = primal(t);
      set_tangent(gi, add_tangents(dg.defined() ? pointwise_grad<B>(dg, xp, tp, kind, delta) : Tensor(),
                                   d.defined() ? primal(g) * pointwise_hv(d, xp, tp, kind, delta) : Tensor()));
    }
    return gi;
  }
  static Pair cross_entropy_fwd_k(const Tensor& x, const Tensor& t, const std::optional<Tensor>& w,
                                  int64_t ignore_index, int64_t reduction, double smoothing, bool grad) {
    TORCH_CHECK(!grad_recorded(t) && !(w.has_value() && grad_recorded(*w)) && !has_tangent(t, w),
                "pyops::cross_entropy_fwd: gradients and tangents for target and weight are not supported ",
                "(pyops.functional.cross_entropy hands such calls to torch)");
    const bool rec = grad_recorded(x), fw = has_tangent(x);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(cross_entropy_fwd[B].call(x, t, w, ignore_index, reduction, smoothing, grad));
    Tensor loss, g;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(loss, g) = cross_entropy_fwd[B].call(x, t, w, ignore_index, reduction, smoothing, true);
    }
    const CrossEntropySpec spec{ignore_index, reduction, smoothing};
    const bool none = reduction == int64_t(Reduction::kNone);
    const Tensor wt = w.has_value() ? *w : Tensor();
    // G, where a graph is recorded and G is read (by the tangent, or by an inner torch.func level's recorded
    // forward, which asks for it): a function of x, for the next order.
    Tensor G = g;
    if (rec && (fw || grad)) {
      auto node = make_node<SavedCrossEntropyGradBackward>(g, t, wt, spec);
      node->set_next_edges(torch::autograd::collect_next_edges(x));
      G = with_history(g, node);
    }
    if (fw) {  // d loss = sum over the classes (all of them when reduced) of G dx; dG = (dG/dx) dx
      const Tensor dx = tangent(x);
      Tensor dloss = none ? (G * dx).sum(x.dim() == 1 ? 0 : 1) : (G * dx).sum();
      if (reduction == int64_t(Reduction::kMean) && !t.is_floating_point()) {
        // no rows, or every row ignored: 0 / 0 as torch's, + 0 / total (no host synchronisation)
        const auto opmath = at::toOpMathType(x.scalar_type());
        const Tensor total = target_weight_total(t.reshape({-1}), ignore_index, w ? w->to(opmath) : Tensor(), opmath);
        dloss = dloss + (total.reciprocal() * 0).to(dloss.scalar_type());
      }
      set_tangent(loss, dloss);
      const Tensor dG = cross_entropy_hv(dx, G, t, wt, spec);
      set_tangent(g, dG);
      if (!G.is_same(g)) set_tangent(G, dG);
    }
    if (!rec) return {loss, grad ? g : at::empty({0}, x.options())};
    auto node = make_node<CrossEntropyBackward<B>>();
    record(node, loss, x);
    node->g_ = SavedVariable(g, /*is_output=*/false);
    node->t_ = SavedVariable(t, /*is_output=*/false);
    node->w_ = SavedVariable(wt, /*is_output=*/false);
    node->spec_ = spec;
    node->none_ = none;
    node->batched_ = x.dim() > 1;
    return {loss, grad ? G : at::empty({0}, x.options())};
  }
};

#define PYOPS_REGISTER_LOSS_AUTOGRAD(m, B, SUFFIX)                 \
  do {                                                             \
    using K = Kernels<B>;                                          \
    m.impl("pointwise_loss_fwd" SUFFIX, &K::pointwise_loss_fwd_k); \
    m.impl("pointwise_loss_bwd" SUFFIX, &K::pointwise_loss_bwd_k); \
    m.impl("cross_entropy_fwd" SUFFIX, &K::cross_entropy_fwd_k);   \
  } while (0)

// ---- the public ops -------------------------------------------------------------------------------
void check_reduction_value(const char* op, int64_t reduction) {
  TORCH_CHECK_VALUE(reduction >= 0 && reduction <= 2, "pyops.", op,
                    ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

// Under autocast the losses compute in float32, as torch's (autocast's float32 list): float16 and
// bfloat16 tensors are upcast first, on every backend.
Tensor autocast_to_float(const Tensor& t) {
  if (!t.defined() || (t.scalar_type() != at::kHalf && t.scalar_type() != at::kBFloat16)) return t;
  if (!at::autocast::is_autocast_enabled(t.device().type())) return t;
  return t.to(at::kFloat);
}

// Whether the kernels take (input, target): a kernel dtype shared by both, on one device.
bool kernel_pair(const Tensor& x, const Tensor& t) {
  return is_kernel_dtype(x.scalar_type()) && x.scalar_type() == t.scalar_type() && x.device() == t.device();
}

// The loss of input - target (broadcast as torch does) on the selected backend; `torch_fn` is torch's.
template <class TorchFn>
Tensor pointwise_public(LossKind kind, const Tensor& x, const Tensor& t, int64_t reduction, double delta, Op id,
                        const TorchFn& torch_fn) {
  const char* op = kKindNames[int64_t(kind)];
  check_reduction_value(op, reduction);
  Tensor xe = autocast_to_float(x), te = autocast_to_float(t);
  if (!kernel_pair(xe, te)) return torch_fn(xe, te);
  if (!(xe.sym_sizes() == te.sym_sizes())) {  // torch broadcasts (its Python function warns)
    auto both = at::broadcast_tensors({xe, te});
    xe = both[0];
    te = both[1];
  }
  Facts facts;
  facts.variant = reduction;
  const Backend b = choose(id, op, xe, &facts,
                           [&] { return pointwise_public(kind, x, t, reduction, delta, id, torch_fn); }, {&x, &t});
  if (b == Backend::kTorch) return torch_fn(xe, te);
  return std::get<0>(pointwise_loss_fwd[b].call(xe, te, int64_t(kind), reduction, delta, false));
}

Tensor l1_loss(const Tensor& x, const Tensor& t, int64_t reduction) {
  return pointwise_public(LossKind::kL1, x, t, reduction, 0.0, Op::l1_loss,
                          [&](const Tensor& a, const Tensor& b) { return at::l1_loss(a, b, reduction); });
}
Tensor mse_loss(const Tensor& x, const Tensor& t, int64_t reduction) {
  return pointwise_public(LossKind::kMse, x, t, reduction, 0.0, Op::mse_loss,
                          [&](const Tensor& a, const Tensor& b) { return at::mse_loss(a, b, reduction); });
}
Tensor huber_loss(const Tensor& x, const Tensor& t, int64_t reduction, double delta) {
  // RuntimeError with torch's words, as torch's huber_loss raises
  TORCH_CHECK(delta > 0, "pyops.huber_loss: huber_loss does not support non-positive values for delta. (got ", delta,
              ")");
  return pointwise_public(LossKind::kHuber, x, t, reduction, delta, Op::huber_loss,
                          [&](const Tensor& a, const Tensor& b) { return at::huber_loss(a, b, reduction, delta); });
}

// sqrt(m + eps) with a zero gradient where m + eps = 0 (sqrt's own derivative is infinite there): the
// square root sees 1 in place of an exact zero, and every other value as it is, so NaN (an empty mean,
// a NaN error) stays NaN with a NaN gradient, as torch.sqrt(mse_loss) gives.
Tensor safe_sqrt(const Tensor& m, double eps) {
  const Tensor v = m + eps;
  const Tensor zero = v == 0;
  return at::where(zero, at::zeros_like(v), at::sqrt(at::where(zero, at::ones_like(v), v)));
}

Tensor rmse_loss(const Tensor& x, const Tensor& t, int64_t reduction, double eps) {
  check_reduction_value("rmse_loss", reduction);
  TORCH_CHECK_VALUE(eps >= 0, "pyops.rmse_loss: eps must be non-negative, got ", eps);
  if (reduction == int64_t(Reduction::kNone)) {  // per element: sqrt((x - t)^2 + eps) = |x - t| for eps = 0
    if (eps == 0) return pyops::l1_loss(x, t, reduction);
    return at::sqrt(pyops::mse_loss(x, t, reduction) + eps);
  }
  return safe_sqrt(pyops::mse_loss(x, t, reduction), eps);
}

// torch's argument checks, in torch's words after the op's name (torch's tests match them), before any
// backend runs. As torch, a target of the input's shape holds class probabilities, any other class indices.
void check_cross_entropy_args(const Tensor& x, const Tensor& t, const std::optional<Tensor>& w, int64_t ignore_index) {
  if (x.dim() < 1) return;  // (the primitive names it)
  const c10::SymInt classes = x.sym_size(x.dim() == 1 ? 0 : 1);
  if (w.has_value() && w->defined())
    TORCH_SYM_CHECK(w->sym_numel().sym_eq(classes), "pyops.cross_entropy: weight tensor should be defined either for ",
                    "all ", classes, " classes or no classes but got weight tensor of shape: ", w->sym_sizes());
  if (x.sym_sizes() == t.sym_sizes()) {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "pyops.cross_entropy: Expected floating point type for target ",
                "with class probabilities, got ", t.scalar_type());
    TORCH_CHECK(ignore_index < 0, "pyops.cross_entropy: ignore_index is not supported for floating point target");
    return;
  }
  TORCH_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kByte,
              "pyops.cross_entropy: expected target dtype to be Long or Byte, but got ", t.scalar_type());
  if (x.dim() == 1) {
    TORCH_CHECK_VALUE(t.dim() == 0 || (t.dim() == 1 && t.sym_size(0) == 1), "pyops.cross_entropy: For 1D input, 1D ",
                      "target must have size 1, but got target size: ", t.sym_sizes());
    return;
  }
  const c10::SymInt batch = t.dim() == 0 ? c10::SymInt(0) : t.sym_size(0);
  TORCH_CHECK_VALUE(batch == x.sym_size(0), "pyops.cross_entropy: Expected input batch_size (", x.sym_size(0),
                    ") to match target batch_size (", batch, ").");
  if (x.dim() == 2) {
    TORCH_CHECK(t.dim() == 1, "pyops.cross_entropy: 0D or 1D target tensor expected, multi-target not supported");
    return;
  }
  c10::SymDimVector expected{x.sym_size(0)};
  for (int64_t d = 2; d < x.dim(); ++d) expected.push_back(x.sym_size(d));
  TORCH_CHECK(t.sym_sizes() == c10::SymIntArrayRef(expected), "pyops.cross_entropy: Expected target size ",
              c10::SymIntArrayRef(expected), ", got ", t.sym_sizes());
}

Tensor cross_entropy(const Tensor& input, const Tensor& target, const std::optional<Tensor>& weight_in,
                     int64_t reduction, int64_t ignore_index, double label_smoothing) {
  check_reduction_value("cross_entropy", reduction);
  check_cross_entropy_args(input, target, weight_in, ignore_index);
  const Tensor x = autocast_to_float(input), t = autocast_to_float(target);
  const std::optional<Tensor> weight =
      weight_in.has_value() ? std::optional<Tensor>(autocast_to_float(*weight_in)) : std::nullopt;
  auto torch_fn = [&] { return at::cross_entropy_loss(x, t, weight, reduction, ignore_index, label_smoothing); };
  const bool probs = t.is_floating_point();
  const bool w_defined = weight.has_value() && weight->defined();
  // what the kernels do not take goes to torch: other dtypes, mixed devices, and gradients or tangents
  // for probability targets or class weights
  if (!is_kernel_dtype(x.scalar_type()) || x.dim() < 1 || t.device() != x.device()) return torch_fn();
  // uint8 class indices, and an unbatched input's one-element target, are torch's forms alone
  if (!probs && (t.scalar_type() != at::kLong || (x.dim() == 1 && t.dim() == 1))) return torch_fn();
  if (probs && (t.scalar_type() != x.scalar_type() || grad_recorded(t) || has_tangent(t))) return torch_fn();
  if (w_defined && (weight->scalar_type() != x.scalar_type() || weight->device() != x.device() ||
                    grad_recorded(*weight) || has_tangent(weight)))
    return torch_fn();
  Facts facts;
  facts.variant = reduction + 3 * int64_t(probs) + 6 * int64_t(w_defined) + 12 * int64_t(label_smoothing != 0);
  const Backend b =
      choose(Op::cross_entropy, "cross_entropy", x, &facts,
             [&] { return pyops::cross_entropy(input, target, weight_in, reduction, ignore_index, label_smoothing); },
             {&input});
  if (b == Backend::kTorch) return torch_fn();
  return std::get<0>(cross_entropy_fwd[b].call(x, t, weight, ignore_index, reduction, label_smoothing, false));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  PYOPS_REGISTER_LOSS_AUTOGRAD(m, Backend::kNative, "");
  PYOPS_REGISTER_LOSS_AUTOGRAD(m, Backend::kTriton, "_triton");
}

TORCH_LIBRARY_IMPL(pyops, CompositeImplicitAutograd, m) {
  m.impl("l1_loss", &l1_loss);
  m.impl("mse_loss", &mse_loss);
  m.impl("huber_loss", &huber_loss);
  m.impl("rmse_loss", &rmse_loss);
  m.impl("cross_entropy", &cross_entropy);
}

}  // namespace pyops
