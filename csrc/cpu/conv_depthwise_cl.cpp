// The CPU conv engine for depthwise convolutions (one channel per group) on channels_last
// float32/float64 tensors: vectorized over channels, an output pixel a vector; weights transposed to
// [KH * KW, C]. Its input gradient is gathered, its weight gradient a fixed-order split reduction.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu/conv_engines.h"

namespace pyops {
namespace cpu_conv {
namespace {

// ---- depthwise in channels_last: vectorized over channels ---------------------------------------------
// One input and one output channel per group, float32/float64, input and output with channel stride 1:
// every output pixel is a vector over channels; weights are transposed to [KH * KW, C].
template <typename T>
at::Tensor taps_by_channel(const at::Tensor& w, const ConvShape& s) {  // [C, 1, KH, KW] -> [KH * KW, C]
  return w.reshape({s.C, s.KH * s.KW}).t().contiguous();
}

template <typename T>
void dw_cl_forward_t(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                     const at::Tensor& out, Act act, double scalar) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const at::Tensor wt = taps_by_channel<T>(w, s);
  const T* wp = wt.const_data_ptr<T>();
  const T* bp = bias.defined() ? bias.const_data_ptr<T>() : nullptr;
  const View4<T> xv(x), ov(out);
  const int64_t C = s.C;
  const T sc = T(scalar);
  const int64_t taps = s.KH * s.KW;
  at::parallel_for(0, s.N * s.OH, 1, [&](int64_t r0, int64_t r1) {
    std::vector<Vec> wv(taps);  // this channel block's weights, one vector a tap
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.OH, oh = r % s.OH;
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t cnt = std::min(L, C - c0);
        for (int64_t t = 0; t < taps; ++t) wv[t] = Vec::loadu(wp + t * C + c0, cnt);
        const Vec b0 = bp ? Vec::loadu(bp + c0, cnt) : Vec(T(0));
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          Vec acc = b0;
          for (int64_t kh = 0; kh < s.KH; ++kh) {
            const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
            if (ih < 0 || ih >= s.H) continue;
            const T* xrow = xv.p + n * xv.s0 + ih * xv.s2 + c0;
            const Vec* wrow = wv.data() + kh * s.KW;
            const int64_t iw0 = ow * s.sw - s.pw;
            if (iw0 >= 0 && iw0 + (s.KW - 1) * s.dw < s.W) {  // every tap of the row inside
              for (int64_t kw = 0; kw < s.KW; ++kw)
                acc = at::vec::fmadd(wrow[kw], Vec::loadu(xrow + (iw0 + kw * s.dw) * xv.s3, cnt), acc);
              continue;
            }
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const int64_t iw = iw0 + kw * s.dw;
              if (iw < 0 || iw >= s.W) continue;
              acc = at::vec::fmadd(wrow[kw], Vec::loadu(xrow + iw * xv.s3, cnt), acc);
            }
          }
          act_forward(act, acc, sc).store(ov.p + n * ov.s0 + oh * ov.s2 + ow * ov.s3 + c0, cnt);
        }
      }
    }
  });
}

// grad_in gathered: each input pixel sums the output pixels its taps reach (any stride).
template <typename T>
void dw_cl_backward_input_t(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const at::Tensor wt = taps_by_channel<T>(w, s);
  const T* wp = wt.const_data_ptr<T>();
  const View4<T> gv(g), iv(gi);
  const int64_t C = s.C;
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.H, ih = r % s.H;
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t cnt = std::min(L, C - c0);
        for (int64_t iw = 0; iw < s.W; ++iw) {
          Vec acc(T(0));
          for (int64_t kh = 0; kh < s.KH; ++kh) {
            const int64_t th = ih + s.ph - kh * s.dh;
            if (th < 0 || th % s.sh != 0 || th / s.sh >= s.OH) continue;
            const T* grow = gv.p + n * gv.s0 + (th / s.sh) * gv.s2 + c0;
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const int64_t tw = iw + s.pw - kw * s.dw;
              if (tw < 0 || tw % s.sw != 0 || tw / s.sw >= s.OW) continue;
              acc = at::vec::fmadd(Vec::loadu(wp + (kh * s.KW + kw) * C + c0, cnt),
                                   Vec::loadu(grow + (tw / s.sw) * gv.s3, cnt), acc);
            }
          }
          acc.store(iv.p + n * iv.s0 + ih * iv.s2 + iw * iv.s3 + c0, cnt);
        }
      }
    }
  });
}

// The weight and bias gradients: output rows (n, oh) split into chunks fixed by the shape, each chunk
// summing into its own [KH * KW + 1, C] partial, the partials added in chunk order.
template <typename T>
void dw_cl_backward_weight_t(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                             const at::Tensor& gb) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const View4<T> gv(g), xv(x);
  const int64_t C = s.C, taps = s.KH * s.KW, rows = s.N * s.OH;
  const int64_t NC = std::min<int64_t>(rows, 16), per = (rows + NC - 1) / NC, psize = (taps + 1) * C;
  std::vector<T> parts(NC * psize, T(0));
  at::parallel_for(0, NC, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ci = t0; ci < t1; ++ci) {
      T* P = parts.data() + ci * psize;
      for (int64_t r = ci * per; r < std::min(rows, (ci + 1) * per); ++r) {
        const int64_t n = r / s.OH, oh = r % s.OH;
        for (int64_t c0 = 0; c0 < C; c0 += L) {
          const int64_t cnt = std::min(L, C - c0);
          Vec bsum = Vec::loadu(P + taps * C + c0, cnt);
          for (int64_t ow = 0; ow < s.OW; ++ow) {
            const Vec gval = Vec::loadu(gv.p + n * gv.s0 + oh * gv.s2 + ow * gv.s3 + c0, cnt);
            bsum = bsum + gval;
            for (int64_t kh = 0; kh < s.KH; ++kh) {
              const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
              if (ih < 0 || ih >= s.H) continue;
              const T* xrow = xv.p + n * xv.s0 + ih * xv.s2 + c0;
              for (int64_t kw = 0; kw < s.KW; ++kw) {
                const int64_t iw = ow * s.sw - s.pw + kw * s.dw;
                if (iw < 0 || iw >= s.W) continue;
                T* acc = P + (kh * s.KW + kw) * C + c0;
                at::vec::fmadd(gval, Vec::loadu(xrow + iw * xv.s3, cnt), Vec::loadu(acc, cnt)).store(acc, cnt);
              }
            }
          }
          bsum.store(P + taps * C + c0, cnt);
        }
      }
    }
  });
  T* gwp = gw.mutable_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < taps; ++t) {
      T v = 0;
      for (int64_t ci = 0; ci < NC; ++ci) v += parts[ci * psize + t * C + c];
      gwp[c * taps + t] = v;
    }
  if (gb.defined()) {
    T* gbp = gb.mutable_data_ptr<T>();
    for (int64_t c = 0; c < C; ++c) {
      T v = 0;
      for (int64_t ci = 0; ci < NC; ++ci) v += parts[ci * psize + taps * C + c];
      gbp[c] = v;
    }
  }
}

}  // namespace

// float32/float64 only (depthwise_cl() routes no other dtype here; another is an error, not a no-op).
void dw_cl_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                   const at::Tensor& out, Act act, double scalar) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyops::conv2d (depthwise channels_last)",
                             [&] { dw_cl_forward_t<scalar_t>(s, x, w, bias, out, act, scalar); });
}
void dw_cl_backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pyops::conv2d (depthwise channels_last)",
                             [&] { dw_cl_backward_input_t<scalar_t>(s, g, w, gi); });
}
void dw_cl_backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                           const at::Tensor& gb) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "pyops::conv2d (depthwise channels_last)",
                             [&] { dw_cl_backward_weight_t<scalar_t>(s, g, x, gw, gb); });
}

}  // namespace cpu_conv
}  // namespace pyops
