"""The activation table: one name -> (kernel id, torch function), shared by every backend.

Names and maths follow the AdapterHub ``adapters`` library (which lower-cases the name and calls
``transformers.get_activation``, except ``leakyrelu`` -> ``F.leaky_relu`` with slope 0.01):

========================================  =====================================================
name (aliases)                            maths
========================================  =====================================================
relu                                      max(x, 0)
gelu                                      x * Phi(x) (erf form)
gelu_new, gelu_pytorch_tanh, gelu_fast    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
quick_gelu                                x * sigmoid(1.702 x)
silu, swish                               x * sigmoid(x)
tanh, sigmoid                             as named
leakyrelu, leaky_relu                     x if x > 0 else 0.01 x
relu6                                     min(max(x, 0), 6)
linear, identity, None                    x
========================================  =====================================================
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

LEAKY_RELU_SLOPE = 0.01
QUICK_GELU_ALPHA = 1.702
GELU_TANH_COEF = 0.044715
SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


class Activation(NamedTuple):
    name: str  # canonical name
    kernel_id: int  # the ACT constexpr the Triton/CUDA kernels switch on
    fn: Callable[[torch.Tensor], torch.Tensor]  # the pure-PyTorch function (reference maths)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


def _leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LEAKY_RELU_SLOPE)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


# Kernel ids are part of the kernel ABI (Triton constexpr, CUDA template argument): never renumber.
RELU, GELU, GELU_TANH, QUICK_GELU, SILU, TANH, SIGMOID, LEAKY_RELU, RELU6, LINEAR = range(10)

_CANONICAL = {
    "relu": Activation("relu", RELU, F.relu),
    "gelu": Activation("gelu", GELU, F.gelu),
    "gelu_new": Activation("gelu_new", GELU_TANH, _gelu_tanh),
    "quick_gelu": Activation("quick_gelu", QUICK_GELU, _quick_gelu),
    "silu": Activation("silu", SILU, F.silu),
    "tanh": Activation("tanh", TANH, torch.tanh),
    "sigmoid": Activation("sigmoid", SIGMOID, torch.sigmoid),
    "leakyrelu": Activation("leakyrelu", LEAKY_RELU, _leaky_relu),
    "relu6": Activation("relu6", RELU6, F.relu6),
    "linear": Activation("linear", LINEAR, _identity),
}
_ALIASES = {
    "gelu_pytorch_tanh": "gelu_new",
    "gelu_fast": "gelu_new",
    "swish": "silu",
    "leaky_relu": "leakyrelu",
    "identity": "linear",
}
ACTIVATION_NAMES = tuple(sorted([*_CANONICAL, *_ALIASES]))


def get_activation(name: Optional[str]) -> Activation:
    """Look an activation up by name (case-insensitive; ``None`` means ``linear``).

    Raises ``TypeError`` for a non-string and ``ValueError`` listing the valid names for an unknown one.
    """
    if name is None:
        return _CANONICAL["linear"]
    if not isinstance(name, str):
        raise TypeError(f"activation: expected a str (one of {', '.join(ACTIVATION_NAMES)}), got {type(name).__name__}")
    key = name.lower()
    key = _ALIASES.get(key, key)
    if key not in _CANONICAL:
        raise ValueError(f"activation: unknown name {name!r}; expected one of {', '.join(ACTIVATION_NAMES)}")
    return _CANONICAL[key]
