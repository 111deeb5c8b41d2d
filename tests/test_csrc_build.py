"""Compile-time checks of the CUDA C++ kernels (csrc/), runnable without a GPU.

Runs .ci/check_cuda.sh: every csrc/*.cu compiled with nvcc for sm_80 and sm_90 (no errors, no
register spills without a `SPILL-OK:` comment, every `SASS-PROMISE:` kept), csrc/bindings.cpp compiled
against torch's headers, and the ptxas and SASS reports written. Further runs on tiny kernels of their
own (CHECK_CUDA_SOURCES, sm_90 only, a few seconds each) prove the gates can fail: a forced spill
(-maxrregcount), a broken, stale or malformed promise, no SASS tools. Skipped when nvcc is not on PATH.
About 2-3 minutes on 2 cores.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / ".ci" / "check_cuda.sh"

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH: CUDA sources not compile-checked")


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHON=sys.executable, CHECK_CUDA_REPORT=str(tmp_path / "ptxas_report.txt"), **env)
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=900)


def test_kernels_compile_for_sm80_sm90_without_spills(tmp_path):
    proc = _run(tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "check_cuda: RESULT: OK" in out
    report = (tmp_path / "ptxas_report.txt").read_text()
    for arch in ("sm_80", "sm_90"):
        for kernel in ("adapter_fwd_kernel", "adapter_bwd_token_kernel", "adapter_wgrad_kernel"):
            assert any(line.startswith(arch) and kernel in line for line in report.splitlines()), (arch, kernel, report)
    assert "bindings.cpp: ok" in report or "bindings.cpp: skipped" in report, report
    sass = (tmp_path / "sass_report.txt").read_text()
    for arch in ("sm_80", "sm_90"):
        for kernel in ("adapter_fwd_kernel", "adapter_bwd_token_kernel", "adapter_wgrad_kernel"):
            assert any(line.startswith(arch) and kernel in line for line in sass.splitlines()), (arch, kernel, sass)


SPILLY_KERNEL = r"""
// 96 values live across a store that may alias their source, under a 32-register cap: must spill.
__global__ void __launch_bounds__(1024, 2) spilly_kernel(const float* in, float* out) {
  float v[96];
#pragma unroll
  for (int i = 0; i < 96; ++i) v[i] = in[threadIdx.x + i * 1024];
  out[threadIdx.x] = 0.0f;
  float s = 0.0f;
#pragma unroll
  for (int i = 0; i < 96; ++i) s += v[i] * v[95 - i] + v[(i * 7) % 96];
  out[threadIdx.x + 1024] = s;
}
"""


def test_spill_check_fails_on_a_spilling_kernel(tmp_path):
    src = tmp_path / "spilly.cu"
    src.write_text(SPILLY_KERNEL)
    proc = _run(tmp_path, ADAPTERKERN_CHECK_ARCHS="80", CHECK_CUDA_SOURCES=str(src))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "spilly_kernel" in out and "SPILL-OK" in out, out


# One 128-bit load and store (float4) and one 16-bit load and store (__half): known SASS counts.
TINY_KERNEL = r"""
#include <cuda_fp16.h>
__global__ void tiny_copy_kernel(const float4* __restrict__ in, float4* __restrict__ out,
                                 const __half* __restrict__ h, __half* __restrict__ ho) {
  out[threadIdx.x] = in[threadIdx.x];
  ho[threadIdx.x] = h[threadIdx.x];
}
"""


def _run_promise(tmp_path: Path, promise: str, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    """check_cuda.sh on TINY_KERNEL for sm_90 only, with `promise` as its SASS-PROMISE comment."""
    src = tmp_path / "tiny.cu"
    src.write_text(f"// SASS-PROMISE: {promise}\n" + TINY_KERNEL)
    proc = _run(tmp_path, ADAPTERKERN_CHECK_ARCHS="90", CHECK_CUDA_SOURCES=str(src), **env)
    return proc, proc.stdout + proc.stderr


def test_sass_promise_kept_passes(tmp_path):
    proc, out = _run_promise(tmp_path, "tiny_copy_* LDG.128>=1 STG.128==1 LDG.U16==1 LDG.32==0 LDGSTS==0 REGS<=64")
    assert proc.returncode == 0, out
    report = (tmp_path / "sass_report.txt").read_text()
    assert "tiny_copy_* LDG.128>=1 STG.128==1 LDG.U16==1 LDG.32==0 LDGSTS==0 REGS<=64: kept" in report, report
    row = next(line.split() for line in report.splitlines() if line.startswith("sm_90"))
    head = next(line.split() for line in report.splitlines() if line.startswith("arch"))
    counts = dict(zip(head, row))
    got = (counts["kernel"], counts["LDG.128"], counts["STG.128"], counts["LDG.U16"], counts["STG.U16"])
    assert got == ("tiny_copy_kernel", "1", "1", "1", "1"), report


@pytest.mark.parametrize("promise,message", [
    ("tiny_copy_kernel LDG.128>=1 LDG.U16==0",
     "SASS-PROMISE broken: tiny_copy_kernel (sm_90): LDG.U16 = 1, promised == 0"),
    ("tiny_copy_kernel @sm_90 REGS<=4", "SASS-PROMISE broken: tiny_copy_kernel (sm_90): REGS = "),
    ("renamed_copy_kernel<*> LDG.128>=1", "stale SASS-PROMISE at"),
    ("tiny_copy_kernel LDG.128>1", "malformed SASS-PROMISE at"),
])
def test_sass_promise_broken_stale_or_malformed_fails(tmp_path, promise, message):
    proc, out = _run_promise(tmp_path, promise)
    assert proc.returncode != 0, out
    assert message in out and "RESULT: FAIL (SASS" in out, out


def test_sass_check_fails_without_cuobjdump_unless_skipped(tmp_path):
    proc, out = _run_promise(tmp_path, "tiny_copy_kernel LDG.128>=1", CUOBJDUMP=str(tmp_path / "no-cuobjdump"))
    assert proc.returncode != 0 and "no cuobjdump" in out and "CHECK_CUDA_SASS=skip" in out, out
    proc, out = _run_promise(tmp_path, "tiny_copy_kernel LDG.128>=1", CUOBJDUMP=str(tmp_path / "no-cuobjdump"),
                             CHECK_CUDA_SASS="skip")
    assert proc.returncode == 0, out
    assert "SASS check skipped (CHECK_CUDA_SASS=skip)" in (tmp_path / "sass_report.txt").read_text()


# ----------------------------------------------------------------------------------------------
# On a GPU: the extension's two entry points against a float64 oracle written from the formula.
# (The package-level tests, parametrized by backend, cover the public op; these pin the backend
# contract directly: strides, r chunking, decode sizes, needs-masks, determinism.)
import torch  # noqa: E402

from adapterkern import activations as _acts  # noqa: E402

_ACT_FNS = {a.kernel_id: a.fn for a in (_acts.get_activation(n) for n in
            ("relu", "gelu", "gelu_new", "quick_gelu", "silu", "tanh", "sigmoid", "leakyrelu", "relu6", "linear"))}


def _oracle(x, wd, bd, wu, bu, scale, scale_value, residual, act_id, dy):
    """float64 forward and every gradient by autograd on the formula."""
    f64 = lambda t: None if t is None else t.detach().double().requires_grad_(True)  # noqa: E731
    x_, wd_, bd_, wu_, bu_ = f64(x), f64(wd), f64(bd), f64(wu), f64(bu)
    s_ = f64(scale) if scale is not None else scale_value
    pre = x_ @ wd_.T + (bd_ if bd_ is not None else 0)
    u = _ACT_FNS[act_id](pre) @ wu_.T + (bu_ if bu_ is not None else 0)
    res = x_ if residual is None else residual.double()
    y = res + (s_.reshape(1, -1) if scale is not None else s_) * u
    leaves = [x_, wd_, bd_, wu_, bu_, s_ if scale is not None else None]
    grads = torch.autograd.grad(y, [t for t in leaves if t is not None], dy.double())
    it = iter(grads)
    return y.detach(), pre.detach(), [next(it) if t is not None else None for t in leaves]


_TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _close(got, want, dtype, what):
    assert got is not None, what
    assert got.shape == want.shape, (what, got.shape, want.shape)
    err = (got.double() - want).abs().max().item()
    scale = want.abs().max().item() + 1e-6
    assert torch.isfinite(got).all(), what
    assert err <= _TOL[dtype] * max(scale, 1.0) * 4, f"{what}: max abs err {err:.3g} (ref max {scale:.3g})"


def _gpu_backend():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from adapterkern.backends import cuda as backend
    dev = torch.device("cuda")
    if not backend.is_available(dev):
        pytest.skip(f"CUDA extension unavailable: {backend.unavailable_reason(dev)}")
    return backend


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("T,d,r", [(0, 16, 8), (1, 768, 64), (3, 100, 7), (37, 16, 1), (257, 768, 48),
                                   (130, 96, 96), (64, 4096, 64), (5, 40, 512), (4500, 64, 8)])
def test_gpu_backend_matches_float64_oracle(dtype, T, d, r):
    backend = _gpu_backend()
    torch.manual_seed(T * 1000 + d + r)
    dev = "cuda"
    for act_id in (range(10) if (T, d, r) == (257, 768, 48) else (0, 1, 6)):
        x = torch.randn(T, d, device=dev, dtype=dtype)
        wd = (torch.randn(r, d, device=dev) / d ** 0.5).to(dtype)
        wu = (torch.randn(d, r, device=dev) / r ** 0.5).to(dtype)
        bd = (torch.randn(r, device=dev) * 0.1).to(dtype)
        bu = (torch.randn(d, device=dev) * 0.1).to(dtype)
        scale = torch.rand(d, device=dev) + 0.5
        dy = torch.randn(T, d, device=dev, dtype=dtype)
        y, pre = backend.adapter_forward(x, wd, bd, wu, bu, scale, 1.0, None, act_id, True)
        y_ref, pre_ref, g_ref = _oracle(x, wd, bd, wu, bu, scale, 1.0, None, act_id, dy)
        _close(y, y_ref, dtype, f"y act={act_id}")
        _close(pre, pre_ref, dtype, f"pre act={act_id}")
        grads = backend.adapter_backward(dy, x, pre, wd, bd, wu, bu, scale, 1.0, True, act_id, [True] * 6)
        for name, got, want in zip(("dx", "dw_down", "db_down", "dw_up", "db_up", "dscale"), grads, g_ref):
            _close(got, want, dtype, f"{name} act={act_id}")


def test_gpu_backend_strides_residual_float_scale_and_needs():
    backend = _gpu_backend()
    dev, dtype, T, d, r = "cuda", torch.float16, 77, 200, 24
    xb = torch.randn(d, 2 * T, device=dev, dtype=dtype)
    x = xb.T[::2]  # (T, d), non-contiguous both ways
    wd = torch.randn(d, r, device=dev, dtype=dtype).T * d ** -0.5  # transposed view
    wu = torch.randn(d, r, device=dev, dtype=dtype) * r ** -0.5
    res = torch.randn(T, d, device=dev, dtype=dtype)
    dy = torch.randn(T, d, device=dev, dtype=dtype)
    y, pre = backend.adapter_forward(x, wd, None, wu, None, None, 0.5, res, 4, False)
    assert pre.numel() == 0
    y_ref, _, g_ref = _oracle(x, wd, None, wu, None, None, 0.5, res, 4, dy)
    _close(y, y_ref, dtype, "y")
    needs = [True, False, False, True, False, False]
    grads = backend.adapter_backward(dy, x, pre, wd, None, wu, None, None, 0.5, False, 4, needs)
    assert [g is None for g in grads] == [not n for n in needs]
    _close(grads[0], g_ref[0], dtype, "dx (separate residual: no dy term)")
    _close(grads[3], g_ref[3], dtype, "dw_up")


def test_gpu_backend_weight_grads_are_deterministic():
    backend = _gpu_backend()
    dev, dtype, T, d, r = "cuda", torch.bfloat16, 5000, 256, 64
    x = torch.randn(T, d, device=dev, dtype=dtype)
    wd = torch.randn(r, d, device=dev, dtype=dtype) * d ** -0.5
    wu = torch.randn(d, r, device=dev, dtype=dtype) * r ** -0.5
    scale = torch.ones(1, device=dev)
    dy = torch.randn(T, d, device=dev, dtype=dtype)
    _, pre = backend.adapter_forward(x, wd, None, wu, None, scale, 1.0, None, 1, True)
    runs = [backend.adapter_backward(dy, x, pre, wd, None, wu, None, scale, 1.0, True, 1, [True] * 6) for _ in range(3)]
    for a, b in zip(runs[0], runs[1]):
        if a is not None:
            assert torch.equal(a, b)
    assert runs[0][5].shape == (1,)


def test_gpu_backend_large_rank_is_chunked():
    backend = _gpu_backend()
    dev, dtype, T, d, r = "cuda", torch.float32, 40, 64, 6000  # r beyond one shared-memory chunk
    x = torch.randn(T, d, device=dev, dtype=dtype)
    wd = torch.randn(r, d, device=dev, dtype=dtype) * d ** -0.5
    wu = torch.randn(d, r, device=dev, dtype=dtype) * r ** -0.5
    dy = torch.randn(T, d, device=dev, dtype=dtype)
    y, pre = backend.adapter_forward(x, wd, None, wu, None, None, 1.0, None, 0, True)
    y_ref, pre_ref, g_ref = _oracle(x, wd, None, wu, None, None, 1.0, None, 0, dy)
    _close(y, y_ref, dtype, "y")
    grads = backend.adapter_backward(dy, x, pre, wd, None, wu, None, None, 1.0, True, 0, [True, True, False, True, False, False])
    _close(grads[0], g_ref[0], dtype, "dx")
    _close(grads[1], g_ref[1], dtype, "dw_down")
    _close(grads[3], g_ref[3], dtype, "dw_up")
