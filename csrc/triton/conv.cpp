// The Triton device of the conv family: csrc/conv.h's host side (checks, allocation, layout) around the
// launchers of pyops.kernels.conv, reached through the pyops::_triton_conv2d_* ops that
// pyops/ops/conv.py defines. Registered for CPU (Triton's interpreter) and CUDA tensors under the
// Triton twins' names.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <vector>

#include "common/triton.h"
#include "conv.h"

namespace pyops {
namespace {

struct Triton {
  using Guard = AnyDeviceGuard;

  // ConvShape as the launchers read it (pyops/ops/conv.py)
  static std::vector<int64_t> shape(const ConvShape& s) {
    return {s.N, s.C, s.H, s.W, s.K, s.KH, s.KW, s.OH, s.OW, s.sh, s.sw, s.ph, s.pw, s.dh, s.dw, s.groups};
  }

  static void forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                      const at::Tensor& out, Act act, double scalar) {
    static const TritonLaunch launch("pyops::_triton_conv2d_fwd");
    launch(x, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt, out, shape(s), int64_t(act), scalar);
  }
  // no statistics epilogue yet: the forward, then the batch_norm family's Triton statistics kernel
  static void forward_stats(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            const at::Tensor& out, const at::Tensor& mean, const at::Tensor& var) {
    forward(s, x, w, bias, out, Act::kNone, 0);
    stats_by_op("pyops::batch_norm_stats_triton", out, mean, var);
  }
  static void mask(const at::Tensor& out, const at::Tensor& mask, Act act) {
    static const TritonLaunch launch("pyops::_triton_conv2d_mask");
    launch(out, mask, int64_t(act));
  }
  static void backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
    static const TritonLaunch launch("pyops::_triton_conv2d_bwd_input");
    launch(g, w, gi, shape(s));
  }
  static void backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                              const at::Tensor& gb) {
    static const TritonLaunch launch("pyops::_triton_conv2d_bwd_weight");
    const bool bias = gb.defined();
    launch(g, x, gw, bias ? gb : at::empty({0}, g.options()), bias, shape(s));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_CONV(m, ::pyops::Triton, "_triton"); }
TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_CONV(m, ::pyops::Triton, "_triton"); }

}  // namespace pyops
