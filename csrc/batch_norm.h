// The batch_norm family's host side, written once for every device: argument checks, the working
// layout, output allocation, and the per-channel coefficients (a few operations on C-element tensors)
// that turn the four kernels into batch normalization. The math (pyops/ops/batch_norm.py):
//   z = (x - mean) * invstd * w + b + r,   y = act(z)
//   backward: dz = dy * act'(y) (act' read from the output y), xhat = (x - mean) * invstd,
//   training: dx = w * invstd * (dz - mean(dz) - xhat * mean(dz * xhat)); eval: dx = w * invstd * dz,
//   dw = sum(dz * xhat), db = sum(dz), dr = dz.
// Memory-efficient form: the output y is saved instead of x and xhat = (act^-1(y) - r - b) / w.
//
// Kernels see the input as [outer, C, inner], dense (element (o, c, i) at (o * C + c) * inner + i):
// contiguous tensors as [N, C, H * W], channels_last ones as [N * H * W, C, 1]. Per-channel
// coefficients are dense C-element tensors of the op-math dtype (float32 for float16/bfloat16 input).
// A device D (csrc/cpu, csrc/cuda, csrc/triton) supplies:
//   D::Guard(tensor)
//   D::stats(x, layout, mean, var)             mean and biased variance per channel (split reduction)
//   D::elemt(pass, out)                        out = act((x - center) * scale + shift [+ r])
//   D::bwd_reduce(pass, sum_dz, sum_dzv, gr)   sum_dz = sum dz, sum_dzv = sum dz * v, gr = dz if defined
//   D::bwd_elemt(pass, grad_input)             dx = A * dz [+ B * v + Cc]  (B, Cc defined in training)
// where v = x - center (from the input) or act^-1(y) - r - center (from the output).
// Kernels are called only for non-empty tensors.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/TensorOperators.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/util/string_view.h>

#include <limits>
#include <string>
#include <tuple>

#include "common/act.h"
#include "common/checks.h"

namespace pyops {

// Elements per channel: the product of every size but the channel dimension's (no division, so that
// zero channels are no special case; symbolic sizes stay unguarded).
inline c10::SymInt bn_count(const at::Tensor& t) {
  c10::SymInt n = t.sym_size(0);
  for (int64_t d = 2; d < t.dim(); ++d) n = n * t.sym_size(d);
  return n;
}

struct BnLayout {
  int64_t outer = 0, channels = 0, inner = 0;
  int64_t count() const { return outer * inner; }  // elements per channel
};

// One pass's operands: tensors in the working layout (undefined where absent), per-channel
// coefficients (dense, op-math dtype).
struct BnPass {
  BnLayout l;
  Act act = Act::kNone;
  double param = 0;
  bool from_output = false;
  at::Tensor grad, input, output, residual;
  at::Tensor center, scale, shift;  // forward: out = act((x - center) * scale + shift + r)
  at::Tensor a, b, c;               // backward elementwise: dx = a * dz + b * v + c
};

inline at::ScalarType bn_opmath(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The layout kernels walk: the input as torch lays its batch norm output out (channels_last kept,
// every other layout made contiguous).
struct BnInput {
  at::Tensor x;
  BnLayout l;
};

inline BnInput bn_input(const char* op, const at::Tensor& input) {
  check_floating(op, "input", input);
  TORCH_CHECK(input.dim() >= 2, "pyops::", op, ": input must have at least 2 dimensions (N, C, ...), got ",
              input.dim());
  const auto format = input.suggest_memory_format();
  BnInput r{input.contiguous(format), {}};
  r.l.channels = input.size(1);
  const int64_t per_channel = r.l.channels == 0 ? 0 : input.numel() / r.l.channels;
  if (format == at::MemoryFormat::Contiguous || r.l.channels == 1) {
    r.l.outer = input.size(0);
    r.l.inner = r.l.outer == 0 ? 0 : per_channel / r.l.outer;
    if (format != at::MemoryFormat::Contiguous) r.x = r.x.contiguous();  // C = 1: both layouts agree
  } else {
    r.l.outer = per_channel;
    r.l.inner = 1;
  }
  return r;
}

// t brought to the working input's strides (grad_out, output, residual).
inline at::Tensor bn_like(const char* op, const char* name, const at::Tensor& t, const BnInput& in) {
  check_like(op, "input", in.x, name, t);
  check_same_shape(op, "input", in.x, name, t);
  return as_layout_of(t, in.x);
}

// A per-channel tensor (C elements) as a dense op-math vector; undefined stays undefined.
inline at::Tensor bn_channel(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x) {
  if (!t.defined()) return t;
  TORCH_CHECK(t.device() == x.device(), "pyops::", op, ": ", name, " is on ", t.device(), " but input is on ",
              x.device());
  TORCH_CHECK(t.is_floating_point(), "pyops::", op, ": ", name, " must be a floating tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == x.size(1), "pyops::", op, ": ", name, " must have shape [", x.size(1),
              "] (one value per channel), got ", t.sizes());
  const auto opmath = bn_opmath(x.scalar_type());
  if (t.scalar_type() == opmath && t.is_contiguous()) return t;  // (no dispatcher round trip)
  return t.to(opmath).contiguous();
}

template <class D>
struct BatchNorm {
  using Tensor = at::Tensor;

  // ---- the statistics of the batch: mean and biased variance per channel (op-math dtype) ---------
  static std::tuple<Tensor, Tensor> stats(const Tensor& input) {
    const auto in = bn_input("batch_norm_stats", input);
    typename D::Guard guard(input);
    const auto opts = input.options().dtype(bn_opmath(input.scalar_type()));
    if (in.l.count() == 0) {  // no values: undefined statistics, as torch's
      const auto nan = std::numeric_limits<double>::quiet_NaN();
      return {at::full({in.l.channels}, nan, opts), at::full({in.l.channels}, nan, opts)};
    }
    Tensor mean = at::empty({in.l.channels}, opts), var = at::empty({in.l.channels}, opts);
    D::stats(in.x, in.l, mean, var);
    return {mean, var};
  }

  static BnPass pass(const char* op, const BnInput& in, const Tensor& residual, const c10::string_view activation,
                     double param) {
    BnPass p;
    p.l = in.l;
    p.act = parse_act(op, activation);
    p.param = param;
    if (residual.defined()) p.residual = bn_like(op, "residual", residual, in);
    return p;
  }

  // ---- forward, elementwise: act((x - mean) * invstd * w + b + r) ---------------------------------
  static Tensor elemt(const Tensor& input, const Tensor& mean, const Tensor& invstd,
                      const std::optional<Tensor>& weight, const std::optional<Tensor>& bias,
                      const std::optional<Tensor>& residual, c10::string_view activation, double param) {
    const char* op = "batch_norm_elemt";
    const auto in = bn_input(op, input);
    typename D::Guard guard(input);
    BnPass p = pass(op, in, residual.value_or(Tensor()), activation, param);
    p.input = in.x;
    p.center = bn_channel(op, "mean", mean, input);
    const Tensor is = bn_channel(op, "invstd", invstd, input);
    const Tensor w = bn_channel(op, "weight", weight.value_or(Tensor()), input);
    const Tensor b = bn_channel(op, "bias", bias.value_or(Tensor()), input);
    p.scale = w.defined() ? is * w : is;
    p.shift = b.defined() ? b : at::zeros_like(is);
    Tensor out = at::empty_like(in.x);
    if (out.numel() > 0) D::elemt(p, out);
    return out;
  }

  // The operands both backward passes share. From the input (input defined): v = x - mean; from the
  // output (input undefined, memory-efficient): v = act^-1(y) - r - b.
  static BnPass backward_pass(const char* op, const Tensor& grad_out, const std::optional<Tensor>& input,
                              const std::optional<Tensor>& output, const std::optional<Tensor>& residual,
                              const Tensor& mean, const Tensor& bias, c10::string_view activation, double param,
                              BnInput* in_out) {
    const bool from_output = !input.has_value() || !input->defined();
    TORCH_CHECK(!from_output || (output.has_value() && output->defined()), "pyops::", op,
                ": needs the input, or the output in the memory-efficient form");
    const Tensor& ref = from_output ? *output : *input;
    *in_out = bn_input(op, ref);
    const BnInput& in = *in_out;
    BnPass p = pass(op, in, residual.value_or(Tensor()), activation, param);
    p.from_output = from_output;
    TORCH_CHECK(!from_output || act_invertible(p.act, param), "pyops::", op, ": activation ", act_name(p.act),
                " with parameter ", param, " cannot be inverted (memory-efficient form)");
    TORCH_CHECK(act_from_output(p.act, param), "pyops::", op, ": the derivative of ", act_name(p.act),
                " with parameter ", param, " cannot be read from its output");
    p.grad = bn_like(op, "grad_out", grad_out, in);
    if (from_output) {
      p.output = in.x;
      p.center =
          bias.defined() ? bias : at::zeros({in.l.channels}, in.x.options().dtype(bn_opmath(in.x.scalar_type())));
    } else {
      p.input = in.x;
      if (p.act != Act::kNone) {
        TORCH_CHECK(output.has_value() && output->defined(), "pyops::", op, ": activation ", act_name(p.act),
                    " needs the output");
        p.output = bn_like(op, "output", *output, in);
      }
      p.center = mean;
    }
    return p;
  }

  // What every backward primitive starts from: the per-channel operands and both passes' operands
  // (the caller holds the device guard).
  struct BwdOperands {
    Tensor is, w, mean_dz, mean_dz_xhat;
    BnInput in;
    BnPass p;
  };
  static BwdOperands bwd_operands(const char* op, const Tensor& grad_out, const std::optional<Tensor>& input,
                                  const std::optional<Tensor>& output, const std::optional<Tensor>& residual,
                                  const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
                                  const std::optional<Tensor>& bias, c10::string_view activation, double param,
                                  const std::optional<Tensor>& mean_dz = std::nullopt,
                                  const std::optional<Tensor>& mean_dz_xhat = std::nullopt) {
    check_floating(op, "grad_out", grad_out);
    const Tensor& x0 = input.has_value() && input->defined() ? *input : output.value_or(grad_out);
    TORCH_CHECK(x0.dim() >= 2, "pyops::", op, ": input must have at least 2 dimensions (N, C, ...), got ", x0.dim());
    BwdOperands o;
    const Tensor m = bn_channel(op, "mean", mean, x0);
    o.is = bn_channel(op, "invstd", invstd, x0);
    o.w = bn_channel(op, "weight", weight.value_or(Tensor()), x0);
    const Tensor b = bn_channel(op, "bias", bias.value_or(Tensor()), x0);
    o.mean_dz = bn_channel(op, "mean_dz", mean_dz.value_or(Tensor()), x0);
    o.mean_dz_xhat = bn_channel(op, "mean_dz_xhat", mean_dz_xhat.value_or(Tensor()), x0);
    TORCH_CHECK(o.mean_dz.defined() == o.mean_dz_xhat.defined(), "pyops::", op,
                ": give both mean_dz and mean_dz_xhat, or neither");
    o.p = backward_pass(op, grad_out, input, output, residual, m, b, activation, param, &o.in);
    return o;
  }

  // sum(dz * xhat) from sum(dz * v): v = x - mean = xhat / invstd, or v = act^-1(y) - r - b = xhat * w.
  // An empty batch sums to zero (its NaN statistics are never used), as torch's weight gradient does.
  static Tensor sum_dz_xhat(const BwdOperands& o, const Tensor& sum_dzv) {
    if (o.in.l.count() == 0) return sum_dzv;
    return o.p.from_output ? (o.w.defined() ? sum_dzv / o.w : sum_dzv) : sum_dzv * o.is;
  }

  // dx = a * dz + b * v + c: a = w * invstd; in training (the batch means of dz and dz * xhat given)
  // also the terms through the statistics.
  static void set_coefficients(BwdOperands& o, const Tensor& mdz, const Tensor& mdx) {
    BnPass& p = o.p;
    p.a = o.w.defined() ? o.w * o.is : o.is;
    if (!mdz.defined()) return;
    p.c = -p.a * mdz;
    p.b = p.from_output ? -o.is * mdx : -p.a * o.is * mdx;
  }

  // Per-channel sums, zeroed, and the residual's gradient (an empty tensor when not asked: a schema's
  // Tensor result is never undefined).
  static std::tuple<Tensor, Tensor, Tensor> bwd_sums(const BnInput& in, bool grad_residual) {
    const auto opts = in.x.options().dtype(bn_opmath(in.x.scalar_type()));
    return {at::zeros({in.l.channels}, opts), at::zeros({in.l.channels}, opts),
            grad_residual ? at::empty_like(in.x) : at::empty({0}, in.x.options())};
  }

  // ---- backward, reduction: sum(dz), sum(dz * xhat) and, when asked, dr = dz -------------------------
  static std::tuple<Tensor, Tensor, Tensor> bwd_reduce(const Tensor& grad_out, const std::optional<Tensor>& input,
                                                       const std::optional<Tensor>& output,
                                                       const std::optional<Tensor>& residual, const Tensor& mean,
                                                       const Tensor& invstd, const std::optional<Tensor>& weight,
                                                       const std::optional<Tensor>& bias, c10::string_view activation,
                                                       double param, bool grad_residual) {
    typename D::Guard guard(grad_out);
    BwdOperands o = bwd_operands("batch_norm_bwd_reduce", grad_out, input, output, residual, mean, invstd, weight, bias,
                                 activation, param);
    auto [sum_dz, sum_dzv, gr] = bwd_sums(o.in, grad_residual);
    if (o.in.x.numel() > 0) D::bwd_reduce(o.p, sum_dz, sum_dzv, grad_residual ? gr : Tensor());
    return {sum_dz, sum_dz_xhat(o, sum_dzv), gr};
  }

  // ---- backward in training, both passes: (dx, sum(dz), sum(dz * xhat), dr or empty). A device may do
  // them at once (D::bwd_fused returns whether it did); else the reduction, the coefficients, the
  // elementwise pass.
  static std::tuple<Tensor, Tensor, Tensor, Tensor> bwd(const Tensor& grad_out, const std::optional<Tensor>& input,
                                                        const std::optional<Tensor>& output,
                                                        const std::optional<Tensor>& residual, const Tensor& mean,
                                                        const Tensor& invstd, const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, c10::string_view activation,
                                                        double param, bool grad_residual) {
    typename D::Guard guard(grad_out);
    BwdOperands o = bwd_operands("batch_norm_bwd", grad_out, input, output, residual, mean, invstd, weight, bias,
                                 activation, param);
    auto [sum_dz, sum_dzv, gr] = bwd_sums(o.in, grad_residual);
    Tensor gi = at::empty_like(o.in.x);
    set_coefficients(o, Tensor(), Tensor());
    const Tensor gr_arg = grad_residual ? gr : Tensor();
    Tensor sdx;
    if (o.in.x.numel() > 0 && !D::bwd_fused(o.p, o.is, o.w, sum_dz, sum_dzv, gr_arg, gi)) {
      D::bwd_reduce(o.p, sum_dz, sum_dzv, gr_arg);
      sdx = sum_dz_xhat(o, sum_dzv);
      const double count = double(o.in.l.count());
      set_coefficients(o, sum_dz / count, sdx / count);
      D::bwd_elemt(o.p, gi);
    }
    return {gi, sum_dz, sdx.defined() ? sdx : sum_dz_xhat(o, sum_dzv), gr};
  }

  // ---- backward, elementwise: dx; mean_dz and mean_dz_xhat (means over the batch) given in training ---
  static Tensor bwd_elemt(const Tensor& grad_out, const std::optional<Tensor>& input,
                          const std::optional<Tensor>& output, const std::optional<Tensor>& residual,
                          const Tensor& mean, const Tensor& invstd, const std::optional<Tensor>& weight,
                          const std::optional<Tensor>& bias, const std::optional<Tensor>& mean_dz,
                          const std::optional<Tensor>& mean_dz_xhat, c10::string_view activation, double param) {
    typename D::Guard guard(grad_out);
    BwdOperands o = bwd_operands("batch_norm_bwd_elemt", grad_out, input, output, residual, mean, invstd, weight, bias,
                                 activation, param, mean_dz, mean_dz_xhat);
    set_coefficients(o, o.mean_dz, o.mean_dz_xhat);  // training when given: the statistics depend on x
    Tensor gi = at::empty_like(o.in.x);
    if (gi.numel() > 0) D::bwd_elemt(o.p, gi);
    return gi;
  }
};

}  // namespace pyops

// Every batch_norm primitive of device D (SUFFIX "" native, "_triton" the Triton twins).
#define PYOPS_REGISTER_BATCH_NORM(m, D, SUFFIX)              \
  do {                                                       \
    using BN = ::pyops::BatchNorm<D>;                        \
    m.impl("batch_norm_stats" SUFFIX, &BN::stats);           \
    m.impl("batch_norm_elemt" SUFFIX, &BN::elemt);           \
    m.impl("batch_norm_bwd_reduce" SUFFIX, &BN::bwd_reduce); \
    m.impl("batch_norm_bwd_elemt" SUFFIX, &BN::bwd_elemt);   \
    m.impl("batch_norm_bwd" SUFFIX, &BN::bwd);               \
  } while (0)
