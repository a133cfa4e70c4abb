// The im2col + BLAS CPU conv engine (kGemmChannels or more input channels per group): per image and
// group, an im2col of the group's planes and a matrix product through ATen's BLAS (at::mm), in opmath.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "cpu/conv_engines.h"

namespace pyops {
namespace cpu_conv {
namespace {

// ---- im2col + BLAS ----------------------------------------------------------------------------------
// cols[(c * KH + kh) * KW + kw, oh * OW + ow] = x[c, oh * sh - ph + kh * dh, ow * sw - pw + kw * dw]
// (x: Cg contiguous planes).
template <typename T>
void im2col(const T* x, const ConvShape& s, T* cols) {
  const int64_t rows = s.Cg() * s.KH * s.KW, M = s.OH * s.OW;
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t c = r / (s.KH * s.KW), kh = r / s.KW % s.KH, kw = r % s.KW;
      const T* plane = x + c * s.H * s.W;
      T* d = cols + r * M;
      for (int64_t oh = 0; oh < s.OH; ++oh) {
        const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
        T* drow = d + oh * s.OW;
        if (ih < 0 || ih >= s.H) {
          std::fill(drow, drow + s.OW, T(0));
          continue;
        }
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          const int64_t iw = ow * s.sw - s.pw + kw * s.dw;
          drow[ow] = iw >= 0 && iw < s.W ? plane[ih * s.W + iw] : T(0);
        }
      }
    }
  });
}

// x[c] += the columns back in place (the transpose of im2col); each plane summed in a fixed order.
template <typename T>
void col2im_add(const T* cols, const ConvShape& s, T* x) {
  const int64_t M = s.OH * s.OW;
  at::parallel_for(0, s.Cg(), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      T* plane = x + c * s.H * s.W;
      for (int64_t kh = 0; kh < s.KH; ++kh)
        for (int64_t kw = 0; kw < s.KW; ++kw) {
          const T* src = cols + ((c * s.KH + kh) * s.KW + kw) * M;
          for (int64_t oh = 0; oh < s.OH; ++oh) {
            const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
            if (ih < 0 || ih >= s.H) continue;
            for (int64_t ow = 0; ow < s.OW; ++ow) {
              const int64_t iw = ow * s.sw - s.pw + kw * s.dw;
              if (iw >= 0 && iw < s.W) plane[ih * s.W + iw] += src[oh * s.OW + ow];
            }
          }
        }
    }
  });
}

template <typename scalar_t>
void gemm_forward_t(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                    const at::Tensor& out, Act act, double scalar) {
  using T = at::opmath_type<scalar_t>;
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  const int64_t G = s.groups, Cg = s.Cg(), Kg = s.Kg(), rows = Cg * s.KH * s.KW, M = s.OH * s.OW;
  const at::Tensor xf = x.to(opmath).contiguous();
  const at::Tensor wf = w.to(opmath).reshape({G, Kg, rows});
  at::Tensor of = at::empty({s.N, G, Kg, M}, xf.options());
  at::Tensor cols = at::empty({rows, M}, xf.options());
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t grp = 0; grp < G; ++grp) {
      im2col(xf.const_data_ptr<T>() + (n * s.C + grp * Cg) * s.H * s.W, s, cols.mutable_data_ptr<T>());
      at::Tensor dst = of[n][grp];
      at::mm_out(dst, wf[grp], cols);
    }
  at::Tensor o = of.view({s.N, s.K, s.OH, s.OW});
  if (bias.defined()) o.add_(bias.to(opmath).view({1, s.K, 1, 1}));
  activate(o, act, scalar);
  out.copy_(o);
}

template <typename scalar_t>
void gemm_backward_input_t(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
  using T = at::opmath_type<scalar_t>;
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  const int64_t G = s.groups, Cg = s.Cg(), Kg = s.Kg(), rows = Cg * s.KH * s.KW, M = s.OH * s.OW;
  const at::Tensor gf = g.to(opmath).contiguous().view({s.N, G, Kg, M});
  const at::Tensor wf = w.to(opmath).reshape({G, Kg, rows});
  at::Tensor xf = at::zeros({s.N, s.C, s.H, s.W}, gf.options());
  at::Tensor cols = at::empty({rows, M}, gf.options());
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t grp = 0; grp < G; ++grp) {
      at::mm_out(cols, wf[grp].t(), gf[n][grp]);
      col2im_add(cols.const_data_ptr<T>(), s, xf.mutable_data_ptr<T>() + (n * s.C + grp * Cg) * s.H * s.W);
    }
  gi.copy_(xf);
}

template <typename scalar_t>
void gemm_backward_weight_t(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                            const at::Tensor& gb) {
  using T = at::opmath_type<scalar_t>;
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  const int64_t G = s.groups, Cg = s.Cg(), Kg = s.Kg(), rows = Cg * s.KH * s.KW, M = s.OH * s.OW;
  const at::Tensor gf = g.to(opmath).contiguous().view({s.N, G, Kg, M});
  const at::Tensor xf = x.to(opmath).contiguous();
  at::Tensor wf = at::zeros({G, Kg, rows}, gf.options());
  at::Tensor cols = at::empty({rows, M}, gf.options());
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t grp = 0; grp < G; ++grp) {
      im2col(xf.const_data_ptr<T>() + (n * s.C + grp * Cg) * s.H * s.W, s, cols.mutable_data_ptr<T>());
      wf[grp].addmm_(gf[n][grp], cols.t());
    }
  gw.copy_(wf.view(gw.sizes()));
  if (gb.defined()) gb.copy_(gf.view({s.N, s.K, M}).sum(at::IntArrayRef{0, 2}));
}

}  // namespace

void gemm_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                  const at::Tensor& out, Act act, double scalar) {
  PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] { gemm_forward_t<scalar_t>(s, x, w, bias, out, act, scalar); });
}
void gemm_backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
  PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] { gemm_backward_input_t<scalar_t>(s, g, w, gi); });
}
void gemm_backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                          const at::Tensor& gb) {
  PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] { gemm_backward_weight_t<scalar_t>(s, g, x, gw, gb); });
}

}  // namespace cpu_conv
}  // namespace pyops
