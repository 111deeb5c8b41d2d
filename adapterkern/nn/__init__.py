"""nn modules over adapterkern's fused ops."""
from .bottleneck import BottleneckAdapter
from .fusion import AdapterFusion, freeze_for_fusion_training, fuse_adapters, fusion_regularization_loss

__all__ = ["AdapterFusion", "BottleneckAdapter", "freeze_for_fusion_training", "fuse_adapters", "fusion_regularization_loss"]
from .prefix import PrefixEncoder, PrefixTuning, prefix_from_adapterhub  # noqa: E402
__all__ += ["PrefixEncoder", "PrefixTuning", "prefix_from_adapterhub"]
