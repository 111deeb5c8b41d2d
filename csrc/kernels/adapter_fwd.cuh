// Fused adapter forward: one launch computes, for a block of BT tokens,
//     pre = x @ wd^T + bd                      (fp32 accumulate, rounded to the element type)
//     h   = act(pre)                           (kept in shared memory, never written to HBM)
//     y   = res + scale * (h @ wu^T + bu)      (res = x: read back from the staged x tile)
//
// Shapes: x (T, d) with any strides; wd (r, d); wu (d, r); y (T, d) row stride ldy; pre (T, r).
// Grid: (ceil(T / BT), nsplit). Every block computes all of h for its tokens (phase 1), then the
// output columns [blockIdx.y * cols_per_split, ...) (phase 2). nsplit > 1 for small T, where it buys
// parallelism at the price of re-reading wd from L2 once per split, and for the CLUSTER kernel, whose
// grid.y is one thread-block cluster (its blocks share one token tile, one slice of d each: see below).
//
// Shared memory (dynamic, element type S = the input dtype):
//   Hs [BT][rpad + pad]          h for every r (rpad = r rounded up to 64)
//   Xs [BT][dpad + pad]          the whole x tile when stage_x (dpad = d rounded up to 64), else a
//                                [BT][kBK + pad] staging buffer for one k-stage
//   Ws [64][kBK + pad]           one k-stage of wd (phase 1) or wu (phase 2)
// Decode path (few token blocks): phase 1's k-loop is replaced by the sum of the partial products
// adapter_fwd_partial_kernel computed over d-splits, so the d-reduction runs on the whole GPU.
// The launcher picks stage_x when the whole tile fits, so for res = x the residual add re-reads
// nothing from HBM.
// VEC (the vectorised memory path, chosen by the launcher when x, res, the weights, y and pre are 16-byte
// aligned with unit column stride and row strides a multiple of 16 bytes): every global load is a 16-byte
// cp.async into a kStages-deep ring (x into its staged tile), fragments come by ldmatrix, pre is copied
// from Hs in 16-byte stores, and phase 2 writes s * (acc + bu) to an fp32 tile Ys [BT][kTileN + 8] so that
// y moves in 16-byte stores; the residual tile (unless it is the staged x) arrives by cp.async in a
// kStages-slot ring Rs [BT][kTileN + pad], a tile ahead. Shared memory: Hs, Xs (staged, or kStages
// x-stages), kStages weight stages, Ys, Rs (unless x is staged and res = x), Ps (CLUSTER).
// CLUSTER (sm_90+): block c of the cluster stages x[:, slice c] only, writes its partial x @ wd^T over that
// slice to the fp32 tile Ps [BT][rpad + 4]; after a cluster barrier every block sums the cluster's partials
// in rank order from distributed shared memory, so x is read from HBM once even where a token tile's whole
// x would not fit in one block.
// Bounds: every load outside [0,T) x [0,d) x [0,r) is zero-filled, every store is masked, so any T >= 0,
// d >= 1, r >= 1 works.
#pragma once

#include "common.cuh"
#include "vector_io.cuh"

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
  int vec;              // 1: launched as the VEC kernel (the launcher's choice, recorded for the emulation tests)
  int cluster;          // > 1: the cluster kernel, clusters of this many blocks along grid.y (recorded likewise)
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

// Bytes of dynamic shared memory of adapter_fwd_kernel<Op, BT, vec, cluster>; separate_res: res != nullptr
// (VEC then needs its residual ring even when x is staged); with cluster, d is the block's column slice.
template <typename S>
__host__ __device__ constexpr size_t fwd_smem_bytes(int BT, int d, int r, bool stage_x, bool vec, bool separate_res,
                                                    bool cluster = false) {
  const size_t ring = vec ? kStages : 1;
  const bool residual_ring = vec && (!stage_x || separate_res);
  return sizeof(S) * ((size_t)BT * (round_up(r, kTileN) + smem_pad<S>()) +
                      (stage_x ? (size_t)BT * (round_up(d, kTileN) + smem_pad<S>()) : ring * BT * (kBK + smem_pad<S>())) +
                      ring * kTileN * (kBK + smem_pad<S>())) +
         (vec ? sizeof(float) * BT * kLdy : 0) + (residual_ring ? sizeof(S) * kStages * BT * (kTileN + smem_pad<S>()) : 0) +
         (cluster ? sizeof(float) * BT * (round_up(r, kTileN) + kPartialPad) : 0);
}

// The decode path runs with 16-token tiles only; the 64-token kernel keeps no code for it (registers).
template <int BT> inline constexpr bool kDecodeCapable = BT == 16;

template <class Op, int BT, bool VEC, bool CLUSTER = false>
__global__ void __launch_bounds__(kThreads, 2) adapter_fwd_kernel(const FwdKParams p) {
  static_assert(!CLUSTER || (VEC && BT == 64), "the cluster kernel is the vectorised 64-token one");
  ADAPTERKERN_CLUSTER_KERNEL_GUARD(CLUSTER);
  using S = typename Op::S;
  using L = WarpLayout<BT>;
  constexpr int PAD = smem_pad<S>();
  constexpr int LDW = kBK + PAD;
  constexpr int V = Vec16<S>::kN;
  constexpr int kRing = VEC ? kStages : 1;

  ADAPTERKERN_DYNAMIC_SMEM(smem_raw);
  const int rpad = round_up(p.r, kTileN);
  const int ldh = rpad + PAD;
  // Output columns of this block: a column split, or (CLUSTER) the block's slice of d, which is also the
  // k-range of its phase 1 and all its staged x tile holds.
  const int j_begin = blockIdx.y * p.cols_per_split;
  const int j_end = min(p.d, j_begin + p.cols_per_split);
  const int x_col0 = CLUSTER ? j_begin : 0, k_end = CLUSTER ? j_end : p.d;
  const int ldx = p.stage_x ? round_up(CLUSTER ? p.cols_per_split : p.d, kTileN) + PAD : kBK + PAD;
  S* Hs = reinterpret_cast<S*>(smem_raw);
  S* Xs = Hs + BT * ldh;
  S* Ws = Xs + (p.stage_x ? BT * ldx : kRing * BT * LDW);
  float* Ys = reinterpret_cast<float*>(Ws + kRing * kTileN * LDW);  // VEC only: [BT][kLdy]
  S* Rs = reinterpret_cast<S*>(Ys + BT * kLdy);                      // VEC, unless x staged and res = x: kStages x [BT][kTileN + PAD]

  const S* __restrict__ x = static_cast<const S*>(p.x);
  const S* __restrict__ wd = static_cast<const S*>(p.wd);
  const S* __restrict__ wu = static_cast<const S*>(p.wu);
  const S* __restrict__ bd = static_cast<const S*>(p.bd);
  const S* __restrict__ bu = static_cast<const S*>(p.bu);
  const S* res = static_cast<const S*>(p.res);  // may alias y (r-chunk chaining): no __restrict__
  S* y = static_cast<S*>(p.y);
  S* __restrict__ pre = static_cast<S*>(p.pre);
  const bool from_xs = res == nullptr && p.stage_x;  // the residual is the staged x tile
  float* Ps = reinterpret_cast<float*>(Rs + (from_xs ? 0 : kStages * BT * (kTileN + PAD)));  // CLUSTER: [BT][rpad + 4]
  const int ldp = rpad + kPartialPad;

  const S zero = from_f<S>(0.0f);
  const int64_t t0 = (int64_t)blockIdx.x * BT;
  const int wm0 = L::wm0(), wn0 = L::wn0();
  const bool skip_down = kDecodeCapable<BT> && p.partial != nullptr;  // the decode path's partials hold x @ wd^T

  auto x_at = [&](int row, int col) -> S {
    const int64_t t = t0 + row;
    return (t < p.T && col < p.d) ? x[t * p.sx0 + col * p.sx1] : zero;
  };
  // VEC: 16-byte copies of x[t0 + row][j, j + V) (zeros outside (T, d)) into dst.
  auto copy_x_chunk = [&](S* dst, int row, int j) {
    const int64_t t = t0 + row;
    copy_chunk_async(dst, x + t * p.sx0 + j, t < p.T ? p.d - j : 0, x);
  };
  // VEC, x staged: columns [x_col0, x_col0 + ncols) of the tile into Xs in one go (zeros past d), uncommitted.
  auto stage_x_columns = [&](int ncols) {
    const int per_row = (int)ceil_div64(ncols, V);
    for (int c = threadIdx.x; c < BT * per_row; c += kThreads)
      copy_x_chunk(Xs + (c / per_row) * ldx + (c % per_row) * V, c / per_row, x_col0 + (c % per_row) * V);
  };

  if (p.stage_x) {  // made visible by the first __syncthreads of the k-loop below
    if constexpr (VEC) {
      if (skip_down) {  // no k-loop streams x in: the residual still reads the staged tile
        stage_x_columns(p.d);
        cp_async_commit();
        cp_async_wait<0>();
      }
    } else {
      copy_tile_batched<8>(Xs, ldx, BT, round_up(p.d, kTileN), x_at);
    }
  }

  // ---- phase 1: Hs = act(x @ wd^T + bd), 64 bottleneck columns at a time ----------------------
  for (int n0 = 0; n0 < p.r; n0 += kTileN) {
    float acc[L::MT][L::NT][4];
    zero_acc(acc);
    if constexpr (VEC) {
      // k-stage k0 of x (unless staged by an earlier r chunk) and wd into ring slot (k0 / kBK) % kStages.
      // CLUSTER: the whole x slice is issued with the first stage instead (it has its own place in the staged
      // tile, not a ring slot), so all of it is in flight at once: at one block per SM a 3-stage window of x
      // would not keep DRAM busy.
      const bool load_x = (!p.stage_x || n0 == 0) && !CLUSTER;
      if constexpr (CLUSTER) {
        if (n0 == 0) stage_x_columns(round_up(k_end - x_col0, kBK));  // every column the MMAs read
      }
      auto issue = [&](int k0) {
        if (k0 < k_end) {
          const int slot = ((k0 - x_col0) / kBK) % kStages;
          issue_k_stage<BT>(load_x, p.stage_x ? Xs + (k0 - x_col0) : Xs + slot * BT * LDW, p.stage_x ? ldx : LDW,
                            copy_x_chunk, Ws + slot * kTileN * LDW, wd, p.swd0, n0, p.r, k0, p.d);
        }
        cp_async_commit();  // an empty group past the end keeps the wait counts uniform
      };
      if (!skip_down) {
#pragma unroll
        for (int s = 0; s < kStages - 1; ++s) issue(x_col0 + s * kBK);
        for (int k0 = x_col0; k0 < k_end; k0 += kBK) {
          cp_async_wait<kStages - 2>();
          __syncthreads();                      // stage k0 visible; the slot refilled next was consumed
          issue(k0 + (kStages - 1) * kBK);
          const int slot = ((k0 - x_col0) / kBK) % kStages;
          const S* a = p.stage_x ? Xs + wm0 * ldx + (k0 - x_col0) : Xs + slot * BT * LDW + wm0 * LDW;
          warp_tile_mma<Op, L::MT, L::NT, true>(acc, a, p.stage_x ? ldx : LDW, Ws + slot * kTileN * LDW + wn0 * LDW, LDW);
        }
        cp_async_wait<0>();
        __syncthreads();  // the ring is free for the next r chunk
      }
    } else {
      RegTile<BT, kBK, false, S> xr;
      RegTile<kTileN, kBK, false, S> wr;  // rows: bottleneck index i, cols: d index (contiguous in wd)
      auto load = [&](int k0) {
        if (!p.stage_x) xr.load([&](int row, int col) { return x_at(row, k0 + col); });
        wr.load([&](int row, int col) -> S {
          const int i = n0 + row, j = k0 + col;
          return (i < p.r && j < p.d) ? wd[i * p.swd0 + j * p.swd1] : zero;
        });
      };
      if (!skip_down) {
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
    }
    if constexpr (CLUSTER) {  // this block's partial pre over its slice of d; summed across the cluster below
      for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
        Ps[row * ldp + n0 + col] = acc[mt][nt][e];
      });
    } else {
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
          if (!VEC && pre != nullptr && t < p.T) pre[t * p.ldpre + i] = pv;  // VEC: copied from Hs below
        }
        Hs[row * ldh + i] = pv;
      });
    }
  }
  if constexpr (CLUSTER) {
    // pre = the cluster's partials summed in rank order (deterministic) + bd, from distributed shared
    // memory; padding columns 0. Every block keeps its partials until the cluster's last barrier.
    cluster_sync();
    for (int idx = threadIdx.x; idx < BT * rpad; idx += kThreads) {
      const int row = idx / rpad, i = idx % rpad;
      S pv = zero;
      if (i < p.r) {
        float v = 0.0f;
        for (unsigned c = 0; c < gridDim.y; ++c) v += map_shared_rank(Ps, c)[row * ldp + i];
        pv = from_f<S>(v + (bd != nullptr ? to_f(bd[i * p.sbd]) : 0.0f));
      }
      Hs[row * ldh + i] = pv;
    }
  }
  __syncthreads();
  if constexpr (VEC) {  // pre = Hs (before the activation), 16 bytes at a time; one block of a cluster
    if (pre != nullptr && (!CLUSTER || blockIdx.y == 0)) {
      store_rows<BT>(pre + t0 * p.ldpre, p.ldpre, Hs, ldh, p.T - t0, p.r);
      __syncthreads();  // read before the activation overwrites Hs
    }
  }
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
  // bu and scale of the 2*NT output columns this thread owns in the tile at n0
  auto column_terms = [&](int n0, float (&bcol)[L::NT][2], float (&scol)[L::NT][2]) {
#pragma unroll
    for (int nt = 0; nt < L::NT; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = n0 + wn0 + nt * 8 + 2 * (threadIdx.x & 3) + h;
        bcol[nt][h] = (j < j_end && bu != nullptr) ? to_f(bu[j * p.sbu]) : 0.0f;
        scol[nt][h] = j < j_end ? p.scale(j) : 0.0f;
      }
  };
  if constexpr (VEC) {
    // One stream of wu stages over (output tile, k-stage) pairs q, kStages - 1 in flight across tiles. The
    // residual tile m (unless it is the staged x) joins the group of tile m's first stage, into ring slot
    // m % kStages: its previous tile's copy-out ended before the barrier of a step at least one before.
    constexpr int kPerRow = kTileN / V;
    constexpr int LDR = kTileN + PAD;
    const int ksteps = kr / kBK;
    const int total = (int)ceil_div64(j_end - j_begin, kTileN) * ksteps;
    auto issue = [&](int q) {
      if (q < total) {
        const int n0 = j_begin + (q / ksteps) * kTileN, k0 = (q % ksteps) * kBK;
        S* ws = Ws + (q % kStages) * kTileN * LDW;
        for_each_stage_chunk<kTileN, S>([&](int row, int col) {
          const int j = n0 + row, i = k0 + col;
          copy_chunk_async(ws + row * LDW + col, wu + j * p.swu0 + i, j < j_end ? p.r - i : 0, wu);
        });
        if (!from_xs && k0 == 0) {
          S* rs = Rs + (q / ksteps % kStages) * BT * LDR;
          for (int c = threadIdx.x; c < BT * kPerRow; c += kThreads) {
            const int row = c / kPerRow, col = (c % kPerRow) * V;
            const int64_t t = t0 + row;
            const int j = n0 + col;
            const S* src = res != nullptr ? res + t * p.sr0 + j : x + t * p.sx0 + j;
            copy_chunk_async(rs + row * LDR + col, src, t < p.T ? j_end - j : 0, x);
          }
        }
      }
      cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) issue(s);
    int q = 0;
    for (int n0 = j_begin, m = 0; n0 < j_end; n0 += kTileN, ++m) {
      float acc[L::MT][L::NT][4];
      zero_acc(acc);
      for (int k0 = 0; k0 < kr; k0 += kBK, ++q) {
        cp_async_wait<kStages - 2>();
        __syncthreads();  // stage q visible; the previous tile's copy-out is done with Ys
        issue(q + kStages - 1);
        warp_tile_mma<Op, L::MT, L::NT, true>(acc, Hs + wm0 * ldh + k0, ldh, Ws + (q % kStages) * kTileN * LDW + wn0 * LDW, LDW);
      }
      float bcol[L::NT][2], scol[L::NT][2];
      column_terms(n0, bcol, scol);
      store_frag_pairs<L::MT, L::NT>(Ys, kLdy, wm0, wn0, [&](int mt, int nt, int half) {
        return make_float2(scol[nt][0] * (acc[mt][nt][2 * half] + bcol[nt][0]),
                           scol[nt][1] * (acc[mt][nt][2 * half + 1] + bcol[nt][1]));
      });
      __syncthreads();
      // y = res + Ys, 16 bytes at a time, the residual from shared memory (a scalar tail only where d is
      // not a multiple of V)
      const S* rs = Rs + (m % kStages) * BT * LDR;
      for (int c = threadIdx.x; c < BT * kPerRow; c += kThreads) {
        const int row = c / kPerRow, j = n0 + (c % kPerRow) * V;
        const int64_t t = t0 + row;
        if (t >= p.T || j >= j_end) continue;
        const float* v = Ys + row * kLdy + (j - n0);
        const S* rp = from_xs ? Xs + row * ldx + (j - x_col0) : rs + row * LDR + (j - n0);
        S* yp = y + t * p.ldy + j;
        if (j + V <= j_end) {
          const Vec16<S> rv = *reinterpret_cast<const Vec16<S>*>(rp);
          Vec16<S> out;
#pragma unroll
          for (int e = 0; e < V; ++e) out.v[e] = from_f<S>(to_f(rv.v[e]) + v[e]);
          *reinterpret_cast<Vec16<S>*>(yp) = out;
        } else {
#pragma unroll 1
          for (int e = 0; e < j_end - j; ++e) yp[e] = from_f<S>(to_f(rp[e]) + v[e]);
        }
      }
    }
    cp_async_wait<0>();  // the trailing groups are empty: no copy outlives the block
    if constexpr (CLUSTER) cluster_sync();  // the other blocks are done reading this block's partials
  } else {
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
      float bcol[L::NT][2], scol[L::NT][2];
      column_terms(n0, bcol, scol);
      for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
        const int j = n0 + col;
        const int64_t t = t0 + row;
        if (t < p.T && j < j_end)
          y[t * p.ldy + j] = from_f<S>(rv[mt][nt][e] + scol[nt][e & 1] * (acc[mt][nt][e] + bcol[nt][e & 1]));
      });
    }
  }
}

}  // namespace adapterkern
