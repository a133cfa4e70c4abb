// CPU kernels of the loss family: one template per op over the four dtypes, vectorized with at::vec
// and split over threads with at::parallel_for. The host side is csrc/loss.h; the math of each op is
// documented in pyops/ops/loss.py.
//
// Reductions are deterministic whatever the thread count: the input is cut into fixed chunks of
// kChunk elements, each summed in vector lanes (float32 for float32/float16/bfloat16, float64 for
// float64) and folded into a float64 partial; the partials are then added in chunk order in float64.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/scalar_tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <unistd.h>
#include <vector>

#include "common/dispatch.h"
#include "common/vec.h"
#include "loss.h"

namespace pyops {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 32768;  // elements per task (torch's at::internal::GRAIN_SIZE)
constexpr int64_t kChunk = 8192;   // elements per partial sum of a reduction (fixed: determinism)
constexpr int64_t kSub = 256;      // elements converted at a time for float16/bfloat16

// Gradients past 3/4 of the last-level cache cannot stay cached until backward reads them, so they
// are written with streaming stores (glibc's memcpy rule, as csrc/cpu/activation.cpp).
inline bool stream_output(const void* out, int64_t bytes) {
  static const int64_t threshold = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return (l3 > 0 ? int64_t(l3) : int64_t(32) << 20) * 3 / 4;
  }();
  return bytes >= threshold && reinterpret_cast<uintptr_t>(out) % 64 == 0;
}

// ---- the pointwise losses of d = input - target: value and derivative in d ---------------------
// Scalar and Vectorized forms. NaN propagates to both (as torch's kernels).
struct L1 {
  template <typename T>
  T loss(T d) const {
    return std::abs(d);
  }
  template <typename T>
  T deriv(T d) const {  // sign(d): 0 at zero error and for NaN (torch's sign)
    return d > T(0) ? T(1) : d < T(0) ? T(-1) : T(0);
  }
  template <typename T>
  Vectorized<T> loss(const Vectorized<T>& d) const {
    return d.abs();
  }
  template <typename T>
  Vectorized<T> deriv(const Vectorized<T>& d) const {
    using V = Vectorized<T>;
    const V zero(0);
    return V::blendv(V::blendv(zero, V(1), d > zero), V(-1), d < zero);
  }
};

struct Mse {
  template <typename T>
  T loss(T d) const {
    return d * d;
  }
  template <typename T>
  T deriv(T d) const {
    return T(2) * d;
  }
  template <typename T>
  Vectorized<T> loss(const Vectorized<T>& d) const {
    return d * d;
  }
  template <typename T>
  Vectorized<T> deriv(const Vectorized<T>& d) const {
    return d + d;
  }
};

struct Huber {  // |d| < delta ? d^2 / 2 : delta (|d| - delta / 2);  derivative clamp(d, -delta, delta)
  double delta;
  template <typename T>
  T loss(T d) const {
    const T a = std::abs(d), dl = T(delta);
    return a < dl ? T(0.5) * d * d : dl * (a - T(0.5) * dl);
  }
  template <typename T>
  T deriv(T d) const {
    const T dl = T(delta);
    return d < -dl ? -dl : d > dl ? dl : d;
  }
  template <typename T>
  Vectorized<T> loss(const Vectorized<T>& d) const {
    using V = Vectorized<T>;
    const V a = d.abs(), dl{T(delta)};
    return V::blendv(dl * (a - V(T(0.5)) * dl), V(T(0.5)) * d * d, a < dl);
  }
  template <typename T>
  Vectorized<T> deriv(const Vectorized<T>& d) const {
    using V = Vectorized<T>;
    const V dl{T(delta)};
    return V::blendv(V::blendv(d, dl, d > dl), -dl, d < -dl);
  }
};

template <typename F>
void with_kind(int64_t kind, double delta, const F& f) {
  switch (LossKind(kind)) {
    case LossKind::kL1:
      return f(L1{});
    case LossKind::kMse:
      return f(Mse{});
    default:
      return f(Huber{delta});
  }
}

// Calls body(x, t, g, m) over [begin, begin + len) in runs of opmath_t values: the tensors' own
// memory for float32/float64, converted stack buffers (written back to g) for float16/bfloat16.
template <typename scalar_t, typename Body>
void as_opmath(const scalar_t* x, const scalar_t* t, scalar_t* g, int64_t len, const Body& body) {
  using opmath_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, opmath_t>) {
    body(x, t, g, len);
  } else {
    __at_align__ opmath_t xb[kSub], tb[kSub], gb[kSub];
    for (int64_t s = 0; s < len; s += kSub) {
      const int64_t m = std::min(kSub, len - s);
      at::vec::convert(x + s, xb, m);
      at::vec::convert(t + s, tb, m);
      body(xb, tb, g ? gb : nullptr, m);
      if (g) at::vec::convert(gb, g + s, m);
    }
  }
}

// out = loss(x - t) elementwise.
template <typename scalar_t, typename Op>
void pointwise_kernel(const scalar_t* x, const scalar_t* t, scalar_t* out, int64_t n, const Op& op) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vectorized<opmath_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    as_opmath(x + i0, t + i0, out + i0, i1 - i0, [&](const opmath_t* px, const opmath_t* pt, opmath_t* po, int64_t m) {
      int64_t j = 0;
      for (; j + V::size() <= m; j += V::size()) op.loss(V::loadu(px + j) - V::loadu(pt + j)).store(po + j);
      for (; j < m; ++j) po[j] = op.loss(px[j] - pt[j]);
    });
  });
}

// gi = g * loss'(x - t) elementwise.
template <typename scalar_t, typename Op>
void pointwise_bwd_kernel(const scalar_t* g, const scalar_t* x, const scalar_t* t, scalar_t* gi, int64_t n,
                          const Op& op) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vectorized<opmath_t>;
  at::parallel_for(0, n, kGrain, [&](int64_t i0, int64_t i1) {
    __at_align__ opmath_t gb[kSub];
    for (int64_t s = i0; s < i1; s += kSub) {
      const int64_t len = std::min(kSub, i1 - s);
      at::vec::convert(g + s, gb, len);
      int64_t off = 0;  // where the run handed to the body starts, relative to s
      as_opmath(x + s, t + s, gi + s, len, [&](const opmath_t* px, const opmath_t* pt, opmath_t* po, int64_t m) {
        const opmath_t* pg = gb + off;
        int64_t j = 0;
        for (; j + V::size() <= m; j += V::size())
          (V::loadu(pg + j) * op.deriv(V::loadu(px + j) - V::loadu(pt + j))).store(po + j);
        for (; j < m; ++j) po[j] = pg[j] * op.deriv(px[j] - pt[j]);
        off += m;
      });
    }
  });
}

// The sum of loss(x - t) over len elements in float64 (fixed order), and when kGrad g = scale * loss'.
template <bool kGrad, typename scalar_t, typename Op>
double reduce_chunk(const scalar_t* x, const scalar_t* t, scalar_t* g, int64_t len, const Op& op, double scale,
                    bool stream) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vectorized<opmath_t>;
  constexpr int64_t L = V::size();
  const V vscale(static_cast<opmath_t>(scale));
  V acc0(0), acc1(0), acc2(0), acc3(0);
  double tail = 0;
  as_opmath(x, t, kGrad ? g : nullptr, len, [&](const opmath_t* px, const opmath_t* pt, opmath_t* pg, int64_t m) {
    int64_t j = 0;
    // streaming stores need aligned addresses: the chunk starts are multiples of kChunk elements
    // from a 64-byte aligned base (checked by the caller)
    for (; j + 4 * L <= m; j += 4 * L) {
      const V d0 = V::loadu(px + j) - V::loadu(pt + j);
      const V d1 = V::loadu(px + j + L) - V::loadu(pt + j + L);
      const V d2 = V::loadu(px + j + 2 * L) - V::loadu(pt + j + 2 * L);
      const V d3 = V::loadu(px + j + 3 * L) - V::loadu(pt + j + 3 * L);
      acc0 += op.loss(d0);
      acc1 += op.loss(d1);
      acc2 += op.loss(d2);
      acc3 += op.loss(d3);
      if constexpr (kGrad) {
        vec::store(op.deriv(d0) * vscale, pg + j, stream);
        vec::store(op.deriv(d1) * vscale, pg + j + L, stream);
        vec::store(op.deriv(d2) * vscale, pg + j + 2 * L, stream);
        vec::store(op.deriv(d3) * vscale, pg + j + 3 * L, stream);
      }
    }
    for (; j < m; ++j) {
      const opmath_t d = px[j] - pt[j];
      tail += double(op.loss(d));
      if constexpr (kGrad) pg[j] = op.deriv(d) * static_cast<opmath_t>(scale);
    }
  });
  __at_align__ opmath_t lanes[L];
  ((acc0 + acc1) + (acc2 + acc3)).store(lanes);
  double sum = 0;
  for (int64_t i = 0; i < L; ++i) sum += double(lanes[i]);
  return sum + tail;
}

template <typename scalar_t, typename Op>
void pointwise_reduce_kernel(const scalar_t* x, const scalar_t* t, scalar_t* g, scalar_t* out, int64_t n, const Op& op,
                             double scale) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(chunks);
  const bool stream = g != nullptr && std::is_same_v<scalar_t, at::opmath_type<scalar_t>> &&
                      stream_output(g, n * int64_t(sizeof(scalar_t)));
  at::parallel_for(0, chunks, std::max<int64_t>(1, kGrain / kChunk), [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c * kChunk, len = std::min(kChunk, n - b);
      partial[c] = g ? reduce_chunk<true>(x + b, t + b, g + b, len, op, scale, stream)
                     : reduce_chunk<false>(x + b, t + b, g, len, op, scale, false);
    }
    if (stream) vec::sfence();
  });
  double total = 0;
  for (double p : partial) total += p;
  *out = static_cast<scalar_t>(total * scale);
}

// ---- softmax cross entropy, one row of C classes at a time (csrc/loss.h has the math) ----------
struct CrossEntropyArgs {
  int64_t rows, classes, ignore_index;
  double smoothing, scale;  // scale: the gradient's, unless inv_total (mean over class indices) is set
  bool probs;
};

template <typename scalar_t>
void cross_entropy_kernel(const scalar_t* x, const void* target, const at::opmath_type<scalar_t>* w,
                          const at::opmath_type<scalar_t>* inv_total, at::opmath_type<scalar_t>* loss_rows, scalar_t* g,
                          const CrossEntropyArgs& a) {
  using opmath_t = at::opmath_type<scalar_t>;
  using V = Vectorized<opmath_t>;
  constexpr int64_t L = V::size();
  constexpr bool kSame = std::is_same_v<scalar_t, opmath_t>;
  const int64_t C = a.classes;
  const opmath_t eps = opmath_t(a.smoothing), eps_c = opmath_t(a.smoothing / double(C));
  const opmath_t keep = opmath_t(1) - eps;
  const opmath_t gscale = inv_total ? *inv_total : opmath_t(a.scale);
  opmath_t wsum = opmath_t(C);  // sum of the class weights
  if (w) {
    double s = 0;
    for (int64_t c = 0; c < C; ++c) s += double(w[c]);
    wsum = opmath_t(s);
  }
  const int64_t* tidx = a.probs ? nullptr : static_cast<const int64_t*>(target);
  const scalar_t* tprob = a.probs ? static_cast<const scalar_t*>(target) : nullptr;
  at::parallel_for(0, a.rows, std::max<int64_t>(1, kGrain / std::max<int64_t>(C, 1)), [&](int64_t r0, int64_t r1) {
    // per task: the row's exponentials (read back for the gradient), and its values as opmath_t
    std::vector<opmath_t> ebuf(C), xbuf(kSame ? 0 : C), qbuf(kSame || !a.probs ? 0 : C);
    for (int64_t i = r0; i < r1; ++i) {
      const scalar_t* xrow = x + i * C;
      scalar_t* grow = g ? g + i * C : nullptr;
      int64_t tc = -1;
      if (tidx) {
        tc = tidx[i];
        if (tc == a.ignore_index) {
          loss_rows[i] = 0;
          if (grow) std::fill(grow, grow + C, scalar_t(0));
          continue;
        }
      }
      const opmath_t* xr;
      const opmath_t* q = nullptr;
      if constexpr (kSame) {
        xr = xrow;
        if (tprob) q = tprob + i * C;
      } else {
        at::vec::convert(xrow, xbuf.data(), C);
        xr = xbuf.data();
        if (tprob) {
          at::vec::convert(tprob + i * C, qbuf.data(), C);
          q = qbuf.data();
        }
      }
      // pass 1: the maximum (NaN propagates)
      opmath_t mx = -std::numeric_limits<opmath_t>::infinity();
      {
        int64_t c = 0;
        if (C >= L) {
          V vm = V::loadu(xr);
          for (c = L; c + L <= C; c += L) vm = at::vec::maximum(vm, V::loadu(xr + c));
          __at_align__ opmath_t lanes[L];
          vm.store(lanes);
          for (int64_t k = 0; k < L; ++k) mx = (lanes[k] > mx || std::isnan(lanes[k])) ? lanes[k] : mx;
        }
        for (; c < C; ++c) mx = (xr[c] > mx || std::isnan(xr[c])) ? xr[c] : mx;
      }
      // pass 2: s = sum exp(x - mx); smoothing: sum w (x - mx); probabilities: sum w q', sum w q' (x - mx)
      const bool smooth = tidx && eps != opmath_t(0);
      opmath_t* e = ebuf.data();
      const V vmx(mx), vkeep(keep), veps_c(eps_c);
      V vs(0), va(0), vb(0);
      int64_t c = 0;
      for (; c + L <= C; c += L) {
        const V xv = V::loadu(xr + c) - vmx;
        const V ev = xv.exp();
        ev.store(e + c);
        vs += ev;
        if (smooth) va += w ? xv * V::loadu(w + c) : xv;
        if (q) {
          V wq = at::vec::fmadd(V::loadu(q + c), vkeep, veps_c);
          if (w) wq = wq * V::loadu(w + c);
          va += wq;
          vb += wq * xv;
        }
      }
      __at_align__ opmath_t ls[L], la[L], lb[L];
      vs.store(ls);
      va.store(la);
      vb.store(lb);
      opmath_t s = 0, sa = 0, sb = 0;
      for (int64_t k = 0; k < L; ++k) {
        s += ls[k];
        sa += la[k];
        sb += lb[k];
      }
      for (; c < C; ++c) {
        const opmath_t xv = xr[c] - mx;
        e[c] = std::exp(xv);
        s += e[c];
        if (smooth) sa += w ? xv * w[c] : xv;
        if (q) {
          opmath_t wq = q[c] * keep + eps_c;
          if (w) wq *= w[c];
          sa += wq;
          sb += wq * xv;
        }
      }
      const opmath_t logs = std::log(s);
      opmath_t coef_p, coef_w;  // gradient (before the scale) = coef_p p_c - coef_w w_c (q'_c for probabilities)
      opmath_t wt = 0;
      if (tidx) {
        wt = w ? w[tc] : opmath_t(1);
        const opmath_t xt = xr[tc] - mx;
        opmath_t loss = keep * wt * (logs - xt);
        if (smooth) loss += eps_c * (wsum * logs - sa);
        loss_rows[i] = loss;
        coef_p = keep * wt + eps_c * wsum;
        coef_w = eps_c;
      } else {
        loss_rows[i] = sa * logs - sb;
        coef_p = sa;
        coef_w = 1;
      }
      if (!grow) continue;
      // pass 3: the gradient, written over e (then converted into g for float16/bfloat16)
      opmath_t* out = kSame ? reinterpret_cast<opmath_t*>(grow) : e;
      const opmath_t fp = gscale * coef_p / s, fw = gscale * coef_w;
      const V vfp(fp), vfw(fw);
      const opmath_t e_t = tidx ? e[tc] : opmath_t(0);  // read before out (= e for half types) is written
      for (c = 0; c + L <= C; c += L) {
        V sub;
        if (q) {
          sub = at::vec::fmadd(V::loadu(q + c), vkeep, veps_c);
          if (w) sub = sub * V::loadu(w + c);
          sub = sub * vfw;
        } else {
          sub = w ? V::loadu(w + c) * vfw : vfw;
        }
        (V::loadu(e + c) * vfp - sub).store(out + c);
      }
      for (; c < C; ++c) {
        opmath_t sub;
        if (q) {
          sub = q[c] * keep + eps_c;
          if (w) sub *= w[c];
          sub *= fw;
        } else {
          sub = w ? w[c] * fw : fw;
        }
        out[c] = e[c] * fp - sub;
      }
      if (tidx) out[tc] = e_t * fp - (w ? w[tc] * fw : fw) - gscale * keep * wt;
      if constexpr (!kSame) at::vec::convert(e, grow, C);
    }
  });
}

// The CPU device of csrc/loss.h.
struct Cpu {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static void pointwise(const at::Tensor& x, const at::Tensor& t, const at::Tensor& out, int64_t kind, double delta) {
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      with_kind(kind, delta, [&](auto op) {
        pointwise_kernel(x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                         x.numel(), op);
      });
    });
  }

  static void pointwise_bwd(const at::Tensor& g, const at::Tensor& x, const at::Tensor& t, const at::Tensor& gi,
                            int64_t kind, double delta) {
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      with_kind(kind, delta, [&](auto op) {
        pointwise_bwd_kernel(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                             gi.mutable_data_ptr<scalar_t>(), x.numel(), op);
      });
    });
  }

  static void pointwise_reduce(const at::Tensor& x, const at::Tensor& t, const at::Tensor& out, const at::Tensor& g,
                               int64_t kind, double delta, double scale) {
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      with_kind(kind, delta, [&](auto op) {
        pointwise_reduce_kernel(x.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
                                g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr,
                                out.mutable_data_ptr<scalar_t>(), x.numel(), op, scale);
      });
    });
  }

  // One pass over the targets: the range check and, for mean, their total weight (float64 sum).
  static at::Tensor scan_targets(const at::Tensor& t, int64_t classes, int64_t ignore_index, const at::Tensor& w,
                                 bool total, at::ScalarType opmath) {
    const int64_t* p = t.const_data_ptr<int64_t>();
    const int64_t n = t.numel();
    double sum = 0;
    PYOPS_DISPATCH_FLOATING(w.defined() ? w.scalar_type() : at::kFloat, [&] {
      const scalar_t* pw = w.defined() ? w.const_data_ptr<scalar_t>() : nullptr;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t v = p[i];
        if (v == ignore_index) continue;
        TORCH_CHECK_INDEX(v >= 0 && v < classes, "pyops::cross_entropy_fwd: target ", v, " is out of bounds for ",
                          classes, " classes (ignore_index=", ignore_index, ")");
        sum += pw ? double(pw[v]) : 1.0;
      }
    });
    if (!total) return at::Tensor();
    return at::scalar_tensor(sum, t.options().dtype(opmath));
  }

  static void cross_entropy(const at::Tensor& x, const at::Tensor& t, const at::Tensor& w, const at::Tensor& inv_total,
                            double scale, int64_t ignore_index, double smoothing, const at::Tensor& loss_rows,
                            const at::Tensor& g) {
    const CrossEntropyArgs a{x.size(0), x.size(1), ignore_index, smoothing, scale, t.is_floating_point()};
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
      using opmath_t = at::opmath_type<scalar_t>;
      cross_entropy_kernel<scalar_t>(
          x.const_data_ptr<scalar_t>(), t.const_data_ptr(), w.defined() ? w.const_data_ptr<opmath_t>() : nullptr,
          inv_total.defined() ? inv_total.const_data_ptr<opmath_t>() : nullptr, loss_rows.mutable_data_ptr<opmath_t>(),
          g.defined() ? g.mutable_data_ptr<scalar_t>() : nullptr, a);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_LOSS(m, ::pyops::Cpu, ""); }

}  // namespace pyops
