"""adapterkern: fused GPU kernels for bottleneck adapters (Triton and CUDA C++), with a pure-PyTorch fallback."""
from . import nn
from .activations import ACTIVATION_NAMES, get_activation
from .backends import available_backends
from .functional import bottleneck_adapter

__version__ = "0.1.0"

__all__ = ["ACTIVATION_NAMES", "available_backends", "bottleneck_adapter", "get_activation", "nn", "__version__"]
