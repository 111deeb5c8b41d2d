// Host stand-in for cuda_runtime.h: the CUDA C++ keywords and device built-ins the kernels in
// csrc/kernels use, mapped onto the emulator (emu.h). `__shared__` is deliberately left undefined:
// shared memory must be declared through ADAPTERKERN_DYNAMIC_SMEM / ADAPTERKERN_STATIC_SMEM
// (csrc/kernels/common.cuh), which the emulator sizes and checks.
#pragma once

#include <bit>
#include <cmath>
#include <math.h>

#include "cuda_runtime_api.h"
#include "emu.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

inline void __syncthreads() { emu::syncthreads(); }

template <class T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable_v<T>, "emulated for 32-bit types only");
  return std::bit_cast<T>(emu::shfl_xor_u32(mask, std::bit_cast<uint32_t>(value), lane_mask, width));
}

// CUDA's integer min/max overloads (device code calls them unqualified).
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
