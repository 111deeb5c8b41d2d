"""nn modules over adapterkern's fused ops."""
from .bottleneck import BottleneckAdapter

__all__ = ["BottleneckAdapter"]
