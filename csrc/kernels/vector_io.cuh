// The vectorised memory path of the VEC kernels (adapter_fwd.cuh, adapter_bwd_vec.cuh): 16-byte chunks,
// cp.async into kStages-deep rings, and the fp32 epilogue tile's row stride.
#pragma once

#include "common.cuh"

namespace adapterkern {

// cp.async pipeline depth of the VEC kernels: kStages - 1 = 3 stages in flight, 12 KiB of x per 64-token
// block, ~24 KiB per SM at two blocks per SM (Little's law at ~4.3 TB/s and ~0.7 us: ~23 KiB per SM).
constexpr int kStages = 4;
constexpr int kLdy = kTileN + 8;  // Ys row stride (fp32): 8 (mod 32) words, conflict-free 8-byte fragment stores

// 16 bytes of elements, for one vector load or store (LDG.128 / STG.128 / LDS.128 on aligned addresses).
template <typename S>
struct alignas(16) Vec16 {
  static constexpr int kN = 16 / (int)sizeof(S);
  S v[kN];
};

// f(row, col) for each 16-byte chunk of a ROWS x kBK stage (col: its first element, a multiple of
// Vec16<S>::kN); consecutive threads take consecutive chunks of a row. Not unrolled: unrolled, the
// chunks' addresses are hoisted out of the k-loops and live in registers (ptxas: 146-230 registers
// instead of 106-124 on sm_90).
template <int ROWS, typename S, class F>
__device__ __forceinline__ void for_each_stage_chunk(F&& f) {
  constexpr int kPerRow = kBK / Vec16<S>::kN;
  constexpr int kChunks = ROWS * kPerRow;
#pragma unroll 1
  for (int c0 = 0; c0 < kChunks; c0 += kThreads) {
    const int c = c0 + (int)threadIdx.x;
    if (kChunks % kThreads == 0 || c < kChunks) f(c / kPerRow, (c % kPerRow) * Vec16<S>::kN);
  }
}

// cp.async of the 16-byte chunk src[0, min(kN, valid)) (valid <= 0: nothing read, all zeros; `base` is
// then the aligned address handed to the instruction).
template <typename S>
__device__ __forceinline__ void copy_chunk_async(S* dst, const S* src, int valid, const S* base) {
  const int n = valid <= 0 ? 0 : (valid < Vec16<S>::kN ? valid : Vec16<S>::kN);
  cp_async_16(dst, n > 0 ? src : base, n * (int)sizeof(S));
}

// Issues (uncommitted) one k-stage [k0, k0 + kBK) of a vectorised down-projection k-loop (the forward's
// x @ wd^T, the backward's dz @ wu): with load_tok the token operand's BT rows by copy_tok(dst, row, col) into
// tok (row stride ld_tok), and rows [n0, n0 + 64) of the weight w (row stride ldw; rows >= N and columns >= K
// zero) into the weight slot ws [64][kBK + pad].
template <int BT, typename S, class CopyTok>
__device__ __forceinline__ void issue_k_stage(bool load_tok, S* tok, int ld_tok, CopyTok&& copy_tok, S* ws, const S* w,
                                              int ldw, int n0, int N, int k0, int K) {
  constexpr int LDW = kBK + smem_pad<S>();
  if (load_tok) for_each_stage_chunk<BT, S>([&](int row, int col) { copy_tok(tok + row * ld_tok + col, row, k0 + col); });
  for_each_stage_chunk<kTileN, S>([&](int row, int col) {
    const int i = n0 + row, j = k0 + col;
    copy_chunk_async(ws + row * LDW + col, w + i * ldw + j, i < N ? K - j : 0, w);
  });
}

// out[row * ld + col], out[row * ld + col + 1] = v(mt, nt, half) (a float2) for each accumulator fragment this
// thread holds: rows g (half 0) and g + 8 (half 1) of tile (mt, nt), columns 2t and 2t + 1. One 8-byte store
// each, conflict-free at ld = kLdy.
template <int MT, int NT, class F>
__device__ __forceinline__ void store_frag_pairs(float* out, int ld, int wm0, int wn0, F&& v) {
  const int lane = threadIdx.x & 31;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = wm0 + mt * 16 + (lane >> 2) + half * 8;
        const int col = wn0 + nt * 8 + 2 * (lane & 3);
        *reinterpret_cast<float2*>(out + row * ld + col) = v(mt, nt, half);
      }
}

// dst[row * ld_dst + i] = src[row * ld_src + i] for rows < min(rows, BT), columns i < cols, 16 bytes at a time
// (dst rows 16-byte aligned; a scalar tail where cols is not a multiple of the vector width).
template <int BT, typename S>
__device__ __forceinline__ void store_rows(S* dst, int64_t ld_dst, const S* src, int ld_src, int64_t rows, int cols) {
  constexpr int V = Vec16<S>::kN;
  const int per_row = (cols + V - 1) / V;
  for (int c = threadIdx.x; c < BT * per_row; c += kThreads) {
    const int row = c / per_row, i = (c % per_row) * V;
    if (row >= rows) continue;
    S* d = dst + row * ld_dst + i;
    const S* s = src + row * ld_src + i;
    if (i + V <= cols) *reinterpret_cast<Vec16<S>*>(d) = *reinterpret_cast<const Vec16<S>*>(s);
    else {
#pragma unroll 1
      for (int e = 0; e < cols - i; ++e) d[e] = s[e];
    }
  }
}

// Row padding of the cluster kernels' fp32 partials [BT][rpad + 4]; their r limit (the partials stay small).
constexpr int kPartialPad = 4;
constexpr int kClusterMaxRank = 128;

}  // namespace adapterkern
