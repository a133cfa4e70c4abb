// The direct CPU conv engine (for fewer than kGemmChannels input channels per group: depthwise,
// ResNeXt-like groups, a dense layer on a few channels). One task is one (image, group): the group's
// input planes are copied once, zero-padded, into a thread-local opmath buffer (any input strides,
// float16/bfloat16 converted there), then each output row is accumulated in vector registers across the
// kernel taps, vectorized over the output width (strided along the width, the buffer holds each row
// split by column phase, so that every tap reads consecutive elements),
// with bias and activation applied before the store; register-blocked where it pays: depthwise 3x3
// (4 output rows x 1-2 vectors, the 9 weights in registers) and a few channels per group (4 output
// channels x 1-4 vectors, each input vector feeding 4 channels). The input gradient at stride 1 is the same kernel
// run on grad_out with the group-transposed, flipped weight; at other strides a scatter into a padded
// buffer. The weight gradient is a split reduction: tasks of (group, fixed chunk of images) each sum
// their part into a partial buffer in a fixed order, and the partials are added in chunk order
// (deterministic, whatever the thread count); for depthwise 3x3, 9 tap accumulators per grad_out vector.
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

#include "common/dispatch.h"
#include "cpu/conv_engines.h"

namespace pyops {
namespace cpu_conv {
namespace {

// ---- direct forward -----------------------------------------------------------------------------
// Vectors a register-blocked kernel may keep per block: twice as many with 32 vector registers
// (AVX-512) as with 16 (AVX2, where 4 rows x 1 vector + 9 weights still fit).
template <typename T>
constexpr int kWide = sizeof(Vectorized<T>) >= 64 ? 2 : 1;

// The epilogue of a block: act(a) to out[0, n) (a partial last vector masked); HasAct false: a plain
// store, so that the accumulators go from registers to the output.
template <bool HasAct, typename T>
inline void emit_vec(Vectorized<T> a, Act act, T sc, T* out, int64_t n) {
  constexpr int64_t L = Vectorized<T>::size();
  if (n <= 0) return;
  if constexpr (HasAct) a = act_forward(act, a, sc);
  if (n >= L) {
    a.store(out);
  } else {
    a.store(out, static_cast<int>(n));
  }
}

// Depthwise 3x3, stride 1 along the width: R output rows x V vectors at once, the 9 weights in
// registers. Input row j of the block starts at in + j * ds; output row i reads input rows i, i + 1,
// i + 2 (R > 1 only where rows and taps step alike: stride 1 and dilation 1 along the height), so each
// loaded input vector feeds up to 3 output rows. out row i at out + i * os, n valid elements a row.
template <int R, int V, bool HasAct, typename T>
inline void dw3_block(const T* in, int64_t ds, int64_t dw, const Vectorized<T>* w, const Vectorized<T>& b, Act act,
                      T sc, T* out, int64_t os, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  Vec acc[R][V];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[i][v] = b;
#pragma GCC unroll 8
  for (int j = 0; j < R + 2; ++j) {
    const T* row = in + j * ds;
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw)
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        const Vec x = Vec::loadu(row + kw * dw + v * L);
#pragma GCC unroll 8
        for (int i = 0; i < R; ++i)
          if (j - i >= 0 && j - i <= 2) acc[i][v] = at::vec::fmadd(w[(j - i) * 3 + kw], x, acc[i][v]);
      }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) emit_vec<HasAct>(acc[i][v], act, sc, out + i * os + v * L, n - v * L);
}

// One padded depthwise plane (3x3, stride 1 along the width) to out rows (row stride os, n valid a row).
template <typename T>
void dw3_plane(const ConvShape& s, const PlaneGeometry& geo, const T* xs, const T* wk, T bias, Act act, T sc, T* out,
               int64_t os, int64_t n, int64_t oh0, int64_t oh1) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  constexpr int VB = kWide<T>;
  Vec w[9];
  for (int t = 0; t < 9; ++t) w[t] = Vec(wk[t]);
  const Vec b(bias);
  const int64_t nv = round_up(s.OW, L) / L;
  const auto rows_of = [&]<int R, bool A>(int64_t oh) {
    const T* in = xs + oh * s.sh * geo.stride;
    const int64_t ds = s.dh * geo.stride;
    T* o = out + (oh - oh0) * os;
    int64_t v = 0;
    for (; v + VB <= nv; v += VB) dw3_block<R, VB, A>(in + v * L, ds, s.dw, w, b, act, sc, o + v * L, os, n - v * L);
    if (v < nv) dw3_block<R, 1, A>(in + v * L, ds, s.dw, w, b, act, sc, o + v * L, os, n - v * L);
  };
  const auto rows = [&](auto r_tag, int64_t oh) {
    constexpr int R = decltype(r_tag)::value;
    if (act == Act::kNone) return rows_of.template operator()<R, false>(oh);
    rows_of.template operator()<R, true>(oh);
  };
  int64_t oh = oh0;
  if (s.sh == 1 && s.dh == 1)
    for (; oh + 4 <= oh1; oh += 4) rows(std::integral_constant<int, 4>{}, oh);
  for (; oh < oh1; ++oh) rows(std::integral_constant<int, 1>{}, oh);
}

// Grouped, stride 1 along the width: KB output channels x V vectors of one output row at once, so
// each loaded input vector feeds KB multiply-adds. wp: the block's weights packed [tap][KB]; bias KB
// values; output channel kb's row at out + kb * ocs, n valid elements.
template <int KB, int V, bool HasAct, typename T>
inline void kblock(const T* base, const int64_t* offs, const T* wp, int64_t taps, const T* bias, Act act, T sc, T* out,
                   int64_t ocs, int64_t n) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  Vec acc[KB][V];
#pragma GCC unroll 8
  for (int kb = 0; kb < KB; ++kb)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[kb][v] = Vec(bias[kb]);
  for (int64_t t = 0; t < taps; ++t) {
    const T* sp = base + offs[t];
    Vec x[V];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) x[v] = Vec::loadu(sp + v * L);
    const T* wt = wp + t * KB;
#pragma GCC unroll 8
    for (int kb = 0; kb < KB; ++kb) {
      const Vec wv(wt[kb]);
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) acc[kb][v] = at::vec::fmadd(wv, x[v], acc[kb][v]);
    }
  }
#pragma GCC unroll 8
  for (int kb = 0; kb < KB; ++kb)
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) emit_vec<HasAct>(acc[kb][v], act, sc, out + kb * ocs + v * L, n - v * L);
}

// One output row of KB channels (see kblock) over the whole width: blocks of up to VB vectors.
template <int KB, bool HasAct, typename T>
void krow(const T* base, const int64_t* offs, const T* wp, int64_t taps, const T* bias, Act act, T sc, T* out,
          int64_t ocs, int64_t n, int64_t nv) {
  constexpr int64_t L = Vectorized<T>::size();
  constexpr int VB = 2 * kWide<T>;  // KB x VB accumulators: 16 of 32 registers, 8 of 16
  int64_t v = 0;
  for (; v + VB <= nv; v += VB)
    kblock<KB, VB, HasAct>(base + v * L, offs, wp, taps, bias, act, sc, out + v * L, ocs, n - v * L);
  const int64_t rest = nv - v;
  if constexpr (VB > 3) {
    if (rest == 3)
      return kblock<KB, 3, HasAct>(base + v * L, offs, wp, taps, bias, act, sc, out + v * L, ocs, n - v * L);
  }
  if constexpr (VB > 2) {
    if (rest == 2)
      return kblock<KB, 2, HasAct>(base + v * L, offs, wp, taps, bias, act, sc, out + v * L, ocs, n - v * L);
  }
  if (rest == 1) kblock<KB, 1, HasAct>(base + v * L, offs, wp, taps, bias, act, sc, out + v * L, ocs, n - v * L);
}

// out[n, k] = act(bias[k] + sum_c conv(x[n, group c], w[k, c])) for every image and group; x may be any
// strided 4-d tensor (padding may be negative: a crop), w opmath [K, Cg, KH, KW], bias opmath or null.
template <typename scalar_t>
void direct_forward_t(const ConvShape& s, const at::Tensor& x, const at::opmath_type<scalar_t>* w,
                      const at::opmath_type<scalar_t>* bias, const at::Tensor& out, Act act, double scalar,
                      Moments* moments = nullptr) {
  using T = at::opmath_type<scalar_t>;
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const View4<scalar_t> xv(x), ov(out);
  const int64_t Cg = s.Cg(), Kg = s.Kg(), G = s.groups;
  const int64_t OWv = round_up(s.OW, L);
  PlaneGeometry geo;
  vector_rows(s, OWv, L, geo);  // strided along the width: rows split by column phase
  const T sc = T(scalar);
  const int64_t taps = Cg * s.KH * s.KW;
  const bool direct_store = std::is_same_v<scalar_t, T> && ov.s3 == 1;
  // depthwise 3x3 along a vector row: the register-blocked kernel
  const bool dw3 = s.sw == 1 && Cg == 1 && Kg == 1 && s.KH == 3 && s.KW == 3;
  constexpr int64_t kRowsBuf = 8;  // rows through `row` when the output is not a dense opmath row
  // a few channels per group (not depthwise): blocks of kKB output channels, weights packed [tap][kKB]
  constexpr int64_t kKB = 4;
  const bool kblocked = !dw3 && Kg >= kKB;
  std::vector<T> packed;
  const T zeros[kKB] = {};
  if (kblocked) {
    packed.assign(s.K * taps, T(0));
    for (int64_t grp = 0; grp < G; ++grp)
      for (int64_t kl0 = 0; kl0 + kKB <= Kg; kl0 += kKB)
        for (int64_t t = 0; t < taps; ++t)
          for (int64_t kb = 0; kb < kKB; ++kb)
            packed[(grp * Kg + kl0) * taps + t * kKB + kb] = w[(grp * Kg + kl0 + kb) * taps + t];
  }
  std::vector<int64_t> offs(taps);  // tap (c, kh, kw) -> its element's offset from the row's start
  for (int64_t c = 0; c < Cg; ++c)
    for (int64_t kh = 0; kh < s.KH; ++kh)
      for (int64_t kw = 0; kw < s.KW; ++kw)
        offs[(c * s.KH + kh) * s.KW + kw] = c * geo.plane + kh * s.dh * geo.stride + geo.col(kw * s.dw);
  // grain: enough (image, group) pairs to amortise a task (~64K multiply-adds)
  const int64_t work = std::max<int64_t>(1, Kg * s.OH * s.OW * taps);
  // the epilogue of a task: the moments of the group's output planes of image n, still in cache
  const auto record = [&](int64_t n, int64_t grp) {
    if (!moments) return;
    for (int64_t k = grp * Kg; k < (grp + 1) * Kg; ++k) {
      const auto [mu, sq] = part_moments(ov.p + n * ov.s0 + k * ov.s1, s.OH, ov.s2, s.OW, ov.s3);
      moments->set(n, k, mu, sq);
    }
  };
  at::parallel_for(0, s.N * G, std::max<int64_t>(1, (1 << 16) / work), [&](int64_t t0, int64_t t1) {
    std::vector<T> xs(Cg * geo.plane + L);
    std::vector<T> row(kRowsBuf * OWv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / G, grp = t % G;
      copy_padded(xv.p + n * xv.s0 + grp * Cg * xv.s1, xv.s1, xv.s2, xv.s3, Cg, s.H, s.W, s.ph, s.pw, geo, xs.data());
      if (dw3) {
        const T b = bias ? bias[grp] : T(0);
        scalar_t* dst = ov.p + n * ov.s0 + grp * ov.s1;
        if (direct_store) {
          dw3_plane(s, geo, xs.data(), w + grp * 9, b, act, sc, reinterpret_cast<T*>(dst), ov.s2, s.OW, 0, s.OH);
        } else {
          // blocks of rows through the opmath buffer `row`, converted / strided on the store
          for (int64_t oh = 0; oh < s.OH; oh += kRowsBuf) {
            const int64_t oe = std::min(s.OH, oh + kRowsBuf);
            dw3_plane(s, geo, xs.data(), w + grp * 9, b, act, sc, row.data(), OWv, OWv, oh, oe);
            for (int64_t r = oh; r < oe; ++r) store_row(row.data() + (r - oh) * OWv, dst + r * ov.s2, ov.s3, s.OW);
          }
        }
        record(n, grp);
        continue;
      }
      int64_t kl0 = 0;
      if (kblocked) {
        // blocks of kKB output channels (the rest below, one channel at a time)
        for (; kl0 + kKB <= Kg; kl0 += kKB) {
          const int64_t k = grp * Kg + kl0;
          const T* wp = packed.data() + k * taps;
          const T* bk = bias ? bias + k : zeros;
          scalar_t* dst = ov.p + n * ov.s0 + k * ov.s1;
          for (int64_t oh = 0; oh < s.OH; ++oh) {
            const T* rbase = xs.data() + oh * s.sh * geo.stride;
            T* target = direct_store ? reinterpret_cast<T*>(dst + oh * ov.s2) : row.data();
            const int64_t ocs = direct_store ? ov.s1 : OWv, valid = direct_store ? s.OW : OWv;
            if (act == Act::kNone) {
              krow<kKB, false>(rbase, offs.data(), wp, taps, bk, act, sc, target, ocs, valid, OWv / L);
            } else {
              krow<kKB, true>(rbase, offs.data(), wp, taps, bk, act, sc, target, ocs, valid, OWv / L);
            }
            if (!direct_store)
              for (int64_t kb = 0; kb < kKB; ++kb)
                store_row(row.data() + kb * OWv, dst + kb * ov.s1 + oh * ov.s2, ov.s3, s.OW);
          }
        }
      }
      for (int64_t kl = kl0; kl < Kg; ++kl) {
        const int64_t k = grp * Kg + kl;
        const T* wk = w + k * taps;
        const T b = bias ? bias[k] : T(0);
        scalar_t* dst = ov.p + n * ov.s0 + k * ov.s1;
        for (int64_t oh = 0; oh < s.OH; ++oh) {
          // straight into the output row where it is a dense row of opmath values, else via `row`
          T* target = direct_store ? reinterpret_cast<T*>(dst + oh * ov.s2) : row.data();
          const T* rbase = xs.data() + oh * s.sh * geo.stride;
          const int64_t valid = direct_store ? s.OW : OWv;
          krow<1, true>(rbase, offs.data(), wk, taps, &b, act, sc, target, 0, valid, OWv / L);  // one channel
          if (direct_store) continue;
          store_row(row.data(), dst + oh * ov.s2, ov.s3, s.OW);
        }
      }
      record(n, grp);
    }
  });
}

// ---- direct input gradient ------------------------------------------------------------------------
// Stride 1: the forward kernel on grad_out (K channels) with w'[c, k] = w[k, c] flipped in space and
// padding d * (k - 1) - p. Other strides: grad_out rows added into a padded buffer split by column phase.
template <typename scalar_t>
void direct_backward_input_t(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
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
    direct_forward_t<scalar_t>(t, g, wt.const_data_ptr<T>(), nullptr, gi, Act::kNone, 0.0);
    return;
  }
  // Other strides: each grad_out row, times a tap's weight, added along a row of a padded input-gradient
  // buffer whose rows are split by column phase (as the forward's input), so that consecutive output
  // columns land on consecutive elements: vector multiply-adds, the lanes past the last output column
  // left untouched (0 * inf must not reach an input no output reads).
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const at::Tensor wc = w.to(opmath).contiguous();
  const T* wp = wc.const_data_ptr<T>();
  const View4<scalar_t> gv(g), iv(gi);
  const int64_t OWv = round_up(s.OW, L), NV = OWv / L, tail = s.OW - (NV - 1) * L;
  PlaneGeometry geo;
  vector_rows(s, OWv, L, geo);
  const int64_t taps = Cg * s.KH * s.KW;
  const int64_t work = std::max<int64_t>(1, Kg * s.OH * s.OW * taps);
  at::parallel_for(0, s.N * G, std::max<int64_t>(1, (1 << 16) / work), [&](int64_t t0, int64_t t1) {
    std::vector<T> buf(Cg * geo.plane + L);
    std::vector<T> grow(OWv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n = t / G, grp = t % G;
      std::fill(buf.begin(), buf.end(), T(0));
      for (int64_t kl = 0; kl < Kg; ++kl) {
        const int64_t k = grp * Kg + kl;
        const T* wk = wp + k * taps;
        const scalar_t* gk = gv.p + n * gv.s0 + k * gv.s1;
        for (int64_t oh = 0; oh < s.OH; ++oh) {
          for (int64_t ow = 0; ow < s.OW; ++ow) grow[ow] = T(gk[oh * gv.s2 + ow * gv.s3]);
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t kh = 0; kh < s.KH; ++kh) {
              T* brow = buf.data() + c * geo.plane + (oh * s.sh + kh * s.dh) * geo.stride;
              const T* wrow = wk + (c * s.KH + kh) * s.KW;
              for (int64_t kw = 0; kw < s.KW; ++kw) {
                T* b = brow + geo.col(kw * s.dw);
                const Vec wv(wrow[kw]);
                for (int64_t v = 0; v + 1 < NV; ++v)
                  at::vec::fmadd(Vec::loadu(grow.data() + v * L), wv, Vec::loadu(b + v * L)).store(b + v * L);
                T* bl = b + (NV - 1) * L;
                const Vec old = Vec::loadu(bl);
                const Vec sum = at::vec::fmadd(Vec::loadu(grow.data() + (NV - 1) * L), wv, old);
                Vec::set(old, sum, tail).store(bl);
              }
            }
        }
      }
      for (int64_t c = 0; c < Cg; ++c) {
        scalar_t* dst = iv.p + n * iv.s0 + (grp * Cg + c) * iv.s1;
        for (int64_t ih = 0; ih < s.H; ++ih) {
          const T* brow = buf.data() + c * geo.plane + (ih + s.ph) * geo.stride;
          scalar_t* drow = dst + ih * iv.s2;
          for (int64_t iw = 0; iw < s.W; ++iw) drow[iw * iv.s3] = scalar_t(brow[geo.col(iw + s.pw)]);
        }
      }
    }
  });
}

// ---- direct weight gradient -----------------------------------------------------------------------
// Images split into chunks fixed by the shape alone: tasks (group, chunk), partials added in order.
inline int64_t image_chunks(int64_t N, int64_t G) { return std::max<int64_t>(1, std::min<int64_t>(N, 64 / G)); }

// Depthwise 3x3 weight gradient of one image into acc[0, 9) (taps) and acc[9] (bias), lane-wise:
// grad_out's plane (row stride g2, element stride g3) is converted a row at a time into gs (zeros past
// OW), and each of its vectors is loaded once for the 9 taps. Inputs past the last output column are
// masked (they meet grad_out's zeros there, and 0 * inf would be NaN).
template <typename scalar_t, typename T>
void dw3_weight_image(const ConvShape& s, const PlaneGeometry& geo, const scalar_t* g, int64_t g2, int64_t g3,
                      const T* xs, T* gs, Vectorized<T>* acc) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const int64_t OWv = round_up(s.OW, L), NV = OWv / L, tail = s.OW - (NV - 1) * L;
  Vec a[10];
  for (int t = 0; t < 10; ++t) a[t] = acc[t];
  // all-ones bits in the lanes below `tail`: masks the inputs of the last vector
  __at_align__ T bits[L];
  std::memset(bits, 0, sizeof(bits));
  std::memset(bits, 0xff, tail * sizeof(T));
  const Vec keep = Vec::loadu(bits);
  // grad_out read in place where it is a dense opmath row (its tail loaded as zeros), else converted into gs
  const bool in_place = std::is_same_v<scalar_t, T> && g3 == 1;
  const int64_t d0 = 0, d1 = s.dh * geo.stride, d2 = 2 * s.dh * geo.stride;
  const int64_t e1 = s.dw, e2 = 2 * s.dw;
  if (!in_place) {
    // the whole plane converted first: no call in the loop below, whose accumulators stay in registers
    for (int64_t oh = 0; oh < s.OH; ++oh) {
      const scalar_t* sp = g + oh * g2;
      T* d = gs + oh * OWv;
      if (g3 == 1) {
        copy_convert(sp, d, s.OW);
      } else {
        for (int64_t j = 0; j < s.OW; ++j) d[j] = T(sp[j * g3]);
      }
      std::fill(d + s.OW, d + OWv, T(0));
    }
  }
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const T* gr = in_place ? reinterpret_cast<const T*>(g + oh * g2) : gs + oh * OWv;
    const T* xr = xs + oh * s.sh * geo.stride;
    const auto step = [&](int64_t v, auto masked) {
      constexpr bool last = decltype(masked)::value;
      const Vec gv = last && in_place ? Vec::loadu(gr + v * L, static_cast<int>(tail)) : Vec::loadu(gr + v * L);
      const T* x = xr + v * L;
      const auto ld = [&](int64_t off) {
        const Vec xv = Vec::loadu(x + off);
        if constexpr (last) return xv & keep;
        return xv;
      };
      a[0] = at::vec::fmadd(gv, ld(d0), a[0]);
      a[1] = at::vec::fmadd(gv, ld(d0 + e1), a[1]);
      a[2] = at::vec::fmadd(gv, ld(d0 + e2), a[2]);
      a[3] = at::vec::fmadd(gv, ld(d1), a[3]);
      a[4] = at::vec::fmadd(gv, ld(d1 + e1), a[4]);
      a[5] = at::vec::fmadd(gv, ld(d1 + e2), a[5]);
      a[6] = at::vec::fmadd(gv, ld(d2), a[6]);
      a[7] = at::vec::fmadd(gv, ld(d2 + e1), a[7]);
      a[8] = at::vec::fmadd(gv, ld(d2 + e2), a[8]);
      a[9] = a[9] + gv;
    };
    for (int64_t v = 0; v + 1 < NV; ++v) step(v, std::false_type{});
    step(NV - 1, std::true_type{});
  }
  for (int t = 0; t < 10; ++t) acc[t] = a[t];
}

// Weight gradient of 4 output channels (grad_out planes g, opmath, rows grs apart, zeros past OW, planes
// kstride apart) and
// one (input channel, kernel row) of width-3 taps: 4 x 3 accumulators, each grad_out vector loaded once
// for 3 taps and each input vector once for 4 channels. xb: the input plane's first row for this kernel
// row; keep: the lanes of the last vector that count (inputs past OW meet grad_out's zeros: 0 * inf).
// out[kb * 3 + kw] += the sums.
template <typename T>
void kw3_weight_block(const ConvShape& s, const PlaneGeometry& geo, const T* xb, const T* g, int64_t grs,
                      int64_t kstride, int64_t NV, const Vectorized<T>& keep, T* out) {
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  Vec acc[4][3];
#pragma GCC unroll 4
  for (int kb = 0; kb < 4; ++kb)
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) acc[kb][kw] = Vec(T(0));
  const Vec all = ~Vec(T(0)) | Vec(T(0));
  for (int64_t oh = 0; oh < s.OH; ++oh) {
    const T* xrow = xb + oh * s.sh * geo.stride;
    const T* grow = g + oh * grs;
    for (int64_t v = 0; v < NV; ++v) {
      const Vec m = v + 1 < NV ? all : keep;
      Vec gv[4];
#pragma GCC unroll 4
      for (int kb = 0; kb < 4; ++kb) gv[kb] = Vec::loadu(grow + kb * kstride + v * L);
#pragma GCC unroll 3
      for (int kw = 0; kw < 3; ++kw) {
        const Vec x = Vec::loadu(xrow + v * L + kw * s.dw) & m;
#pragma GCC unroll 4
        for (int kb = 0; kb < 4; ++kb) acc[kb][kw] = at::vec::fmadd(gv[kb], x, acc[kb][kw]);
      }
    }
  }
  // lanes summed in order, from a store (a reference to the accumulators would keep them in memory)
  __at_align__ T lanes[12][L];
#pragma GCC unroll 4
  for (int kb = 0; kb < 4; ++kb)
#pragma GCC unroll 3
    for (int kw = 0; kw < 3; ++kw) acc[kb][kw].store(lanes[kb * 3 + kw]);
  for (int i = 0; i < 12; ++i) {
    T total = 0;
    for (int64_t j = 0; j < L; ++j) total += lanes[i][j];
    out[i] = total;
  }
}

template <typename scalar_t>
void direct_backward_weight_t(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                              const at::Tensor& gb) {
  using T = at::opmath_type<scalar_t>;
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const View4<scalar_t> gv(g), xv(x);
  const int64_t Cg = s.Cg(), Kg = s.Kg(), G = s.groups;
  const int64_t taps = Cg * s.KH * s.KW, wsize = s.K * taps;
  const int64_t OWv = round_up(s.OW, L), NV = OWv / L, tail = s.OW - (NV - 1) * L;
  PlaneGeometry geo;
  vector_rows(s, OWv, L, geo);  // strided along the width: rows split by column phase
  const bool dw3 = s.sw == 1 && Cg == 1 && Kg == 1 && s.KH == 3 && s.KW == 3;
  // depthwise: a plane is small and a group's planes lie an image apart, so chunks of one image (up to
  // ~256K partial values) keep each task's reads in memory order; still a function of the shape alone
  const int64_t NC = dw3 ? std::min<int64_t>(s.N, std::max<int64_t>(image_chunks(s.N, G), (1 << 18) / (wsize + s.K)))
                         : image_chunks(s.N, G);
  const int64_t per = (s.N + NC - 1) / NC;
  // a few channels per group with 3 taps a kernel row: the 4-channel register-blocked reduction
  const bool kw3 = s.sw == 1 && !dw3 && s.KW == 3 && Kg >= 4;
  __at_align__ T bits[L];
  std::memset(bits, 0, sizeof(bits));
  std::memset(bits, 0xff, tail * sizeof(T));
  const Vec keep = Vec::loadu(bits);
  // partials: per chunk, the weight gradient then the bias gradient
  std::vector<T> parts(NC * (wsize + s.K), T(0));
  at::parallel_for(0, G * NC, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> xs(Cg * geo.plane + L);
    std::vector<T> gs(Kg * s.OH * OWv);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t ci = t / G, grp = t % G;  // consecutive tasks: consecutive groups of the same images
      T* pw = parts.data() + ci * (wsize + s.K) + grp * Kg * taps;
      T* pb = parts.data() + ci * (wsize + s.K) + wsize + grp * Kg;
      Vec acc[10];  // depthwise 3x3: the taps' and the bias's sums over the chunk, lane-wise
      for (auto& a : acc) a = Vec(T(0));
      for (int64_t n = ci * per; n < std::min(s.N, (ci + 1) * per); ++n) {
        copy_padded(xv.p + n * xv.s0 + grp * Cg * xv.s1, xv.s1, xv.s2, xv.s3, Cg, s.H, s.W, s.ph, s.pw, geo, xs.data());
        if (dw3) {
          // depthwise 3x3: each grad_out vector loaded once, into 9 tap accumulators and the bias's
          dw3_weight_image(s, geo, gv.p + n * gv.s0 + grp * gv.s1, gv.s2, gv.s3, xs.data(), gs.data(), acc);
          continue;
        }
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
        int64_t kl0 = 0;
        if (kw3) {
          // blocks of 4 output channels, a kernel row of 3 taps at a time (the rest below)
          for (; kl0 + 4 <= Kg; kl0 += 4)
            for (int64_t c = 0; c < Cg; ++c)
              for (int64_t kh = 0; kh < s.KH; ++kh) {
                T sums[12];
                kw3_weight_block(s, geo, xs.data() + c * geo.plane + kh * s.dh * geo.stride,
                                 gs.data() + kl0 * s.OH * OWv, OWv, s.OH * OWv, NV, keep, sums);
                for (int kb = 0; kb < 4; ++kb)
                  for (int kw = 0; kw < 3; ++kw)
                    pw[((kl0 + kb) * Cg + c) * s.KH * s.KW + kh * s.KW + kw] += sums[kb * 3 + kw];
              }
        }
        for (int64_t kl = kl0; kl < Kg; ++kl)
          for (int64_t c = 0; c < Cg; ++c)
            for (int64_t kh = 0; kh < s.KH; ++kh)
              for (int64_t kw = 0; kw < s.KW; ++kw) {
                const T* xc = xs.data() + c * geo.plane + kh * s.dh * geo.stride + geo.col(kw * s.dw);
                const T* gk = gs.data() + kl * s.OH * OWv;
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
                const T total = at::vec::vec_reduce_all<T>([](Vec a, Vec b) { return a + b; }, a0 + a1);
                pw[(kl * Cg + c) * s.KH * s.KW + kh * s.KW + kw] += total;
              }
      }
      if (dw3) {
        const auto sum = [](Vec a, Vec b) { return a + b; };
        for (int tap = 0; tap < 9; ++tap) pw[tap] += at::vec::vec_reduce_all<T>(sum, acc[tap]);
        pb[0] += at::vec::vec_reduce_all<T>(sum, acc[9]);
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

}  // namespace

void direct_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                    const at::Tensor& out, Act act, double scalar, Moments* moments) {
  PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
    using T = at::opmath_type<scalar_t>;
    const auto opmath = c10::CppTypeToScalarType<T>::value;
    const at::Tensor wf = w.to(opmath).contiguous();
    const at::Tensor bf = bias.defined() ? bias.to(opmath).contiguous() : bias;
    direct_forward_t<scalar_t>(s, x, wf.const_data_ptr<T>(), bf.defined() ? bf.const_data_ptr<T>() : nullptr, out, act,
                               scalar, moments);
  });
}
void direct_backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi) {
  PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] { direct_backward_input_t<scalar_t>(s, g, w, gi); });
}
void direct_backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                            const at::Tensor& gb) {
  PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] { direct_backward_weight_t<scalar_t>(s, g, x, gw, gb); });
}

}  // namespace cpu_conv
}  // namespace pyops
