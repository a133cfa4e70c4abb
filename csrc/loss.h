// The loss family's host side, written once for every device: argument checks, output allocation
// and layout, the reductions' scales, and the list of ops each device registers.
// A device D (csrc/cpu/loss.cpp, csrc/cuda/loss.cu, csrc/triton/loss.cpp) supplies:
//   D::Guard(tensor)                                         device guard (a no-op on CPU)
//   D::pointwise(x, t, out, kind, delta)                     out = loss(x - t), elementwise
//   D::pointwise_bwd(g, x, t, gi, kind, delta)               gi = g * loss'(x - t)
//   D::pointwise_reduce(x, t, out, grad, kind, delta, scale) out (0-d) = scale * sum loss(x - t) and,
//                                                            when grad is defined, grad = scale * loss'(x - t)
//   D::scan_targets(target, classes, ignore_index, w, total, opmath)  class indices in range (CPU: raises; GPUs
//                                                            make such rows NaN), and when `total` the
//                                                            0-d weight of the rows not ignored
//   D::cross_entropy(x, target, weight, inv_total, scale, ignore_index, smoothing, loss_rows, grad)
//                                                            per row of x (M, C): the loss, and the
//                                                            gradient when grad is defined (see below)
// Elementwise tensors (x, t, g, out, grad) are non-overlapping and dense with identical strides: the
// kernels walk memory order. Kernels are called only for non-empty tensors.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/full.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/where.h>

#include <limits>
#include <optional>
#include <tuple>

#include "common/checks.h"

namespace pyops {

// Pointwise loss kinds (the `kind` argument of the pointwise_loss primitives).
enum class LossKind : int64_t { kL1 = 0, kMse = 1, kHuber = 2 };
// Reductions, numbered as torch's (torch.nn._reduction.get_enum).
enum class Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

inline void check_reduction(const char* op, int64_t reduction) {
  TORCH_CHECK(reduction >= 0 && reduction <= 2, "pyops::", op,
              ": reduction must be 0 (none), 1 (mean) or 2 (sum), got ", reduction);
}

inline void check_loss_kind(const char* op, int64_t kind, double delta) {
  TORCH_CHECK(kind >= 0 && kind <= 2, "pyops::", op, ": kind must be 0 (l1), 1 (mse) or 2 (huber), got ", kind);
  TORCH_CHECK(kind != int64_t(LossKind::kHuber) || delta > 0, "pyops::", op,
              ": huber_loss does not support non-positive values for delta, got ", delta);
}

// The class-index target a cross entropy over `x` (N, C, d1, ...) or (C,) expects: (N, d1, ...) or ().
inline std::vector<int64_t> class_target_shape(const at::Tensor& x) {
  std::vector<int64_t> shape;
  if (x.dim() == 1) return shape;
  for (int64_t d = 0; d < x.dim(); ++d)
    if (d != 1) shape.push_back(x.size(d));
  return shape;
}

// The weight of the class-index targets not ignored (weight 1 each without class weights), as a 0-d
// tensor of w's (opmath) dtype on t's device, from tensor ops (no host synchronisation). With class
// weights a target out of range (a NaN row, which makes the mean NaN) adds no weight and is never used
// as an index: on a GPU an index out of range is a device-side assert that ends the process.
inline at::Tensor target_weight_total(const at::Tensor& t, int64_t ignore_index, const at::Tensor& w,
                                      at::ScalarType opmath) {
  const at::Tensor valid = t != ignore_index;
  if (!w.defined()) return valid.sum().to(opmath);
  const at::Tensor counted = valid & (t >= 0) & (t < w.size(0));
  return (w.index_select(0, t.masked_fill(~counted, 0)) * counted).sum();
}

template <class D>
struct Loss {
  using Tensor = at::Tensor;

  static void check_pair(const char* name, const Tensor& input, const Tensor& target) {
    check_floating(name, "input", input);
    check_like(name, "input", input, "target", target);
    check_same_shape(name, "input", input, "target", target);
  }

  // ---- L1, MSE, Huber: the loss, and for mean/sum its gradient in the same pass ------------------
  static std::tuple<Tensor, Tensor> pointwise_loss_fwd(const Tensor& input, const Tensor& target, int64_t kind,
                                                       int64_t reduction, double delta, bool grad) {
    const char* name = "pointwise_loss_fwd";
    check_pair(name, input, target);
    check_loss_kind(name, kind, delta);
    check_reduction(name, reduction);
    typename D::Guard guard(input);
    const Tensor no_grad = at::empty({0}, input.options());
    if (reduction == int64_t(Reduction::kNone)) {
      auto d = dense_like(input);
      const Tensor t = as_layout_of(target, d.out);
      if (input.numel() > 0) D::pointwise(d.in, t, d.out, kind, delta);
      return {d.out, no_grad};
    }
    const int64_t n = input.numel();
    const bool mean = reduction == int64_t(Reduction::kMean);
    Tensor out = at::empty({}, input.options());
    Tensor x, g;
    if (grad) {
      auto d = dense_like(input);
      x = d.in;
      g = d.out;
    } else {
      x = input.is_non_overlapping_and_dense() ? input : input.contiguous();
    }
    if (n == 0) {  // torch: the mean of nothing is NaN, the sum 0
      out.fill_(mean ? std::numeric_limits<double>::quiet_NaN() : 0.0);
      return {out, grad ? g : no_grad};
    }
    const Tensor t = as_layout_of(target, x);
    D::pointwise_reduce(x, t, out, g, kind, delta, mean ? 1.0 / double(n) : 1.0);
    return {out, grad ? g : no_grad};
  }

  // grad_in = grad_out * loss'(input - target), elementwise (reduction none); input's layout.
  static Tensor pointwise_loss_bwd(const Tensor& grad_out, const Tensor& input, const Tensor& target, int64_t kind,
                                   double delta) {
    const char* name = "pointwise_loss_bwd";
    check_pair(name, input, target);
    check_like(name, "input", input, "grad_out", grad_out);
    check_same_shape(name, "input", input, "grad_out", grad_out);
    check_loss_kind(name, kind, delta);
    typename D::Guard guard(input);
    auto d = dense_like(input);
    if (input.numel() > 0)
      D::pointwise_bwd(as_layout_of(grad_out, d.out), d.in, as_layout_of(target, d.out), d.out, kind, delta);
    return d.out;
  }

  // ---- softmax cross entropy over dim 1 (dim 0 of a 1-d input) -------------------------------------
  // Per row i of the logits x (M = N * d1 * ... rows of C classes), with class weights w (1 when
  // none), smoothing e and p = softmax(x_i), lse = logsumexp(x_i):
  //   class index t:   loss_i = (1 - e) w_t (lse - x_t) + e / C sum_c w_c (lse - x_c)   (0 if ignored)
  //                    dloss_i/dx_c = (1 - e) w_t (p_c - [c = t]) + e / C (W p_c - w_c), W = sum_c w_c
  //   probabilities q: q' = (1 - e) q + e / C;  loss_i = sum_c w_c q'_c (lse - x_c)
  //                    dloss_i/dx_c = p_c sum_k w_k q'_k - w_c q'_c
  // mean divides by sum_i w_{t_i} over the rows not ignored (class indices; all ignored: NaN, as
  // torch) or by M (probabilities). The gradient comes out scaled as the loss is (1 for none).
  static std::tuple<Tensor, Tensor> cross_entropy_fwd(const Tensor& input, const Tensor& target,
                                                      const std::optional<Tensor>& weight, int64_t ignore_index,
                                                      int64_t reduction, double label_smoothing, bool grad) {
    const char* name = "cross_entropy_fwd";
    check_floating(name, "input", input);
    check_reduction(name, reduction);
    TORCH_CHECK(input.dim() >= 1, "pyops::", name,
                ": input must have at least one dimension (classes), got a 0-d tensor");
    TORCH_CHECK(label_smoothing >= 0 && label_smoothing <= 1, "pyops::", name,
                ": label_smoothing must be between 0.0 and 1.0, got ", label_smoothing);
    TORCH_CHECK(target.device() == input.device(), "pyops::", name, ": target is on ", target.device(),
                " but input is on ", input.device());
    const bool probs = target.is_floating_point();
    const bool unbatched = input.dim() == 1;
    const int64_t classes = input.size(unbatched ? 0 : 1);
    if (probs) {
      check_like(name, "input", input, "target", target);
      check_same_shape(name, "input", input, "target", target);
    } else {
      TORCH_CHECK(target.scalar_type() == at::kLong, "pyops::", name,
                  ": class-index targets must be int64, probability targets floating; got ", target.scalar_type());
      const auto expected = class_target_shape(input);
      TORCH_CHECK(target.sizes() == at::IntArrayRef(expected), "pyops::", name, ": expected target of shape ",
                  at::IntArrayRef(expected), " for input of shape ", input.sizes(), ", got ", target.sizes());
    }
    Tensor w;
    if (weight.has_value() && weight->defined()) {
      check_like(name, "input", input, "weight", *weight);
      TORCH_CHECK(weight->dim() == 1 && weight->numel() == classes, "pyops::", name,
                  ": weight must hold one value per ", "class (", classes, "), got shape ", weight->sizes());
      w = weight->to(at::toOpMathType(input.scalar_type())).contiguous();
    }
    typename D::Guard guard(input);
    // Rows: classes last and contiguous, (M, C).
    const Tensor x3 = unbatched ? input.unsqueeze(0) : input;
    const Tensor xl = x3.dim() > 2 ? x3.movedim(1, -1) : x3;
    const int64_t rows = classes > 0 ? x3.numel() / classes : 0;
    const Tensor x = xl.contiguous().view({rows, classes});
    Tensor t;
    if (probs) {
      const Tensor t3 = unbatched ? target.unsqueeze(0) : target;
      t = (t3.dim() > 2 ? t3.movedim(1, -1) : t3).contiguous().view({rows, classes});
    } else {
      t = target.reshape({rows}).contiguous();
    }
    const auto opmath = x.options().dtype(at::toOpMathType(input.scalar_type()));
    const bool mean = reduction == int64_t(Reduction::kMean);
    // mean over class indices: 1 / the weight of the rows not ignored, a 0-d tensor (no host sync)
    Tensor total, inv_total;
    if (!probs && rows > 0) {
      total = D::scan_targets(t, classes, ignore_index, w, mean, at::toOpMathType(input.scalar_type()));
      if (mean) inv_total = total.reciprocal();
    }
    const double scale = mean && probs ? 1.0 / double(rows) : 1.0;
    Tensor loss_rows = at::empty({rows}, opmath);
    Tensor g = grad ? at::empty({rows, classes}, x.options()) : Tensor();
    if (rows > 0 && classes > 0)
      D::cross_entropy(x, t, w, inv_total, scale, ignore_index, label_smoothing, loss_rows, g);
    else if (rows > 0)
      loss_rows.zero_();
    Tensor loss;
    if (reduction == int64_t(Reduction::kNone)) {
      loss = loss_rows.to(input.scalar_type())
                 .view(unbatched ? at::IntArrayRef{} : at::IntArrayRef(class_target_shape(input)));
    } else if (reduction == int64_t(Reduction::kSum)) {
      loss = loss_rows.sum().to(input.scalar_type());
    } else if (probs || rows == 0) {
      loss = (loss_rows.sum() / double(rows)).to(input.scalar_type());  // no rows: NaN, as torch
    } else {
      loss = (loss_rows.sum() / total).to(input.scalar_type());
    }
    Tensor grad_in;
    if (grad) {  // back to the input's shape: classes at dim 1 (a view of the rows' layout)
      if (unbatched) {
        grad_in = g.view({classes});
      } else {
        auto shape = xl.sizes().vec();
        grad_in = g.view(shape);
        if (x3.dim() > 2) grad_in = grad_in.movedim(-1, 1);
      }
    } else {
      grad_in = at::empty({0}, input.options());
    }
    return {loss, grad_in};
  }
};

}  // namespace pyops

// Every loss op of device D, registered inside TORCH_LIBRARY_IMPL(pyops, <key>, m) under the native
// names (SUFFIX "") or the Triton twins' (SUFFIX "_triton").
#define PYOPS_REGISTER_LOSS(m, D, SUFFIX)                        \
  do {                                                           \
    using L = ::pyops::Loss<D>;                                  \
    m.impl("pointwise_loss_fwd" SUFFIX, &L::pointwise_loss_fwd); \
    m.impl("pointwise_loss_bwd" SUFFIX, &L::pointwise_loss_bwd); \
    m.impl("cross_entropy_fwd" SUFFIX, &L::cross_entropy_fwd);   \
  } while (0)
