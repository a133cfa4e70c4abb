// The Triton device of the batch_norm family: csrc/batch_norm.h's host side around the launchers of
// pyops.kernels.batch_norm, reached through the pyops::_triton_bn_* ops that pyops/ops/batch_norm.py
// defines. Registered for CPU (Triton's interpreter) and CUDA tensors under the Triton twins' names.
#include <torch/library.h>

#include <optional>
#include <string>

#include "batch_norm.h"
#include "common/triton.h"

namespace pyops {
namespace {

std::optional<at::Tensor> opt(const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; }

struct Triton {
  using Guard = AnyDeviceGuard;

  static void stats(const at::Tensor& x, const BnLayout& l, const at::Tensor& mean, const at::Tensor& var) {
    static const TritonLaunch launch("pyops::_triton_bn_stats");
    launch(x, mean, var, l.outer, l.channels, l.inner);
  }
  static void elemt(const BnPass& p, const at::Tensor& out) {
    static const TritonLaunch launch("pyops::_triton_bn_elemt");
    launch(p.input, opt(p.residual), out, p.center, p.scale, p.shift, p.l.outer, p.l.channels, p.l.inner,
           std::string(act_name(p.act)), p.param);
  }
  static void bwd_reduce(const BnPass& p, const at::Tensor& sum_dz, const at::Tensor& sum_dzv, const at::Tensor& gr) {
    static const TritonLaunch launch("pyops::_triton_bn_bwd_reduce");
    launch(p.grad, opt(p.input), opt(p.output), opt(p.residual), p.center, sum_dz, sum_dzv, opt(gr), p.l.outer,
           p.l.channels, p.l.inner, std::string(act_name(p.act)), p.param, p.from_output);
  }
  // the two backward passes stay two kernels here (csrc/batch_norm.h runs them)
  static bool bwd_fused(const BnPass&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                        const at::Tensor&, const at::Tensor&) {
    return false;
  }
  static void bwd_elemt(const BnPass& p, const at::Tensor& gi) {
    static const TritonLaunch launch("pyops::_triton_bn_bwd_elemt");
    launch(p.grad, opt(p.input), opt(p.output), opt(p.residual), p.center, p.a, opt(p.b), opt(p.c), gi, p.l.outer,
           p.l.channels, p.l.inner, std::string(act_name(p.act)), p.param, p.from_output);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_BATCH_NORM(m, ::pyops::Triton, "_triton"); }
TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_BATCH_NORM(m, ::pyops::Triton, "_triton"); }

}  // namespace pyops
