"""The compiled CUDA C++ backend (kernels in ``csrc/``, see ``csrc/README.md``).

The kernels live in a torch extension that registers ``torch.ops.adapterkern.cuda_adapter_fwd`` and
``torch.ops.adapterkern.cuda_adapter_bwd`` (CUDA implementations only). It is found, in order:

1. ``adapterkern._C``, built by ``setup.py`` when torch has CUDA and nvcc is found
   (``ADAPTERKERN_FORCE_CUDA=1 pip install --no-build-isolation -e .``);
2. a JIT build of ``csrc/`` with ``torch.utils.cpp_extension.load`` (ninja), cached under
   ``~/.cache/adapterkern`` (``$ADAPTERKERN_CACHE_DIR`` or ``$XDG_CACHE_HOME`` override it), tried
   when ``_C`` is missing, a CUDA device is present and nvcc + ninja are found. Set
   ``ADAPTERKERN_NO_JIT=1`` to never build.

Importing this module is cheap and never builds: loading happens on the first
``is_available(cuda_device)``. A failed load or build emits one warning and the backend then
reports itself unavailable (``backend="auto"`` falls back to Triton or torch).
"""
from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..cuda_toolchain import ARCHS_ENV_VAR, CXX_FLAGS, NVCC_FLAGS, cuda_arch_flags, extension_sources, fix_cpp_extension
from .precision import fp32_matmul_allows_tf32

BUILD_HINT = (
    "the CUDA extension adapterkern._C is not built; build it with a CUDA toolchain: "
    "`ADAPTERKERN_FORCE_CUDA=1 pip install --no-build-isolation -e .` (or let it JIT-build: "
    "needs a CUDA device, nvcc and ninja, and the csrc/ sources of a source checkout)"
)

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
JIT_NAME = "adapterkern_cuda_jit"

_lock = threading.Lock()
_loaded: Optional[bool] = None  # None: not tried yet
_reason: str = BUILD_HINT


def _have_ops() -> bool:
    return hasattr(torch.ops.adapterkern, "cuda_adapter_fwd") and hasattr(torch.ops.adapterkern, "cuda_adapter_bwd")


def _cache_dir() -> Path:
    root = os.environ.get("ADAPTERKERN_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "adapterkern"


def _jit_build() -> None:
    from torch.utils import cpp_extension

    archs = os.environ.get(ARCHS_ENV_VAR)
    if not archs:  # build only for the GPU at hand: one arch keeps the build short
        major, minor = torch.cuda.get_device_capability()
        archs = f"{major}{minor}"
    digest = hashlib.sha1()
    for src in sorted(CSRC_DIR.rglob("*")):
        if src.is_file() and src.suffix in (".cu", ".cuh", ".h", ".cpp"):
            digest.update(src.name.encode())
            digest.update(src.read_bytes())
    tag = f"torch{torch.__version__}-cu{torch.version.cuda}-sm{archs.replace(';', '_')}-{digest.hexdigest()[:12]}"
    build_dir = _cache_dir() / "jit" / tag.replace("+", "_")
    build_dir.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=JIT_NAME,
        sources=[str(s) for s in extension_sources(CSRC_DIR)],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS + cuda_arch_flags(archs),
        extra_include_paths=[str(CSRC_DIR)],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=os.environ.get("ADAPTERKERN_JIT_VERBOSE") == "1",
    )


def _why_no_jit() -> Optional[str]:
    """None when a JIT build can be tried, else why not."""
    if os.environ.get("ADAPTERKERN_NO_JIT") == "1":
        return "ADAPTERKERN_NO_JIT=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from torch.utils import cpp_extension

    fix_cpp_extension(cpp_extension)  # nvcc on PATH a wrapper script: torch's guess has no headers
    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found (set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    if not all(s.is_file() for s in extension_sources(CSRC_DIR)):
        return f"CUDA sources not found under {CSRC_DIR} (not a source checkout)"
    return None


def _load() -> bool:
    """Load the extension once (thread-safe); True when the ops are registered."""
    global _loaded, _reason
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        ok, reason, failed = False, BUILD_HINT, False
        if _have_ops():  # already registered (e.g. loaded by hand)
            ok = True
        else:
            try:
                importlib.import_module("adapterkern._C")
                ok = _have_ops()
                if not ok:
                    reason, failed = "adapterkern._C loaded but registered no cuda_adapter ops", True
            except ModuleNotFoundError:
                pass
            except Exception as exc:  # e.g. an ABI mismatch after a torch upgrade
                reason, failed = f"importing adapterkern._C failed: {exc}", True
        if not ok:
            why = _why_no_jit()
            if why is None:
                try:
                    _jit_build()
                    ok = _have_ops()
                    if not ok:
                        reason, failed = "the JIT-built extension registered no cuda_adapter ops", True
                except Exception as exc:
                    reason, failed = f"JIT build of csrc/ failed: {exc}".strip(), True
            elif not failed:
                reason = f"{BUILD_HINT}; no JIT build: {why}"
        if not ok and failed:
            warnings.warn(
                f"adapterkern: the CUDA backend is unavailable ({reason}); falling back to the Triton or torch backend",
                RuntimeWarning,
                stacklevel=3,
            )
        _loaded, _reason = ok, (reason if not ok else "")
        return ok


def is_available(device: torch.device) -> bool:
    """True for CUDA devices once the extension is loaded (loads/JIT-builds it on first call)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    return _load()


def unavailable_reason(device: torch.device) -> str:
    device = torch.device(device)
    if device.type != "cuda":
        return f"the CUDA backend runs on CUDA tensors only, got device {device}"
    if _load():
        return ""
    return _reason


def _require() -> None:
    if not _load():
        raise RuntimeError(f"backend='cuda' is unavailable: {_reason}")


def adapter_forward(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, activation_id, save_preact):
    """Fused forward; see :mod:`adapterkern.backends` for the contract. Returns (y, preact)."""
    _require()
    y, preact = torch.ops.adapterkern.cuda_adapter_fwd(
        x, w_down, b_down, w_up, b_up, scale, float(scale_value), residual, int(activation_id), bool(save_preact),
        fp32_matmul_allows_tf32(),
    )
    return y, preact


def adapter_backward(dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id,
                     needs: Sequence[bool]):
    """Fused backward; returns (dx, dw_down, db_down, dw_up, db_up, dscale), None where not needed."""
    _require()
    needs = [bool(n) for n in needs]
    if len(needs) != 6:
        raise ValueError(f"needs: expected 6 bools, got {len(needs)}")
    if scale is None:
        needs[5] = False
    if not any(needs):
        return (None,) * 6
    outs = torch.ops.adapterkern.cuda_adapter_bwd(
        dy, x, preact, w_down, b_down, w_up, b_up, scale, float(scale_value), bool(residual_is_x),
        int(activation_id), *needs, fp32_matmul_allows_tf32(),
    )
    return tuple(o if n else None for o, n in zip(outs, needs))
