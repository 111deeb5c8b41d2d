"""The Triton backend: fused kernels, one file per kernel family.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before this module was
imported (the interpreter: exact semantics, slow; how the test suite runs without a GPU).
"""
from __future__ import annotations

import torch

try:
    import triton  # noqa: F401

    _IMPORT_ERROR = None
except ImportError as exc:  # pragma: no cover - triton is a Linux dependency
    _IMPORT_ERROR = exc


def is_available(device: torch.device) -> bool:
    if _IMPORT_ERROR is not None:
        return False
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and INTERPRET


def unavailable_reason(device: torch.device) -> str:
    if _IMPORT_ERROR is not None:
        return f"triton is not importable ({_IMPORT_ERROR}); install it with `pip install triton` (Linux)"
    if device.type == "cpu":
        return "Triton kernels need CUDA tensors; set TRITON_INTERPRET=1 before importing adapterkern to run them on the CPU interpreter"
    return f"Triton kernels do not run on {device.type} tensors"


INTERPRET = False  # whether Triton runs this backend's kernels in its CPU interpreter
if _IMPORT_ERROR is None:
    from .language import INTERPRET  # noqa: F811,E402
    from .bottleneck import (  # noqa: F401,E402
        adapter_backward,
        adapter_forward,
        batched_adapter_backward,
        batched_adapter_forward,
        multi_adapter_backward,
        multi_adapter_forward,
    )
    from .add_norm import adapter_add_norm_forward  # noqa: F401,E402
