// The activation family above the kernels: the public ops (pyops::relu, ...: pick the backend, call
// its primitive) and the derivatives, written once here as Autograd kernels of the primitives of
// both backends, so that every primitive is differentiable on its own (opcheck, double backward)
// and torch.compile traces through them. Math: pyops/ops/activation.py's docstring.
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
#include <ATen/ops/zeros.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <tuple>

#include "common/backend.h"
#include "common/prim.h"
#include "common/checks.h"

namespace pyops {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
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
// Whether autograd must record this call; forward-mode AD (dual tensors) is refused clearly.
bool records(const char* op, const Tensor& t) {
  TORCH_CHECK(!t._fw_grad(/*level=*/0).defined(), "pyops.", op,
              ": forward-mode AD (dual tensors, torch.func.jvp) is not supported");
  return at::GradMode::is_enabled() && t.requires_grad();
}

// g brought to the strides a kernel walks (a mask or a saved tensor's memory order).
Tensor to_layout(const Tensor& g, const c10::SymIntArrayRef strides) {
  if (g.sym_strides() == strides) return g;
  return at::empty_strided_symint(g.sym_sizes(), strides, g.options()).copy_(g);
}

// Masked backward from a mask alone gives a gradient that does not depend on x, so a second
// backward would find no path to x, where torch's (which saves the output) returns zeros. A zero-size
// output of the forward, saved, links the gradient back to the forward's node when a graph is
// recorded (gi - 0 changes no value, -0.0 included).
Tensor link_to_forward(const Tensor& gi, const Tensor& anchor) {
  return at::GradMode::is_enabled() ? gi - anchor.sum() : gi;
}

// ---- relu / leaky_relu: save a 1-bit mask --------------------------------------------------------
// slope: leaky_relu's negative_slope; none for relu.
template <Backend B>
struct MaskedBwdFn : torch::autograd::Function<MaskedBwdFn<B>> {
  static Tensor call(const Tensor& g, const Tensor& mask, std::optional<double> slope) {
    return slope ? leaky_relu_bwd[B].call(g, mask, *slope) : relu_bwd[B].call(g, mask);
  }
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& mask, std::optional<double> slope) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor gi = call(g, mask, slope);
    ctx->save_for_backward({mask});
    ctx->saved_data["slope"] = slope;
    ctx->saved_data["strides"] = gi.sym_strides();
    return gi;
  }
  // Linear in g; the mask has no gradient.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor mask = ctx->get_saved_variables()[0];
    const auto slope = ctx->saved_data["slope"].toOptional<double>();
    const Tensor gg = to_layout(grads[0], ctx->saved_data["strides"].toSymIntVector());
    return {call(gg, mask, slope), Tensor(), Tensor()};
  }
};

template <Backend B>
struct MaskedFwdFn : torch::autograd::Function<MaskedFwdFn<B>> {
  // In place, the mask (the primitive's result) goes to *mask_out.
  static variable_list forward(AutogradContext* ctx, Tensor x, std::optional<double> slope, bool inplace,
                               Tensor* mask_out) {
    at::AutoDispatchBelowADInplaceOrView below;
    if (slope) ctx->saved_data["slope"] = *slope;
    if (inplace) {  // one output: autograd cannot rebase a view's history onto several
      const Tensor mask = slope ? leaky_relu_fwd_[B].call(x, *slope) : relu_fwd_[B].call(x);
      ctx->mark_dirty({x});
      ctx->save_for_backward({mask});
      *mask_out = mask;
      ctx->saved_data["strides"] = x.sym_strides();
      return {x};
    }
    auto [out, mask] = slope ? leaky_relu_fwd[B].call(x, *slope) : relu_fwd[B].call(x);
    // The anchor (see link_to_forward) has no elements but out's sizes and strides after a leading
    // 0, so it also carries the layout backward needs.
    auto sizes = out.sym_sizes().vec(), strides = out.sym_strides().vec();
    sizes.insert(sizes.begin(), 0);
    strides.insert(strides.begin(), 1);
    Tensor anchor = at::empty_strided_symint(sizes, strides, x.options());
    ctx->mark_non_differentiable({mask});
    ctx->set_materialize_grads(false);  // the mask and the anchor get no gradients to fill
    ctx->save_for_backward({mask, anchor});
    return {out, mask, anchor};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto found = ctx->saved_data.find("slope");
    const auto slope = found == ctx->saved_data.end() ? std::nullopt : std::optional<double>(found->second.toDouble());
    const bool inplace = saved.size() == 1;
    const Tensor* anchor = inplace ? nullptr : &saved[1];
    const auto strides_saved = inplace ? ctx->saved_data["strides"].toSymIntVector() : std::vector<c10::SymInt>();
    const c10::SymIntArrayRef strides = inplace ? c10::SymIntArrayRef(strides_saved) : anchor->sym_strides().slice(1);
    // Only the anchor's gradient arrives on a second backward: the output's is zero then.
    const Tensor g = grads[0].defined() ? to_layout(grads[0], strides)
                                        : at::zeros_symint(anchor->sym_sizes().slice(1), anchor->options());
    Tensor gi = at::GradMode::is_enabled() && g.requires_grad() ? MaskedBwdFn<B>::apply(g, saved[0], slope)
                                                                : MaskedBwdFn<B>::call(g, saved[0], slope);
    return {inplace ? gi : link_to_forward(gi, *anchor), Tensor(), Tensor(), Tensor()};
  }
};

// ---- elu: saves its input (out of place) or output (in place), as torch ----------------------------
template <Backend B>
struct EluBwdFn : torch::autograd::Function<EluBwdFn<B>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& saved, double alpha, bool is_result) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({g, saved});
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["is_result"] = is_result;
    return elu_bwd[B].call(g, saved, alpha, is_result);
  }
  // d/dg: elu_bwd itself (linear in g); d/dsaved: g * d2y/dx2 expressed in saved, where saved <= 0.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const Tensor &g = v[0], &s = v[1], &gg = grads[0];
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const bool is_result = ctx->saved_data["is_result"].toBool();
    const Tensor d_s = is_result ? gg * g : gg * g * alpha * at::exp(s);
    return {elu_bwd[B].call(gg, s, alpha, is_result), at::where(s <= 0, d_s, 0), Tensor(), Tensor()};
  }
};

template <Backend B>
struct EluFwdFn : torch::autograd::Function<EluFwdFn<B>> {
  static Tensor forward(AutogradContext* ctx, Tensor x, double alpha, bool inplace) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->saved_data["alpha"] = alpha;
    ctx->saved_data["is_result"] = inplace;
    if (inplace) {
      elu_fwd_[B].call(x, alpha);
      ctx->mark_dirty({x});
      ctx->save_for_backward({x});
      return x;
    }
    ctx->save_for_backward({x});
    return elu_fwd[B].call(x, alpha);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const double alpha = ctx->saved_data["alpha"].toDouble();
    const bool is_result = ctx->saved_data["is_result"].toBool();
    TORCH_CHECK(!is_result || alpha >= 0, "pyops.elu: in-place elu backward calculation is triggered with a negative ",
                "alpha (", alpha, "), which is not supported (the input cannot be recovered from the output); call ",
                "the out-of-place version instead.");
    const Tensor saved = ctx->get_saved_variables()[0];
    const Tensor& g = grads[0];
    const bool graph = at::GradMode::is_enabled() && (g.requires_grad() || saved.requires_grad());
    return {graph ? EluBwdFn<B>::apply(g, saved, alpha, is_result) : elu_bwd[B].call(g, saved, alpha, is_result),
            Tensor(), Tensor()};
  }
};

// ---- sigmoid, tanh: save their output y --------------------------------------------------------------
struct SigmoidOps {
  static constexpr const char* name = "sigmoid";
  static const auto& fwd(Backend b) { return sigmoid_fwd[b]; }
  static const auto& bwd(Backend b) { return sigmoid_bwd[b]; }
  static Tensor d_saved(const Tensor& gg, const Tensor& g, const Tensor& y) { return gg * g * (1 - 2 * y); }
};
struct TanhOps {
  static constexpr const char* name = "tanh";
  static const auto& fwd(Backend b) { return tanh_fwd[b]; }
  static const auto& bwd(Backend b) { return tanh_bwd[b]; }
  static Tensor d_saved(const Tensor& gg, const Tensor& g, const Tensor& y) { return -2 * gg * g * y; }
};

template <Backend B, class Ops>
struct SavesOutputBwdFn : torch::autograd::Function<SavesOutputBwdFn<B, Ops>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& y) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({g, y});
    return Ops::bwd(B).call(g, y);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto v = ctx->get_saved_variables();
    return {Ops::bwd(B).call(grads[0], v[1]), Ops::d_saved(grads[0], v[0], v[1])};
  }
};

template <Backend B, class Ops>
struct SavesOutputFn : torch::autograd::Function<SavesOutputFn<B, Ops>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x) {
    at::AutoDispatchBelowADInplaceOrView below;
    Tensor y = Ops::fwd(B).call(x);
    ctx->save_for_backward({y});
    return y;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor y = ctx->get_saved_variables()[0];
    const Tensor& g = grads[0];
    const bool graph = at::GradMode::is_enabled() && (g.requires_grad() || y.requires_grad());
    return {graph ? SavesOutputBwdFn<B, Ops>::apply(g, y) : Ops::bwd(B).call(g, y)};
  }
};

// ---- maxout: saves uint8 indices ---------------------------------------------------------------------
// The derivative of maxout_bwd in its gradient: each group's chosen piece.
Tensor maxout_gather(const Tensor& gg, const Tensor& idx, int64_t pieces, int64_t dim) {
  const Tensor groups = gg.unflatten_symint(dim, {gg.sym_size(dim) / pieces, pieces});
  return groups.gather(dim + 1, idx.to(at::kLong).unsqueeze(dim + 1)).squeeze(dim + 1);
}

template <Backend B>
struct MaxoutBwdFn : torch::autograd::Function<MaxoutBwdFn<B>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& g, const Tensor& idx, int64_t pieces, int64_t dim) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({idx});
    ctx->saved_data["pieces"] = pieces;
    ctx->saved_data["dim"] = c10::maybe_wrap_dim(dim, g.dim());
    return maxout_bwd[B].call(g, idx, pieces, dim);
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    return {maxout_gather(grads[0], ctx->get_saved_variables()[0], ctx->saved_data["pieces"].toInt(),
                          ctx->saved_data["dim"].toInt()),
            Tensor(), Tensor(), Tensor()};
  }
};

template <Backend B>
struct MaxoutFwdFn : torch::autograd::Function<MaxoutFwdFn<B>> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, int64_t pieces, int64_t dim) {
    at::AutoDispatchBelowADInplaceOrView below;
    auto [out, idx] = maxout_fwd[B].call(x, pieces, dim);
    ctx->mark_non_differentiable({idx});
    ctx->save_for_backward({idx});
    ctx->saved_data["pieces"] = pieces;
    ctx->saved_data["dim"] = dim;
    return {out, idx};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor idx = ctx->get_saved_variables()[0];
    const int64_t pieces = ctx->saved_data["pieces"].toInt(), dim = ctx->saved_data["dim"].toInt();
    const Tensor& g = grads[0];
    const bool graph = at::GradMode::is_enabled() && g.requires_grad();
    return {graph ? MaxoutBwdFn<B>::apply(g, idx, pieces, dim) : maxout_bwd[B].call(g, idx, pieces, dim), Tensor(),
            Tensor()};
  }
};

// ---- the Autograd kernels of the primitives: record through the functions above when a graph is
// built, else go straight to the kernel ----------------------------------------------------------------
#define PYOPS_BELOW_AUTOGRAD(call)              \
  do {                                          \
    at::AutoDispatchBelowADInplaceOrView below; \
    return call;                                \
  } while (0)

// In place without recording: bump the version counter, as torch's in-place ops do.
#define PYOPS_BELOW_AUTOGRAD_INPLACE(x, call)     \
  do {                                            \
    auto result = [&] {                           \
      at::AutoDispatchBelowADInplaceOrView below; \
      return call;                                \
    }();                                          \
    torch::autograd::impl::bump_version(x);       \
    return result;                                \
  } while (0)

template <Backend B>
struct Kernels {
  static MaskedPair relu_fwd_k(const Tensor& x) {
    if (!records("relu", x)) PYOPS_BELOW_AUTOGRAD(relu_fwd[B].call(x));
    auto r = MaskedFwdFn<B>::apply(x, std::nullopt, false, nullptr);
    return {r[0], r[1]};
  }
  static Tensor relu_fwd_k_(Tensor& x) {
    if (!records("relu_", x)) PYOPS_BELOW_AUTOGRAD_INPLACE(x, relu_fwd_[B].call(x));
    Tensor mask;
    MaskedFwdFn<B>::apply(x, std::nullopt, true, &mask);
    return mask;
  }
  static MaskedPair leaky_relu_fwd_k(const Tensor& x, double slope) {
    if (!records("leaky_relu", x)) PYOPS_BELOW_AUTOGRAD(leaky_relu_fwd[B].call(x, slope));
    auto r = MaskedFwdFn<B>::apply(x, slope, false, nullptr);
    return {r[0], r[1]};
  }
  static Tensor leaky_relu_fwd_k_(Tensor& x, double slope) {
    if (!records("leaky_relu_", x)) PYOPS_BELOW_AUTOGRAD_INPLACE(x, leaky_relu_fwd_[B].call(x, slope));
    Tensor mask;
    MaskedFwdFn<B>::apply(x, slope, true, &mask);
    return mask;
  }
  static Tensor relu_bwd_k(const Tensor& g, const Tensor& mask) {
    if (!records("relu_bwd", g)) PYOPS_BELOW_AUTOGRAD(relu_bwd[B].call(g, mask));
    return MaskedBwdFn<B>::apply(g, mask, std::nullopt);
  }
  static Tensor leaky_relu_bwd_k(const Tensor& g, const Tensor& mask, double slope) {
    if (!records("leaky_relu_bwd", g)) PYOPS_BELOW_AUTOGRAD(leaky_relu_bwd[B].call(g, mask, slope));
    return MaskedBwdFn<B>::apply(g, mask, slope);
  }
  static Tensor elu_fwd_k(const Tensor& x, double alpha) {
    if (!records("elu", x)) PYOPS_BELOW_AUTOGRAD(elu_fwd[B].call(x, alpha));
    return EluFwdFn<B>::apply(x, alpha, false);
  }
  static void elu_fwd_k_(Tensor& x, double alpha) {
    if (!records("elu_", x)) {
      {
        at::AutoDispatchBelowADInplaceOrView below;
        elu_fwd_[B].call(x, alpha);
      }
      torch::autograd::impl::bump_version(x);
      return;
    }
    EluFwdFn<B>::apply(x, alpha, true);
  }
  static Tensor elu_bwd_k(const Tensor& g, const Tensor& saved, double alpha, bool is_result) {
    if (!records("elu_bwd", g) && !(at::GradMode::is_enabled() && saved.requires_grad()))
      PYOPS_BELOW_AUTOGRAD(elu_bwd[B].call(g, saved, alpha, is_result));
    return EluBwdFn<B>::apply(g, saved, alpha, is_result);
  }
  template <class Ops>
  static Tensor saves_output_fwd(const Tensor& x) {
    if (!records(Ops::name, x)) PYOPS_BELOW_AUTOGRAD(Ops::fwd(B).call(x));
    return SavesOutputFn<B, Ops>::apply(x);
  }
  template <class Ops>
  static Tensor saves_output_bwd(const Tensor& g, const Tensor& y) {
    if (!records(Ops::name, g) && !(at::GradMode::is_enabled() && y.requires_grad()))
      PYOPS_BELOW_AUTOGRAD(Ops::bwd(B).call(g, y));
    return SavesOutputBwdFn<B, Ops>::apply(g, y);
  }
  static MaskedPair maxout_fwd_k(const Tensor& x, int64_t pieces, int64_t dim) {
    if (!records("maxout", x)) PYOPS_BELOW_AUTOGRAD(maxout_fwd[B].call(x, pieces, dim));
    auto r = MaxoutFwdFn<B>::apply(x, pieces, dim);
    return {r[0], r[1]};
  }
  static Tensor maxout_bwd_k(const Tensor& g, const Tensor& idx, int64_t pieces, int64_t dim) {
    if (!records("maxout_bwd", g)) PYOPS_BELOW_AUTOGRAD(maxout_bwd[B].call(g, idx, pieces, dim));
    return MaxoutBwdFn<B>::apply(g, idx, pieces, dim);
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
  const Backend b = resolve("relu", x, auto_min_numel::relu);
  return b == Backend::kTorch ? at::relu(x) : std::get<0>(relu_fwd[b].call(x));
}
Tensor& relu_(Tensor& x) {
  const Backend b = resolve("relu_", x, auto_min_numel::relu);
  if (b == Backend::kTorch) return at::relu_(x);
  relu_fwd_[b].call(x);
  return x;
}
Tensor leaky_relu(const Tensor& x, const at::Scalar& slope) {
  check_kernel_dtype("leaky_relu", x);
  const Backend b = resolve("leaky_relu", x, auto_min_numel::leaky_relu);
  return b == Backend::kTorch ? at::leaky_relu(x, slope) : std::get<0>(leaky_relu_fwd[b].call(x, slope.toDouble()));
}
Tensor& leaky_relu_(Tensor& x, const at::Scalar& slope) {
  check_kernel_dtype("leaky_relu_", x);
  const Backend b = resolve("leaky_relu_", x, auto_min_numel::leaky_relu);
  if (b == Backend::kTorch) return at::leaky_relu_(x, slope);
  leaky_relu_fwd_[b].call(x, slope.toDouble());
  return x;
}
Tensor elu(const Tensor& x, const at::Scalar& alpha) {
  check_kernel_dtype("elu", x);
  const Backend b = resolve("elu", x, auto_min_numel::elu);
  return b == Backend::kTorch ? at::elu(x, alpha) : elu_fwd[b].call(x, alpha.toDouble());
}
Tensor& elu_(Tensor& x, const at::Scalar& alpha) {
  check_kernel_dtype("elu_", x);
  const Backend b = resolve("elu_", x, auto_min_numel::elu);
  if (b == Backend::kTorch) return at::elu_(x, alpha);
  elu_fwd_[b].call(x, alpha.toDouble());
  return x;
}
Tensor sigmoid(const Tensor& x) {
  const Backend b = resolve("sigmoid", x, auto_min_numel::sigmoid);
  return b == Backend::kTorch ? at::sigmoid(x) : sigmoid_fwd[b].call(x);
}
Tensor tanh(const Tensor& x) {
  const Backend b = resolve("tanh", x, auto_min_numel::tanh);
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
  const Backend b = resolve("maxout", x, auto_min_numel::maxout);
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
