"""nn modules over adapterkern's fused ops."""
from .bottleneck import BottleneckAdapter

__all__ = ["BottleneckAdapter"]
from .prefix import PrefixEncoder, PrefixTuning, prefix_from_adapterhub  # noqa: E402
__all__ += ["PrefixEncoder", "PrefixTuning", "prefix_from_adapterhub"]
