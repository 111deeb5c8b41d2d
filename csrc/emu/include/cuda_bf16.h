// Host stand-in for cuda_bf16.h: the bfloat16 storage type (the top 16 bits of an fp32) and its two
// conversions, exact (float -> bfloat16 rounds to nearest even, subnormals included, NaN -> 0x7fff).
#pragma once

#ifndef ADAPTERKERN_HOST_EMULATION
#error "csrc/emu/include is the host emulation of CUDA: compile with -DADAPTERKERN_HOST_EMULATION"
#endif

#include <bit>
#include <cstdint>

struct __nv_bfloat16 {
  uint16_t bits;  // value-initialisation gives +0
};

inline float __bfloat162float(__nv_bfloat16 b) { return std::bit_cast<float>(uint32_t(b.bits) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};  // NaN
  // Round the dropped 16 bits to nearest even; a carry into the exponent (up to inf) is right.
  return __nv_bfloat16{uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}
