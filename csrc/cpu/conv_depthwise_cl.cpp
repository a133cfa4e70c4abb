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
#include <utility>
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

// Output pixels a register block: independent accumulators hide the FMA latency, and each weight
// vector loaded serves all of them.
constexpr int64_t kPixels = 4;

// The output columns [lo, hi) whose taps along the width all fall inside the input row.
inline std::pair<int64_t, int64_t> inner_columns(const ConvShape& s) {
  const int64_t lo = s.pw <= 0 ? 0 : std::min(s.OW, (s.pw + s.sw - 1) / s.sw);
  const int64_t last = s.W - 1 + s.pw - (s.KW - 1) * s.dw;  // ow * sw <= last
  const int64_t hi = last < 0 ? 0 : std::min(s.OW, last / s.sw + 1);
  return {lo, std::max(lo, hi)};
}

// The epilogue of a row's task: partial r of every channel, from the row's OW pixels (pixel stride ps,
// channels contiguous), vectorized over channels, in one pass shifted by the first pixel (part_moments).
template <typename T>
void row_moments(const T* row, int64_t C, int64_t OW, int64_t ps, int64_t r, Moments& m) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  __at_align__ T x0[L], sum[L], sq[L];
  for (int64_t c0 = 0; c0 < C; c0 += L) {
    const int cnt = static_cast<int>(std::min<int64_t>(L, C - c0));
    const Vec first = Vec::loadu(row + c0, cnt);
    Vec s(T(0)), q(T(0));
    for (int64_t ow = 1; ow < OW; ++ow) {
      const Vec d = Vec::loadu(row + ow * ps + c0, cnt) - first;
      s = s + d;
      q = at::vec::fmadd(d, d, q);
    }
    first.store(x0);
    s.store(sum);
    q.store(sq);
    for (int c = 0; c < cnt; ++c) {
      const double n = double(OW), su = double(sum[c]);
      double mu = double(x0[c]) + su / n;
      if (!std::isfinite(mu)) {  // an infinite first pixel: the mean as a sum gives it (part_moments)
        mu = 0;
        for (int64_t ow = 0; ow < OW; ++ow) mu += double(row[ow * ps + c0 + c]);
        mu /= n;
      }
      const double m2 = double(sq[c]) - su * su / n;  // below 0 by rounding: 0; NaN stays
      m.set(r, c0 + c, mu, m2 < 0 ? 0.0 : m2);
    }
  }
}

// out[n, oh, ow, c] = act(bias[c] + sum_{kh, kw} wt[kh * KW + kw, c] * x[n, oh * sh - ph + kh * dh,
// ow * sw - pw + kw * dw, c]) (zero outside x), x and out with channel stride 1, wt [KH * KW, C]. A task
// is an output row; along it, blocks of kPixels pixels, and within a block every channel vector in
// turn, so the pixels' channels are read in memory order.
template <typename T>
void dw_cl_correlate(const ConvShape& s, const View4<T>& xv, const T* wp, const T* bp, const View4<T>& ov, Act act,
                     T sc, Moments* moments = nullptr) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const int64_t C = s.C;
  const auto [lo, hi] = inner_columns(s);
  const bool three = s.KW == 3 && s.sw == 1 && s.dw == 1;
  at::parallel_for(0, s.N * s.OH, 1, [&](int64_t r0, int64_t r1) {
    std::vector<const T*> xrow(s.KH);  // the input row of each kh (null outside the input)
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.OH, oh = r % s.OH;
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
        xrow[kh] = ih < 0 || ih >= s.H ? nullptr : xv.p + n * xv.s0 + ih * xv.s2;
      }
      T* orow = ov.p + n * ov.s0 + oh * ov.s2;
      // channels [c0, c0 + cnt) of the pixel or block at ow; full: cnt == L
      const auto pixel = [&](int64_t ow, int64_t c0, int64_t cnt) {  // any column: outside taps skipped
        Vec acc = bp ? Vec::loadu(bp + c0, cnt) : Vec(T(0));
        for (int64_t kh = 0; kh < s.KH; ++kh) {
          if (!xrow[kh]) continue;
          for (int64_t kw = 0; kw < s.KW; ++kw) {
            const int64_t iw = ow * s.sw - s.pw + kw * s.dw;
            if (iw < 0 || iw >= s.W) continue;
            acc = at::vec::fmadd(Vec::loadu(wp + (kh * s.KW + kw) * C + c0, cnt),
                                 Vec::loadu(xrow[kh] + iw * xv.s3 + c0, cnt), acc);
          }
        }
        act_forward(act, acc, sc).store(orow + ow * ov.s3 + c0, cnt);
      };
      const auto block = [&](int64_t ow, int64_t c0, int64_t cnt, auto full, auto taps3) {  // kPixels inner columns
        const auto load = [&](const T* q) { return full ? Vec::loadu(q) : Vec::loadu(q, cnt); };
        const Vec b0 = bp ? load(bp + c0) : Vec(T(0));
        Vec a0 = b0, a1 = b0, a2 = b0, a3 = b0;
        for (int64_t kh = 0; kh < s.KH; ++kh) {
          if (!xrow[kh]) continue;
          const T* q = xrow[kh] + (ow * s.sw - s.pw) * xv.s3 + c0;
          const T* wk = wp + kh * s.KW * C + c0;
          if constexpr (decltype(taps3)::value) {
            // 3 taps at stride 1: kPixels + 2 input vectors feed the block's 12 multiply-adds
            const int64_t st = xv.s3;
            const Vec w0 = load(wk), w1 = load(wk + C), w2 = load(wk + 2 * C);
            const Vec x0 = load(q), x1 = load(q + st), x2 = load(q + 2 * st);
            a0 = at::vec::fmadd(w2, x2, at::vec::fmadd(w1, x1, at::vec::fmadd(w0, x0, a0)));
            const Vec x3 = load(q + 3 * st);
            a1 = at::vec::fmadd(w2, x3, at::vec::fmadd(w1, x2, at::vec::fmadd(w0, x1, a1)));
            const Vec x4 = load(q + 4 * st);
            a2 = at::vec::fmadd(w2, x4, at::vec::fmadd(w1, x3, at::vec::fmadd(w0, x2, a2)));
            const Vec x5 = load(q + 5 * st);
            a3 = at::vec::fmadd(w2, x5, at::vec::fmadd(w1, x4, at::vec::fmadd(w0, x3, a3)));
          } else {
            const int64_t step = s.sw * xv.s3;
            for (int64_t kw = 0; kw < s.KW; ++kw, q += s.dw * xv.s3) {
              const Vec wv = load(wk + kw * C);
              a0 = at::vec::fmadd(wv, load(q), a0);
              a1 = at::vec::fmadd(wv, load(q + step), a1);
              a2 = at::vec::fmadd(wv, load(q + 2 * step), a2);
              a3 = at::vec::fmadd(wv, load(q + 3 * step), a3);
            }
          }
        }
        T* o = orow + ow * ov.s3 + c0;
        const auto emit = [&](Vec a, int64_t j) { act_forward(act, a, sc).store(o + j * ov.s3, cnt); };
        emit(a0, 0), emit(a1, 1), emit(a2, 2), emit(a3, 3);
      };
      // one column's channels, four vectors at a time (four independent chains), then one at a time
      const auto columns = [&](int64_t ow) {
        int64_t c0 = 0;
        for (; c0 + 4 * L <= C; c0 += 4 * L) {
          Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
          if (bp) {
            a0 = Vec::loadu(bp + c0), a1 = Vec::loadu(bp + c0 + L);
            a2 = Vec::loadu(bp + c0 + 2 * L), a3 = Vec::loadu(bp + c0 + 3 * L);
          }
          for (int64_t kh = 0; kh < s.KH; ++kh) {
            if (!xrow[kh]) continue;
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const int64_t iw = ow * s.sw - s.pw + kw * s.dw;
              if (iw < 0 || iw >= s.W) continue;
              const T* q = xrow[kh] + iw * xv.s3 + c0;
              const T* wk = wp + (kh * s.KW + kw) * C + c0;
              a0 = at::vec::fmadd(Vec::loadu(wk), Vec::loadu(q), a0);
              a1 = at::vec::fmadd(Vec::loadu(wk + L), Vec::loadu(q + L), a1);
              a2 = at::vec::fmadd(Vec::loadu(wk + 2 * L), Vec::loadu(q + 2 * L), a2);
              a3 = at::vec::fmadd(Vec::loadu(wk + 3 * L), Vec::loadu(q + 3 * L), a3);
            }
          }
          T* o = orow + ow * ov.s3 + c0;
          act_forward(act, a0, sc).store(o), act_forward(act, a1, sc).store(o + L);
          act_forward(act, a2, sc).store(o + 2 * L), act_forward(act, a3, sc).store(o + 3 * L);
        }
        for (; c0 < C; c0 += L) pixel(ow, c0, std::min(L, C - c0));
      };
      int64_t ow = 0;
      for (; ow < lo; ++ow) columns(ow);
      for (; ow + kPixels <= hi; ow += kPixels) {
        int64_t c0 = 0;
        if (three) {
          for (; c0 + L <= C; c0 += L) block(ow, c0, L, std::true_type{}, std::true_type{});
          if (c0 < C) block(ow, c0, C - c0, std::false_type{}, std::true_type{});
        } else {
          for (; c0 + L <= C; c0 += L) block(ow, c0, L, std::true_type{}, std::false_type{});
          if (c0 < C) block(ow, c0, C - c0, std::false_type{}, std::false_type{});
        }
      }
      for (; ow < s.OW; ++ow) columns(ow);
      if (moments) row_moments(orow, C, s.OW, ov.s3, r, *moments);  // the row, still in cache
    }
  });
}

template <typename T>
void dw_cl_forward_t(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                     const at::Tensor& out, Act act, double scalar, Moments* moments) {
  const at::Tensor wt = taps_by_channel<T>(w, s);
  dw_cl_correlate<T>(s, View4<T>(x), wt.const_data_ptr<T>(), bias.defined() ? bias.const_data_ptr<T>() : nullptr,
                     View4<T>(out), act, T(scalar), moments);
}

// The input gradient. Stride 1: the forward correlation of grad_out with the weight flipped in space
// and padding d * (k - 1) - p. Other strides: gathered, each input pixel summing the output pixels its
// taps reach.
template <typename T>
void dw_cl_backward_input_t(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
  if (s.sh == 1 && s.sw == 1) {
    ConvShape t = s;
    t.H = s.OH, t.W = s.OW, t.OH = s.H, t.OW = s.W;
    t.ph = s.dh * (s.KH - 1) - s.ph, t.pw = s.dw * (s.KW - 1) - s.pw;
    const at::Tensor wt = taps_by_channel<T>(w.flip({2, 3}), s);
    dw_cl_correlate<T>(t, View4<T>(g), wt.const_data_ptr<T>(), nullptr, View4<T>(gi), Act::kNone, T(0));
    return;
  }
  // Other strides, gathered by phase: the input columns iw = p + sw * j of one phase p are reached by
  // the same taps kw (those with p + pw - kw * dw a multiple of sw), from output column j + off[kw].
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const at::Tensor wt = taps_by_channel<T>(w, s);
  const T* wp = wt.const_data_ptr<T>();
  const View4<T> gv(g), iv(gi);
  const int64_t C = s.C;
  struct Phase {
    std::vector<int64_t> kw, off;       // the taps reaching the phase, and their output column offsets
    int64_t count = 0, lo = 0, hi = 0;  // its columns j in [0, count); [lo, hi): every tap inside
  };
  std::vector<Phase> phases(s.sw);
  for (int64_t p = 0; p < s.sw; ++p) {
    Phase& ph = phases[p];
    ph.count = p < s.W ? (s.W - p + s.sw - 1) / s.sw : 0;
    ph.lo = 0, ph.hi = ph.count;
    for (int64_t kw = 0; kw < s.KW; ++kw) {
      const int64_t d = p + s.pw - kw * s.dw;
      if (d % s.sw != 0) continue;
      ph.kw.push_back(kw), ph.off.push_back(d / s.sw);
      ph.lo = std::max(ph.lo, -d / s.sw), ph.hi = std::min(ph.hi, s.OW - d / s.sw);
    }
    ph.lo = std::min(ph.lo, ph.count), ph.hi = std::max(ph.lo, ph.hi);
  }
  at::parallel_for(0, s.N * s.H, 1, [&](int64_t r0, int64_t r1) {
    std::vector<const T*> grow(s.KH);  // grad_out's row reaching input row ih through kh (or null)
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / s.H, ih = r % s.H;
      for (int64_t kh = 0; kh < s.KH; ++kh) {
        const int64_t th = ih + s.ph - kh * s.dh;
        grow[kh] = th < 0 || th % s.sh != 0 || th / s.sh >= s.OH ? nullptr : gv.p + n * gv.s0 + (th / s.sh) * gv.s2;
      }
      T* irow = iv.p + n * iv.s0 + ih * iv.s2;
      for (int64_t c0 = 0; c0 < C; c0 += L) {
        const int64_t cnt = std::min(L, C - c0);
        for (int64_t p = 0; p < s.sw; ++p) {
          const Phase& ph = phases[p];
          const int64_t taps = static_cast<int64_t>(ph.kw.size());
          const auto store = [&](Vec a, int64_t j) { a.store(irow + (p + s.sw * j) * iv.s3 + c0, cnt); };
          const auto pixel = [&](int64_t j) {
            Vec acc(T(0));
            for (int64_t kh = 0; kh < s.KH; ++kh) {
              if (!grow[kh]) continue;
              for (int64_t i = 0; i < taps; ++i) {
                const int64_t ow = j + ph.off[i];
                if (ow < 0 || ow >= s.OW) continue;
                acc = at::vec::fmadd(Vec::loadu(wp + (kh * s.KW + ph.kw[i]) * C + c0, cnt),
                                     Vec::loadu(grow[kh] + ow * gv.s3 + c0, cnt), acc);
              }
            }
            store(acc, j);
          };
          int64_t j = 0;
          for (; j < ph.lo; ++j) pixel(j);
          for (; j + kPixels <= ph.hi; j += kPixels) {
            Vec a0(T(0)), a1(T(0)), a2(T(0)), a3(T(0));
            for (int64_t kh = 0; kh < s.KH; ++kh) {
              if (!grow[kh]) continue;
              for (int64_t i = 0; i < taps; ++i) {
                const Vec wk = Vec::loadu(wp + (kh * s.KW + ph.kw[i]) * C + c0, cnt);
                const T* q = grow[kh] + (j + ph.off[i]) * gv.s3 + c0;
                a0 = at::vec::fmadd(wk, Vec::loadu(q, cnt), a0);
                a1 = at::vec::fmadd(wk, Vec::loadu(q + gv.s3, cnt), a1);
                a2 = at::vec::fmadd(wk, Vec::loadu(q + 2 * gv.s3, cnt), a2);
                a3 = at::vec::fmadd(wk, Vec::loadu(q + 3 * gv.s3, cnt), a3);
              }
            }
            store(a0, j), store(a1, j + 1), store(a2, j + 2), store(a3, j + 3);
          }
          for (; j < ph.count; ++j) pixel(j);
        }
      }
    }
  });
}

// The weight and bias gradients: output rows (n, oh) split into chunks fixed by the shape, each chunk
// summing into its own [KH * KW + 1, C] partial, the partials added in chunk order. Within a row, each
// tap is a dot product along the output columns it reaches, in kPixels register accumulators summed
// in a fixed order; the row's sum is then added to the partial.
template <typename T>
void dw_cl_backward_weight_t(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                             const at::Tensor& gb) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const View4<T> gv(g), xv(x);
  const int64_t C = s.C, taps = s.KH * s.KW, rows = s.N * s.OH;
  const int64_t NC = std::min<int64_t>(rows, 16), per = (rows + NC - 1) / NC, psize = (taps + 1) * C;
  std::vector<T> parts(NC * psize, T(0));
  // the output columns [cols[2 kw], cols[2 kw + 1]) whose tap kw falls inside the input row
  std::vector<int64_t> cols(2 * s.KW);
  for (int64_t kw = 0; kw < s.KW; ++kw) {
    const int64_t off = s.pw - kw * s.dw;  // iw = ow * sw - off
    const int64_t lo = off <= 0 ? 0 : std::min(s.OW, (off + s.sw - 1) / s.sw);
    const int64_t last = s.W - 1 + off;
    cols[2 * kw] = lo;
    cols[2 * kw + 1] = last < 0 ? lo : std::max(lo, std::min(s.OW, last / s.sw + 1));
  }
  // sum over j in [0, m) of a[j * as] * b[j * bs] (or of a[j * as] alone), four accumulators, fixed order
  const auto dot = [](const T* a, int64_t as, const T* b, int64_t bs, int64_t m, int64_t cnt) {
    Vec s0(T(0)), s1(T(0)), s2(T(0)), s3(T(0));
    int64_t j = 0;
    const auto ld = [cnt](const T* q) { return cnt == L ? Vec::loadu(q) : Vec::loadu(q, cnt); };
    for (; j + kPixels <= m; j += kPixels) {
      const T* pa = a + j * as;
      if (b) {
        const T* pb = b + j * bs;
        s0 = at::vec::fmadd(ld(pa), ld(pb), s0);
        s1 = at::vec::fmadd(ld(pa + as), ld(pb + bs), s1);
        s2 = at::vec::fmadd(ld(pa + 2 * as), ld(pb + 2 * bs), s2);
        s3 = at::vec::fmadd(ld(pa + 3 * as), ld(pb + 3 * bs), s3);
      } else {
        s0 = s0 + ld(pa), s1 = s1 + ld(pa + as), s2 = s2 + ld(pa + 2 * as), s3 = s3 + ld(pa + 3 * as);
      }
    }
    for (; j < m; ++j) s0 = b ? at::vec::fmadd(ld(a + j * as), ld(b + j * bs), s0) : s0 + ld(a + j * as);
    return (s0 + s1) + (s2 + s3);
  };
  at::parallel_for(0, NC, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t ci = t0; ci < t1; ++ci) {
      T* P = parts.data() + ci * psize;
      for (int64_t r = ci * per; r < std::min(rows, (ci + 1) * per); ++r) {
        const int64_t n = r / s.OH, oh = r % s.OH;
        const T* grow = gv.p + n * gv.s0 + oh * gv.s2;
        for (int64_t c0 = 0; c0 < C; c0 += L) {
          const int64_t cnt = std::min(L, C - c0);
          const auto add = [&](int64_t slot, Vec v) {
            T* acc = P + slot * C + c0;
            (Vec::loadu(acc, cnt) + v).store(acc, cnt);
          };
          add(taps, dot(grow + c0, gv.s3, nullptr, 0, s.OW, cnt));
          for (int64_t kh = 0; kh < s.KH; ++kh) {
            const int64_t ih = oh * s.sh - s.ph + kh * s.dh;
            if (ih < 0 || ih >= s.H) continue;
            const T* xrow = xv.p + n * xv.s0 + ih * xv.s2 + c0;
            for (int64_t kw = 0; kw < s.KW; ++kw) {
              const int64_t lo = cols[2 * kw], hi = cols[2 * kw + 1];
              if (lo >= hi) continue;
              // grad_out from column lo, x from its column lo * sw - pw + kw * dw, both walked along ow
              const T* xb = xrow + (lo * s.sw - s.pw + kw * s.dw) * xv.s3;
              add(kh * s.KW + kw, dot(grow + lo * gv.s3 + c0, gv.s3, xb, s.sw * xv.s3, hi - lo, cnt));
            }
          }
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
                   const at::Tensor& out, Act act, double scalar, Moments* moments) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "pyops::conv2d (depthwise channels_last)",
                             [&] { dw_cl_forward_t<scalar_t>(s, x, w, bias, out, act, scalar, moments); });
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
