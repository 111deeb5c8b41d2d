// Host helpers shared by the launchers (*.cu): cached device properties and the one-time opt-in to
// large dynamic shared memory. Plain CUDA runtime, no torch.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

// `ADAPTERKERN_LAUNCH(grid, block, smem, stream, kernel)(args...)` is the kernel launch
// `kernel<<<grid, block, smem, stream>>>(args...)` (the kernel last: a template-id's commas are
// fine there). Under the host emulation (csrc/README.md, "Host emulation") it runs the kernel on
// host threads with the same launch checks.
// `ADAPTERKERN_LAUNCH_CLUSTER(grid, block, smem, stream, cluster, kernel)(args...)`: the same launch with
// thread-block clusters of shape `cluster` (cudaLaunchKernelEx with a cluster-dimension attribute).
#ifdef ADAPTERKERN_HOST_EMULATION
#define ADAPTERKERN_LAUNCH(grid, block, smem, stream, ...) ::emu::Launch(__VA_ARGS__, grid, block, smem, stream)
#define ADAPTERKERN_LAUNCH_CLUSTER(grid, block, smem, stream, cluster, ...) \
  ::emu::Launch(__VA_ARGS__, grid, block, smem, stream, cluster)
#else
#define ADAPTERKERN_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define ADAPTERKERN_LAUNCH_CLUSTER(grid, block, smem, stream, cluster, ...) \
  ::adapterkern::ClusterLaunch(__VA_ARGS__, grid, block, smem, stream, cluster)
#endif

namespace adapterkern {

#ifndef ADAPTERKERN_HOST_EMULATION
template <class... P>
class ClusterLaunch {
 public:
  ClusterLaunch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream, dim3 cluster)
      : kernel_(kernel) {
    attr_.id = cudaLaunchAttributeClusterDimension;
    attr_.val.clusterDim.x = cluster.x;
    attr_.val.clusterDim.y = cluster.y;
    attr_.val.clusterDim.z = cluster.z;
    config_.gridDim = grid;
    config_.blockDim = block;
    config_.dynamicSmemBytes = smem;
    config_.stream = stream;
    config_.attrs = &attr_;
    config_.numAttrs = 1;
  }
  template <class... A>
  cudaError_t operator()(A&&... args) {
    return cudaLaunchKernelEx(&config_, kernel_, std::forward<A>(args)...);
  }

 private:
  void (*kernel_)(P...);
  cudaLaunchAttribute attr_{};
  cudaLaunchConfig_t config_{};
};
#endif

struct DevInfo {
  int sms = 0;         // multiprocessor count
  int smem_optin = 0;  // max dynamic shared memory per block (bytes) after opting in
  bool clusters = false;  // thread-block cluster launches (sm_90+)
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
  int clusters = 0;
  e = cudaDeviceGetAttribute(&clusters, cudaDevAttrClusterLaunch, dev);
  if (e != cudaSuccess) return e;
  info.clusters = clusters != 0;
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

// The vectorised kernels' requirement on a (rows, cols) operand of element type S: 16-byte aligned rows of
// unit column stride.
template <typename S>
bool vector_ok(const void* p, int64_t s0, int64_t s1) {
  constexpr int64_t V = 16 / (int64_t)sizeof(S);
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && s1 == 1 && s0 % V == 0;
}

}  // namespace adapterkern
