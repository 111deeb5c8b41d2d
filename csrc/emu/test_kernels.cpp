// Host-emulated test of the CUDA kernels and launchers in csrc/ (built by csrc/emu/build.py with
// g++ against csrc/emu/include; see csrc/README.md, "Host emulation").
//
// Plays the role of csrc/bindings.cpp without torch: calls adapter_fwd, adapter_bwd_token(+plan)
// and adapter_wgrad(+plan) with the workspaces the binding allocates, on exactly sized host
// buffers (inputs: every element outside the view is NaN; outputs and workspaces: all NaN before
// the call), and compares every output with the float64 reference of reference.h within
// kTolFactor x its first-order error bound. One line per case; exit status 1 on any failure.
//
// Usage: test_kernels [--subset=all|tsan] [--case=NAME] [--filter=SUBSTRING] [--seed=N] [--list] [--fail-fast]
// (--fail-fast: stop at the first failure, for csrc/emu/mutants.py)
#include <unistd.h>

#include <chrono>
#include <cinttypes>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#include <sanitizer/common_interface_defs.h>
#endif

#include "adapter_api.h"
#include "kernels/adapter_bwd.cuh"  // parameter structs: which configuration a case exercised
#include "kernels/adapter_fwd.cuh"
#include "cases.h"
#include "reference.h"
#include "selftest.h"

namespace {

using adapterkern::DType;

// ------------------------------------------------------------------------------ element types
const char* name_of(Dt dt) { return dt == Dt::F16 ? "f16" : dt == Dt::BF16 ? "bf16" : dt == Dt::F32 ? "f32" : "tf32"; }
DType api_dtype(Dt dt) { return dt == Dt::F16 ? DType::F16 : dt == Dt::BF16 ? DType::BF16 : DType::F32; }
bool uses_tf32(Dt dt) { return dt == Dt::TF32; }
size_t elem_bytes(Dt dt) { return dt == Dt::F16 || dt == Dt::BF16 ? 2 : 4; }
ref::Precision precision(Dt dt) {
  switch (dt) {
    case Dt::F16: return {std::ldexp(1.0, -11), 0.0};
    case Dt::BF16: return {std::ldexp(1.0, -8), 0.0};
    case Dt::F32: return {std::ldexp(1.0, -24), 0.0};
    case Dt::TF32: return {std::ldexp(1.0, -24), 2 * std::ldexp(1.0, -11)};
  }
  return {};
}
uint32_t poison_bits(Dt dt) { return elem_bytes(dt) == 2 ? (dt == Dt::F16 ? 0x7e01u : 0x7fc1u) : 0x7fc00001u; }

// ------------------------------------------------------------------------------ host tensors
const char* name_of(Layout l) {
  return l == Layout::kContig      ? "contig"
         : l == Layout::kRowPadded ? "rowpad"
         : l == Layout::kColMajor  ? "colmajor"
         : l == Layout::kRowAligned ? "rowalign"
                                   : "every2nd";
}

// A (rows, cols) strided view on a buffer of exactly the elements it spans.
struct Tensor {
  Dt dt;
  int64_t rows, cols, s0, s1;
  size_t elems;
  std::unique_ptr<unsigned char[]> data;

  Tensor(Dt t, int64_t r, int64_t c, Layout layout) : dt(t), rows(r), cols(c) {
    switch (layout) {
      case Layout::kContig: s0 = c, s1 = 1; break;
      case Layout::kRowPadded: s0 = c + 3, s1 = 1; break;
      case Layout::kColMajor: s0 = 1, s1 = r; break;
      case Layout::kEveryOther: s0 = 2, s1 = 2 * r; break;
      case Layout::kRowAligned: s0 = (c + 7) / 8 * 8 + 8, s1 = 1; break;
    }
    elems = (r == 0 || c == 0) ? 0 : (size_t)((r - 1) * s0 + (c - 1) * s1 + 1);
    data.reset(new unsigned char[elems * elem_bytes(dt)]);
    for (size_t i = 0; i < elems; ++i) set_bits(i, poison_bits(dt));
  }
  void* ptr() const { return data.get(); }
  adapterkern::StridedMat mat() const { return {data.get(), s0, s1}; }
  size_t offset(int64_t i, int64_t j) const { return (size_t)(i * s0 + j * s1); }
  void set_bits(size_t k, uint32_t bits) { std::memcpy(data.get() + k * elem_bytes(dt), &bits, elem_bytes(dt)); }
  uint32_t bits(size_t k) const {
    uint32_t b = 0;
    std::memcpy(&b, data.get() + k * elem_bytes(dt), elem_bytes(dt));
    return b;
  }
  void set(int64_t i, int64_t j, double v) {  // rounded to the element type
    const float f = (float)v;
    const size_t k = offset(i, j);
    if (dt == Dt::F16) set_bits(k, __float2half_rn(f).bits);
    else if (dt == Dt::BF16) set_bits(k, __float2bfloat16_rn(f).bits);
    else set_bits(k, std::bit_cast<uint32_t>(f));
  }
  double get(int64_t i, int64_t j) const {
    const uint32_t b = bits(offset(i, j));
    if (dt == Dt::F16) return __half2float(__half{(uint16_t)b});
    if (dt == Dt::BF16) return __bfloat162float(__nv_bfloat16{(uint16_t)b});
    return std::bit_cast<float>(b);
  }
  ref::Mat values() const {
    ref::Mat m(rows, cols);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) m(i, j) = get(i, j);
    return m;
  }
  std::vector<double> column(int64_t j = 0) const {
    std::vector<double> v;
    for (int64_t i = 0; i < rows; ++i) v.push_back(get(i, j));
    return v;
  }
  template <class Gen> void fill(Gen&& gen) {
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) set(i, j, gen());
  }
  bool outside_view_untouched() const {  // the elements between rows of an output keep the poison
    std::vector<bool> in_view(elems, false);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < cols; ++j) in_view[offset(i, j)] = true;
    for (size_t k = 0; k < elems; ++k)
      if (!in_view[k] && bits(k) != poison_bits(dt)) return false;
    return true;
  }
};

// ------------------------------------------------------------------------------ checking
struct Checker {
  bool ok = true;
  std::string failure, worst_name;
  double worst = 0.0;  // largest err / tol over all compared elements

  void fail(const std::string& msg) {
    if (ok) failure = msg;
    ok = false;
  }
  void require(bool cond, const std::string& msg) {
    if (!cond) fail(msg);
  }
  void compare(const char* what, const ref::Mat& got, const ref::Bounded& want) {
    if (got.rows != want.value.rows || got.cols != want.value.cols) return fail(std::string(what) + ": shape");
    for (int64_t i = 0; i < got.rows; ++i)
      for (int64_t j = 0; j < got.cols; ++j) {
        const double g = got(i, j), w = want.value(i, j), tol = ref::kTolFactor * want.bound(i, j);
        const double err = std::fabs(g - w);
        const double ratio = err == 0 ? 0.0 : tol > 0 ? err / tol : INFINITY;
        if (!(err <= tol)) {
          char buf[256];
          std::snprintf(buf, sizeof buf, "%s[%" PRId64 ",%" PRId64 "] = %.9g, want %.9g +- %.3g", what, i, j, g, w,
                        tol);
          fail(buf);
        }
        if (!(ratio <= worst)) worst = ratio, worst_name = what;
      }
  }
};

struct Rng {
  std::mt19937_64 gen;
  double normal(double sd = 1.0) { return std::normal_distribution<double>(0.0, sd)(gen); }
  double uniform(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(gen); }
};

template <class P>
std::vector<P> params_of(const std::vector<emu::LaunchRecord>& log) {
  std::vector<P> out;
  for (const auto& rec : log)
    if (rec.param_type && *rec.param_type == typeid(P)) {
      P p;
      std::memcpy(&p, rec.param.data(), sizeof p);
      out.push_back(p);
    }
  return out;
}
const emu::LaunchRecord* first_of(const std::vector<emu::LaunchRecord>& log, const std::type_info& t) {
  for (const auto& rec : log)
    if (rec.param_type && *rec.param_type == t) return &rec;
  return nullptr;
}
int token_tile(int64_t T, unsigned blocks) {  // BT from the grid: blocks = ceil(T / BT)
  const bool is16 = (T + 15) / 16 == blocks, is64 = (T + 63) / 64 == blocks;
  return is16 && is64 ? -1 : is16 ? 16 : is64 ? 64 : 0;  // -1: T too small to tell
}
void expect_eq(Checker& chk, const char* what, int want, int got) {
  if (want > 0 && got != -1 && got != want)
    chk.fail(std::string("configuration: ") + what + " = " + std::to_string(got) + ", the case expects " +
             std::to_string(want));
}
// The same for a setting whose 0 is meaningful (want < 0: not checked).
void expect_setting(Checker& chk, const char* what, int want, int got) {
  if (want >= 0 && got != want)
    chk.fail(std::string("configuration: ") + what + " = " + std::to_string(got) + ", the case expects " +
             std::to_string(want));
}

// Inputs shared by the forward and backward of a case.
struct Inputs {
  Tensor x, wd, wu, bd, bu, scale;  // scale: fp32 (1 or d) for Scale::kDeviceScalar / kPerChannel
  std::vector<double> scale_cols;   // the scale of each column
  adapterkern::ScaleArg scale_arg;
};

Inputs make_inputs(const Case& c, Rng& rng) {
  const Layout w = c.strided_weights ? Layout::kColMajor : c.aligned_rows ? Layout::kRowAligned : Layout::kContig;
  const Layout b = c.strided_weights ? Layout::kRowPadded : Layout::kContig;
  const int64_t slen = c.scale == Scale::kPerChannel ? c.d : 1;
  Inputs in{Tensor(c.dt, c.T, c.d, c.x), Tensor(c.dt, c.r, c.d, w), Tensor(c.dt, c.d, c.r, w),
            Tensor(c.dt, c.r, 1, b),     Tensor(c.dt, c.d, 1, b),   Tensor(Dt::F32, slen, 1, Layout::kContig), {}, {}};
  in.x.fill([&] { return rng.normal(); });
  in.wd.fill([&] { return rng.normal(1.0 / std::sqrt((double)c.d)); });
  in.wu.fill([&] { return rng.normal(1.0 / std::sqrt((double)c.r)); });
  in.bd.fill([&] { return rng.uniform(-0.5, 0.5); });
  in.bu.fill([&] { return rng.uniform(-1.0, 1.0); });
  in.scale.fill([&] { return rng.uniform(0.5, 1.5) * (rng.uniform(0, 1) < 0.3 ? -1 : 1); });
  if (c.scale == Scale::kHost || c.scale == Scale::kHostOne) {
    const float v = c.scale == Scale::kHost ? 0.75f : 1.0f;
    in.scale_arg = {nullptr, 0, v};
    in.scale_cols.assign((size_t)c.d, v);
  } else {
    in.scale_arg = {static_cast<const float*>(in.scale.ptr()), slen, 1.0f};
    for (int j = 0; j < c.d; ++j) in.scale_cols.push_back(in.scale.get(slen == 1 ? 0 : j, 0));
  }
  return in;
}

std::string run_forward(const Case& c, Rng& rng, const Inputs& in, Checker& chk) {
  const Layout out_layout = c.padded_out ? Layout::kRowPadded : c.aligned_rows ? Layout::kRowAligned : Layout::kContig;
  Tensor res(c.dt, c.T, c.d, c.res), y(c.dt, c.T, c.d, out_layout), pre(c.dt, c.T, c.r, out_layout);
  res.fill([&] { return rng.normal(); });
  adapterkern::FwdArgs a;
  a.x = in.x.mat();
  if (c.separate_res) a.res = res.mat();
  a.wd = in.wd.mat();
  a.wu = in.wu.mat();
  if (c.bd) a.bd = in.bd.ptr(), a.sbd = in.bd.s0;
  if (c.bu) a.bu = in.bu.ptr(), a.sbu = in.bu.s0;
  a.scale = in.scale_arg;
  a.y = y.ptr(), a.ldy = y.s0;
  if (c.save_pre) a.pre = pre.ptr(), a.ldpre = pre.s0;
  a.T = c.T, a.d = c.d, a.r = c.r, a.act = c.act;
  // The decode path's workspace, as the binding allocates it (poisoned: every element it reads was written).
  const adapterkern::FwdPlan plan = adapterkern::adapter_fwd_plan(api_dtype(c.dt), uses_tf32(c.dt), c.T, c.d, c.r);
  std::vector<float> partial_ws((size_t)std::max<int64_t>(plan.partial_floats, 0), std::nanf(""));
  if (plan.partial_floats > 0) a.partial_ws = partial_ws.data();
  emu::take_launch_log();
  const cudaError_t e = adapterkern::adapter_fwd(a, api_dtype(c.dt), uses_tf32(c.dt), nullptr);
  const auto log = emu::take_launch_log();
  chk.require(e == c.error, std::string("adapter_fwd returned ") + cudaGetErrorString(e));
  if (e != cudaSuccess) return "fwd error";

  const auto kps = params_of<adapterkern::FwdKParams>(log);
  const emu::LaunchRecord* first = first_of(log, typeid(adapterkern::FwdKParams));
  if (c.T == 0) chk.require(kps.empty(), "adapter_fwd launched a kernel for T = 0");
  const int bt = first ? token_tile(c.T, first->grid.x) : 0, split = first ? (int)first->grid.y : 0;
  const int staged = kps.empty() ? -1 : kps[0].stage_x;
  const int vec = kps.empty() ? -1 : kps[0].vec;
  const int cluster = kps.empty() ? -1 : kps[0].cluster;
  if (first != nullptr && cluster > 1)
    chk.require(first->cluster.y == (unsigned)cluster && first->grid.y == (unsigned)cluster,
                "the cluster kernel launched without its clusters spanning grid.y");
  for (const auto& kp : kps) chk.require(kp.vec == vec, "the r chunks of one forward took different memory paths");
  expect_eq(chk, "forward BT", c.expect.fwd_bt, bt);
  expect_eq(chk, "forward column splits", c.expect.fwd_split, split);
  expect_eq(chk, "forward r chunks", c.expect.fwd_chunks, (int)kps.size());
  const auto partials = params_of<adapterkern::FwdPartialParams>(log);
  expect_eq(chk, "forward d-splits (decode path)", c.expect.fwd_ksplit,
            partials.empty() ? 1 : (int)first_of(log, typeid(adapterkern::FwdPartialParams))->grid.y);  // also below
  chk.require(partials.size() <= 1 && (partials.empty() || plan.ksplit > 1), "decode path launched without a plan");
  expect_setting(chk, "cluster", c.expect.cluster, cluster);
  expect_setting(chk, "vectorised", c.expect.vec, vec);
  expect_setting(chk, "x staged", c.expect.staged, staged);

  const ref::Mat xv = in.x.values(), wdv = in.wd.values(), wuv = in.wu.values(), resv = res.values();
  const std::vector<double> bdv = in.bd.column(), buv = in.bu.column();
  const ref::FwdIn fin{&xv, &wdv, &wuv, c.separate_res ? &resv : nullptr, c.bd ? &bdv : nullptr,
                       c.bu ? &buv : nullptr, in.scale_cols, c.act, std::max<int>(1, (int)kps.size())};
  const ref::FwdRef want = ref::forward(fin, precision(c.dt));
  chk.compare("y", y.values(), want.y);
  chk.require(y.outside_view_untouched(), "y: a store outside (T, d)");
  if (c.save_pre) {
    chk.compare("pre", pre.values(), want.pre);
    chk.require(pre.outside_view_untouched(), "pre: a store outside (T, r)");
  }
  char buf[96];
  const int ksplit = partials.empty() ? 1 : (int)first_of(log, typeid(adapterkern::FwdPartialParams))->grid.y;
  std::snprintf(buf, sizeof buf, "fwd bt=%d split=%d chunks=%zu staged=%d ksplit=%d vec=%d cluster=%d", bt, split,
                kps.size(), staged, ksplit, vec, cluster);
  return buf;
}

// The binding's weight-gradient call: w = sum_t A(t,:)^T B(t,:) (M x N), b = sum_t A(t,:) (M).
// Returns the split count; *vec: whether the vectorised kernel ran.
int run_wgrad(const Case& c, const Inputs& in, adapterkern::StridedMat a, int a_mode, adapterkern::StridedMat b,
              int b_mode, int M, int N, bool need_w, bool need_b, Tensor& w_out, Tensor& b_out, Checker& chk,
              int* vec) {
  const adapterkern::WgradPlan plan = adapterkern::adapter_wgrad_plan(c.T, M, N);
  Tensor ws_w(Dt::F32, need_w ? plan.nsplit * (int64_t)M : 0, N, Layout::kContig);
  Tensor ws_b(Dt::F32, need_b ? plan.nsplit * (int64_t)M : 0, 1, Layout::kContig);
  adapterkern::WgradArgs w;
  w.a = a, w.a_mode = a_mode, w.b = b, w.b_mode = b_mode, w.M = M, w.N = N;
  w.need_w = need_w, w.need_b = need_b, w.scale = in.scale_arg, w.act = c.act, w.T = c.T;
  w.ws_w = need_w ? static_cast<float*>(ws_w.ptr()) : nullptr;
  w.ws_b = need_b ? static_cast<float*>(ws_b.ptr()) : nullptr;
  w.w_out = need_w ? w_out.ptr() : nullptr;
  w.b_out = need_b ? b_out.ptr() : nullptr;
  emu::take_launch_log();
  const cudaError_t e = adapterkern::adapter_wgrad(w, plan, api_dtype(c.dt), uses_tf32(c.dt), nullptr);
  chk.require(e == cudaSuccess, std::string("adapter_wgrad returned ") + cudaGetErrorString(e));
  const auto kps = params_of<adapterkern::WgKParams>(emu::take_launch_log());
  *vec = kps.empty() ? -1 : kps[0].vec;
  return plan.nsplit;
}

std::string run_backward(const Case& c, Rng& rng, const Inputs& in, Checker& chk) {
  const Needs& n = c.needs;
  const bool need_dscale = n.dscale && c.scale != Scale::kHost && c.scale != Scale::kHostOne, need_dh = n.dw_down || n.db_down;
  const Layout out_layout = c.padded_out ? Layout::kRowPadded : c.aligned_rows ? Layout::kRowAligned : Layout::kContig;
  Tensor dy(c.dt, c.T, c.d, c.dy), pre(c.dt, c.T, c.r, c.pre);
  dy.fill([&] { return rng.normal(); });
  pre.fill([&] { return rng.normal(2.5); });  // reaches relu6's upper kink and the tails of the activations
  const adapterkern::BwdTokPlan plan =
      adapterkern::adapter_bwd_token_plan(api_dtype(c.dt), uses_tf32(c.dt), c.T, c.d, c.r);
  Tensor dx(c.dt, c.T, c.d, out_layout), dh(c.dt, c.T, c.r, out_layout);
  Tensor ws(Dt::F32, need_dscale ? plan.nblocks : 0, c.d, Layout::kContig);
  Tensor dw_up(c.dt, c.d, c.r, Layout::kContig), db_up(c.dt, c.d, 1, Layout::kContig);
  Tensor dw_down(c.dt, c.r, c.d, Layout::kContig), db_down(c.dt, c.r, 1, Layout::kContig);

  Tensor wut(c.dt, c.r, c.d, Layout::kContig), wdt(c.dt, c.d, c.r, Layout::kContig);
  int tok_chunks = 0, tok_vec = 0, tok_staged = 0, tok_cluster = 0;
  emu::take_launch_log();
  if (n.dx || need_dh || need_dscale) {
    adapterkern::BwdTokArgs a;
    a.dy = dy.mat(), a.pre = pre.mat(), a.wd = in.wd.mat(), a.wu = in.wu.mat();
    if (!c.separate_res && n.dx) a.add = dy.mat();
    if (c.bu) a.bu = in.bu.ptr(), a.sbu = in.bu.s0;
    a.scale = in.scale_arg;
    if (n.dx) a.dx = dx.ptr(), a.lddx = dx.s0;
    if (need_dh) a.dh = dh.ptr(), a.lddh = dh.s0;
    if (need_dscale) a.dscale_ws = static_cast<float*>(ws.ptr());
    a.T = c.T, a.d = c.d, a.r = c.r, a.act = c.act;
    if (elem_bytes(c.dt) == 2 && c.d % 8 == 0 && c.r % 8 == 0) {  // as the binding: wu^T and wd^T, row-major
      for (int i = 0; i < c.r; ++i)
        for (int j = 0; j < c.d; ++j) wut.set(i, j, in.wu.get(j, i)), wdt.set(j, i, in.wd.get(i, j));
      a.wut = wut.mat(), a.wdt = wdt.mat();
    }
    const cudaError_t e = adapterkern::adapter_bwd_token(a, plan, api_dtype(c.dt), uses_tf32(c.dt), nullptr);
    chk.require(e == c.error, std::string("adapter_bwd_token returned ") + cudaGetErrorString(e));
    if (e != cudaSuccess) return "bwd error";
    const auto kps = params_of<adapterkern::BwdTokKParams>(emu::take_launch_log());
    tok_chunks = (int)kps.size();
    if (!kps.empty()) tok_vec = kps[0].vec, tok_staged = kps[0].stage_dy, tok_cluster = kps[0].cluster;
    if (c.T == 0) chk.require(tok_chunks == 0, "adapter_bwd_token launched a kernel for T = 0");
  }
  expect_setting(chk, "token kernel vectorised", c.expect.tok_vec, tok_vec);
  expect_setting(chk, "token kernel dy staged", c.expect.tok_staged, tok_staged);
  expect_setting(chk, "token kernel cluster", c.expect.tok_cluster, tok_cluster);
  expect_eq(chk, "token-kernel BT", c.expect.tok_bt, plan.bt);
  expect_eq(chk, "token-kernel r chunks", c.expect.tok_chunks, tok_chunks);
  int split_up = 0, split_down = 0, vec_up = -1, vec_down = -1;
  if (n.dw_up || n.db_up)
    split_up = run_wgrad(c, in, dy.mat(), adapterkern::kScaled, pre.mat(), adapterkern::kAct, c.d, c.r, n.dw_up,
                         n.db_up, dw_up, db_up, chk, &vec_up);
  if (need_dh)
    split_down = run_wgrad(c, in, dh.mat(), adapterkern::kPlain, in.x.mat(), adapterkern::kPlain, c.r, c.d, n.dw_down,
                           n.db_down, dw_down, db_down, chk, &vec_down);
  for (int v : {vec_up, vec_down})
    if (v >= 0) expect_setting(chk, "weight-gradient kernel vectorised", c.expect.wg_vec, v);
  if (c.expect.wg_split > 0 && std::max(split_up, split_down) < c.expect.wg_split)
    chk.fail("configuration: weight-gradient split count below " + std::to_string(c.expect.wg_split));

  const ref::Mat dyv = dy.values(), xv = in.x.values(), prev = pre.values(), wdv = in.wd.values(), wuv = in.wu.values();
  const std::vector<double> buv = in.bu.column();
  const ref::BwdIn bin{&dyv, &xv, &prev, &wdv, &wuv, c.bu ? &buv : nullptr, in.scale_cols, !c.separate_res, c.act,
                       std::max(1, tok_chunks)};
  const ref::BwdRef want = ref::backward(bin, precision(c.dt));
  if (n.dx) {
    chk.compare("dx", dx.values(), want.dx);
    chk.require(dx.outside_view_untouched(), "dx: a store outside (T, d)");
  }
  if (need_dh) chk.require(dh.outside_view_untouched(), "dh: a store outside (T, r)");
  auto row = [](const Tensor& t) {  // an (n, 1) vector as (1, n)
    ref::Mat m(1, t.rows);
    for (int64_t i = 0; i < t.rows; ++i) m(0, i) = t.get(i, 0);
    return m;
  };
  if (n.dw_down) chk.compare("dw_down", dw_down.values(), want.dw_down);
  if (n.db_down) chk.compare("db_down", row(db_down), want.db_down);
  if (n.dw_up) chk.compare("dw_up", dw_up.values(), want.dw_up);
  if (n.db_up) chk.compare("db_up", row(db_up), want.db_up);
  if (need_dscale) {  // the binding's reduction of the per-block rows (torch.sum), here in float64
    const ref::Mat wsv = ws.values();
    const bool scalar = c.scale == Scale::kDeviceScalar;
    ref::Mat got(1, scalar ? 1 : c.d);
    ref::Bounded w{ref::Mat(1, scalar ? 1 : c.d), ref::Mat(1, scalar ? 1 : c.d)};
    for (int j = 0; j < c.d; ++j) {
      for (int64_t b = 0; b < wsv.rows; ++b) got(0, scalar ? 0 : j) += wsv(b, j);
      w.value(0, scalar ? 0 : j) += want.dscale.value(0, j);
      w.bound(0, scalar ? 0 : j) += want.dscale.bound(0, j);
    }
    chk.compare(scalar ? "dscale(scalar)" : "dscale", got, w);
  }
  char buf[96];
  std::snprintf(buf, sizeof buf, "tok bt=%d chunks=%d vec=%d staged=%d cluster=%d wg split=%d,%d vec=%d,%d", plan.bt,
                tok_chunks, tok_vec, tok_staged, tok_cluster, split_up, split_down, vec_up, vec_down);
  return buf;
}

// A sanitizer report or an emulator abort ends the process inside a case: name it on stdout.
char g_running[256] = "";
void report_death() {
  char line[320];
  const int n = std::snprintf(line, sizeof line, "FAIL %s | aborted: see the report on stderr\n", g_running);
  if (n > 0 && write(1, line, (size_t)n) < 0) return;
}
extern "C" void on_abort(int) {
  report_death();
  std::signal(SIGABRT, SIG_DFL);
}

std::string describe(const Case& c) {
  char buf[200];
  std::snprintf(buf, sizeof buf, "%s %s dev%d T=%" PRId64 " d=%d r=%d %s x=%s%s%s", c.name, name_of(c.dt), c.dev,
                c.T, c.d, c.r, kActNames[c.act], name_of(c.x), c.separate_res ? " res" : "", c.tsan ? " [tsan]" : "");
  return buf;
}

}  // namespace

int main(int argc, char** argv) {
  std::string subset = "all", filter, only;
  uint64_t seed = 20240612;
  bool list = false, fail_fast = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--subset=", 0) == 0) subset = arg.substr(9);
    else if (arg.rfind("--filter=", 0) == 0) filter = arg.substr(9);
    else if (arg.rfind("--case=", 0) == 0) only = arg.substr(7);
    else if (arg.rfind("--seed=", 0) == 0) seed = std::stoull(arg.substr(7));
    else if (arg == "--list") list = true;
    else if (arg == "--fail-fast") fail_fast = true;
    else return std::fprintf(stderr, "usage: %s [--subset=all|tsan] [--case=NAME] [--filter=S] [--seed=N] [--list] [--fail-fast]\n",
                             argv[0]), 2;
  }
  if (subset != "all" && subset != "tsan") return std::fprintf(stderr, "unknown subset %s\n", subset.c_str()), 2;
  for (int dev = 0; dev < (int)(sizeof kDevices / sizeof kDevices[0]); ++dev) emu::configure_device(dev, kDevices[dev]);
  std::signal(SIGABRT, on_abort);
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
  __sanitizer_set_death_callback(report_death);
#endif

  int passed = 0, failed = 0;
  std::snprintf(g_running, sizeof g_running, "selftests");
  if (!list && filter.empty() && only.empty())
    for (const CheckResult& r : run_selftests(kManySms)) {
      std::printf("%s selftest %s: %s\n", r.ok ? "PASS" : "FAIL", r.name.c_str(), r.detail.c_str());
      (r.ok ? passed : failed)++;
    }
  for (const Case& c : kCases) {
    if (fail_fast && failed) break;
    const bool selected = (subset == "all" || c.tsan) && describe(c).find(filter) != std::string::npos &&
                          (only.empty() || only == c.name);
    if (!selected) continue;
    if (list) {
      std::printf("%s\n", describe(c).c_str());
      continue;
    }
    std::snprintf(g_running, sizeof g_running, "%s", describe(c).c_str());
    const auto start = std::chrono::steady_clock::now();
    const uint64_t case_seed = seed ^ std::hash<std::string>{}(c.name);
    Rng rng{std::mt19937_64(case_seed)};
    Checker chk;
    cudaSetDevice(c.dev);
    const Inputs in = make_inputs(c, rng);
    std::string geometry;
    if (c.fwd) geometry += run_forward(c, rng, in, chk);
    if (c.bwd) geometry += (geometry.empty() ? "" : " | ") + run_backward(c, rng, in, chk);
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (chk.ok) {
      std::printf("PASS %s | %s | worst err/tol %.3f (%s) | %.2f s\n", describe(c).c_str(), geometry.c_str(), chk.worst,
                  chk.worst_name.c_str(), secs);
      ++passed;
    } else {
      std::printf("FAIL %s | %s | seed=%" PRIu64 " (rerun: --seed=%" PRIu64 " --case=%s): %s\n", describe(c).c_str(),
                  geometry.c_str(), case_seed, seed, c.name, chk.failure.c_str());
      ++failed;
    }
    std::fflush(stdout);
  }
  if (!list) std::printf("%d passed, %d failed%s\n", passed, failed, passed + failed ? "" : " (no case selected)");
  return failed ? 1 : 0;
}
