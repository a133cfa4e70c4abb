// The Triton device of the loss family: csrc/loss.h's host side (checks, allocation, layout, the
// reductions' scales) around the launchers of pyops.kernels.loss, reached through the
// pyops::_triton_* ops that pyops/ops/loss.py defines. Registered for CPU (Triton's interpreter) and
// CUDA tensors under the Triton twins' names.
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/ones.h>
#include <torch/library.h>

#include <optional>

#include "common/triton.h"
#include "loss.h"

namespace pyops {
namespace {

// Elements each program of the reduction sums into one partial (kernels/loss.py's BLOCK).
constexpr int64_t kTritonBlock = 512;

std::optional<at::Tensor> maybe(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

struct Triton {
  using Guard = AnyDeviceGuard;

  static void pointwise(const at::Tensor& x, const at::Tensor& t, const at::Tensor& out, int64_t kind, double delta) {
    static const TritonLaunch launch("pyops::_triton_pointwise_loss");
    launch(x, t, out, kind, delta);
  }
  static void pointwise_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& t, const at::Tensor& gi,
                            int64_t kind, double delta) {
    static const TritonLaunch launch("pyops::_triton_pointwise_loss_bwd");
    launch(g, x, t, gi, kind, delta);
  }
  static void pointwise_reduce(const at::Tensor& x, const at::Tensor& t, const at::Tensor& out, const at::Tensor& g,
                               int64_t kind, double delta, double scale) {
    static const TritonLaunch launch("pyops::_triton_pointwise_loss_reduce");
    const int64_t blocks = (x.numel() + kTritonBlock - 1) / kTritonBlock;
    const auto dtype = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    at::Tensor partials = at::empty({blocks}, x.options().dtype(dtype));
    launch(x, t, out, maybe(g), partials, kind, delta, scale);
  }
  static at::Tensor scan_targets(const at::Tensor& t, int64_t classes, int64_t ignore_index, const at::Tensor& w,
                                 bool total, at::ScalarType opmath) {
    if (t.is_cpu()) {  // on a GPU the kernel makes such rows NaN (raising would synchronise)
      const int64_t* p = t.const_data_ptr<int64_t>();
      for (int64_t i = 0; i < t.numel(); ++i)
        TORCH_CHECK_INDEX(p[i] == ignore_index || (p[i] >= 0 && p[i] < classes), "pyops::cross_entropy_fwd: target ",
                          p[i], " is out of bounds for ", classes, " classes (ignore_index=", ignore_index, ")");
    }
    return total ? target_weight_total(t, ignore_index, w, opmath) : at::Tensor();
  }
  static void cross_entropy(const at::Tensor& x, const at::Tensor& t, const at::Tensor& w, const at::Tensor& inv_total,
                            double scale, int64_t ignore_index, double smoothing, const at::Tensor& loss_rows,
                            const at::Tensor& g) {
    static const TritonLaunch launch("pyops::_triton_cross_entropy");
    // the kernel always reads class weights and the gradient's scale (fewer launch variants)
    const auto opmath = loss_rows.options();
    const at::Tensor weights = w.defined() ? w : at::ones({x.size(1)}, opmath);
    const at::Tensor scales = inv_total.defined() ? inv_total : at::full({}, scale, opmath);
    launch(x, t, weights, scales, loss_rows, maybe(g), ignore_index, smoothing);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_LOSS(m, ::pyops::Triton, "_triton"); }
TORCH_LIBRARY_IMPL(pyops, CUDA, m) { PYOPS_REGISTER_LOSS(m, ::pyops::Triton, "_triton"); }

}  // namespace pyops
