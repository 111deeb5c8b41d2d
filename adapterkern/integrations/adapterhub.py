"""Run the bottleneck adapters of an AdapterHub ``adapters`` model through the fused op.

::

    import adapters, adapterkern
    adapters.init(model); model.add_adapter("a", config="seq_bn"); model.set_active_adapters("a")
    report = adapterkern.patch_adapters(model)      # returns what was fused and what was not (and why)
    adapterkern.unpatch_adapters(model)             # the library's own forward again

What is computed is the library's (``adapters`` 1.x, ``methods/modeling.py``), with the
down-projection, activation, up-projection, scaling and residual add done by
:func:`adapterkern.bottleneck_adapter`; the library's ``pre_forward`` / ``post_forward`` (the
model's LayerNorm, ``original_ln_before/after``, ``residual_before_ln``) are not touched.

* Sequential adapters (``seq_bn`` / Pfeiffer, ``double_seq_bn`` / Houlsby, AdapterPlus): the
  ``Adapter`` instance's ``forward(x, residual_input)`` is replaced by
  ``[ln_after](residual_input + s * up(act(down([ln_before](x)))))``: the fused op with
  ``residual=residual_input`` (None when that is ``x`` itself). It returns ``(output, None, None)``:
  the library's ``down`` and ``up`` intermediates are not computed (only AdapterFusion reads ``up``,
  and an adapter inside an active ``Fuse`` block keeps the library's forward at run time).
* Parallel adapters (``par_bn``, ``scaled_par_bn``, the adapter half of ``mam``): the library adds
  ``s * up(act(down(x)))`` to the sublayer output ``h`` in ``post_forward``, out of reach of the
  adapter's own forward, so the hook is the ``BottleneckLayer``'s ``bottleneck_layer_forward``:
  when the layer's active setup is a ``Stack`` with this one bottleneck adapter, it computes
  ``h + s * up(act(down(x)))`` in the fused op (``residual=h``) and then the library's
  ``original_ln_after`` step; any other composition runs the library's code.

Kept on the library's path (listed, with the reason, in one :class:`AdapterPatchWarning`):
PHM / Compacter projections, gating (``use_gating``), ``ln_after`` on the adapter branch alone
(parallel adapters, or ``adapter_residual_before_ln=False``), activations without a kernel, and,
while the module is training, dropout (p > 0) and stochastic depth (p > 0). At run time a call also
takes the library's path when its tensors do not fit the fused op (mixed dtypes or devices,
autocast, a residual of another shape) or when gating scores are requested; that path is the
library's own code, so the numbers are the library's.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import MethodType
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import get_activation
from ..backends import _check_name
from ..functional import SUPPORTED_DTYPES, bottleneck_adapter

__all__ = ["AdapterPatchReport", "AdapterPatchWarning", "patch_adapters", "unpatch_adapters"]

PLAN_ATTR = "_adapterkern_plan"  # on each patched Adapter / ParallelAdapter module
LAYER_ATTR = "_adapterkern_layer"  # on each BottleneckLayer whose bottleneck_layer_forward is replaced


class AdapterPatchWarning(UserWarning):
    """Emitted once by :func:`patch_adapters` when some adapter modules keep the library's path."""


@dataclass
class AdapterPatchReport:
    """What :func:`patch_adapters` did, by qualified module name.

    ``fused``: modules that run through the fused op (value: what is fused).
    ``library``: modules that always keep the ``adapters`` library's path (value: why).
    ``library_in_training``: fused modules that take the library's path while in training mode (why).
    """

    backend: str
    fused: Dict[str, str] = field(default_factory=dict)
    library: Dict[str, str] = field(default_factory=dict)
    library_in_training: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.fused and not self.library:
            return "patch_adapters: no bottleneck adapter modules of the adapters library found"
        lines = [f"patch_adapters (backend={self.backend!r}): {len(self.fused)} fused, {len(self.library)} on the library path"]
        lines += [f"  fused    {name}: {what}" for name, what in self.fused.items()]
        lines += [f"  library  {name}: {why}" for name, why in self.library.items()]
        lines += [f"  library while training  {name}: {why}" for name, why in self.library_in_training.items()]
        return "\n".join(lines)


@dataclass
class _Plan:
    """How one adapter module is computed on the fused path (plain data: survives deepcopy)."""

    parallel: bool
    activation: str  # adapterkern activation name
    backend: str


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
def _classify(adapter: nn.Module, lib, layer: nn.Module, backend: str):
    """(plan, description, train_reason) for a fusable module, else (None, reason, None)."""
    parallel = type(adapter) is lib.ParallelAdapter
    if type(adapter) not in (lib.Adapter, lib.ParallelAdapter):
        return None, f"{type(adapter).__name__} is not the library's Adapter / ParallelAdapter", None
    if "forward" in vars(adapter):
        return None, "its forward is already replaced on the instance (e.g. by an accelerate hook)", None
    if parallel and "bottleneck_layer_forward" in vars(layer) and not _is_ours(vars(layer)["bottleneck_layer_forward"]):
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
        "parallel (output = h + s * up(act(down(x))), when the only active bottleneck adapter of its layer)"
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
    return _Plan(parallel=parallel, activation=activation, backend=backend), ", ".join(parts), train_reason


def _is_stochastic_depth(module: nn.Module) -> bool:
    t = type(module)
    return t.__name__ == "StochasticDepth" and t.__module__.startswith("torchvision.") and hasattr(module, "p")


# ------------------------------------------------------------------------------------------------
# Run-time: the fused forwards and the conditions under which a call keeps the library's path.
# ------------------------------------------------------------------------------------------------
def _training_randomness(adapter: nn.Module, parallel: bool) -> bool:
    """Whether the library would draw random masks now (dropout / stochastic depth in training mode)."""
    if adapter.dropout.training and adapter.dropout.p > 0:
        return True
    drop_path = getattr(adapter, "DropPath", None)  # only Adapter.forward (sequential) applies it
    return not parallel and drop_path is not None and drop_path.training and drop_path.p > 0


def _fits(x, residual, adapter: nn.Module) -> bool:
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


def _fused_branch(adapter: nn.Module, plan: _Plan, x: Tensor, residual: Optional[Tensor]) -> Tensor:
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


def _sequential_forward(self, x, residual_input, output_gating=False):
    """Patched ``Adapter.forward``: the library's result, through the fused op; returns (output, None, None)."""
    plan = getattr(self, PLAN_ATTR, None)
    original = type(self).forward
    if (
        plan is None
        or output_gating
        or _training_randomness(self, parallel=False)
        or _in_active_fuse(getattr(self, "_adapterkern_config", None), self.name)
    ):
        return original(self, x, residual_input, output_gating)
    h = self.adapter_norm_before(x) if self.add_layer_norm_before else x
    if not _fits(h, residual_input, self):
        return original(self, x, residual_input, output_gating)
    output = _fused_branch(self, plan, h, None if residual_input is h else residual_input)
    if self.add_layer_norm_after:  # classified: only with adapter_residual_before_ln=True
        output = self.adapter_norm_after(output)
    return output, None, None


def _single_stack_adapter(layer, setup) -> Optional[str]:
    """The one bottleneck adapter of this layer named by a Stack setup of plain names, else None."""
    from adapters.composition import Stack

    if type(setup) is not Stack or not all(isinstance(c, str) for c in setup.children):
        return None
    names = [c for c in setup.children if c in layer.adapters]
    return names[0] if len(names) == 1 else None


def _parallel_layer_forward(self, hidden_states, residual_input, layer_norm):
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
        or _training_randomness(adapter, parallel=True)
    ):
        return original(self, hidden_states, residual_input, layer_norm)
    # As the library: batch sizes may differ (prefix tuning with Parallel blocks).
    (res,) = adjust_tensors_for_parallel(hidden_states, residual_input)
    (hid,) = adjust_tensors_for_parallel(res, hidden_states)
    x = adapter.adapter_norm_before(res) if adapter.add_layer_norm_before else res  # ParallelAdapter.pre_forward: x = input
    if not _fits(x, hid, adapter):
        return original(self, hidden_states, residual_input, layer_norm)
    output = _fused_branch(adapter, plan, x, hid)
    # ParallelAdapter.post_forward = (output + h), then Adapter.post_forward's original_ln_after step.
    return Adapter.post_forward(adapter, output, hid, res, layer_norm)


def _is_ours(f) -> bool:
    return isinstance(f, MethodType) and f.__func__ in (_sequential_forward, _parallel_layer_forward)


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (set up with adapters.init), got {type(model).__name__}")


def unpatch_adapters(model: nn.Module) -> int:
    """Restore the ``adapters`` library's own forward on every module :func:`patch_adapters` patched.

    Returns the number of modules restored (0 if none was patched). Does not import ``adapters``.
    """
    _check_model(model)
    restored = 0
    for module in model.modules():
        touched = False
        for attr in ("forward", "bottleneck_layer_forward"):
            if _is_ours(vars(module).get(attr)):
                delattr(module, attr)
                touched = True
        for attr in (PLAN_ATTR, LAYER_ATTR, "_adapterkern_config"):
            if attr in vars(module):
                delattr(module, attr)
                touched = True
        restored += touched
    return restored


def patch_adapters(model: nn.Module, backend: str = "auto") -> AdapterPatchReport:
    """Run every bottleneck adapter of an ``adapters``-library model through the fused op.

    Args:
        model: a model set up with ``adapters.init`` (or an ``AutoAdapterModel``), adapters added.
            Adapters added after the call are not patched: call again (patching is idempotent).
        backend: ``auto``, ``torch``, ``triton`` or ``cuda``, for every fused call.

    Returns:
        An :class:`AdapterPatchReport`. Modules that keep the library's path (always, or while
        training) are listed with the reason in one :class:`AdapterPatchWarning`; a model without
        bottleneck adapters gives an empty report and a warning saying so.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ValueError: unknown ``backend``.
        ImportError: the ``adapters`` library is not installed.
    """
    _check_model(model)
    backend = _check_name(backend, "backend")
    try:
        from adapters.methods import modeling as lib
        from adapters.methods.bottleneck import BottleneckLayer
    except ImportError as e:
        raise ImportError(
            "patch_adapters needs the AdapterHub `adapters` library: pip install 'adapterkern[adapterhub]'"
        ) from e

    unpatch_adapters(model)
    report = AdapterPatchReport(backend=backend)
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, BottleneckLayer) or not isinstance(getattr(layer, "adapters", None), nn.ModuleDict):
            continue
        patch_layer = False
        for adapter_name, adapter in layer.adapters.items():
            qualified = f"{layer_name}.adapters.{adapter_name}" if layer_name else f"adapters.{adapter_name}"
            plan, what, train_reason = _classify(adapter, lib, layer, backend)
            if plan is None:
                report.library[qualified] = what
                continue
            setattr(adapter, PLAN_ATTR, plan)
            if plan.parallel:
                patch_layer = True
            else:
                # The active setup lives in the model-wide adapters config: to see Fuse blocks at run time.
                setattr(adapter, "_adapterkern_config", getattr(layer, "adapters_config", None))
                adapter.forward = MethodType(_sequential_forward, adapter)
            report.fused[qualified] = what
            if train_reason is not None:
                report.library_in_training[qualified] = train_reason
        if patch_layer:
            setattr(layer, LAYER_ATTR, True)
            layer.bottleneck_layer_forward = MethodType(_parallel_layer_forward, layer)

    if not report.fused and not report.library:
        warnings.warn(
            "patch_adapters: no bottleneck adapter modules of the adapters library found in the model; "
            "nothing was patched (add adapters first, then patch)",
            AdapterPatchWarning,
            stacklevel=2,
        )
    elif report.library or report.library_in_training:
        lines = [f"patch_adapters: {len(report.library)} adapter module(s) keep the adapters library's path:"]
        lines += [f"  {name}: {why}" for name, why in report.library.items()]
        if report.library_in_training:
            lines.append(f"{len(report.library_in_training)} fused module(s) take the library's path while training:")
            lines += [f"  {name}: {why}" for name, why in report.library_in_training.items()]
        warnings.warn("\n".join(lines), AdapterPatchWarning, stacklevel=2)
    return report
