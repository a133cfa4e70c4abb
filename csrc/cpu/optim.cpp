// CPU kernels of the optim family (the CPU device of csrc/optim.h): one pass over every tensor of a
// parameter group, each element read and written once, in parallel over a table of chunks across
// all tensors when the group is large enough to repay the threads. The math follows torch.optim's
// for-loop implementations; see pyops/optim/fused.py.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#if defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <optional>
#include <vector>

#include "common/dispatch.h"
#include "common/stochastic_round.h"
#include "optim.h"

namespace pyops {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per task
// Below this many elements in a group the step runs on the calling thread: waking the pool costs more
// than it saves (62 tensors of 64 elements: 10 us serial; a parallel region's wake-up alone is several
// microseconds and, on a loaded machine, can stall for milliseconds).
constexpr int64_t kParallelMinElements = 1 << 15;

struct Chunk {
  int64_t tensor, begin, end;
};

std::vector<Chunk> chunk_table(at::TensorList params, int64_t* total) {
  std::vector<Chunk> table;
  *total = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    *total += n;
    for (int64_t b = 0; b < n; b += kChunk) table.push_back({int64_t(i), b, std::min(n, b + kChunk)});
  }
  return table;
}

// The grad scaler's contract: found_inf set -> skip; else gradients scaled by 1 / grad_scale. On the
// CPU these tensors are read directly (no device synchronisation).
double scalar_value(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? *t.const_data_ptr<double>() : double(*t.const_data_ptr<float>());
}
bool skip_step(const GroupStep& s) { return has(s.found_inf) && scalar_value(*s.found_inf) != 0; }

// lr and the grad scaler's factor, read once per step.
struct StepScalars {
  double lr, inv;
  bool unscale, lr_is_float;
};
StepScalars step_scalars(const GroupStep& s) {
  const bool unscale = has(s.grad_scale);
  return {scalar_value(s.lr), unscale ? 1.0 / scalar_value(*s.grad_scale) : 1.0, unscale,
          s.lr.scalar_type() == at::kFloat};
}

// One body serves the vector loop and the scalar tail: W is Vectorized<opmath_t> (float and double
// tensors) or opmath_t itself, and these helpers load, store and compute on either.
using at::vec::Vectorized;
// (A bfloat16 state of float32 parameters, Adam's state_dtype=torch.bfloat16, loads to and stores from
// float vectors; the store rounds to nearest even, as torch's conversion.)
template <typename W, typename T>
W ld(const T* p) {
  if constexpr (std::is_arithmetic_v<W>) {
    return W(*p);
  } else if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<W, Vectorized<float>>) {
    W out;
    at::vec::load_fp32_from_bf16(p, out);
    return out;
  } else {
    return W::loadu(p);
  }
}
template <typename T, typename W>
void st(T* p, const W& v) {
  if constexpr (std::is_arithmetic_v<W>) {
    *p = T(v);
  } else if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<W, Vectorized<float>>) {
#if defined(CPU_CAPABILITY_AVX512)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), at::vec::cvtfp32_bf16(__m512(v)));  // a partial store copies
#else
    at::vec::convert_float_bfloat16(v, v).store(p, W::size());
#endif
  } else {
    v.store(p);
  }
}
template <typename T>
T sqrt_(T x) {
  return std::sqrt(x);
}
template <typename T>
Vectorized<T> sqrt_(const Vectorized<T>& x) {
  return x.sqrt();
}
template <typename T>
T maximum_(T a, T b) {
  return a != a ? a : (b != b ? b : std::max(a, b));
}  // NaN wins, as torch.maximum
template <typename T>
Vectorized<T> maximum_(const Vectorized<T>& a, const Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}

// A parameter's new value, stored as every optimizer stores it: rounded to nearest, or for bfloat16
// parameters under bf16_stochastic_round stochastically (csrc/common/stochastic_round.h; bfloat16
// takes the scalar loop, so v is a float there).
struct ParamStore {
  bool stochastic;
  uint64_t seed;
  explicit ParamStore(const GroupStep& s) : stochastic(s.stochastic_round), seed(uint64_t(s.seed)) {}

  // The key of a tensor's random bits, once per chunk.
  uint32_t key(int64_t tensor) const { return stochastic ? stochastic_round_key(seed, uint64_t(tensor)) : 0; }

  template <typename T, typename W>
  void operator()(T* p, uint32_t key, int64_t j, const W& v) const {
    if constexpr (std::is_same_v<T, at::BFloat16> && std::is_arithmetic_v<W>) {
      if (stochastic) {
        p[j] = c10::BFloat16(bfloat16_round_stochastic(float(v), stochastic_round_bits(key, uint64_t(j))),
                             c10::BFloat16::from_bits());
        return;
      }
    }
    st(p + j, v);
  }
};

// v as stored in a T tensor and read back: itself unless T rounds (float16/bfloat16), so that the
// update uses what the state holds, as torch's does, without reloading it where nothing rounds.
template <typename T, typename W>
W stored(T* p, const W& v) {
  st(p, v);
  if constexpr (std::is_same_v<T, at::opmath_type<T>>) {
    return v;
  } else {
    return ld<W>(p);
  }
}

// The gradient at j as the update uses it: unscaled (and written back so), negated to maximize.
template <typename W, typename T, typename O>
W grad_at(T* g, int64_t j, const StepScalars& sc, bool maximize) {
  W gj = ld<W>(g + j);
  if (sc.unscale) gj = stored(g + j, gj * W(O(sc.inv)));  // the update uses the gradient as written back
  return maximize ? W(0) - gj : gj;
}

// body(j, W{}) for j in [begin, end): whole vectors first where the tensor's type is its opmath type.
template <typename T, typename Body>
void for_elements(int64_t begin, int64_t end, const Body& body) {
  using opmath_t = at::opmath_type<T>;
  int64_t j = begin;
  if constexpr (std::is_same_v<T, opmath_t>) {
    using V = Vectorized<T>;
    for (; j + V::size() <= end; j += V::size()) body(j, V());
  }
  for (; j < end; ++j) body(j, opmath_t());
}

// step_t += 1 and its new value, read and written in place (steps are checked one-element float32
// or float64 CPU tensors): an op dispatch per tensor cost ~3 ms of a 10 ms Adam step on 1000 tensors.
double increment_step(const at::Tensor& step) {
  if (step.scalar_type() == at::kDouble) return ++*step.mutable_data_ptr<double>();
  float* v = step.mutable_data_ptr<float>();
  *v += 1.0f;
  return *v;
}

template <typename T>
T* ptr(at::TensorList list, int64_t i) {
  return list.empty() ? nullptr : list[i].mutable_data_ptr<T>();
}

// Runs body(scalar_t*, chunk) for every chunk of the group, dtype dispatched; in parallel when the
// group is large.
template <typename Body>
void for_each_chunk(at::TensorList params, const Body& body) {
  int64_t total = 0;
  const auto table = chunk_table(params, &total);
  if (table.empty()) return;
  PYOPS_DISPATCH_FLOATING(params[0].scalar_type(), [&] {
    auto run = [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) body(static_cast<scalar_t*>(nullptr), table[c]);
    };
    if (total < kParallelMinElements) {
      run(0, int64_t(table.size()));
    } else {
      at::parallel_for(0, int64_t(table.size()), 1, run);
    }
  });
}

// ---- 8-bit blockwise states (Adam8bitStep, csrc/optim.h) ------------------------------------------
// A map's quantizer: code(y) = the number of midpoints mid[c] = (q[c] + q[c+1]) / 2 (float32) below y,
// i.e. the nearest map value, ties to the lower one (a NaN y, in a block whose absmax is NaN, takes any
// code). Three paths give that same code:
//   - whole blocks of float32 parameters on AVX512-VBMI machines (adam_8bit_block_vbmi): the maps looked
//     up 64 codes at a time by byte permutes, and the code found from the dynamic maps' decade structure
//     (Quantizer::guess_of) and two or three midpoint comparisons;
//   - other AVX-512 machines, and maps whose decade guess fails its check (adam_8bit_block): 32-bit
//     gathers, and a first guess from a table indexed by y's sign, exponent and kBucketBits leading
//     mantissa bits (each such bucket holds at most kRefine midpoints), then kRefine comparisons;
//   - the rest (other dtypes, tails, other CPUs, maps neither guess fits): a binary search.
constexpr int kBucketBits = 7;
constexpr int kRefine = 1;  // enough for the dynamic maps with kBucketBits = 7 (each bucket holds at most one midpoint)
constexpr int kTopExponent = 127;                   // |y| < 2: y = x / absmax with |x| <= absmax, rounded
constexpr int kBottomExponent = kTopExponent - 24;  // below 2^-24 every bucket is the one of 0 for these maps
constexpr int kRows = kTopExponent - kBottomExponent + 1;
constexpr int kBuckets = 2 * kRows << kBucketBits;

inline int32_t bucket_of(float y) {
  uint32_t bits;
  std::memcpy(&bits, &y, sizeof bits);
  const int32_t sign = int32_t(bits >> 31);
  int32_t e = int32_t((bits >> 23) & 0xff), m = int32_t((bits >> (23 - kBucketBits)) & ((1 << kBucketBits) - 1));
  if (e < kBottomExponent) e = kBottomExponent, m = 0;
  if (e > kTopExponent) e = kTopExponent, m = (1 << kBucketBits) - 1;
  return ((sign * kRows + e - kBottomExponent) << kBucketBits) | m;
}

struct Quantizer {
  float q[kQuantMapSize];
  float mid[kQuantMapSize + kRefine];  // +inf past the last midpoint
  uint8_t guess[kBuckets + 3];         // 4-byte gathers read 3 bytes past the last bucket
  // q and mid as byte planes (plane k: byte k of each value) for 64-lane byte-permute lookups
  alignas(64) uint8_t q_planes[4][kQuantMapSize], mid_planes[4][kQuantMapSize];
  bool fast = true;
  // The decade guess (the dynamic maps' structure: decade i = 10^(i-6) [0.1, 1) holds n_i = 2^i (signed) or
  // 2^(i+1) values, evenly spaced): for a = |y|, i = #{k: a >= 10^(k-7)}, g = offset_i + floor((a 10^(6-i) -
  // 0.1) n_i / 0.9) + base, and the code is within [h - 1, h + 2] of h = g + 1 (y >= 0) or 252 - g (y < 0,
  // the signed map's mirror image). Checked against the search at every point where either can change
  // (guess_ok); a map where it fails takes the table path.
  static constexpr int kDecades = 7;
  float decade_floor[kDecades - 1], decade_scale[kDecades], decade_rate[kDecades], decade_offset[kDecades];
  bool is_signed = false, guess_ok = false;

  explicit Quantizer(const float* map) {
    std::copy(map, map + kQuantMapSize, q);
    for (int c = 0; c + 1 < kQuantMapSize; ++c) mid[c] = (q[c] + q[c + 1]) * 0.5f;
    for (int c = kQuantMapSize - 1; c < kQuantMapSize + kRefine; ++c) mid[c] = INFINITY;
    for (int c = 0; c < kQuantMapSize; ++c) {
      uint32_t qb, mb;
      std::memcpy(&qb, q + c, sizeof qb);
      std::memcpy(&mb, mid + c, sizeof mb);
      for (int k = 0; k < 4; ++k) q_planes[k][c] = uint8_t(qb >> (8 * k)), mid_planes[k][c] = uint8_t(mb >> (8 * k));
    }
    std::fill(guess, guess + sizeof guess, 0);
    for (int b = 0; b < kBuckets; ++b) {  // the bucket's y range, bounds included
      const int m = b & ((1 << kBucketBits) - 1), row = b >> kBucketBits;
      const int e = row % kRows + kBottomExponent;
      const bool negative = row >= kRows;
      double lo = std::ldexp(1.0 + double(m) / (1 << kBucketBits), e - 127);
      double hi = std::ldexp(1.0 + double(m + 1) / (1 << kBucketBits), e - 127);
      if (e == kBottomExponent && m == 0) lo = 0;
      if (e == kTopExponent && m == (1 << kBucketBits) - 1) hi = INFINITY;
      const double ymin = negative ? -hi : lo, ymax = negative ? -lo : hi;
      const int c_min = count_below(ymin), c_max = count_below(ymax);
      guess[b] = uint8_t(std::min<int64_t>(c_min, kQuantMapSize - 1));
      fast = fast && c_max - c_min <= kRefine;
    }
    is_signed = q[0] < 0;
    for (int i = 0; i < kDecades; ++i) {
      const double n = is_signed ? std::ldexp(1.0, i) : std::ldexp(1.0, i + 1);
      if (i > 0) decade_floor[i - 1] = float(std::pow(10.0, i - 7));
      decade_scale[i] = float(std::pow(10.0, 6 - i));
      decade_rate[i] = float(n) / 0.9f;
      decade_offset[i] = float(n - (is_signed ? 1 : 2));
    }
    guess_ok = check_guess();
  }
  // h of y (see above), the scalar twin of the vector code's.
  int guess_of(float y) const {
    const float a = std::abs(y);
    int i = 0;
    for (int k = 0; k < kDecades - 1; ++k) i += a >= decade_floor[k];
    const float u = a * decade_scale[i];
    const float pos = (u - 0.1f) * decade_rate[i];
    float gf = decade_offset[i] + std::floor(pos);
    gf = std::min(std::max(gf, 0.0f), float(is_signed ? 127 : 254));  // NaN -> 0
    const int g = int(gf) + (is_signed ? 127 : 0);
    const int h = !std::signbit(y) ? g + 1 : is_signed ? 252 - g : 1;  // unsigned: every y <= -0 has code 0
    return std::min(std::max(h, 1), int(kQuantMapSize) - refine());
  }
  // Midpoint comparisons the code needs after the guess: [h - 1, h - 1 + refine()] holds it (the signed
  // map's negative half, the mirror image, needs one more than y >= 0).
  int refine() const { return is_signed ? 3 : 2; }
  bool guess_fits(float y) const {
    const int h = guess_of(y), c = code(y);
    return c >= h - 1 && c <= h - 1 + refine();
  }
  // The guess and the search change only near a midpoint, a decade floor or a point where floor(pos)
  // steps: every float within kNear units in the last place of one, and one point between each, is tried.
  bool check_guess() const {
    constexpr int kNear = 8;
    std::vector<float> critical(mid, mid + kQuantMapSize - 1);
    for (int i = 0; i < kDecades; ++i) {
      if (i > 0) critical.push_back(decade_floor[i - 1]);
      for (int j = 0; j <= int(decade_offset[i]) + 3; ++j)
        critical.push_back(float((double(j) / decade_rate[i] + 0.1) / decade_scale[i]));
    }
    critical.push_back(1.0f);
    critical.push_back(2.0f);
    std::vector<float> points;
    for (float c : critical) {
      c = std::abs(c);
      float lo = c, hi = c;
      for (int k = 0; k < kNear; ++k) lo = std::nextafter(lo, 0.0f), hi = std::nextafter(hi, INFINITY);
      for (float x = lo; x <= hi; x = std::nextafter(x, INFINITY)) points.push_back(x);
    }
    std::sort(points.begin(), points.end());
    const size_t n = points.size();
    for (size_t k = 0; k + 1 < n; ++k) points.push_back(points[k] + (points[k + 1] - points[k]) * 0.5f);
    for (float x : {0.0f, 1e-30f, 1e-12f, 1e-9f, 3.0f, 1e30f, INFINITY}) points.push_back(x);
    for (float x : points)
      if (!guess_fits(x) || !guess_fits(-x)) return false;
    return true;
  }
  int count_below(double y) const {  // midpoints below y
    return int(std::lower_bound(mid, mid + kQuantMapSize - 1, y, [](float a, double v) { return a < v; }) - mid);
  }
  uint8_t code(float y) const { return uint8_t(std::lower_bound(mid, mid + kQuantMapSize - 1, y) - mid); }
};

// The quantizers of the last maps this thread saw (maps rarely change: one pair per optimizer).
std::shared_ptr<const Quantizer> quantizer_of(const at::Tensor& map, const char* name) {
  thread_local std::vector<std::shared_ptr<const Quantizer>> cache;
  const float* values = map.const_data_ptr<float>();
  for (const auto& qz : cache)
    if (std::memcmp(qz->q, values, sizeof qz->q) == 0) return qz;
  for (int c = 0; c < kQuantMapSize; ++c)
    TORCH_CHECK(std::isfinite(values[c]) && (c == 0 || values[c - 1] <= values[c]), "pyops::adam_step_8bit_: ", name,
                " must hold finite values sorted ascending, got ", values[c], " at ", c,
                c > 0 ? c10::str(" after ", values[c - 1]) : std::string());
  if (cache.size() >= 4) cache.erase(cache.begin());
  cache.push_back(std::make_shared<const Quantizer>(values));
  return cache.back();
}

struct Adam8bitScalars {
  StepScalars sc;
  double decay, weight_decay, eps, beta1, beta2;
  bool decoupled, maximize;
};

// One block of n <= kQuantBlock elements, in memory order: dequantize, Adam's float update (the float32
// kernel's expressions, in opmath_t), the new absmaxs, requantize. Elements [0, nv) take the vector path.
template <typename T>
void adam_8bit_block(T* p, T* g, uint8_t* mc, uint8_t* vc, float* ma, float* va, int64_t n, const Quantizer& qs,
                     const Quantizer& qu, const Adam8bitScalars& k, double step_size, double inv_bc2) {
  using opmath_t = at::opmath_type<T>;
  const StepScalars& sc = k.sc;
  const opmath_t b1 = k.beta1, b2 = k.beta2, ss = step_size, inv_bc2_t = inv_bc2;
  const opmath_t one_b1 = 1 - b1, one_b2 = 1 - b2, decay = k.decay, wd = k.weight_decay, eps = k.eps;
  const float ma0 = *ma, va0 = *va;
  float mnew[kQuantBlock], vnew[kQuantBlock];
  int64_t j = 0;
  float mmax = 0, vmax = 0;
  bool nan = false;
#if defined(CPU_CAPABILITY_AVX512)
  constexpr int64_t L = 16;
  if constexpr (std::is_same_v<T, float>) {
    const __m512 vma0 = _mm512_set1_ps(ma0), vva0 = _mm512_set1_ps(va0), vinv = _mm512_set1_ps(float(sc.inv));
    const __m512 vb1 = _mm512_set1_ps(one_b1), vb2 = _mm512_set1_ps(b2), v1b2 = _mm512_set1_ps(one_b2);
    const __m512 vss = _mm512_set1_ps(ss), vbc = _mm512_set1_ps(inv_bc2_t), veps = _mm512_set1_ps(eps);
    const __m512 vdecay = _mm512_set1_ps(decay), vwd = _mm512_set1_ps(wd);
    const __m512 sign = _mm512_set1_ps(-0.0f);
    __m512 amax_m = _mm512_setzero_ps(), amax_v = _mm512_setzero_ps();
    __mmask16 unordered = 0;
    for (; j + L <= n; j += L) {
      const __m512 m0 = _mm512_mul_ps(
          _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mc + j))), qs.q, 4),
          vma0);
      const __m512 v0 = _mm512_mul_ps(
          _mm512_i32gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(vc + j))), qu.q, 4),
          vva0);
      __m512 gj = _mm512_loadu_ps(g + j);
      if (sc.unscale) {
        gj = _mm512_mul_ps(gj, vinv);
        _mm512_storeu_ps(g + j, gj);
      }
      if (k.maximize) gj = _mm512_xor_ps(gj, sign);
      __m512 pj = _mm512_loadu_ps(p + j);
      if (wd != 0) {
        if (k.decoupled) {
          pj = _mm512_mul_ps(pj, vdecay);
        } else {
          gj = _mm512_add_ps(gj, _mm512_mul_ps(vwd, pj));
        }
      }
      const __m512 mj = _mm512_add_ps(m0, _mm512_mul_ps(vb1, _mm512_sub_ps(gj, m0)));
      const __m512 vj = _mm512_add_ps(_mm512_mul_ps(v0, vb2), _mm512_mul_ps(_mm512_mul_ps(v1b2, gj), gj));
      const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vj), vbc), veps);
      _mm512_storeu_ps(p + j, _mm512_sub_ps(pj, _mm512_div_ps(_mm512_mul_ps(vss, mj), denom)));
      _mm512_storeu_ps(mnew + j, mj);
      _mm512_storeu_ps(vnew + j, vj);
      amax_m = _mm512_max_ps(amax_m, _mm512_andnot_ps(sign, mj));
      amax_v = _mm512_max_ps(amax_v, _mm512_andnot_ps(sign, vj));
      unordered |= _mm512_cmp_ps_mask(mj, vj, _CMP_UNORD_Q);
    }
    mmax = _mm512_reduce_max_ps(amax_m);
    vmax = _mm512_reduce_max_ps(amax_v);
    nan = unordered != 0;
  }
#endif
  [[maybe_unused]] const int64_t nv = j;
  for (; j < n; ++j) {
    opmath_t gj = opmath_t(g[j]);
    if (sc.unscale) {
      g[j] = T(gj * opmath_t(sc.inv));
      gj = opmath_t(g[j]);
    }
    if (k.maximize) gj = -gj;
    opmath_t pj = opmath_t(p[j]);
    if (wd != 0) {
      if (k.decoupled) {
        pj = pj * decay;
      } else {
        gj = gj + wd * pj;
      }
    }
    const opmath_t m0 = opmath_t(qs.q[mc[j]] * ma0), v0 = opmath_t(qu.q[vc[j]] * va0);
    const opmath_t mj = m0 + one_b1 * (gj - m0);
    const opmath_t vj = v0 * b2 + one_b2 * gj * gj;
    const opmath_t denom = std::sqrt(vj) * inv_bc2_t + eps;
    p[j] = T(pj - ss * mj / denom);
    mnew[j] = float(mj);
    vnew[j] = float(vj);
    mmax = std::max(mmax, std::abs(mnew[j]));
    vmax = std::max(vmax, std::abs(vnew[j]));
    nan = nan || std::isnan(mnew[j]) || std::isnan(vnew[j]);
  }
  if (nan) mmax = vmax = NAN;  // a NaN in either state poisons its block: both absmaxs say so (every device)
  *ma = mmax;
  *va = vmax;
  const float minv = mmax > 0 ? 1.0f / mmax : 0.0f, vinv = vmax > 0 ? 1.0f / vmax : 0.0f;
  j = 0;
#if defined(CPU_CAPABILITY_AVX512)
  if (qs.fast && qu.fast) {
    for (; j + L <= nv; j += L) {
      auto quantize = [&](const Quantizer& qz, const float* x, float inv, uint8_t* out) {
        const __m512 y = _mm512_mul_ps(_mm512_loadu_ps(x + j), _mm512_set1_ps(inv));
        const __m512i bits = _mm512_castps_si512(y);
        const __m512i sgn = _mm512_srli_epi32(bits, 31);
        __m512i e = _mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xff));
        __m512i m =
            _mm512_and_si512(_mm512_srli_epi32(bits, 23 - kBucketBits), _mm512_set1_epi32((1 << kBucketBits) - 1));
        m = _mm512_mask_mov_epi32(m, _mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(kBottomExponent)),
                                  _mm512_setzero_si512());
        m = _mm512_mask_mov_epi32(m, _mm512_cmpgt_epi32_mask(e, _mm512_set1_epi32(kTopExponent)),
                                  _mm512_set1_epi32((1 << kBucketBits) - 1));
        e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(kBottomExponent)), _mm512_set1_epi32(kTopExponent));
        const __m512i row = _mm512_add_epi32(_mm512_mullo_epi32(sgn, _mm512_set1_epi32(kRows)),
                                             _mm512_sub_epi32(e, _mm512_set1_epi32(kBottomExponent)));
        const __m512i b = _mm512_or_si512(_mm512_slli_epi32(row, kBucketBits), m);
        __m512i c = _mm512_and_si512(_mm512_i32gather_epi32(b, qz.guess, 1), _mm512_set1_epi32(0xff));
        const __m512i one = _mm512_set1_epi32(1);
        __m512i at = c;
        for (int r = 0; r < kRefine; ++r) {
          const __m512 mid = _mm512_i32gather_ps(at, qz.mid, 4);
          c = _mm512_mask_add_epi32(c, _mm512_cmp_ps_mask(y, mid, _CMP_GT_OQ), c, one);
          at = _mm512_add_epi32(at, one);
        }
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + j), _mm512_cvtepi32_epi8(c));
      };
      quantize(qs, mnew, minv, mc);
      quantize(qu, vnew, vinv, vc);
    }
  }
#endif
  for (; j < n; ++j) {
    mc[j] = qs.code(mnew[j] * minv);
    vc[j] = qu.code(vnew[j] * vinv);
  }
}

#if defined(CPU_CAPABILITY_AVX512)
// Zen 4 and Ice Lake or later (AVX512-VBMI): a 256-entry float table looked up for 64 byte codes at once
// by byte permutes (two 128-entry vpermi2b per byte plane and a blend on the code's top bit), several
// times faster than the 32-bit gathers of the path above on these machines.
const bool kHasVbmi = __builtin_cpu_supports("avx512vbmi");

#define PYOPS_VBMI __attribute__((target("avx512vbmi,avx512bw,avx512f,avx512vl,avx512dq")))
PYOPS_VBMI inline void lookup64(__m512i codes, const uint8_t (*planes)[kQuantMapSize], __m512 out[4]) {
  const __mmask64 top = _mm512_movepi8_mask(codes);
  __m512i b[4];
  for (int k = 0; k < 4; ++k) {
    const __m512i* t = reinterpret_cast<const __m512i*>(planes[k]);
    b[k] = _mm512_mask_blend_epi8(top, _mm512_permutex2var_epi8(_mm512_load_si512(t), codes, _mm512_load_si512(t + 1)),
                                  _mm512_permutex2var_epi8(_mm512_load_si512(t + 2), codes, _mm512_load_si512(t + 3)));
  }
  // bytes to floats: within each 128-bit lane L, f0..f3 hold elements 16L + (0..3, 4..7, 8..11, 12..15)
  const __m512i l01 = _mm512_unpacklo_epi8(b[0], b[1]), h01 = _mm512_unpackhi_epi8(b[0], b[1]);
  const __m512i l23 = _mm512_unpacklo_epi8(b[2], b[3]), h23 = _mm512_unpackhi_epi8(b[2], b[3]);
  const __m512i f0 = _mm512_unpacklo_epi16(l01, l23), f1 = _mm512_unpackhi_epi16(l01, l23);
  const __m512i f2 = _mm512_unpacklo_epi16(h01, h23), f3 = _mm512_unpackhi_epi16(h01, h23);
  const __m512i a0 = _mm512_shuffle_i64x2(f0, f1, 0x44), a1 = _mm512_shuffle_i64x2(f2, f3, 0x44);
  const __m512i a2 = _mm512_shuffle_i64x2(f0, f1, 0xEE), a3 = _mm512_shuffle_i64x2(f2, f3, 0xEE);
  out[0] = _mm512_castsi512_ps(_mm512_shuffle_i64x2(a0, a1, 0x88));
  out[1] = _mm512_castsi512_ps(_mm512_shuffle_i64x2(a0, a1, 0xDD));
  out[2] = _mm512_castsi512_ps(_mm512_shuffle_i64x2(a2, a3, 0x88));
  out[3] = _mm512_castsi512_ps(_mm512_shuffle_i64x2(a2, a3, 0xDD));
}

// The bucket of each lane's y (bucket_of), as the table's byte offset.
PYOPS_VBMI inline __m512i bucket16(__m512 y) {
  const __m512i bits = _mm512_castps_si512(y);
  const __m512i sgn = _mm512_srli_epi32(bits, 31);
  __m512i e = _mm512_and_si512(_mm512_srli_epi32(bits, 23), _mm512_set1_epi32(0xff));
  __m512i m = _mm512_and_si512(_mm512_srli_epi32(bits, 23 - kBucketBits), _mm512_set1_epi32((1 << kBucketBits) - 1));
  m = _mm512_mask_mov_epi32(m, _mm512_cmplt_epi32_mask(e, _mm512_set1_epi32(kBottomExponent)), _mm512_setzero_si512());
  m = _mm512_mask_mov_epi32(m, _mm512_cmpgt_epi32_mask(e, _mm512_set1_epi32(kTopExponent)),
                            _mm512_set1_epi32((1 << kBucketBits) - 1));
  e = _mm512_min_epi32(_mm512_max_epi32(e, _mm512_set1_epi32(kBottomExponent)), _mm512_set1_epi32(kTopExponent));
  const __m512i row = _mm512_add_epi32(_mm512_mullo_epi32(sgn, _mm512_set1_epi32(kRows)),
                                       _mm512_sub_epi32(e, _mm512_set1_epi32(kBottomExponent)));
  return _mm512_or_si512(_mm512_slli_epi32(row, kBucketBits), m);
}

// 64 codes of x[0..64) * inv: the decade guess h (Quantizer::guess_of), then R = qz.refine() midpoint
// comparisons (the code lies in [h - 1, h - 1 + R]; the caller checked the maps' guess_ok).
template <int R>
PYOPS_VBMI inline void quantize64(const Quantizer& qz, const float* x, __m512 inv, uint8_t* out) {
  const __m512 floors[6] = {_mm512_set1_ps(qz.decade_floor[0]), _mm512_set1_ps(qz.decade_floor[1]),
                            _mm512_set1_ps(qz.decade_floor[2]), _mm512_set1_ps(qz.decade_floor[3]),
                            _mm512_set1_ps(qz.decade_floor[4]), _mm512_set1_ps(qz.decade_floor[5])};
  const __m512 scale = _mm512_maskz_loadu_ps(0x7f, qz.decade_scale), rate = _mm512_maskz_loadu_ps(0x7f, qz.decade_rate);
  const __m512 offset = _mm512_maskz_loadu_ps(0x7f, qz.decade_offset);
  const __m512 gmax = _mm512_set1_ps(qz.is_signed ? 127.0f : 254.0f), sign = _mm512_set1_ps(-0.0f);
  const __m512i base = _mm512_set1_epi32(qz.is_signed ? 127 : 0), one = _mm512_set1_epi32(1);
  __m512 y[4];
  __m512i h = _mm512_setzero_si512();
  for (int r = 0; r < 4; ++r) {
    y[r] = _mm512_mul_ps(_mm512_loadu_ps(x + 16 * r), inv);
    const __m512 a = _mm512_andnot_ps(sign, y[r]);
    __m512i i = _mm512_setzero_si512();
    for (int k = 0; k < 6; ++k) i = _mm512_mask_add_epi32(i, _mm512_cmp_ps_mask(a, floors[k], _CMP_GE_OQ), i, one);
    const __m512 u = _mm512_mul_ps(a, _mm512_permutexvar_ps(i, scale));
    const __m512 pos = _mm512_mul_ps(_mm512_sub_ps(u, _mm512_set1_ps(0.1f)), _mm512_permutexvar_ps(i, rate));
    __m512 gf = _mm512_add_ps(_mm512_permutexvar_ps(i, offset),
                              _mm512_roundscale_ps(pos, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC));
    gf = _mm512_min_ps(_mm512_max_ps(gf, _mm512_setzero_ps()), gmax);  // max_ps(NaN, 0) = 0
    const __m512i g = _mm512_add_epi32(_mm512_cvttps_epi32(gf), base);
    __m512i hr = _mm512_add_epi32(g, one);
    const __mmask16 negative = _mm512_movepi32_mask(_mm512_castps_si512(y[r]));
    hr = qz.is_signed ? _mm512_mask_sub_epi32(hr, negative, _mm512_set1_epi32(252), g)
                      : _mm512_mask_mov_epi32(hr, negative, one);
    hr = _mm512_min_epi32(_mm512_max_epi32(hr, one), _mm512_set1_epi32(kQuantMapSize - R));
    h = _mm512_inserti32x4(h, _mm512_cvtepi32_epi8(hr), r);
  }
  const __m512i one8 = _mm512_set1_epi8(1);
  __m512i c = _mm512_sub_epi8(h, one8);  // h - 1 + the number of mid[h - 1], ..., mid[h - 2 + R] below y
  __m512i at = c;
  for (int step = 0; step < R; ++step) {
    __m512 mid[4];
    lookup64(at, qz.mid_planes, mid);
    __mmask64 up = 0;
    for (int r = 0; r < 4; ++r) up |= __mmask64(_mm512_cmp_ps_mask(y[r], mid[r], _CMP_GT_OQ)) << (16 * r);
    c = _mm512_mask_add_epi8(c, up, c, one8);
    at = _mm512_add_epi8(at, one8);
  }
  _mm512_storeu_si512(out, c);
}

// A whole block of float32 parameters: adam_8bit_block's vector path with byte-permute lookups.
PYOPS_VBMI void adam_8bit_block_vbmi(float* p, float* g, uint8_t* mc, uint8_t* vc, float* ma, float* va,
                                     const Quantizer& qs, const Quantizer& qu, const Adam8bitScalars& k,
                                     double step_size, double inv_bc2) {
  const StepScalars& sc = k.sc;
  const float b1 = k.beta1, b2 = k.beta2;
  const __m512 vma0 = _mm512_set1_ps(*ma), vva0 = _mm512_set1_ps(*va), vinv = _mm512_set1_ps(float(sc.inv));
  const __m512 vb1 = _mm512_set1_ps(1 - b1), vb2 = _mm512_set1_ps(b2), v1b2 = _mm512_set1_ps(1 - b2);
  const __m512 vss = _mm512_set1_ps(float(step_size)), vbc = _mm512_set1_ps(float(inv_bc2));
  const __m512 veps = _mm512_set1_ps(float(k.eps)), vdecay = _mm512_set1_ps(float(k.decay));
  const __m512 vwd = _mm512_set1_ps(float(k.weight_decay)), sign = _mm512_set1_ps(-0.0f);
  const bool wd = k.weight_decay != 0;
  alignas(64) float mnew[kQuantBlock], vnew[kQuantBlock];
  __m512 amax_m = _mm512_setzero_ps(), amax_v = _mm512_setzero_ps();
  __mmask16 unordered = 0;
  for (int64_t j0 = 0; j0 < kQuantBlock; j0 += 64) {
    __m512 m0s[4], v0s[4];
    lookup64(_mm512_loadu_si512(mc + j0), qs.q_planes, m0s);
    lookup64(_mm512_loadu_si512(vc + j0), qu.q_planes, v0s);
    for (int r = 0; r < 4; ++r) {
      const int64_t j = j0 + 16 * r;
      const __m512 m0 = _mm512_mul_ps(m0s[r], vma0), v0 = _mm512_mul_ps(v0s[r], vva0);
      __m512 gj = _mm512_loadu_ps(g + j);
      if (sc.unscale) {
        gj = _mm512_mul_ps(gj, vinv);
        _mm512_storeu_ps(g + j, gj);
      }
      if (k.maximize) gj = _mm512_xor_ps(gj, sign);
      __m512 pj = _mm512_loadu_ps(p + j);
      if (wd) {
        if (k.decoupled) {
          pj = _mm512_mul_ps(pj, vdecay);
        } else {
          gj = _mm512_add_ps(gj, _mm512_mul_ps(vwd, pj));
        }
      }
      const __m512 mj = _mm512_add_ps(m0, _mm512_mul_ps(vb1, _mm512_sub_ps(gj, m0)));
      const __m512 vj = _mm512_add_ps(_mm512_mul_ps(v0, vb2), _mm512_mul_ps(_mm512_mul_ps(v1b2, gj), gj));
      const __m512 denom = _mm512_add_ps(_mm512_mul_ps(_mm512_sqrt_ps(vj), vbc), veps);
      _mm512_storeu_ps(p + j, _mm512_sub_ps(pj, _mm512_div_ps(_mm512_mul_ps(vss, mj), denom)));
      _mm512_store_ps(mnew + j, mj);
      _mm512_store_ps(vnew + j, vj);
      amax_m = _mm512_max_ps(amax_m, _mm512_andnot_ps(sign, mj));
      amax_v = _mm512_max_ps(amax_v, _mm512_andnot_ps(sign, vj));
      unordered |= _mm512_cmp_ps_mask(mj, vj, _CMP_UNORD_Q);
    }
  }
  float mmax = _mm512_reduce_max_ps(amax_m), vmax = _mm512_reduce_max_ps(amax_v);
  if (unordered) mmax = vmax = NAN;
  *ma = mmax;
  *va = vmax;
  const __m512 minv = _mm512_set1_ps(mmax > 0 ? 1.0f / mmax : 0.0f),
               vinv_ = _mm512_set1_ps(vmax > 0 ? 1.0f / vmax : 0.0f);
  for (int64_t j0 = 0; j0 < kQuantBlock; j0 += 64) {
    quantize64<3>(qs, mnew + j0, minv, mc + j0);
    quantize64<2>(qu, vnew + j0, vinv_, vc + j0);
  }
}
#undef PYOPS_VBMI
#endif

void adam_8bit_step(const Adam8bitStep& s) {
  if (skip_step(s)) return;
  const auto signed_map = quantizer_of(s.qmap_signed, "qmap_signed");
  const auto unsigned_map = quantizer_of(s.qmap_unsigned, "qmap_unsigned");
  const Quantizer &qs = *signed_map, &qu = *unsigned_map;
  const StepScalars sc = step_scalars(s);
  const size_t n = s.params.size();
  std::vector<double> step_size(n), inv_bc2(n);
  for (size_t i = 0; i < n; ++i) {  // as the float32 kernel
    const double step = increment_step(s.steps[i]);
    step_size[i] = adam_step_size(sc.lr, sc.lr_is_float, s.beta1, step);
    inv_bc2[i] = adam_inv_bias_correction2_sqrt(s.beta2, step);
  }
  const Adam8bitScalars k{sc,
                          decoupled_decay(sc.lr, sc.lr_is_float, s.weight_decay),
                          s.weight_decay,
                          s.eps,
                          s.beta1,
                          s.beta2,
                          s.decoupled,
                          s.maximize};
  static_assert(kChunk % kQuantBlock == 0, "chunks hold whole blocks");
  [[maybe_unused]] const bool vbmi = qs.guess_ok && qu.guess_ok && qs.refine() == 3 && qu.refine() == 2;
  for_each_chunk(s.params, [&](auto* tag, const Chunk& ch) {
    using T = std::remove_pointer_t<decltype(tag)>;
    const int64_t i = ch.tensor;
    T* p = ptr<T>(s.params, i);
    T* g = ptr<T>(s.grads, i);
    uint8_t* mc = ptr<uint8_t>(s.exp_avgs, i);
    uint8_t* vc = ptr<uint8_t>(s.exp_avg_sqs, i);
    float* ma = ptr<float>(s.exp_avg_absmaxs, i);
    float* va = ptr<float>(s.exp_avg_sq_absmaxs, i);
    for (int64_t b = ch.begin; b < ch.end; b += kQuantBlock) {
      const int64_t blk = b / kQuantBlock, len = std::min(kQuantBlock, ch.end - b);
#if defined(CPU_CAPABILITY_AVX512)
      if constexpr (std::is_same_v<T, float>) {
        if (kHasVbmi && vbmi && len == kQuantBlock) {
          adam_8bit_block_vbmi(p + b, g + b, mc + b, vc + b, ma + blk, va + blk, qs, qu, k, step_size[i], inv_bc2[i]);
          continue;
        }
      }
#endif
      adam_8bit_block<T>(p + b, g + b, mc + b, vc + b, ma + blk, va + blk, len, qs, qu, k, step_size[i], inv_bc2[i]);
    }
  });
}

struct Cpu {
  static constexpr bool kStochasticRound = true;  // ParamStore
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };

  static void sgd(const SgdStep& s) {
    if (skip_step(s)) return;
    const StepScalars sc = step_scalars(s);
    const double lr = sc.lr, momentum = s.momentum, dampening = s.dampening, weight_decay = s.weight_decay;
    const bool nesterov = s.nesterov, maximize = s.maximize;
    const ParamStore store(s);
    std::vector<char> is_new(s.params.size(), 0);
    for (size_t i = 0; i < s.new_buffers.size(); ++i)
      is_new[i] = *static_cast<const uint8_t*>(s.new_buffers[i].const_data_ptr()) != 0;
    for_each_chunk(s.params, [&](auto* tag, const Chunk& ch) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using opmath_t = at::opmath_type<T>;
      T* p = ptr<T>(s.params, ch.tensor);
      const uint32_t key = store.key(ch.tensor);
      T* g = ptr<T>(s.grads, ch.tensor);
      T* m = momentum != 0 ? ptr<T>(s.momentum_buffers, ch.tensor) : nullptr;
      const bool first = is_new[ch.tensor];
      for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
        using W = decltype(w);
        W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
        const W pj = ld<W>(p + j);
        if (weight_decay != 0) gj = gj + W(opmath_t(weight_decay)) * pj;
        if (momentum != 0) {
          const W buf =
              stored(m + j, first ? gj : W(opmath_t(momentum)) * ld<W>(m + j) + W(opmath_t(1 - dampening)) * gj);
          gj = nesterov ? gj + W(opmath_t(momentum)) * buf : buf;
        }
        store(p, key, j, pj - W(opmath_t(lr)) * gj);
      });
    });
    for (const at::Tensor& f : s.new_buffers) *static_cast<uint8_t*>(f.mutable_data_ptr()) = 0;
  }

  // D::adam takes bfloat16 state for float32 parameters (csrc/optim.h): per parameter, its state's dtype.
  static constexpr bool kBf16AdamStates = true;

  static void adam(const AdamStep& s) {
    if (skip_step(s)) return;
    const StepScalars sc = step_scalars(s);
    const size_t n = s.params.size();
    std::vector<double> step_size(n), inv_bc2(n);
    for (size_t i = 0; i < n; ++i) {  // step_t += 1, then torch's bias corrections in double
      const double step = increment_step(s.steps[i]);
      step_size[i] = adam_step_size(sc.lr, sc.lr_is_float, s.beta1, step);
      inv_bc2[i] = adam_inv_bias_correction2_sqrt(s.beta2, step);
    }
    const double decay = decoupled_decay(sc.lr, sc.lr_is_float, s.weight_decay);
    const double weight_decay = s.weight_decay, eps = s.eps;
    const bool amsgrad = s.amsgrad, decoupled = s.decoupled, maximize = s.maximize;
    const ParamStore store(s);
    // T: the parameters' type; S: the state's (T, or bfloat16 for float32 parameters).
    auto update = [&](auto* tag, auto* state_tag, const Chunk& ch) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using S = std::remove_pointer_t<decltype(state_tag)>;
      using opmath_t = at::opmath_type<T>;
      T* p = ptr<T>(s.params, ch.tensor);
      const uint32_t key = store.key(ch.tensor);
      T* g = ptr<T>(s.grads, ch.tensor);
      S* m = ptr<S>(s.exp_avgs, ch.tensor);
      S* v = ptr<S>(s.exp_avg_sqs, ch.tensor);
      S* vmax = amsgrad ? ptr<S>(s.max_exp_avg_sqs, ch.tensor) : nullptr;
      const opmath_t b1 = s.beta1, b2 = s.beta2, ss = step_size[ch.tensor], inv_bc2_t = inv_bc2[ch.tensor];
      for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
        using W = decltype(w);
        W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
        W pj = ld<W>(p + j);
        if (weight_decay != 0) {
          if (decoupled) {
            pj = pj * W(opmath_t(decay));
          } else {
            gj = gj + W(opmath_t(weight_decay)) * pj;
          }
        }
        const W m0 = ld<W>(m + j);
        const W mj = stored(m + j, m0 + W(1 - b1) * (gj - m0));  // lerp
        W vu = stored(v + j, ld<W>(v + j) * W(b2) + W(1 - b2) * gj * gj);
        if (amsgrad) vu = stored(vmax + j, maximum_(ld<W>(vmax + j), vu));
        const W denom = sqrt_(vu) * W(inv_bc2_t) + W(opmath_t(eps));  // one division per element, not two
        store(p, key, j, pj - W(ss) * mj / denom);
      });
    };
    for_each_chunk(s.params, [&](auto* tag, const Chunk& ch) {
      using T = std::remove_pointer_t<decltype(tag)>;
      if constexpr (std::is_same_v<T, float>) {
        if (s.exp_avgs[ch.tensor].scalar_type() == at::kBFloat16) return update(tag, (at::BFloat16*)nullptr, ch);
      }
      update(tag, tag, ch);
    });
  }

  static void adam_8bit(const Adam8bitStep& s) { adam_8bit_step(s); }

  static void adagrad(const AdagradStep& s) {
    if (skip_step(s)) return;
    const StepScalars sc = step_scalars(s);
    std::vector<double> clr(s.params.size());
    for (size_t i = 0; i < s.params.size(); ++i)
      clr[i] = adagrad_clr(sc.lr, sc.lr_is_float, s.lr_decay, increment_step(s.steps[i]));
    const double weight_decay = s.weight_decay, eps = s.eps;
    const bool maximize = s.maximize;
    const ParamStore store(s);
    for_each_chunk(s.params, [&](auto* tag, const Chunk& ch) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using opmath_t = at::opmath_type<T>;
      T* p = ptr<T>(s.params, ch.tensor);
      const uint32_t key = store.key(ch.tensor);
      T* g = ptr<T>(s.grads, ch.tensor);
      T* sum = ptr<T>(s.sums, ch.tensor);
      const opmath_t c = clr[ch.tensor];
      for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
        using W = decltype(w);
        W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
        const W pj = ld<W>(p + j);
        if (weight_decay != 0) gj = gj + W(opmath_t(weight_decay)) * pj;
        const W sj = stored(sum + j, ld<W>(sum + j) + gj * gj);
        store(p, key, j, pj - W(c) * gj / (sqrt_(sj) + W(opmath_t(eps))));
      });
    });
  }

  static void rmsprop(const RmspropStep& s) {
    if (skip_step(s)) return;
    const StepScalars sc = step_scalars(s);
    for (const at::Tensor& step : s.steps) increment_step(step);
    const double lr = sc.lr, weight_decay = s.weight_decay, eps = s.eps, momentum = s.momentum;
    const bool centered = s.centered, maximize = s.maximize;
    const ParamStore store(s);
    for_each_chunk(s.params, [&](auto* tag, const Chunk& ch) {
      using T = std::remove_pointer_t<decltype(tag)>;
      using opmath_t = at::opmath_type<T>;
      T* p = ptr<T>(s.params, ch.tensor);
      const uint32_t key = store.key(ch.tensor);
      T* g = ptr<T>(s.grads, ch.tensor);
      T* sq = ptr<T>(s.square_avgs, ch.tensor);
      T* ga = centered ? ptr<T>(s.grad_avgs, ch.tensor) : nullptr;
      T* m = momentum > 0 ? ptr<T>(s.momentum_buffers, ch.tensor) : nullptr;
      const opmath_t alpha = s.alpha;
      for_elements<T>(ch.begin, ch.end, [&](int64_t j, auto w) {
        using W = decltype(w);
        W gj = grad_at<W, T, opmath_t>(g, j, sc, maximize);
        const W pj = ld<W>(p + j);
        if (weight_decay != 0) gj = gj + W(opmath_t(weight_decay)) * pj;
        const W sqj = stored(sq + j, ld<W>(sq + j) * W(alpha) + W(1 - alpha) * gj * gj);
        W avg;
        if (centered) {
          const W ga0 = ld<W>(ga + j);
          const W gaj = stored(ga + j, ga0 + W(1 - alpha) * (gj - ga0));  // lerp
          avg = sqrt_(sqj - gaj * gaj) + W(opmath_t(eps));
        } else {
          avg = sqrt_(sqj) + W(opmath_t(eps));
        }
        if (momentum > 0) {
          const W mj = stored(m + j, ld<W>(m + j) * W(opmath_t(momentum)) + gj / avg);
          store(p, key, j, pj - W(opmath_t(lr)) * mj);
        } else {
          store(p, key, j, pj - W(opmath_t(lr)) * gj / avg);
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(pyops, CPU, m) {
  PYOPS_REGISTER_OPTIM(m, ::pyops::Cpu, "");
  PYOPS_REGISTER_OPTIM_8BIT(m, ::pyops::Cpu, "");
}

}  // namespace pyops
