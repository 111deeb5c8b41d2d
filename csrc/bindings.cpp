// Thin torch binding for the CUDA adapter kernels: argument checks, output/workspace allocation
// with the caching allocator, and the calls into the launchers of adapter_api.h. No maths here.
//
// Ops (registered into the `adapterkern` namespace, which Python also adds ops to, hence
// TORCH_LIBRARY_FRAGMENT): adapterkern::cuda_adapter_fwd and adapterkern::cuda_adapter_bwd, with a
// CUDA implementation only. Fake implementations and autograd are registered from Python on the
// public op that calls these (adapterkern/backends/cuda.py is the only caller).
//
// Layout policy (what is copied, what is read strided):
//   * x, residual, dy, preact: read with their strides, never copied (each element is read once
//     per block; a copy would cost a full extra read + write of a (T, d) tensor).
//   * weights and biases: made contiguous (a no-op in the usual case). They are small (d * r) and
//     re-read by every token block, so unit-stride rows are worth one copy; it also bounds their
//     offsets for the kernels' 32-bit weight indexing (checked below).
//   * scale: converted to a contiguous fp32 tensor (at most d elements).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "adapter_api.h"

namespace {

using adapterkern::DType;
using adapterkern::ScaleArg;
using adapterkern::StridedMat;

constexpr int64_t kMaxActivation = 9;  // adapterkern/activations.py: RELU=0 ... LINEAR=9

DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK(false, "adapterkern cuda: unsupported dtype ", t.scalar_type(),
                  " (expected float32, float16 or bfloat16)");
  }
}

// ADAPTERKERN_CUDA_{VECTOR,CLUSTER,DECODE}=off: the older kernel even where the newer one applies (the
// benchmarks time both).
bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::string(v) == "off";
}

void check_launch(cudaError_t e, const char* what) {
  TORCH_CHECK(e == cudaSuccess, "adapterkern cuda: launching ", what, " failed: ", cudaGetErrorString(e));
}

StridedMat mat(const at::Tensor& t) { return StridedMat{t.data_ptr(), t.stride(0), t.stride(1)}; }

void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), "adapterkern cuda: ", name, " is on ", t.device(), ", x on ", x.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "adapterkern cuda: ", name, " has dtype ", t.scalar_type(),
              ", x has ", x.scalar_type());
}

void check_2d(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, "adapterkern cuda: ", name,
              " must have shape (", rows, ", ", cols, "), got ", t.sizes());
}

at::Tensor weight(const at::Tensor& w, const char* name, int64_t rows, int64_t cols, const at::Tensor& x) {
  check_2d(w, name, rows, cols);
  check_like(w, x, name);
  TORCH_CHECK(rows * cols < (int64_t(1) << 31), "adapterkern cuda: ", name, " has ", rows * cols,
              " elements; the kernels index weights with 32-bit offsets (at most 2^31 - 1)");
  return w.contiguous();
}

at::Tensor bias(const std::optional<at::Tensor>& b, const char* name, int64_t n, const at::Tensor& x) {
  if (!b.has_value() || !b->defined()) return at::Tensor();
  TORCH_CHECK(b->dim() == 1 && b->size(0) == n, "adapterkern cuda: ", name, " must have shape (", n, "), got ",
              b->sizes());
  check_like(*b, x, name);
  return b->contiguous();
}

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// `keep` owns the fp32 copy for the duration of the launches.
ScaleArg scale_arg(const std::optional<at::Tensor>& scale, double value, int64_t d, const at::Tensor& x,
                   at::Tensor& keep) {
  ScaleArg s;
  s.value = static_cast<float>(value);
  if (!scale.has_value() || !scale->defined()) return s;
  TORCH_CHECK(scale->numel() == 1 || scale->numel() == d, "adapterkern cuda: scale must have 1 or d = ", d,
              " elements, got shape ", scale->sizes());
  TORCH_CHECK(scale->device() == x.device(), "adapterkern cuda: scale is on ", scale->device(), ", x on ",
              x.device());
  TORCH_CHECK(at::isFloatingType(scale->scalar_type()), "adapterkern cuda: scale must be a float tensor, got ",
              scale->scalar_type());
  keep = scale->to(at::kFloat).contiguous();
  s.p = keep.data_ptr<float>();
  s.len = keep.numel();
  return s;
}

void check_common(const at::Tensor& x, int64_t d, int64_t r, int64_t activation) {
  TORCH_CHECK(x.is_cuda(), "adapterkern cuda: x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.dim() == 2, "adapterkern cuda: x must be 2-D (T, d), got shape ", x.sizes());
  TORCH_CHECK(d >= 1 && d < (int64_t(1) << 31), "adapterkern cuda: d = ", d, " out of range");
  TORCH_CHECK(r >= 1 && r < (int64_t(1) << 31), "adapterkern cuda: r = ", r, " out of range");
  TORCH_CHECK(activation >= 0 && activation <= kMaxActivation, "adapterkern cuda: activation id ", activation,
              " out of range [0, ", kMaxActivation, "]");
}

std::tuple<at::Tensor, at::Tensor> cuda_adapter_fwd(const at::Tensor& x, const at::Tensor& w_down,
                                                    const std::optional<at::Tensor>& b_down, const at::Tensor& w_up,
                                                    const std::optional<at::Tensor>& b_up,
                                                    const std::optional<at::Tensor>& scale, double scale_value,
                                                    const std::optional<at::Tensor>& residual, int64_t activation,
                                                    bool save_preact, bool allow_tf32) {
  TORCH_CHECK(x.dim() == 2, "adapterkern cuda: x must be 2-D (T, d), got shape ", x.sizes());
  TORCH_CHECK(w_down.dim() == 2, "adapterkern cuda: w_down must be 2-D (r, d), got shape ", w_down.sizes());
  const int64_t T = x.size(0), d = x.size(1), r = w_down.size(0);
  check_common(x, d, r, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor wd = weight(w_down, "w_down", r, d, x);
  const at::Tensor wu = weight(w_up, "w_up", d, r, x);
  const at::Tensor bd = bias(b_down, "b_down", r, x);
  const at::Tensor bu = bias(b_up, "b_up", d, x);
  at::Tensor scale_keep;
  const ScaleArg sa = scale_arg(scale, scale_value, d, x, scale_keep);
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    res = *residual;
    check_2d(res, "residual", T, d);
    check_like(res, x, "residual");
  }

  at::Tensor y = at::empty({T, d}, x.options());
  at::Tensor pre = save_preact ? at::empty({T, r}, x.options()) : at::empty({0}, x.options());
  if (T == 0) return {y, pre};

  adapterkern::FwdArgs a;
  a.x = mat(x);
  if (res.defined()) a.res = mat(res);
  a.wd = mat(wd);
  a.wu = mat(wu);
  a.bd = ptr_or_null(bd); a.sbd = 1;
  a.bu = ptr_or_null(bu); a.sbu = 1;
  a.scale = sa;
  a.y = y.data_ptr(); a.ldy = d;
  a.pre = save_preact ? pre.data_ptr() : nullptr; a.ldpre = r;
  a.T = T; a.d = (int)d; a.r = (int)r; a.act = (int)activation;
  const bool tf32 = allow_tf32 && x.scalar_type() == at::kFloat;
  // The decode path's fp32 partial sums (few token blocks); the caching allocator keeps it cheap and
  // CUDA-graph safe. ADAPTERKERN_CUDA_DECODE=off: the one-launch forward (the benchmarks time both).
  const adapterkern::FwdPlan plan = adapterkern::adapter_fwd_plan(dtype_of(x), tf32, T, (int)d, (int)r);
  const bool decode = !env_off("ADAPTERKERN_CUDA_DECODE");
  a.vectorized = !env_off("ADAPTERKERN_CUDA_VECTOR");
  a.clusters = !env_off("ADAPTERKERN_CUDA_CLUSTER");
  at::Tensor partial_ws;
  if (decode && plan.partial_floats > 0) {
    partial_ws = at::empty({plan.partial_floats}, x.options().dtype(at::kFloat));
    a.partial_ws = partial_ws.data_ptr<float>();
  }
  check_launch(adapterkern::adapter_fwd(a, dtype_of(x), tf32, c10::cuda::getCurrentCUDAStream(x.device().index()).stream()),
               "adapter forward");
  return {y, pre};
}

// Returns [dx, dw_down, db_down, dw_up, db_up, dscale]; an output that was not asked for is an
// empty placeholder tensor (the Python wrapper turns it into None).
std::vector<at::Tensor> cuda_adapter_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& preact,
                                         const at::Tensor& w_down, const std::optional<at::Tensor>& b_down,
                                         const at::Tensor& w_up, const std::optional<at::Tensor>& b_up,
                                         const std::optional<at::Tensor>& scale, double scale_value,
                                         bool residual_is_x, int64_t activation, bool need_dx, bool need_dw_down,
                                         bool need_db_down, bool need_dw_up, bool need_db_up, bool need_dscale,
                                         bool allow_tf32) {
  (void)b_down;  // not needed: preact already contains it
  TORCH_CHECK(x.dim() == 2, "adapterkern cuda: x must be 2-D (T, d), got shape ", x.sizes());
  TORCH_CHECK(w_down.dim() == 2, "adapterkern cuda: w_down must be 2-D (r, d), got shape ", w_down.sizes());
  const int64_t T = x.size(0), d = x.size(1), r = w_down.size(0);
  check_common(x, d, r, activation);
  const c10::cuda::CUDAGuard guard(x.device());
  check_2d(dy, "dy", T, d);
  check_like(dy, x, "dy");
  check_2d(preact, "preact", T, r);
  check_like(preact, x, "preact");
  const at::Tensor wd = weight(w_down, "w_down", r, d, x);
  const at::Tensor wu = weight(w_up, "w_up", d, r, x);
  const at::Tensor bu = bias(b_up, "b_up", d, x);
  at::Tensor scale_keep;
  const ScaleArg sa = scale_arg(scale, scale_value, d, x, scale_keep);
  const bool has_scale_tensor = scale.has_value() && scale->defined();
  need_dscale = need_dscale && has_scale_tensor;

  const DType dt = dtype_of(x);
  const bool tf32 = allow_tf32 && x.scalar_type() == at::kFloat;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const auto opts = x.options();
  const auto f32 = x.options().dtype(at::kFloat);
  const at::Tensor none = at::empty({0}, opts);
  std::vector<at::Tensor> out(6, none);
  const bool need_dh = need_dw_down || need_db_down;

  if (T == 0) {  // sums over no tokens
    if (need_dx) out[0] = at::empty({0, d}, opts);
    if (need_dw_down) out[1] = at::zeros({r, d}, opts);
    if (need_db_down) out[2] = at::zeros({r}, opts);
    if (need_dw_up) out[3] = at::zeros({d, r}, opts);
    if (need_db_up) out[4] = at::zeros({d}, opts);
    if (need_dscale) out[5] = at::zeros(scale->sizes(), scale->options());
    return out;
  }

  // 1. Token-parallel kernel: dx, dh (for the down-projection's gradients), dscale partials.
  at::Tensor dh, dscale_ws;
  if (need_dx || need_dh || need_dscale) {
    const adapterkern::BwdTokPlan plan = adapterkern::adapter_bwd_token_plan(dt, tf32, T, (int)d, (int)r);
    if (need_dx) out[0] = at::empty({T, d}, opts);
    if (need_dh) dh = at::empty({T, r}, opts);
    if (need_dscale) dscale_ws = at::empty({plan.nblocks, d}, f32);
    adapterkern::BwdTokArgs a;
    a.dy = mat(dy);
    a.pre = mat(preact);
    a.wd = mat(wd);
    a.wu = mat(wu);
    if (residual_is_x && need_dx) a.add = mat(dy);
    // The vectorised kernel's B operands, wu^T (r, d) and wd^T (d, r) row-major (2 r d elements, noise beside
    // the T d of dy and dx); 16-bit types with aligned rows only, where the launcher may take that kernel.
    a.vectorized = !env_off("ADAPTERKERN_CUDA_VECTOR");
    a.clusters = !env_off("ADAPTERKERN_CUDA_CLUSTER");
    at::Tensor wut, wdt;
    if (a.vectorized && x.element_size() == 2 && d % 8 == 0 && r % 8 == 0) {
      wut = wu.t().contiguous();
      wdt = wd.t().contiguous();
      a.wut = mat(wut);
      a.wdt = mat(wdt);
    }
    a.bu = ptr_or_null(bu); a.sbu = 1;
    a.scale = sa;
    a.dx = need_dx ? out[0].data_ptr() : nullptr; a.lddx = d;
    a.dh = need_dh ? dh.data_ptr() : nullptr; a.lddh = r;
    a.dscale_ws = need_dscale ? dscale_ws.data_ptr<float>() : nullptr;
    a.T = T; a.d = (int)d; a.r = (int)r; a.act = (int)activation;
    check_launch(adapterkern::adapter_bwd_token(a, plan, dt, tf32, stream), "adapter backward (token kernel)");
  }

  // Weight gradient w = sum_t A(t, :)^T B(t, :) (M x N) into w_out and bias gradient b = sum_t A(t, :)
  // (M) into b_out, each allocated and computed only when asked for (split-K over tokens through fp32
  // workspaces; see adapter_api.h).
  auto wgrad = [&](const at::Tensor& a_src, adapterkern::SrcMode a_mode, const at::Tensor& b_src,
                   adapterkern::SrcMode b_mode, int64_t M, int64_t N, bool need_w, bool need_b, at::Tensor& w_out,
                   at::Tensor& b_out, const char* what) {
    const adapterkern::WgradPlan plan = adapterkern::adapter_wgrad_plan(T, (int)M, (int)N);
    at::Tensor ws_w = need_w ? at::empty({plan.nsplit, M, N}, f32) : at::Tensor();
    at::Tensor ws_b = need_b ? at::empty({plan.nsplit, M}, f32) : at::Tensor();
    if (need_w) w_out = at::empty({M, N}, opts);
    if (need_b) b_out = at::empty({M}, opts);
    adapterkern::WgradArgs a;
    a.vectorized = !env_off("ADAPTERKERN_CUDA_VECTOR");
    a.a = mat(a_src); a.a_mode = a_mode;
    a.b = mat(b_src); a.b_mode = b_mode;
    a.M = (int)M; a.N = (int)N;
    a.need_w = need_w; a.need_b = need_b;
    a.scale = sa;
    a.act = (int)activation;
    a.T = T;
    a.ws_w = need_w ? ws_w.data_ptr<float>() : nullptr;
    a.ws_b = need_b ? ws_b.data_ptr<float>() : nullptr;
    a.w_out = need_w ? w_out.data_ptr() : nullptr;
    a.b_out = need_b ? b_out.data_ptr() : nullptr;
    check_launch(adapterkern::adapter_wgrad(a, plan, dt, tf32, stream), what);
  };

  // 2. Up-projection: dw_up = dz^T act(pre), db_up = sum_t dz, with dz = dy * scale.
  if (need_dw_up || need_db_up) {
    wgrad(dy, adapterkern::kScaled, preact, adapterkern::kAct, d, r, need_dw_up, need_db_up, out[3], out[4],
          "adapter backward (dw_up)");
  }

  // 3. Down-projection: dw_down = dh^T x, db_down = sum_t dh.
  if (need_dh) {
    wgrad(dh, adapterkern::kPlain, x, adapterkern::kPlain, r, d, need_dw_down, need_db_down, out[1], out[2],
          "adapter backward (dw_down)");
  }

  // 4. dscale: the per-block partial rows are summed by torch's (deterministic) reduction.
  if (need_dscale) {
    at::Tensor s = scale->numel() == 1 ? dscale_ws.sum() : dscale_ws.sum(0);
    out[5] = s.reshape(scale->sizes()).to(scale->scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(adapterkern, m) {
  m.def(
      "cuda_adapter_fwd(Tensor x, Tensor w_down, Tensor? b_down, Tensor w_up, Tensor? b_up, Tensor? scale, "
      "float scale_value, Tensor? residual, int activation, bool save_preact, bool allow_tf32) -> (Tensor, Tensor)");
  m.def(
      "cuda_adapter_bwd(Tensor dy, Tensor x, Tensor preact, Tensor w_down, Tensor? b_down, Tensor w_up, "
      "Tensor? b_up, Tensor? scale, float scale_value, bool residual_is_x, int activation, bool need_dx, "
      "bool need_dw_down, bool need_db_down, bool need_dw_up, bool need_db_up, bool need_dscale, "
      "bool allow_tf32) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(adapterkern, CUDA, m) {
  m.impl("cuda_adapter_fwd", &cuda_adapter_fwd);
  m.impl("cuda_adapter_bwd", &cuda_adapter_bwd);
}

// Lets `import adapterkern._C` load the library (and so register the ops) when it is built by
// setup.py; the JIT build loads the same code with torch.ops.load_library instead.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "adapterkern CUDA kernels; the ops live in torch.ops.adapterkern", -1, nullptr,
  };
  return PyModule_Create(&module_def);
}
