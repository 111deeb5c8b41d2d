// Forward launcher: picks the memory path (vectorised or scalar), the token tile (BT), the r chunk, x staging
// and the column split, then launches adapter_fwd_kernel (csrc/kernels/adapter_fwd.cuh); with few token
// blocks and a workspace (adapter_fwd_plan), adapter_fwd_partial_kernel first splits the down-projection over
// d-ranges. Instantiates the kernel for {fp16, bf16} x tensor-core mma.sync, fp32 x {IEEE FMA, TF32 mma.sync},
// BT in {16, 64} and both memory paths, plus the vectorised 64-token kernel with thread-block clusters (x read
// once at large d: each block of a cluster stages one slice of d of the cluster's token tile, the partial
// down-projections are summed over distributed shared memory).
//
// What the vectorised kernels' SASS must hold (checked by .ci/check_cuda.sh): x, the weights and the residual
// by cp.async only (the scalar global loads left are the biases, the scale and the decode partials), y and pre
// in 16-byte stores (scalar ones only in the tails), fragments by ldmatrix, no local memory, and
// fewer registers than the scalar kernels (155-190 on sm_90); generic loads only in the cluster kernels' reads
// of the other blocks' partials (distributed shared memory).
// (Template arguments <Op, BT, VEC, CLUSTER>; the cluster kernels are only built for real on sm_90.)
// SASS-PROMISE: adapter_fwd_kernel<*, true, false> LDGSTS>=1 LDG.128==0 STG.128>=1 LD==0 ST==0 LDL==0 STL==0 REGS<=128
// SASS-PROMISE: adapter_fwd_kernel<*, true, true> @sm_90 LDGSTS>=1 LDG.128==0 STG.128>=1 ST==0 LDL==0 STL==0 REGS<=128
// SASS-PROMISE: adapter_fwd_kernel<Mma16816<*>, *, true, false> LDSM>=1 LDG.U16<=16 STG.U16<=2
// SASS-PROMISE: adapter_fwd_kernel<Mma16816<*>, *, true, true> @sm_90 LDSM>=1 LDG.U16<=16 STG.U16<=2
#include <algorithm>
#include <cstdint>

#include "adapter_api.h"
#include "kernels/adapter_fwd.cuh"
#include "launch_util.h"

namespace adapterkern {
namespace {

template <class Op, int BT, bool VEC>
cudaError_t launch_fwd(const FwdKParams& kp, dim3 grid, size_t smem, cudaStream_t stream) {
  cudaError_t e = allow_max_smem<adapter_fwd_kernel<Op, BT, VEC>>(smem);
  if (e != cudaSuccess) return e;
  ADAPTERKERN_LAUNCH(grid, kThreads, smem, stream, adapter_fwd_kernel<Op, BT, VEC>)(kp);
  return cudaGetLastError();
}

// The cluster kernel: grid.y = the cluster (one slice of d per block).
template <class Op>
cudaError_t launch_fwd_cluster(const FwdKParams& kp, dim3 grid, size_t smem, cudaStream_t stream) {
  cudaError_t e = allow_max_smem<adapter_fwd_kernel<Op, 64, true, true>>(smem);
  if (e != cudaSuccess) return e;
  e = ADAPTERKERN_LAUNCH_CLUSTER(grid, kThreads, smem, stream, dim3(1, grid.y, 1), adapter_fwd_kernel<Op, 64, true, true>)(kp);
  if (e != cudaSuccess) return e;
  return cudaGetLastError();
}

template <class Op>
cudaError_t launch_fwd(const FwdKParams& kp, int bt, dim3 grid, size_t smem, cudaStream_t stream) {
  if (kp.cluster > 1) return launch_fwd_cluster<Op>(kp, grid, smem, stream);
  if (kp.vec) return bt == 64 ? launch_fwd<Op, 64, true>(kp, grid, smem, stream) : launch_fwd<Op, 16, true>(kp, grid, smem, stream);
  return bt == 64 ? launch_fwd<Op, 64, false>(kp, grid, smem, stream) : launch_fwd<Op, 16, false>(kp, grid, smem, stream);
}

template <class Op>
cudaError_t launch_partial(const FwdPartialParams& pp, dim3 grid, cudaStream_t stream) {
  using S = typename Op::S;
  const size_t smem = fwd_partial_smem_bytes<S>(16);
  cudaError_t e = allow_max_smem<adapter_fwd_partial_kernel<Op, 16>>(smem);
  if (e != cudaSuccess) return e;
  ADAPTERKERN_LAUNCH(grid, kThreads, smem, stream, adapter_fwd_partial_kernel<Op, 16>)(pp);
  return cudaGetLastError();
}

// Largest r chunk (a multiple of 64) whose h tile fits in shared memory next to the unstaged
// buffers, or 0.
template <typename S>
int max_rank_chunk(int bt, int smem_optin, bool vec) {
  const size_t fixed = fwd_smem_bytes<S>(bt, 1, 0, false, vec, true);
  if ((size_t)smem_optin <= fixed) return 0;
  const size_t per_col = (size_t)bt * sizeof(S);
  return (int)(((size_t)smem_optin - fixed) / per_col / kTileN * kTileN);
}

constexpr int64_t kDecodeMaxTokens = 64;  // the decode path: at most 4 token blocks of 16

// The launch shape of a forward: token tile, r chunk, column split and (decode path) d-splits.
struct FwdShape {
  int bt = 16, rc = 0, nsplit = 1, cols = 0, ksplit = 1, k_chunk = 0;
  int64_t nblocks = 0;
};

template <typename S>
cudaError_t fwd_shape(const DevInfo& info, int64_t T, int d, int r, bool vec, FwdShape* out) {
  FwdShape f;
  // Token tile: 64 once there are enough tokens to fill the GPU with 64-token blocks (fewer weight
  // re-reads per token), else 16 (decode-size inputs). Measure: benchmarks in csrc/README.md.
  f.bt = T >= (int64_t)32 * info.sms ? 64 : 16;
  int chunk = max_rank_chunk<S>(f.bt, info.smem_optin, vec);
  if (chunk < kTileN && f.bt == 64) { f.bt = 16; chunk = max_rank_chunk<S>(f.bt, info.smem_optin, vec); }
  if (chunk < kTileN) return cudaErrorInvalidConfiguration;
  // r larger than one chunk (thousands) is split: y is accumulated over chunks, since
  // y = res + s*(sum_c act(x wd_c^T + bd_c) wu_c^T + bu) (bu added by the first chunk only).
  f.rc = std::min(round_up(r, kTileN), chunk);
  f.nblocks = ceil_div64(T, f.bt);
  if (f.nblocks < info.sms) {
    // Few token blocks: split the output columns too (each split recomputes h: wd re-read from L2).
    const int64_t want = std::max<int64_t>(1, info.sms / f.nblocks);
    f.nsplit = (int)std::min<int64_t>(want, ceil_div64(d, 256));
    // ... and, for decode-size T with one r chunk, the down-projection over d-ranges on their own blocks first.
    if (T <= kDecodeMaxTokens && f.bt == 16 && round_up(r, kTileN) <= chunk) {
      const int64_t ks = std::min<int64_t>(want, ceil_div64(d, kBK));
      f.k_chunk = round_up((int)ceil_div64(d, ks), kBK);
      f.ksplit = (int)ceil_div64(d, f.k_chunk);
    }
  }
  f.cols = round_up((int)ceil_div64(d, f.nsplit), kTileN);
  f.nsplit = (int)ceil_div64(d, f.cols);
  if (f.ksplit < 2) f.ksplit = 1, f.k_chunk = 0;
  *out = f;
  return cudaSuccess;
}

// The cluster kernel's shape (its cluster size, 0 when it does not apply, and the slice of d of each block)
// for a vectorised 64-token forward with one r chunk of at most kClusterMaxRank whose whole x tile does not
// fit in shared memory: the smallest cluster (at most 8 blocks, the portable limit) whose slice does.
template <typename S>
int cluster_shape(const DevInfo& info, const FwdShape& f, int d, int r, bool separate_res, int* slice) {
  if (!info.clusters || f.bt != 64 || f.nsplit != 1 || f.ksplit != 1 || round_up(r, kTileN) > kClusterMaxRank ||
      f.rc < r || fwd_smem_bytes<S>(64, d, r, true, true, separate_res) <= (size_t)info.smem_optin)
    return 0;
  for (int c = 2; c <= 8; ++c) {
    const int cols = round_up((int)ceil_div64(d, c), kTileN);
    if (fwd_smem_bytes<S>(64, cols, r, true, true, separate_res, true) <= (size_t)info.smem_optin) {
      *slice = cols;
      return (int)ceil_div64(d, cols);
    }
  }
  return 0;
}

template <class Op>
cudaError_t run_fwd(const FwdArgs& a, cudaStream_t stream) {
  using S = typename Op::S;
  if (a.T <= 0) return cudaSuccess;
  DevInfo info;
  cudaError_t e = current_dev_info(&info);
  if (e != cudaSuccess) return e;
  FwdShape f;
  e = fwd_shape<S>(info, a.T, a.d, a.r, false, &f);
  if (e != cudaSuccess) return e;
  // The vectorised path where every operand allows it and its shared memory holds the token tile the
  // scalar path takes (it never trades a 64-token tile for a 16-token one). Its r chunks may be smaller
  // (more shared memory per token), so it may skip a decode split the plan allowed for: never the reverse.
  bool vec = a.vectorized && vector_ok<S>(a.x.p, a.x.s0, a.x.s1) && vector_ok<S>(a.wd.p, a.wd.s0, a.wd.s1) &&
             vector_ok<S>(a.wu.p, a.wu.s0, a.wu.s1) && vector_ok<S>(a.y, a.ldy, 1) &&
             (a.res.p == nullptr || vector_ok<S>(a.res.p, a.res.s0, a.res.s1)) &&
             (a.pre == nullptr || vector_ok<S>(a.pre, a.ldpre, 1));
  if (vec) {
    FwdShape fv;
    vec = fwd_shape<S>(info, a.T, a.d, a.r, true, &fv) == cudaSuccess && fv.bt == f.bt;
    if (vec) f = fv;
  }
  int slice = 0;
  const int cluster = vec && a.clusters ? cluster_shape<S>(info, f, a.d, a.r, a.res.p != nullptr, &slice) : 0;
  if (cluster > 1) f.nsplit = cluster, f.cols = slice;
  const int bt = f.bt, rc = f.rc, cols = f.cols;
  const int64_t nblocks = f.nblocks;
  const dim3 grid((unsigned)nblocks, (unsigned)f.nsplit);
  const bool decode = f.ksplit > 1 && a.partial_ws != nullptr;  // no workspace: the one-launch forward
  if (decode) {
    FwdPartialParams pp;
    pp.x = a.x.p; pp.sx0 = a.x.s0; pp.sx1 = a.x.s1;
    pp.wd = a.wd.p; pp.swd0 = (int)a.wd.s0; pp.swd1 = (int)a.wd.s1;
    pp.partial = a.partial_ws;
    pp.T = a.T; pp.d = a.d; pp.r = a.r; pp.k_chunk = f.k_chunk;
    e = launch_partial<Op>(pp, dim3((unsigned)nblocks, (unsigned)f.ksplit), stream);
    if (e != cudaSuccess) return e;
  }

  for (int c0 = 0; c0 < a.r; c0 += rc) {
    const int r = std::min(rc, a.r - c0);
    const bool separate_res = c0 > 0 || a.res.p != nullptr;
    const bool stage = cluster > 1 || fwd_smem_bytes<S>(bt, a.d, r, true, vec, separate_res) <= (size_t)info.smem_optin;
    const size_t smem = fwd_smem_bytes<S>(bt, cluster > 1 ? cols : a.d, r, stage, vec, separate_res, cluster > 1);
    FwdKParams kp;
    kp.x = a.x.p; kp.sx0 = a.x.s0; kp.sx1 = a.x.s1;
    if (c0 == 0) { kp.res = a.res.p; kp.sr0 = a.res.s0; kp.sr1 = a.res.s1; }
    else { kp.res = a.y; kp.sr0 = a.ldy; kp.sr1 = 1; }  // accumulate onto the previous chunks
    kp.wd = static_cast<const S*>(a.wd.p) + (int64_t)c0 * a.wd.s0; kp.swd0 = (int)a.wd.s0; kp.swd1 = (int)a.wd.s1;
    kp.wu = static_cast<const S*>(a.wu.p) + (int64_t)c0 * a.wu.s1; kp.swu0 = (int)a.wu.s0; kp.swu1 = (int)a.wu.s1;
    kp.bd = a.bd ? static_cast<const void*>(static_cast<const S*>(a.bd) + (int64_t)c0 * a.sbd) : nullptr;
    kp.sbd = (int)a.sbd;
    kp.bu = c0 == 0 ? a.bu : nullptr; kp.sbu = (int)a.sbu;
    kp.scale = ScaleRef{a.scale.p, a.scale.len, a.scale.value};
    kp.y = a.y; kp.ldy = a.ldy;
    kp.pre = a.pre ? static_cast<void*>(static_cast<S*>(a.pre) + c0) : nullptr; kp.ldpre = a.ldpre;
    kp.T = a.T; kp.d = a.d; kp.r = r; kp.act = a.act;
    kp.stage_x = stage ? 1 : 0;
    kp.cols_per_split = cols;
    kp.vec = vec ? 1 : 0;
    kp.cluster = cluster;
    kp.partial = decode ? a.partial_ws : nullptr; kp.ksplit = decode ? f.ksplit : 0;
    e = launch_fwd<Op>(kp, bt, grid, smem, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename S>
FwdPlan plan_for(int64_t T, int d, int r) {
  FwdPlan plan;
  DevInfo info;
  FwdShape f;
  if (T <= 0 || current_dev_info(&info) != cudaSuccess || fwd_shape<S>(info, T, d, r, false, &f) != cudaSuccess) return plan;
  plan.ksplit = f.ksplit;
  plan.partial_floats = f.ksplit > 1 ? (int64_t)f.ksplit * T * round_up(r, kTileN) : 0;
  return plan;
}

}  // namespace

FwdPlan adapter_fwd_plan(DType dt, bool /*tf32*/, int64_t T, int d, int r) {
  switch (dt) {
    case DType::F16: return plan_for<__half>(T, d, r);
    case DType::BF16: return plan_for<__nv_bfloat16>(T, d, r);
    case DType::F32: return plan_for<float>(T, d, r);
  }
  return {};
}

cudaError_t adapter_fwd(const FwdArgs& a, DType dt, bool tf32, cudaStream_t stream) {
  switch (dt) {
    case DType::F16: return run_fwd<MmaF16>(a, stream);
    case DType::BF16: return run_fwd<MmaBF16>(a, stream);
    case DType::F32: return tf32 ? run_fwd<MmaTF32>(a, stream) : run_fwd<SimtF32>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace adapterkern
