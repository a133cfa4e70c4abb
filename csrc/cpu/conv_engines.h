// The CPU conv engines, one file each; csrc/cpu/conv.cpp (the CPU device of csrc/conv.h) picks one
// per call. Each entry point takes any floating dtype and does its own dispatch; shared here are the
// helpers that copy planes into op-math buffers.
#pragma once
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "common/act.h"
#include "conv.h"

namespace pyops {
namespace cpu_conv {

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
// With phases P > 1 (a convolution's stride along the width), each row holds its columns split by
// phase: column j at (j % P) * seg + j / P, so that a strided tap reads consecutive elements (see col).
struct PlaneGeometry {
  int64_t rows, cols, stride, plane;  // cols valid columns, stride >= cols (zeros past them)
  int64_t phases = 1, seg = 0;        // seg: elements a phase takes in a row (phases > 1)
  int64_t col(int64_t j) const { return phases == 1 ? j : (j % phases) * seg + j / phases; }
};

// The row layout of a forward or weight-gradient pass vectorized along the output width: stride 1,
// rows of OWv + the taps' reach; stride sw > 1, rows split into sw phases, each as long as the padded
// row's share or the vectors a tap reads, whichever is longer (every tap's reads stay in its phase).
inline void vector_rows(const ConvShape& s, int64_t OWv, int64_t L, PlaneGeometry& geo) {
  geo.rows = s.H + 2 * s.ph;
  geo.cols = s.W + 2 * s.pw;
  const int64_t reach = s.dw * (s.KW - 1);
  if (s.sw == 1) {
    geo.stride = round_up(std::max(geo.cols, OWv + reach), L);
  } else {
    geo.phases = s.sw;
    geo.seg = round_up(std::max((geo.cols + s.sw - 1) / s.sw, OWv + reach / s.sw), L);
    geo.stride = geo.phases * geo.seg;
  }
  geo.plane = geo.rows * geo.stride;
}

template <typename scalar_t, typename T>
void copy_padded(const scalar_t* src, int64_t sc, int64_t sh, int64_t sw, int64_t channels, int64_t H, int64_t W,
                 int64_t pad_r, int64_t pad_c, const PlaneGeometry& g, T* dst) {
  const int64_t j0 = std::clamp<int64_t>(pad_c, 0, g.stride), j1 = std::clamp<int64_t>(W + pad_c, j0, g.stride);
  if constexpr (std::is_same_v<scalar_t, T>) {
    if (sw == 1 && g.phases == 1) {
      // short rows (a plane of a depthwise convolution is often 7 to 56 wide): vector stores in place
      // of a memset and a memcpy call per row
      using Vec = Vectorized<T>;
      constexpr int64_t L = Vec::size();
      const Vec zero(T(0));
      for (int64_t c = 0; c < channels; ++c) {
        for (int64_t r = 0; r < g.rows; ++r) {
          T* d = dst + c * g.plane + r * g.stride;
          int64_t j = 0;
          for (; j + L <= g.stride; j += L) zero.store(d + j);
          if (j < g.stride) zero.store(d + j, static_cast<int>(g.stride - j));
          const int64_t ih = r - pad_r;
          if (ih < 0 || ih >= H || j1 <= j0) continue;
          const T* s = src + c * sc + ih * sh + (j0 - pad_c);
          const int64_t n = j1 - j0;
          j = 0;
          for (; j + L <= n; j += L) Vec::loadu(s + j).store(d + j0 + j);
          if (j < n) {
            // a whole-vector load where the row below (same channel) holds the elements past the row's end
            const bool whole = ih + 1 < H && sh > 0 && j + L <= sh + W - (j0 - pad_c);
            const Vec v = whole ? Vec::loadu(s + j) : Vec::loadu(s + j, static_cast<int>(n - j));
            v.store(d + j0 + j, static_cast<int>(n - j));
          }
        }
      }
      return;
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    for (int64_t r = 0; r < g.rows; ++r) {
      T* d = dst + c * g.plane + r * g.stride;
      const int64_t ih = r - pad_r;
      if (ih < 0 || ih >= H || j1 <= j0) {
        std::fill(d, d + g.stride, T(0));
        continue;
      }
      const scalar_t* s = src + c * sc + ih * sh + (j0 - pad_c) * sw;
      if (g.phases > 1) {  // split by column phase
        std::fill(d, d + g.stride, T(0));
        for (int64_t j = j0; j < j1; ++j, s += sw) d[g.col(j)] = T(*s);
        continue;
      }
      std::fill(d, d + j0, T(0));
      std::fill(d + j1, d + g.stride, T(0));
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

// ---- the output's per-channel moments, gathered in the forward's epilogue (conv2d_fwd_stats) -------
// Each task of an engine that writes a part of the output while it is in cache records, per channel, the
// mean and M2 (sum of squared deviations from that mean) of the part, as a partial: partial p of channel k
// at [p * K + k], every partial over `count` elements. combine() folds the partials of each channel in
// index order (Chan, Golub and LeVeque's pairwise update), so that the result depends on the shape alone,
// never on the thread count. Partials are computed in op-math (two passes over the part, which is in
// cache) and kept in double.
struct Moments {
  int64_t parts = 0, K = 0, count = 0;
  std::vector<double> mean, m2;
  Moments(int64_t parts_, int64_t K_, int64_t count_)
      : parts(parts_), K(K_), count(count_), mean(parts_ * K_), m2(parts_ * K_) {}
  void set(int64_t p, int64_t k, double mu, double sq) {
    mean[p * K + k] = mu;
    m2[p * K + k] = sq;
  }
  // mean_out[k], var_out[k] (biased: M2 / elements), written in their dtype (float or double)
  template <typename S>
  void combine(S* mean_out, S* var_out) const {
    at::parallel_for(0, K, 16, [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) {
        double mu = 0, sq = 0, plain = 0;
        for (int64_t p = 0; p < parts; ++p) {
          const double na = double(p * count), n = double((p + 1) * count);
          const double delta = mean[p * K + k] - mu;
          mu += delta * (double(count) / n);
          sq += m2[p * K + k] + delta * delta * (na * double(count) / n);
          plain += mean[p * K + k];
        }
        // a non-finite part (an inf: inf - inf in the update) takes the plain mean of the parts: inf, -inf or
        // NaN as a sum gives it, as batch_norm's statistics do
        mean_out[k] = S(std::isfinite(mu) ? mu : plain / double(parts));
        var_out[k] = S(sq / double(parts * count));
      }
    });
  }
};

// The mean of rows x len elements at p as a sum gives it (inf, -inf or NaN where the data hold them).
template <typename scalar_t>
double plain_mean(const scalar_t* p, int64_t rows, int64_t rs, int64_t len, int64_t es) {
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < len; ++j) sum += double(p[r * rs + j * es]);
  return sum / double(rows * len);
}

// The mean and M2 of rows x len elements at p (row stride rs, element stride es), in op-math, in one pass
// over data shifted by its first element (sums of d = x - x0 and d^2: M2 = sum d^2 - (sum d)^2 / n, which
// loses nothing to cancellation while x0 lies within a few standard deviations of the mean, as a sample
// of the data does).
template <typename scalar_t>
std::pair<double, double> part_moments(const scalar_t* p, int64_t rows, int64_t rs, int64_t len, int64_t es) {
  using T = at::opmath_type<scalar_t>;
  using Vec = Vectorized<T>;
  constexpr int64_t L = Vec::size();
  const T x0 = T(p[0]);
  const Vec vx0(x0);
  Vec vs(T(0)), vq(T(0));
  T ss = 0, sq = 0;
  const int64_t n_all = rows * len;
  if (es == 1 && rs == len) {  // a dense part (an NCHW plane): one row, so that short rows vectorize too
    len = n_all;
    rows = 1;
  }
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = p + r * rs;
    int64_t j = 0;
    if constexpr (std::is_same_v<scalar_t, T>) {
      if (es == 1) {
        for (; j + L <= len; j += L) {
          const Vec d = Vec::loadu(row + j) - vx0;
          vs = vs + d;
          vq = at::vec::fmadd(d, d, vq);
        }
        if (j < len) {  // the last partial vector, its missing lanes 0
          const int cnt = static_cast<int>(len - j);
          const Vec d = Vec::set(Vec(T(0)), Vec::loadu(row + j, cnt) - vx0, cnt);
          vs = vs + d;
          vq = at::vec::fmadd(d, d, vq);
          j = len;
        }
      }
    }
    for (; j < len; ++j) {
      const T d = T(row[j * es]) - x0;
      ss += d;
      sq += d * d;
    }
  }
  const auto add = [](Vec& a, Vec& b) { return a + b; };
  const double n = double(n_all);
  const double sum = double(at::vec::vec_reduce_all<T>(add, vs) + ss);
  const double sum2 = double(at::vec::vec_reduce_all<T>(add, vq) + sq);
  const double mu = double(x0) + sum / n;  // x0 infinite: NaN, and combine() takes the plain sum
  const double m2 = sum2 - sum * sum / n;  // rounding may leave it below 0; NaN (non-finite data) stays
  return {std::isfinite(mu) ? mu : plain_mean(p, rows, rs, len, es), m2 < 0 ? 0.0 : m2};
}

// Whether the channels_last depthwise engine takes the call: one input and one output channel per
// group, float32/float64, both tensors with channel stride 1.
inline bool depthwise_cl(const ConvShape& s, const at::Tensor& a, const at::Tensor& b) {
  const at::ScalarType t = a.scalar_type();
  return (t == at::kFloat || t == at::kDouble) && s.Cg() == 1 && s.Kg() == 1 && s.C > 1 && a.stride(1) == 1 &&
         b.stride(1) == 1;
}

// ---- the engines (csrc/cpu/conv_direct.cpp, conv_depthwise_cl.cpp, conv_gemm.cpp) -----------------
// forward: out = act(conv(x, w) + bias); backward_input: gi = conv's transpose of g; backward_weight:
// gw (and gb when defined) from g and x, in a fixed order.
// moments (forward only; may be null): the output's per-channel partials, recorded by the tasks
void direct_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                    const at::Tensor& out, Act act, double scalar, Moments* moments = nullptr);
void direct_backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi);
void direct_backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                            const at::Tensor& gb);
void dw_cl_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                   const at::Tensor& out, Act act, double scalar, Moments* moments = nullptr);
void dw_cl_backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi);
void dw_cl_backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                           const at::Tensor& gb);
void gemm_forward(const ConvShape& s, const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias,
                  const at::Tensor& out, Act act, double scalar);
void gemm_backward_input(const ConvShape& s, const at::Tensor& g, const at::Tensor& w, const at::Tensor& gi);
void gemm_backward_weight(const ConvShape& s, const at::Tensor& g, const at::Tensor& x, const at::Tensor& gw,
                          const at::Tensor& gb);

}  // namespace cpu_conv
}  // namespace pyops
