// Self-checks of the emulator (see selftest.h). Every expected value comes from a formula written
// here (IEEE encodings, round-to-nearest rules, the PTX accumulator layout), not from emu.cpp.
#include "selftest.h"

#include <cmath>
#include <cstdio>
#include <random>

#include "kernels/common.cuh"

namespace {

constexpr double kU32 = 1.0 / (1 << 24);

template <class... A>
std::string fmt(const char* f, A... args) {
  char buf[256];
  std::snprintf(buf, sizeof buf, f, args...);
  return buf;
}

// The value of a 16-bit IEEE-style pattern (sign, `exp_bits` of biased exponent, the rest mantissa),
// from the encodings' definitions: binary16 has 5 exponent bits, bfloat16 8.
double bits16_value(uint32_t bits, int exp_bits) {
  const int man_bits = 15 - exp_bits, bias = (1 << (exp_bits - 1)) - 1, emax = (1 << exp_bits) - 1;
  const int e = (bits >> man_bits) & emax, m = bits & ((1 << man_bits) - 1);
  const double mag = e == emax ? (m ? NAN : INFINITY)
                     : e == 0  ? std::ldexp((double)m, 1 - bias - man_bits)
                               : std::ldexp(1.0 + std::ldexp((double)m, -man_bits), e - bias);
  return (bits & 0x8000) ? -mag : mag;
}
double half_bits_value(uint32_t h) { return bits16_value(h, 5); }
double bf16_bits_value(uint32_t b) { return bits16_value(b, 8); }
bool same(double a, double b) { return (std::isnan(a) && std::isnan(b)) || a == b; }

// Round-to-nearest-even of a 16-bit format, checked on every representable value, every midpoint
// between neighbours (exact in fp32) and the floats just beside each midpoint.
template <class Enc, class Dec>
CheckResult check_format(const char* name, uint32_t max_finite, double (*value)(uint32_t), Enc enc, Dec dec) {
  for (uint32_t h = 0; h < 65536; ++h)
    if (!same(dec(h), value(h))) return {name, false, fmt("decode of bits %#x gives %g, want %g", h, dec(h), value(h))};
  for (uint32_t sign : {0u, 0x8000u}) {
    for (uint32_t h = 0; h <= max_finite; ++h) {
      const uint32_t lo = sign | h, hi = sign | (h + 1);  // hi is +-inf after the largest finite value
      const double vlo = value(lo), vhi = h == max_finite ? 2 * vlo - value(sign | (h - 1)) : value(hi);
      const float mid = (float)((vlo + vhi) / 2);
      const uint32_t even = (h & 1) ? hi : lo;
      if (enc((float)vlo) != lo) return {name, false, fmt("value %g does not round-trip", vlo)};
      const float above = std::nextafter(mid, sign ? -INFINITY : INFINITY), below = std::nextafter(mid, 0.0f);
      for (auto [x, want] : {std::pair{mid, even}, {above, hi}, {below, lo}})
        if (enc(x) != want) return {name, false, fmt("%.9g rounds to %#x, want %#x", (double)x, enc(x), want)};
    }
  }
  if (!std::isnan(dec(enc(NAN))) || !std::isnan(dec(enc(-NAN)))) return {name, false, "NaN does not stay NaN"};
  if (dec(enc(INFINITY)) != INFINITY || dec(enc(-1e38f * 10)) != -INFINITY) return {name, false, "inf"};
  if (enc(1e-45f) != 0 || enc(-1e-45f) != 0x8000) return {name, false, "fp32 subnormal does not round to signed zero"};
  return {name, true, "all 65536 encodings, midpoints and neighbours"};
}

// cvt.rna.tf32.f32: nearest 11-bit significand, ties away from zero (std::round), fixed 2^-136
// quantum below 2^-126 (the tf32 subnormals), overflow to inf, NaN stays NaN.
float tf32_rna(float x) {
  if (std::isnan(x) || std::isinf(x)) return x;
  if (std::fabs(x) < std::ldexp(1.0, -126)) return (float)std::ldexp(std::round(std::ldexp((double)x, 136)), -136);
  int e;
  const double m = std::frexp((double)x, &e);  // |m| in [0.5, 1)
  return (float)std::ldexp(std::round(m * 2048), e - 11);
}

CheckResult check_tf32() {
  std::mt19937 rng(7);
  std::vector<float> xs = {0.0f,          -0.0f,          1.0f,     3.0f,     1e-40f, -1e-42f,
                           3.4028235e38f, -3.4028235e38f, INFINITY, -INFINITY};
  for (uint32_t low : {0x0fffu, 0x1000u, 0x1001u, 0x2000u + 0x1000u})  // ties and neighbours
    for (uint32_t hi : {0x3f800000u, 0xbf800000u, 0x00000000u, 0x7f000000u})
      xs.push_back(std::bit_cast<float>(hi | low));
  for (int i = 0; i < 200000; ++i) xs.push_back(std::bit_cast<float>((uint32_t)rng()));
  for (float x : xs) {
    const float got = std::bit_cast<float>(emu::cvt_rna_tf32_f32(x)), want = tf32_rna(x);
    if (!same(got, want))
      return {"cvt.rna.tf32.f32", false, fmt("%.9g -> %.9g, want %.9g", (double)x, (double)got, (double)want)};
  }
  if (emu::cvt_rna_tf32_f32(std::bit_cast<float>(0x3f801234u)) & 0x1fffu)
    return {"cvt.rna.tf32.f32", false, "the low 13 bits of the result must be 0"};
  return {"cvt.rna.tf32.f32", true, "ties, subnormals, inf/NaN and 200000 random floats"};
}

// ---- launches: limits, thread/block coverage, barriers, early exit, shuffles -------------------
void coverage_kernel(int* hits) {  // one counter per (block, thread), each written by one thread
  const unsigned b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  hits[b * blockDim.x * blockDim.y * blockDim.z + t] += 1;
}
void barrier_kernel(int* out, int exit_below) {  // threads < exit_below return before the barrier
  ADAPTERKERN_DYNAMIC_SMEM(smem);
  int* s = reinterpret_cast<int*>(smem);
  const int n = (int)blockDim.x, i = (int)threadIdx.x;
  if (i < exit_below) return;
  s[i] = i * 10;
  __syncthreads();
  out[i] = s[exit_below + (i - exit_below + 1) % (n - exit_below)];
}
void shuffle_kernel(float* out) {  // out[5 * lane + k] = the value of lane (lane ^ 2^k)
  for (int k = 0; k < 5; ++k) out[5 * threadIdx.x + k] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1 << k);
}

CheckResult check_launches() {
  const char* name = "launch limits, coverage, barrier, early exit, shuffle";
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  std::vector<int> out(256, -1);
  const size_t over = 48 * 1024 + 4;
  emu::Launch(barrier_kernel, dim3(1), dim3(64), over, nullptr)(out.data(), 0);
  if (cudaGetLastError() != cudaErrorInvalidValue) return {name, false, "49 KiB without the opt-in must fail"};
  if (cudaGetLastError() != cudaSuccess) return {name, false, "cudaGetLastError must clear the error"};
  const auto attr = cudaFuncAttributeMaxDynamicSharedMemorySize;
  if (cudaFuncSetAttribute(barrier_kernel, attr, optin + 1) != cudaErrorInvalidValue)
    return {name, false, "an attribute above the opt-in limit must fail"};
  cudaGetLastError();
  if (cudaFuncSetAttribute(barrier_kernel, attr, optin) != cudaSuccess)
    return {name, false, "the opt-in attribute"};
  emu::Launch(barrier_kernel, dim3(1), dim3(64), over, nullptr)(out.data(), 0);
  if (cudaGetLastError() != cudaSuccess) return {name, false, "49 KiB after the opt-in"};
  for (int i = 0; i < 64; ++i)
    if (out[i] != ((i + 1) % 64) * 10) return {name, false, fmt("barrier: out[%d] = %d", i, out[i])};
  std::fill(out.begin(), out.end(), -1);
  emu::Launch(barrier_kernel, dim3(1), dim3(96), 96 * sizeof(int), nullptr)(out.data(), 40);  // 40 exit early
  for (int i = 0; i < 96; ++i)
    if (out[i] != (i < 40 ? -1 : 10 * (40 + (i - 40 + 1) % 56)))
      return {name, false, fmt("early exit: out[%d] = %d", i, out[i])};
  emu::Launch(coverage_kernel, dim3(0), dim3(32), 0, nullptr)(out.data());
  if (cudaGetLastError() != cudaErrorInvalidConfiguration) return {name, false, "an empty grid must fail"};
  emu::Launch(coverage_kernel, dim3(1), dim3(1025), 0, nullptr)(out.data());
  if (cudaGetLastError() != cudaErrorInvalidConfiguration) return {name, false, "1025 threads must fail"};
  std::vector<int> hits(3 * 2 * 2 * 40, 0);
  emu::Launch(coverage_kernel, dim3(3, 2, 2), dim3(5, 4, 2), 0, nullptr)(hits.data());
  for (int h : hits)
    if (h != 1) return {name, false, "a (block, thread) pair ran other than once"};
  std::vector<float> sh(32 * 5);
  emu::Launch(shuffle_kernel, dim3(1), dim3(32), 0, nullptr)(sh.data());
  for (int l = 0; l < 32; ++l)
    for (int k = 0; k < 5; ++k)
      if (sh[5 * l + k] != (float)(l ^ (1 << k))) return {name, false, fmt("shuffle: lane %d, xor %d", l, 1 << k)};
  return {name, true, "ok"};
}

// ---- cp.async: a group lands only when waited for; src-size bytes copied, the rest zero-filled ---
void cp_async_kernel(const uint32_t* src, uint32_t* out) {
  ADAPTERKERN_DYNAMIC_SMEM(smem);
  uint32_t* s = reinterpret_cast<uint32_t*>(smem);  // three 16-byte chunks
  if (threadIdx.x != 0) return;
  adapterkern::cp_async_16(s, src, 16);
  adapterkern::cp_async_commit();
  adapterkern::cp_async_16(s + 4, src + 4, 6);
  adapterkern::cp_async_commit();
  adapterkern::cp_async_16(s + 8, src, 0);
  adapterkern::cp_async_commit();
  adapterkern::cp_async_wait<2>();  // the first group only
  for (int i = 0; i < 12; ++i) out[i] = s[i];
  adapterkern::cp_async_wait<0>();
  for (int i = 0; i < 12; ++i) out[12 + i] = s[i];
}

CheckResult check_cp_async() {
  const char* name = "cp.async groups, src-size and zero-fill";
  alignas(16) uint32_t src[8];
  for (int i = 0; i < 8; ++i) src[i] = 0x01020304u * (uint32_t)(i + 1);
  std::vector<uint32_t> out(24, 0);
  emu::Launch(cp_async_kernel, dim3(1), dim3(32), 48, nullptr)(src, out.data());
  const uint32_t poison = 0xffffffffu;  // the emulator's fill of fresh shared memory
  const uint32_t want[24] = {src[0], src[1], src[2], src[3], poison, poison, poison, poison, poison, poison, poison, poison,
                             src[0], src[1], src[2], src[3], src[4], src[5] & 0xffffu, 0, 0, 0, 0, 0, 0};
  for (int i = 0; i < 24; ++i)
    if (out[i] != want[i]) return {name, false, fmt("word %d = %#x, want %#x", i, out[i], want[i])};
  return {name, true, "ok"};
}

// ---- one warp MMA tile through the kernels' own fragment loaders -------------------------------
// Loaders: kPlain (load_a/load_b from global memory), kLdsm (the ldmatrix loaders, from a copy of A and B in
// shared memory, where ldmatrix reads), kLdsmTrans (the .trans loaders, from a K-major copy: A^T, B^T).
enum Loaders { kPlain, kLdsm, kLdsmTrans };

template <class Op, int LOADERS = kPlain>
void mma_tile_kernel(const typename Op::S* a, const typename Op::S* b, int ld, float* out) {
  using S = typename Op::S;
  typename Op::FragA fa;
  typename Op::FragB fb;
  float c[4];
  ADAPTERKERN_DYNAMIC_SMEM(smem);
  S* as = reinterpret_cast<S*>(smem);
  S* bs = as + 16 * ld;
  if constexpr (LOADERS == kLdsm) {
    for (int i = threadIdx.x; i < 24 * ld; i += 32) as[i] = i < 16 * ld ? a[i] : b[i - 16 * ld];  // A, then B
    __syncthreads();
  } else if constexpr (LOADERS == kLdsmTrans) {  // as[k][m] = A[m][k] (16 x 16), bs[k][n] = B[n][k] (16 x 8), row stride ld
    for (int i = threadIdx.x; i < 16 * 16; i += 32) as[(i % 16) * ld + i / 16] = a[(i / 16) * ld + i % 16];
    for (int i = threadIdx.x; i < 8 * 16; i += 32) bs[(i % 16) * ld + i / 16] = b[(i / 16) * ld + i % 16];
    __syncthreads();
  }
  for (int k0 = 0; k0 < 16; k0 += Op::kK) {  // C = A[16][16] * B[8][16]^T over 16 / kK instructions
    if constexpr (LOADERS == kLdsm) {
      Op::load_a_ldsm(fa, as + k0, ld);
      Op::load_b_ldsm(fb, bs + k0, ld);
    } else if constexpr (LOADERS == kLdsmTrans) {
      Op::load_a_ldsm_t(fa, as + k0 * ld, ld);
      Op::load_b_ldsm_t(fb, bs + k0 * ld, ld);
    } else {
      Op::load_a(fa, a + k0, ld);
      Op::load_b(fb, b + k0, ld);
    }
    if (k0 == 0)
      for (float& x : c) x = 0.25f;
    Op::mma(c, fa, fb);
  }
  for (int i = 0; i < 4; ++i) out[threadIdx.x * 4 + i] = c[i];
}

template <class Op, class Enc, class Dec, int LOADERS = kPlain>
CheckResult check_mma_tile(const char* name, Enc enc, Dec dec) {
  using S = typename Op::S;
  constexpr int ld = 24;  // K = 16 plus padding
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  std::vector<S> a(16 * ld), b(8 * ld);
  for (auto& v : a) v = enc(normal(rng));
  for (auto& v : b) v = enc(normal(rng));
  std::vector<float> out(32 * 4, NAN);
  emu::Launch(mma_tile_kernel<Op, LOADERS>, dim3(1), dim3(32), LOADERS != kPlain ? 32 * ld * sizeof(S) : 0, nullptr)(
      a.data(), b.data(), ld, out.data());
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {  // PTX accumulator layout: c_i at row groupID + 8 * (i >= 2),
                                   // column 2 * threadID_in_group + (i & 1)
      const int row = (lane >> 2) + (i >= 2 ? 8 : 0), col = 2 * (lane & 3) + (i & 1);
      double want = 0.25, mag = 0.25;
      for (int k = 0; k < 16; ++k) {
        want += dec(a[row * ld + k]) * dec(b[col * ld + k]);
        mag += std::fabs(dec(a[row * ld + k]) * dec(b[col * ld + k]));
      }
      const double got = out[lane * 4 + i];
      if (!(std::fabs(got - want) <= 4 * kU32 * mag)) {
        char buf[160];
        std::snprintf(buf, sizeof buf, "C[%d][%d] = %.7g, want %.7g (fragment layout?)", row, col, got, want);
        return {name, false, buf};
      }
    }
  return {name, true, "16x8x16 tile vs float64"};
}

}  // namespace

std::vector<CheckResult> run_selftests(int device) {
  cudaSetDevice(device);
  auto f16_enc = [](float v) { return (uint32_t)__float2half_rn(v).bits; };
  auto f16_dec = [](uint32_t h) { return (double)__half2float(__half{(uint16_t)h}); };
  auto bf16_enc = [](float v) { return (uint32_t)__float2bfloat16_rn(v).bits; };
  auto bf16_dec = [](uint32_t h) { return (double)__bfloat162float(__nv_bfloat16{(uint16_t)h}); };
  return {
      check_format("fp16 conversions", 0x7bff, half_bits_value, f16_enc, f16_dec),
      check_format("bf16 conversions", 0x7f7f, bf16_bits_value, bf16_enc, bf16_dec),
      check_tf32(),
      check_launches(),
      check_mma_tile<adapterkern::MmaF16>("MmaF16 tile (load_a/load_b/mma)", __float2half_rn,
                                          [](__half v) { return half_bits_value(v.bits); }),
      check_mma_tile<adapterkern::MmaBF16>("MmaBF16 tile (load_a/load_b/mma)", __float2bfloat16_rn,
                                           [](__nv_bfloat16 v) { return bf16_bits_value(v.bits); }),
      check_mma_tile<adapterkern::MmaTF32>("MmaTF32 tile (load_a/load_b/mma)", [](float v) { return v; },
                                           [](float v) { return (double)tf32_rna(v); }),
      check_cp_async(),
      check_mma_tile<adapterkern::MmaF16, decltype(&__float2half_rn), double (*)(__half), kLdsm>(
          "MmaF16 tile (ldmatrix loaders/mma)", __float2half_rn, [](__half v) { return half_bits_value(v.bits); }),
      check_mma_tile<adapterkern::MmaBF16, decltype(&__float2bfloat16_rn), double (*)(__nv_bfloat16), kLdsm>(
          "MmaBF16 tile (ldmatrix loaders/mma)", __float2bfloat16_rn, [](__nv_bfloat16 v) { return bf16_bits_value(v.bits); }),
      check_mma_tile<adapterkern::MmaF16, decltype(&__float2half_rn), double (*)(__half), kLdsmTrans>(
          "MmaF16 tile (ldmatrix .trans loaders/mma)", __float2half_rn, [](__half v) { return half_bits_value(v.bits); }),
      check_mma_tile<adapterkern::MmaBF16, decltype(&__float2bfloat16_rn), double (*)(__nv_bfloat16), kLdsmTrans>(
          "MmaBF16 tile (ldmatrix .trans loaders/mma)", __float2bfloat16_rn,
          [](__nv_bfloat16 v) { return bf16_bits_value(v.bits); }),
  };
}
