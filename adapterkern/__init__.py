"""adapterkern: fused GPU kernels for bottleneck adapters (Triton and CUDA C++), with a pure-PyTorch fallback."""
from . import nn
from .activations import ACTIVATION_NAMES, get_activation
from .backends import available_backends
from .functional import TokenGroups, adapter_add_norm, bottleneck_adapter, bottleneck_adapter_batched, multi_adapter, token_groups
from .integrations.transformers import (
    AdapterConfig,
    AdapterSummary,
    add_adapter,
    adapter_summary,
    backbone_state_dict,
    delete_adapter,
    get_active_adapter,
    list_adapters,
    save_backbone,
    set_active_adapter,
    train_adapter,
)
from .integrations.adapter_files import load_adapter, save_adapter
from .integrations.adapterhub_files import AdapterHubLoad, load_adapterhub, load_adapterhub_fusion, save_adapterhub
from .integrations.compose import StochasticAdapterDrop, add_fusion, multi_task_forward, route_adapters, set_adapter_drop
from .integrations.adapterhub import AdapterPatchReport, patch_adapters, unpatch_adapters
from .integrations.inference import InferenceReport, optimize_for_inference, undo_inference_optimization

__version__ = "0.1.0"

__all__ = [
    "ACTIVATION_NAMES",
    "AdapterConfig",
    "AdapterSummary",
    "__version__",
    "adapter_add_norm",
    "adapter_summary",
    "add_adapter",
    "add_fusion",
    "available_backends",
    "backbone_state_dict",
    "bottleneck_adapter",
    "bottleneck_adapter_batched",
    "delete_adapter",
    "get_activation",
    "get_active_adapter",
    "list_adapters",
    "load_adapter",
    "multi_adapter",
    "multi_task_forward",
    "route_adapters",
    "set_adapter_drop",
    "StochasticAdapterDrop",
    "nn",
    "save_adapter",
    "save_backbone",
    "set_active_adapter",
    "token_groups",
    "train_adapter",
    "TokenGroups",
    "AdapterHubLoad",
    "AdapterPatchReport",
    "load_adapterhub",
    "load_adapterhub_fusion",
    "save_adapterhub",
    "patch_adapters",
    "unpatch_adapters",
    "InferenceReport",
    "optimize_for_inference",
    "undo_inference_optimization",
]
