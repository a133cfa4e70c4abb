// The activation family's host side, written once for every device: argument checks, output
// allocation and layout, in-place semantics, and the list of ops each device registers.
// A device D (csrc/cpu/activation.cpp, csrc/cuda/activation.cu) supplies:
//   D::Guard(tensor)                                    device guard (a no-op on CPU)
//   D::masked_forward(in, out, mask, op)                out = pass ? x : op.out_other(x), mask bits pass
//                                                       (pass = act_pass(op.act, x), common/act.h)
//   D::masked_backward(grad, mask, grad_in, op)         grad_in = bit ? g : op.grad_other(g)
//   D::unary(in, out, f) / D::binary(a, b, out, f)      elementwise maps in memory order
//   D::maxout_forward / D::maxout_backward              (see below)
//   the math: D::Relu, D::Leaky{slope}, D::Elu{alpha}, D::EluBwdResult{alpha},
//   D::EluBwdInput{alpha}, D::Sigmoid, D::SigmoidBwd, D::Tanh, D::TanhBwd
// Kernels are called only for non-empty tensors.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <tuple>

#include "common/checks.h"

namespace pyops {

template <class D>
struct Activation {
  using Tensor = at::Tensor;

  // ---- ReLU / LeakyReLU: output and a 1-bit mask (its format: csrc/common/act.h) ----------------
  template <class Op>
  static std::tuple<Tensor, Tensor> masked_fwd(const char* name, const Tensor& self, bool inplace, const Op& op) {
    check_floating(name, "self", self);
    typename D::Guard guard(self);
    auto d = inplace ? dense_inplace(self) : dense_like(self);
    Tensor mask = at::empty({(self.numel() + 7) / 8}, self.options().dtype(at::kByte));
    if (self.numel() > 0) D::masked_forward(d.in, d.out, mask, op);
    if (inplace && !d.out.is_same(self)) self.copy_(d.out);
    return {inplace ? self : d.out, mask};
  }

  template <class Op>
  static Tensor masked_bwd(const char* name, const Tensor& grad_out, const Tensor& mask, const Op& op) {
    check_floating(name, "grad_out", grad_out);
    check_mask(name, grad_out, mask);
    typename D::Guard guard(grad_out);
    auto d = dense_like(grad_out);
    if (grad_out.numel() > 0) D::masked_backward(d.in, mask, d.out, op);
    return d.out;
  }

  static std::tuple<Tensor, Tensor> relu_fwd(const Tensor& self) {
    return masked_fwd("relu_fwd", self, false, typename D::Relu{});
  }
  static Tensor relu_fwd_(Tensor& self) { return std::get<1>(masked_fwd("relu_fwd_", self, true, typename D::Relu{})); }
  static Tensor relu_bwd(const Tensor& grad_out, const Tensor& mask) {
    return masked_bwd("relu_bwd", grad_out, mask, typename D::Relu{});
  }
  static std::tuple<Tensor, Tensor> leaky_relu_fwd(const Tensor& self, double slope) {
    return masked_fwd("leaky_relu_fwd", self, false, typename D::Leaky{slope});
  }
  static Tensor leaky_relu_fwd_(Tensor& self, double slope) {
    return std::get<1>(masked_fwd("leaky_relu_fwd_", self, true, typename D::Leaky{slope}));
  }
  static Tensor leaky_relu_bwd(const Tensor& grad_out, const Tensor& mask, double slope) {
    return masked_bwd("leaky_relu_bwd", grad_out, mask, typename D::Leaky{slope});
  }

  // ---- elementwise ops that save their output (or input) ----------------------------------------
  template <class F>
  static Tensor unary_fwd(const char* name, Tensor self, bool inplace, const F& f) {
    check_floating(name, "self", self);
    typename D::Guard guard(self);
    auto d = inplace ? dense_inplace(self) : dense_like(self);
    if (self.numel() > 0) D::unary(d.in, d.out, f);
    if (inplace && !d.out.is_same(self)) self.copy_(d.out);
    return inplace ? self : d.out;
  }

  // grad_in = f(grad_out, saved); grad_out is brought to saved's layout, which grad_in takes.
  template <class F>
  static Tensor binary_bwd(const char* name, const Tensor& grad_out, const Tensor& saved, const F& f) {
    check_floating(name, "grad_out", grad_out);
    check_like(name, "grad_out", grad_out, "saved", saved);
    check_same_shape(name, "grad_out", grad_out, "saved", saved);
    typename D::Guard guard(grad_out);
    auto d = dense_like(saved);
    Tensor g = as_layout_of(grad_out, d.out);
    if (g.numel() > 0) D::binary(g, d.in, d.out, f);
    return d.out;
  }

  static Tensor elu_fwd(const Tensor& self, double alpha) {
    return unary_fwd("elu_fwd", self, false, typename D::Elu{alpha});
  }
  static void elu_fwd_(Tensor& self, double alpha) { unary_fwd("elu_fwd_", self, true, typename D::Elu{alpha}); }
  static Tensor elu_bwd(const Tensor& grad_out, const Tensor& saved, double alpha, bool is_result) {
    if (is_result) return binary_bwd("elu_bwd", grad_out, saved, typename D::EluBwdResult{alpha});
    return binary_bwd("elu_bwd", grad_out, saved, typename D::EluBwdInput{alpha});
  }
  static Tensor sigmoid_fwd(const Tensor& self) { return unary_fwd("sigmoid_fwd", self, false, typename D::Sigmoid{}); }
  static Tensor sigmoid_bwd(const Tensor& grad_out, const Tensor& out) {
    return binary_bwd("sigmoid_bwd", grad_out, out, typename D::SigmoidBwd{});
  }
  static Tensor tanh_fwd(const Tensor& self) { return unary_fwd("tanh_fwd", self, false, typename D::Tanh{}); }
  static Tensor tanh_bwd(const Tensor& grad_out, const Tensor& out) {
    return binary_bwd("tanh_bwd", grad_out, out, typename D::TanhBwd{});
  }

  // ---- Maxout over [outer, channels, inner] (contiguous); D::maxout_forward(x, out, idx, shape,
  // pieces) and D::maxout_backward(grad, idx, grad_in, shape, pieces) --------------------------------
  static std::tuple<Tensor, Tensor> maxout_fwd(const Tensor& self, int64_t pieces, int64_t dim) {
    check_floating("maxout_fwd", "self", self);
    const auto s = maxout_shape("maxout_fwd", self, pieces, dim);
    typename D::Guard guard(self);
    auto sizes = self.sizes().vec();
    sizes[s.dim] /= pieces;
    Tensor out = at::empty(sizes, self.options());
    Tensor idx = at::empty(sizes, self.options().dtype(at::kByte));
    if (out.numel() > 0) D::maxout_forward(self.contiguous(), out, idx, s, pieces);
    return {out, idx};
  }

  static Tensor maxout_bwd(const Tensor& grad_out, const Tensor& indices, int64_t pieces, int64_t dim) {
    check_floating("maxout_bwd", "grad_out", grad_out);
    TORCH_CHECK(indices.scalar_type() == at::kByte, "pyops::maxout_bwd: indices must be uint8, got ",
                indices.scalar_type());
    TORCH_CHECK(indices.device() == grad_out.device(), "pyops::maxout_bwd: indices is on ", indices.device(),
                " but grad_out is on ", grad_out.device());
    check_same_shape("maxout_bwd", "grad_out", grad_out, "indices", indices);
    TORCH_CHECK(grad_out.dim() > 0, "pyops::maxout_bwd: grad_out must have at least one dimension");
    check_dim("maxout_bwd", dim, grad_out.dim());
    typename D::Guard guard(grad_out);
    auto sizes = grad_out.sizes().vec();
    sizes[c10::maybe_wrap_dim(dim, grad_out.dim())] *= pieces;
    Tensor gi = at::empty(sizes, grad_out.options());
    const auto s = maxout_shape("maxout_bwd", gi, pieces, dim);
    if (gi.numel() > 0) D::maxout_backward(grad_out.contiguous(), indices.contiguous(), gi, s, pieces);
    return gi;
  }
};

}  // namespace pyops

// Every activation op of device D, registered inside TORCH_LIBRARY_IMPL(pyops, <key>, m) under the
// native names (SUFFIX "") or the Triton twins' (SUFFIX "_triton"; in-place ones end in "_" after it).
#define PYOPS_REGISTER_ACTIVATION(m, D, SUFFIX)               \
  do {                                                        \
    using A = ::pyops::Activation<D>;                         \
    m.impl("relu_fwd" SUFFIX, &A::relu_fwd);                  \
    m.impl("relu_fwd" SUFFIX "_", &A::relu_fwd_);             \
    m.impl("relu_bwd" SUFFIX, &A::relu_bwd);                  \
    m.impl("leaky_relu_fwd" SUFFIX, &A::leaky_relu_fwd);      \
    m.impl("leaky_relu_fwd" SUFFIX "_", &A::leaky_relu_fwd_); \
    m.impl("leaky_relu_bwd" SUFFIX, &A::leaky_relu_bwd);      \
    m.impl("elu_fwd" SUFFIX, &A::elu_fwd);                    \
    m.impl("elu_fwd" SUFFIX "_", &A::elu_fwd_);               \
    m.impl("elu_bwd" SUFFIX, &A::elu_bwd);                    \
    m.impl("sigmoid_fwd" SUFFIX, &A::sigmoid_fwd);            \
    m.impl("sigmoid_bwd" SUFFIX, &A::sigmoid_bwd);            \
    m.impl("tanh_fwd" SUFFIX, &A::tanh_fwd);                  \
    m.impl("tanh_bwd" SUFFIX, &A::tanh_bwd);                  \
    m.impl("maxout_fwd" SUFFIX, &A::maxout_fwd);              \
    m.impl("maxout_bwd" SUFFIX, &A::maxout_bwd);              \
  } while (0)
