// Argument checks and layout helpers shared by the CPU and CUDA kernels of every family.
#pragma once
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/core/WrapDimMinimal.h>
#include <c10/util/Exception.h>

#include <optional>

namespace pyops {

// The four dtypes every pyops kernel takes.
inline bool is_kernel_dtype(at::ScalarType t) {
  return t == at::kDouble || t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_kernel_dtype(t.scalar_type()), "pyops::", op, ": ", name,
              " must be float64, float32, float16 or bfloat16, got ", t.scalar_type());
}

// b must share a's device and dtype (a is the first tensor argument).
inline void check_like(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                       const at::Tensor& b) {
  TORCH_CHECK(a.device() == b.device(), "pyops::", op, ": ", b_name, " is on ", b.device(), " but ", a_name, " is on ",
              a.device());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "pyops::", op, ": ", b_name, " has dtype ", b.scalar_type(), " but ",
              a_name, " has dtype ", a.scalar_type());
}

// An optional operand of a public op on the input's device, checked before anything reads it (torch's
// own words after the op's name: a meta or other-device tensor is an error, never read).
inline void check_operand_device(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                 const at::Tensor& input) {
  TORCH_CHECK(!t.has_value() || !t->defined() || t->device() == input.device(), "pyops.", op, ": ", name,
              ": Tensor on device ", t->device(), " is not on the expected device ", input.device(), "!");
}

inline void check_same_shape(const char* op, const char* a_name, const at::Tensor& a, const char* b_name,
                             const at::Tensor& b) {
  TORCH_CHECK(a.sizes() == b.sizes(), "pyops::", op, ": ", b_name, " has shape ", b.sizes(), " but ", a_name,
              " has shape ", a.sizes());
}

// A bit mask of n elements: contiguous uint8 of ceil(n / 8) bytes on t's device.
inline void check_mask(const char* op, const at::Tensor& t, const at::Tensor& mask) {
  TORCH_CHECK(mask.scalar_type() == at::kByte, "pyops::", op, ": mask must be uint8, got ", mask.scalar_type());
  TORCH_CHECK(mask.device() == t.device(), "pyops::", op, ": mask is on ", mask.device(), " but grad_out is on ",
              t.device());
  TORCH_CHECK(mask.dim() == 1 && mask.numel() == (t.numel() + 7) / 8, "pyops::", op,
              ": mask must hold ceil(numel / 8) = ", (t.numel() + 7) / 8, " bytes, got shape ", mask.sizes());
  TORCH_CHECK(mask.is_contiguous(), "pyops::", op, ": mask must be contiguous");
}

// Elementwise kernels walk memory in order, so they need a dense tensor. Torch lays an elementwise
// result out as empty_like does (the input's strides when it is dense, else contiguous); this returns
// such an output and x in the same layout (x itself when it already is, a copy otherwise).
struct DenseLike {
  at::Tensor in;
  at::Tensor out;
};

inline at::Tensor as_layout_of(const at::Tensor& t, const at::Tensor& like) {
  if (t.strides() == like.strides()) return t;
  return at::empty_like(like).copy_(t);
}

inline DenseLike dense_like(const at::Tensor& x) {
  at::Tensor out = at::empty_like(x);
  return {as_layout_of(x, out), out};
}

// In place: the kernel reads and writes x itself when x is dense, else a dense copy (copied back).
inline DenseLike dense_inplace(const at::Tensor& x) {
  if (x.is_non_overlapping_and_dense()) return {x, x};
  at::Tensor copy = at::empty_like(x).copy_(x);
  return {copy, copy};
}

inline void check_dim(const char* op, int64_t dim, int64_t ndim) {
  TORCH_CHECK(dim >= -ndim && dim < ndim, "pyops::", op, ": dim=", dim, " is out of range for a ", ndim, "-d input");
}

// Maxout's view of a tensor: [outer, channels, inner] around dim.
struct MaxoutShape {
  int64_t outer = 1, channels = 1, inner = 1, dim = 0;
};

inline MaxoutShape maxout_shape(const char* op, const at::Tensor& x, int64_t pieces, int64_t dim) {
  TORCH_CHECK(x.dim() > 0, "pyops::", op, ": input must have at least one dimension");
  check_dim(op, dim, x.dim());
  MaxoutShape s;
  s.dim = c10::maybe_wrap_dim(dim, x.dim());
  TORCH_CHECK(pieces >= 1 && pieces <= 256, "pyops::", op, ": pieces must be in [1, 256], got ", pieces);
  s.channels = x.size(s.dim);
  TORCH_CHECK(s.channels % pieces == 0, "pyops::", op, ": pieces=", pieces, " does not divide the size of dim ", s.dim,
              " (", s.channels, ")");
  for (int64_t d = 0; d < s.dim; ++d) s.outer *= x.size(d);
  for (int64_t d = s.dim + 1; d < x.dim(); ++d) s.inner *= x.size(d);
  return s;
}

}  // namespace pyops
