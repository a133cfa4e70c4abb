// The Triton device of the optim family: csrc/optim.h's host side (checks, version counters) around
// the launchers of pyops.kernels.optim, reached through the pyops::_triton_<optimizer>_step ops that
// pyops/ops/optim.py defines with the primitives' own schemas. Registered for CPU (Triton's
// interpreter) and CUDA tensors under the Triton twins' names.
#include <torch/library.h>

#include "common/triton.h"
#include "optim.h"

namespace pyops {
namespace {

struct Triton {
  static constexpr bool kStochasticRound = true;  // kernels/optim.py's _store_param
  using Guard = AnyDeviceGuard;

  static void sgd(const SgdStep& s) {
    static const TritonLaunch launch("pyops::_triton_sgd_step");
    launch(s.params, s.grads, s.momentum_buffers, s.lr, s.momentum, s.dampening, s.weight_decay, s.nesterov, s.maximize,
           s.new_buffers, s.grad_scale, s.found_inf, s.stochastic_round, s.seed);
  }
  // D::adam takes bfloat16 state for float32 parameters (csrc/optim.h): a launch per states' dtype.
  static constexpr bool kBf16AdamStates = true;

  static void adam(const AdamStep& s) {
    static const TritonLaunch launch("pyops::_triton_adam_step");
    launch(s.params, s.grads, s.exp_avgs, s.exp_avg_sqs, s.max_exp_avg_sqs, s.steps, s.lr, s.beta1, s.beta2,
           s.weight_decay, s.eps, s.amsgrad, s.maximize, s.decoupled, s.grad_scale, s.found_inf, s.stochastic_round,
           s.seed);
  }
  static void adam_8bit(const Adam8bitStep& s) {
    if (s.qmap_signed.is_cpu()) {  // (the interpreter: host memory, read at no cost)
      check_quant_map_on_host(s.qmap_signed, "qmap_signed");
      check_quant_map_on_host(s.qmap_unsigned, "qmap_unsigned");
    }
    static const TritonLaunch launch("pyops::_triton_adam_step_8bit");
    launch(s.params, s.grads, s.exp_avgs, s.exp_avg_sqs, s.exp_avg_absmaxs, s.exp_avg_sq_absmaxs, s.steps,
           s.qmap_signed, s.qmap_unsigned, s.block_size, s.lr, s.beta1, s.beta2, s.weight_decay, s.eps, s.maximize,
           s.decoupled, s.grad_scale, s.found_inf);
  }
  static void adagrad(const AdagradStep& s) {
    static const TritonLaunch launch("pyops::_triton_adagrad_step");
    launch(s.params, s.grads, s.sums, s.steps, s.lr, s.lr_decay, s.weight_decay, s.eps, s.maximize, s.grad_scale,
           s.found_inf, s.stochastic_round, s.seed);
  }
  static void rmsprop(const RmspropStep& s) {
    static const TritonLaunch launch("pyops::_triton_rmsprop_step");
    launch(s.params, s.grads, s.square_avgs, s.grad_avgs, s.momentum_buffers, s.steps, s.lr, s.alpha, s.eps,
           s.weight_decay, s.momentum, s.centered, s.maximize, s.grad_scale, s.found_inf, s.stochastic_round, s.seed);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  PYOPS_REGISTER_OPTIM(m, ::pyops::Triton, "_triton");
  PYOPS_REGISTER_OPTIM_8BIT(m, ::pyops::Triton, "_triton");
}
TORCH_LIBRARY_IMPL(pyops, CUDA, m) {
  PYOPS_REGISTER_OPTIM(m, ::pyops::Triton, "_triton");
  PYOPS_REGISTER_OPTIM_8BIT(m, ::pyops::Triton, "_triton");
}

}  // namespace pyops
