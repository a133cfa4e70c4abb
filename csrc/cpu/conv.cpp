// CPU kernels of the conv family (host side: csrc/conv.h; math: pyops/ops/conv.py).
//
// Two engines, chosen by the input channels per group Cg (and a third for depthwise channels_last):
// - Cg < kGemmChannels (depthwise, ResNeXt-like groups, a dense layer on a few channels): a direct
//   kernel. One task is one (image, group): the group's input planes are copied once, zero-padded, into
//   a thread-local opmath buffer (any input strides, float16/bfloat16 converted there), then each output
//   row is accumulated in vector registers across the kernel taps, vectorized over the output width
//   (stride 1 along the width; a scalar loop otherwise), with bias and activation applied before the
//   store. The input gradient at stride 1 is the same kernel run on grad_out with the group-transposed,
//   flipped weight; at other strides a scatter into a padded buffer. The weight gradient is a split
//   reduction: tasks of (group, fixed chunk of images) each sum their part into a partial buffer in a
//   fixed order, and the partials are added in chunk order (deterministic, whatever the thread count).
// - depthwise (one channel per group) on channels_last tensors, float32/float64: a direct kernel
//   vectorized over channels, an output pixel a vector; its input gradient gathered, its weight
//   gradient the same fixed-order split reduction.
// - Cg >= kGemmChannels: per image and group, an im2col of the group's planes and a matrix product
//   through ATen's BLAS (at::mm), in opmath.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/dispatch.h"
#include "common/vec.h"
#include "conv.h"

namespace pyops {
namespace {

using at::vec::Vectorized;

// Input channels per group from which the im2col + BLAS engine is faster than the direct kernel.
constexpr int64_t kGemmChannels = 16;

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// A 4-d tensor's data and strides, in elements.
template <typename T>
struct View4 {
  T* p;
  int64_t s0, s1, s2, s3;
  explicit View4(const at::Tensor& t)
      : p(const_cast<T*>(t.const_data_ptr<T>())), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
};

// The activation of the epilogue on v (act: ConvAct).
template <typename T>
inline Vectorized<T> act_apply(const Vectorized<T>& v, int64_t act, T scalar) {
  using V = Vectorized<T>;
  const V zero(T(0));
  switch (act) {
    case kConvActRelu:
      return V::blendv(v, zero, v < zero);  // NaN and -0.0 kept
    case kConvActLeakyRelu:
      return V::blendv(v * V(scalar), v, v > zero);
    case kConvActElu:
      return V::blendv(v.expm1() * V(scalar), v, v > zero);
    default:
      return v;
  }
}

template <typename T>
inline T act_apply(T v, int64_t act, T scalar) {
  switch (act) {
    case kConvActRelu:
      return v < T(0) ? T(0) : v;
    case kConvActLeakyRelu:
      return v > T(0) ? v : v * scalar;
    case kConvActElu:
      return v > T(0) ? v : std::expm1(v) * scalar;
    default:
      return v;
  }
}

// n elements from src to dst, converted (a plain copy when the types agree).
template <typename S, typename D>
inline void copy_convert(const S* src, D* dst, int64_t n) {
  if constexpr (std::is_same_v<S, D>) {
    std::memcpy(dst, src, n * sizeof(S));
  } else {
    at::vec::convert(src, dst, n);
  }
}

// Padded planes of one (image, group) in opmath: plane c's row r, column j holds
// src[c, r - pad_r, j - pad_c] (zero outside the source; pads may be negative: a crop).
struct PlaneGeometry {
  int64_t rows, cols, stride, plane;  // cols valid columns, stride >= cols (zeros past them)
};

template <typename scalar_t, typename T>
void copy_padded(const scalar_t* src, int64_t sc, int64_t sh, int64_t sw, int64_t channels, int64_t H, int64_t W,
                 int64_t pad_r, int64_t pad_c, const PlaneGeometry& g, T* dst) {
  const int64_t j0 = std::clamp<int64_t>(pad_c, 0, g.stride), j1 = std::clamp<int64_t>(W + pad_c, j0, g.stride);
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t r = 0; r < g.rows; ++r) {
      T* d = dst + c * g.plane + r * g.stride;
      const int64_t ih = r - pad_r;
      if (ih < 0 || ih >= H || j1 <= j0) {
        std::fill(d, d + g.stride, T(0));
        continue;
      }
      std::fill(d, d + j0, T(0));
      std::fill(d + j1, d + g.stride, T(0));
      const scalar_t* s = src + c * sc + ih * sh + (j0 - pad_c) * sw;
      if (sw == 1) {
        copy_convert(s, d + j0, j1 - j0);
      } else {
        for (int64_t j = j0; j < j1; ++j, s += sw) d[j] = T(*s);
      }
    }
  }
}

// row[0, n) to dst (element stride ds), converted.
template <typename T, typename scalar_t>
inline void store_row(const T* row, scalar_t* dst, int64_t ds, int64_t n) {
  if (ds == 1) {
    copy_convert(row, dst, n);
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j * ds] = scalar_t(row[j]);
  }
}

// ---- direct forward -----------------------------------------------------------------------------
// acc[0, V) of one output row segment at ow0 (stride 1 along the width): sum over c, kh, kw.
template <int V, typename T>
inline void row_block(const T* base, const int64_t* offs, const T* wk, int64_t taps, int64_t ow0, T bias, int64_t act,
                      T sc, T* out, int64_t valid) {
  static_assert(V >= 1 && V <= 4, "row_block: 1 to 4 vectors");
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  // one flat loop over the taps (channel, kh, kw): the accumulators stay in registers
  Vec a0(bias), a1(bias), a2(bias), a3(bias);
  const T* sp0 = base + ow0;
  for (int64_t t = 0; t < taps; ++t) {
    const Vec wv(wk[t]);
    const T* sp = sp0 + offs[t];
    a0 = at::vec::fmadd(wv, Vec::loadu(sp), a0);
    if constexpr (V > 1) a1 = at::vec::fmadd(wv, Vec::loadu(sp + L), a1);
    if constexpr (V > 2) a2 = at::vec::fmadd(wv, Vec::loadu(sp + 2 * L), a2);
    if constexpr (V > 3) a3 = at::vec::fmadd(wv, Vec::loadu(sp + 3 * L), a3);
  }
  // the epilogue's activation in registers; out[0, valid) written (a partial last vector masked)
  const auto emit = [&](Vec a, int64_t j) {
    const int64_t n = std::min<int64_t>(L, valid - (ow0 + j * L));
    if (n > 0) act_apply(a, act, sc).store(out + ow0 + j * L, n);
  };
  emit(a0, 0);
  if constexpr (V > 1) emit(a1, 1);
  if constexpr (V > 2) emit(a2, 2);
  if constexpr (V > 3) emit(a3, 3);
}

// out[n, k] = act(bias[k] + sum_c conv(x[n, group c], w[k, c])) for every image and group; x may be any
// strided 4-d tensor (padding may be negative: a crop), w opmath [K, Cg, KH, KW], bias opmath or null.
template <typename scalar_t>
void direct_forward(const ConvShape& s, const at::Tensor& x, const at::opmath_type<scalar_t>* w,
                    const at::opmath_type<scalar_t>* bias, const at::Tensor& out, int64_t act, double scalar) {
  using T = at::opmath_type<scalar_t>;
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const View4<scalar_t> xv(x), ov(out);
  const int64_t Cg = s.Cg(), Kg = s.Kg(), G = s.groups;
  const bool vector = s.sw == 1;
  const int64_t OWv = round_up(s.OW, L);
  PlaneGeometry geo;
  geo.rows = s.H + 2 * s.ph;
  geo.cols = s.W + 2 * s.pw;
  geo.stride = vector ? round_up(std::max(geo.cols, OWv + s.dw * (s.KW - 1)), L) : geo.cols;
  geo.plane = geo.rows * geo.stride;
  const T sc = T(scalar);
  const int64_t taps = Cg * s.KH * s.KW;
  const bool direct_store = std::is_same_v<scalar_t, T> && ov.s3 == 1;
  std::vector<int64_t> offs(taps);  // tap (c, kh, kw) -> its element's offset from the row's start
  for (int64_t c = 0; c < Cg; ++c)
    for (int64_t kh = 0; kh < s.KH; ++kh)
      for (int64_t kw = 0; kw < s.KW; ++kw)
        offs[(c * s.KH + kh) * s.KW + kw] = c * geo.plane + kh * s.dh * geo.stride + kw * s.dw;
  // grain: enough (image, group) pairs to amortise a task (~64K multiply-adds)
  const int64_t work = std::max<int64_t>(1, Kg * s.OH * s.OW * taps);
  at::parallel_for(0, s.N * G, std::max<int64_t>(1, (1 << 16) / work), [&](int64_t t0, int64_t t1) {
    std::vector<T> xs(Cg * geo.plane + L);
    std::vector<T> row(OWv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / G, grp = t % G;
      copy_padded(xv.p + n * xv.s0 + grp * Cg * xv.s1, xv.s1, xv.s2, xv.s3, Cg, s.H, s.W, s.ph, s.pw, geo, xs.data());
      for (int64_t kl = 0; kl < Kg; ++kl) {
        const int64_t k = grp * Kg + kl;
        const T* wk = w + k * taps;
        const T b = bias ? bias[k] : T(0);
        scalar_t* dst = ov.p + n * ov.s0 + k * ov.s1;
        for (int64_t oh = 0; oh < s.OH; ++oh) {
          const int64_t row0 = oh * s.sh;
          if (vector) {
            // straight into the output row where it is a dense row of opmath values, else via `row`
            T* target = direct_store ? reinterpret_cast<T*>(dst + oh * ov.s2) : row.data();
            const T* rbase = xs.data() + row0 * geo.stride;
            const int64_t valid = direct_store ? s.OW : OWv;
            int64_t ow0 = 0;
            for (; ow0 + 4 * L <= OWv; ow0 += 4 * L)
              row_block<4>(rbase, offs.data(), wk, taps, ow0, b, act, sc, target, valid);
            const int64_t rest = (OWv - ow0) / L;
            if (rest == 3) row_block<3>(rbase, offs.data(), wk, taps, ow0, b, act, sc, target, valid);
            if (rest == 2) row_block<2>(rbase, offs.data(), wk, taps, ow0, b, act, sc, target, valid);
            if (rest == 1) row_block<1>(rbase, offs.data(), wk, taps, ow0, b, act, sc, target, valid);
            if (direct_store) continue;
          } else {
            for (int64_t ow = 0; ow < s.OW; ++ow) {
              T acc = b;
              for (int64_t c = 0; c < Cg; ++c)
                for (int64_t kh = 0; kh < s.KH; ++kh) {
                  const T* srow = xs.data() + c * geo.plane + (row0 + kh * s.dh) * geo.stride + ow * s.sw;
                  const T* wrow = wk + (c * s.KH + kh) * s.KW;
                  for (int64_t kw = 0; kw < s.KW; ++kw) acc += wrow[kw] * srow[kw * s.dw];
                }
              row[ow] = act_apply(acc, act, sc);
            }
          }
          store_row(row.data(), dst + oh * ov.s2, ov.s3, s.OW);
        }
      }
    }
  });
}

// ---- direct input gradient ------------------------------------------------------------------------
// Stride 1: the forward kernel on grad_out (K channels) with w'[c, k] = w[k, c] flipped in space and
// padding d * (k - 1) - p. Other strides: each grad_out element scattered into a padded buffer.
template <typename scalar_t>
void direct_backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
  using T = at::opmath_type<scalar_t>;
  const auto opmath = c10::CppTypeToScalarType<T>::value;
  const int64_t Cg = s.Cg(), Kg = s.Kg(), G = s.groups;
  if (s.sh == 1 && s.sw == 1) {
    const at::Tensor wt = w.to(opmath)
                              .view({G, Kg, Cg, s.KH, s.KW})
                              .transpose(1, 2)
                              .flip({3, 4})
                              .reshape({s.C, Kg, s.KH, s.KW})
                              .contiguous();
    ConvShape t = s;
    t.C = s.K, t.H = s.OH, t.W = s.OW, t.K = s.C;
    t.ph = s.dh * (s.KH - 1) - s.ph, t.pw = s.dw * (s.KW - 1) - s.pw;
    t.OH = s.H, t.OW = s.W;
    direct_forward<scalar_t>(t, g, wt.const_data_ptr<T>(), nullptr, gi, kConvActNone, 0.0);
    return;
  }
  const at::Tensor wc = w.to(opmath).contiguous();
  const T* wp = wc.const_data_ptr<T>();
  const View4<scalar_t> gv(g), iv(gi);
  PlaneGeometry geo;
  geo.rows = s.H + 2 * s.ph;
  geo.cols = s.W + 2 * s.pw;
  geo.stride = geo.cols;
  geo.plane = geo.rows * geo.stride;
  const int64_t taps = Cg * s.KH * s.KW;
  const int64_t work = std::max<int64_t>(1, Kg * s.OH * s.OW * taps);
  at::parallel_for(0, s.N * G, std::max<int64_t>(1, (1 << 16) / work), [&](int64_t t0, int64_t t1) {
    std::vector<T> buf(Cg * geo.plane);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / G, grp = t % G;
      std::fill(buf.begin(), buf.end(), T(0));
      for (int64_t kl = 0; kl < Kg; ++kl) {
        const int64_t k = grp * Kg + kl;
        const T* wk = wp + k * taps;
        const scalar_t* gk = gv.p + n * gv.s0 + k * gv.s1;
        for (int64_t oh = 0; oh < s.OH; ++oh)
          for (int64_t ow = 0; ow < s.OW; ++ow) {
            const T v = T(gk[oh * gv.s2 + ow * gv.s3]);
            for (int64_t c = 0; c < Cg; ++c)
              for (int64_t kh = 0; kh < s.KH; ++kh) {
                T* brow = buf.data() + c * geo.plane + (oh * s.sh + kh * s.dh) * geo.stride + ow * s.sw;
                const T* wrow = wk + (c * s.KH + kh) * s.KW;
                for (int64_t kw = 0; kw < s.KW; ++kw) brow[kw * s.dw] += v * wrow[kw];
              }
          }
      }
      for (int64_t c = 0; c < Cg; ++c) {
        scalar_t* dst = iv.p + n * iv.s0 + (grp * Cg + c) * iv.s1;
        for (int64_t ih = 0; ih < s.H; ++ih)
          store_row(buf.data() + c * geo.plane + (ih + s.ph) * geo.stride + s.pw, dst + ih * iv.s2, iv.s3, s.W);
      }
    }
  });
}

// ---- direct weight gradient -----------------------------------------------------------------------
// Images split into chunks fixed by the shape alone: tasks (group, chunk), partials added in order.
inline int64_t image_chunks(int64_t N, int64_t G) { return std::max<int64_t>(1, std::min<int64_t>(N, 64 / G)); }

template <typename scalar_t>
void direct_backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                            const at::Tensor& gb) {
  using T = at::opmath_type<scalar_t>;
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const View4<scalar_t> gv(g), xv(x);
  const int64_t Cg = s.Cg(), Kg = s.Kg(), G = s.groups;
  const int64_t taps = Cg * s.KH * s.KW, wsize = s.K * taps;
  const bool vector = s.sw == 1;
  const int64_t OWv = round_up(s.OW, L), NV = OWv / L, tail = s.OW - (NV - 1) * L;
  PlaneGeometry geo;
  geo.rows = s.H + 2 * s.ph;
  geo.cols = s.W + 2 * s.pw;
  geo.stride = vector ? round_up(std::max(geo.cols, OWv + s.dw * (s.KW - 1)), L) : geo.cols;
  geo.plane = geo.rows * geo.stride;
  const int64_t NC = image_chunks(s.N, G), per = (s.N + NC - 1) / NC;
  // partials: per chunk, the weight gradient then the bias gradient
  std::vector<T> parts(NC * (wsize + s.K), T(0));
  at::parallel_for(0, G * NC, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> xs(Cg * geo.plane + L);
    std::vector<T> gs(Kg * s.OH * OWv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t grp = t / NC, ci = t % NC;
      T* pw = parts.data() + ci * (wsize + s.K) + grp * Kg * taps;
      T* pb = parts.data() + ci * (wsize + s.K) + wsize + grp * Kg;
      for (int64_t n = ci * per; n < std::min(s.N, (ci + 1) * per); ++n) {
        copy_padded(xv.p + n * xv.s0 + grp * Cg * xv.s1, xv.s1, xv.s2, xv.s3, Cg, s.H, s.W, s.ph, s.pw, geo, xs.data());
        for (int64_t kl = 0; kl < Kg; ++kl) {
          const scalar_t* src = gv.p + n * gv.s0 + (grp * Kg + kl) * gv.s1;
          T sum = 0;
          for (int64_t oh = 0; oh < s.OH; ++oh) {
            T* d = gs.data() + (kl * s.OH + oh) * OWv;
            const scalar_t* sp = src + oh * gv.s2;
            if (gv.s3 == 1) {
              copy_convert(sp, d, s.OW);
            } else {
              for (int64_t j = 0; j < s.OW; ++j) d[j] = T(sp[j * gv.s3]);
            }
            std::fill(d + s.OW, d + OWv, T(0));
            for (int64_t j = 0; j < s.OW; ++j) sum += d[j];
          }
          pb[kl] += sum;
        }
        for (int64_t kl = 0; kl < Kg; ++kl)
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t kh = 0; kh < s.KH; ++kh)
              for (int64_t kw = 0; kw < s.KW; ++kw) {
                const T* xc = xs.data() + c * geo.plane + kh * s.dh * geo.stride + kw * s.dw;
                const T* gk = gs.data() + kl * s.OH * OWv;
                T total;
                if (vector) {
                  Vec a0(T(0)), a1(T(0));
                  for (int64_t oh = 0; oh < s.OH; ++oh) {
                    const T* grow = gk + oh * OWv;
                    const T* xrow = xc + oh * s.sh * geo.stride;
                    Vec acc = (oh & 1) ? a1 : a0;
                    for (int64_t v = 0; v + 1 < NV; ++v)
                      acc = at::vec::fmadd(Vec::loadu(grow + v * L), Vec::loadu(xrow + v * L), acc);
                    // past the last output column only zeros of grad_out: the inputs there must not count
                    // (0 * inf would be NaN)
                    const Vec xt = Vec::set(Vec(T(0)), Vec::loadu(xrow + (NV - 1) * L), tail);
                    acc = at::vec::fmadd(Vec::loadu(grow + (NV - 1) * L), xt, acc);
                    ((oh & 1) ? a1 : a0) = acc;
                  }
                  total = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, a0 + a1);
                } else {
                  total = 0;
                  for (int64_t oh = 0; oh < s.OH; ++oh)
                    for (int64_t ow = 0; ow < s.OW; ++ow)
                      total += gk[oh * OWv + ow] * xc[oh * s.sh * geo.stride + ow * s.sw];
                }
                pw[(kl * Cg + c) * s.KH * s.KW + kh * s.KW + kw] += total;
              }
      }
    }
  });
  scalar_t* gwp = gw.mutable_data_ptr<scalar_t>();
  for (int64_t i = 0; i < wsize; ++i) {
    T v = 0;
    for (int64_t ci = 0; ci < NC; ++ci) v += parts[ci * (wsize + s.K) + i];
    gwp[i] = scalar_t(v);
  }
  if (gb.defined()) {
    scalar_t* gbp = gb.mutable_data_ptr<scalar_t>();
    for (int64_t k = 0; k < s.K; ++k) {
      T v = 0;
      for (int64_t ci = 0; ci < NC; ++ci) v += parts[ci * (wsize + s.K) + wsize + k];
      gbp[k] = scalar_t(v);
    }
  }
}

// ---- depthwise in channels_last: vectorized over channels ---------------------------------------------
// One input and one output channel per group, float32/float64, input and output with channel stride 1:
// every output pixel is a vector over channels; weights are transposed to [KH * KW, C].
template <typename T>
bool depthwise_cl(const ConvShape& s, const at::Tensor& a, const at::Tensor& b) {
  return std::is_same_v<T, at::opmath_type<T>> && s.Cg() == 1 && s.Kg() == 1 && s.C > 1 && a.stride(1) == 1 &&
         b.stride(1) == 1;
}

template <typename T>
at::Tensor taps_by_channel(const at::Tensor& w, const ConvShape& s) {  // [C, 1, KH, KW] -> [KH * KW, C]
  return w.reshape({s.C, s.KH * s.KW}).t().contiguous();
}

template <typename T>
void dw_cl_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                   const at::Tensor& out, int64_t act, double scalar) {
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
          act_apply(acc, act, sc).store(ov.p + n * ov.s0 + oh * ov.s2 + ow * ov.s3 + c0, cnt);
        }
      }
    }
  });
}

// grad_in gathered: each input pixel sums the output pixels its taps reach (any stride).
template <typename T>
void dw_cl_backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
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
void dw_cl_backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
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
void gemm_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                  const at::Tensor& out, int64_t act, double scalar) {
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
void gemm_backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
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
void gemm_backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
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

// ---- the mask of relu / leaky_relu, from the output ------------------------------------------------
template <typename scalar_t>
void output_mask(const scalar_t* y, uint8_t* mask, int64_t n, bool relu) {
  using T = at::opmath_type<scalar_t>;
  using Vec = Vectorized<T>;
  constexpr int64_t kBlock = 64;
  const int64_t blocks = n / kBlock;
  at::parallel_for(0, blocks, 512, [&](int64_t b0, int64_t b1) {
    __at_align__ T buf[kBlock];
    const Vec zero(T(0));
    constexpr uint64_t lanes = (uint64_t(1) << Vec::size()) - 1;
    for (int64_t b = b0; b < b1; ++b) {
      at::vec::convert(y + b * kBlock, buf, kBlock);
      uint64_t bits = 0;
      for (int64_t j = 0; j < kBlock; j += Vec::size()) {
        const Vec v = Vec::loadu(buf + j);
        const uint64_t m = relu ? (~uint64_t(vec::movemask(v <= zero)) & lanes) : uint64_t(vec::movemask(v > zero));
        bits |= m << j;
      }
      std::memcpy(mask + b * 8, &bits, 8);
    }
  });
  for (int64_t base = blocks * kBlock; base < n; base += 8) {
    uint8_t bits = 0;
    for (int64_t j = 0; j < 8 && base + j < n; ++j) {
      const T v = T(y[base + j]);
      bits |= uint8_t(relu ? !(v <= T(0)) : v > T(0)) << j;
    }
    mask[base / 8] = bits;
  }
}

struct Cpu {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static void forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                      const at::Tensor& out, int64_t act, double scalar) {
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      if (s.Cg() >= kGemmChannels) return gemm_forward<scalar_t>(s, x, w, bias, out, act, scalar);
      if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>)
        if (depthwise_cl<scalar_t>(s, x, out)) return dw_cl_forward<scalar_t>(s, x, w, bias, out, act, scalar);
      using T = at::opmath_type<scalar_t>;
      const auto opmath = c10::CppTypeToScalarType<T>::value;
      const at::Tensor wf = w.to(opmath).contiguous();
      const at::Tensor bf = bias.defined() ? bias.to(opmath).contiguous() : bias;
      direct_forward<scalar_t>(s, x, wf.const_data_ptr<T>(), bf.defined() ? bf.const_data_ptr<T>() : nullptr, out, act,
                               scalar);
    });
  }

  static void mask(const at::Tensor& out, const at::Tensor& mask, int64_t act) {
    PYOPS_DISPATCH_FLOATING(out.scalar_type(), [&] {
      output_mask(out.const_data_ptr<scalar_t>(), mask.mutable_data_ptr<uint8_t>(), out.numel(), act == kConvActRelu);
    });
  }

  static void backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
    PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
      if (s.Cg() >= kGemmChannels) return gemm_backward_input<scalar_t>(s, g, w, gi);
      if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>)
        if (depthwise_cl<scalar_t>(s, g, gi)) return dw_cl_backward_input<scalar_t>(s, g, w, gi);
      direct_backward_input<scalar_t>(s, g, w, gi);
    });
  }

  static void backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                              const at::Tensor& gb) {
    PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
      if (s.Cg() >= kGemmChannels) return gemm_backward_weight<scalar_t>(s, g, x, gw, gb);
      if constexpr (std::is_same_v<scalar_t, at::opmath_type<scalar_t>>)
        if (depthwise_cl<scalar_t>(s, g, x)) return dw_cl_backward_weight<scalar_t>(s, g, x, gw, gb);
      direct_backward_weight<scalar_t>(s, g, x, gw, gb);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_CONV(m, ::pyops::Cpu, ""); }

}  // namespace pyops
