// Interface of the host emulator of the CUDA execution model (implementation: csrc/emu/emu.cpp).
//
// Thread model: a launch runs its blocks (its clusters, when launched with clusters) one after another;
// each block runs on blockDim OS threads
// (a pool reused across blocks and launches), one per CUDA thread, warp w = linear thread ids
// [32w, 32w + 32). `threadIdx`, `blockIdx`, `blockDim`, `gridDim` are thread_local.
//   * __syncthreads: a barrier over the block's live threads (arrivals counted under a mutex, the
//     waiters sleep on an atomic generation counter). A thread that returns from the kernel drops
//     out of later barriers (as on the hardware).
//   * Warp collectives (__shfl_xor_sync, mma.sync, ldmatrix): the 32 lanes deposit their registers in a
//     per-warp exchange (its own mutex, so warps never synchronise each other outside a barrier:
//     ThreadSanitizer sees exactly the CUDA ordering between warps). A collective that can never
//     complete (a lane waiting at __syncthreads or exited, or lanes in different collectives)
//     aborts with a message instead of hanging.
//   * Shared memory: the dynamic buffer is malloc'ed per block at exactly the launch's byte count
//     and each static __shared__ array at exactly its size, filled with 0xff bytes (NaN in every
//     element type), so an overrun is an AddressSanitizer error and an unwritten read is a NaN.
//   * Launches fail like the runtime: bad grid/block -> cudaErrorInvalidConfiguration; dynamic
//     shared memory above 48 KiB unless cudaFuncSetAttribute raised the kernel's limit (at most
//     the device's opt-in maximum) -> cudaErrorInvalidValue; static + dynamic shared memory above
//     the block limit aborts when the static arrays are first reached (sizes the emulator learns
//     only at run time).
//   * Devices: configure_device gives each emulated device id its SM count and opt-in limit. An
//     opt-in limit below 48 KiB makes a fictional device (to force small r chunks): its default
//     dynamic limit is then the opt-in limit, and static arrays may still use 48 KiB.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <tuple>
#include <type_traits>
#include <typeinfo>
#include <utility>
#include <vector>

#include "cuda_runtime_api.h"

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

namespace emu {

constexpr int kMaxDevices = 16;
constexpr size_t kDefaultSmemLimit = 48 * 1024;  // dynamic shared memory without the opt-in

struct DeviceConfig {
  int sms = 0;         // cudaDevAttrMultiProcessorCount
  int smem_optin = 0;  // cudaDevAttrMaxSharedMemoryPerBlockOptin, bytes
  bool clusters = false;  // cudaDevAttrClusterLaunch (sm_90+): launches with thread-block clusters
};
// Once per device id, before the first launch on it (the launchers cache properties per id).
void configure_device(int device, DeviceConfig config);

// ---- called by kernel code (through the hooks in csrc/kernels/common.cuh) ----------------------
void syncthreads();
unsigned char* dynamic_smem();
void* static_smem(size_t bytes);  // the i-th call of a thread returns the block's i-th array
template <class T> T* static_smem(size_t n) { return static_cast<T*>(static_smem(n * sizeof(T))); }
uint32_t shfl_xor_u32(unsigned mask, uint32_t value, int lane_mask, int width);
// `shape_types`: the instruction suffix after "mma.sync.aligned." (see ADAPTERKERN_MMA_SYNC).
void mma_sync(const char* shape_types, float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
uint32_t cvt_rna_tf32_f32(float value);
// cp.async.cg.shared.global (cp_bytes = 16): queued per thread; a group's copies are done (src[0, src_bytes)
// copied, the rest zero-filled) when cp_async_wait lets at most `pending_groups` newer groups stay in flight.
// Misaligned addresses abort (the hardware faults), and a thread may not exit with copies outstanding.
void cp_async(void* smem, const void* gmem, int cp_bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);
// ldmatrix.sync.aligned.m8n8.x{nmat}[.trans].shared.b16 (nmat 2 or 4): a warp collective on the row addresses.
void ldmatrix(int nmat, const void* row_address, uint32_t* out, bool trans = false);
// Thread-block clusters: the blocks of a cluster run at the same time (their threads together), so that
// cluster_sync (barrier.cluster arrive + wait: every live thread of the cluster) and distributed shared
// memory work; map_shared_rank(p, rank) is the address of the same byte of block `rank`'s dynamic
// shared memory (p must point into this block's). A block's shared memory lives until its whole cluster ends.
void cluster_sync();
void* map_shared_rank(const void* p, unsigned rank);

// ---- called by the launch hook (ADAPTERKERN_LAUNCH in csrc/launch_util.h) -----------------------
// Runs body() on every thread of every block; returns (and records as the last error) a launch error.
// cluster: the cluster shape (1, 1, 1: none); the grid must be a multiple of it, at most 8 blocks, on a
// device with `clusters` (else cudaErrorInvalidConfiguration).
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem_bytes,
                   const std::function<void()>& body, dim3 cluster = dim3(1, 1, 1));

// Every launch is logged per host thread, so that a test can check which configuration it exercised.
struct LaunchRecord {
  dim3 grid, block, cluster;
  size_t dynamic_smem = 0;
  cudaError_t result = cudaSuccess;
  const std::type_info* param_type = nullptr;  // the kernel's parameter type, when it takes exactly one
  std::vector<unsigned char> param;            // ... and its bytes
};
void record_launch(LaunchRecord record);
std::vector<LaunchRecord> take_launch_log();  // this thread's launches since the previous call

// `Launch(kernel, grid, block, smem, stream)(args...)` stands for `kernel<<<grid, block, smem, stream>>>(args...)`;
// with a trailing `cluster` shape, for cudaLaunchKernelEx with a cluster-dimension attribute.
template <class... P>
class Launch {
 public:
  Launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t /*stream*/,
         dim3 cluster = dim3(1, 1, 1))
      : kernel_(kernel), grid_(grid), block_(block), cluster_(cluster), smem_(smem) {}
  template <class... A>
  cudaError_t operator()(A&&... args) const {
    const std::tuple<std::remove_cvref_t<P>...> params(std::forward<A>(args)...);  // by value, as CUDA
    LaunchRecord rec;
    rec.grid = grid_, rec.block = block_, rec.cluster = cluster_, rec.dynamic_smem = smem_;
    rec.result = launch(reinterpret_cast<const void*>(kernel_), grid_, block_, smem_,
                        [&] { std::apply(kernel_, params); }, cluster_);
    if constexpr (sizeof...(P) == 1) {
      const auto& p = std::get<0>(params);
      const auto* bytes = reinterpret_cast<const unsigned char*>(&p);
      rec.param_type = &typeid(p);
      rec.param.assign(bytes, bytes + sizeof p);
    }
    const cudaError_t result = rec.result;
    record_launch(std::move(rec));
    return result;
  }

 private:
  void (*kernel_)(P...);
  dim3 grid_, block_, cluster_;
  size_t smem_;
};
template <class... P>
Launch(void (*)(P...), dim3, dim3, size_t, cudaStream_t) -> Launch<P...>;
template <class... P>
Launch(void (*)(P...), dim3, dim3, size_t, cudaStream_t, dim3) -> Launch<P...>;

}  // namespace emu
