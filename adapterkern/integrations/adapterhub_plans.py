"""Each adapter module of an ``adapters``-library model: whether its computation is the fused op's
(:func:`classify`, giving a :class:`Plan` or the reason it keeps the library's path), and the patched
forwards that run one adapter through :func:`adapterkern.bottleneck_adapter`
(:func:`adapter_forward` on an ``Adapter`` / ``ParallelAdapter``, and :func:`parallel_layer_forward`
on the ``BottleneckLayer`` of a lone active ``ParallelAdapter``, which fuses the add of the sublayer
output too). Every patched forward falls back to the library's own code for a call the fused op
cannot compute exactly (random masks while training, gating scores, tensors of mixed dtypes or
devices, autocast). Patch functions are bound to their module by :class:`BoundPatch`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import get_activation
from ..functional import SUPPORTED_DTYPES, bottleneck_adapter

__all__ = [
    "BoundPatch", "PLAN_ATTR", "Plan", "adapter_forward", "classify", "fits", "is_patch_function",
    "parallel_layer_forward", "training_randomness", "zero_residual",
]

PLAN_ATTR = "_adapterkern_plan"  # on each patched Adapter / ParallelAdapter module


class BoundPatch:
    """A patch function bound to one module instance, set as an attribute of that instance.

    Like ``MethodType(func, instance)`` (``__func__``, ``__self__``), but picklable: a bound method
    pickles as ``getattr(instance, func.__name__)``, which the instance does not have. Its state is
    plain attributes and ``func`` a module-level function, so ``pickle`` stores the function by name
    and ``copy.deepcopy`` rebinds the copy to the copied module. ``args`` are passed after the module.
    """

    def __init__(self, func, instance, *args):
        self.__func__ = func
        self.__self__ = instance
        self.args = args

    def __call__(self, *args, **kwargs):
        return self.__func__(self.__self__, *self.args, *args, **kwargs)

    def __repr__(self) -> str:
        return f"<adapterkern patch {self.__func__.__name__} of {type(self.__self__).__name__}>"


def is_patch_function(f) -> bool:
    """Whether ``f`` (a module instance's attribute) is a patch function :func:`patch_adapters` installed."""
    return isinstance(f, BoundPatch)


@dataclass
class Plan:
    """How one adapter module is computed on the fused path (plain data and the model-wide adapters
    config, shared with the layers: deepcopy and pickle keep them together)."""

    parallel: bool
    activation: str  # adapterkern activation name
    backend: str
    config: object = None  # the model-wide adapters config: its active setup says whether a Fuse block reads ``up``


# ------------------------------------------------------------------------------------------------
# Activation: map what the library instantiated (not its config string: old-checkpoint renames such
# as "gelu" -> "gelu_new" and "gelu_orig" -> "gelu" are applied before the module is built).
# ------------------------------------------------------------------------------------------------
_TRANSFORMERS_ACTIVATIONS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_new",
    "FastGELUActivation": "gelu_new",
    "GELUTanh": "gelu_new",
    "PytorchGELUTanh": "gelu_new",
    "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu",
    "LinearActivation": "linear",
}
_TORCH_ACTIVATIONS = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.Identity: "linear",
}


def _activation_name(f) -> Optional[str]:
    """The adapterkern name for the library's activation callable ``f``, or None if there is none."""
    if f is F.leaky_relu:  # the library's own "leakyrelu"
        return "leakyrelu"
    t = type(f)
    if t in _TORCH_ACTIVATIONS:
        return _TORCH_ACTIVATIONS[t]
    if t is nn.LeakyReLU:
        return "leakyrelu" if f.negative_slope == 0.01 else None
    if t.__module__ == "transformers.activations":
        return _TRANSFORMERS_ACTIVATIONS.get(t.__name__)
    return None


def _resolve_activation(adapter: nn.Module):
    """(adapterkern name, None) or (None, reason). The name is checked numerically against the module."""
    f = getattr(adapter.non_linearity, "f", None)
    name = _activation_name(f)
    label = getattr(f, "__name__", None) or type(f).__name__
    if name is None:
        return None, f"activation {label} has no fused kernel"
    probe = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    try:
        with torch.no_grad():
            got = adapter.non_linearity(probe.clone())
        ok = torch.allclose(got, get_activation(name).fn(probe), rtol=1e-6, atol=1e-9)
    except Exception as e:  # noqa: BLE001  (an activation that cannot run on a CPU probe is not ours)
        return None, f"activation {label} could not be checked ({type(e).__name__})"
    if not ok:
        return None, f"activation {label} does not match adapterkern's {name!r} numerically"
    return name, None


def _describe_scaling(scaling) -> str:
    if isinstance(scaling, Tensor):
        return "learned" if scaling.numel() == 1 else f"channel ({scaling.numel()},)"
    return repr(float(scaling))


# ------------------------------------------------------------------------------------------------
# Classification: can this module's computation be expressed by the fused op?
# ------------------------------------------------------------------------------------------------
def classify(adapter: nn.Module, lib, layer: nn.Module, backend: str):
    """(plan, description, train_reason) for a fusable module, else (None, reason, None)."""
    parallel = type(adapter) is lib.ParallelAdapter
    if type(adapter) not in (lib.Adapter, lib.ParallelAdapter):
        return None, f"{type(adapter).__name__} is not the library's Adapter / ParallelAdapter", None
    if "forward" in vars(adapter):
        return None, "its forward is already replaced on the instance (e.g. by an accelerate hook)", None
    if parallel and "bottleneck_layer_forward" in vars(layer) and not is_patch_function(vars(layer)["bottleneck_layer_forward"]):
        return None, "its layer's bottleneck_layer_forward is already replaced on the instance", None
    down = list(adapter.adapter_down) if isinstance(adapter.adapter_down, nn.Sequential) else []
    if any(type(m) is lib.PHMLayer for m in down) or type(adapter.adapter_up) is lib.PHMLayer:
        return None, "PHM / Compacter projections (phm_layer=True)", None
    if adapter.use_gating:
        return None, "gating (use_gating=True): a per-sequence gate scales the adapter branch", None
    if adapter.add_layer_norm_after and parallel:
        return None, "ln_after on a parallel adapter: LayerNorm of the adapter branch before the residual add", None
    if adapter.add_layer_norm_after and not adapter.adapter_residual_before_ln:
        return None, "ln_after with adapter_residual_before_ln=False: LayerNorm of the adapter branch before the residual add", None
    expected = ([adapter.adapter_norm_before] if adapter.add_layer_norm_before else []) + [None, adapter.non_linearity]
    if (
        len(down) != len(expected)
        or type(down[-2]) is not nn.Linear
        or any(e is not None and m is not e for m, e in zip(down, expected))
        or type(adapter.adapter_up) is not nn.Linear
    ):
        return None, "adapter_down / adapter_up are not the library's Linear -> activation -> Linear", None
    drop_path = getattr(adapter, "DropPath", None)
    if drop_path is not None and not parallel and not _is_stochastic_depth(drop_path):
        return None, f"unrecognised DropPath module {type(drop_path).__name__}", None
    activation, why = _resolve_activation(adapter)
    if activation is None:
        return None, why, None

    train_reasons = []
    if adapter.dropout.p > 0:
        train_reasons.append(f"dropout p={adapter.dropout.p}")
    if drop_path is not None and not parallel and drop_path.p > 0:
        train_reasons.append(f"stochastic depth p={drop_path.p}")
    parts = [
        "parallel (output = h + s * up(act(down(x))); the add of h fused too when the only active adapter of its layer)"
        if parallel
        else "sequential (output = residual + s * up(act(down(x))))",
        f"activation={activation}",
        f"scaling={_describe_scaling(adapter.scaling)}",
    ]
    if adapter.add_layer_norm_before:
        parts.append("ln_before (LayerNorm, then the fused op)")
    if adapter.add_layer_norm_after:
        parts.append("ln_after (after the fused residual add)")
    train_reason = None
    if train_reasons:
        train_reason = " and ".join(train_reasons) + " (random masks: the library's path while training)"
    plan = Plan(parallel=parallel, activation=activation, backend=backend, config=getattr(layer, "adapters_config", None))
    return plan, ", ".join(parts), train_reason


def _is_stochastic_depth(module: nn.Module) -> bool:
    t = type(module)
    return t.__name__ == "StochasticDepth" and t.__module__.startswith("torchvision.") and hasattr(module, "p")


# ------------------------------------------------------------------------------------------------
# Run-time: the fused forwards and the conditions under which a call keeps the library's path.
# ------------------------------------------------------------------------------------------------
def training_randomness(adapter: nn.Module, parallel: bool) -> bool:
    """Whether the library would draw random masks now (dropout / stochastic depth in training mode)."""
    if adapter.dropout.training and adapter.dropout.p > 0:
        return True
    drop_path = getattr(adapter, "DropPath", None)  # only Adapter.forward (sequential) applies it
    return not parallel and drop_path is not None and drop_path.training and drop_path.p > 0


def fits(x, residual, adapter: nn.Module) -> bool:
    """Whether the fused op computes exactly the library's maths on these tensors (same dtypes, devices, shape)."""
    if not isinstance(x, Tensor) or not isinstance(residual, Tensor):
        return False
    if x.dtype not in SUPPORTED_DTYPES or x.dim() < 1:
        return False
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        return False
    down, up = adapter.adapter_down[-2], adapter.adapter_up
    for p in (down.weight, down.bias, up.weight, up.bias):
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            return False
    s = adapter.scaling
    if isinstance(s, Tensor) and (s.dtype != x.dtype or s.device != x.device):
        return False  # the library's up * s would promote the dtype
    if torch.is_autocast_enabled(x.device.type):
        return False
    return True


def _fused_branch(adapter: nn.Module, plan: Plan, x: Tensor, residual: Optional[Tensor]) -> Tensor:
    """residual + s * up(act(down(x))) through the fused op (residual None: x)."""
    down, up = adapter.adapter_down[-2], adapter.adapter_up
    return bottleneck_adapter(
        x,
        down.weight,
        down.bias,
        up.weight,
        up.bias,
        activation=plan.activation,
        scaling=adapter.scaling,
        residual=residual,
        backend=plan.backend,
    )


def _in_active_fuse(config, name: str) -> bool:
    """Whether adapter ``name`` sits in a Fuse block of the active setup (AdapterFusion reads its ``up``)."""
    from adapters.composition import AdapterCompositionBlock, Fuse
    from adapters.context import AdapterSetup

    context = AdapterSetup.get_context()
    setup = context.adapter_setup if context is not None else getattr(config, "active_setup", None)

    def visit(block) -> bool:
        if isinstance(block, Fuse) and name in block.flatten():
            return True
        return isinstance(block, AdapterCompositionBlock) and any(visit(c) for c in block.children)

    return visit(setup)


def zero_residual(x: Tensor) -> Tensor:
    """A residual of zeros like ``x`` that costs no memory (stride 0): a parallel adapter's forward
    adds none (the library's ``post_forward`` adds the sublayer output)."""
    return x.new_zeros(()).expand(x.shape)


def adapter_forward(self, x, residual_input, output_gating=False):
    """Patched ``Adapter.forward`` / ``ParallelAdapter.forward``: the library's output through the
    fused op (sequential: ``[ln_after](residual + s * up(...))``; parallel: ``s * up(...)``); returns
    (output, None, None): the library's ``down`` and ``up`` are not computed, so a call whose caller
    reads them (an active Fuse block, gating scores) takes the library's forward."""
    plan = getattr(self, PLAN_ATTR, None)
    original = type(self).forward
    if (
        plan is None
        or output_gating
        or training_randomness(self, plan.parallel)
        or _in_active_fuse(plan.config, self.name)
    ):
        return original(self, x, residual_input, output_gating)
    h = self.adapter_norm_before(x) if self.add_layer_norm_before else x
    residual = zero_residual(h) if plan.parallel else residual_input
    if not fits(h, residual, self):
        return original(self, x, residual_input, output_gating)
    output = _fused_branch(self, plan, h, None if residual is h else residual)
    if self.add_layer_norm_after:  # classified: sequential, with adapter_residual_before_ln=True
        output = self.adapter_norm_after(output)
    return output, None, None


def _single_stack_adapter(layer, setup) -> Optional[str]:
    """The one bottleneck adapter of this layer named by a Stack setup of plain names, else None."""
    from adapters.composition import Stack

    if type(setup) is not Stack or not all(isinstance(c, str) for c in setup.children):
        return None
    names = [c for c in setup.children if c in layer.adapters]
    return names[0] if len(names) == 1 else None


def parallel_layer_forward(self, hidden_states, residual_input, layer_norm):
    """Patched ``BottleneckLayer.bottleneck_layer_forward``: a lone active parallel adapter runs fused.

    The library computes ``post_ln(h + s * up(act(down(x))))`` with h = ``hidden_states`` (the
    sublayer's output) and x = ``residual_input`` (its input); this is the fused op with ``residual=h``.
    """
    from adapters.composition import adjust_tensors_for_parallel
    from adapters.context import ForwardContext
    from adapters.methods.modeling import Adapter

    original = type(self).bottleneck_layer_forward
    context = ForwardContext.get_context()
    setup = self.get_active_setup()
    name = None if setup is None else _single_stack_adapter(self, setup)
    adapter = None if name is None else self.adapters[name]
    plan = getattr(adapter, PLAN_ATTR, None)
    if (
        plan is None
        or not plan.parallel
        or residual_input is None
        or (context is not None and getattr(context, "output_adapter_gating_scores", False))
        or training_randomness(adapter, parallel=True)
    ):
        return original(self, hidden_states, residual_input, layer_norm)
    # As the library: batch sizes may differ (prefix tuning with Parallel blocks).
    (res,) = adjust_tensors_for_parallel(hidden_states, residual_input)
    (hid,) = adjust_tensors_for_parallel(res, hidden_states)
    x = adapter.adapter_norm_before(res) if adapter.add_layer_norm_before else res  # ParallelAdapter.pre_forward: x = input
    if not fits(x, hid, adapter):
        return original(self, hidden_states, residual_input, layer_norm)
    output = _fused_branch(adapter, plan, x, hid)
    # ParallelAdapter.post_forward = (output + h), then Adapter.post_forward's original_ln_after step.
    return Adapter.post_forward(adapter, output, hid, res, layer_norm)
