// Host helpers shared by the launchers (*.cu): cached device properties and the one-time opt-in to
// large dynamic shared memory. Plain CUDA runtime, no torch.
#pragma once

#include <cuda_runtime.h>

// `ADAPTERKERN_LAUNCH(grid, block, smem, stream, kernel)(args...)` is the kernel launch
// `kernel<<<grid, block, smem, stream>>>(args...)` (the kernel last: a template-id's commas are
// fine there). Under the host emulation (csrc/README.md, "Host emulation") it runs the kernel on
// host threads with the same launch checks.
#ifdef ADAPTERKERN_HOST_EMULATION
#define ADAPTERKERN_LAUNCH(grid, block, smem, stream, ...) ::emu::Launch(__VA_ARGS__, grid, block, smem, stream)
#else
#define ADAPTERKERN_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace adapterkern {

struct DevInfo {
  int sms = 0;         // multiprocessor count
  int smem_optin = 0;  // max dynamic shared memory per block (bytes) after opting in
};

// Properties of the current device, queried once per device (cudaDeviceGetAttribute is cheap,
// but this sits on the decode-size launch path).
inline cudaError_t current_dev_info(DevInfo* out, int* dev_out = nullptr) {
  constexpr int kMaxDev = 64;
  static DevInfo cache[kMaxDev];
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev_out) *dev_out = dev;
  if (dev < kMaxDev && cache[dev].sms > 0) { *out = cache[dev]; return cudaSuccess; }
  DevInfo info;
  e = cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev);
  if (e != cudaSuccess) return e;
  e = cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (e != cudaSuccess) return e;
  if (dev < kMaxDev) cache[dev] = info;
  *out = info;
  return cudaSuccess;
}

// Raise a kernel's dynamic shared memory limit to the device maximum, once per (kernel, device).
// Done once rather than per launch so that launches inside CUDA-graph capture make no such call
// after warm-up.
template <auto kKernel>
inline cudaError_t allow_max_smem(size_t needed) {
  if (needed <= 48 * 1024) return cudaSuccess;
  constexpr int kMaxDev = 64;
  static bool done[kMaxDev] = {};  // one table per kernel (template instance)
  DevInfo info;
  int dev = 0;
  cudaError_t e = current_dev_info(&info, &dev);
  if (e != cudaSuccess) return e;
  if (dev < kMaxDev && done[dev]) return cudaSuccess;
  e = cudaFuncSetAttribute(kKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, info.smem_optin);
  if (e == cudaSuccess && dev < kMaxDev) done[dev] = true;
  return e;
}

}  // namespace adapterkern
