// The activation family above the kernels: the public ops (pyops::relu, ...: pick the backend, call
// its primitive) and the derivatives, written once here as Autograd kernels of the primitives of
// both backends, so that every primitive is differentiable on its own, in every mode (double backward
// and higher, forward-mode AD, every torch.func transform at any nesting: each functorch level runs the
// Autograd kernels with its own tensors) and torch.compile traces through them. The derivative of a
// backward primitive is a hand-written node too: functorch refuses torch::autograd::Function outright.
// Math: pyops/ops/activation.py's docstring.
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/exp.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>

#include "common/backend.h"
#include "common/checks.h"
#include "common/node.h"
#include "common/prim.h"

namespace pyops {
namespace {

using at::Tensor;
using torch::autograd::variable_list;

// ---- the primitives of each backend, looked up once ----------------------------------------------

using MaskedPair = std::tuple<Tensor, Tensor>;
const Prim<MaskedPair(const Tensor&)> relu_fwd("pyops::relu_fwd", "pyops::relu_fwd_triton");
const Prim<Tensor(Tensor&)> relu_fwd_("pyops::relu_fwd_", "pyops::relu_fwd_triton_");
const Prim<Tensor(const Tensor&, const Tensor&)> relu_bwd("pyops::relu_bwd", "pyops::relu_bwd_triton");
const Prim<MaskedPair(const Tensor&, double)> leaky_relu_fwd("pyops::leaky_relu_fwd", "pyops::leaky_relu_fwd_triton");
const Prim<Tensor(Tensor&, double)> leaky_relu_fwd_("pyops::leaky_relu_fwd_", "pyops::leaky_relu_fwd_triton_");
const Prim<Tensor(const Tensor&, const Tensor&, double)> leaky_relu_bwd("pyops::leaky_relu_bwd",
                                                                        "pyops::leaky_relu_bwd_triton");
const Prim<Tensor(const Tensor&, double)> elu_fwd("pyops::elu_fwd", "pyops::elu_fwd_triton");
const Prim<void(Tensor&, double)> elu_fwd_("pyops::elu_fwd_", "pyops::elu_fwd_triton_");
const Prim<Tensor(const Tensor&, const Tensor&, double, bool)> elu_bwd("pyops::elu_bwd", "pyops::elu_bwd_triton");
const Prim<Tensor(const Tensor&)> sigmoid_fwd("pyops::sigmoid_fwd", "pyops::sigmoid_fwd_triton");
const Prim<Tensor(const Tensor&, const Tensor&)> sigmoid_bwd("pyops::sigmoid_bwd", "pyops::sigmoid_bwd_triton");
const Prim<Tensor(const Tensor&)> tanh_fwd("pyops::tanh_fwd", "pyops::tanh_fwd_triton");
const Prim<Tensor(const Tensor&, const Tensor&)> tanh_bwd("pyops::tanh_bwd", "pyops::tanh_bwd_triton");
const Prim<MaskedPair(const Tensor&, int64_t, int64_t)> maxout_fwd("pyops::maxout_fwd", "pyops::maxout_fwd_triton");
const Prim<Tensor(const Tensor&, const Tensor&, int64_t, int64_t)> maxout_bwd("pyops::maxout_bwd",
                                                                              "pyops::maxout_bwd_triton");

// ---- helpers ----------------------------------------------------------------------------------------
// Whether autograd must record this call.
bool records(const Tensor& t) { return at::GradMode::is_enabled() && t.requires_grad(); }

// ---- relu / leaky_relu: save a 1-bit mask --------------------------------------------------------
// slope: leaky_relu's negative_slope; none for relu. The gradient masked(g) is linear in g and does
// not depend on x; MaskedBackward differentiates both y = act(x) (one edge: x) and gi = masked(g)
// (two edges: g, then x, whose derivative is zero), so that every order of derivative reaches x as
// torch's does (zeros), though only the mask is saved. The tangent of either is the same map applied
// to the operand's tangent, as torch's (threshold_backward(self_t, result, 0)).
template <Backend B>
struct MaskedBackward : Node {
  SavedVariable mask_;
  std::optional<double> slope_;
  c10::SymDimVector strides_;  // the memory order of the mask's bits

  MaskedBackward(const Tensor& mask, std::optional<double> slope, c10::SymIntArrayRef strides)
      : mask_(mask, /*is_output=*/false), slope_(slope), strides_(strides.begin(), strides.end()) {}

  // gi = masked(g), recorded (with x_edge as its second edge) when a graph is being built, and with
  // the tangent masked(tangent of g) when g has one.
  static Tensor grad(const Tensor& g, const Tensor& mask, std::optional<double> slope, c10::SymIntArrayRef strides,
                     const Edge& x_edge) {
    const Tensor gl = to_layout(g, strides);
    Tensor gi =
        below_autograd([&] { return slope ? leaky_relu_bwd[B].call(gl, mask, *slope) : relu_bwd[B].call(gl, mask); });
    if (at::GradMode::is_enabled() && (gl.requires_grad() || x_edge.is_valid())) {
      auto node = make_node<MaskedBackward>(mask, slope, gi.sym_strides());
      node->set_next_edges({gl.requires_grad() ? torch::autograd::impl::gradient_edge(gl) : Edge(), x_edge});
      torch::autograd::set_history(gi, NodePtr(node));
    }
    if (has_tangent(gl)) set_tangent(gi, grad(tangent(gl), mask, slope, strides, Edge()));
    return gi;
  }

  variable_list apply(variable_list&& grads) override {
    const Tensor mask = mask_.unpack();
    variable_list out(num_outputs());
    if (!grads[0].defined()) return out;
    out[0] = grad(grads[0], mask, slope_, strides_, next_edge(num_outputs() - 1));
    if (num_outputs() == 2 && should_compute_output(1)) out[1] = at::zeros_like(out[0], at::MemoryFormat::Preserve);
    return out;
  }
  std::string name() const override { return slope_ ? "pyops::LeakyReluBackward" : "pyops::ReluBackward"; }
  void release_variables() override { mask_.reset_data(); }
};

// ---- elu: saves its input (out of place) or output (in place), as torch ----------------------------
// elu_bwd(g, saved), through its primitive's Autograd kernel where it must be differentiable itself (a
// graph, or a tangent: EluBwdBackward, Kernels::elu_bwd_k), else straight to the kernel.
template <Backend B>
Tensor elu_grad(const Tensor& g, const Tensor& saved, double alpha, bool is_result) {
  if (differentiable(g, saved)) return elu_bwd[B].call(g, saved, alpha, is_result);
  return below_autograd([&] { return elu_bwd[B].call(g, saved, alpha, is_result); });
}

// d elu_bwd(g, s) / ds applied to ds: zero where s > 0; where s <= 0 the derivative of g * alpha e^s
// (s the input) or of g * (s + alpha) (s the output).
Tensor elu_bwd_d_saved(const Tensor& ds, const Tensor& g, const Tensor& s, double alpha, bool is_result) {
  return at::where(s <= 0, is_result ? ds * g : ds * g * alpha * at::exp(s), 0);
}

// The derivative of elu_bwd (double backward), edges g and saved: d/dg is elu_bwd itself (linear in g),
// d/dsaved elu_bwd_d_saved.
template <Backend B>
struct EluBwdBackward : Node {
  SavedVariable g_, saved_;
  double alpha_;
  bool is_result_;

  EluBwdBackward(const Tensor& g, const Tensor& saved, double alpha, bool is_result)
      : g_(g, /*is_output=*/false), saved_(saved, /*is_output=*/false), alpha_(alpha), is_result_(is_result) {}

  variable_list apply(variable_list&& grads) override {
    variable_list out(2);
    if (!grads[0].defined()) return out;
    const Tensor g = g_.unpack(), s = saved_.unpack();
    if (should_compute_output(0)) out[0] = elu_grad<B>(grads[0], s, alpha_, is_result_);
    if (should_compute_output(1)) out[1] = elu_bwd_d_saved(grads[0], g, s, alpha_, is_result_);
    return out;
  }
  std::string name() const override { return "pyops::EluBackwardBackward"; }
  void release_variables() override {
    g_.reset_data();
    saved_.reset_data();
  }
};

template <Backend B>
struct EluBackward : Node {
  SavedVariable saved_;  // the input, or the output when in place (is_result)
  double alpha_;
  bool is_result_;

  EluBackward(const Tensor& saved, double alpha, bool is_result)
      : saved_(saved, /*is_output=*/is_result), alpha_(alpha), is_result_(is_result) {}

  variable_list apply(variable_list&& grads) override {
    TORCH_CHECK(!is_result_ || alpha_ >= 0, "pyops.elu: in-place elu backward calculation is triggered with a ",
                "negative alpha (", alpha_, "), which is not supported (the input cannot be recovered from the ",
                "output); call the out-of-place version instead.");
    if (!grads[0].defined()) return {Tensor()};
    return {elu_grad<B>(grads[0], saved_.unpack(getptr()), alpha_, is_result_)};
  }
  std::string name() const override { return "pyops::EluBackward"; }
  void release_variables() override { saved_.reset_data(); }
};

// ---- sigmoid, tanh: save their output y --------------------------------------------------------------
// d_saved(gg, g, y): the derivative of bwd(g, y) in y, applied to gg (symmetric in gg and g).
struct SigmoidOps {
  static constexpr const char* name = "sigmoid";
  static constexpr const char* node = "pyops::SigmoidBackward";
  static constexpr const char* bwd_node = "pyops::SigmoidBackwardBackward";
  static const auto& fwd(Backend b) { return sigmoid_fwd[b]; }
  static const auto& bwd(Backend b) { return sigmoid_bwd[b]; }
  static Tensor d_saved(const Tensor& gg, const Tensor& g, const Tensor& y) { return gg * g * (1 - 2 * y); }
};
struct TanhOps {
  static constexpr const char* name = "tanh";
  static constexpr const char* node = "pyops::TanhBackward";
  static constexpr const char* bwd_node = "pyops::TanhBackwardBackward";
  static const auto& fwd(Backend b) { return tanh_fwd[b]; }
  static const auto& bwd(Backend b) { return tanh_bwd[b]; }
  static Tensor d_saved(const Tensor& gg, const Tensor& g, const Tensor& y) { return -2 * gg * g * y; }
};

template <Backend B, class Ops>
Tensor saves_output_grad(const Tensor& g, const Tensor& y) {
  if (differentiable(g, y)) return Ops::bwd(B).call(g, y);
  return below_autograd([&] { return Ops::bwd(B).call(g, y); });
}

// The derivative of bwd(g, y) (double backward), edges g and y.
template <Backend B, class Ops>
struct SavesOutputBwdBackward : Node {
  SavedVariable g_, y_;
  SavesOutputBwdBackward(const Tensor& g, const Tensor& y) : g_(g, /*is_output=*/false), y_(y, /*is_output=*/false) {}
  variable_list apply(variable_list&& grads) override {
    variable_list out(2);
    if (!grads[0].defined()) return out;
    const Tensor g = g_.unpack(), y = y_.unpack();
    if (should_compute_output(0)) out[0] = saves_output_grad<B, Ops>(grads[0], y);
    if (should_compute_output(1)) out[1] = Ops::d_saved(grads[0], g, y);
    return out;
  }
  std::string name() const override { return Ops::bwd_node; }
  void release_variables() override {
    g_.reset_data();
    y_.reset_data();
  }
};

template <Backend B, class Ops>
struct SavesOutputBackward : Node {
  SavedVariable y_;
  explicit SavesOutputBackward(const Tensor& y) : y_(y, /*is_output=*/true) {}
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {Tensor()};
    return {saves_output_grad<B, Ops>(grads[0], y_.unpack(getptr()))};
  }
  std::string name() const override { return Ops::node; }
  void release_variables() override { y_.reset_data(); }
};

// ---- maxout: saves uint8 indices ---------------------------------------------------------------------
// The derivative of maxout_bwd in its gradient, and maxout's tangent: each group's chosen piece.
Tensor maxout_gather(const Tensor& gg, const Tensor& idx, int64_t pieces, int64_t dim) {
  const Tensor groups = gg.unflatten_symint(dim, {gg.sym_size(dim) / pieces, pieces});
  return groups.gather(dim + 1, idx.to(at::kLong).unsqueeze(dim + 1)).squeeze(dim + 1);
}

template <Backend B>
Tensor maxout_grad(const Tensor& g, const Tensor& idx, int64_t pieces, int64_t dim) {
  if (differentiable(g)) return maxout_bwd[B].call(g, idx, pieces, dim);
  return below_autograd([&] { return maxout_bwd[B].call(g, idx, pieces, dim); });
}

// maxout's derivative (edge x: maxout_bwd puts g at each group's chosen piece) and maxout_bwd's (edge g:
// each group's chosen piece of gg, maxout_gather); both are linear in their edge and save the indices.
template <Backend B, bool kOfBackward>
struct MaxoutNode : Node {
  SavedVariable idx_;
  int64_t pieces_, dim_;
  MaxoutNode(const Tensor& idx, int64_t pieces, int64_t dim)
      : idx_(idx, /*is_output=*/false), pieces_(pieces), dim_(dim) {}
  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {Tensor()};
    if constexpr (kOfBackward) return {maxout_gather(grads[0], idx_.unpack(), pieces_, dim_)};
    return {maxout_grad<B>(grads[0], idx_.unpack(), pieces_, dim_)};
  }
  std::string name() const override { return kOfBackward ? "pyops::MaxoutBackwardBackward" : "pyops::MaxoutBackward"; }
  void release_variables() override { idx_.reset_data(); }
};
template <Backend B>
using MaxoutBackward = MaxoutNode<B, false>;
template <Backend B>
using MaxoutBwdBackward = MaxoutNode<B, true>;

// ---- the Autograd kernels of the primitives: record a node when a graph is built and set the
// results' tangents when an operand has one, else go straight to the kernel -----------------------------
// In place without recording: bump the version counter, as torch's in-place ops do.
#define PYOPS_BELOW_AUTOGRAD_INPLACE(x, call)           \
  do {                                                  \
    auto result = below_autograd([&] { return call; }); \
    torch::autograd::impl::bump_version(x);             \
    return result;                                      \
  } while (0)

template <Backend B>
struct Kernels {
  static MaskedPair masked_fwd(const Tensor& x, std::optional<double> slope) {
    const bool rec = records(x), fw = has_tangent(x);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(slope ? leaky_relu_fwd[B].call(x, *slope) : relu_fwd[B].call(x));
    auto [out, mask] = below_autograd([&] { return slope ? leaky_relu_fwd[B].call(x, *slope) : relu_fwd[B].call(x); });
    if (rec) record(make_node<MaskedBackward<B>>(mask, slope, out.sym_strides()), out, x);
    if (fw) set_tangent(out, MaskedBackward<B>::grad(tangent(x), mask, slope, out.sym_strides(), Edge()));
    return {out, mask};
  }
  static Tensor masked_fwd_(Tensor& x, std::optional<double> slope) {
    const bool rec = records(x), fw = has_tangent(x);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD_INPLACE(x, slope ? leaky_relu_fwd_[B].call(x, *slope) : relu_fwd_[B].call(x));
    if (rec) check_inplace(x);
    Tensor mask = below_autograd([&] { return slope ? leaky_relu_fwd_[B].call(x, *slope) : relu_fwd_[B].call(x); });
    if (rec) {
      record_inplace(make_node<MaskedBackward<B>>(mask, slope, x.sym_strides()), x);
    } else {
      torch::autograd::impl::bump_version(x);
    }
    if (fw) set_tangent_inplace(x, MaskedBackward<B>::grad(tangent(x), mask, slope, x.sym_strides(), Edge()));
    return mask;
  }
  static MaskedPair relu_fwd_k(const Tensor& x) { return masked_fwd(x, std::nullopt); }
  static Tensor relu_fwd_k_(Tensor& x) { return masked_fwd_(x, std::nullopt); }
  static MaskedPair leaky_relu_fwd_k(const Tensor& x, double slope) { return masked_fwd(x, slope); }
  static Tensor leaky_relu_fwd_k_(Tensor& x, double slope) { return masked_fwd_(x, slope); }
  static Tensor relu_bwd_k(const Tensor& g, const Tensor& mask) {
    if (!differentiable(g)) PYOPS_BELOW_AUTOGRAD(relu_bwd[B].call(g, mask));
    return MaskedBackward<B>::grad(g, mask, std::nullopt, g.sym_strides(), Edge());
  }
  static Tensor leaky_relu_bwd_k(const Tensor& g, const Tensor& mask, double slope) {
    if (!differentiable(g)) PYOPS_BELOW_AUTOGRAD(leaky_relu_bwd[B].call(g, mask, slope));
    return MaskedBackward<B>::grad(g, mask, slope, g.sym_strides(), Edge());
  }
  static Tensor elu_fwd_k(const Tensor& x, double alpha) {
    const bool rec = records(x), fw = has_tangent(x);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(elu_fwd[B].call(x, alpha));
    Tensor out = below_autograd([&] { return elu_fwd[B].call(x, alpha); });
    if (rec) record(make_node<EluBackward<B>>(x, alpha, false), out, x);
    if (fw) set_tangent(out, elu_grad<B>(tangent(x), primal(x), alpha, false));
    return out;
  }
  // The tangent as torch's, from the output, for alpha >= 0; from the input, before it is overwritten,
  // for a negative alpha (whose output does not determine the input).
  static void elu_fwd_k_(Tensor& x, double alpha) {
    const bool rec = records(x), fw = has_tangent(x);
    if (rec) check_inplace(x);
    const Tensor early = fw && alpha < 0 ? elu_grad<B>(tangent(x), primal(x), alpha, false) : Tensor();
    below_autograd([&] {
      elu_fwd_[B].call(x, alpha);
      return 0;
    });
    decltype(make_node<EluBackward<B>>(Tensor(), alpha, true)) node;
    if (rec) {
      node = make_node<EluBackward<B>>(Tensor(), alpha, true);
      record_inplace(node, x);
    } else {
      torch::autograd::impl::bump_version(x);
    }
    if (fw) {
      // the new tangent is written into x's own, which the tangent's graph (reverse over forward, at this
      // or an outer torch.func level) would save: it reads a copy
      set_tangent_inplace(x, early.defined() ? early : elu_grad<B>(tangent(x).clone(), primal(x), alpha, true));
    }
    if (rec) node->saved_ = SavedVariable(x, /*is_output=*/true);  // the output, with its new history
  }
  static Tensor elu_bwd_k(const Tensor& g, const Tensor& saved, double alpha, bool is_result) {
    const bool rec = graph_of(g, saved), fw = has_tangent(g, saved);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(elu_bwd[B].call(g, saved, alpha, is_result));
    Tensor gi = below_autograd([&] { return elu_bwd[B].call(g, saved, alpha, is_result); });
    if (rec) record(make_node<EluBwdBackward<B>>(g, saved, alpha, is_result), gi, g, saved);
    if (fw) {
      const Tensor dg = tangent(g), ds = tangent(saved), gp = primal(g), sp = primal(saved);
      set_tangent(gi, add_tangents(dg.defined() ? elu_grad<B>(dg, sp, alpha, is_result) : Tensor(),
                                   ds.defined() ? elu_bwd_d_saved(ds, gp, sp, alpha, is_result) : Tensor()));
    }
    return gi;
  }
  template <class Ops>
  static Tensor saves_output_fwd(const Tensor& x) {
    const bool rec = records(x), fw = has_tangent(x);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(Ops::fwd(B).call(x));
    Tensor y = below_autograd([&] { return Ops::fwd(B).call(x); });
    decltype(make_node<SavesOutputBackward<B, Ops>>(Tensor())) node;
    if (rec) {
      node = make_node<SavesOutputBackward<B, Ops>>(Tensor());
      record(node, y, x);
    }
    if (fw) set_tangent(y, saves_output_grad<B, Ops>(tangent(x), y));  // before y is saved with its tangent
    if (rec) node->y_ = SavedVariable(y, /*is_output=*/true);
    return y;
  }
  template <class Ops>
  static Tensor saves_output_bwd(const Tensor& g, const Tensor& y) {
    const bool rec = graph_of(g, y), fw = has_tangent(g, y);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(Ops::bwd(B).call(g, y));
    Tensor gi = below_autograd([&] { return Ops::bwd(B).call(g, y); });
    if (rec) record(make_node<SavesOutputBwdBackward<B, Ops>>(g, y), gi, g, y);
    if (fw) {
      const Tensor dg = tangent(g), dy = tangent(y), gp = primal(g), yp = primal(y);
      set_tangent(gi, add_tangents(dg.defined() ? saves_output_grad<B, Ops>(dg, yp) : Tensor(),
                                   dy.defined() ? Ops::d_saved(dy, gp, yp) : Tensor()));
    }
    return gi;
  }
  static MaskedPair maxout_fwd_k(const Tensor& x, int64_t pieces, int64_t dim) {
    const bool rec = records(x), fw = has_tangent(x);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(maxout_fwd[B].call(x, pieces, dim));
    auto [out, idx] = below_autograd([&] { return maxout_fwd[B].call(x, pieces, dim); });
    const int64_t d = c10::maybe_wrap_dim(dim, x.dim());
    if (rec) record(make_node<MaxoutBackward<B>>(idx, pieces, d), out, x);
    if (fw) set_tangent(out, maxout_gather(tangent(x), idx, pieces, d));
    return {out, idx};
  }
  static Tensor maxout_bwd_k(const Tensor& g, const Tensor& idx, int64_t pieces, int64_t dim) {
    const bool rec = graph_of(g), fw = has_tangent(g);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(maxout_bwd[B].call(g, idx, pieces, dim));
    Tensor gi = below_autograd([&] { return maxout_bwd[B].call(g, idx, pieces, dim); });
    const int64_t d = c10::maybe_wrap_dim(dim, g.dim());
    if (rec) record(make_node<MaxoutBwdBackward<B>>(idx, pieces, d), gi, g);
    if (fw) set_tangent(gi, maxout_grad<B>(tangent(g), idx, pieces, d));
    return gi;
  }
};

#define PYOPS_REGISTER_ACTIVATION_AUTOGRAD(m, B, SUFFIX)                     \
  do {                                                                       \
    using K = Kernels<B>;                                                    \
    m.impl("relu_fwd" SUFFIX, &K::relu_fwd_k);                               \
    m.impl("relu_fwd" SUFFIX "_", &K::relu_fwd_k_);                          \
    m.impl("relu_bwd" SUFFIX, &K::relu_bwd_k);                               \
    m.impl("leaky_relu_fwd" SUFFIX, &K::leaky_relu_fwd_k);                   \
    m.impl("leaky_relu_fwd" SUFFIX "_", &K::leaky_relu_fwd_k_);              \
    m.impl("leaky_relu_bwd" SUFFIX, &K::leaky_relu_bwd_k);                   \
    m.impl("elu_fwd" SUFFIX, &K::elu_fwd_k);                                 \
    m.impl("elu_fwd" SUFFIX "_", &K::elu_fwd_k_);                            \
    m.impl("elu_bwd" SUFFIX, &K::elu_bwd_k);                                 \
    m.impl("sigmoid_fwd" SUFFIX, &K::template saves_output_fwd<SigmoidOps>); \
    m.impl("sigmoid_bwd" SUFFIX, &K::template saves_output_bwd<SigmoidOps>); \
    m.impl("tanh_fwd" SUFFIX, &K::template saves_output_fwd<TanhOps>);       \
    m.impl("tanh_bwd" SUFFIX, &K::template saves_output_bwd<TanhOps>);       \
    m.impl("maxout_fwd" SUFFIX, &K::maxout_fwd_k);                           \
    m.impl("maxout_bwd" SUFFIX, &K::maxout_bwd_k);                           \
  } while (0)

// ---- the public ops -------------------------------------------------------------------------------

// Dtypes torch handles and no kernel takes (integers, complex) go to torch where torch has the op.
void check_kernel_dtype(const char* op, const Tensor& x) {
  TORCH_CHECK_TYPE(is_kernel_dtype(x.scalar_type()), "pyops.", op, ": input dtype ", x.scalar_type(),
                   " is not supported; expected float64, float32, float16 or bfloat16");
}

Tensor relu(const Tensor& x) {
  const Backend b = choose(Op::relu, "relu", x, nullptr, [&] { return pyops::relu(x); }, {&x});
  return b == Backend::kTorch ? at::relu(x) : std::get<0>(relu_fwd[b].call(x));
}
// A tensor whose negative or conjugate bit is set (a lazily negated view, x.conj().imag) goes to torch's
// in-place op, which resolves the bit: the dispatcher's math-bit fallback expects an in-place op to
// return its input, and the in-place primitives return the mask.
bool math_bits(const Tensor& x) { return x.is_neg() || x.is_conj(); }

Tensor& relu_(Tensor& x) {
  const Backend b = choose(Op::relu, "relu_", x, nullptr, [&] { return pyops::relu(x); }, {&x});
  if (b == Backend::kTorch || math_bits(x)) return at::relu_(x);
  relu_fwd_[b].call(x);
  return x;
}
Tensor leaky_relu(const Tensor& x, const at::Scalar& slope) {
  check_kernel_dtype("leaky_relu", x);
  const Backend b = choose(Op::leaky_relu, "leaky_relu", x, nullptr, [&] { return pyops::leaky_relu(x, slope); }, {&x});
  return b == Backend::kTorch ? at::leaky_relu(x, slope) : std::get<0>(leaky_relu_fwd[b].call(x, slope.toDouble()));
}
Tensor& leaky_relu_(Tensor& x, const at::Scalar& slope) {
  check_kernel_dtype("leaky_relu_", x);
  const Backend b =
      choose(Op::leaky_relu, "leaky_relu_", x, nullptr, [&] { return pyops::leaky_relu(x, slope); }, {&x});
  if (b == Backend::kTorch || math_bits(x)) return at::leaky_relu_(x, slope);
  leaky_relu_fwd_[b].call(x, slope.toDouble());
  return x;
}
Tensor elu(const Tensor& x, const at::Scalar& alpha) {
  check_kernel_dtype("elu", x);
  const Backend b = choose(Op::elu, "elu", x, nullptr, [&] { return pyops::elu(x, alpha); }, {&x});
  return b == Backend::kTorch ? at::elu(x, alpha) : elu_fwd[b].call(x, alpha.toDouble());
}
Tensor& elu_(Tensor& x, const at::Scalar& alpha) {
  check_kernel_dtype("elu_", x);
  const Backend b = choose(Op::elu, "elu_", x, nullptr, [&] { return pyops::elu(x, alpha); }, {&x});
  if (b == Backend::kTorch || math_bits(x)) return at::elu_(x, alpha);
  elu_fwd_[b].call(x, alpha.toDouble());
  return x;
}
Tensor sigmoid(const Tensor& x) {
  const Backend b = choose(Op::sigmoid, "sigmoid", x, nullptr, [&] { return pyops::sigmoid(x); }, {&x});
  return b == Backend::kTorch ? at::sigmoid(x) : sigmoid_fwd[b].call(x);
}
Tensor tanh(const Tensor& x) {
  const Backend b = choose(Op::tanh, "tanh", x, nullptr, [&] { return pyops::tanh(x); }, {&x});
  return b == Backend::kTorch ? at::tanh(x) : tanh_fwd[b].call(x);
}
Tensor maxout(const Tensor& x, int64_t pieces, int64_t dim) {
  check_kernel_dtype("maxout", x);
  TORCH_CHECK_VALUE(x.dim() > 0, "pyops.maxout: input must have at least one dimension, got a 0-d tensor");
  TORCH_CHECK_VALUE(pieces >= 1 && pieces <= 256, "pyops.maxout: pieces must be an int in [1, 256] (indices are ",
                    "saved as uint8), got ", pieces);
  TORCH_CHECK_VALUE(dim >= -x.dim() && dim < x.dim(), "pyops.maxout: dim=", dim, " is out of range for a ", x.dim(),
                    "-d input");
  const int64_t d = c10::maybe_wrap_dim(dim, x.dim());
  TORCH_CHECK_VALUE(x.sym_size(d) % pieces == 0, "pyops.maxout: pieces=", pieces, " does not divide the size of dim ",
                    d, " (", x.sym_size(d), ")");
  const Backend b = choose(Op::maxout, "maxout", x, nullptr, [&] { return pyops::maxout(x, pieces, dim); }, {&x});
  if (b == Backend::kTorch)  // the composite: torch.max sends the gradient to the first maximal piece
    return std::get<0>(x.unflatten_symint(d, {x.sym_size(d) / pieces, pieces}).max(d + 1));
  return std::get<0>(maxout_fwd[b].call(x, pieces, d));
}

}  // namespace

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  PYOPS_REGISTER_ACTIVATION_AUTOGRAD(m, Backend::kNative, "");
  PYOPS_REGISTER_ACTIVATION_AUTOGRAD(m, Backend::kTriton, "_triton");
}

TORCH_LIBRARY_IMPL(pyops, CompositeImplicitAutograd, m) {
  m.impl("relu", &relu);
  m.impl("relu_", &relu_);
  m.impl("leaky_relu", &leaky_relu);
  m.impl("leaky_relu_", &leaky_relu_);
  m.impl("elu", &elu);
  m.impl("elu_", &elu_);
  m.impl("sigmoid", &sigmoid);
  m.impl("tanh", &tanh);
  m.impl("maxout", &maxout);
}

}  // namespace pyops
