"""The one float32-matmul precision decision of the kernel backends (Triton and CUDA).

A float32 adapter runs its two projections either in IEEE fp32 or with TF32 tensor-core operands
(10-bit mantissa, fp32 accumulate), exactly when torch's own CUDA matmuls would: the kernels follow
``torch.backends.cuda.matmul``, so a model gets the same precision whether its adapters are fused or
not. Both of torch's APIs are honoured:

* the new one (torch >= 2.9): ``torch.backends.cuda.matmul.fp32_precision`` ("ieee" / "tf32"), which
  inherits ``torch.backends.fp32_precision`` when it is "none";
* the legacy one: ``torch.backends.cuda.matmul.allow_tf32`` (also what
  ``torch.set_float32_matmul_precision("high")`` sets).

Reading the legacy flag raises once the new API has been used (torch refuses to mix them), so it is
read only where the new API has no answer: on a torch without it, or when every new setting is "none"
(which torch leaves only while the new API has never been set).
"""
from __future__ import annotations

import torch


def fp32_matmul_allows_tf32() -> bool:
    """Whether float32 matmuls may use TF32 under torch's current CUDA-matmul setting."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch without the fp32_precision API
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "none")
    if precision == "none":
        return bool(matmul.allow_tf32)
    return precision == "tf32"
