"""Run the bottleneck adapters of an AdapterHub ``adapters`` model through adapterkern's fused ops.

::

    import adapters, adapterkern
    adapters.init(model); model.add_adapter("a", config="seq_bn"); model.set_active_adapters("a")
    report = adapterkern.patch_adapters(model)      # what was fused, and what was not (and why)
    adapterkern.unpatch_adapters(model)             # the library's own forward again

The numbers are the library's (``adapters`` 1.x, ``methods/modeling.py``): only the adapter branch
(down-projection, activation, up-projection, scaling, residual add) runs through
:func:`adapterkern.bottleneck_adapter`, and composition blocks of agreeing adapters through one
``bottleneck_adapter_batched`` / ``multi_adapter`` launch per layer; the library's LayerNorm
placement, fusion layers and everything it does not fuse run as the library wrote them, and a call
the fused op cannot compute exactly takes the library's own code. Patching replaces methods on
module instances only (no class is touched), so ``unpatch_adapters`` and ``copy.deepcopy`` work.

Parts: :mod:`.adapterhub_plans` (each adapter module: fusable or not, and its patched forward),
:mod:`.adapterhub_compose` (composition blocks), :mod:`.adapterhub_report` (the report and warning).
README.md, "AdapterHub models: how patch_adapters works", has the details.
"""
from __future__ import annotations

import warnings
from types import MethodType

from torch import nn

from ..backends import check_backend_name
from .adapterhub_compose import COMPOSE_ATTR, COMPOSE_FUNCS, COMPOSE_IMPLS, LayerPlan, is_compose_function, report_compositions
from .adapterhub_plans import CONFIG_ATTR, PLAN_ATTR, classify, is_patched_forward, parallel_layer_forward, sequential_forward
from .adapterhub_report import AdapterPatchReport, AdapterPatchWarning, warning_message

__all__ = ["AdapterPatchReport", "AdapterPatchWarning", "patch_adapters", "unpatch_adapters"]

LAYER_ATTR = "_adapterkern_layer"  # on each BottleneckLayer whose bottleneck_layer_forward is replaced
PATCHED_ATTRS = ("forward", "bottleneck_layer_forward") + COMPOSE_FUNCS  # the methods patching sets on instances


def is_patch_function(f) -> bool:
    """Whether ``f`` (a module instance's attribute) is a method :func:`patch_adapters` installed."""
    return is_patched_forward(f) or is_compose_function(f)


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
        for attr in PATCHED_ATTRS:
            if is_patch_function(vars(module).get(attr)):
                delattr(module, attr)
                touched = True
        for attr in (PLAN_ATTR, LAYER_ATTR, COMPOSE_ATTR, CONFIG_ATTR):
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
        training) and composition blocks of the active setup that keep the library's loop are
        listed with the reason in one :class:`AdapterPatchWarning`; a model without bottleneck
        adapters gives an empty report and a warning saying so.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ValueError: unknown ``backend``.
        ImportError: the ``adapters`` library is not installed.
    """
    _check_model(model)
    backend = check_backend_name(backend, "backend")
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
        unfused = {}
        for adapter_name, adapter in layer.adapters.items():
            qualified = f"{layer_name}.adapters.{adapter_name}" if layer_name else f"adapters.{adapter_name}"
            plan, what, train_reason = classify(adapter, lib, layer, backend)
            if plan is None:
                report.library[qualified] = what
                unfused[adapter_name] = what
                continue
            setattr(adapter, PLAN_ATTR, plan)
            if plan.parallel:
                patch_layer = True
            else:
                # The active setup lives in the model-wide adapters config: to see Fuse blocks at run time.
                setattr(adapter, CONFIG_ATTR, getattr(layer, "adapters_config", None))
                adapter.forward = MethodType(sequential_forward, adapter)
            report.fused[qualified] = what
            if train_reason is not None:
                report.library_in_training[qualified] = train_reason
        if patch_layer:
            setattr(layer, LAYER_ATTR, True)
            layer.bottleneck_layer_forward = MethodType(parallel_layer_forward, layer)
        if len(unfused) < len(layer.adapters) and not any(attr in vars(layer) for attr in COMPOSE_FUNCS):
            # Composition blocks over this layer's adapters (read through getattr by the library's compose).
            setattr(layer, COMPOSE_ATTR, LayerPlan(backend=backend, unfused=unfused))
            for attr, impl in COMPOSE_IMPLS.items():
                setattr(layer, attr, MethodType(impl, layer))
            report_compositions(report, layer_name, layer)

    message = warning_message(report)
    if message is not None:
        warnings.warn(message, AdapterPatchWarning, stacklevel=2)
    return report
