// The token-parallel backward on the vectorised memory path (the maths: adapter_bwd.cuh): for a block of BT
// tokens, with dz = dy * scale (rounded), h = act(pre),
//     dH = dz @ wu                  phase 1: a k-loop over d; B = wu^T (r, d), the binding's transposed copy
//     dh = dH * act'(pre)           kept in shared memory (in place of pre), written out for the weight gradients
//     dx = dh @ wd (+ dy)           phase 2, per 64-column tile of d; B = wd^T (d, r), the binding's copy
//     dscale partials = sum_t dy * (h @ wu^T + bu)   in the same tiles (B = wu), from the same dy tile
// Every bulk load is a 16-byte cp.async into a kStages-deep ring (or, for dy, into its staged tile); fragments
// come by ldmatrix; dx moves through the fp32 tile Ys in 16-byte stores, dh from shared memory likewise.
// dy is read from HBM once where the block's dy tile fits in shared memory (stage_dy), else twice (phase 1's
// ring, then a tile ahead of phase 2 in the ring Rs). CLUSTER (sm_90+, 64-token tiles): the tile is spread
// over a thread-block cluster, one slice of d per block; each block stages its slice of dy, writes its partial
// dH over the slice to the fp32 tile Ps, and after a cluster barrier every block sums the cluster's partials in
// rank order from distributed shared memory: dy read once where one block could not hold the tile.
//
// Shared memory (S = the element type): Qs [BT][rpad + pad] (pre, then dh), Hs [BT][rpad + pad] (h; with
// dscale only), Ds (staged: [BT][round_up(cols, 64) + pad], else kStages x [BT][kBK + pad]), Zs [BT][kBK + pad]
// (one k-stage of dz), Ws kStages x [64][kBK + pad], Rs kStages x [BT][64 + pad] (unstaged only); fp32: Ys
// [BT][kLdy], red [2][64], Ps [BT][rpad + 4] (CLUSTER).
// Requirements (the launcher's): dy, pre, dx, dh and the three weight operands 16-byte aligned with unit column
// stride and row strides a multiple of 16 bytes; one r chunk; `add` is dy or nothing.
#pragma once

#include "adapter_bwd.cuh"
#include "vector_io.cuh"

namespace adapterkern {

template <typename S>
__host__ __device__ constexpr size_t bwd_vec_smem_bytes(int BT, int cols, int r, bool stage_dy, bool dscale,
                                                        bool cluster) {
  const size_t ldh = (size_t)round_up(r, kTileN) + smem_pad<S>();
  const size_t ldw = (size_t)kBK + smem_pad<S>();
  return sizeof(S) * ((size_t)BT * ldh * (dscale ? 2 : 1) +
                      (stage_dy ? (size_t)BT * (round_up(cols, kTileN) + smem_pad<S>()) : kStages * BT * ldw) +
                      (size_t)BT * ldw + kStages * kTileN * ldw +
                      (stage_dy ? 0 : (size_t)kStages * BT * (kTileN + smem_pad<S>()))) +
         sizeof(float) * ((size_t)BT * kLdy + 2 * kTileN +
                          (cluster ? (size_t)BT * (round_up(r, kTileN) + kPartialPad) : 0));
}

template <class Op, int BT, bool CLUSTER>
__global__ void __launch_bounds__(kThreads, 2) adapter_bwd_token_vec_kernel(const BwdTokKParams p) {
  static_assert(!CLUSTER || BT == 64, "the cluster kernel is the 64-token one");
  ADAPTERKERN_CLUSTER_KERNEL_GUARD(CLUSTER);
  using S = typename Op::S;
  using L = WarpLayout<BT>;
  constexpr int PAD = smem_pad<S>();
  constexpr int LDW = kBK + PAD;
  constexpr int LDR = kTileN + PAD;
  constexpr int V = Vec16<S>::kN;

  ADAPTERKERN_DYNAMIC_SMEM(smem_raw);
  const int rpad = round_up(p.r, kTileN);
  const int ldh = rpad + PAD;
  const bool dscale = p.dscale_ws != nullptr;
  // This block's columns: all of d, or (CLUSTER) its slice, which is also phase 1's k-range.
  const int j_begin = blockIdx.y * p.cols_per_split;
  const int j_end = min(p.d, j_begin + p.cols_per_split);
  const int ldd = p.stage_dy ? round_up(p.cols_per_split, kTileN) + PAD : LDW;
  S* Qs = reinterpret_cast<S*>(smem_raw);
  S* Hs = Qs + BT * ldh;
  S* Ds = Hs + (dscale ? BT * ldh : 0);
  S* Zs = Ds + (p.stage_dy ? BT * ldd : kStages * BT * LDW);
  S* Ws = Zs + BT * LDW;
  S* Rs = Ws + kStages * kTileN * LDW;
  float* Ys = reinterpret_cast<float*>(Rs + (p.stage_dy ? 0 : kStages * BT * LDR));
  float* red = Ys + BT * kLdy;
  float* Ps = red + 2 * kTileN;
  const int ldp = rpad + kPartialPad;

  const S* __restrict__ dy = static_cast<const S*>(p.dy);
  const S* __restrict__ pre = static_cast<const S*>(p.pre);
  const S* __restrict__ wut = static_cast<const S*>(p.wut);
  const S* __restrict__ wdt = static_cast<const S*>(p.wdt);
  const S* __restrict__ wu = static_cast<const S*>(p.wu);
  const S* __restrict__ bu = static_cast<const S*>(p.bu);
  S* __restrict__ dx = static_cast<S*>(p.dx);
  S* __restrict__ dh = static_cast<S*>(p.dh);

  const S zero = from_f<S>(0.0f);
  const int64_t t0 = (int64_t)blockIdx.x * BT;
  const int wm0 = L::wm0(), wn0 = L::wn0();
  const int lane = threadIdx.x & 31;
  const bool unit_scale = p.scale.p == nullptr && p.scale.value == 1.0f;  // dz = dy: no conversion pass
  const int x_col0 = CLUSTER ? j_begin : 0, k_end = CLUSTER ? j_end : p.d;

  // 16-byte copies of dy[t0 + row][j, j + V), zeros outside (T, min(d, limit)).
  auto copy_dy_chunk = [&](S* dst, int row, int j, int limit) {
    const int64_t t = t0 + row;
    copy_chunk_async(dst, dy + t * p.sdy0 + j, t < p.T ? limit - j : 0, dy);
  };

  // ---- pre into Qs (its own group, the first) ---------------------------------------------------
  {
    const int per_row = (int)ceil_div64(p.r, V);
    for (int c = threadIdx.x; c < BT * per_row; c += kThreads) {
      const int row = c / per_row, i = (c % per_row) * V;
      const int64_t t = t0 + row;
      copy_chunk_async(Qs + row * ldh + i, pre + t * p.sp0 + i, t < p.T ? p.r - i : 0, pre);
    }
    cp_async_commit();
  }

  // ---- phase 1: dH = dz @ wu, 64 bottleneck columns at a time -----------------------------------
  for (int n0 = 0; n0 < p.r; n0 += kTileN) {
    float acc[L::MT][L::NT][4];
    zero_acc(acc);
    // CLUSTER: the whole slice of dy is issued with the first stage (its own place in the staged tile), so all
    // of it is in flight at once, as in the forward's cluster kernel.
    const bool load_dy = (!p.stage_dy || n0 == 0) && !CLUSTER;
    if constexpr (CLUSTER) {
      if (n0 == 0) {
        const int per_row = round_up(k_end - x_col0, kBK) / V;  // every column the MMAs read
        for (int c = threadIdx.x; c < BT * per_row; c += kThreads)
          copy_dy_chunk(Ds + (c / per_row) * ldd + (c % per_row) * V, c / per_row, x_col0 + (c % per_row) * V, p.d);
      }
    }
    auto issue = [&](int k0) {
      if (k0 < k_end) {
        const int slot = ((k0 - x_col0) / kBK) % kStages;
        issue_k_stage<BT>(load_dy, p.stage_dy ? Ds + (k0 - x_col0) : Ds + slot * BT * LDW, p.stage_dy ? ldd : LDW,
                          [&](S* dst, int row, int j) { copy_dy_chunk(dst, row, j, p.d); }, Ws + slot * kTileN * LDW,
                          wut, p.swut, n0, p.r, k0, p.d);
      }
      cp_async_commit();  // an empty group past the end keeps the wait counts uniform
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) issue(x_col0 + s * kBK);
    if (n0 == 0) {
      cp_async_wait<kStages - 1>();  // pre's group (the oldest) has landed
      __syncthreads();
      // h = act(pre) for phase 2's dscale; padding columns of Qs and Hs exactly 0 (phase 2's MMAs read them)
      dispatch_act(p.act, [&](auto A) {
        for (int idx = threadIdx.x; idx < BT * rpad; idx += kThreads) {
          const int row = idx / rpad, i = idx % rpad;
          if (i < p.r) {
            if (dscale) Hs[row * ldh + i] = from_f<S>(act_fwd(A.value, to_f(Qs[row * ldh + i])));
          } else {
            Qs[row * ldh + i] = zero;
            if (dscale) Hs[row * ldh + i] = zero;
          }
        }
      });
    }
    const int c = threadIdx.x % kBK;  // the stage column this thread converts (kThreads is a multiple of kBK)
    for (int k0 = x_col0; k0 < k_end; k0 += kBK) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // stage k0 visible; the slot refilled next and Zs were consumed
      issue(k0 + (kStages - 1) * kBK);
      const int slot = ((k0 - x_col0) / kBK) % kStages;
      const S* a = p.stage_dy ? Ds + (k0 - x_col0) : Ds + slot * BT * LDW;
      int lda = p.stage_dy ? ldd : LDW;
      if (!unit_scale) {  // dz = dy * scale, rounded like the reference; zero past d
        const float sc = k0 + c < p.d ? p.scale(k0 + c) : 0.0f;
        for (int row = threadIdx.x / kBK; row < BT; row += kThreads / kBK)
          Zs[row * LDW + c] = from_f<S>(to_f(a[row * lda + c]) * sc);
        __syncthreads();
        a = Zs, lda = LDW;
      }
      warp_tile_mma<Op, L::MT, L::NT, true>(acc, a + wm0 * lda, lda, Ws + slot * kTileN * LDW + wn0 * LDW, LDW);
    }
    cp_async_wait<0>();
    __syncthreads();  // the ring is free for the next r chunk
    if constexpr (CLUSTER) {  // this block's partial dH over its slice; summed across the cluster below
      for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
        Ps[row * ldp + n0 + col] = acc[mt][nt][e];
      });
    } else {  // dh = round(dH) * act'(pre), in place of pre (each element read and written by its owner)
      dispatch_act(p.act, [&](auto A) {
        for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int col) {
          const int i = n0 + col;
          S* q = Qs + row * ldh + i;
          if (i < p.r) *q = from_f<S>(to_f(from_f<S>(acc[mt][nt][e])) * act_grad(A.value, to_f(*q)));
        });
      });
    }
  }
  if constexpr (CLUSTER) {
    // dH = the cluster's partials summed in rank order (deterministic); every block keeps its partials until
    // the cluster's last barrier.
    cluster_sync();
    dispatch_act(p.act, [&](auto A) {
      for (int idx = threadIdx.x; idx < BT * p.r; idx += kThreads) {
        const int row = idx / p.r, i = idx % p.r;
        float v = 0.0f;
        for (unsigned cb = 0; cb < gridDim.y; ++cb) v += map_shared_rank(Ps, cb)[row * ldp + i];
        S* q = Qs + row * ldh + i;
        *q = from_f<S>(to_f(from_f<S>(v)) * act_grad(A.value, to_f(*q)));
      }
    });
  }
  __syncthreads();  // dh complete in Qs
  if (dh != nullptr && (!CLUSTER || blockIdx.y == 0))  // dh out, 16 bytes at a time (one block of a cluster)
    store_rows<BT>(dh + t0 * p.lddh, p.lddh, Qs, ldh, p.T - t0, p.r);

  // ---- phase 2: per 64-column tile of this block's columns, dscale partials and dx ---------------
  if (dx != nullptr || dscale) {
    constexpr int kPerRow = kTileN / V;
    const int ksteps = round_up(p.r, kBK) / kBK;
    const int per_tile = ksteps * ((dscale ? 1 : 0) + (dx != nullptr ? 1 : 0));  // u's k-steps, then dx's
    const int total = (int)ceil_div64(j_end - j_begin, kTileN) * per_tile;
    const bool dy_ring = !p.stage_dy && (p.residual || dscale);
    // Stage q of one stream over (tile, product, k-step): a [64 columns][kBK] tile of wu (u = h @ wu^T) or of
    // wd^T (dh @ wd), into ring slot q % kStages; a tile's dy (unstaged) joins its first stage's group, into
    // ring slot tile % kStages: that slot's previous tile finished its copy-out before an earlier barrier.
    auto issue = [&](int q) {
      if (q < total) {
        const int m = q / per_tile, w = q % per_tile;
        const bool is_u = dscale && w < ksteps;
        const int n0 = j_begin + m * kTileN, k0 = (w % ksteps) * kBK;
        const S* src = is_u ? wu : wdt;
        const int ld = is_u ? p.swu0 : p.swdt;
        S* ws = Ws + (q % kStages) * kTileN * LDW;
        for_each_stage_chunk<kTileN, S>([&](int row, int col) {
          const int j = n0 + row, i = k0 + col;
          copy_chunk_async(ws + row * LDW + col, src + j * ld + i, j < j_end ? p.r - i : 0, src);
        });
        if (dy_ring && w == 0) {
          S* rs = Rs + (m % kStages) * BT * LDR;
          for (int cc = threadIdx.x; cc < BT * kPerRow; cc += kThreads)
            copy_dy_chunk(rs + (cc / kPerRow) * LDR + (cc % kPerRow) * V, cc / kPerRow, n0 + (cc % kPerRow) * V, j_end);
        }
      }
      cp_async_commit();
    };
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) issue(s);
    float* ws_row = dscale ? p.dscale_ws + (int64_t)blockIdx.x * p.d : nullptr;
    int q = 0;
    for (int n0 = j_begin, m = 0; n0 < j_end; n0 += kTileN, ++m) {
      float acc_u[L::MT][L::NT][4], acc_x[L::MT][L::NT][4];
      zero_acc(acc_u);
      zero_acc(acc_x);
      for (int w = 0; w < per_tile; ++w, ++q) {
        cp_async_wait<kStages - 2>();
        __syncthreads();  // stage q visible; the previous tile's copy-out is done with Ys and red
        issue(q + kStages - 1);
        const S* wsl = Ws + (q % kStages) * kTileN * LDW + wn0 * LDW;
        const int k0 = (w % ksteps) * kBK;
        if (dscale && w < ksteps) warp_tile_mma<Op, L::MT, L::NT, true>(acc_u, Hs + wm0 * ldh + k0, ldh, wsl, LDW);
        else warp_tile_mma<Op, L::MT, L::NT, true>(acc_x, Qs + wm0 * ldh + k0, ldh, wsl, LDW);
      }
      // dy of this tile: the staged tile, or its ring slot (landed with the tile's first stage)
      const S* dyt = p.stage_dy ? Ds + (n0 - x_col0) : Rs + (m % kStages) * BT * LDR;
      const int ldt = p.stage_dy ? ldd : LDR;
      if (dscale) {  // ws_row[j] = sum_t dy[t][j] * (u[t][j] + bu[j]), the scalar kernel's order
#pragma unroll
        for (int nt = 0; nt < L::NT; ++nt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int col = wn0 + nt * 8 + 2 * (lane & 3) + h;
            const bool in = n0 + col < j_end;
            const float b = (in && bu != nullptr) ? to_f(bu[(n0 + col) * p.sbu]) : 0.0f;
            float s = 0.0f;
#pragma unroll
            for (int mt = 0; mt < L::MT; ++mt) {
              const int row = wm0 + mt * 16 + (lane >> 2);
              const float dg = in ? to_f(dyt[row * ldt + col]) : 0.0f, dg8 = in ? to_f(dyt[(row + 8) * ldt + col]) : 0.0f;
              s = fmaf(acc_u[mt][nt][h] + b, dg, s);
              s = fmaf(acc_u[mt][nt][h + 2] + b, dg8, s);
            }
            s += __shfl_xor_sync(0xffffffffu, s, 4);  // the 8 lanes of this column, fixed order
            s += __shfl_xor_sync(0xffffffffu, s, 8);
            s += __shfl_xor_sync(0xffffffffu, s, 16);
            if (lane < 4) red[L::warp_m() * kTileN + col] = s;
          }
      }
      if (dx != nullptr)
        store_frag_pairs<L::MT, L::NT>(Ys, kLdy, wm0, wn0, [&](int mt, int nt, int half) {
          return make_float2(acc_x[mt][nt][2 * half], acc_x[mt][nt][2 * half + 1]);
        });
      __syncthreads();  // Ys and red complete
      if (dscale && threadIdx.x < kTileN && n0 + (int)threadIdx.x < j_end) {
        float s = 0.0f;
#pragma unroll
        for (int wm = 0; wm < L::WM; ++wm) s += red[wm * kTileN + threadIdx.x];
        float* o = ws_row + n0 + threadIdx.x;
        *o = p.accumulate ? *o + s : s;
      }
      if (dx != nullptr) {  // dx = Ys (+ dy), 16 bytes at a time (a scalar tail only where d is not a multiple of V)
        for (int cc = threadIdx.x; cc < BT * kPerRow; cc += kThreads) {
          const int row = cc / kPerRow, col = (cc % kPerRow) * V, j = n0 + col;
          const int64_t t = t0 + row;
          if (t >= p.T || j >= j_end) continue;
          const float* v = Ys + row * kLdy + col;
          const S* dp = dyt + row * ldt + col;
          S* out = dx + t * p.lddx + j;
          if (j + V <= j_end) {
            Vec16<S> o;
            if (p.residual) {
              const Vec16<S> dv = *reinterpret_cast<const Vec16<S>*>(dp);
#pragma unroll
              for (int e = 0; e < V; ++e) o.v[e] = from_f<S>(v[e] + to_f(dv.v[e]));
            } else {
#pragma unroll
              for (int e = 0; e < V; ++e) o.v[e] = from_f<S>(v[e]);
            }
            *reinterpret_cast<Vec16<S>*>(out) = o;
          } else {
#pragma unroll 1
            for (int e = 0; e < j_end - j; ++e) out[e] = from_f<S>(v[e] + (p.residual ? to_f(dp[e]) : 0.0f));
          }
        }
      }
    }
  }
  cp_async_wait<0>();  // the trailing groups are empty: no copy outlives the block
  if constexpr (CLUSTER) cluster_sync();  // the other blocks are done reading this block's partials
}

// ---------------------------------------------------------------------------------------------
// The weight-gradient kernel on the vectorised memory path (16-bit types; the maths and grid of
// adapter_wgrad_kernel): both operands arrive token-major as they lie in memory, one k-stage = kBK tokens x 64
// columns of A (m) and of B (n) by 16-byte cp.async into kStages-slot rings; dz = dy * scale and h = act(pre)
// are applied in place per stage; fragments by ldmatrix .trans from the K-major tiles. Requirements (the
// launcher's): a and b 16-byte aligned, unit column stride, row strides a multiple of 16 bytes.
constexpr int kWgLd = kTileN + 8;  // row stride of a [kBK tokens][64] stage: 16-byte rows, conflict-free ldmatrix
template <typename S>
__host__ __device__ constexpr size_t wgrad_vec_smem_bytes() {
  return sizeof(S) * 2 * kStages * kBK * kWgLd;  // A and B rings: 36 KiB for 16-bit types
}

template <class Op>
__global__ void __launch_bounds__(kThreads, 2) adapter_wgrad_vec_kernel(const WgKParams p) {
  using S = typename Op::S;
  using L = WarpLayout<64>;
  constexpr int V = Vec16<S>::kN;
  constexpr int kStage = kBK * kWgLd;
  ADAPTERKERN_DYNAMIC_SMEM(smem_raw);  // wgrad_vec_smem_bytes<S>()
  S* As = reinterpret_cast<S*>(smem_raw);
  S* Bs = As + kStages * kStage;

  const S* __restrict__ a = static_cast<const S*>(p.a);
  const S* __restrict__ b = static_cast<const S*>(p.b);
  const int m0 = blockIdx.x * kTileN, n0 = blockIdx.y * kTileN;
  const int64_t tb = (int64_t)blockIdx.z * p.tchunk;
  const int64_t te = p.T < tb + p.tchunk ? p.T : tb + p.tchunk;
  const int wm0 = L::wm0(), wn0 = L::wn0();
  const bool do_bias = p.need_b && blockIdx.y == 0;

  // Stage k0: tokens [k0, k0 + kBK) of columns [m0, m0 + 64) of a and [n0, n0 + 64) of b (zeros outside).
  auto issue = [&](int64_t k0) {
    if (k0 < te) {
      S* as = As + ((k0 - tb) / kBK % kStages) * kStage;
      S* bs = Bs + ((k0 - tb) / kBK % kStages) * kStage;
      for (int c = threadIdx.x; c < kBK * (kTileN / V); c += kThreads) {
        const int row = c / (kTileN / V), col = (c % (kTileN / V)) * V;
        const int64_t t = k0 + row;
        copy_chunk_async(as + row * kWgLd + col, a + t * p.sa0 + m0 + col, t < te ? p.M - (m0 + col) : 0, a);
        if (p.need_w)
          copy_chunk_async(bs + row * kWgLd + col, b + t * p.sb0 + n0 + col, t < te ? p.N - (n0 + col) : 0, b);
      }
    }
    cp_async_commit();
  };

  float acc[L::MT][L::NT][4];
  zero_acc(acc);
  float bsum = 0.0f;  // thread m < 64: sum over tokens of A(t, m0 + m)
  const int col = threadIdx.x % kTileN;  // the column this thread converts (kThreads is a multiple of 64)
  float sc = 0.0f;
  if (p.a_mode == kScaled && m0 + col < p.M) sc = p.scale(m0 + col);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) issue(tb + (int64_t)s * kBK);
  for (int64_t k0 = tb; k0 < te; k0 += kBK) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // stage k0 visible; the slot refilled next was consumed
    issue(k0 + (int64_t)(kStages - 1) * kBK);
    S* as = As + ((k0 - tb) / kBK % kStages) * kStage;
    S* bs = Bs + ((k0 - tb) / kBK % kStages) * kStage;
    const bool act_b = p.need_w && p.b_mode == kAct;
    if (p.a_mode == kScaled || act_b) {  // in place, rounded like the reference; padding stays exactly 0
      dispatch_act(act_b ? p.act : 0, [&](auto A) {
        for (int row = threadIdx.x / kTileN; row < kBK; row += kThreads / kTileN) {
          if (k0 + row >= te) break;
          if (p.a_mode == kScaled) as[row * kWgLd + col] = from_f<S>(to_f(as[row * kWgLd + col]) * sc);
          if (act_b && n0 + col < p.N) bs[row * kWgLd + col] = from_f<S>(act_fwd(A.value, to_f(bs[row * kWgLd + col])));
        }
      });
      __syncthreads();
    }
    if (p.need_w) warp_tile_mma_kmajor<Op, L::MT, L::NT>(acc, as + wm0, kWgLd, bs + wn0, kWgLd);
    if (do_bias && threadIdx.x < kTileN) {
#pragma unroll 8
      for (int r = 0; r < kBK; ++r) bsum += to_f(as[r * kWgLd + threadIdx.x]);
    }
  }
  cp_async_wait<0>();

  const int64_t z = blockIdx.z;
  if (p.need_w) {
    for_each_frag<L::MT, L::NT>(wm0, wn0, [&](int mt, int nt, int e, int row, int c) {
      const int m = m0 + row, n = n0 + c;
      if (m < p.M && n < p.N) p.ws_w[(z * p.M + m) * p.N + n] = acc[mt][nt][e];
    });
  }
  if (do_bias && threadIdx.x < kTileN && m0 + (int)threadIdx.x < p.M) p.ws_b[z * p.M + m0 + threadIdx.x] = bsum;
}

}  // namespace adapterkern
