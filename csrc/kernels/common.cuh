// Shared building blocks of the adapter kernels: element conversions, activations, the warp-level
// MMA "ops" (tensor-core mma.sync for half/bfloat16/TF32, plain FMA for IEEE fp32), register-staged
// tile loads and the warp-tile layout. Plain CUDA C++: no torch headers, compiles with nvcc alone.
//
// Conventions used by every kernel:
//   * A block has kThreads = 128 threads (4 warps).
//   * A block computes an output tile C[BM][64] += A[BM][K] * B[64][K]^T from shared memory, where
//     BOTH operands are stored K-contiguous ("A row-major, B column-major" = the mma.sync row.col
//     form). K advances in stages of kBK = 32.
//   * Warp w owns rows [wm0, wm0 + BM/WM) and columns [wn0, wn0 + 64/WN) of the block tile and
//     keeps them as MT x NT fragments of 16x8 fp32 accumulators.
//   * Shared-memory rows are padded by 16 bytes so that every row stride is 4 (mod 8) 32-bit words:
//     the fragment loads below (8 rows x 4 consecutive words) then hit 32 distinct banks.
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#ifndef ADAPTERKERN_HOST_EMULATION
#include <cooperative_groups.h>
#endif

// Host emulation hooks (csrc/README.md, "Host emulation"): built by g++ with
// -DADAPTERKERN_HOST_EMULATION against csrc/emu/include, the inline PTX and the shared-memory
// declarations become calls into the emulator (csrc/emu/include/emu.h); under nvcc each hook expands to
// exactly the CUDA code it names.
//   ADAPTERKERN_DYNAMIC_SMEM(name)       the block's dynamic shared memory as `unsigned char name[]`
//   ADAPTERKERN_STATIC_SMEM(T, name, n)  a static `__shared__ T name[n]`, 16-byte aligned
#ifdef ADAPTERKERN_HOST_EMULATION
#define ADAPTERKERN_DYNAMIC_SMEM(name) unsigned char* const name = ::emu::dynamic_smem()
#define ADAPTERKERN_STATIC_SMEM(T, name, n) T* const name = ::emu::static_smem<T>(n)
#else
#define ADAPTERKERN_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define ADAPTERKERN_STATIC_SMEM(T, name, n) __shared__ __align__(16) T name[n]
#endif

namespace adapterkern {

constexpr int kThreads = 128;  // threads per block, every kernel
constexpr int kBK = 32;        // K extent of one shared-memory stage
constexpr int kTileN = 64;     // N extent of one block output tile (and the r chunk of the forward)

// Activation ids: the same numbers as adapterkern/activations.py (kernel ABI, never renumber).
enum Act : int {
  kRelu = 0, kGelu = 1, kGeluTanh = 2, kQuickGelu = 3, kSilu = 4,
  kTanh = 5, kSigmoid = 6, kLeakyRelu = 7, kRelu6 = 8, kLinear = 9,
};

__host__ __device__ constexpr int round_up(int a, int b) { return (a + b - 1) / b * b; }
__host__ __device__ constexpr int64_t ceil_div64(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// Element conversions (round to nearest even).
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename S> __device__ __forceinline__ S from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---------------------------------------------------------------------------------------------
// Activations in fp32 (accurate libm functions; the build never uses --use_fast_math).
// NaN propagates as in PyTorch (relu(NaN) = NaN, hence no fmaxf).
constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kGeluTanhCoef = 0.044715f;
constexpr float kQuickGeluAlpha = 1.702f;
constexpr float kLeakySlope = 0.01f;

__device__ __forceinline__ float sigmoid_f(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float act_fwd(int act, float x) {
  switch (act) {
    case kRelu: return x < 0.0f ? 0.0f : x;
    case kGelu: return 0.5f * x * (1.0f + erff(x * kSqrt1_2));
    case kGeluTanh: return 0.5f * x * (1.0f + tanhf(kSqrt2OverPi * (x + kGeluTanhCoef * x * x * x)));
    case kQuickGelu: return x * sigmoid_f(kQuickGeluAlpha * x);
    case kSilu: return x * sigmoid_f(x);
    case kTanh: return tanhf(x);
    case kSigmoid: return sigmoid_f(x);
    case kLeakyRelu: return x > 0.0f ? x : kLeakySlope * x;
    case kRelu6: return x < 0.0f ? 0.0f : (x > 6.0f ? 6.0f : x);
    default: return x;  // kLinear
  }
}

// d act(x) / dx, the same conventions as PyTorch's backward formulas.
__device__ __forceinline__ float act_grad(int act, float x) {
  switch (act) {
    case kRelu: return x > 0.0f ? 1.0f : 0.0f;
    case kGelu: {
      const float cdf = 0.5f * (1.0f + erff(x * kSqrt1_2));
      const float pdf = kInvSqrt2Pi * expf(-0.5f * x * x);
      return cdf + x * pdf;
    }
    case kGeluTanh: {
      const float inner = kSqrt2OverPi * (x + kGeluTanhCoef * x * x * x);
      const float th = tanhf(inner);
      const float dinner = kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCoef * x * x);
      return 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * dinner;
    }
    case kQuickGelu: {
      const float s = sigmoid_f(kQuickGeluAlpha * x);
      return s + kQuickGeluAlpha * x * s * (1.0f - s);
    }
    case kSilu: {
      const float s = sigmoid_f(x);
      return s * (1.0f + x * (1.0f - s));
    }
    case kTanh: {
      const float th = tanhf(x);
      return 1.0f - th * th;
    }
    case kSigmoid: {
      const float s = sigmoid_f(x);
      return s * (1.0f - s);
    }
    case kLeakyRelu: return x > 0.0f ? 1.0f : kLeakySlope;
    case kRelu6: return (x > 0.0f && x < 6.0f) ? 1.0f : 0.0f;
    default: return 1.0f;  // kLinear
  }
}

// Calls f(std::integral_constant<int, ACT>{}) for the runtime activation id, so that a loop
// written inside f is compiled once per activation with the switch hoisted out of it (the
// activation is a runtime argument: 10x fewer kernel instantiations than a template parameter).
template <class F>
__device__ __forceinline__ void dispatch_act(int act, F&& f) {
  switch (act) {
    case kRelu: f(std::integral_constant<int, kRelu>{}); break;
    case kGelu: f(std::integral_constant<int, kGelu>{}); break;
    case kGeluTanh: f(std::integral_constant<int, kGeluTanh>{}); break;
    case kQuickGelu: f(std::integral_constant<int, kQuickGelu>{}); break;
    case kSilu: f(std::integral_constant<int, kSilu>{}); break;
    case kTanh: f(std::integral_constant<int, kTanh>{}); break;
    case kSigmoid: f(std::integral_constant<int, kSigmoid>{}); break;
    case kLeakyRelu: f(std::integral_constant<int, kLeakyRelu>{}); break;
    case kRelu6: f(std::integral_constant<int, kRelu6>{}); break;
    default: f(std::integral_constant<int, kLinear>{}); break;
  }
}

// Scaling: per-channel fp32 vector (len d), a single fp32 value on the device (len 1), or a
// host float (p == nullptr).
struct ScaleRef {
  const float* p;
  int64_t len;
  float value;
  __device__ __forceinline__ float operator()(int64_t j) const {
    return p == nullptr ? value : p[len == 1 ? 0 : j];
  }
};

// ---------------------------------------------------------------------------------------------
// Warp MMA ops. Each computes a 16x8 fp32 tile c += A[16][K] * B[8][K]^T for K = Op::kK, with A
// and B in shared memory, K-contiguous, leading dimension `ld` elements. Accumulator layout (the
// mma.sync C fragment, identical for every op here): lane = 4*g + t holds
//   c[0] = C[g][2t], c[1] = C[g][2t+1], c[2] = C[g+8][2t], c[3] = C[g+8][2t+1].

__device__ __forceinline__ uint32_t ld_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

// ---------------------------------------------------------------------------------------------
// sm_80+ memory instructions of the vectorised kernels. Under the host emulation they are calls into
// the emulator, which performs a cp.async's copy only when its group is waited for (the latest the
// hardware may) and decodes ldmatrix per the PTX ISA, so a missing wait or a wrong row address
// shows up as a wrong number or a sanitizer report.
//   cp_async_16(dst, src, n)   16-byte global -> shared copy of src[0, n) (n in [0, 16]), the rest of the 16
//                              bytes zero-filled; dst and src 16-byte aligned (n = 0 reads nothing)
//   cp_async_commit()          closes the group of this thread's copies issued since the last commit
//   cp_async_wait<N>()         waits until at most N of this thread's committed groups are pending
//   ldsm_x4 / ldsm_x2(r, row)  ldmatrix .m8n8 .b16: lane l gives the address of row l % 8 of matrix l / 8
//                              and receives word l % 4 of row l / 4 of each matrix
//   ldsm_x4_t / ldsm_x2_t      the same with .trans: lane l receives rows 2 (l % 4), 2 (l % 4) + 1 of column
//                              l / 4 of each matrix (operands stored K-major: rows k, columns m or n)
#ifdef ADAPTERKERN_HOST_EMULATION
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int n) { ::emu::cp_async(dst, src, 16, n); }
__device__ __forceinline__ void cp_async_commit() { ::emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { ::emu::cp_async_wait(N); }
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) { ::emu::ldmatrix(4, row, r); }
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* row) { ::emu::ldmatrix(2, row, r); }
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* row) { ::emu::ldmatrix(4, row, r, true); }
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* row) { ::emu::ldmatrix(2, row, r, true); }
#else
__device__ __forceinline__ uint32_t smem_addr(const void* p) { return (uint32_t)__cvta_generic_to_shared(p); }
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int n) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_addr(row)));
}
#endif

// ---------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90+; the kernels that use them compile their bodies for sm_90 only):
//   cluster_sync()              barrier over every thread of the cluster, with release/acquire of
//                               shared memory (distributed shared memory writes visible after it)
//   map_shared_rank(p, rank)    the address of *p in the shared memory of the cluster's block `rank`
#ifdef ADAPTERKERN_HOST_EMULATION
__device__ __forceinline__ void cluster_sync() { ::emu::cluster_sync(); }
template <typename T> __device__ __forceinline__ T* map_shared_rank(T* p, unsigned rank) {
  return static_cast<T*>(::emu::map_shared_rank(p, rank));
}
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
__device__ __forceinline__ void cluster_sync() { cooperative_groups::this_cluster().sync(); }
template <typename T> __device__ __forceinline__ T* map_shared_rank(T* p, unsigned rank) {
  return cooperative_groups::this_cluster().map_shared_rank(p, rank);
}
#else  // below sm_90 and in the host pass: never launched there (the launcher needs cudaDevAttrClusterLaunch)
__device__ __forceinline__ void cluster_sync() { __trap(); }
template <typename T> __device__ __forceinline__ T* map_shared_rank(T* p, unsigned) {
  __trap();
  return p;
}
#endif
// First statement of a kernel templated on CLUSTER: below sm_90, where a cluster kernel is never launched, its
// body is empty (nothing to compile for it there).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define ADAPTERKERN_CLUSTER_KERNEL_GUARD(CLUSTER) \
  if constexpr (CLUSTER) {                        \
    __trap();                                     \
    return;                                       \
  }
#else
#define ADAPTERKERN_CLUSTER_KERNEL_GUARD(CLUSTER) static_assert(true)
#endif

// m16n8k16, fp16 or bf16 operands. Fragment layout (PTX ISA, "mma.m16n8k16 .f16/.bf16"):
//   A regs: {A[g][2t..2t+1], A[g+8][2t..2t+1], A[g][2t+8..2t+9], A[g+8][2t+8..2t+9]}
//   B regs: {B[n=g][k=2t..2t+1], B[n=g][k=2t+8..2t+9]}   (lower k in the lower 16 bits)
template <typename T>
struct Mma16816 {
  using S = T;
  static constexpr int kK = 16;
  struct FragA { uint32_t r[4]; };
  struct FragB { uint32_t r[2]; };
  __device__ __forceinline__ static void load_a(FragA& f, const S* a, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    f.r[0] = ld_u32(a + g * ld + 2 * t);
    f.r[1] = ld_u32(a + (g + 8) * ld + 2 * t);
    f.r[2] = ld_u32(a + g * ld + 2 * t + 8);
    f.r[3] = ld_u32(a + (g + 8) * ld + 2 * t + 8);
  }
  __device__ __forceinline__ static void load_b(FragB& f, const S* b, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    f.r[0] = ld_u32(b + g * ld + 2 * t);
    f.r[1] = ld_u32(b + g * ld + 2 * t + 8);
  }
  // The same fragments with one ldmatrix each (rows 16-byte aligned): A as matrices {rows 0-7, 8-15} x
  // {k 0-7, 8-15} in register order, B as {k 0-7, 8-15} of rows n 0-7.
  __device__ __forceinline__ static void load_a_ldsm(FragA& f, const S* a, int ld) {
    const int lane = threadIdx.x & 31;
    ldsm_x4(f.r, a + (lane & 7) * ld + ((lane >> 3) & 1) * 8 * ld + (lane >> 4) * 8);
  }
  __device__ __forceinline__ static void load_b_ldsm(FragB& f, const S* b, int ld) {
    const int lane = threadIdx.x & 31;
    ldsm_x2(f.r, b + (lane & 7) * ld + ((lane >> 3) & 1) * 8);
  }
  // The same fragments from operands stored K-major (a[k * ld + m], b[k * ld + n]) by ldmatrix .trans: matrix
  // (m 0-7 | 8-15, k 0-7 | 8-15) of A is rows k of columns m, in register order; B as {k 0-7, 8-15} of n 0-7.
  __device__ __forceinline__ static void load_a_ldsm_t(FragA& f, const S* a, int ld) {
    const int lane = threadIdx.x & 31;
    ldsm_x4_t(f.r, a + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8);
  }
  __device__ __forceinline__ static void load_b_ldsm_t(FragB& f, const S* b, int ld) {
    const int lane = threadIdx.x & 31;
    ldsm_x2_t(f.r, b + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const FragA& a, const FragB& b);
};

// The operand lists of every mma.sync here (C/D: 4 fp32 in place, A: 4 regs, B: 2 regs); `shape_types`
// is the instruction's suffix after "mma.sync.aligned." (a string literal), which the host emulation
// decodes (it knows exactly the three forms used below).
#ifdef ADAPTERKERN_HOST_EMULATION
#define ADAPTERKERN_MMA_SYNC(shape_types, c, a, b) ::emu::mma_sync(shape_types, c, a.r, b.r)
#else
#define ADAPTERKERN_MMA_SYNC(shape_types, c, a, b)                                            \
  asm volatile("mma.sync.aligned." shape_types " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n" \
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])                              \
               : "r"(a.r[0]), "r"(a.r[1]), "r"(a.r[2]), "r"(a.r[3]), "r"(b.r[0]), "r"(b.r[1]))
#endif

template <>
__device__ __forceinline__ void Mma16816<__half>::mma(float (&c)[4], const FragA& a, const FragB& b) {
  ADAPTERKERN_MMA_SYNC("m16n8k16.row.col.f32.f16.f16.f32", c, a, b);
}

template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>::mma(float (&c)[4], const FragA& a, const FragB& b) {
  ADAPTERKERN_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32", c, a, b);
}

using MmaF16 = Mma16816<__half>;
using MmaBF16 = Mma16816<__nv_bfloat16>;

// m16n8k8 TF32 (fp32 storage, rounded to TF32 when the fragment is loaded). Only used when the
// caller allows TF32 (torch.backends.cuda.matmul.allow_tf32). Fragment layout (PTX ISA):
//   A regs: {A[g][t], A[g+8][t], A[g][t+4], A[g+8][t+4]};  B regs: {B[n=g][k=t], B[n=g][k=t+4]}
struct MmaTF32 {
  using S = float;
  static constexpr int kK = 8;
  struct FragA { uint32_t r[4]; };
  struct FragB { uint32_t r[2]; };
  __device__ __forceinline__ static uint32_t tf32(float v) {
    uint32_t r;
#ifdef ADAPTERKERN_HOST_EMULATION
    r = ::emu::cvt_rna_tf32_f32(v);
#else
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
#endif
    return r;
  }
  __device__ __forceinline__ static void load_a(FragA& f, const S* a, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    f.r[0] = tf32(a[g * ld + t]);
    f.r[1] = tf32(a[(g + 8) * ld + t]);
    f.r[2] = tf32(a[g * ld + t + 4]);
    f.r[3] = tf32(a[(g + 8) * ld + t + 4]);
  }
  __device__ __forceinline__ static void load_b(FragB& f, const S* b, int ld) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    f.r[0] = tf32(b[g * ld + t]);
    f.r[1] = tf32(b[g * ld + t + 4]);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const FragA& a, const FragB& b) {
    ADAPTERKERN_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32", c, a, b);
  }
};

#undef ADAPTERKERN_MMA_SYNC

// IEEE fp32 with FMAs (what cuBLAS does for fp32 when TF32 is off). Same accumulator layout as the
// tensor-core ops, so every kernel body is shared; it only changes how the warp tile is computed.
struct SimtF32 {
  using S = float;
  static constexpr int kK = 1;
};

template <class Op> struct IsSimt { static constexpr bool value = false; };
template <> struct IsSimt<SimtF32> { static constexpr bool value = true; };
template <class Op> struct HasLdsm { static constexpr bool value = false; };  // 16-bit fragments
template <typename T> struct HasLdsm<Mma16816<T>> { static constexpr bool value = true; };

// acc[MT][NT] (16x8 tiles) += A[MT*16][kBK] * B[NT*8][kBK]^T; `a` and `b` point at the warp's
// first row and the stage's first k. LDSM: fragments by ldmatrix where the op has them (every row of
// both operands 16-byte aligned), else by 32-bit shared loads.
template <class Op, int MT, int NT, bool LDSM = false>
__device__ __forceinline__ void warp_tile_mma(float (&acc)[MT][NT][4], const typename Op::S* a, int lda,
                                              const typename Op::S* b, int ldb) {
  if constexpr (IsSimt<Op>::value) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll 4
    for (int k = 0; k < kBK; ++k) {
      float av[MT][2], bv[NT][2];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        av[mt][0] = a[(mt * 16 + g) * lda + k];
        av[mt][1] = a[(mt * 16 + g + 8) * lda + k];
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        bv[nt][0] = b[(nt * 8 + 2 * t) * ldb + k];
        bv[nt][1] = b[(nt * 8 + 2 * t + 1) * ldb + k];
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          acc[mt][nt][0] = fmaf(av[mt][0], bv[nt][0], acc[mt][nt][0]);
          acc[mt][nt][1] = fmaf(av[mt][0], bv[nt][1], acc[mt][nt][1]);
          acc[mt][nt][2] = fmaf(av[mt][1], bv[nt][0], acc[mt][nt][2]);
          acc[mt][nt][3] = fmaf(av[mt][1], bv[nt][1], acc[mt][nt][3]);
        }
    }
  } else {
#pragma unroll
    for (int k = 0; k < kBK; k += Op::kK) {
      typename Op::FragA fa[MT];
      typename Op::FragB fb[NT];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (LDSM && HasLdsm<Op>::value) Op::load_a_ldsm(fa[mt], a + mt * 16 * lda + k, lda);
        else Op::load_a(fa[mt], a + mt * 16 * lda + k, lda);
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if constexpr (LDSM && HasLdsm<Op>::value) Op::load_b_ldsm(fb[nt], b + nt * 8 * ldb + k, ldb);
        else Op::load_b(fb[nt], b + nt * 8 * ldb + k, ldb);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) Op::mma(acc[mt][nt], fa[mt], fb[nt]);
    }
  }
}

// acc[mt][nt] += A[16 mt.., 0..kBK) B[8 nt.., 0..kBK)^T for 16-bit operands stored K-major: a[k * lda + m],
// b[k * ldb + n] (token-major tiles as the weight-gradient kernels load them), fragments by ldmatrix .trans.
template <class Op, int MT, int NT>
__device__ __forceinline__ void warp_tile_mma_kmajor(float (&acc)[MT][NT][4], const typename Op::S* a, int lda,
                                                     const typename Op::S* b, int ldb) {
  static_assert(HasLdsm<Op>::value, "K-major operands: the 16-bit mma.sync ops only");
#pragma unroll
  for (int k = 0; k < kBK; k += Op::kK) {
    typename Op::FragA fa[MT];
    typename Op::FragB fb[NT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) Op::load_a_ldsm_t(fa[mt], a + k * lda + mt * 16, lda);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) Op::load_b_ldsm_t(fb[nt], b + k * ldb + nt * 8, ldb);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) Op::mma(acc[mt][nt], fa[mt], fb[nt]);
  }
}

// Warp arrangement of a 4-warp block over a BM x 64 output tile.
template <int BM>
struct WarpLayout {
  static_assert(BM == 16 || BM == 64, "block tile rows must be 16 or 64");
  static constexpr int WM = BM >= 64 ? 2 : 1;  // warps along M
  static constexpr int WN = 4 / WM;            // warps along N
  static constexpr int MT = BM / WM / 16;      // 16-row fragments per warp
  static constexpr int NT = kTileN / WN / 8;   // 8-column fragments per warp
  __device__ __forceinline__ static int warp_m() { return (threadIdx.x >> 5) / WN; }
  __device__ __forceinline__ static int wm0() { return warp_m() * (BM / WM); }
  __device__ __forceinline__ static int wn0() { return ((threadIdx.x >> 5) % WN) * (kTileN / WN); }
};

template <int MT, int NT>
__device__ __forceinline__ void zero_acc(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
}

// Calls f(mt, nt, e, row, col) for every accumulator element acc[mt][nt][e] this thread holds;
// (row, col) are its block-tile coordinates.
template <int MT, int NT, class F>
__device__ __forceinline__ void for_each_frag(int wm0, int wn0, F&& f) {
  const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(mt, nt, e, wm0 + mt * 16 + g + (e >> 1) * 8, wn0 + nt * 8 + 2 * t + (e & 1));
}

// out[...] = f(row, col) for every accumulator position of this thread. Used to fetch epilogue
// operands (residual, dy, ...) with all loads issued before any store: the stores of an epilogue
// may alias its loads (r-chunk chaining), which would otherwise serialise load latency.
template <int MT, int NT, class F>
__device__ __forceinline__ void gather_acc(float (&out)[MT][NT][4], int wm0, int wn0, F&& f) {
  for_each_frag<MT, NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) { out[mt][nt][e] = f(row, col); });
}

// Copies a rows x cols tile into shared memory (row stride ld) with kBatch loads in flight per
// thread; consecutive threads take consecutive columns (coalesced for row-major sources).
template <int kBatch, typename S, class F>
__device__ __forceinline__ void copy_tile_batched(S* dst, int ld, int rows, int cols, F&& f) {
  const int total = rows * cols;
  for (int base = 0; base < total; base += kThreads * kBatch) {
    S v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int idx = base + u * kThreads + (int)threadIdx.x;
      if (idx < total) v[u] = f(idx / cols, idx % cols);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int idx = base + u * kThreads + (int)threadIdx.x;
      if (idx < total) dst[(idx / cols) * ld + idx % cols] = v[u];
    }
  }
}

// For idx in [0, n): store(idx, load(idx)), with kBatch independent loads in flight per thread
// before their results are used (a plain loop would wait one memory latency per element).
template <int kBatch, class Ld, class St>
__device__ __forceinline__ void batched_apply(int n, Ld&& load, St&& store) {
  using V = decltype(load(0));
  for (int base = 0; base < n; base += kThreads * kBatch) {
    V v[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int idx = base + u * kThreads + (int)threadIdx.x;
      if (idx < n) v[u] = load(idx);
    }
#pragma unroll
    for (int u = 0; u < kBatch; ++u) {
      const int idx = base + u * kThreads + (int)threadIdx.x;
      if (idx < n) store(idx, v[u]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// A ROWS x COLS tile staged through registers: load() issues the global loads for the next stage
// while the current stage is multiplied; store() writes it to shared memory (optionally through a
// transform g(row, col, value)). ROW_FAST: consecutive threads take consecutive rows (use it when
// the global source is contiguous along the tile's rows, e.g. a transposed operand), otherwise
// consecutive columns.
template <int ROWS, int COLS, bool ROW_FAST, typename S>
struct RegTile {
  static_assert((ROWS * COLS) % kThreads == 0, "tile must be a multiple of the block size");
  static constexpr int kN = ROWS * COLS / kThreads;
  S v[kN];
  __device__ __forceinline__ static void coord(int i, int& row, int& col) {
    const int idx = threadIdx.x + i * kThreads;
    if (ROW_FAST) { row = idx % ROWS; col = idx / ROWS; }
    else { row = idx / COLS; col = idx % COLS; }
  }
  template <class F> __device__ __forceinline__ void load(F&& f) {
#pragma unroll
    for (int i = 0; i < kN; ++i) { int row, col; coord(i, row, col); v[i] = f(row, col); }
  }
  // v = g(row, col, v) in registers (e.g. an activation, wrapped in dispatch_act by the caller).
  template <class G> __device__ __forceinline__ void apply(G&& g) {
#pragma unroll
    for (int i = 0; i < kN; ++i) { int row, col; coord(i, row, col); v[i] = g(row, col, v[i]); }
  }
  __device__ __forceinline__ void store(S* dst, int ld) const {
#pragma unroll
    for (int i = 0; i < kN; ++i) { int row, col; coord(i, row, col); dst[row * ld + col] = v[i]; }
  }
  template <class G> __device__ __forceinline__ void store(S* dst, int ld, G&& g) const {
#pragma unroll
    for (int i = 0; i < kN; ++i) { int row, col; coord(i, row, col); dst[row * ld + col] = g(row, col, v[i]); }
  }
};

// Shared-memory row padding: 16 bytes, so every row stride used here is 4 (mod 8) words.
template <typename S> __host__ __device__ constexpr int smem_pad() { return 16 / (int)sizeof(S); }

// ---------------------------------------------------------------------------------------------
// A shared-memory operand times a streamed weight tile, for this warp's part of a BM x 64 block tile:
//     acc = A[BM][0:K) * W[n0 : n0 + 64, 0:K)^T,   W(n, k) = w[n * swn + k * swk], 0 unless n < N, k < K
// Used for h @ wu^T (forward phase 2, backward dscale) and dh @ wd (backward dx), all with K = r.
// `a` points at the warp's first row of A in shared memory (row stride lda; columns [K, kpad) must
// hold zeros); kpad = round_up(K, kBK). W goes through the stage buffer `ws` ([64][kBK + pad]) one
// k-stage at a time, the next stage's global loads in flight during the current stage's MMAs.
// W_ROW_FAST: w is contiguous along n (see RegTile). Weight offsets are 32-bit (see FwdKParams).
// Codegen notes (checked on the PTX / ptxas report): w, N, K and the strides are references, to be
// bound to the kernel's own variables (its `const S* __restrict__` weight pointer, p.d, p.swu0, ...),
// so that the weight loads stay ld.global.nc (SimtF32; a by-value pointer loses that), and the bounds and strides are re-read from the parameter
// bank instead of being hoisted into registers across the k-loop (by value: +22 registers in
// adapter_fwd_kernel<MmaTF32, 64>). kpad is computed once per kernel by the caller for the same reason.
template <class Op, bool W_ROW_FAST, int MT, int NT>
__device__ __forceinline__ void smem_by_weight_mma(float (&acc)[MT][NT][4], const typename Op::S* a, int lda,
                                                   typename Op::S* ws, int wn0,
                                                   const typename Op::S* __restrict__ const& w,
                                                   const int& swn, const int& swk, int n0, const int& N,
                                                   const int& K, int kpad) {
  using S = typename Op::S;
  constexpr int LDW = kBK + smem_pad<S>();
  const S zero = S{};  // +0 (value-initialised): the bits of from_f<S>(0.0f), without a cvt per call
  zero_acc(acc);
  RegTile<kTileN, kBK, W_ROW_FAST, S> wr;  // rows: n - n0, cols: k - k0
  auto load = [&](int k0) {
    wr.load([&](int row, int col) -> S {
      const int n = n0 + row, k = k0 + col;
      return (n < N && k < K) ? w[n * swn + k * swk] : zero;
    });
  };
  load(0);
  for (int k0 = 0; k0 < kpad; k0 += kBK) {
    wr.store(ws, LDW);
    __syncthreads();
    if (k0 + kBK < kpad) load(k0 + kBK);
    warp_tile_mma<Op, MT, NT>(acc, a + k0, lda, ws + wn0 * LDW, LDW);
    __syncthreads();
  }
}

}  // namespace adapterkern
