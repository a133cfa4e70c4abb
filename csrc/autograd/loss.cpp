// The loss family above the kernels: the public ops (pyops::l1_loss, ...: pick the backend, call its
// primitive) and the derivatives, written once here as Autograd kernels of the primitives of both
// backends. The reduced forms compute the gradient in the forward pass (csrc/loss.h), so backward
// only scales it by the incoming 0-d gradient, and hands it on as it is when that is 1 (on the CPU,
// where reading it costs no synchronisation). Math: pyops/ops/loss.py's docstring.
#include <ATen/TensorOperators.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/broadcast_tensors.h>
#include <ATen/ops/cross_entropy_loss.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/huber_loss.h>
#include <ATen/ops/l1_loss.h>
#include <ATen/ops/mse_loss.h>
#include <ATen/ops/sqrt.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

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

void refuse_forward_ad(const char* op, const Tensor& t) {
  TORCH_CHECK(!t.defined() || !t._fw_grad(/*level=*/0).defined(), "pyops.", op,
              ": forward-mode AD (dual tensors, torch.func.jvp) is not supported");
}

// The derivative is written once, for first-order gradients: the gradient saved by the forward has no
// graph of its own, so a second derivative would silently miss terms. Refuse it clearly instead.
void refuse_double_backward(const char* op) {
  TORCH_CHECK(!at::GradMode::is_enabled(), "pyops.", op,
              ": double backward (create_graph=True) is not supported; use the torch backend ",
              "(pyops.backend(\"torch\")) for higher-order gradients");
}

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

// ---- L1 / MSE / Huber: hand-written nodes (csrc/common/node.h), edges x and t -----------------------
template <Backend B>
struct PointwiseLossBackward : Node {
  SavedVariable a_, b_;  // x and t (reduction none: backward needs both, as torch's), or the gradient
  int64_t kind_ = 0;
  double delta_ = 1.0;
  bool none_ = false;

  variable_list apply(variable_list&& grads) override {
    refuse_double_backward(kKindNames[kind_]);
    if (!grads[0].defined()) return {Tensor(), Tensor()};
    const Tensor gi = none_ ? pointwise_loss_bwd[B].call(grads[0], a_.unpack(), b_.unpack(), kind_, delta_)
                            : scale_saved(a_.unpack(), grads[0]);
    // loss(x - t): the target's gradient is the input's, negated
    return {should_compute_output(0) ? gi : Tensor(), should_compute_output(1) ? -gi : Tensor()};
  }
  std::string name() const override { return "pyops::PointwiseLossBackward"; }
  void release_variables() override {
    a_.reset_data();
    b_.reset_data();
  }
};

// ---- softmax cross entropy: saves the gradient (input's dtype), nothing else of the input's size --
template <Backend B>
struct CrossEntropyBackward : Node {
  SavedVariable g_;
  bool none_ = false, batched_ = false;

  variable_list apply(variable_list&& grads) override {
    refuse_double_backward("cross_entropy");
    const Tensor& g = grads[0];
    if (!g.defined()) return {Tensor()};
    const Tensor saved = g_.unpack();
    if (!none_) return {scale_saved(saved, g)};
    return {saved * (batched_ ? g.unsqueeze(1) : g)};  // one gradient a row: broadcast over the classes
  }
  std::string name() const override { return "pyops::CrossEntropyBackward"; }
  void release_variables() override { g_.reset_data(); }
};

// ---- the Autograd kernels of the primitives: record a node when a graph is built, else go straight
// to the kernel ------------------------------------------------------------------------------------------
// The reduced forms' second result: the saved gradient, detached, when asked for; else empty.
Tensor second_result(const Tensor& g, const Tensor& x, bool grad) {
  return grad ? g.detach() : at::empty({0}, x.options());
}

template <Backend B>
struct Kernels {
  static Pair pointwise_loss_fwd_k(const Tensor& x, const Tensor& t, int64_t kind, int64_t reduction, double delta,
                                   bool grad) {
    refuse_forward_ad("pointwise_loss_fwd", x);
    refuse_forward_ad("pointwise_loss_fwd", t);
    if (!grad_recorded(x) && !grad_recorded(t))
      PYOPS_BELOW_AUTOGRAD(pointwise_loss_fwd[B].call(x, t, kind, reduction, delta, grad));
    const bool none = reduction == int64_t(Reduction::kNone);
    Tensor out, second;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(out, second) = pointwise_loss_fwd[B].call(x, t, kind, reduction, delta, !none);
    }
    auto node = make_node<PointwiseLossBackward<B>>();
    record(node, out, x, t);
    node->kind_ = kind;
    node->delta_ = delta;
    node->none_ = none;
    if (none) {  // elementwise: backward needs x and t, as torch's
      node->a_ = SavedVariable(x, /*is_output=*/false);
      node->b_ = SavedVariable(t, /*is_output=*/false);
      return {out, second};
    }
    node->a_ = SavedVariable(second, /*is_output=*/false);
    return {out, second_result(second, x, grad)};
  }
  static Tensor pointwise_loss_bwd_k(const Tensor& g, const Tensor& x, const Tensor& t, int64_t kind, double delta) {
    TORCH_CHECK(!grad_recorded(g) && !grad_recorded(x) && !grad_recorded(t),
                "pyops::pointwise_loss_bwd: is not differentiable (double backward is not supported)");
    PYOPS_BELOW_AUTOGRAD(pointwise_loss_bwd[B].call(g, x, t, kind, delta));
  }
  static Pair cross_entropy_fwd_k(const Tensor& x, const Tensor& t, const std::optional<Tensor>& w,
                                  int64_t ignore_index, int64_t reduction, double smoothing, bool grad) {
    refuse_forward_ad("cross_entropy_fwd", x);
    TORCH_CHECK(!grad_recorded(t) && !(w.has_value() && grad_recorded(*w)), "pyops::cross_entropy_fwd: gradients ",
                "for target and weight are not supported (pyops.functional.cross_entropy hands such calls to torch)");
    if (!grad_recorded(x))
      PYOPS_BELOW_AUTOGRAD(cross_entropy_fwd[B].call(x, t, w, ignore_index, reduction, smoothing, grad));
    Tensor loss, g;
    {
      at::AutoDispatchBelowADInplaceOrView below;
      std::tie(loss, g) = cross_entropy_fwd[B].call(x, t, w, ignore_index, reduction, smoothing, true);
    }
    auto node = make_node<CrossEntropyBackward<B>>();
    record(node, loss, x);
    node->g_ = SavedVariable(g, /*is_output=*/false);
    node->none_ = reduction == int64_t(Reduction::kNone);
    node->batched_ = x.dim() > 1;
    return {loss, second_result(g, x, grad)};
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
Tensor pointwise_public(LossKind kind, const Tensor& x, const Tensor& t, int64_t reduction, double delta,
                        int64_t min_numel, const TorchFn& torch_fn) {
  const char* op = kKindNames[int64_t(kind)];
  check_reduction_value(op, reduction);
  Tensor xe = autocast_to_float(x), te = autocast_to_float(t);
  if (!kernel_pair(xe, te)) return torch_fn(xe, te);
  if (!(xe.sym_sizes() == te.sym_sizes())) {  // torch broadcasts (its Python function warns)
    auto both = at::broadcast_tensors({xe, te});
    xe = both[0];
    te = both[1];
  }
  const Backend b = resolve(op, xe, min_numel);
  if (b == Backend::kTorch) return torch_fn(xe, te);
  return std::get<0>(pointwise_loss_fwd[b].call(xe, te, int64_t(kind), reduction, delta, false));
}

Tensor l1_loss(const Tensor& x, const Tensor& t, int64_t reduction) {
  return pointwise_public(LossKind::kL1, x, t, reduction, 0.0, auto_min_numel::l1_loss,
                          [&](const Tensor& a, const Tensor& b) { return at::l1_loss(a, b, reduction); });
}
Tensor mse_loss(const Tensor& x, const Tensor& t, int64_t reduction) {
  return pointwise_public(LossKind::kMse, x, t, reduction, 0.0, auto_min_numel::mse_loss,
                          [&](const Tensor& a, const Tensor& b) { return at::mse_loss(a, b, reduction); });
}
Tensor huber_loss(const Tensor& x, const Tensor& t, int64_t reduction, double delta) {
  // RuntimeError with torch's words, as torch's huber_loss raises
  TORCH_CHECK(delta > 0, "pyops.huber_loss: huber_loss does not support non-positive values for delta. (got ", delta,
              ")");
  return pointwise_public(LossKind::kHuber, x, t, reduction, delta, auto_min_numel::huber_loss,
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
  // what the kernels do not take goes to torch: other dtypes, mixed devices, and gradients for
  // probability targets or class weights
  if (!is_kernel_dtype(x.scalar_type()) || x.dim() < 1 || t.device() != x.device()) return torch_fn();
  // uint8 class indices, and an unbatched input's one-element target, are torch's forms alone
  if (!probs && (t.scalar_type() != at::kLong || (x.dim() == 1 && t.dim() == 1))) return torch_fn();
  if (probs && (t.scalar_type() != x.scalar_type() || grad_recorded(t))) return torch_fn();
  if (w_defined &&
      (weight->scalar_type() != x.scalar_type() || weight->device() != x.device() || grad_recorded(*weight)))
    return torch_fn();
  const Backend b = resolve("cross_entropy", x, auto_min_numel::cross_entropy);
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
