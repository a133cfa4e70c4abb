// The conv family's host side, written once for every device: argument checks, output allocation and
// layout, and the list of ops each device registers. The math (pyops/ops/conv.py):
//   out[n, k, oh, ow] = act(bias[k] + sum_{c, kh, kw} w[k, c, kh, kw] * x[n, g*Cg + c, oh*sh - ph + kh*dh,
//                                                                        ow*sw - pw + kw*dw])
// for k in group g = k / Kg (Cg = C / groups input and Kg = K / groups output channels per group),
// x zero outside the input. A device D (csrc/cpu/conv.cpp, csrc/cuda/conv.cu, csrc/triton/conv.cpp)
// supplies:
//   D::Guard(tensor)                                       device guard (a no-op on CPU)
//   D::forward(shape, x, w, bias, out, act, scalar)        out = act(conv(x, w) + bias); bias may be undefined
//   D::forward_stats(shape, x, w, bias, out, mean, var)    out = conv(x, w) + bias, and out's per-channel mean
//                                                          and biased variance (float32 or float64 tensors)
//   D::mask(out, mask, act)                                the activation family's mask bits of out, read
//                                                          from out (relu: !(y <= 0); leaky_relu: y > 0)
//   D::backward_input(shape, grad_out, w, grad_in)         grad_in = conv's transpose applied to grad_out
//   D::backward_weight(shape, grad_out, x, gw, gb)         gw = sum over n, oh, ow; gb = sum of grad_out per
//                                                          channel (undefined: not wanted); fixed order
// Tensors may have any strides (x, grad_out) except the outputs, which this file allocates (dense) and
// the weight, which is contiguous. Kernels are called only when the result is non-empty. A device may take
// `out` and `grad_in` by non-const reference and replace them by a tensor of the same dtype, sizes and
// strides (the CUDA device, with torch's own result: csrc/cuda/conv.cu).
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros_like.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/relu.h>
#include <c10/core/SymIntArrayRef.h>

#include <limits>
#include <optional>
#include <utility>
#include <tuple>

#include "common/act.h"
#include "common/checks.h"

namespace pyops {

// Every size of one convolution.
struct ConvShape {
  int64_t N = 0, C = 0, H = 0, W = 0;  // input
  int64_t K = 0, KH = 0, KW = 0;       // weight [K, C / groups, KH, KW]
  int64_t OH = 0, OW = 0;              // output
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t groups = 1;
  int64_t Cg() const { return C / groups; }
  int64_t Kg() const { return K / groups; }
};

inline void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t lowest) {
  TORCH_CHECK(v.size() == 2, "pyops::", op, ": ", name, " must have 2 elements, got ", v);
  TORCH_CHECK(v[0] >= lowest && v[1] >= lowest, "pyops::", op, ": ", name, " must be ",
              lowest == 0 ? "non-negative" : "positive", ", got ", v);
}

// The checks every primitive makes, from the input's and the weight's sizes.
inline ConvShape conv_shape(const char* op, at::IntArrayRef in, at::IntArrayRef wt, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(in.size() == 4, "pyops::", op, ": input must be 4-d [N, C, H, W], got sizes ", in);
  TORCH_CHECK(wt.size() == 4, "pyops::", op, ": weight must be 4-d [K, C / groups, KH, KW], got sizes ", wt);
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK(groups > 0, "pyops::", op, ": groups must be positive, got ", groups);
  ConvShape s;
  s.N = in[0], s.C = in[1], s.H = in[2], s.W = in[3];
  s.K = wt[0], s.KH = wt[2], s.KW = wt[3];
  s.sh = stride[0], s.sw = stride[1], s.ph = padding[0], s.pw = padding[1], s.dh = dilation[0], s.dw = dilation[1];
  s.groups = groups;
  TORCH_CHECK(s.K > 0 && s.K % groups == 0, "pyops::", op, ": groups=", groups,
              " must divide the weight's output channels (", s.K, ")");
  TORCH_CHECK(s.C % groups == 0 && wt[1] * groups == s.C, "pyops::", op, ": groups=", groups, ", weight of size ", wt,
              " expects input[1] to be ", wt[1] * groups, " channels, but got ", s.C, " channels");
  TORCH_CHECK(s.KH > 0 && s.KW > 0, "pyops::", op, ": weight has an empty kernel, sizes ", wt);
  const int64_t eh = s.dh * (s.KH - 1) + 1, ew = s.dw * (s.KW - 1) + 1;
  TORCH_CHECK(s.H + 2 * s.ph >= eh && s.W + 2 * s.pw >= ew, "pyops::", op, ": padded input size per channel (",
              s.H + 2 * s.ph, " x ", s.W + 2 * s.pw, ") is smaller than the dilated kernel (", eh, " x ", ew, ")");
  s.OH = (s.H + 2 * s.ph - eh) / s.sh + 1;
  s.OW = (s.W + 2 * s.pw - ew) / s.sw + 1;
  return s;
}

// The per-channel mean and biased variance of a conv output by the batch_norm family's statistics
// primitive `op` (its native or Triton name), for devices whose forward records none in its epilogue.
inline void stats_by_op(const char* op, const at::Tensor& out, const at::Tensor& mean, const at::Tensor& var) {
  const auto handle = c10::Dispatcher::singleton()
                          .findSchemaOrThrow(op, "")
                          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  const auto [m, v] = handle.call(out);
  mean.copy_(m);
  var.copy_(v);
}

// Torch's layout for a convolution's output: channels_last when the input or the weight suggests it.
inline at::MemoryFormat conv_format(const at::Tensor& a, const at::Tensor& b) {
  return a.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                 b.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

inline std::vector<int64_t> concrete(const char* op, const char* name, c10::SymIntArrayRef sizes) {
  std::vector<int64_t> v;
  for (const auto& s : sizes) {
    const auto i = s.maybe_as_int();
    TORCH_CHECK(i.has_value(), "pyops::", op, ": ", name, " must be concrete");
    v.push_back(*i);
  }
  return v;
}

// The epilogue's activation on a whole tensor, in place (for the bias-only result of an empty sum).
inline void activate(at::Tensor& t, Act act, double scalar) {
  if (act == Act::kRelu) at::relu_(t);
  if (act == Act::kLeakyRelu) at::leaky_relu_(t, scalar);
  if (act == Act::kElu) at::elu_(t, scalar);
}

template <class D>
struct Conv {
  using Tensor = at::Tensor;

  // The forward's checks: the shape, and the bias (undefined when absent).
  static std::pair<ConvShape, Tensor> forward_args(const char* op, const Tensor& input, const Tensor& weight,
                                                   const std::optional<Tensor>& bias_opt, at::IntArrayRef stride,
                                                   at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
    check_floating(op, "input", input);
    check_like(op, "input", input, "weight", weight);
    const ConvShape s = conv_shape(op, input.sizes(), weight.sizes(), stride, padding, dilation, groups);
    Tensor bias;
    if (bias_opt.has_value() && bias_opt->defined()) {
      bias = *bias_opt;
      check_like(op, "input", input, "bias", bias);
      TORCH_CHECK(bias.dim() == 1 && bias.size(0) == s.K, "pyops::", op, ": bias must be 1-d of ", s.K,
                  " elements (the weight's output channels), got sizes ", bias.sizes());
    }
    return {s, bias};
  }

  static std::tuple<Tensor, Tensor> conv2d_fwd(const Tensor& input, const Tensor& weight,
                                               const std::optional<Tensor>& bias_opt, at::IntArrayRef stride,
                                               at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                               int64_t act_code, double scalar) {
    const char* op = "conv2d_fwd";
    const auto [s, bias] = forward_args(op, input, weight, bias_opt, stride, padding, dilation, groups);
    const Act act = act_of_code(op, act_code);
    TORCH_CHECK(scalar >= 0, "pyops::", op, ": the activation's scalar must be non-negative, got ", scalar);
    typename D::Guard guard(input);
    Tensor out = at::empty({s.N, s.K, s.OH, s.OW}, input.options().memory_format(conv_format(input, weight)));
    const bool masked = act_masked(act);
    Tensor mask = at::empty({masked ? (out.numel() + 7) / 8 : 0}, input.options().dtype(at::kByte));
    if (out.numel() == 0) return {out, mask};
    if (s.C == 0) {  // an empty sum: the bias alone
      out.zero_();
      if (bias.defined()) out.add_(bias.view({1, s.K, 1, 1}));
      activate(out, act, scalar);
    } else {
      D::forward(s, input, weight.contiguous(), bias.defined() ? bias.contiguous() : bias, out, act, scalar);
    }
    if (masked) D::mask(out, mask, act);
    return {out, mask};
  }

  // out = conv(x, w) + bias and its per-channel mean and biased variance (batch norm's statistics, in its
  // op-math dtype: float32 for float16/bfloat16 inputs), for a batch norm that follows in training.
  static std::tuple<Tensor, Tensor, Tensor> conv2d_fwd_stats(const Tensor& input, const Tensor& weight,
                                                             const std::optional<Tensor>& bias_opt,
                                                             at::IntArrayRef stride, at::IntArrayRef padding,
                                                             at::IntArrayRef dilation, int64_t groups) {
    const char* op = "conv2d_fwd_stats";
    const auto [s, bias] = forward_args(op, input, weight, bias_opt, stride, padding, dilation, groups);
    typename D::Guard guard(input);
    Tensor out = at::empty({s.N, s.K, s.OH, s.OW}, input.options().memory_format(conv_format(input, weight)));
    const auto stat_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    Tensor mean = at::empty({s.K}, input.options().dtype(stat_type));
    Tensor var = at::empty({s.K}, input.options().dtype(stat_type));
    if (out.numel() == 0) {  // no element: torch's mean and variance of nothing
      mean.fill_(std::numeric_limits<double>::quiet_NaN());
      var.fill_(std::numeric_limits<double>::quiet_NaN());
      return {out, mean, var};
    }
    if (s.C == 0) {  // an empty sum: the bias alone, a constant per channel
      out.zero_();
      if (bias.defined()) out.add_(bias.view({1, s.K, 1, 1}));
      mean.copy_(bias.defined() ? bias : at::zeros_like(mean));
      var.zero_();
      return {out, mean, var};
    }
    D::forward_stats(s, input, weight.contiguous(), bias.defined() ? bias.contiguous() : bias, out, mean, var);
    return {out, mean, var};
  }

  static Tensor conv2d_bwd_input(const Tensor& grad_out, const Tensor& weight, c10::SymIntArrayRef input_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                 int64_t groups) {
    const char* op = "conv2d_bwd_input";
    check_floating(op, "grad_out", grad_out);
    check_like(op, "grad_out", grad_out, "weight", weight);
    const auto in = concrete(op, "input_size", input_size);
    const ConvShape s = conv_shape(op, in, weight.sizes(), stride, padding, dilation, groups);
    TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.K && grad_out.size(2) == s.OH &&
                    grad_out.size(3) == s.OW,
                "pyops::", op, ": grad_out must have sizes [", s.N, ", ", s.K, ", ", s.OH, ", ", s.OW, "], got ",
                grad_out.sizes());
    typename D::Guard guard(grad_out);
    Tensor gi = at::empty(in, grad_out.options().memory_format(grad_out.suggest_memory_format()));
    if (gi.numel() == 0) return gi;
    if (grad_out.numel() == 0) return gi.zero_();
    D::backward_input(s, grad_out, weight.contiguous(), gi);
    return gi;
  }

  static std::tuple<Tensor, Tensor> conv2d_bwd_weight(const Tensor& grad_out, const Tensor& input,
                                                      c10::SymIntArrayRef weight_size, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                      bool bias) {
    const char* op = "conv2d_bwd_weight";
    check_floating(op, "grad_out", grad_out);
    check_like(op, "grad_out", grad_out, "input", input);
    const auto wt = concrete(op, "weight_size", weight_size);
    const ConvShape s = conv_shape(op, input.sizes(), wt, stride, padding, dilation, groups);
    TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == s.N && grad_out.size(1) == s.K && grad_out.size(2) == s.OH &&
                    grad_out.size(3) == s.OW,
                "pyops::", op, ": grad_out must have sizes [", s.N, ", ", s.K, ", ", s.OH, ", ", s.OW, "], got ",
                grad_out.sizes());
    typename D::Guard guard(grad_out);
    Tensor gw = at::empty(wt, grad_out.options());
    Tensor gb = at::empty({bias ? s.K : 0}, grad_out.options());
    if (grad_out.numel() == 0 || s.C == 0) {
      gw.zero_();
      gb.zero_();
      return {gw, gb};
    }
    D::backward_weight(s, grad_out, input, gw, bias ? gb : Tensor());
    return {gw, gb};
  }
};

}  // namespace pyops

// Every conv op of device D, registered inside TORCH_LIBRARY_IMPL(pyops, <key>, m) under the native
// names (SUFFIX "") or the Triton twins' (SUFFIX "_triton").
#define PYOPS_REGISTER_CONV(m, D, SUFFIX)                      \
  do {                                                         \
    using C = ::pyops::Conv<D>;                                \
    m.impl("conv2d_fwd" SUFFIX, &C::conv2d_fwd);               \
    m.impl("conv2d_fwd_stats" SUFFIX, &C::conv2d_fwd_stats);   \
    m.impl("conv2d_bwd_input" SUFFIX, &C::conv2d_bwd_input);   \
    m.impl("conv2d_bwd_weight" SUFFIX, &C::conv2d_bwd_weight); \
  } while (0)
