"""The float32 matmul precision both kernel backends use, and the Triton interpreter's bf16 dot.

* One TF32 decision (adapterkern.backends.precision) for the Triton and the CUDA backend, under every
  way torch lets a user set it (legacy ``allow_tf32``, ``set_float32_matmul_precision``, the newer
  ``fp32_precision`` at matmul and global level, and mixes of them, which make the legacy flag raise).
  The expected answers are torch's documented semantics, written out below.
* A new user who sets TRITON_INTERPRET and runs ``backend="triton"`` in bfloat16 gets right numbers
  (Triton's interpreter feeds bf16 bit patterns to numpy; the product widens the operands itself):
  run in a fresh interpreter, without this suite's conftest.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from adapterkern.backends import cuda as cuda_backend
from adapterkern.backends.precision import fp32_matmul_allows_tf32

ROOT = Path(__file__).resolve().parents[1]
matmul = torch.backends.cuda.matmul


@pytest.fixture
def restore_precision():
    """Put torch's precision settings back exactly as found (new API values, which also reset the legacy flag)."""
    saved = (matmul.fp32_precision, torch.backends.fp32_precision)
    yield
    torch.backends.fp32_precision = saved[1]
    matmul.fp32_precision = saved[0]


def _legacy_true():
    matmul.allow_tf32 = True


def _high():
    torch.set_float32_matmul_precision("high")


def _highest():
    torch.set_float32_matmul_precision("highest")


def _new_tf32():
    matmul.fp32_precision = "tf32"


def _new_ieee():
    matmul.fp32_precision = "ieee"


def _global_tf32():
    torch.backends.fp32_precision = "tf32"


def _global_tf32_matmul_ieee():
    torch.backends.fp32_precision = "tf32"
    matmul.fp32_precision = "ieee"


def _legacy_true_then_new_ieee():  # reading allow_tf32 afterwards raises in torch
    matmul.allow_tf32 = True
    matmul.fp32_precision = "ieee"


def _new_tf32_then_legacy_false():
    matmul.fp32_precision = "tf32"
    matmul.allow_tf32 = False


SETTINGS = [
    (lambda: None, False),
    (_legacy_true, True),
    (_high, True),
    (_highest, False),
    (_new_tf32, True),
    (_new_ieee, False),
    (_global_tf32, True),
    (_global_tf32_matmul_ieee, False),
    (_legacy_true_then_new_ieee, False),
    (_new_tf32_then_legacy_false, False),
]
IDS = ["default", "allow_tf32", "high", "highest", "matmul-tf32", "matmul-ieee", "global-tf32",
       "global-tf32-matmul-ieee", "legacy-then-new", "new-then-legacy"]


@pytest.mark.parametrize("apply,tf32", SETTINGS, ids=IDS)
def test_one_tf32_decision_for_every_torch_setting(restore_precision, apply, tf32):
    apply()
    assert fp32_matmul_allows_tf32() is tf32


@pytest.mark.parametrize("apply,tf32", SETTINGS, ids=IDS)
def test_both_kernel_backends_pass_that_decision(restore_precision, monkeypatch, apply, tf32):
    """What each backend hands its kernels for float32 (Triton: input_precision; CUDA: allow_tf32),
    and that low-precision dtypes are unaffected."""
    pytest.importorskip("triton")
    from adapterkern.backends.triton import language

    apply()
    assert language.dot_precision(torch.float32) == ("tf32" if tf32 else "ieee")
    assert language.dot_precision(torch.bfloat16) is None

    seen = []

    class FakeOps:  # stands in for the extension's ops: records the allow_tf32 argument
        @staticmethod
        def cuda_adapter_fwd(*args):
            seen.append(args[-1])
            return torch.zeros(1), torch.zeros(0)

        @staticmethod
        def cuda_adapter_bwd(*args):
            seen.append(args[-1])
            return [torch.zeros(0)] * 6

    monkeypatch.setattr(cuda_backend, "_require", lambda: None)
    monkeypatch.setattr(torch.ops, "adapterkern", FakeOps)
    x, w = torch.randn(3, 4), torch.randn(2, 4)
    cuda_backend.adapter_forward(x, w, None, w.T, None, None, 1.0, None, 0, True)
    cuda_backend.adapter_backward(x, x, torch.zeros(3, 2), w, None, w.T, None, None, 1.0, True, 0, [True] * 6)
    assert seen == [tf32, tf32]


NEW_USER_SCRIPT = textwrap.dedent("""
    import torch, adapterkern
    from adapterkern.backends.triton import INTERPRET
    assert INTERPRET, "adapterkern does not see the interpreter Triton uses"
    assert "triton" in adapterkern.available_backends("cpu")
    torch.manual_seed(0)
    T, d, r = 37, 72, 24
    x = torch.randn(T, d, dtype=torch.bfloat16, requires_grad=True)
    wd = (torch.randn(r, d) * d ** -0.5).bfloat16().requires_grad_()
    wu = (torch.randn(d, r) * r ** -0.5).bfloat16().requires_grad_()
    y = adapterkern.bottleneck_adapter(x, wd, None, wu, None, activation="gelu", backend="triton")
    dy = torch.randn(T, d)
    grads = torch.autograd.grad(y, [x, wd, wu], dy.bfloat16())
    # float64 reference written from the formula: y = x + gelu(x wd^T) wu^T
    x64, wd64, wu64 = (t.detach().double().requires_grad_() for t in (x, wd, wu))
    y64 = x64 + torch.nn.functional.gelu(x64 @ wd64.T) @ wu64.T
    refs = torch.autograd.grad(y64, [x64, wd64, wu64], dy.double())
    for name, got, ref in zip(("y", "dx", "dw_down", "dw_up"), (y,) + grads, (y64,) + refs):
        err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
        print(name, err)
        assert err < 3e-2, (name, err)  # bf16 inputs and rounded intermediates: ~2^-8 relative
""")


@pytest.mark.parametrize("flag", ["1", "true"])
def test_triton_interpreter_bfloat16_is_right_for_a_new_user(flag):
    """A fresh process (no conftest), TRITON_INTERPRET set as a user would, bf16 forward and backward."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET=flag, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", NEW_USER_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
