// CPU kernels of the batch_norm family (host side: csrc/batch_norm.h). The input is [outer, C, inner]
// dense. With inner > 1 (NCHW) a channel is `outer` runs of `inner` contiguous elements, vectorized
// along the run with the channel's coefficients broadcast; with inner == 1 (channels_last, (N, C)) a
// row holds every channel, vectorized across channels with per-lane coefficients.
// Reductions are split into tasks fixed by the shape alone (channels x parts of the N*H*W range for
// NCHW, parts of the rows for channels_last), run in parallel, and their partial results combined in
// task order: the same bits whatever the thread count. Statistics are per-block two-pass (a block of
// up to kBlock elements is summed, then its squared deviations from its own mean; it is in L1 for
// the second look) merged with Chan's formula in float64: one pass over memory, stable for a mean
// far from zero. float16/bfloat16 go through float buffers; op math is float (double for double).
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "batch_norm.h"
#include "common/dispatch.h"

namespace pyops {
namespace {

using at::vec::Vectorized;

constexpr int64_t kBlock = 1024;        // elements of a chunk: every stream of it stays in L1
constexpr int64_t kSplitElems = 32768;  // elements of one reduction task (torch's GRAIN_SIZE)
constexpr int64_t kMaxSplits = 4096;    // parts of one channel's range at most
constexpr int64_t kGrain = 32768;       // elements per task of the elementwise passes
// Rows of a channels_last reduction block at least: its per-channel merge costs 1/kBlockRows of a
// merge per element, and a block (rows x up to kBlock channels, <= 256 KB in float32) stays in L2
// for its second look.
constexpr int64_t kBlockRows = 64;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-channel coefficients of a chunk: one channel's value broadcast (inner > 1) or a row's channels
// lane by lane (inner == 1).
template <typename T>
struct Broadcast {
  using V = Vectorized<T>;
  V v;
  explicit Broadcast(T x) : v(x) {}
  V at(int64_t, int64_t) const { return v; }
};
template <typename T>
struct Lanes {
  using V = Vectorized<T>;
  const T* p;
  V at(int64_t j, int64_t m) const { return m == V::size() ? V::loadu(p + j) : V::loadu(p + j, m); }
};

template <typename T>
inline Vectorized<T> load(const T* p, int64_t j, int64_t m) {
  return m == Vectorized<T>::size() ? Vectorized<T>::loadu(p + j) : Vectorized<T>::loadu(p + j, m);
}
template <typename T>
inline void store(const Vectorized<T>& v, T* p, int64_t j, int64_t m) {
  if (m == Vectorized<T>::size())
    v.store(p + j);
  else
    v.store(p + j, m);
}

// The streams of one pass as scalar_t pointers, and op-math views of a chunk of them (float buffers
// for float16/bfloat16, the data itself otherwise).
enum Stream { kGrad, kInput, kOutput, kResidual, kResult, kResult2, kStreams };

template <typename scalar_t>
struct Streams {
  using T = at::opmath_type<scalar_t>;
  static constexpr bool kSame = std::is_same_v<scalar_t, T>;
  const scalar_t* in[kStreams] = {};
  scalar_t* out[kStreams] = {};
  std::vector<T> buf;
  int64_t cap = 0;

  explicit Streams(int64_t chunk) : cap(chunk) {
    if constexpr (!kSame) buf.resize(size_t(kStreams * chunk));
  }
  // op-math view of stream k at offset off (n elements); nullptr where the stream is absent
  const T* read(int k, int64_t off, int64_t n) {
    if (in[k] == nullptr) return nullptr;
    if constexpr (kSame) {
      return in[k] + off;
    } else {
      at::vec::convert(in[k] + off, buf.data() + k * cap, n);
      return buf.data() + k * cap;
    }
  }
  T* write(int k, int64_t off) {
    if (out[k] == nullptr) return nullptr;
    if constexpr (kSame) return out[k] + off;
    return buf.data() + k * cap;
  }
  void flush(int k, int64_t off, int64_t n) {
    if constexpr (!kSame)
      if (out[k] != nullptr) at::vec::convert(buf.data() + k * cap, out[k] + off, n);
  }
};

template <typename scalar_t>
Streams<scalar_t> streams(const BnPass& p, int64_t chunk) {
  Streams<scalar_t> s(chunk);
  auto in = [](const at::Tensor& t) { return t.defined() ? t.const_data_ptr<scalar_t>() : nullptr; };
  s.in[kGrad] = in(p.grad);
  s.in[kInput] = in(p.input);
  s.in[kOutput] = in(p.output);
  s.in[kResidual] = in(p.residual);
  return s;
}

// Chunks of a pass: body(offset, channel, length) over contiguous pieces of at most kBlock elements
// of one channel (inner > 1) or of one row's channels starting at `channel` (inner == 1).
// Rows of the elementwise passes: (o, c) runs for inner > 1, rows o for inner == 1.
template <typename Body>
void for_each_row_chunk(const BnLayout& l, int64_t row, const Body& body) {
  if (l.inner > 1) {
    const int64_t c = row % l.channels, base = row * l.inner;
    for (int64_t i = 0; i < l.inner; i += kBlock) body(base + i, c, std::min(kBlock, l.inner - i));
  } else {
    const int64_t base = row * l.channels;
    for (int64_t c = 0; c < l.channels; c += kBlock) body(base + c, c, std::min(kBlock, l.channels - c));
  }
}

// Reduction tasks: parts of each channel's range (inner > 1: task = c * parts + part) or parts of the
// rows (inner == 1). Their number depends on the shape only.
struct Split {
  int64_t parts, tasks;
};
Split split_of(const BnLayout& l) {
  Split s;
  if (l.inner > 1) {
    s.parts = std::clamp<int64_t>(ceil_div(l.count(), kSplitElems), 1, kMaxSplits);
    s.tasks = s.parts * l.channels;
  } else {
    s.parts = std::clamp<int64_t>(ceil_div(l.outer * l.channels, kSplitElems), 1, std::min(kMaxSplits, l.outer));
    s.tasks = s.parts;
  }
  return s;
}

// The chunks of reduction task t: body(offset, channel, length, rows) where a chunk is a run of one
// channel (inner > 1, rows = 1) or a block of `rows` whole rows of `length` channels from `channel`
// (inner == 1; offset of the first row).
template <typename Body>
void for_each_task_chunk(const BnLayout& l, const Split& s, int64_t t, const Body& body) {
  if (l.inner > 1) {
    const int64_t c = t / s.parts, part = t % s.parts, n = l.count();
    const int64_t lo = n * part / s.parts, hi = n * (part + 1) / s.parts;
    for (int64_t pos = lo; pos < hi;) {
      const int64_t o = pos / l.inner, i = pos % l.inner;
      const int64_t len = std::min({l.inner - i, hi - pos, kBlock});
      body((o * l.channels + c) * l.inner + i, c, len, int64_t(1));
      pos += len;
    }
  } else {
    const int64_t lo = l.outer * t / s.parts, hi = l.outer * (t + 1) / s.parts;
    for (int64_t c = 0; c < l.channels; c += kBlock) {
      const int64_t width = std::min(kBlock, l.channels - c);
      const int64_t rows = std::max(kBlockRows, kBlock / width);
      for (int64_t o = lo; o < hi; o += rows) body(o * l.channels + c, c, width, std::min(rows, hi - o));
    }
  }
}

// Chan's merge of (nb, mean_b, m2_b) into (n, mean, m2). The mean is the weighted average of the two,
// not mean + delta * nb / total: an infinite value keeps the mean infinite, as torch's is, where the
// difference of two infinite means would make it NaN.
inline void merge(double& n, double& mean, double& m2, double nb, double mean_b, double m2_b) {
  if (nb == 0) return;
  const double total = n + nb, delta = mean_b - mean;
  mean = mean * (n / total) + mean_b * (nb / total);
  m2 += m2_b + delta * delta * (n * nb / total);
  n = total;
}

// ---- statistics ------------------------------------------------------------------------------------
template <typename scalar_t>
void stats_kernel(const at::Tensor& x, const BnLayout& l, const at::Tensor& mean_out, const at::Tensor& var_out) {
  using T = at::opmath_type<scalar_t>;
  using V = Vectorized<T>;
  const Split s = split_of(l);
  const int64_t C = l.channels;
  const int64_t width = l.inner > 1 ? 1 : C;  // channels a task holds partial results for
  std::vector<double> part_n(size_t(s.tasks * width)), part_mean(part_n.size()), part_m2(part_n.size());
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  at::parallel_for(0, s.tasks, 1, [&](int64_t t0, int64_t t1) {
    Streams<scalar_t> st(kBlock);
    st.in[kInput] = data;
    std::vector<T> sum(size_t(std::min(C, kBlock))), dev(sum.size());
    // channels_last: the task's running statistics per channel (op math; the tasks merge in float64)
    std::vector<T> task_n(static_cast<size_t>(width)), task_mean(task_n.size()), task_m2(task_n.size());
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(task_n.begin(), task_n.end(), T(0));
      std::fill(task_mean.begin(), task_mean.end(), T(0));
      std::fill(task_m2.begin(), task_m2.end(), T(0));
      double* n = part_n.data() + t * width;
      double* mu = part_mean.data() + t * width;
      double* m2 = part_m2.data() + t * width;
      std::fill(n, n + width, 0.0);
      std::fill(mu, mu + width, 0.0);
      std::fill(m2, m2 + width, 0.0);
      for_each_task_chunk(l, s, t, [&](int64_t off, int64_t c, int64_t len, int64_t rows) {
        if (l.inner > 1) {  // one channel's run
          const T* q = st.read(kInput, off, len);
          const T mb = at::vec::reduce_all<T>([](const V& a, const V& b) { return a + b; }, q, len) / T(len);
          const T m2b = at::vec::map_reduce_all<T>(
              [mb](const V& v) {
                const V d = v - V(mb);
                return d * d;
              },
              [](const V& a, const V& b) { return a + b; }, q, len);
          merge(n[0], mu[0], m2[0], double(len), double(mb), double(m2b));
          return;
        }
        // a block of rows, channels [c, c + len) lane by lane; every channel has the same count, so
        // Chan's merge into the task's running (mean, m2) is a vector operation
        std::fill(sum.begin(), sum.begin() + len, T(0));
        std::fill(dev.begin(), dev.begin() + len, T(0));
        for (int64_t r = 0; r < rows; ++r) {
          const T* q = st.read(kInput, off + r * C, len);
          for (int64_t j = 0; j < len; j += V::size()) {
            const int64_t m = std::min<int64_t>(V::size(), len - j);
            store(load(sum.data(), j, m) + load(q, j, m), sum.data(), j, m);
          }
        }
        const V inv_rows(T(1) / T(rows));
        for (int64_t j = 0; j < len; j += V::size()) {
          const int64_t m = std::min<int64_t>(V::size(), len - j);
          store(load(sum.data(), j, m) * inv_rows, sum.data(), j, m);  // the block's means
        }
        for (int64_t r = 0; r < rows; ++r) {
          const T* q = st.read(kInput, off + r * C, len);
          for (int64_t j = 0; j < len; j += V::size()) {
            const int64_t m = std::min<int64_t>(V::size(), len - j);
            const V d = load(q, j, m) - load(sum.data(), j, m);
            store(load(dev.data(), j, m) + d * d, dev.data(), j, m);
          }
        }
        T* tmean = task_mean.data() + c;
        T* tm2 = task_m2.data() + c;
        const T n0 = task_n[c], total = n0 + T(rows);
        const V wa(n0 / total), wb(T(rows) / total), wd(n0 * T(rows) / total);
        for (int64_t j = 0; j < len; j += V::size()) {
          const int64_t m = std::min<int64_t>(V::size(), len - j);
          const V mean0 = load(tmean, j, m), mean_b = load(sum.data(), j, m), delta = mean_b - mean0;
          store(mean0 * wa + mean_b * wb, tmean, j, m);  // as merge(): an infinite mean stays infinite
          store(load(tm2, j, m) + load(dev.data(), j, m) + delta * delta * wd, tm2, j, m);
        }
        std::fill(task_n.begin() + c, task_n.begin() + c + len, total);
      });
      if (l.inner == 1)
        for (int64_t j = 0; j < C; ++j) n[j] = task_n[j], mu[j] = task_mean[j], m2[j] = task_m2[j];
    }
  });
  // combine the tasks of each channel in task order
  T* mean = mean_out.mutable_data_ptr<T>();
  T* var = var_out.mutable_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    double n = 0, mu = 0, m2 = 0;
    for (int64_t p = 0; p < s.parts; ++p) {
      const int64_t k = l.inner > 1 ? c * s.parts + p : p * C + c;
      merge(n, mu, m2, part_n[k], part_mean[k], part_m2[k]);
    }
    mean[c] = T(mu);
    var[c] = T(m2 / n);
  }
}

// ---- forward, elementwise --------------------------------------------------------------------------
template <typename scalar_t, Act A>
void elemt_kernel(const BnPass& p, const at::Tensor& out) {
  using T = at::opmath_type<scalar_t>;
  using V = Vectorized<T>;
  const T param = T(p.param);
  const T* center = p.center.const_data_ptr<T>();
  const T* scale = p.scale.const_data_ptr<T>();
  const T* shift = p.shift.const_data_ptr<T>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const bool lanes = p.l.inner == 1;
  auto run = [&](const T* x, const T* r, T* y, int64_t len, const auto& cen, const auto& sc, const auto& sh) {
    for (int64_t j = 0; j < len; j += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), len - j);
      V z = (load(x, j, m) - cen.at(j, m)) * sc.at(j, m) + sh.at(j, m);
      if (r != nullptr) z = z + load(r, j, m);
      store(act_forward(A, z, param), y, j, m);
    }
  };
  const int64_t rows_total = p.l.inner > 1 ? p.l.outer * p.l.channels : p.l.outer;
  const int64_t len_row = p.l.inner > 1 ? p.l.inner : p.l.channels;
  at::parallel_for(0, rows_total, std::max<int64_t>(1, kGrain / std::max<int64_t>(len_row, 1)),
                   [&](int64_t r0, int64_t r1) {
                     Streams<scalar_t> st = streams<scalar_t>(p, kBlock);
                     st.out[kResult] = dst;
                     for (int64_t row = r0; row < r1; ++row)
                       for_each_row_chunk(p.l, row, [&](int64_t off, int64_t c, int64_t len) {
                         const T* x = st.read(kInput, off, len);
                         const T* r = st.read(kResidual, off, len);
                         T* y = st.write(kResult, off);
                         if (lanes)
                           run(x, r, y, len, Lanes<T>{center + c}, Lanes<T>{scale + c}, Lanes<T>{shift + c});
                         else
                           run(x, r, y, len, Broadcast<T>(center[c]), Broadcast<T>(scale[c]), Broadcast<T>(shift[c]));
                         st.flush(kResult, off, len);
                       });
                   });
}

// dz and v of a chunk: dz = g * act'(y); v = x - center, or act^-1(y) - r - center from the output.
template <typename T, Act A>
struct Backward {
  using V = Vectorized<T>;
  T param;  // the activation's slope or alpha
  bool from_output;
  template <typename Cen>
  void at(const T* g, const T* x, const T* y, const T* r, int64_t j, int64_t m, const Cen& cen, V& dz, V& v) const {
    if constexpr (A == Act::kNone) {
      dz = load(g, j, m);  // y may be absent
    } else {
      dz = act_grad(A, load(g, j, m), load(y, j, m), param);
    }
    if (from_output) {
      v = act_inverse(A, load(y, j, m), param);
      if (r != nullptr) v = v - load(r, j, m);
      v = v - cen.at(j, m);
    } else {
      v = load(x, j, m) - cen.at(j, m);
    }
  }
};

// dx = a dz + b v + c with explicit fused multiply-adds: a * dz + b * v + c leaves the contraction to the
// compiler, which may fuse differently where the coefficients are constants (the fused kernel) and where
// they are loaded (the elementwise kernel), and the two paths must give the same bits.
template <typename V>
inline V dx_of(const V& a, const V& dz, const V& b, const V& v, const V& c) {
  return at::vec::fmadd(a, dz, at::vec::fmadd(b, v, c));
}

// ---- backward, reduction ----------------------------------------------------------------------------
// One run of a channel (inner > 1): its sums of dz and dz * v added to s1, s2 (float64), dz written to
// the residual's gradient where asked.
template <typename scalar_t, Act A>
void reduce_run(Streams<scalar_t>& st, const Backward<at::opmath_type<scalar_t>, A>& bw, int64_t off, int64_t len,
                at::opmath_type<scalar_t> center, double& s1, double& s2) {
  using T = at::opmath_type<scalar_t>;
  using V = Vectorized<T>;
  const T* g = st.read(kGrad, off, len);
  const T* x = st.read(kInput, off, len);
  const T* y = st.read(kOutput, off, len);
  const T* r = st.read(kResidual, off, len);
  T* dr = st.write(kResult, off);
  const Broadcast<T> cen(center);
  V a1(T(0)), a2(T(0));
  for (int64_t j = 0; j < len; j += V::size()) {
    const int64_t m = std::min<int64_t>(V::size(), len - j);
    V dz, v;
    bw.at(g, x, y, r, j, m, cen, dz, v);
    a1 = a1 + dz;
    a2 = a2 + dz * v;
    if (dr != nullptr) store(dz, dr, j, m);
  }
  st.flush(kResult, off, len);
  __at_align__ T l1[V::size()], l2[V::size()];
  a1.store(l1);
  a2.store(l2);
  T t1 = 0, t2 = 0;
  for (int k = 0; k < V::size(); ++k) t1 += l1[k], t2 += l2[k];
  s1 += double(t1);
  s2 += double(t2);
}

template <typename scalar_t, Act A>
void bwd_reduce_kernel(const BnPass& p, const at::Tensor& sum_dz, const at::Tensor& sum_dzv,
                       const at::Tensor& grad_residual) {
  using T = at::opmath_type<scalar_t>;
  using V = Vectorized<T>;
  const BnLayout& l = p.l;
  const Backward<T, A> bw{T(p.param), p.from_output};
  const T* center = p.center.const_data_ptr<T>();
  const Split s = split_of(l);
  const int64_t C = l.channels;
  const int64_t width = l.inner > 1 ? 1 : C;
  std::vector<double> part1(size_t(s.tasks * width)), part2(part1.size());
  scalar_t* gr = grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, s.tasks, 1, [&](int64_t t0, int64_t t1) {
    Streams<scalar_t> st = streams<scalar_t>(p, kBlock);
    st.out[kResult] = gr;
    std::vector<T> acc1(size_t(std::min(C, kBlock))), acc2(acc1.size());
    for (int64_t t = t0; t < t1; ++t) {
      double* s1 = part1.data() + t * width;
      double* s2 = part2.data() + t * width;
      std::fill(s1, s1 + width, 0.0);
      std::fill(s2, s2 + width, 0.0);
      for_each_task_chunk(l, s, t, [&](int64_t off, int64_t c, int64_t len, int64_t rows) {
        if (l.inner > 1) {
          reduce_run(st, bw, off, len, center[c], s1[0], s2[0]);
          return;
        }
        std::fill(acc1.begin(), acc1.begin() + len, T(0));
        std::fill(acc2.begin(), acc2.begin() + len, T(0));
        const Lanes<T> cen{center + c};
        for (int64_t rr = 0; rr < rows; ++rr) {
          const int64_t o = off + rr * C;
          const T* g = st.read(kGrad, o, len);
          const T* x = st.read(kInput, o, len);
          const T* y = st.read(kOutput, o, len);
          const T* r = st.read(kResidual, o, len);
          T* dr = st.write(kResult, o);
          for (int64_t j = 0; j < len; j += V::size()) {
            const int64_t m = std::min<int64_t>(V::size(), len - j);
            V dz, v;
            bw.at(g, x, y, r, j, m, cen, dz, v);
            store(load(acc1.data(), j, m) + dz, acc1.data(), j, m);
            store(load(acc2.data(), j, m) + dz * v, acc2.data(), j, m);
            if (dr != nullptr) store(dz, dr, j, m);
          }
          st.flush(kResult, o, len);
        }
        for (int64_t j = 0; j < len; ++j) {
          s1[c + j] += double(acc1[j]);
          s2[c + j] += double(acc2[j]);
        }
      });
    }
  });
  T* out1 = sum_dz.mutable_data_ptr<T>();
  T* out2 = sum_dzv.mutable_data_ptr<T>();
  for (int64_t c = 0; c < C; ++c) {
    double a = 0, b = 0;
    for (int64_t q = 0; q < s.parts; ++q) {
      const int64_t k = l.inner > 1 ? c * s.parts + q : q * C + c;
      a += part1[k];
      b += part2[k];
    }
    out1[c] = T(a);
    out2[c] = T(b);
  }
}

// ---- backward, elementwise ----------------------------------------------------------------------------
template <typename scalar_t, Act A>
void bwd_elemt_kernel(const BnPass& p, const at::Tensor& grad_input) {
  using T = at::opmath_type<scalar_t>;
  using V = Vectorized<T>;
  const Backward<T, A> bw{T(p.param), p.from_output};
  const bool training = p.b.defined();
  const T* center = p.center.const_data_ptr<T>();
  const T* ca = p.a.const_data_ptr<T>();
  const T* cb = training ? p.b.const_data_ptr<T>() : nullptr;
  const T* cc = training ? p.c.const_data_ptr<T>() : nullptr;
  scalar_t* dst = grad_input.mutable_data_ptr<scalar_t>();
  const bool lanes = p.l.inner == 1;
  auto run = [&](const T* g, const T* x, const T* y, const T* r, T* dx, int64_t len, const auto& cen, const auto& a,
                 const auto& b, const auto& c) {
    for (int64_t j = 0; j < len; j += V::size()) {
      const int64_t m = std::min<int64_t>(V::size(), len - j);
      if (!training) {
        const V dz =
            A == Act::kNone ? load(g, j, m) : act_grad(A, load(g, j, m), load(y, j, m), bw.param);  // y may be absent
        store(a.at(j, m) * dz, dx, j, m);
        continue;
      }
      V dz, v;
      bw.at(g, x, y, r, j, m, cen, dz, v);
      store(dx_of(a.at(j, m), dz, b.at(j, m), v, c.at(j, m)), dx, j, m);
    }
  };
  const T zero = 0;
  const int64_t rows_total = p.l.inner > 1 ? p.l.outer * p.l.channels : p.l.outer;
  const int64_t len_row = p.l.inner > 1 ? p.l.inner : p.l.channels;
  at::parallel_for(0, rows_total, std::max<int64_t>(1, kGrain / std::max<int64_t>(len_row, 1)),
                   [&](int64_t r0, int64_t r1) {
                     Streams<scalar_t> st = streams<scalar_t>(p, kBlock);
                     st.out[kResult] = dst;
                     for (int64_t row = r0; row < r1; ++row)
                       for_each_row_chunk(p.l, row, [&](int64_t off, int64_t c, int64_t len) {
                         const T* g = st.read(kGrad, off, len);
                         const T* x = training && !p.from_output ? st.read(kInput, off, len) : nullptr;
                         const T* y = st.read(kOutput, off, len);
                         const T* r = training && p.from_output ? st.read(kResidual, off, len) : nullptr;
                         T* dx = st.write(kResult, off);
                         if (lanes)
                           run(g, x, y, r, dx, len, Lanes<T>{center + c}, Lanes<T>{ca + c},
                               Lanes<T>{training ? cb + c : &zero}, Lanes<T>{training ? cc + c : &zero});
                         else
                           run(g, x, y, r, dx, len, Broadcast<T>(center[c]), Broadcast<T>(ca[c]),
                               Broadcast<T>(training ? cb[c] : zero), Broadcast<T>(training ? cc[c] : zero));
                         st.flush(kResult, off, len);
                       });
                   });
}

// ---- backward, both passes channel by channel (NCHW) ----------------------------------------------------
// A task takes whole channels: it reduces one (its parts in the split order, so the sums are the split
// kernels' to the bit), derives the coefficients as the host side does (same operations, same order),
// and writes the channel's dx while its runs are still in L2. torch's CPU backward does the same.
template <typename scalar_t, Act A>
void bwd_fused_kernel(const BnPass& p, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& sum_dz,
                      const at::Tensor& sum_dzv, const at::Tensor& grad_residual, const at::Tensor& grad_input) {
  using T = at::opmath_type<scalar_t>;
  using V = Vectorized<T>;
  const BnLayout& l = p.l;
  const Backward<T, A> bw{T(p.param), p.from_output};
  const T* center = p.center.const_data_ptr<T>();
  const T* is = invstd.const_data_ptr<T>();
  const T* w = weight.defined() ? weight.const_data_ptr<T>() : nullptr;
  T* out1 = sum_dz.mutable_data_ptr<T>();
  T* out2 = sum_dzv.mutable_data_ptr<T>();
  const Split s = split_of(l);
  const T count = T(l.count());
  scalar_t* gr = grad_residual.defined() ? grad_residual.mutable_data_ptr<scalar_t>() : nullptr;
  scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, l.channels, 1, [&](int64_t c0, int64_t c1) {
    Streams<scalar_t> st = streams<scalar_t>(p, kBlock);
    st.out[kResult] = gr;
    st.out[kResult2] = gi;
    for (int64_t c = c0; c < c1; ++c) {
      double a = 0, b = 0;
      for (int64_t part = 0; part < s.parts; ++part) {
        double p1 = 0, p2 = 0;
        for_each_task_chunk(l, s, c * s.parts + part, [&](int64_t off, int64_t, int64_t len, int64_t) {
          reduce_run(st, bw, off, len, center[c], p1, p2);
        });
        a += p1;
        b += p2;
      }
      const T sdz = T(a), sdzv = T(b);
      out1[c] = sdz;
      out2[c] = sdzv;
      // the coefficients, as csrc/batch_norm.h computes them
      const T wc = w != nullptr ? w[c] : T(1);
      const T sdx = p.from_output ? (w != nullptr ? sdzv / wc : sdzv) : sdzv * is[c];
      const T mdz = sdz / count, mdx = sdx / count;
      const T ca = w != nullptr ? wc * is[c] : is[c];
      const T cc = -ca * mdz;
      const T cb = p.from_output ? -is[c] * mdx : -ca * is[c] * mdx;
      const V va(ca), vb(cb), vc(cc);
      const Broadcast<T> cen(center[c]);
      for (int64_t o = 0; o < l.outer; ++o)
        for (int64_t i = 0; i < l.inner; i += kBlock) {
          const int64_t off = (o * l.channels + c) * l.inner + i, len = std::min(kBlock, l.inner - i);
          const T* g = st.read(kGrad, off, len);
          const T* x = st.read(kInput, off, len);
          const T* y = st.read(kOutput, off, len);
          const T* r = st.read(kResidual, off, len);
          T* dx = st.write(kResult2, off);
          for (int64_t j = 0; j < len; j += V::size()) {
            const int64_t m = std::min<int64_t>(V::size(), len - j);
            V dz, v;
            bw.at(g, x, y, r, j, m, cen, dz, v);
            store(dx_of(va, dz, vb, v, vc), dx, j, m);
          }
          st.flush(kResult2, off, len);
        }
    }
  });
}

// Channels whose runs (per stream) fit this budget are done by bwd_fused_kernel: a second look at
// them is an L2 hit. A shape-only rule, so the results never depend on the thread count.
constexpr int64_t kFusedChannelBytes = int64_t(1) << 20;

// One instantiation per dtype and activation.
template <template <typename, Act> class K, typename... Args>
void dispatch_act(at::ScalarType dtype, Act act, Args&&... args) {
  PYOPS_DISPATCH_FLOATING(dtype, [&] {
    switch (act) {
      case Act::kRelu:
        return K<scalar_t, Act::kRelu>::run(args...);
      case Act::kLeakyRelu:
        return K<scalar_t, Act::kLeakyRelu>::run(args...);
      case Act::kElu:
        return K<scalar_t, Act::kElu>::run(args...);
      default:
        return K<scalar_t, Act::kNone>::run(args...);
    }
  });
}

template <typename scalar_t, Act A>
struct Elemt {
  static void run(const BnPass& p, const at::Tensor& out) { elemt_kernel<scalar_t, A>(p, out); }
};
template <typename scalar_t, Act A>
struct BwdReduce {
  static void run(const BnPass& p, const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& gr) {
    bwd_reduce_kernel<scalar_t, A>(p, s1, s2, gr);
  }
};
template <typename scalar_t, Act A>
struct BwdFused {
  static void run(const BnPass& p, const at::Tensor& is, const at::Tensor& w, const at::Tensor& s1,
                  const at::Tensor& s2, const at::Tensor& gr, const at::Tensor& gi) {
    bwd_fused_kernel<scalar_t, A>(p, is, w, s1, s2, gr, gi);
  }
};
template <typename scalar_t, Act A>
struct BwdElemt {
  static void run(const BnPass& p, const at::Tensor& gi) { bwd_elemt_kernel<scalar_t, A>(p, gi); }
};

struct Cpu {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  static void stats(const at::Tensor& x, const BnLayout& l, const at::Tensor& mean, const at::Tensor& var) {
    PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] { stats_kernel<scalar_t>(x, l, mean, var); });
  }
  static void elemt(const BnPass& p, const at::Tensor& out) { dispatch_act<Elemt>(out.scalar_type(), p.act, p, out); }
  static void bwd_reduce(const BnPass& p, const at::Tensor& s1, const at::Tensor& s2, const at::Tensor& gr) {
    dispatch_act<BwdReduce>(p.grad.scalar_type(), p.act, p, s1, s2, gr);
  }
  static void bwd_elemt(const BnPass& p, const at::Tensor& gi) {
    dispatch_act<BwdElemt>(gi.scalar_type(), p.act, p, gi);
  }
  // Both backward passes at once where a channel's runs fit kFusedChannelBytes (NCHW); false: not taken.
  static bool bwd_fused(const BnPass& p, const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& s1,
                        const at::Tensor& s2, const at::Tensor& gr, const at::Tensor& gi) {
    if (p.l.inner <= 1 || p.l.count() * int64_t(gi.element_size()) > kFusedChannelBytes) return false;
    dispatch_act<BwdFused>(gi.scalar_type(), p.act, p, invstd, weight, s1, s2, gr, gi);
    return true;
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_BATCH_NORM(m, ::pyops::Cpu, ""); }

}  // namespace pyops
