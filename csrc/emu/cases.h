// The case table of test_kernels.cpp: devices, element types, layouts and what each case runs and expects.
#pragma once

#include <cstdint>

#include "adapter_api.h"
#include "emu.h"

namespace {

enum class Dt { F16, BF16, F32, TF32 };  // F32: IEEE fp32 FMAs; TF32: fp32 storage, TF32 mma.sync

// kRowAligned: rows padded to a multiple of 8 elements plus 8 (16-byte aligned rows of any width: the
// vectorised forward with d or r off its vector width).
enum class Layout { kContig, kRowPadded, kColMajor, kEveryOther, kRowAligned };

enum Device { kOneSm = 0, kManySms = 1, kTinySmem = 2, kSmallSmem = 3, kMidSmem = 4, kOneSmLarge = 5, kClusters = 6,
             kOneSmMid = 7, kOneSm128 = 8 };
const emu::DeviceConfig kDevices[] = {
    {1, 99 * 1024},    // kOneSm: BT = 64 from T = 32 on
    {132, 227 * 1024}, // kManySms: H100-like; column splits and many wgrad splits for small T
    {4, 10 * 1024},    // kTinySmem (fictional): r chunks of 64 at BT = 16; x staged only for d <= 64 (16-bit)
    {2, 24 * 1024},    // kSmallSmem (fictional): BT = 64 with r chunks of 64 (16-bit types)
    {4, 48 * 1024},    // kMidSmem (fictional): the vectorised forward with r chunks of 256, x unstaged from d > 640 (16-bit, BT = 16)
    {1, 227 * 1024},   // kOneSmLarge: BT = 64 from T = 32 on with an H100's shared memory (the vectorised 64-token forward)
    {2, 120 * 1024, true},  // kClusters (fictional sm_90): BT = 64 from T = 64; x unstaged from d > 576, so clusters
    {1, 112 * 1024},   // kOneSmMid (fictional): the vectorised 64-token forward with a separate residual, x unstaged from d > 192
    {1, 128 * 1024},   // kOneSm128 (fictional): the vectorised 64-token backward with dy unstaged from d > 448
};
const char* kActNames[10] = {"relu", "gelu",    "gelu_tanh", "quick_gelu", "silu",
                             "tanh", "sigmoid", "leaky",     "relu6",      "linear"};

enum class Scale { kHost, kDeviceScalar, kPerChannel, kHostOne };  // kHostOne: 1.0 (dz = dy)
struct Needs {
  bool dx = true, dw_down = true, db_down = true, dw_up = true, db_up = true, dscale = true;
};
// The launch configuration a case must exercise (0 or -1: not checked).
struct Expect {
  int fwd_bt = 0, fwd_split = 0, fwd_chunks = 0, staged = -1, tok_bt = 0, tok_chunks = 0, wg_split = 0, fwd_ksplit = 0;
  int vec = -1;      // 1: the vectorised forward kernel, 0: the scalar one
  int cluster = -1;  // blocks per thread-block cluster of the forward (0: no clusters)
  int tok_vec = -1, tok_staged = -1, tok_cluster = -1;  // the token kernel's: vectorised, dy staged, cluster size
  int wg_vec = -1;   // every weight-gradient launch vectorised (1) or scalar (0)
};
struct Case {
  const char* name;
  Dt dt;
  int dev;
  int64_t T;
  int d, r, act;
  bool fwd = true, bwd = true;
  bool bd = true, bu = true, save_pre = true, separate_res = false;
  Scale scale = Scale::kPerChannel;
  Layout x = Layout::kContig, res = Layout::kContig, dy = Layout::kContig, pre = Layout::kContig;
  bool strided_weights = false;  // weights column-major, biases strided (the binding passes them contiguous)
  bool padded_out = false;       // outputs with a row stride above their width
  bool aligned_rows = false;     // weights and outputs in Layout::kRowAligned (x and res: set .x / .res)
  Needs needs = {};
  cudaError_t error = cudaSuccess;  // what adapter_fwd / adapter_bwd_token must return
  Expect expect = {};
  bool tsan = false;  // in the ThreadSanitizer subset
};

// Needs of the backward (the binding's need_* flags).
constexpr Needs kOnlyDx{true, false, false, false, false, false};
constexpr Needs kOnlyDwUp{false, false, false, true, false, false};
constexpr Needs kOnlyBiases{false, false, true, false, true, false};
constexpr Needs kOnlyDscale{false, false, false, false, false, true};
constexpr Needs kDownAndDbUp{false, true, true, false, true, false};
constexpr Needs kTokenOnly{true, true, false, false, false, true};  // dx, dh (for dw_down) and dscale

// Every case runs the forward and the backward (all gradients unless `needs` says otherwise).
// Shapes are chosen off every tile size (16, 32, 64); `expect` pins the configuration each case
// is there for. Activations: relu 0, gelu 1, gelu_tanh 2, quick_gelu 3, silu 4, tanh 5, sigmoid 6,
// leaky relu 7, relu6 8, linear 9.
const Case kCases[] = {
    {.name = "tiny", .dt = Dt::F16, .dev = kManySms, .T = 1, .d = 1, .r = 1, .act = 0},
    {.name = "decode-bf16", .dt = Dt::BF16, .dev = kManySms, .T = 3, .d = 100, .r = 7, .act = 1, .bd = false,
     .bu = false, .separate_res = true, .scale = Scale::kHost, .x = Layout::kEveryOther, .res = Layout::kRowPadded,
     .expect = {.fwd_ksplit = 4, .wg_vec = 0}},
    // The decode path at its limits: 64 tokens (4 blocks of 16), d-splits of one k-stage, r = 64 (one r chunk).
    {.name = "decode-64-f16", .dt = Dt::F16, .dev = kManySms, .T = 64, .d = 97, .r = 64, .act = 2,
     .expect = {.fwd_bt = 16, .fwd_ksplit = 4}, .tsan = true},
    {.name = "decode-simt-f32", .dt = Dt::F32, .dev = kManySms, .T = 1, .d = 300, .r = 33, .act = 4, .save_pre = false,
     .expect = {.fwd_ksplit = 10}},
    {.name = "simt-f32", .dt = Dt::F32, .dev = kManySms, .T = 37, .d = 16, .r = 1, .act = 6, .separate_res = true,
     .scale = Scale::kDeviceScalar, .expect = {.fwd_bt = 16, .tok_bt = 16}},
    {.name = "tf32", .dt = Dt::TF32, .dev = kManySms, .T = 5, .d = 40, .r = 70, .act = 4, .x = Layout::kColMajor,
     .dy = Layout::kColMajor, .pre = Layout::kRowPadded, .tsan = true},
    {.name = "col-split-f16", .dt = Dt::F16, .dev = kManySms, .T = 20, .d = 600, .r = 7, .act = 2,
     .expect = {.fwd_bt = 16, .fwd_split = 3, .fwd_ksplit = 19}},
    {.name = "bt64-f16", .dt = Dt::F16, .dev = kOneSm, .T = 70, .d = 50, .r = 9, .act = 5,
     .expect = {.fwd_bt = 64, .fwd_split = 1, .staged = 1, .tok_bt = 64, .wg_split = 2}, .tsan = true},
    {.name = "bt64-chunks-bf16", .dt = Dt::BF16, .dev = kSmallSmem, .T = 130, .d = 90, .r = 100, .act = 3,
     .separate_res = true, .scale = Scale::kDeviceScalar, .res = Layout::kColMajor,
     .expect = {.fwd_bt = 64, .fwd_chunks = 2, .staged = 0, .tok_bt = 64, .tok_chunks = 2}},
    {.name = "bt64-tf32", .dt = Dt::TF32, .dev = kOneSm, .T = 64, .d = 40, .r = 20, .act = 1,
     .expect = {.fwd_bt = 64, .tok_bt = 64, .vec = 0}},  // the vectorised fp32 64-token tile needs > 99 KiB
    {.name = "bt64-simt-f32", .dt = Dt::F32, .dev = kOneSm, .T = 96, .d = 24, .r = 12, .act = 7,
     .dy = Layout::kRowPadded, .expect = {.fwd_bt = 64, .tok_bt = 64}, .tsan = true},
    {.name = "chunks-staged-f16", .dt = Dt::F16, .dev = kTinySmem, .T = 20, .d = 60, .r = 150, .act = 7,
     .expect = {.fwd_bt = 16, .fwd_chunks = 3, .staged = 1, .tok_chunks = 3}, .tsan = true},
    {.name = "chunks-unstaged-bf16", .dt = Dt::BF16, .dev = kTinySmem, .T = 20, .d = 70, .r = 65, .act = 8,
     .separate_res = true, .expect = {.fwd_chunks = 2, .staged = 0, .tok_chunks = 2}, .tsan = true},
    {.name = "chunks-f32", .dt = Dt::F32, .dev = kSmallSmem, .T = 70, .d = 33, .r = 200, .act = 9,
     .x = Layout::kEveryOther, .expect = {.fwd_bt = 16, .fwd_chunks = 2, .tok_bt = 16, .tok_chunks = 2}},
    {.name = "optin-tf32", .dt = Dt::TF32, .dev = kManySms, .T = 17, .d = 24, .r = 800, .act = 0,
     .expect = {.fwd_chunks = 1, .staged = 1}},
    {.name = "strided-weights-f16", .dt = Dt::F16, .dev = kManySms, .T = 9, .d = 33, .r = 17, .act = 6,
     .strided_weights = true, .padded_out = true},
    {.name = "only-dx-bf16", .dt = Dt::BF16, .dev = kManySms, .T = 25, .d = 48, .r = 24, .act = 4, .save_pre = false,
     .needs = kOnlyDx},
    {.name = "only-dw-up-f16", .dt = Dt::F16, .dev = kManySms, .T = 100, .d = 100, .r = 7, .act = 1, .needs = kOnlyDwUp,
     .expect = {.wg_split = 4}},
    {.name = "only-biases-f32", .dt = Dt::F32, .dev = kManySms, .T = 300, .d = 20, .r = 3, .act = 0,
     .needs = kOnlyBiases, .expect = {.wg_split = 2}},
    {.name = "only-dscale-tf32", .dt = Dt::TF32, .dev = kManySms, .T = 40, .d = 70, .r = 5, .act = 5,
     .needs = kOnlyDscale},
    {.name = "down-and-db-up-bf16", .dt = Dt::BF16, .dev = kManySms, .T = 50, .d = 40, .r = 10, .act = 3,
     .needs = kDownAndDbUp},
    {.name = "empty-f16", .dt = Dt::F16, .dev = kManySms, .T = 0, .d = 8, .r = 4, .act = 0},
    {.name = "empty-bf16", .dt = Dt::BF16, .dev = kManySms, .T = 0, .d = 8, .r = 4, .act = 1},
    {.name = "empty-f32", .dt = Dt::F32, .dev = kManySms, .T = 0, .d = 8, .r = 4, .act = 2},
    {.name = "empty-tf32", .dt = Dt::TF32, .dev = kManySms, .T = 0, .d = 8, .r = 4, .act = 3},
    // The vectorised forward (16-byte cp.async, ldmatrix, 16-byte epilogue): every operand 16-byte aligned with
    // row strides a multiple of 16 bytes (all names start with vec- or cluster: mutants.py filters on them).
    {.name = "vec-bt64-bf16", .dt = Dt::BF16, .dev = kOneSmLarge, .T = 70, .d = 136, .r = 40, .act = 1,
     .expect = {.fwd_bt = 64, .staged = 1, .vec = 1}, .tsan = true},
    {.name = "vec-decode-f16", .dt = Dt::F16, .dev = kManySms, .T = 5, .d = 264, .r = 64, .act = 2,
     .expect = {.fwd_bt = 16, .staged = 1, .fwd_ksplit = 9, .vec = 1}, .tsan = true},
    {.name = "vec-tail-f16", .dt = Dt::F16, .dev = kManySms, .T = 21, .d = 45, .r = 13, .act = 7, .separate_res = true,
     .x = Layout::kRowAligned, .res = Layout::kRowAligned, .aligned_rows = true, .expect = {.vec = 1}, .tsan = true},
    {.name = "vec-simt-f32", .dt = Dt::F32, .dev = kOneSmLarge, .T = 80, .d = 52, .r = 12, .act = 3, .save_pre = false,
     .expect = {.fwd_bt = 64, .vec = 1}},
    {.name = "cluster2-bf16", .dt = Dt::BF16, .dev = kClusters, .T = 70, .d = 768, .r = 24, .act = 1, .bwd = false,
     .expect = {.fwd_bt = 64, .fwd_split = 2, .staged = 1, .vec = 1, .cluster = 2}, .tsan = true},
    // More of the vectorised forward: unstaged x, the decode path unstaged, r chunks, TF32, and one operand off
    // its requirements.
    {.name = "vec-unstaged-f16", .dt = Dt::F16, .dev = kOneSmMid, .T = 40, .d = 200, .r = 24, .act = 4,
     .separate_res = true, .expect = {.fwd_bt = 64, .staged = 0, .vec = 1}, .tsan = true},
    {.name = "vec-decode-unstaged-bf16", .dt = Dt::BF16, .dev = kMidSmem, .T = 3, .d = 712, .r = 8, .act = 0,
     .scale = Scale::kHost, .expect = {.staged = 0, .fwd_ksplit = 4, .vec = 1}},
    {.name = "vec-chunks-bf16", .dt = Dt::BF16, .dev = kMidSmem, .T = 20, .d = 64, .r = 504, .act = 8,
     .expect = {.fwd_bt = 16, .fwd_chunks = 2, .staged = 1, .vec = 1}},
    {.name = "vec-tf32", .dt = Dt::TF32, .dev = kManySms, .T = 33, .d = 30, .r = 9, .act = 5,
     .x = Layout::kRowAligned, .aligned_rows = true, .expect = {.vec = 1}},
    // Thread-block clusters (x read once where its 64-token tile does not fit one block; 2 blocks above):
    // 6 blocks (a separate residual needs its ring: smaller slices), and r over two 64-column chunks of
    // the partials with d and r off the vector width.
    {.name = "cluster6-f16", .dt = Dt::F16, .dev = kClusters, .T = 130, .d = 768, .r = 24, .act = 4, .bwd = false,
     .separate_res = true, .expect = {.fwd_bt = 64, .fwd_split = 6, .staged = 1, .vec = 1, .cluster = 6}},
    {.name = "cluster-r128-tail-bf16", .dt = Dt::BF16, .dev = kClusters, .T = 66, .d = 700, .r = 120, .act = 7,
     .bwd = false,
     .x = Layout::kRowAligned, .aligned_rows = true, .expect = {.fwd_bt = 64, .fwd_split = 4, .vec = 1, .cluster = 4}},
    // The vectorised token backward (16-bit types, d and r multiples of 8; every case above that meets its
    // requirements takes it too): dy unstaged at BT = 64 with the residual and dscale, a cluster of 3 holding
    // the dy tile, two 64-column chunks of r with a unit host scale (no dz pass), and the needs that skip its
    // phases; the vectorised weight-gradient kernel (16-bit, aligned rows) in most of them, bias sums only in
    // the last (names start with bvec-: mutants.py filters on them).
    {.name = "bvec-unstaged-bt64-bf16", .dt = Dt::BF16, .dev = kOneSm128, .T = 70, .d = 584, .r = 40, .act = 1, .fwd = false,
     .needs = kTokenOnly,
     .expect = {.tok_bt = 64, .tok_vec = 1, .tok_staged = 0, .tok_cluster = 0, .wg_vec = 1}},
    {.name = "bvec-cluster3-bf16", .dt = Dt::BF16, .dev = kClusters, .T = 64, .d = 704, .r = 24, .act = 2, .fwd = false,
     .needs = kTokenOnly,
     .expect = {.tok_bt = 64, .tok_vec = 1, .tok_staged = 1, .tok_cluster = 3}, .tsan = true},
    {.name = "bvec-r72-f16", .dt = Dt::F16, .dev = kManySms, .T = 20, .d = 48, .r = 72, .act = 6,
     .scale = Scale::kHostOne, .expect = {.tok_bt = 16, .tok_vec = 1, .tok_staged = 1, .wg_vec = 1}, .tsan = true},
    {.name = "bvec-only-dscale-bf16", .dt = Dt::BF16, .dev = kManySms, .T = 21, .d = 72, .r = 16, .act = 7,
     .needs = kOnlyDscale, .expect = {.tok_vec = 1}},
    {.name = "bvec-dh-only-f16", .dt = Dt::F16, .dev = kManySms, .T = 19, .d = 40, .r = 8, .act = 5,
     .needs = kDownAndDbUp, .expect = {.tok_vec = 1}},
    {.name = "bvec-biases-bf16", .dt = Dt::BF16, .dev = kManySms, .T = 300, .d = 64, .r = 16, .act = 3,
     .needs = kOnlyBiases, .expect = {.wg_split = 2, .wg_vec = 1}},
    // One operand off the vectorised path's requirements sends the whole forward down the scalar one.
    {.name = "vec-off-res-f16", .dt = Dt::F16, .dev = kManySms, .T = 20, .d = 64, .r = 16, .act = 1,
     .separate_res = true, .res = Layout::kRowPadded, .expect = {.vec = 0}},
    {.name = "no-smem-f32", .dt = Dt::F32, .dev = kTinySmem, .T = 4, .d = 8, .r = 4, .act = 0, .needs = kOnlyDx,
     .error = cudaErrorInvalidConfiguration},
};

}  // namespace
