// CPU kernels of the activation family: one template per op over the four dtypes, vectorized
// with at::vec and split over threads with at::parallel_for. Elementwise kernels walk memory
// order (see DenseLike); the host side is csrc/activation.h, the math of each op is documented in
// pyops/ops/activation.py.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <unistd.h>

#include <cstring>
#include <type_traits>

#include "activation.h"
#include "common/act.h"
#include "common/checks.h"
#include "common/dispatch.h"
#include "common/vec.h"

namespace pyops {
namespace {

using at::vec::Vectorized;

constexpr int64_t kGrain = 32768;  // elements per task (torch's at::internal::GRAIN_SIZE)

// ---- ReLU / LeakyReLU: out = pass(x) ? x : out_other(x), and a 1-bit mask pass(x) ---------------
// pass(x) is where the gradient flows unchanged, as torch decides it: relu's backward tests the
// output (!(y <= 0), so NaN passes), leaky_relu's the input (x > 0, so NaN takes the slope).
// Blocks of 64 elements fill one uint64 of mask; float16/bfloat16 go through a float buffer.
constexpr int64_t kBlock = kMaskBlock;

// Outputs past 3/4 of the last-level cache (glibc's memcpy rule) cannot stay cached for their reader,
// so they are written with streaming stores: one write to memory instead of a read-for-ownership
// plus a write. Measured (32 MB L3): streaming 1M-element outputs made relu slower; streaming
// 4M-element ones (16 MB) as well gave relu's fwd+bwd nothing beyond the noise and made sigmoid's
// 10% slower (its backward reads the output back). So the rule stays glibc's.
inline bool stream_output(const void* out, int64_t bytes) {
  static const int64_t threshold = [] {
    const long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    return (l3 > 0 ? int64_t(l3) : int64_t(32) << 20) * 3 / 4;
  }();
  return bytes >= threshold && reinterpret_cast<uintptr_t>(out) % 64 == 0;
}

// body(src, dst, b) for every whole block b of 64 elements, in parallel; src and dst are the block's
// input and output as opmath_t (float16/bfloat16 go through stack buffers). Returns the elements done.
template <typename scalar_t, typename Body>
int64_t for_each_block(const scalar_t* in, scalar_t* out, int64_t n, bool stream, const Body& body) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int64_t nblocks = n / kBlock;
  at::parallel_for(0, nblocks, kGrain / kBlock, [&](int64_t b0, int64_t b1) {
    __at_align__ opmath_t in_buf[kBlock];
    __at_align__ opmath_t out_buf[kBlock];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t base = b * kBlock;
      if constexpr (std::is_same_v<scalar_t, opmath_t>) {
        body(in + base, out + base, b);
      } else {
        at::vec::convert(in + base, in_buf, kBlock);
        body(in_buf, out_buf, b);
        at::vec::convert(out_buf, out + base, kBlock);
      }
    }
    if (stream) vec::sfence();
  });
  return nblocks * kBlock;
}

template <typename scalar_t>
bool stream_elements(const scalar_t* out, int64_t n) {  // float16/bfloat16 stores go through convert
  return std::is_same_v<scalar_t, at::opmath_type<scalar_t>> &&
         stream_output(static_cast<const void*>(out), n * int64_t(sizeof(scalar_t)));
}

template <typename scalar_t, typename Op>
void masked_forward(const scalar_t* x, scalar_t* out, uint8_t* mask, int64_t n, const Op& op) {
  using opmath_t = at::opmath_type<scalar_t>;
  using fVec = Vectorized<opmath_t>;
  const bool stream = stream_elements(out, n);
  const int64_t done = for_each_block(x, out, n, stream, [&](const opmath_t* src, opmath_t* dst, int64_t b) {
    store_mask_word(mask, b, mask_word<opmath_t>([&](int64_t j) {
                      const fVec v = fVec::loadu(src + j);
                      const fVec pass = act_pass(op.act, v);
                      vec::store(fVec::blendv(op.out_other(v), v, pass), dst + j, stream);
                      return pass;
                    }));
  });
  mask_tail(mask, done, n, [&](int64_t i) {  // the last < 64 elements
    const opmath_t v = x[i];
    const bool pass = act_pass(op.act, v);
    out[i] = pass ? v : op.out_other(v);
    return pass;
  });
}

// grad_in = bit ? g : grad_other(g)
template <typename scalar_t, typename Op>
void masked_backward(const scalar_t* g, const uint8_t* mask, scalar_t* gi, int64_t n, const Op& op) {
  using opmath_t = at::opmath_type<scalar_t>;
  using fVec = Vectorized<opmath_t>;
  constexpr uint64_t kLaneBits = (uint64_t(1) << fVec::size()) - 1;
  const bool stream = stream_elements(gi, n);
  const int64_t done = for_each_block(g, gi, n, stream, [&](const opmath_t* src, opmath_t* dst, int64_t b) {
    const uint64_t bits = load_mask_word(mask, b);
    for (int64_t j = 0; j < kBlock; j += fVec::size()) {
      const fVec v = fVec::loadu(src + j);
      const fVec pass = vec::expand_bits<opmath_t>(uint32_t((bits >> j) & kLaneBits));
      vec::store(fVec::blendv(op.grad_other(v), v, pass), dst + j, stream);
    }
  });
  for (int64_t i = done; i < n; ++i) {
    const opmath_t v = g[i];
    gi[i] = ((mask[i / 8] >> (i % 8)) & 1) ? v : op.grad_other(v);
  }
}

// ---- pointwise ops through at::vec::map / map2 (Vectorized<opmath_t> lambdas) ------------------
// map/map2 convert float16/bfloat16 to float vectors when the lambda takes only Vectorized<opmath_t>
// (a lambda that also takes Vectorized<Half> would compute, and round, in half precision).
template <typename Fn>
void unary_map(const at::Tensor& in, const at::Tensor& out, const Fn& fn) {
  PYOPS_DISPATCH_FLOATING(in.scalar_type(), [&] {
    const scalar_t* src = in.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, in.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      using V = Vectorized<at::opmath_type<scalar_t>>;
      at::vec::map([&](V x) -> V { return fn(x); }, dst + i0, src + i0, i1 - i0);
    });
  });
}

template <typename Fn>
void binary_map(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, const Fn& fn) {
  PYOPS_DISPATCH_FLOATING(a.scalar_type(), [&] {
    const scalar_t* pa = a.const_data_ptr<scalar_t>();
    const scalar_t* pb = b.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, a.numel(), kGrain, [&](int64_t i0, int64_t i1) {
      using V = Vectorized<at::opmath_type<scalar_t>>;
      at::vec::map2([&](V x, V y) -> V { return fn(x, y); }, dst + i0, pa + i0, pb + i0, i1 - i0);
    });
  });
}

// The math of each op, for the device struct below (csrc/activation.h); the activations shared with
// conv2d and batch_norm come from common/act.h.
struct Math {
  // Scalar and Vectorized forms of each op's other branch; the pass test is act_pass(act, v).
  struct Relu {  // NaN passes (and stays NaN); every other non-positive value -> 0; gradient too
    static constexpr Act act = Act::kRelu;
    // the output where x <= 0: 0, but -0.0 stays itself (torch's relu is x < 0 ? 0 : x)
    template <typename T>
    T out_other(T v) const {
      return v == T(0) ? v : T(0);
    }
    template <typename T>
    Vectorized<T> out_other(const Vectorized<T>& v) const {
      return v & (v == Vectorized<T>(0));
    }
    template <typename T>
    T grad_other(T) const {
      return T(0);
    }
    template <typename T>
    Vectorized<T> grad_other(const Vectorized<T>&) const {
      return Vectorized<T>(0);
    }
  };
  struct Leaky {  // forward's and gradient's other branch: * slope
    static constexpr Act act = Act::kLeakyRelu;
    double slope;
    template <typename T>
    T out_other(T v) const {
      return v * T(slope);
    }
    template <typename T>
    Vectorized<T> out_other(const Vectorized<T>& v) const {
      return v * Vectorized<T>(T(slope));
    }
    template <typename T>
    T grad_other(T v) const {
      return out_other(v);
    }
    template <typename T>
    Vectorized<T> grad_other(const Vectorized<T>& v) const {
      return out_other(v);
    }
  };

  // The math of the elementwise ops, on Vectorized<opmath_t>.
  struct Elu {
    double alpha;
    template <typename T>
    Vectorized<T> operator()(const Vectorized<T>& x) const {
      return act_forward(Act::kElu, x, T(alpha));
    }
  };
  struct EluBwdResult {  // saved = out: d out / dx = out + alpha where out <= 0
    double alpha;
    template <typename T>
    Vectorized<T> operator()(const Vectorized<T>& g, const Vectorized<T>& y) const {
      return act_grad(Act::kElu, g, y, T(alpha));
    }
  };
  struct EluBwdInput {  // saved = input
    double alpha;
    template <typename T>
    Vectorized<T> operator()(const Vectorized<T>& g, const Vectorized<T>& x) const {
      return Vectorized<T>::blendv(g, g * Vectorized<T>(T(alpha)) * x.exp(), x <= Vectorized<T>(0));
    }
  };
  struct Sigmoid {
    template <typename T>
    Vectorized<T> operator()(const Vectorized<T>& x) const {
      return (Vectorized<T>(1) + x.neg().exp()).reciprocal();
    }
  };
  struct SigmoidBwd {
    template <typename T>
    Vectorized<T> operator()(const Vectorized<T>& g, const Vectorized<T>& y) const {
      return g * (Vectorized<T>(1) - y) * y;
    }
  };
  struct Tanh {
    template <typename T>
    Vectorized<T> operator()(const Vectorized<T>& x) const {
      return x.tanh();
    }
  };
  struct TanhBwd {
    template <typename T>
    Vectorized<T> operator()(const Vectorized<T>& g, const Vectorized<T>& y) const {
      return g * (Vectorized<T>(1) - y * y);
    }
  };
};

// ---- Maxout: out[o, j, i] = max_k x[o, j * pieces + k, i]; index of the first maximum ---------
// NaN wins (torch.max propagates it), the first NaN included.
// Adjacent pieces (inner == 1, e.g. maxout over the last dim): Vectorized<T>::size() groups at a
// time, piece k of each group gathered with stride `pieces`. Returns the groups it handled.
template <typename scalar_t>
int64_t maxout_adjacent_vec(const scalar_t* x, scalar_t* out, uint8_t* idx, int64_t g0, int64_t g1, int64_t pieces) {
  if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, double>) {
    using V = Vectorized<scalar_t>;
    using IV = Vectorized<at::vec::int_same_size_t<scalar_t>>;
    constexpr int64_t L = V::size();
    const IV stride = IV::arange(0, pieces);
    __at_align__ scalar_t lanes[L];
    int64_t g = g0;
    for (; g + L <= g1; g += L) {
      const scalar_t* src = x + g * pieces;
      V best = at::vec::gather<sizeof(scalar_t)>(src, stride);
      V bi(0);
      for (int64_t k = 1; k < pieces; ++k) {
        const V v = at::vec::gather<sizeof(scalar_t)>(src + k, stride);
        const V take = (v > best) | ((v != v) & (best == best));  // first maximum; NaN propagates
        best = V::blendv(best, v, take);
        bi = V::blendv(bi, V(scalar_t(k)), take);
      }
      best.store(out + g);
      bi.store(lanes);
      for (int64_t i = 0; i < L; ++i) idx[g + i] = uint8_t(lanes[i]);
    }
    return g - g0;
  } else {
    return 0;
  }
}

void maxout_forward(const at::Tensor& x, const at::Tensor& out, const at::Tensor& idx, const MaxoutShape& s,
                    int64_t pieces) {
  const int64_t groups = s.outer * (s.channels / pieces);
  PYOPS_DISPATCH_FLOATING(x.scalar_type(), [&] {
    const scalar_t* px = x.const_data_ptr<scalar_t>();
    scalar_t* po = out.mutable_data_ptr<scalar_t>();
    uint8_t* pi = idx.mutable_data_ptr<uint8_t>();
    const int64_t inner = s.inner;
    at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / (inner * pieces)), [&](int64_t g0, int64_t g1) {
      if (inner == 1 && pieces > 1) g0 += maxout_adjacent_vec(px, po, pi, g0, g1, pieces);
      for (int64_t g = g0; g < g1; ++g) {  // g = o * (channels / pieces) + j
        const scalar_t* src = px + g * pieces * inner;
        scalar_t* dst = po + g * inner;
        uint8_t* di = pi + g * inner;
        if (inner == 1) {  // pieces adjacent: keep the running maximum in registers
          scalar_t best = src[0];
          uint8_t bi = 0;
          for (int64_t k = 1; k < pieces; ++k) {
            const scalar_t v = src[k];
            const bool take = v > best || (v != v && best == best);
            best = take ? v : best;
            bi = take ? uint8_t(k) : bi;
          }
          *dst = best;
          *di = bi;
          continue;
        }
        for (int64_t i = 0; i < inner; ++i) {
          dst[i] = src[i];
          di[i] = 0;
        }
        for (int64_t k = 1; k < pieces; ++k) {
          const scalar_t* row = src + k * inner;
          for (int64_t i = 0; i < inner; ++i) {
            const scalar_t v = row[i], best = dst[i];
            const bool take = v > best || (v != v && best == best);
            dst[i] = take ? v : best;
            di[i] = take ? uint8_t(k) : di[i];
          }
        }
      }
    });
  });
}

void maxout_backward(const at::Tensor& g, const at::Tensor& idx, const at::Tensor& gi, const MaxoutShape& s,
                     int64_t pieces) {
  const int64_t groups = s.outer * (s.channels / pieces);
  PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
    const scalar_t* pg = g.const_data_ptr<scalar_t>();
    const uint8_t* pi = idx.const_data_ptr<uint8_t>();
    scalar_t* po = gi.mutable_data_ptr<scalar_t>();
    const int64_t inner = s.inner;
    at::parallel_for(0, groups, std::max<int64_t>(1, kGrain / (inner * pieces)), [&](int64_t g0, int64_t g1) {
      // zero the chunk's rows (a vectorized fill), then put each gradient at its chosen piece
      std::fill(po + g0 * pieces * inner, po + g1 * pieces * inner, scalar_t(0));
      for (int64_t grp = g0; grp < g1; ++grp) {
        const scalar_t* src = pg + grp * inner;
        const uint8_t* si = pi + grp * inner;
        scalar_t* dst = po + grp * pieces * inner;
        for (int64_t i = 0; i < inner; ++i)
          if (si[i] < pieces) dst[si[i] * inner + i] = src[i];  // a corrupt index writes nothing
      }
    });
  });
}

// The CPU device of csrc/activation.h.
struct Cpu : Math {
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  template <typename Op>
  static void masked_forward(const at::Tensor& in, const at::Tensor& out, const at::Tensor& mask, const Op& op) {
    PYOPS_DISPATCH_FLOATING(in.scalar_type(), [&] {
      pyops::masked_forward(in.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                            mask.mutable_data_ptr<uint8_t>(), in.numel(), op);
    });
  }
  template <typename Op>
  static void masked_backward(const at::Tensor& g, const at::Tensor& mask, const at::Tensor& gi, const Op& op) {
    PYOPS_DISPATCH_FLOATING(g.scalar_type(), [&] {
      pyops::masked_backward(g.const_data_ptr<scalar_t>(), mask.const_data_ptr<uint8_t>(),
                             gi.mutable_data_ptr<scalar_t>(), g.numel(), op);
    });
  }
  template <typename F>
  static void unary(const at::Tensor& in, const at::Tensor& out, const F& f) {
    unary_map(in, out, f);
  }
  template <typename F>
  static void binary(const at::Tensor& a, const at::Tensor& b, const at::Tensor& out, const F& f) {
    binary_map(a, b, out, f);
  }
  static void maxout_forward(const at::Tensor& x, const at::Tensor& out, const at::Tensor& idx, const MaxoutShape& s,
                             int64_t pieces) {
    pyops::maxout_forward(x, out, idx, s, pieces);
  }
  static void maxout_backward(const at::Tensor& g, const at::Tensor& idx, const at::Tensor& gi, const MaxoutShape& s,
                              int64_t pieces) {
    pyops::maxout_backward(g, idx, gi, s, pieces);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) { PYOPS_REGISTER_ACTIVATION(m, ::pyops::Cpu, ""); }

}  // namespace pyops
