"""Backend registry: the one place that knows which backend implements which op, and picks one.

Backends:

* ``torch``  -- pure PyTorch (:mod:`adapterkern.backends.reference`). Runs anywhere; the fallback and
  the maths every kernel is tested against. Differentiable through ordinary autograd.
* ``triton`` -- fused Triton kernels (:mod:`adapterkern.backends.triton`). CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before import (how the tests run without a GPU).
* ``cuda``   -- the compiled CUDA C++ extension (:mod:`adapterkern.backends.cuda`), when built. It
  implements the single-adapter op only.

Ops (the functional entry points): ``bottleneck_adapter`` (one adapter), ``multi_adapter`` (a stack of
N adapters on one input), ``bottleneck_adapter_batched`` (each token through its own adapter of a
stack) and ``adapter_add_norm`` (inference: a sequential adapter fused with the residual add and the
LayerNorm / RMSNorm after it). :data:`IMPLEMENTS` says which backend has which.

``auto`` picks, for the op and the tensors' device, the first backend of :data:`AUTO_PREFERENCE` that
implements the op and is available; ``torch`` implements every op, so ``auto`` always finds one. The
environment variable ``ADAPTERKERN_BACKEND`` replaces ``auto`` as the default (for the ops the backend
it names implements; ``auto`` picks for the others).

A *kernel backend* (``triton``, ``cuda``) is a module exposing ``is_available(device) -> bool``,
``unavailable_reason(device) -> str`` and, for each op it implements, the forward / backward pair named
in :data:`KERNEL_FUNCTIONS`::

    adapter_forward(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, activation_id,
                    save_preact) -> (y, preact)
    adapter_backward(dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x,
                     activation_id, needs) -> (dx, dw_down, db_down, dw_up, db_up, dscale)

with ``x``, ``residual``, ``dy``: (T, d) 2-D, any strides; ``w_down`` (r, d), ``w_up`` (d, r);
biases (r,)/(d,) or None; ``scale`` a float tensor of shape (1,) or (d,) or None (then the Python
float ``scale_value`` is the scaling); ``residual`` None means x. ``y`` is a new contiguous (T, d)
tensor of x's dtype, ``preact`` the pre-activation (T, r) in x's dtype (an empty tensor unless
``save_preact``; the backward is always given the saved one). ``needs`` is six bools in the order of
the outputs; an output not needed is None. ``dx`` includes ``dy`` itself when ``residual_is_x``.

The stack ops take the same arguments for a stack (``w_down`` (N, r, d), ``w_up`` (N, d, r), biases
(N, r) / (N, d), ``scale`` (N, 1) / (N, d)) plus ``add_residual`` after ``residual``; the batched pair
takes the token groups ``(perm, counts, starts)`` (see :class:`adapterkern.TokenGroups`) as one
argument right after ``x``.

``adapter_add_norm`` is forward-only: its :data:`KERNEL_FUNCTIONS` entry names no backward (None), and
the forward is::

    adapter_add_norm_forward(z, residual, w_down, b_down, w_up, b_up, scale, scale_value, norm_weight,
                             norm_bias, activation_id, eps, rms_norm) -> out

with ``z``, ``residual`` (T, d) any strides, the adapter's weights as above, ``norm_weight`` /
``norm_bias`` (d,) or None, ``rms_norm`` a bool (False: LayerNorm); ``out`` a new contiguous (T, d)
tensor of z's dtype, ``norm(z + s * (act(z @ w_down.T + b_down) @ w_up.T + b_up) + residual)``.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")
ENV_VAR = "ADAPTERKERN_BACKEND"

SINGLE = "bottleneck_adapter"
MULTI = "multi_adapter"
BATCHED = "bottleneck_adapter_batched"
ADD_NORM = "adapter_add_norm"
OPS = (SINGLE, MULTI, BATCHED, ADD_NORM)

# Which backend implements which op.
IMPLEMENTS = {
    "torch": frozenset(OPS),
    "triton": frozenset(OPS),  # adapter_add_norm: forward only
    "cuda": frozenset({SINGLE}),
}

# The (forward, backward) function names of each op in a kernel-backend module; None: no backward
# (an inference op).
KERNEL_FUNCTIONS = {
    SINGLE: ("adapter_forward", "adapter_backward"),
    MULTI: ("multi_adapter_forward", "multi_adapter_backward"),
    BATCHED: ("batched_adapter_forward", "batched_adapter_backward"),
    ADD_NORM: ("adapter_add_norm_forward", None),
}

# The order ``auto`` tries backends in, per device type; ``torch`` ends every list. On CPU the Triton
# interpreter is exact but slow, so auto never picks it there. On CUDA, Triton comes first until a GPU
# run has measured (and verified) the CUDA extension: see benchmarks/NOTES.md. Asking for it explicitly
# (backend="cuda") works when it is built.
AUTO_PREFERENCE = {"cuda": ("triton", "cuda", "torch")}
DEFAULT_PREFERENCE = ("torch",)


def check_backend_name(name: object, argument: str = "backend") -> str:
    """``name`` if it is ``auto`` or a backend name, else a TypeError / ValueError naming ``argument``."""
    if not isinstance(name, str):
        raise TypeError(f"{argument}: expected a str (one of auto, {', '.join(BACKENDS)}), got {type(name).__name__}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"{argument}: unknown backend {name!r}; expected one of auto, {', '.join(BACKENDS)}")
    return name


def _check_op(op: object) -> str:
    if op not in OPS:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {op!r}")
    return op


@functools.cache
def kernel_backend(name: str) -> ModuleType:
    """The module implementing kernel backend ``name`` (``triton`` or ``cuda``), imported once."""
    if name not in KERNEL_BACKENDS:
        raise ValueError(f"backend: {name!r} is not a kernel backend; expected one of {', '.join(KERNEL_BACKENDS)}")
    return importlib.import_module(f"adapterkern.backends.{name}")


def kernel_functions(name: str, op: str):
    """(forward, backward) of kernel backend ``name`` for ``op``; backward None for a forward-only op."""
    if _check_op(op) not in IMPLEMENTS[name]:
        raise ValueError(f"backend: {name!r} has no {op} kernel")
    module = kernel_backend(name)
    forward, backward = KERNEL_FUNCTIONS[op]
    return getattr(module, forward), (None if backward is None else getattr(module, backward))


def is_available(name: str, device: torch.device) -> bool:
    """Whether backend ``name`` can run on tensors of ``device``."""
    if name == "torch":
        return True
    try:
        return kernel_backend(name).is_available(torch.device(device))
    except ImportError:
        return False


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on ``device`` (some op), in the order ``auto`` prefers them."""
    device = torch.device(device)
    return [name for name in ("triton", "cuda", "torch") if is_available(name, device)]


def implements(requested: str, op: str) -> bool:
    """Whether ``requested`` (``auto`` or a backend name) can serve ``op`` on some device: ``auto``
    always can (it falls back to ``torch``); a named backend when :data:`IMPLEMENTS` says so."""
    name = check_backend_name(requested)
    return name == "auto" or _check_op(op) in IMPLEMENTS[name]


@torch.compiler.assume_constant_result  # a plain string to torch.compile: no graph break on imports
def resolve_backend(requested: str, device: torch.device, op: str = SINGLE) -> str:
    """Turn a requested backend (``auto`` or a name) into the backend that will run ``op`` on ``device``.

    Raises ``ValueError`` for an unknown name or a named backend without ``op``, and ``RuntimeError``
    (saying how to get it) for a known backend that cannot run on ``device``.
    """
    name = check_backend_name(requested)
    op = _check_op(op)
    if name == "auto":
        name = check_backend_name(os.environ.get(ENV_VAR, "auto") or "auto", f"environment variable {ENV_VAR}")
        if name != "auto" and op not in IMPLEMENTS[name]:
            name = "auto"  # the environment's default backend lacks this op: auto's choice for it
    if name == "auto":
        for candidate in AUTO_PREFERENCE.get(device.type, DEFAULT_PREFERENCE):
            if op in IMPLEMENTS[candidate] and is_available(candidate, device):
                return candidate
        return "torch"
    if op not in IMPLEMENTS[name]:
        others = ", ".join(repr(b) for b in BACKENDS if op in IMPLEMENTS[b])
        raise ValueError(f"backend: {name!r} has no {op} kernel; use 'auto' or one of {others}")
    if name != "torch" and not is_available(name, device):
        try:
            reason = kernel_backend(name).unavailable_reason(device)
        except ImportError as exc:
            reason = f"importing adapterkern.backends.{name} failed: {exc}"
        raise RuntimeError(f"backend={name!r} cannot run on device {device}: {reason}")
    return name
