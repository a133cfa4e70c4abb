// CPU kernels of the conv family (host side: csrc/conv.h; math: pyops/ops/conv.py): the CPU device,
// which picks one of three engines (csrc/cpu/conv_engines.h) by the input channels per group Cg:
// - Cg < kGemmChannels: the direct engine (csrc/cpu/conv_direct.cpp), or, for depthwise convolutions on
//   channels_last float32/float64 tensors, the channels_last depthwise engine
//   (csrc/cpu/conv_depthwise_cl.cpp);
// - Cg >= kGemmChannels: im2col + BLAS (csrc/cpu/conv_gemm.cpp).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <cstdint>

#include "common/act.h"
#include "common/dispatch.h"
#include "cpu/conv_engines.h"

namespace pyops {
namespace {

using at::vec::Vectorized;
using namespace cpu_conv;

// ---- the mask of relu / leaky_relu, from the output (common/act.h) --------------------------------
template <typename scalar_t>
void output_mask(const scalar_t* y, uint8_t* mask, int64_t n, Act act) {
  using T = at::opmath_type<scalar_t>;
  using Vec = Vectorized<T>;
  const int64_t blocks = n / kMaskBlock;
  at::parallel_for(0, blocks, 512, [&](int64_t b0, int64_t b1) {
    __at_align__ T buf[kMaskBlock];
    for (int64_t b = b0; b < b1; ++b) {
      at::vec::convert(y + b * kMaskBlock, buf, kMaskBlock);
      store_mask_word(mask, b, mask_word<T>([&](int64_t j) { return act_pass(act, Vec::loadu(buf + j)); }));
    }
  });
  mask_tail(mask, blocks * kMaskBlock, n, [&](int64_t i) { return act_pass(act, T(y[i])); });
}

struct Cpu {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static void forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                      const at::Tensor& out, Act act, double scalar) {
    if (s.Cg() >= kGemmChannels) return gemm_forward(s, x, w, bias, out, act, scalar);
    if (depthwise_cl(s, x, out)) return dw_cl_forward(s, x, w, bias, out, act, scalar);
    direct_forward(s, x, w, bias, out, act, scalar);
  }

  // out = conv(x, w) + bias, and its per-channel mean and biased variance: the direct and channels_last
  // depthwise engines record them in their epilogue (each task's output while in cache); after the
  // im2col + BLAS engine they take a pass over the output.
  static void forward_stats(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                            const at::Tensor& out, const at::Tensor& mean, const at::Tensor& var) {
    const int64_t M = s.OH * s.OW;
    const bool cl = s.Cg() < kGemmChannels && depthwise_cl(s, x, out);
    Moments m(cl ? s.N * s.OH : s.N, s.K, cl ? s.OW : M);
    if (s.Cg() >= kGemmChannels) {
      gemm_forward(s, x, w, bias, out, Act::kNone, 0);
      PYOPS_DISPATCH_FLOATING(out.scalar_type(), [&] {
        const View4<scalar_t> ov(out);
        at::parallel_for(0, s.N * s.K, 1, [&](int64_t t0, int64_t t1) {
          for (int64_t t = t0; t < t1; ++t) {
            const int64_t n = t / s.K, k = t % s.K;
            const auto [mu, sq] = part_moments(ov.p + n * ov.s0 + k * ov.s1, s.OH, ov.s2, s.OW, ov.s3);
            m.set(n, k, mu, sq);
          }
        });
      });
    } else if (cl) {
      dw_cl_forward(s, x, w, bias, out, Act::kNone, 0, &m);
    } else {
      direct_forward(s, x, w, bias, out, Act::kNone, 0, &m);
    }
    if (mean.scalar_type() == at::kDouble) {
      m.combine(mean.mutable_data_ptr<double>(), var.mutable_data_ptr<double>());
    } else {
      m.combine(mean.mutable_data_ptr<float>(), var.mutable_data_ptr<float>());
    }
  }

  static void mask(const at::Tensor& out, const at::Tensor& mask, Act act) {
    PYOPS_DISPATCH_FLOATING(out.scalar_type(), [&] {
      output_mask(out.const_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(), out.numel(), act);
    });
  }

  static void backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
    if (s.Cg() >= kGemmChannels) return gemm_backward_input(s, g, w, gi);
    if (depthwise_cl(s, g, gi)) return dw_cl_backward_input(s, g, w, gi);
    direct_backward_input(s, g, w, gi);
  }

  static void backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                              const at::Tensor& gb) {
    if (s.Cg() >= kGemmChannels) return gemm_backward_weight(s, g, x, gw, gb);
    if (depthwise_cl(s, g, x)) return dw_cl_backward_weight(s, g, x, gw, gb);
    direct_backward_weight(s, g, x, gw, gb);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_CONV(m, ::pyops::Cpu, ""); }

}  // namespace pyops
