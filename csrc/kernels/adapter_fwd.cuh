// Fused adapter forward: one launch computes, for a block of BT tokens,
//     pre = x @ wd^T + bd                      (fp32 accumulate, rounded to the element type)
//     h   = act(pre)                           (kept in shared memory, never written to HBM)
//     y   = res + scale * (h @ wu^T + bu)      (res = x: read back from the staged x tile)
//
// Shapes: x (T, d) with any strides; wd (r, d); wu (d, r); y (T, d) row stride ldy; pre (T, r).
// Grid: (ceil(T / BT), nsplit). Every block computes all of h for its tokens (phase 1), then the
// output columns [blockIdx.y * cols_per_split, ...) (phase 2). nsplit > 1 only for small T, where it
// buys parallelism at the price of re-reading wd from L2 once per split.
//
// Shared memory (dynamic, element type S = the input dtype):
//   Hs [BT][rpad + pad]          h for every r (rpad = r rounded up to 64)
//   Xs [BT][dpad + pad]          the whole x tile when stage_x (dpad = d rounded up to 64), else a
//                                [BT][kBK + pad] staging buffer for one k-stage
//   Ws [64][kBK + pad]           one k-stage of wd (phase 1) or wu (phase 2)
// Decode path (few token blocks): phase 1's k-loop is replaced by the sum of the partial products
// adapter_fwd_partial_kernel computed over d-splits, so the d-reduction runs on the whole GPU.
// The launcher picks stage_x when the whole tile fits, so for res = x the residual add re-reads
// nothing from HBM. Bounds: every load outside [0,T) x [0,d) x [0,r) is zero-filled, every store
// is masked, so any T >= 0, d >= 1, r >= 1 works.
#pragma once

#include "common.cuh"

namespace adapterkern {

struct FwdKParams {
  const void* x; int64_t sx0, sx1;
  const void* res; int64_t sr0, sr1;  // nullptr -> residual is x
  // Weights and biases use 32-bit element offsets (the binding checks they fit): 64-bit ones cost
  // ~90 registers in the BT=64 kernels. Token-indexed tensors always use 64-bit offsets.
  const void* wd; int swd0, swd1;
  const void* wu; int swu0, swu1;
  const void* bd; int sbd;
  const void* bu; int sbu;
  ScaleRef scale;
  void* y; int64_t ldy;
  void* pre; int64_t ldpre;
  int64_t T;
  int d, r, act;
  int stage_x;          // 1: whole x tile in shared memory
  int cols_per_split;   // multiple of 64
  // Decode (few token blocks): pre = sum over ksplit of partial[s][t][i] (adapter_fwd_partial_kernel,
  // fp32, layout (ksplit, T, round_up(r, 64))) + bd, in split order, instead of phase 1's k-loop.
  const float* partial; int ksplit;
};

// The split-d down-projection of the decode path: block (b, s) writes
//     partial[s][t][i] = sum over j in [s * k_chunk, (s + 1) * k_chunk) of x[t][j] * wd[i][j]
// for its BT tokens and every i < round_up(r, 64) (padding columns 0), fp32, no bias. Grid:
// (ceil(T / BT), ksplit). Shared memory: Xs [BT][kBK + pad], Ws [64][kBK + pad].
struct FwdPartialParams {
  const void* x; int64_t sx0, sx1;
  const void* wd; int swd0, swd1;
  float* partial;
  int64_t T;
  int d, r, k_chunk;  // k_chunk: a multiple of kBK
};

template <typename S>
__host__ __device__ constexpr size_t fwd_partial_smem_bytes(int BT) {
  return sizeof(S) * ((size_t)BT + kTileN) * (kBK + smem_pad<S>());
}

template <class Op, int BT>
__global__ void __launch_bounds__(kThreads, 2) adapter_fwd_partial_kernel(const FwdPartialParams p) {
  using S = typename Op::S;
  using L = WarpLayout<BT>;
  constexpr int LD = kBK + smem_pad<S>();
  ADAPTERKERN_DYNAMIC_SMEM(smem_raw);
  S* Xs = reinterpret_cast<S*>(smem_raw);
  S* Ws = Xs + BT * LD;
  const S* __restrict__ x = static_cast<const S*>(p.x);
  const S* __restrict__ wd = static_cast<const S*>(p.wd);
  const S zero = from_f<S>(0.0f);
  const int64_t t0 = (int64_t)blockIdx.x * BT;
  const int k_begin = (int)blockIdx.y * p.k_chunk;
  const int k_end = min(p.d, k_begin + p.k_chunk);
  const int rpad = round_up(p.r, kTileN);
  float* __restrict__ out = p.partial + (int64_t)blockIdx.y * p.T * rpad;
  const int wm0 = L::wm0(), wn0 = L::wn0();
  for (int n0 = 0; n0 < p.r; n0 += kTileN) {
    float acc[L::MT][L::NT][4];
    zero_acc(acc);
    RegTile<BT, kBK, false, S> xr;
    RegTile<kTileN, kBK, false, S> wr;
    auto load = [&](int k0) {
      xr.load([&](int row, int col) -> S {
        const int64_t t = t0 + row;
        const int j = k0 + col;
        return (t < p.T && j < k_end) ? x[t * p.sx0 + j * p.sx1] : zero;
      });
      wr.load([&](int row, int col) -> S {
        const int i = n0 + row, j = k0 + col;
        return (i < p.r && j < k_end) ? wd[i * p.swd0 + j * p.swd1] : zero;
      });
    };
    load(k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += kBK) {
      xr.store(Xs, LD);
      wr.store(Ws, LD);
      __syncthreads();
      if (k0 + kBK < k_end) load(k0 + kBK);  // in flight during the MMAs
      warp_tile_mma<Op, L::MT, L::NT>(acc, Xs + wm0 * LD, LD, Ws + wn0 * LD, LD);
      __syncthreads();
    }
    for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
      const int64_t t = t0 + row;
      if (t < p.T) out[t * rpad + n0 + col] = acc[mt][nt][e];
    });
  }
}

template <typename S>
__host__ __device__ constexpr size_t fwd_smem_bytes(int BT, int d, int r, bool stage_x) {
  return sizeof(S) * ((size_t)BT * (round_up(r, kTileN) + smem_pad<S>()) +
                      (size_t)BT * ((stage_x ? round_up(d, kTileN) : kBK) + smem_pad<S>()) +
                      (size_t)kTileN * (kBK + smem_pad<S>()));
}

// The decode path runs with 16-token tiles only; the 64-token kernel keeps no code for it (registers).
template <int BT> inline constexpr bool kDecodeCapable = BT == 16;

template <class Op, int BT>
__global__ void __launch_bounds__(kThreads, 2) adapter_fwd_kernel(const FwdKParams p) {
  using S = typename Op::S;
  using L = WarpLayout<BT>;
  constexpr int PAD = smem_pad<S>();
  constexpr int LDW = kBK + PAD;

  ADAPTERKERN_DYNAMIC_SMEM(smem_raw);
  const int rpad = round_up(p.r, kTileN);
  const int ldh = rpad + PAD;
  const int ldx = p.stage_x ? round_up(p.d, kTileN) + PAD : kBK + PAD;
  S* Hs = reinterpret_cast<S*>(smem_raw);
  S* Xs = Hs + BT * ldh;
  S* Ws = Xs + BT * ldx;

  const S* __restrict__ x = static_cast<const S*>(p.x);
  const S* __restrict__ wd = static_cast<const S*>(p.wd);
  const S* __restrict__ wu = static_cast<const S*>(p.wu);
  const S* __restrict__ bd = static_cast<const S*>(p.bd);
  const S* __restrict__ bu = static_cast<const S*>(p.bu);
  const S* res = static_cast<const S*>(p.res);  // may alias y (r-chunk chaining): no __restrict__
  S* y = static_cast<S*>(p.y);
  S* __restrict__ pre = static_cast<S*>(p.pre);

  const S zero = from_f<S>(0.0f);
  const int64_t t0 = (int64_t)blockIdx.x * BT;
  const int wm0 = L::wm0(), wn0 = L::wn0();

  auto x_at = [&](int row, int col) -> S {
    const int64_t t = t0 + row;
    return (t < p.T && col < p.d) ? x[t * p.sx0 + col * p.sx1] : zero;
  };

  if (p.stage_x) {  // made visible by the first __syncthreads of the k-loop below
    copy_tile_batched<8>(Xs, ldx, BT, round_up(p.d, kTileN), x_at);
  }

  // ---- phase 1: Hs = act(x @ wd^T + bd), 64 bottleneck columns at a time ----------------------
  for (int n0 = 0; n0 < p.r; n0 += kTileN) {
    float acc[L::MT][L::NT][4];
    zero_acc(acc);
    RegTile<BT, kBK, false, S> xr;
    RegTile<kTileN, kBK, false, S> wr;  // rows: bottleneck index i, cols: d index (contiguous in wd)
    auto load = [&](int k0) {
      if (!p.stage_x) xr.load([&](int row, int col) { return x_at(row, k0 + col); });
      wr.load([&](int row, int col) -> S {
        const int i = n0 + row, j = k0 + col;
        return (i < p.r && j < p.d) ? wd[i * p.swd0 + j * p.swd1] : zero;
      });
    };
    if (!kDecodeCapable<BT> || p.partial == nullptr) {  // else: the decode path's partials hold x @ wd^T
      load(0);
      for (int k0 = 0; k0 < p.d; k0 += kBK) {
        if (!p.stage_x) xr.store(Xs, ldx);
        wr.store(Ws, LDW);
        __syncthreads();
        if (k0 + kBK < p.d) load(k0 + kBK);  // in flight during the MMAs
        const S* a = (p.stage_x ? Xs + k0 : Xs) + wm0 * ldx;
        warp_tile_mma<Op, L::MT, L::NT>(acc, a, ldx, Ws + wn0 * LDW, LDW);
        __syncthreads();
      }
    }
    float bcol[L::NT][2];  // bd of the 2*NT bottleneck columns this thread owns
#pragma unroll
    for (int nt = 0; nt < L::NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int i = n0 + wn0 + nt * 8 + 2 * (threadIdx.x & 3) + h;
        bcol[nt][h] = (i < p.r && bd != nullptr) ? to_f(bd[i * p.sbd]) : 0.0f;
      }
    for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
      const int i = n0 + col;  // < rpad, inside Hs
      const int64_t t = t0 + row;
      S pv = zero;  // padded bottleneck columns stay exactly 0 (wu is zero-filled there too)
      if (i < p.r) {
        float v = acc[mt][nt][e];
        if constexpr (kDecodeCapable<BT>) {
          if (p.partial != nullptr && t < p.T) {  // the splits in order: deterministic
            v = 0.0f;
            for (int sp = 0; sp < p.ksplit; ++sp) v += p.partial[((int64_t)sp * p.T + t) * rpad + i];
          }
        }
        pv = from_f<S>(v + bcol[nt][e & 1]);
        if (pre != nullptr && t < p.T) pre[t * p.ldpre + i] = pv;
      }
      Hs[row * ldh + i] = pv;
    });
  }
  __syncthreads();
  // h = act(pre), in place, on the rounded pre like the reference (padding columns untouched).
  dispatch_act(p.act, [&](auto A) {
    for (int idx = threadIdx.x; idx < BT * p.r; idx += kThreads) {
      S* hp = Hs + (idx / p.r) * ldh + idx % p.r;
      *hp = from_f<S>(act_fwd(A.value, to_f(*hp)));
    }
  });
  __syncthreads();  // Hs complete

  // ---- phase 2: y = res + scale * (Hs @ wu^T + bu) for this block's columns -------------------
  const int kr = round_up(p.r, kBK);
  const int j_begin = blockIdx.y * p.cols_per_split;
  const int j_end = min(p.d, j_begin + p.cols_per_split);
  for (int n0 = j_begin; n0 < j_end; n0 += kTileN) {
    float acc[L::MT][L::NT][4];  // Hs @ wu[n0:n0+64, :]^T; wu[j][i] is contiguous in i
    smem_by_weight_mma<Op, false>(acc, Hs + wm0 * ldh, ldh, Ws, wn0, wu, p.swu0, p.swu1, n0, p.d, p.r, kr);
    float rv[L::MT][L::NT][4];  // residual, all loads issued before the stores (res may alias y)
    gather_acc(rv, wm0, wn0, [&](int row, int col) -> float {
      const int j = n0 + col;
      const int64_t t = t0 + row;
      if (t >= p.T || j >= j_end) return 0.0f;
      if (res != nullptr) return to_f(res[t * p.sr0 + j * p.sr1]);
      if (p.stage_x) return to_f(Xs[row * ldx + j]);
      return to_f(x[t * p.sx0 + j * p.sx1]);
    });
    float bcol[L::NT][2], scol[L::NT][2];  // bu and scale of the 2*NT columns this thread owns
#pragma unroll
    for (int nt = 0; nt < L::NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = n0 + wn0 + nt * 8 + 2 * (threadIdx.x & 3) + h;
        bcol[nt][h] = (j < j_end && bu != nullptr) ? to_f(bu[j * p.sbu]) : 0.0f;
        scol[nt][h] = j < j_end ? p.scale(j) : 0.0f;
      }
    for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
      const int j = n0 + col;
      const int64_t t = t0 + row;
      if (t < p.T && j < j_end)
        y[t * p.ldy + j] = from_f<S>(rv[mt][nt][e] + scol[nt][e & 1] * (acc[mt][nt][e] + bcol[nt][e & 1]));
    });
  }
}

}  // namespace adapterkern
