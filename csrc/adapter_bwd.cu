// Backward launchers: the token-parallel kernel (dscale partials, dh, dx) and the split-K weight
// gradient kernel + its ordered reduction. See csrc/kernels/adapter_bwd.cuh for the maths. For 16-bit types
// with aligned operands both are the vectorised ones (adapter_bwd_vec.cuh); the token kernel also needs one r
// chunk, and keeps dy in shared memory where the block's tile fits, else over a thread-block cluster (sm_90),
// else streams it twice.
//
// What the vectorised kernels' SASS must hold (checked by .ci/check_cuda.sh): every bulk load by cp.async
// (the scalar global loads left: the biases and the scale), dx and dh in 16-byte stores, fragments by
// ldmatrix (.trans in the weight-gradient kernel, whose stores are its fp32 partials), no local memory; generic
// loads only in the cluster kernel's reads of the other blocks' partials. Token kernels: <Op, BT, CLUSTER>,
// the cluster kernel only built for real on sm_90.
// SASS-PROMISE: adapter_bwd_token_vec_kernel<*, false> LDGSTS>=1 LDG.128==0 STG.128>=1 LDSM>=1 LD==0 ST==0 LDL==0 STL==0 LDG.U16<=16 STG.U16<=2 REGS<=136
// SASS-PROMISE: adapter_bwd_token_vec_kernel<*, true> @sm_90 LDGSTS>=1 LDG.128==0 STG.128>=1 LDSM>=1 ST==0 LDL==0 STL==0 LDG.U16<=16 STG.U16<=2 REGS<=136
// SASS-PROMISE: adapter_wgrad_vec_kernel<*> LDGSTS>=1 LDG.128==0 LDSM>=1 LD==0 ST==0 LDL==0 STL==0 LDG.U16==0 STG.U16==0 REGS<=112
#include <algorithm>

#include "adapter_api.h"
#include "kernels/adapter_bwd_vec.cuh"
#include "launch_util.h"

namespace adapterkern {
namespace {

size_t elem_size(DType dt) { return dt == DType::F32 ? 4 : 2; }

// Same formula as bwd_tok_smem_bytes<S> without the template (the plan is chosen before dispatch).
size_t tok_smem(DType dt, int bt, int r) {
  return dt == DType::F32 ? bwd_tok_smem_bytes<float>(bt, r) : bwd_tok_smem_bytes<__half>(bt, r);
}

// Largest r chunk (multiple of 64) that fits with token tile bt, or 0.
int tok_rank_chunk(DType dt, int bt, int smem_optin) {
  const size_t fixed = tok_smem(dt, bt, 0);
  if ((size_t)smem_optin <= fixed) return 0;
  return (int)(((size_t)smem_optin - fixed) / ((size_t)bt * elem_size(dt)) / kTileN * kTileN);
}

template <class Op, int BT>
cudaError_t launch_tok(const BwdTokKParams& kp, int64_t nblocks, size_t smem, cudaStream_t stream) {
  cudaError_t e = allow_max_smem<adapter_bwd_token_kernel<Op, BT>>(smem);
  if (e != cudaSuccess) return e;
  ADAPTERKERN_LAUNCH(dim3((unsigned)nblocks), kThreads, smem, stream, adapter_bwd_token_kernel<Op, BT>)(kp);
  return cudaGetLastError();
}

// The vectorised token kernel's shape at the plan's token tile: cluster 0 when it does not apply, else 1 (one
// block per tile) or the blocks per cluster; cols, each block's slice of d; stage, dy kept in shared memory.
struct TokVecShape {
  int cluster = 0, cols = 0;
  bool stage = false;
};

template <typename S>
TokVecShape tok_vec_shape(const BwdTokArgs& a, const BwdTokPlan& plan, const DevInfo& info) {
  const bool dscale = a.dscale_ws != nullptr;
  const bool aligned =
      a.vectorized && a.wut.p != nullptr && a.wdt.p != nullptr && vector_ok<S>(a.dy.p, a.dy.s0, a.dy.s1) &&
      vector_ok<S>(a.pre.p, a.pre.s0, a.pre.s1) && vector_ok<S>(a.wut.p, a.wut.s0, a.wut.s1) &&
      vector_ok<S>(a.wdt.p, a.wdt.s0, a.wdt.s1) && (!dscale || vector_ok<S>(a.wu.p, a.wu.s0, a.wu.s1)) &&
      (a.dx == nullptr || vector_ok<S>(a.dx, a.lddx, 1)) && (a.dh == nullptr || vector_ok<S>(a.dh, a.lddh, 1)) &&
      (a.add.p == nullptr || (a.add.p == a.dy.p && a.add.s0 == a.dy.s0 && a.add.s1 == a.dy.s1));
  const size_t optin = (size_t)info.smem_optin;
  const int all = round_up(a.d, kTileN);
  if (!aligned) return {};
  if (bwd_vec_smem_bytes<S>(plan.bt, a.d, a.r, true, dscale, false) <= optin) return {1, all, true};
  if (a.clusters && info.clusters && plan.bt == 64 && round_up(a.r, kTileN) <= kClusterMaxRank) {
    for (int c = 2; c <= 8; ++c) {  // the smallest cluster (the portable limit: 8) whose slices fit
      const int cols = round_up((int)ceil_div64(a.d, c), kTileN);
      if (bwd_vec_smem_bytes<S>(64, cols, a.r, true, dscale, true) <= optin)
        return {(int)ceil_div64(a.d, cols), cols, true};
    }
  }
  if (bwd_vec_smem_bytes<S>(plan.bt, a.d, a.r, false, dscale, false) <= optin) return {1, all, false};
  return {};
}

template <class Op, int BT, bool CLUSTER>
cudaError_t launch_tok_vec(const BwdTokKParams& kp, dim3 grid, size_t smem, cudaStream_t stream) {
  cudaError_t e = allow_max_smem<adapter_bwd_token_vec_kernel<Op, BT, CLUSTER>>(smem);
  if (e != cudaSuccess) return e;
  if constexpr (CLUSTER) {
    e = ADAPTERKERN_LAUNCH_CLUSTER(grid, kThreads, smem, stream, dim3(1, grid.y, 1),
                                   adapter_bwd_token_vec_kernel<Op, BT, CLUSTER>)(kp);
    if (e != cudaSuccess) return e;
  } else {
    ADAPTERKERN_LAUNCH(grid, kThreads, smem, stream, adapter_bwd_token_vec_kernel<Op, BT, CLUSTER>)(kp);
  }
  return cudaGetLastError();
}

// The vectorised token kernel (16-bit types) in the shape v, one r chunk.
template <class Op>
cudaError_t run_tok_vec(const BwdTokArgs& a, const BwdTokPlan& plan, const TokVecShape& v, cudaStream_t stream) {
  using S = typename Op::S;
  BwdTokKParams kp{};
  kp.dy = a.dy.p; kp.sdy0 = a.dy.s0; kp.sdy1 = 1;
  kp.pre = a.pre.p; kp.sp0 = a.pre.s0; kp.sp1 = 1;
  kp.wd = a.wd.p; kp.swd0 = (int)a.wd.s0; kp.swd1 = (int)a.wd.s1;
  kp.wu = a.wu.p; kp.swu0 = (int)a.wu.s0; kp.swu1 = (int)a.wu.s1;
  kp.wut = a.wut.p; kp.swut = (int)a.wut.s0;
  kp.wdt = a.wdt.p; kp.swdt = (int)a.wdt.s0;
  kp.bu = a.bu; kp.sbu = (int)a.sbu;
  kp.scale = ScaleRef{a.scale.p, a.scale.len, a.scale.value};
  kp.dx = a.dx; kp.lddx = a.lddx;
  kp.dh = a.dh; kp.lddh = a.lddh;
  kp.dscale_ws = a.dscale_ws; kp.accumulate = 0;
  kp.T = a.T; kp.d = a.d; kp.r = a.r; kp.act = a.act;
  kp.residual = a.add.p != nullptr ? 1 : 0;
  kp.stage_dy = v.stage ? 1 : 0;
  kp.cols_per_split = v.cols;
  kp.vec = 1;
  kp.cluster = v.cluster > 1 ? v.cluster : 0;
  const size_t smem = bwd_vec_smem_bytes<S>(plan.bt, v.cols, a.r, v.stage, a.dscale_ws != nullptr, v.cluster > 1);
  const dim3 grid((unsigned)plan.nblocks, (unsigned)v.cluster);
  if (v.cluster > 1) return launch_tok_vec<Op, 64, true>(kp, grid, smem, stream);
  return plan.bt == 64 ? launch_tok_vec<Op, 64, false>(kp, grid, smem, stream)
                       : launch_tok_vec<Op, 16, false>(kp, grid, smem, stream);
}

template <class Op>
cudaError_t run_tok(const BwdTokArgs& a, const BwdTokPlan& plan, DType dt, cudaStream_t stream) {
  using S = typename Op::S;
  if (a.T <= 0) return cudaSuccess;
  DevInfo info;
  cudaError_t e = current_dev_info(&info);
  if (e != cudaSuccess) return e;
  if constexpr (HasLdsm<Op>::value) {
    const TokVecShape v = tok_vec_shape<S>(a, plan, info);
    if (v.cluster > 0) return run_tok_vec<Op>(a, plan, v, stream);
  }
  const int chunk = tok_rank_chunk(dt, plan.bt, info.smem_optin);
  if (chunk < kTileN) return cudaErrorInvalidConfiguration;
  const int rc = std::min(round_up(a.r, kTileN), chunk);
  for (int c0 = 0; c0 < a.r; c0 += rc) {
    // Bottleneck chunks are independent except through dx (accumulated: dx = dh_c @ wd_c + dx) and
    // dscale (accumulated in the workspace; bu counted by the first chunk only).
    const int r = std::min(rc, a.r - c0);
    BwdTokKParams kp{};
    kp.dy = a.dy.p; kp.sdy0 = a.dy.s0; kp.sdy1 = a.dy.s1;
    kp.pre = static_cast<const S*>(a.pre.p) + (int64_t)c0 * a.pre.s1; kp.sp0 = a.pre.s0; kp.sp1 = a.pre.s1;
    kp.wd = static_cast<const S*>(a.wd.p) + (int64_t)c0 * a.wd.s0; kp.swd0 = (int)a.wd.s0; kp.swd1 = (int)a.wd.s1;
    kp.wu = static_cast<const S*>(a.wu.p) + (int64_t)c0 * a.wu.s1; kp.swu0 = (int)a.wu.s0; kp.swu1 = (int)a.wu.s1;
    if (c0 == 0) { kp.add = a.add.p; kp.sa0 = a.add.s0; kp.sa1 = a.add.s1; }
    else { kp.add = a.dx; kp.sa0 = a.lddx; kp.sa1 = 1; }
    kp.bu = c0 == 0 ? a.bu : nullptr; kp.sbu = (int)a.sbu;
    kp.scale = ScaleRef{a.scale.p, a.scale.len, a.scale.value};
    kp.dx = a.dx; kp.lddx = a.lddx;
    kp.dh = a.dh ? static_cast<void*>(static_cast<S*>(a.dh) + c0) : nullptr; kp.lddh = a.lddh;
    kp.dscale_ws = a.dscale_ws; kp.accumulate = c0 > 0 ? 1 : 0;
    kp.T = a.T; kp.d = a.d; kp.r = r; kp.act = a.act;
    const size_t smem = bwd_tok_smem_bytes<S>(plan.bt, r);
    e = plan.bt == 64 ? launch_tok<Op, 64>(kp, plan.nblocks, smem, stream)
                      : launch_tok<Op, 16>(kp, plan.nblocks, smem, stream);
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <class Op>
cudaError_t run_wgrad(const WgradArgs& a, const WgradPlan& plan, cudaStream_t stream) {
  using S = typename Op::S;
  if (!a.need_w && !a.need_b) return cudaSuccess;
  WgKParams kp{};
  kp.a = a.a.p; kp.sa0 = a.a.s0; kp.sa1 = a.a.s1; kp.a_mode = a.a_mode;
  kp.b = a.b.p; kp.sb0 = a.b.s0; kp.sb1 = a.b.s1; kp.b_mode = a.b_mode;
  kp.M = a.M; kp.N = a.N;
  kp.need_w = a.need_w ? 1 : 0; kp.need_b = a.need_b ? 1 : 0;
  kp.scale = ScaleRef{a.scale.p, a.scale.len, a.scale.value};
  kp.act = a.act;
  kp.T = a.T; kp.tchunk = plan.tchunk;
  kp.ws_w = a.ws_w; kp.ws_b = a.ws_b;
  const dim3 grid((unsigned)ceil_div64(a.M, kTileN), a.need_w ? (unsigned)ceil_div64(a.N, kTileN) : 1u,
                  (unsigned)plan.nsplit);
  kp.vec = 0;
  if constexpr (HasLdsm<Op>::value) {  // the vectorised kernel: 16-bit types with aligned rows
    kp.vec = a.vectorized && vector_ok<S>(a.a.p, a.a.s0, a.a.s1) && (!a.need_w || vector_ok<S>(a.b.p, a.b.s0, a.b.s1));
    if (kp.vec) ADAPTERKERN_LAUNCH(grid, kThreads, wgrad_vec_smem_bytes<S>(), stream, adapter_wgrad_vec_kernel<Op>)(kp);
  }
  if (!kp.vec) ADAPTERKERN_LAUNCH(grid, kThreads, 0, stream, adapter_wgrad_kernel<Op>)(kp);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) return e;
  auto reduce = [&](const float* ws, int64_t n, void* out) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div64(n, threads), 4096);
    S* const dst = static_cast<S*>(out);
    ADAPTERKERN_LAUNCH((unsigned)blocks, threads, 0, stream, wgrad_reduce_kernel<S>)(ws, plan.nsplit, n, dst);
    return cudaGetLastError();
  };
  if (a.need_w && (e = reduce(a.ws_w, (int64_t)a.M * a.N, a.w_out)) != cudaSuccess) return e;
  if (a.need_b && (e = reduce(a.ws_b, (int64_t)a.M, a.b_out)) != cudaSuccess) return e;
  return cudaSuccess;
}

}  // namespace

BwdTokPlan adapter_bwd_token_plan(DType dt, bool /*tf32*/, int64_t T, int /*d*/, int /*r*/) {
  BwdTokPlan plan;
  DevInfo info;
  if (current_dev_info(&info) != cudaSuccess) info.sms = 1, info.smem_optin = 48 * 1024;
  plan.bt = T >= (int64_t)32 * info.sms ? 64 : 16;
  if (tok_rank_chunk(dt, plan.bt, info.smem_optin) < kTileN) plan.bt = 16;
  plan.nblocks = ceil_div64(std::max<int64_t>(T, 0), plan.bt);
  return plan;
}

cudaError_t adapter_bwd_token(const BwdTokArgs& a, const BwdTokPlan& plan, DType dt, bool tf32,
                              cudaStream_t stream) {
  switch (dt) {
    case DType::F16: return run_tok<MmaF16>(a, plan, dt, stream);
    case DType::BF16: return run_tok<MmaBF16>(a, plan, dt, stream);
    case DType::F32: return tf32 ? run_tok<MmaTF32>(a, plan, dt, stream) : run_tok<SimtF32>(a, plan, dt, stream);
  }
  return cudaErrorInvalidValue;
}

WgradPlan adapter_wgrad_plan(int64_t T, int M, int N) {
  WgradPlan plan;
  DevInfo info;
  if (current_dev_info(&info) != cudaSuccess) info.sms = 1;
  const int64_t tiles = ceil_div64(std::max(M, 1), kTileN) * ceil_div64(std::max(N, 1), kTileN);
  // Enough token splits for ~2 blocks per SM, each at least one k-stage; capped so the fp32
  // workspace (nsplit * M * N) stays modest.
  int64_t nsplit = std::max<int64_t>(1, ceil_div64(2 * (int64_t)info.sms, tiles));
  nsplit = std::min<int64_t>(nsplit, std::max<int64_t>(1, ceil_div64(T, kBK)));
  nsplit = std::min<int64_t>(nsplit, 1024);
  plan.tchunk = std::max<int64_t>(kBK, (ceil_div64(std::max<int64_t>(T, 1), nsplit) + kBK - 1) / kBK * kBK);
  plan.nsplit = (int)std::max<int64_t>(1, ceil_div64(T, plan.tchunk));
  return plan;
}

cudaError_t adapter_wgrad(const WgradArgs& a, const WgradPlan& plan, DType dt, bool tf32, cudaStream_t stream) {
  switch (dt) {
    case DType::F16: return run_wgrad<MmaF16>(a, plan, stream);
    case DType::BF16: return run_wgrad<MmaBF16>(a, plan, stream);
    case DType::F32: return tf32 ? run_wgrad<MmaTF32>(a, plan, stream) : run_wgrad<SimtF32>(a, plan, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace adapterkern
