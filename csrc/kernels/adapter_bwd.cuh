// Adapter backward. With dz = dy * scale, h = act(pre), u = h @ wu^T + bu:
//     dh      = (dz @ wu) * act'(pre)          (T, r)
//     dx      = dh @ wd (+ dy when residual is x)
//     dw_down = dh^T x,  db_down = sum_t dh
//     dw_up   = dz^T h,  db_up   = sum_t dz
//     dscale  = sum_t dy * u   (per column; the binding sums columns for a scalar scale)
//
// Two kernel families, no atomics anywhere (bitwise reproducible for a given shape and device):
//  * adapter_bwd_token_kernel: one block per BT tokens; dscale partials (one fp32 row per block,
//    summed later in block order), dh (kept in shared memory, also written to a (T, r) workspace
//    when the weight gradients of the down-projection need it) and dx.
//  * adapter_wgrad_kernel: C[m][n] = sum_t A(t,m) B(t,n) over one token range per blockIdx.z
//    (split-K), fp32 partials to a workspace; wgrad_reduce_kernel sums the splits in order.
//    Bias gradients (row sums of A) come from the same pass over A.
#pragma once

#include "common.cuh"

namespace adapterkern {

// ---------------------------------------------------------------------------------------------
struct BwdTokKParams {
  const void* dy; int64_t sdy0, sdy1;
  const void* pre; int64_t sp0, sp1;
  const void* wd; int swd0, swd1;  // 32-bit offsets for weights (see FwdKParams)
  const void* wu; int swu0, swu1;
  const void* add; int64_t sa0, sa1;  // added to dx; may alias dx (r-chunk chaining) or be nullptr
  const void* bu; int sbu;
  ScaleRef scale;
  void* dx; int64_t lddx;  // nullptr: dx not needed
  void* dh; int64_t lddh;  // nullptr: dh not needed outside the kernel
  float* dscale_ws;        // nullptr, or (gridDim.x, d) fp32 partial sums
  int accumulate;          // dscale_ws += instead of = (r chunks after the first)
  int64_t T;
  int d, r, act;
  // The vectorised kernel (adapter_bwd_vec.cuh) only:
  const void* wut; int swut;  // wu^T (r, d), rows of stride swut (the binding's transposed copy)
  const void* wdt; int swdt;  // wd^T (d, r), rows of stride swdt
  int residual;               // dx += dy (the residual is x; `add` is then dy)
  int stage_dy;               // 1: the block's whole dy tile in shared memory
  int cols_per_split;         // the block's slice of d: all of d, or one cluster block's part
  int vec, cluster;           // what the launcher chose, recorded for the emulation tests
};

// Shared memory: Hs [BT][rpad + pad] (h, then dh), Zs [BT][kBK + pad] (one k-stage of dz),
// Ws [64][kBK + pad], red [2][64] fp32 (cross-warp dscale reduction).
template <typename S>
__host__ __device__ constexpr size_t bwd_tok_smem_bytes(int BT, int r) {
  return sizeof(S) * ((size_t)BT * (round_up(r, kTileN) + smem_pad<S>()) +
                      (size_t)BT * (kBK + smem_pad<S>()) + (size_t)kTileN * (kBK + smem_pad<S>())) +
         sizeof(float) * 2 * kTileN;
}

template <class Op, int BT>
__global__ void __launch_bounds__(kThreads, 2) adapter_bwd_token_kernel(const BwdTokKParams p) {
  using S = typename Op::S;
  using L = WarpLayout<BT>;
  constexpr int PAD = smem_pad<S>();
  constexpr int LDW = kBK + PAD;
  constexpr int LDZ = kBK + PAD;

  ADAPTERKERN_DYNAMIC_SMEM(smem_raw);
  const int rpad = round_up(p.r, kTileN);
  const int ldh = rpad + PAD;
  S* Hs = reinterpret_cast<S*>(smem_raw);
  S* Zs = Hs + BT * ldh;
  S* Ws = Zs + BT * LDZ;
  float* red = reinterpret_cast<float*>(Ws + kTileN * LDW);

  const S* __restrict__ dy = static_cast<const S*>(p.dy);
  const S* __restrict__ pre = static_cast<const S*>(p.pre);
  const S* __restrict__ wd = static_cast<const S*>(p.wd);
  const S* __restrict__ wu = static_cast<const S*>(p.wu);
  const S* __restrict__ bu = static_cast<const S*>(p.bu);
  const S* add = static_cast<const S*>(p.add);  // may alias dx: no __restrict__
  S* dx = static_cast<S*>(p.dx);
  S* __restrict__ dh = static_cast<S*>(p.dh);

  const S zero = from_f<S>(0.0f);
  const int64_t t0 = (int64_t)blockIdx.x * BT;
  const int wm0 = L::wm0(), wn0 = L::wn0();
  const int lane = threadIdx.x & 31;
  const int kr = round_up(p.r, kBK);

  // ---- (1) dscale partials: ws[block][j] = sum_t dy[t,j] * (h @ wu^T + bu)[t,j] --------------
  if (p.dscale_ws != nullptr) {
    copy_tile_batched<8>(Hs, ldh, BT, rpad, [&](int row, int col) -> S {
      const int64_t t = t0 + row;
      return (t < p.T && col < p.r) ? pre[t * p.sp0 + col * p.sp1] : zero;
    });
    __syncthreads();
    dispatch_act(p.act, [&](auto A) {  // h = act(pre); padding columns stay 0
      for (int idx = threadIdx.x; idx < BT * p.r; idx += kThreads) {
        S* hp = Hs + (idx / p.r) * ldh + idx % p.r;
        *hp = from_f<S>(act_fwd(A.value, to_f(*hp)));
      }
    });
    // (the first __syncthreads inside smem_by_weight_mma orders these writes before the MMAs)
    float* ws_row = p.dscale_ws + (int64_t)blockIdx.x * p.d;
    for (int n0 = 0; n0 < p.d; n0 += kTileN) {
      float acc[L::MT][L::NT][4];  // h @ wu[n0:n0+64, :]^T (the forward's up-projection); wu[j][i]
                                   // is contiguous in i
      smem_by_weight_mma<Op, false>(acc, Hs + wm0 * ldh, ldh, Ws, wn0, wu, p.swu0, p.swu1, n0, p.d, p.r, kr);
      float dv[L::MT][L::NT][4];
      gather_acc(dv, wm0, wn0, [&](int row, int col) -> float {
        const int64_t t = t0 + row;
        const int j = n0 + col;
        return (t < p.T && j < p.d) ? to_f(dy[t * p.sdy0 + j * p.sdy1]) : 0.0f;
      });
      float cs[L::NT][2];
#pragma unroll
      for (int nt = 0; nt < L::NT; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int j = n0 + wn0 + nt * 8 + 2 * (lane & 3) + h;
          const float b = (j < p.d && bu != nullptr) ? to_f(bu[j * p.sbu]) : 0.0f;
          float s = 0.0f;
#pragma unroll
          for (int mt = 0; mt < L::MT; ++mt) {
            s = fmaf(acc[mt][nt][h] + b, dv[mt][nt][h], s);          // row g
            s = fmaf(acc[mt][nt][h + 2] + b, dv[mt][nt][h + 2], s);  // row g + 8
          }
          // Sum over the 8 lanes that share this column (lane bits 2..4); fixed order.
          s += __shfl_xor_sync(0xffffffffu, s, 4);
          s += __shfl_xor_sync(0xffffffffu, s, 8);
          s += __shfl_xor_sync(0xffffffffu, s, 16);
          cs[nt][h] = s;
        }
      if (lane < 4) {
#pragma unroll
        for (int nt = 0; nt < L::NT; ++nt)
#pragma unroll
          for (int h = 0; h < 2; ++h) red[L::warp_m() * kTileN + wn0 + nt * 8 + 2 * lane + h] = cs[nt][h];
      }
      __syncthreads();
      if (threadIdx.x < kTileN) {
        const int j = n0 + threadIdx.x;
        if (j < p.d) {
          float s = 0.0f;
#pragma unroll
          for (int wm = 0; wm < L::WM; ++wm) s += red[wm * kTileN + threadIdx.x];
          ws_row[j] = p.accumulate ? ws_row[j] + s : s;
        }
      }
      // red is rewritten only after the next tile's k-loop, which passes a __syncthreads first.
    }
    __syncthreads();  // Hs is overwritten below
  }

  if (p.dx == nullptr && dh == nullptr) return;

  // ---- (2) dH = dz @ wu (rounded to S, like the reference), 64 bottleneck columns at a time ----
  for (int n0 = 0; n0 < p.r; n0 += kTileN) {
    float acc[L::MT][L::NT][4];
    zero_acc(acc);
    RegTile<BT, kBK, false, S> zr;      // dy tile: rows t, cols j (contiguous in dy)
    RegTile<kTileN, kBK, true, S> wr;   // wu^T tile: rows i, cols j; wu[j][i] is contiguous in i
    auto load = [&](int k0) {
      zr.load([&](int row, int col) -> S {
        const int64_t t = t0 + row;
        const int j = k0 + col;
        return (t < p.T && j < p.d) ? dy[t * p.sdy0 + j * p.sdy1] : zero;
      });
      wr.load([&](int row, int col) -> S {
        const int i = n0 + row, j = k0 + col;
        return (i < p.r && j < p.d) ? wu[j * p.swu0 + i * p.swu1] : zero;
      });
    };
    load(0);
    for (int k0 = 0; k0 < p.d; k0 += kBK) {
      zr.store(Zs, LDZ, [&](int row, int col, S v) -> S {  // dz = dy * scale, rounded
        const int j = k0 + col;
        return (t0 + row < p.T && j < p.d) ? from_f<S>(to_f(v) * p.scale(j)) : zero;
      });
      wr.store(Ws, LDW);
      __syncthreads();
      if (k0 + kBK < p.d) load(k0 + kBK);
      warp_tile_mma<Op, L::MT, L::NT>(acc, Zs + wm0 * LDZ, LDZ, Ws + wn0 * LDW, LDW);
      __syncthreads();
    }
    for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
      const int i = n0 + col;
      Hs[row * ldh + i] = (t0 + row < p.T && i < p.r) ? from_f<S>(acc[mt][nt][e]) : zero;
    });
  }
  __syncthreads();
  // dh = dH * act'(pre), in place (rows < T, columns < r); written out for the weight gradients.
  dispatch_act(p.act, [&](auto A) {
    const int rows = p.T - t0 < BT ? (int)(p.T - t0) : BT;
    batched_apply<4>(
        rows * p.r,
        [&](int idx) -> float {
          const int64_t t = t0 + idx / p.r;
          return to_f(pre[t * p.sp0 + (idx % p.r) * p.sp1]);
        },
        [&](int idx, float pv) {
          const int row = idx / p.r, i = idx % p.r;
          S* hp = Hs + row * ldh + i;
          const S g = from_f<S>(to_f(*hp) * act_grad(A.value, pv));
          *hp = g;
          if (dh != nullptr) dh[(t0 + row) * p.lddh + i] = g;
        });
  });
  __syncthreads();

  if (p.dx == nullptr) return;

  // ---- (3) dx = dh @ wd + add -------------------------------------------------------------------
  for (int n0 = 0; n0 < p.d; n0 += kTileN) {
    float acc[L::MT][L::NT][4];  // Hs @ wd^T tile (rows j, cols i); wd[i][j] is contiguous in j
    smem_by_weight_mma<Op, true>(acc, Hs + wm0 * ldh, ldh, Ws, wn0, wd, p.swd1, p.swd0, n0, p.d, p.r, kr);
    float av[L::MT][L::NT][4];  // all loads of `add` before any store to dx (they may alias)
    gather_acc(av, wm0, wn0, [&](int row, int col) -> float {
      const int64_t t = t0 + row;
      const int j = n0 + col;
      return (add != nullptr && t < p.T && j < p.d) ? to_f(add[t * p.sa0 + j * p.sa1]) : 0.0f;
    });
    for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
      const int64_t t = t0 + row;
      const int j = n0 + col;
      if (t < p.T && j < p.d) dx[t * p.lddx + j] = from_f<S>(acc[mt][nt][e] + av[mt][nt][e]);
    });
  }
}

// ---------------------------------------------------------------------------------------------
struct WgKParams {
  const void* a; int64_t sa0, sa1; int a_mode;  // A(t, m), m < M
  const void* b; int64_t sb0, sb1; int b_mode;  // B(t, n), n < N
  int M, N;
  int need_w, need_b;
  ScaleRef scale;
  int act;
  int64_t T, tchunk;
  float* ws_w;  // (gridDim.z, M, N)
  float* ws_b;  // (gridDim.z, M)
  int vec;      // launched as adapter_wgrad_vec_kernel (recorded for the emulation tests)
};

// Block tile 64 (m) x 64 (n); blockIdx.z = token range [z * tchunk, min(T, (z+1) * tchunk)).
// Both operands are staged transposed (K = tokens contiguous in shared memory); the global reads
// are along m / n, which is the contiguous dimension of every source (dy, pre, dh, x).
template <class Op>
__global__ void __launch_bounds__(kThreads, 2) adapter_wgrad_kernel(const WgKParams p) {
  using S = typename Op::S;
  using L = WarpLayout<64>;
  constexpr int LDW = kBK + smem_pad<S>();
  ADAPTERKERN_STATIC_SMEM(S, As, kTileN * LDW);
  ADAPTERKERN_STATIC_SMEM(S, Bs, kTileN * LDW);

  const S* __restrict__ a = static_cast<const S*>(p.a);
  const S* __restrict__ b = static_cast<const S*>(p.b);
  const S zero = from_f<S>(0.0f);
  const int m0 = blockIdx.x * kTileN, n0 = blockIdx.y * kTileN;
  const int64_t tb = (int64_t)blockIdx.z * p.tchunk;
  const int64_t te = p.T < tb + p.tchunk ? p.T : tb + p.tchunk;
  const int wm0 = L::wm0(), wn0 = L::wn0();
  const bool do_bias = p.need_b && blockIdx.y == 0;

  float acc[L::MT][L::NT][4];
  zero_acc(acc);
  float bsum = 0.0f;  // thread m < 64: sum over tokens of A(t, m0 + m)
  RegTile<kTileN, kBK, true, S> ar, br;  // rows m / n, cols t
  auto load = [&](int64_t k0) {
    ar.load([&](int row, int col) -> S {
      const int m = m0 + row;
      const int64_t t = k0 + col;
      return (m < p.M && t < te) ? a[t * p.sa0 + m * p.sa1] : zero;
    });
    if (p.need_w)
      br.load([&](int row, int col) -> S {
        const int n = n0 + row;
        const int64_t t = k0 + col;
        return (n < p.N && t < te) ? b[t * p.sb0 + n * p.sb1] : zero;
      });
  };
  if (tb < te) load(tb);
  for (int64_t k0 = tb; k0 < te; k0 += kBK) {
    if (p.a_mode == kScaled) {  // dz = dy * scale(m), rounded; padding stays exactly 0
      ar.apply([&](int row, int col, S v) -> S {
        const int m = m0 + row;
        return (m < p.M && k0 + col < te) ? from_f<S>(to_f(v) * p.scale(m)) : zero;
      });
    }
    ar.store(As, LDW);
    if (p.need_w) {
      if (p.b_mode == kAct) {  // h = act(pre), rounded; padding stays exactly 0
        dispatch_act(p.act, [&](auto A) {
          br.apply([&](int row, int col, S v) -> S {
            return (n0 + row < p.N && k0 + col < te) ? from_f<S>(act_fwd(A.value, to_f(v))) : zero;
          });
        });
      }
      br.store(Bs, LDW);
    }
    __syncthreads();
    if (k0 + kBK < te) load(k0 + kBK);
    if (p.need_w) warp_tile_mma<Op, L::MT, L::NT>(acc, As + wm0 * LDW, LDW, Bs + wn0 * LDW, LDW);
    if (do_bias && threadIdx.x < kTileN) {
#pragma unroll 8
      for (int c = 0; c < kBK; ++c) bsum += to_f(As[threadIdx.x * LDW + c]);
    }
    __syncthreads();
  }

  const int64_t z = blockIdx.z;
  if (p.need_w) {
    for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
      const int m = m0 + row, n = n0 + col;
      if (m < p.M && n < p.N) p.ws_w[(z * p.M + m) * p.N + n] = acc[mt][nt][e];
    });
  }
  if (do_bias && threadIdx.x < kTileN && m0 + (int)threadIdx.x < p.M)
    p.ws_b[z * p.M + m0 + threadIdx.x] = bsum;
}

// out[i] = sum_{z < nsplit} ws[z * n + i], in z order (deterministic), rounded to S.
template <typename S>
__global__ void __launch_bounds__(256) wgrad_reduce_kernel(const float* __restrict__ ws, int nsplit, int64_t n,
                                                            S* __restrict__ out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    float s = 0.0f;
    for (int z = 0; z < nsplit; ++z) s += ws[z * n + i];
    out[i] = from_f<S>(s);
  }
}

}  // namespace adapterkern
