// Stochastic rounding of a float32 value to bfloat16, for the optimizers' bf16_stochastic_round
// (csrc/optim.h): a bfloat16 parameter trained without master weights stalls once its updates fall
// below half an ulp (round to nearest returns the old value every step); rounding up with probability
// (distance to the lower neighbour) / ulp keeps E[rounded] = exact, so small updates add up on average.
//
// The random bits are a counter-based hash of (seed, tensor index, element index): no generator state,
// the same bits whatever the thread count or launch shape, and the same function on every device
// (kernels/_common.py's stochastic_round_key and bfloat16_round_stochastic are its Triton twins: keep
// them alike).
#pragma once
#include <c10/macros/Macros.h>

#include <cstdint>
#include <cstring>

namespace pyops {

// lowbias32 (Chris Wellons' hash prospector): a 32-bit integer finalizer with low bias, two multiplies.
C10_HOST_DEVICE inline uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7feb352dU;
  x ^= x >> 15;
  x *= 0x846ca68bU;
  x ^= x >> 16;
  return x;
}

constexpr uint32_t kIndexHighSalt = 0x9e3779b9U;  // separates the index's high word from its low one

// The random bits of element `index` of tensor `tensor` of a step seeded with `seed`:
// stochastic_round_bits(stochastic_round_key(seed, tensor), index), the key hoisted out of the
// element loop (two finalizer rounds an element instead of five).
C10_HOST_DEVICE inline uint32_t stochastic_round_key(uint64_t seed, uint64_t tensor) {
  return mix32(uint32_t(seed) ^ mix32(uint32_t(seed >> 32) ^ mix32(uint32_t(tensor))));
}
C10_HOST_DEVICE inline uint32_t stochastic_round_bits(uint32_t key, uint64_t index) {
  return mix32(mix32(key ^ uint32_t(index)) ^ uint32_t(index >> 32) ^ kIndexHighSalt);
}

constexpr uint32_t kFloatExponentMask = 0x7f800000U;
constexpr uint32_t kFloatMantissaMask = 0x007fffffU;
constexpr uint32_t kBelowBfloat16Mask = 0xffffU;  // the float32 mantissa bits bfloat16 drops
constexpr int kBfloat16Shift = 16;
constexpr uint16_t kBfloat16NaN = 0x7fc0U;  // the NaN c10::BFloat16's conversion gives

// The bfloat16 bit pattern of v rounded stochastically with `random`'s low 16 bits: adding them to
// the float32 pattern below bfloat16's mantissa and truncating rounds |v| up with probability (the
// dropped bits) / 2^16, exactly the fraction of an ulp v lies above its lower neighbour. A carry runs
// into the exponent as it should (the largest finite values may round up to inf, as they lie above
// bfloat16's largest finite one). inf stays inf and NaN gives c10::BFloat16's NaN (a carry would turn
// inf into NaN, truncation a NaN into inf).
C10_HOST_DEVICE inline uint16_t bfloat16_round_stochastic(float v, uint32_t random) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  if ((bits & kFloatExponentMask) == kFloatExponentMask)
    return (bits & kFloatMantissaMask) ? kBfloat16NaN : uint16_t(bits >> kBfloat16Shift);
  return uint16_t((bits + (random & kBelowBfloat16Mask)) >> kBfloat16Shift);
}

}  // namespace pyops
