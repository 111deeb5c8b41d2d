// Host stand-in for cuda_fp16.h: the IEEE binary16 storage type and its two conversions, exact
// (float -> half rounds to nearest even, subnormals included, overflow to +-inf, NaN -> 0x7fff).
#pragma once

#ifndef ADAPTERKERN_HOST_EMULATION
#error "csrc/emu/include is the host emulation of CUDA: compile with -DADAPTERKERN_HOST_EMULATION"
#endif

#include <bit>
#include <cmath>
#include <cstdint>

struct __half {
  uint16_t bits;  // value-initialisation (__half{}) gives +0, like CUDA's
};

inline float __half2float(__half h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu, man = h.bits & 0x3ffu;
  if (exp == 0x1f) return std::bit_cast<float>(sign | 0x7f800000u | (man << 13));  // inf / NaN
  if (exp == 0) {                                                                  // zero / subnormal
    const float mag = std::ldexp(float(man), -24);                                 // exact
    return sign ? -mag : mag;
  }
  return std::bit_cast<float>(sign | ((exp + 112u) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t x = std::bit_cast<uint32_t>(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return __half{0x7fff};                 // NaN
  if (ax >= 0x477ff000u) return __half{uint16_t(sign | 0x7c00u)};  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                                      // below 2^-14: subnormal half or 0
    if (ax <= 0x33000000u) return __half{sign};                // <= 2^-25 (the tie rounds to even 0)
    const uint32_t e = ax >> 23, m = (ax & 0x7fffffu) | 0x800000u;  // |f| = m * 2^(e - 150)
    const uint32_t shift = 126u - e;                            // result in units of 2^-24
    uint32_t q = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    if (rem > half || (rem == half && (q & 1u))) ++q;           // may carry into the smallest normal
    return __half{uint16_t(sign | q)};
  }
  uint32_t h = ((ax >> 23) - 112u) << 10 | ((ax & 0x7fffffu) >> 13);
  const uint32_t rem = ax & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;      // a carry into the exponent is right
  return __half{uint16_t(sign | h)};
}
