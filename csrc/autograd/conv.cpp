// The conv family above the kernels: the public ops (pyops::conv2d, pyops::conv2d.padding: argument
// forms, backend choice) and the derivatives, written once as Autograd kernels of the three primitives
// of both backends. Convolution is bilinear in (input, weight), so every derivative, of any order, is
// again one of the three primitives:
//   y = conv(x, w) + b                  dx = bwd_input(g, w), dw = bwd_weight(g, x), db = sum g
//   gx = bwd_input(g, w)                d/dg <- conv(ggx, w),       d/dw <- bwd_weight(g, ggx)
//   (gw, gb) = bwd_weight(g, x)         d/dg <- conv(x, ggw) + ggb, d/dx <- bwd_input(g, ggw)
// The fused activation's derivative is the activation family's primitive (relu_bwd with the saved mask,
// leaky_relu_bwd, elu_bwd with the saved output). A tangent (forward mode) is the same bilinear map, one
// term per operand that carries one: d conv(x, w) = conv(dx, w) + conv(x, dw). Math: pyops/ops/conv.py.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "common/backend.h"
#include "common/checks.h"
#include "common/node.h"
#include "common/prim.h"
#include "conv.h"

namespace pyops {
namespace {

using at::IntArrayRef;
using at::Tensor;
using torch::autograd::variable_list;

// ---- the primitives of each backend, looked up once ----------------------------------------------

using Pair = std::tuple<Tensor, Tensor>;
const Prim<Pair(const Tensor&, const Tensor&, const std::optional<Tensor>&, IntArrayRef, IntArrayRef, IntArrayRef,
                int64_t, int64_t, double)>
    conv2d_fwd("pyops::conv2d_fwd", "pyops::conv2d_fwd_triton");
using Triple = std::tuple<Tensor, Tensor, Tensor>;
const Prim<Triple(const Tensor&, const Tensor&, const std::optional<Tensor>&, IntArrayRef, IntArrayRef, IntArrayRef,
                  int64_t)>
    conv2d_fwd_stats("pyops::conv2d_fwd_stats", "pyops::conv2d_fwd_stats_triton");
const Prim<Tensor(const Tensor&, const Tensor&, c10::SymIntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, int64_t)>
    conv2d_bwd_input("pyops::conv2d_bwd_input", "pyops::conv2d_bwd_input_triton");
const Prim<Pair(const Tensor&, const Tensor&, c10::SymIntArrayRef, IntArrayRef, IntArrayRef, IntArrayRef, int64_t,
                bool)>
    conv2d_bwd_weight("pyops::conv2d_bwd_weight", "pyops::conv2d_bwd_weight_triton");
// the activation family's backward primitives
const Prim<Tensor(const Tensor&, const Tensor&)> relu_bwd("pyops::relu_bwd", "pyops::relu_bwd_triton");
const Prim<Tensor(const Tensor&, const Tensor&, double)> leaky_relu_bwd("pyops::leaky_relu_bwd",
                                                                        "pyops::leaky_relu_bwd_triton");
const Prim<Tensor(const Tensor&, const Tensor&, double, bool)> elu_bwd("pyops::elu_bwd", "pyops::elu_bwd_triton");

// stride, padding, dilation and groups, as saved between forward and backward
struct Params {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

Tensor fwd(Backend b, const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, const Params& p) {
  return std::get<0>(
      conv2d_fwd[b].call(x, w, bias, p.stride, p.padding, p.dilation, p.groups, int64_t(Act::kNone), 0.0));
}
Tensor bwd_input(Backend b, const Tensor& g, const Tensor& w, c10::SymIntArrayRef input_size, const Params& p) {
  return conv2d_bwd_input[b].call(g, w, input_size, p.stride, p.padding, p.dilation, p.groups);
}
Pair bwd_weight(Backend b, const Tensor& g, const Tensor& x, c10::SymIntArrayRef weight_size, const Params& p,
                bool bias) {
  return conv2d_bwd_weight[b].call(g, x, weight_size, p.stride, p.padding, p.dilation, p.groups, bias);
}

// The tangent of conv2d_fwd's result (forward mode): act'(z) * (conv(dx, w) + conv(x, dw) + db), each
// term present where its operand has a tangent; act' as in backward (the mask, or the output for elu).
template <Backend B>
Tensor conv_tangent(const Tensor& x, const Tensor& w, const Tensor& bias, const Tensor& out, const Tensor& mask,
                    const Params& p, int64_t act, double scalar) {
  const Tensor dx = tangent(x), dw = tangent(w), db = tangent(bias);
  Tensor dz;
  if (dx.defined()) dz = fwd(B, dx, primal(w), std::nullopt, p);
  if (dw.defined()) dz = add_tangents(dz, fwd(B, primal(x), dw, std::nullopt, p));
  if (db.defined()) {
    const Tensor db4 = db.view_symint({1, db.sym_size(0), 1, 1});
    dz = dz.defined() ? dz + db4 : db4.expand_symint(out.sym_sizes());
  }
  switch (Act(act)) {
    case Act::kRelu:
      return relu_bwd[B].call(to_layout(dz, out.sym_strides()), mask);
    case Act::kLeakyRelu:
      return leaky_relu_bwd[B].call(to_layout(dz, out.sym_strides()), mask, scalar);
    case Act::kElu:
      return elu_bwd[B].call(dz, out, scalar, /*is_result=*/true);
    default:
      return dz;
  }
}

// ---- conv2d_fwd: a hand-written node (csrc/common/node.h), edges x, w, bias ------------------------
// Its backward calls the primitives through their Autograd kernels, which record the next order's
// derivative where a graph is built and set tangents where an operand has one.
template <Backend B>
struct ConvBackward : Node {
  SavedVariable x_, w_, kept_;  // kept: the activation's mask, or the output (elu)
  Params p_;
  Act act_ = Act::kNone;
  double scalar_ = 0;
  bool bias_ = false;
  c10::SymDimVector out_strides_;

  variable_list apply(variable_list&& grads) override {
    variable_list result(3);
    if (!grads[0].defined()) return result;
    const Tensor x = x_.unpack(), w = w_.unpack(), kept = kept_.unpack(getptr());
    // the incoming gradient in the output's layout (torch's: channels_last when the input or the weight
    // is), so that the input gradient, laid out as it, is in torch's layout too
    Tensor g = grads[0].contiguous(conv_format(x, w));
    if (act_ != Act::kNone) {
      g = to_layout(g, out_strides_);
      g = act_ == Act::kRelu        ? relu_bwd[B].call(g, kept)
          : act_ == Act::kLeakyRelu ? leaky_relu_bwd[B].call(g, kept, scalar_)
                                    : elu_bwd[B].call(g, kept, scalar_, /*is_result=*/true);
    }
    const bool need_x = should_compute_output(0), need_w = should_compute_output(1),
               need_b = bias_ && should_compute_output(2);
    if (need_x) result[0] = bwd_input(B, g, w, x.sym_sizes(), p_);
    if (need_w || need_b) {
      auto [gw, gb] = bwd_weight(B, g, x, w.sym_sizes(), p_, need_b);
      // in torch's layout: channels_last when the input or the weight is (as the output)
      if (need_w) result[1] = gw.contiguous(conv_format(x, w));
      if (need_b) result[2] = gb;
    }
    return result;
  }
  std::string name() const override { return "pyops::ConvolutionBackward"; }
  void release_variables() override {
    x_.reset_data();
    w_.reset_data();
    kept_.reset_data();
  }
};

// ---- conv2d_bwd_input: bilinear in (grad_out, weight), edges g, w ---------------------------------
template <Backend B>
struct ConvBwdInputBackward : Node {
  SavedVariable g_, w_;
  Params p_;
  ConvBwdInputBackward(const Tensor& g, const Tensor& w, Params p)
      : g_(g, /*is_output=*/false), w_(w, /*is_output=*/false), p_(std::move(p)) {}
  variable_list apply(variable_list&& grads) override {
    variable_list result(2);
    const Tensor& gg = grads[0];
    if (!gg.defined()) return result;
    const Tensor g = g_.unpack(), w = w_.unpack();
    if (should_compute_output(0)) result[0] = fwd(B, gg, w, std::nullopt, p_);
    if (should_compute_output(1)) result[1] = std::get<0>(bwd_weight(B, g, gg, w.sym_sizes(), p_, false));
    return result;
  }
  std::string name() const override { return "pyops::ConvolutionBackwardInputBackward"; }
  void release_variables() override {
    g_.reset_data();
    w_.reset_data();
  }
};

// ---- conv2d_bwd_weight: bilinear in (grad_out, input), edges g, x; inputs grad_weight and, with a
// bias, grad_bias -----------------------------------------------------------------------------------------
template <Backend B>
struct ConvBwdWeightBackward : Node {
  SavedVariable g_, x_;
  Params p_;
  bool bias_;
  ConvBwdWeightBackward(const Tensor& g, const Tensor& x, Params p, bool bias)
      : g_(g, /*is_output=*/false), x_(x, /*is_output=*/false), p_(std::move(p)), bias_(bias) {}
  variable_list apply(variable_list&& grads) override {
    variable_list result(2);
    const Tensor& ggw = grads[0];
    const Tensor ggb = bias_ ? grads[1] : Tensor();
    if (!ggw.defined() && !ggb.defined()) return result;
    const Tensor g = g_.unpack(), x = x_.unpack();
    if (should_compute_output(0)) {
      if (ggw.defined()) {
        result[0] = fwd(B, x, ggw, ggb.defined() ? std::optional<Tensor>(ggb) : std::nullopt, p_);
      } else {
        result[0] = ggb.view_symint({1, ggb.sym_size(0), 1, 1}).expand_symint(g.sym_sizes()).contiguous();
      }
    }
    if (should_compute_output(1) && ggw.defined()) result[1] = bwd_input(B, g, ggw, x.sym_sizes(), p_);
    return result;
  }
  std::string name() const override { return "pyops::ConvolutionBackwardWeightBackward"; }
  void release_variables() override {
    g_.reset_data();
    x_.reset_data();
  }
};

// ---- the Autograd kernels of the primitives: the forward records a ConvBackward node, the two backward
// primitives (differentiated under create_graph) the nodes above; each sets its results' tangents where
// an operand has one ------------------------------------------------------------------------------------------
template <Backend B>
struct Kernels {
  static Pair conv2d_fwd_k(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias, IntArrayRef stride,
                           IntArrayRef padding, IntArrayRef dilation, int64_t groups, int64_t act, double scalar) {
    const Tensor b = bias.has_value() ? *bias : Tensor();
    const bool rec = graph_of(x, w, b), fw = has_tangent(x, w, b);
    if (!rec && !fw)
      PYOPS_BELOW_AUTOGRAD(conv2d_fwd[B].call(x, w, bias, stride, padding, dilation, groups, act, scalar));
    auto [out, mask] =
        below_autograd([&] { return conv2d_fwd[B].call(x, w, bias, stride, padding, dilation, groups, act, scalar); });
    Params p{stride.vec(), padding.vec(), dilation.vec(), groups};
    decltype(make_node<ConvBackward<B>>()) node;
    if (rec) {
      node = make_node<ConvBackward<B>>();
      record(node, out, x, w, b);
    }
    if (fw) set_tangent(out, conv_tangent<B>(x, w, b, out, mask, p, act, scalar));  // before out is saved
    if (rec) {
      node->x_ = SavedVariable(x, /*is_output=*/false);
      node->w_ = SavedVariable(w, /*is_output=*/false);
      node->kept_ =
          Act(act) == Act::kElu ? SavedVariable(out, /*is_output=*/true) : SavedVariable(mask, /*is_output=*/false);
      node->p_ = std::move(p);
      node->act_ = Act(act);
      node->scalar_ = scalar;
      node->bias_ = b.defined();
      node->out_strides_ = c10::SymDimVector(out.sym_strides().begin(), out.sym_strides().end());
    }
    return {out, mask};  // the mask has no gradient
  }
  // conv2d_fwd without activation, and the output's statistics, which have no derivative of their own: the
  // batch norm they feed differentiates through them (csrc/autograd/batch_norm.cpp)
  static Triple conv2d_fwd_stats_k(const Tensor& x, const Tensor& w, const std::optional<Tensor>& bias,
                                   IntArrayRef stride, IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
    const Tensor b = bias.has_value() ? *bias : Tensor();
    const bool rec = graph_of(x, w, b), fw = has_tangent(x, w, b);
    if (!rec && !fw) PYOPS_BELOW_AUTOGRAD(conv2d_fwd_stats[B].call(x, w, bias, stride, padding, dilation, groups));
    auto [out, mean, var] =
        below_autograd([&] { return conv2d_fwd_stats[B].call(x, w, bias, stride, padding, dilation, groups); });
    Params p{stride.vec(), padding.vec(), dilation.vec(), groups};
    decltype(make_node<ConvBackward<B>>()) node;
    if (rec) {
      node = make_node<ConvBackward<B>>();
      record(node, out, x, w, b);
    }
    if (fw) set_tangent(out, conv_tangent<B>(x, w, b, out, Tensor(), p, int64_t(Act::kNone), 0.0));
    if (rec) {
      node->x_ = SavedVariable(x, /*is_output=*/false);
      node->w_ = SavedVariable(w, /*is_output=*/false);
      node->p_ = std::move(p);
      node->bias_ = b.defined();
    }
    return {out, mean, var};
  }
  static Tensor conv2d_bwd_input_k(const Tensor& g, const Tensor& w, c10::SymIntArrayRef input_size, IntArrayRef stride,
                                   IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
    const bool rec = graph_of(g, w), fw = has_tangent(g, w);
    if (!rec && !fw)
      PYOPS_BELOW_AUTOGRAD(conv2d_bwd_input[B].call(g, w, input_size, stride, padding, dilation, groups));
    Tensor gi =
        below_autograd([&] { return conv2d_bwd_input[B].call(g, w, input_size, stride, padding, dilation, groups); });
    const Params p{stride.vec(), padding.vec(), dilation.vec(), groups};
    if (rec) record(make_node<ConvBwdInputBackward<B>>(g, w, p), gi, g, w);
    if (fw) {
      const Tensor dg = tangent(g), dw = tangent(w);
      set_tangent(gi, add_tangents(dg.defined() ? bwd_input(B, dg, primal(w), input_size, p) : Tensor(),
                                   dw.defined() ? bwd_input(B, primal(g), dw, input_size, p) : Tensor()));
    }
    return gi;
  }
  static Pair conv2d_bwd_weight_k(const Tensor& g, const Tensor& x, c10::SymIntArrayRef weight_size, IntArrayRef stride,
                                  IntArrayRef padding, IntArrayRef dilation, int64_t groups, bool bias) {
    const bool rec = graph_of(g, x), fw = has_tangent(g, x);
    if (!rec && !fw)
      PYOPS_BELOW_AUTOGRAD(conv2d_bwd_weight[B].call(g, x, weight_size, stride, padding, dilation, groups, bias));
    auto [gw, gb] = below_autograd(
        [&] { return conv2d_bwd_weight[B].call(g, x, weight_size, stride, padding, dilation, groups, bias); });
    const Params p{stride.vec(), padding.vec(), dilation.vec(), groups};
    if (rec) {
      auto node = make_node<ConvBwdWeightBackward<B>>(g, x, p, bias);
      record(node, gw, g, x);
      if (bias) torch::autograd::set_history(gb, NodePtr(node));
    }
    if (fw) {
      const Tensor dg = tangent(g), dx = tangent(x);
      Tensor tw;
      if (dg.defined()) {
        auto [t_w, t_b] = bwd_weight(B, dg, primal(x), weight_size, p, bias);
        tw = t_w;
        if (bias) set_tangent(gb, t_b);
      }
      if (dx.defined()) tw = add_tangents(tw, std::get<0>(bwd_weight(B, primal(g), dx, weight_size, p, false)));
      set_tangent(gw, tw);
    }
    return {gw, gb};
  }
};

#define PYOPS_REGISTER_CONV_AUTOGRAD(m, B, SUFFIX)               \
  do {                                                           \
    using K = Kernels<B>;                                        \
    m.impl("conv2d_fwd" SUFFIX, &K::conv2d_fwd_k);               \
    m.impl("conv2d_fwd_stats" SUFFIX, &K::conv2d_fwd_stats_k);   \
    m.impl("conv2d_bwd_input" SUFFIX, &K::conv2d_bwd_input_k);   \
    m.impl("conv2d_bwd_weight" SUFFIX, &K::conv2d_bwd_weight_k); \
  } while (0)

// ---- the public ops -------------------------------------------------------------------------------
struct Activation {
  Act act;
  double scalar;
};

Activation parse_activation(const std::optional<c10::string_view>& activation) {
  if (!activation.has_value()) return {Act::kNone, 0.0};
  const std::string a(activation->data(), activation->size());
  if (a == "relu") return {Act::kRelu, 0.0};
  if (a == "leaky_relu") return {Act::kLeakyRelu, 0.01};  // torch's default negative_slope
  if (a == "elu") return {Act::kElu, 1.0};                // torch's default alpha
  TORCH_CHECK_VALUE(false, "pyops.conv2d: activation must be None, 'relu', 'leaky_relu' or 'elu', got '", a, "'");
}

// A one-element list stands for both dimensions, as in torch.
std::vector<int64_t> pair(const char* name, IntArrayRef v) {
  TORCH_CHECK(v.size() == 1 || v.size() == 2, "pyops.conv2d: ", name, " must be an int or a pair of ints, got ", v);
  return v.size() == 1 ? std::vector<int64_t>{v[0], v[0]} : v.vec();
}

// torch's argument checks, in torch's words after the op's name (torch's tests match them), in torch's
// order, before any backend runs: x the batched input (4-d), s, p, d the pairs.
void check_conv_args(const Tensor& input, const Tensor& x, const Tensor& weight, const std::vector<int64_t>& s,
                     const std::vector<int64_t>& p, const std::vector<int64_t>& d, int64_t groups) {
  TORCH_CHECK(weight.dim() == 4, "pyops.conv2d: Expected ", weight.dim(), "-dimensional input for ", weight.dim(),
              "-dimensional weight ", weight.sym_sizes(), ", but got ", x.dim(), "-dimensional input of size ",
              input.sym_sizes(), " instead (conv2d's weight is 4-d: [out_channels, in_channels / groups, kH, kW])");
  TORCH_CHECK(p[0] >= 0 && p[1] >= 0, "pyops.conv2d: negative padding is not supported, got ", IntArrayRef(p));
  TORCH_CHECK(s[0] > 0 && s[1] > 0, "pyops.conv2d: non-positive stride is not supported, got ", IntArrayRef(s));
  TORCH_CHECK(d[0] >= 0 && d[1] >= 0, "pyops.conv2d: dilation should be greater than zero, got ", IntArrayRef(d));
  TORCH_CHECK(d[0] > 0 && d[1] > 0, "pyops.conv2d: non-positive dilation is not supported, got ", IntArrayRef(d));
  TORCH_CHECK(groups > 0, "pyops.conv2d: non-positive groups is not supported, got ", groups);
  const c10::SymInt k = weight.sym_size(0);
  TORCH_SYM_CHECK(k.sym_ge(groups), "pyops.conv2d: Given groups=", groups, ", expected weight to be at least ", groups,
                  " at dimension 0, but got weight of size ", weight.sym_sizes(), " instead");
  TORCH_SYM_CHECK((k % groups).sym_eq(0), "pyops.conv2d: Given groups=", groups,
                  ", expected weight to be divisible by ", groups, " at dimension 0, but got weight of size ",
                  weight.sym_sizes(), " instead");
  TORCH_SYM_CHECK(x.sym_size(1).sym_eq(weight.sym_size(1) * groups), "pyops.conv2d: Given groups=", groups,
                  ", weight of size ", weight.sym_sizes(), ", expected input", x.sym_sizes(), " to have ",
                  weight.sym_size(1) * groups, " channels, but got ", x.sym_size(1), " channels instead");
}

Tensor apply_activation(const Tensor& y, const Activation& a) {
  switch (a.act) {
    case Act::kRelu:
      return at::relu(y);
    case Act::kLeakyRelu:
      return at::leaky_relu(y, a.scalar);
    case Act::kElu:
      return at::elu(y, a.scalar);
    default:
      return y;
  }
}

// What `auto`'s rule (csrc/common/backend.h) and the autotune key read of a convolution; unknown
// (symbolic) sizes stay -1, which the rule counts as large.
Facts conv_facts(const Tensor& x, const Tensor& weight, int64_t groups, const std::vector<int64_t>& s,
                 const std::vector<int64_t>& p, const std::vector<int64_t>& d) {
  Facts f;
  const auto value = [](const c10::SymInt& v) { return v.maybe_as_int().value_or(-1); };
  f.groups = groups;
  f.in_per_group = value(weight.sym_size(1));
  f.out_channels = value(weight.sym_size(0));
  f.kh = value(weight.sym_size(2));
  f.kw = value(weight.sym_size(3));
  f.sh = s[0];
  f.sw = s[1];
  f.channels_last = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const int64_t h = value(x.sym_size(2)), w = value(x.sym_size(3));
  if (h >= 0 && w >= 0 && f.kh >= 0 && f.kw >= 0)
    f.out_plane =
        ((h + 2 * p[0] - d[0] * (f.kh - 1) - 1) / s[0] + 1) * ((w + 2 * p[1] - d[1] * (f.kw - 1) - 1) / s[1] + 1);
  return f;
}

// weight and bias on input's device and of its dtype, in torch's words
void check_operands(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias) {
  check_operand_device("conv2d", "weight", weight, input);
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "pyops.conv2d: input type (", input.scalar_type(),
              ") and weight type (", weight.scalar_type(), ") should be the same");
  if (bias.has_value() && bias->defined()) {
    check_operand_device("conv2d", "bias", bias, input);
    TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "pyops.conv2d: input type (", input.scalar_type(),
                ") and bias type (", bias->scalar_type(), ") should be the same");
  }
}

Tensor conv2d(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, IntArrayRef stride,
              IntArrayRef padding, IntArrayRef dilation, int64_t groups, std::optional<c10::string_view> activation) {
  const Activation a = parse_activation(activation);
  TORCH_CHECK(input.dim() == 3 || input.dim() == 4,
              "pyops.conv2d: Expected 3D (unbatched) or 4D (batched) input to conv2d, but got input of size: ",
              input.sym_sizes());
  check_operands(input, weight, bias);
  const auto s = pair("stride", stride), p = pair("padding", padding), d = pair("dilation", dilation);
  const bool batched = input.dim() == 4;
  const Tensor x = batched ? input : input.unsqueeze(0);
  check_conv_args(input, x, weight, s, p, d, groups);
  const Facts facts = conv_facts(x, weight, groups, s, p, d);
  const Backend b =
      choose(Op::conv2d, "conv2d", x, &facts,
             [&] { return pyops::conv2d(x, weight, bias, stride, padding, dilation, groups, activation); },
             {&x, &weight, bias ? &*bias : nullptr});
  Tensor y;
  if (b == Backend::kTorch) {
    y = apply_activation(at::conv2d(x, weight, bias, s, p, d, groups), a);
  } else {
    y = std::get<0>(conv2d_fwd[b].call(x, weight, bias, s, p, d, groups, int64_t(a.act), a.scalar));
  }
  return batched ? y : y.squeeze(0);
}

// conv2d without activation, and in training its output's per-channel mean and biased variance for the
// batch norm that follows (pyops.nn.Conv2d linked by pyops.convert to the BatchNorm2d after it): on a
// pyops backend the convolution's epilogue gathers them (pyops::conv2d_fwd_stats); on the torch backend,
// and for an unbatched input, the statistics are empty tensors (the batch norm computes its own).
std::tuple<Tensor, Tensor, Tensor> conv2d_stats(const Tensor& input, const Tensor& weight,
                                                const std::optional<Tensor>& bias, IntArrayRef stride,
                                                IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
  if (input.dim() == 4) {
    check_operands(input, weight, bias);
    const auto s = pair("stride", stride), p = pair("padding", padding), d = pair("dilation", dilation);
    check_conv_args(input, input, weight, s, p, d, groups);
    const Facts facts = conv_facts(input, weight, groups, s, p, d);
    const Backend b =
        choose(Op::conv2d, "conv2d", input, &facts,
               [&] { return pyops::conv2d(input, weight, bias, stride, padding, dilation, groups, std::nullopt); },
               {&input, &weight, bias ? &*bias : nullptr});
    if (b != Backend::kTorch) return conv2d_fwd_stats[b].call(input, weight, bias, s, p, d, groups);
    const Tensor none = at::empty({0}, input.options().dtype(at::kFloat));
    return {at::conv2d(input, weight, bias, s, p, d, groups), none, none};  // chosen already: torch's
  }
  const Tensor none = at::empty({0}, input.options().dtype(at::kFloat));
  return {pyops::conv2d(input, weight, bias, stride, padding, dilation, groups, std::nullopt), none, none};
}

Tensor conv2d_padding(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, IntArrayRef stride,
                      c10::string_view padding, IntArrayRef dilation, int64_t groups,
                      std::optional<c10::string_view> activation) {
  const std::string mode(padding.data(), padding.size());
  TORCH_CHECK(mode == "valid" || mode == "same", "pyops.conv2d: invalid padding string '", mode,
              "' (expected 'valid', 'same', an int or a pair of ints)");
  if (mode == "valid") return conv2d(input, weight, bias, stride, {0, 0}, dilation, groups, activation);
  const auto s = pair("stride", stride), d = pair("dilation", dilation);
  TORCH_CHECK(s[0] == 1 && s[1] == 1, "pyops.conv2d: padding='same' is not supported for strided convolutions");
  TORCH_CHECK(weight.dim() == 4, "pyops.conv2d: Expected ", weight.dim(), "-dimensional input for ", weight.dim(),
              "-dimensional weight ", weight.sym_sizes(), ", but got ", input.dim(), "-dimensional input of size ",
              input.sym_sizes(), " instead (conv2d's weight is 4-d: [out_channels, in_channels / groups, kH, kW])");
  // as torch: total padding d * (k - 1) per dimension, the odd one past the end
  std::vector<int64_t> left(2), extra(2);
  for (int i = 0; i < 2; ++i) {
    const int64_t total = d[i] * (weight.size(2 + i) - 1);
    left[i] = total / 2;
    extra[i] = total - 2 * left[i];
  }
  Tensor x = input;
  if (extra[0] || extra[1]) x = at::constant_pad_nd(input, {0, extra[1], 0, extra[0]}, 0);
  return conv2d(x, weight, bias, stride, left, dilation, groups, activation);
}

// Under autocast a convolution runs in the lower precision dtype, as torch's does (float64 stays).
template <c10::DeviceType DT, c10::DispatchKey KEY>
struct Autocast {
  static Tensor conv2d(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias, IntArrayRef stride,
                       IntArrayRef padding, IntArrayRef dilation, int64_t groups,
                       std::optional<c10::string_view> activation) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(KEY);
    const auto dt = at::autocast::get_autocast_dtype(DT);
    return pyops::conv2d(at::autocast::cached_cast(dt, input, DT), at::autocast::cached_cast(dt, weight, DT),
                         at::autocast::cached_cast(dt, bias, DT), stride, padding, dilation, groups, activation);
  }
  static Tensor conv2d_padding(const Tensor& input, const Tensor& weight, const std::optional<Tensor>& bias,
                               IntArrayRef stride, c10::string_view padding, IntArrayRef dilation, int64_t groups,
                               std::optional<c10::string_view> activation) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(KEY);
    const auto dt = at::autocast::get_autocast_dtype(DT);
    return pyops::conv2d_padding(at::autocast::cached_cast(dt, input, DT), at::autocast::cached_cast(dt, weight, DT),
                                 at::autocast::cached_cast(dt, bias, DT), stride, padding, dilation, groups,
                                 activation);
  }
  static std::tuple<Tensor, Tensor, Tensor> conv2d_stats(const Tensor& input, const Tensor& weight,
                                                         const std::optional<Tensor>& bias, IntArrayRef stride,
                                                         IntArrayRef padding, IntArrayRef dilation, int64_t groups) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(KEY);
    const auto dt = at::autocast::get_autocast_dtype(DT);
    return pyops::conv2d_stats(at::autocast::cached_cast(dt, input, DT), at::autocast::cached_cast(dt, weight, DT),
                               at::autocast::cached_cast(dt, bias, DT), stride, padding, dilation, groups);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, AutocastCPU, m) {
  using A = Autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>;
  m.impl("conv2d", &A::conv2d);
  m.impl("conv2d.padding", &A::conv2d_padding);
  m.impl("conv2d_stats", &A::conv2d_stats);
}

TORCH_LIBRARY_IMPL(pyops, AutocastCUDA, m) {
  using A = Autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>;
  m.impl("conv2d", &A::conv2d);
  m.impl("conv2d.padding", &A::conv2d_padding);
  m.impl("conv2d_stats", &A::conv2d_stats);
}

TORCH_LIBRARY_IMPL(pyops, Autograd, m) {
  PYOPS_REGISTER_CONV_AUTOGRAD(m, Backend::kNative, "");
  PYOPS_REGISTER_CONV_AUTOGRAD(m, Backend::kTriton, "_triton");
}

TORCH_LIBRARY_IMPL(pyops, CompositeImplicitAutograd, m) {
  m.impl("conv2d", &conv2d);
  m.impl("conv2d.padding", &conv2d_padding);
  m.impl("conv2d_stats", &conv2d_stats);
}

}  // namespace pyops
