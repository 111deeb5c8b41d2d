// Host stand-in for the CUDA runtime API, exactly the part csrc/ uses (csrc/emu/README: "Host
// emulation" in csrc/README.md). Kernels run on host threads (csrc/emu/emu.cpp); "device memory" is
// host memory. Errors are reported like the CUDA runtime: a failed launch sets the calling host
// thread's last error, returned and cleared by cudaGetLastError.
#pragma once

#ifndef ADAPTERKERN_HOST_EMULATION
#error "csrc/emu/include is the host emulation of CUDA: compile with -DADAPTERKERN_HOST_EMULATION"
#endif

#include <cstddef>

struct uint3 {
  unsigned int x, y, z;
};

struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};

enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
using cudaError = cudaError_t;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrClusterLaunch = 120,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetDevice(int* device);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);

namespace emu {
cudaError_t func_set_attribute(const void* kernel, cudaFuncAttribute attr, int value);
}

// The kernel is identified by its address (one attribute table per emulated device).
template <class F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  return emu::func_set_attribute(reinterpret_cast<const void*>(kernel), attr, value);
}
