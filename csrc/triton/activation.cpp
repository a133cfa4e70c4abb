// The Triton device of the activation family: csrc/activation.h's host side (checks, allocation,
// layout, in-place rules) around the launchers of pyops.kernels.activation, reached through the
// pyops::_triton_* ops that pyops/ops/activation.py defines. Registered for CPU (Triton's
// interpreter) and CUDA tensors under the Triton twins' names.
#include <torch/library.h>

#include "activation.h"
#include "common/triton.h"

namespace pyops {
namespace {

// Each op of the family as the launchers name it; the scalar travels beside it.
struct TritonMath {
  struct Relu {
    static constexpr const char* name = "relu";
    double scalar = 0;
  };
  struct Leaky {
    static constexpr const char* name = "leaky_relu";
    double scalar;
  };
  struct Elu {
    static constexpr const char* name = "elu";
    double scalar;
  };
  struct EluBwdResult {
    static constexpr const char* name = "elu_result";
    double scalar;
  };
  struct EluBwdInput {
    static constexpr const char* name = "elu_input";
    double scalar;
  };
  struct Sigmoid {
    static constexpr const char* name = "sigmoid";
    double scalar = 0;
  };
  struct SigmoidBwd {
    static constexpr const char* name = "sigmoid";
    double scalar = 0;
  };
  struct Tanh {
    static constexpr const char* name = "tanh";
    double scalar = 0;
  };
  struct TanhBwd {
    static constexpr const char* name = "tanh";
    double scalar = 0;
  };
};

struct Triton : TritonMath {
  using Guard = AnyDeviceGuard;

  template <typename Op>
  static void masked_forward(const at::Tensor& in, const at::Tensor& out, const at::Tensor& mask, const Op& op) {
    static const TritonLaunch launch("pyops::_triton_masked_fwd");
    launch(in, out, mask, Op::name, op.scalar);
  }
  template <typename Op>
  static void masked_backward(const at::Tensor& g, const at::Tensor& mask, const at::Tensor& gi, const Op& op) {
    static const TritonLaunch launch("pyops::_triton_masked_bwd");
    launch(g, mask, gi, Op::name, op.scalar);
  }
  template <typename F>
  static void unary(const at::Tensor& in, const at::Tensor& out, const F& f) {
    static const TritonLaunch launch("pyops::_triton_unary");
    launch(in, out, F::name, f.scalar);
  }
  template <typename F>
  static void binary(const at::Tensor& g, const at::Tensor& saved, const at::Tensor& out, const F& f) {
    static const TritonLaunch launch("pyops::_triton_binary_bwd");
    launch(g, saved, out, F::name, f.scalar);
  }
  static void maxout_forward(const at::Tensor& x, const at::Tensor& out, const at::Tensor& idx, const MaxoutShape& s,
                             int64_t pieces) {
    static const TritonLaunch launch("pyops::_triton_maxout_fwd");
    launch(x, out, idx, s.inner, pieces);
  }
  static void maxout_backward(const at::Tensor& g, const at::Tensor& idx, const at::Tensor& gi, const MaxoutShape& s,
                              int64_t pieces) {
    static const TritonLaunch launch("pyops::_triton_maxout_bwd");
    launch(g, idx, gi, s.inner, pieces);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_ACTIVATION(m, ::pyops::Triton, "_triton"); }
TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_ACTIVATION(m, ::pyops::Triton, "_triton"); }

}  // namespace pyops
