"""Backend registry and the one place that decides which backend runs a call.

Backends:

* ``torch``  -- pure PyTorch (:mod:`adapterkern.backends.reference`). Runs anywhere; the fallback and
  the maths every kernel is tested against. Differentiable through ordinary autograd.
* ``triton`` -- fused Triton kernels (:mod:`adapterkern.backends.triton`). CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before import (how the tests run without a GPU).
* ``cuda``   -- the compiled CUDA C++ extension (:mod:`adapterkern.backends.cuda`), when built.

``auto`` picks the fastest available backend for the tensors' device; the environment variable
``ADAPTERKERN_BACKEND`` replaces ``auto`` as the default.

A *kernel backend* (``triton``, ``cuda``) is a module exposing::

    is_available(device: torch.device) -> bool
    unavailable_reason(device: torch.device) -> str
    adapter_forward(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, activation_id,
                    save_preact) -> (y, preact)
    adapter_backward(dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x,
                     activation_id, needs) -> (dx, dw_down, db_down, dw_up, db_up, dscale)

with ``x``, ``residual``, ``dy``: (T, d) 2-D, any strides; ``w_down`` (r, d), ``w_up`` (d, r);
biases (r,)/(d,) or None; ``scale`` a float tensor of shape (1,) or (d,) or None (then the Python
float ``scale_value`` is the scaling); ``residual`` None means x. ``y`` is a new contiguous (T, d)
tensor of x's dtype, ``preact`` the pre-activation (T, r) in x's dtype (an empty tensor unless
``save_preact``). ``needs`` is six bools in the order of the outputs; an output not needed is None.
``dx`` includes ``dy`` itself when ``residual_is_x``.
"""
from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")
ENV_VAR = "ADAPTERKERN_BACKEND"


def _check_name(name: object, argument: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{argument}: expected a str (one of auto, {', '.join(BACKENDS)}), got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{argument}: unknown backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    return name


def kernel_backend(name: str) -> ModuleType:
    """The module implementing kernel backend ``name`` (``triton`` or ``cuda``)."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"backend: {name!r} is not a kernel backend; expected one of {', '.join(KERNEL_BACKENDS)}")
    return importlib.import_module(f"adapterkern.backends.{name}")


def is_available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors of ``device``."""
    if name == "torch":
        return True
    try:
        return kernel_backend(name).is_available(device)
    except ImportError:
        return False


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device``, in the order ``auto`` prefers them."""
    device = torch.device(device)
    return [name for name in ("triton", "cuda", "torch") if is_available(name, device)]


@torch.compiler.assume_constant_result  # a plain string to torch.compile: no graph break on imports
def resolve_backend(requested: str, device: torch.device) -> str:
    """Turn a requested backend (``auto`` or a name) into the backend that will run.

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` (saying how to get it) for a known
    backend that cannot run on ``device``.
    """
    name = _check_name(requested, "backend")
    if name == "auto":
        name = _check_name(os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}")
    if name == "auto":
        # On CPU the Triton interpreter is exact but slow, so auto never picks it there. On CUDA, Triton
        # comes first until a GPU run has measured (and verified) the CUDA extension: see
        # benchmarks/NOTES.md. Asking for it explicitly (backend="cuda") works when it is built.
        if device.type == "cuda":
            for candidate in ("triton", "cuda"):
                if is_available(candidate, device):
                    return candidate
        return "torch"
    if name != "torch" and not is_available(name, device):
        try:
            reason = kernel_backend(name).unavailable_reason(device)
        except ImportError as exc:
            reason = f"importing adapterkern.backends.{name} failed: {exc}"
        raise RuntimeError(f"backend={name!r} cannot run on device {device}: {reason}")
    return name
