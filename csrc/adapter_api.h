// Host-side interface between the binding (bindings.cpp, torch) and the kernels (*.cu, plain nvcc).
// Only POD structs of raw pointers and strides cross this line, so the kernels never see torch.
//
// A matrix argument is a StridedMat: element (i, j) lives at ((const T*)p)[i * s0 + j * s1], strides
// in elements, 64-bit. T is the element type named by the DType argument of each launcher.
// Weights and biases must have every element offset below 2^31 (the kernels index them with 32-bit
// offsets; the binding checks); token-indexed tensors (x, y, dy, residual, pre, dh) may be any size.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace adapterkern {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

struct StridedMat {
  const void* p = nullptr;
  int64_t s0 = 0, s1 = 0;
};

// Scaling: p == nullptr -> the host float `value`; else fp32 device memory of length 1 or d.
struct ScaleArg {
  const float* p = nullptr;
  int64_t len = 0;
  float value = 1.0f;
};

// ----------------------------------------------------------------------------- forward
// y = res + scale * (act(x @ wd^T + bd) @ wu^T + bu); pre = x @ wd^T + bd (optional output).
struct FwdArgs {
  StridedMat x;        // (T, d)
  StridedMat res;      // (T, d); p == nullptr means res = x (read from the staged x tile)
  StridedMat wd;       // (r, d)
  StridedMat wu;       // (d, r)
  const void* bd = nullptr; int64_t sbd = 0;  // (r,) or nullptr
  const void* bu = nullptr; int64_t sbu = 0;  // (d,) or nullptr
  ScaleArg scale;
  void* y = nullptr; int64_t ldy = 0;      // (T, d) output, row stride ldy, unit column stride
  void* pre = nullptr; int64_t ldpre = 0;  // (T, r) output or nullptr
  int64_t T = 0;
  int d = 0, r = 0, act = 0;
  float* partial_ws = nullptr;  // (plan.partial_floats,) fp32 when adapter_fwd_plan asks for one, else unused
  // The vectorised kernel (16-byte cp.async / ldmatrix / 16-byte epilogue) wherever the operands allow it
  // (x, res, the weights, y and pre 16-byte aligned, unit column stride, row strides a multiple of 16 bytes);
  // false: always the scalar kernel (the binding's ADAPTERKERN_CUDA_VECTOR=off, so that benchmarks time both).
  bool vectorized = true;
  // With the vectorised kernel on an sm_90+ device, a 64-token tile whose x does not fit in one block's shared
  // memory is split over a thread-block cluster (x read once); false: the one-block kernel (ADAPTERKERN_CUDA_CLUSTER=off).
  bool clusters = true;
};
// The decode path (few token blocks, one r chunk): the down-projection split over ksplit d-ranges
// into an fp32 workspace of partial_floats floats; ksplit == 1: no workspace, the one-launch forward.
struct FwdPlan {
  int ksplit = 1;
  int64_t partial_floats = 0;
};
FwdPlan adapter_fwd_plan(DType dt, bool tf32, int64_t T, int d, int r);
cudaError_t adapter_fwd(const FwdArgs& a, DType dt, bool tf32, cudaStream_t stream);

// ----------------------------------------------------------------------------- backward
// Token-parallel part: for a block of tokens, from dy and the saved pre-activation,
//   dscale partial sums  ws[block][j] = sum_{t in block} dy[t,j] * (act(pre[t]) @ wu^T + bu)[j]
//   dh = ((dy * scale) @ wu) * act'(pre)           (written to `dh` when non-null)
//   dx = dh @ wd + add                             (add = dy when residual is x, else nullptr)
struct BwdTokPlan {
  int bt = 0;            // tokens per block
  int64_t nblocks = 0;   // rows of the dscale workspace
};
BwdTokPlan adapter_bwd_token_plan(DType dt, bool tf32, int64_t T, int d, int r);

struct BwdTokArgs {
  StridedMat dy;   // (T, d)
  StridedMat pre;  // (T, r)
  StridedMat wd;   // (r, d)
  StridedMat wu;   // (d, r)
  StridedMat add;  // (T, d) or p == nullptr
  const void* bu = nullptr; int64_t sbu = 0;
  ScaleArg scale;
  void* dx = nullptr; int64_t lddx = 0;  // (T, d) output or nullptr
  void* dh = nullptr; int64_t lddh = 0;  // (T, r) output (x's dtype) or nullptr
  float* dscale_ws = nullptr;            // (plan.nblocks, d) fp32 or nullptr
  int64_t T = 0;
  int d = 0, r = 0, act = 0;
  // The vectorised kernel's operands: wu^T (r, d) and wd^T (d, r), row-major copies (p == nullptr: the
  // scalar kernel). It runs where every operand meets its alignment (adapter_bwd.cu, tok_vec_shape).
  StridedMat wut, wdt;
  bool vectorized = true;  // false: always the scalar kernel (ADAPTERKERN_CUDA_VECTOR=off)
  bool clusters = true;    // false: no thread-block clusters (ADAPTERKERN_CUDA_CLUSTER=off)
};
cudaError_t adapter_bwd_token(const BwdTokArgs& a, const BwdTokPlan& plan, DType dt, bool tf32,
                              cudaStream_t stream);

// Weight-gradient part (deterministic split-K over tokens):
//   w[m][n] = sum_t A(t, m) * B(t, n)      (M x N, written contiguous in the element type)
//   b[m]    = sum_t A(t, m)                 (M,)
// A(t, m) = a[t][m] (kPlain) or a[t][m] * scale(m) rounded to the element type (kScaled: dz = dy*s);
// B(t, n) = b[t][n] (kPlain) or act(b[t][n]) rounded (kAct: h = act(pre)).
// Each of plan.nsplit token ranges writes fp32 partials to ws_w / ws_b; a second kernel sums them
// in split order, so the result is bitwise reproducible for a given shape and device.
enum SrcMode : int { kPlain = 0, kScaled = 1, kAct = 2 };
struct WgradPlan {
  int nsplit = 1;
  int64_t tchunk = 0;
};
WgradPlan adapter_wgrad_plan(int64_t T, int M, int N);

struct WgradArgs {
  StridedMat a;  // (T, M)
  StridedMat b;  // (T, N)
  int a_mode = kPlain, b_mode = kPlain;
  int M = 0, N = 0;
  bool need_w = false, need_b = false;
  ScaleArg scale;
  int act = 0;
  int64_t T = 0;
  float* ws_w = nullptr;  // (nsplit, M, N) fp32, when need_w
  float* ws_b = nullptr;  // (nsplit, M) fp32, when need_b
  void* w_out = nullptr;  // (M, N) contiguous, when need_w
  void* b_out = nullptr;  // (M,), when need_b
  // false: the scalar kernel even where the vectorised one applies (16-bit types, a and b 16-byte aligned rows
  // of unit column stride; ADAPTERKERN_CUDA_VECTOR=off)
  bool vectorized = true;
};
cudaError_t adapter_wgrad(const WgradArgs& a, const WgradPlan& plan, DType dt, bool tf32,
                          cudaStream_t stream);

}  // namespace adapterkern
