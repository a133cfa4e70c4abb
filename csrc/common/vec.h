// CPU vector helpers on top of at::vec::Vectorized: comparison masks to bits and back.
#pragma once
#include <ATen/cpu/vec/vec.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

namespace pyops {
namespace vec {

using at::vec::Vectorized;

// Bit i of the result is set where lane i of the comparison mask m is.
template <typename T>
inline uint32_t movemask(const Vectorized<T>& m) {
  __at_align__ T lanes[Vectorized<T>::size()];
  m.store(lanes);
  uint32_t bits = 0;
  for (int i = 0; i < Vectorized<T>::size(); ++i) {
    bool set = false;
    for (size_t k = 0; k < sizeof(T); ++k) set |= reinterpret_cast<const uint8_t*>(&lanes[i])[k] != 0;
    bits |= uint32_t(set) << i;
  }
  return bits;
}

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline uint32_t movemask<float>(const Vectorized<float>& m) {
  return uint32_t(_mm512_movepi32_mask(_mm512_castps_si512(m)));
}
template <>
inline uint32_t movemask<double>(const Vectorized<double>& m) {
  return uint32_t(_mm512_movepi64_mask(_mm512_castpd_si512(m)));
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline uint32_t movemask<float>(const Vectorized<float>& m) {
  return uint32_t(_mm256_movemask_ps(m));
}
template <>
inline uint32_t movemask<double>(const Vectorized<double>& m) {
  return uint32_t(_mm256_movemask_pd(m));
}
#endif

// The comparison mask with lane i set where bit i of `bits` is (bits < 2^lanes).
#if defined(CPU_CAPABILITY_AVX512)
template <typename T>
inline Vectorized<T> expand_bits(uint32_t bits);
template <>
inline Vectorized<float> expand_bits<float>(uint32_t bits) {
  return _mm512_castsi512_ps(_mm512_movm_epi32(__mmask16(bits)));
}
template <>
inline Vectorized<double> expand_bits<double>(uint32_t bits) {
  return _mm512_castsi512_pd(_mm512_movm_epi64(__mmask8(bits)));
}
#else
// One load from a table of every pattern (8 KB for float, 512 B for double; it stays in L1).
template <typename T>
inline Vectorized<T> expand_bits(uint32_t bits) {
  constexpr int kLanes = Vectorized<T>::size();
  struct Table {
    __at_align__ T rows[1 << kLanes][kLanes];
    Table() {
      for (int p = 0; p < (1 << kLanes); ++p)
        for (int i = 0; i < kLanes; ++i) std::memset(&rows[p][i], ((p >> i) & 1) ? 0xFF : 0, sizeof(T));
    }
  };
  static const Table table;
  return Vectorized<T>::loadu(table.rows[bits]);
}
#endif

// Store v at p (aligned to the vector's size) past the caches when `stream`: a large output that
// is not read back soon then costs one write instead of a read-for-ownership plus a write.
// Call sfence() before other threads may read what was streamed.
template <typename T>
inline void store(const Vectorized<T>& v, T* p, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) return _mm512_stream_ps(p, v);
    if constexpr (std::is_same_v<T, double>) return _mm512_stream_pd(p, v);
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if (stream) {
    if constexpr (std::is_same_v<T, float>) return _mm256_stream_ps(p, v);
    if constexpr (std::is_same_v<T, double>) return _mm256_stream_pd(p, v);
  }
#endif
  v.store(p);
}

inline void sfence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

}  // namespace vec
}  // namespace pyops
