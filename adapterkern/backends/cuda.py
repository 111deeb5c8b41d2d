"""The compiled CUDA C++ backend (csrc/). Not built yet: see issue 'CUDA C++ fused adapter kernels'."""
from __future__ import annotations

import torch

BUILD_HINT = (
    "the CUDA extension adapterkern._C is not built; build it with a CUDA toolchain: "
    "`ADAPTERKERN_FORCE_CUDA=1 pip install --no-build-isolation -e .`"
)


def is_available(device: torch.device) -> bool:
    return False


def unavailable_reason(device: torch.device) -> str:
    return BUILD_HINT
