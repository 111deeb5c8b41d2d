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
module instances only (no class is touched), so ``unpatch_adapters``, ``copy.deepcopy`` and
``pickle`` work; the library's own add / delete methods of each module holding adapter modules are
hooked too, so adapters added after patching are patched (and reported) as they are added.

Parts: :mod:`.adapterhub_plans` (each adapter module: fusable or not, and its patched forward),
:mod:`.adapterhub_compose` (composition blocks), :mod:`.adapterhub_report` (the report and warning).
README.md, "AdapterHub models: how patch_adapters works", has the details.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import SimpleNamespace

from torch import nn

from ..backends import check_backend_name
from .adapterhub_compose import COMPOSE_ATTR, COMPOSE_FUNCS, COMPOSE_IMPLS, LayerPlan, report_compositions
from .adapterhub_plans import PLAN_ATTR, BoundPatch, adapter_forward, classify, is_patch_function, parallel_layer_forward
from .adapterhub_report import AdapterPatchReport, AdapterPatchWarning, added_message, qualified, warning_message

__all__ = ["AdapterPatchReport", "AdapterPatchWarning", "is_patch_function", "patch_adapters", "unpatch_adapters"]

HOLDER_ATTR = "_adapterkern_holder"  # on each module holding adapter modules: a _Holder
# By the attribute holding a module's adapter modules (see _container): the library's methods that add
# and delete them, hooked (average_adapter and _average_invertible_adapter add through these too).
HOOKED = {
    "adapters": ("add_adapter", "delete_adapter"),  # BottleneckLayer
    "": ("add_adapter", "delete_adapter"),  # InvertibleAdapterLayer
    "invertible_adapters": ("add_invertible_adapter", "delete_invertible_adapter"),  # InvertibleAdaptersMixin
}
# The methods patching sets on instances.
PATCHED_ATTRS = ("forward", "bottleneck_layer_forward") + COMPOSE_FUNCS + tuple(
    dict.fromkeys(attr for attrs in HOOKED.values() for attr in attrs)
)


@dataclass
class _Holder:
    """What the hooks of one module holding adapter modules need (plain data and the shared report)."""

    container: str  # its attribute holding them ("": the module itself, a ModuleDict)
    prefix: str  # the container's qualified name: the modules are qualified(prefix, adapter name)
    report: AdapterPatchReport  # one per patch_adapters call, shared by every holder
    warned: set  # the added-adapter warnings given, shared as the report
    reported: set = field(default_factory=set)  # qualified names of its modules in the report


def _library():
    """The ``adapters`` library's classes patching needs."""
    try:
        from adapters.methods import modeling
        from adapters.methods.bottleneck import BottleneckLayer
        from adapters.methods.invertible import InvertibleAdapterLayer
        from adapters.model_mixin import InvertibleAdaptersMixin
    except ImportError as e:
        raise ImportError(
            "patch_adapters needs the AdapterHub `adapters` library: pip install 'adapterkern[adapterhub]'"
        ) from e
    return SimpleNamespace(modeling=modeling, BottleneckLayer=BottleneckLayer,
                           InvertibleAdapterLayer=InvertibleAdapterLayer, InvertibleAdaptersMixin=InvertibleAdaptersMixin)


def _container(module, lib):
    """The attribute of ``module`` holding adapter modules ("": ``module`` itself), or None: the
    bottleneck adapters of a BottleneckLayer, the coupling blocks of the invertible adapters' owner."""
    if isinstance(module, lib.BottleneckLayer):
        return "adapters" if isinstance(getattr(module, "adapters", None), nn.ModuleDict) else None
    if isinstance(module, lib.InvertibleAdapterLayer):
        return ""
    if isinstance(module, lib.InvertibleAdaptersMixin) and type(getattr(module, "invertible_adapters", None)) is nn.ModuleDict:
        return "invertible_adapters"
    return None


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (set up with adapters.init), got {type(model).__name__}")


def unpatch_adapters(model: nn.Module) -> int:
    """Restore the ``adapters`` library's own methods on every module :func:`patch_adapters` patched.

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
        for attr in (PLAN_ATTR, COMPOSE_ATTR, HOLDER_ATTR):
            if attr in vars(module):
                delattr(module, attr)
                touched = True
        restored += touched
    return restored


def patch_adapters(model: nn.Module, backend: str = "auto") -> AdapterPatchReport:
    """Run every bottleneck adapter of an ``adapters``-library model through the fused op.

    Args:
        model: a model set up with ``adapters.init`` (or an ``AutoAdapterModel``). Adapters the
            library adds later (``add_adapter``, ``load_adapter``, ``average_adapter``) are patched as
            they are added, and entered in the report (a warning names those that keep the library's
            path); calling again re-patches everything and returns a fresh report.
        backend: ``auto``, ``torch``, ``triton`` or ``cuda``, for every fused call.

    Returns:
        An :class:`AdapterPatchReport` covering every adapter module. Modules that keep the library's
        path (always, or while training) and composition blocks of the active setup that keep the
        library's loop are listed with the reason in one :class:`AdapterPatchWarning`; a model without
        bottleneck adapters gives an empty report and a warning saying so.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ValueError: unknown ``backend``.
        ImportError: the ``adapters`` library is not installed.
    """
    _check_model(model)
    backend = check_backend_name(backend, "backend")
    lib = _library()

    unpatch_adapters(model)
    report = AdapterPatchReport(backend=backend)
    warned = set()
    try:
        for name, module in model.named_modules():
            container = _container(module, lib)
            if container is None:
                continue
            setattr(module, HOLDER_ATTR, _Holder(container, qualified(name, container), report, warned))
            if container == "adapters":
                setattr(module, COMPOSE_ATTR, LayerPlan(backend=backend))
            for attr in HOOKED[container]:
                if attr not in vars(module):  # one replaced by someone else stays: its additions are not seen
                    setattr(module, attr, BoundPatch(_hooked, module, attr))
            _sync(module, lib, warn=False)
            if is_patch_function(vars(module).get(COMPOSE_FUNCS[0])):
                report_compositions(report, name, module)
    except BaseException:
        unpatch_adapters(model)  # all or nothing: no half-patched model
        raise

    message = warning_message(report)
    if message is not None:
        warnings.warn(message, AdapterPatchWarning, stacklevel=2)
    return report


def _hooked(self, method: str, *args, **kwargs):
    """A holder's hooked add / delete method: the library's, then its adapter modules patched and reported anew."""
    result = getattr(type(self), method)(self, *args, **kwargs)
    _sync(self, _library(), warn=True)
    return result


def _sync(module, lib, warn: bool) -> None:
    """Patch the adapter modules of holder ``module`` not patched yet and bring the report up to date
    (new modules in, deleted ones out); ``warn``: one warning per adapter and reason for new modules
    that keep the library's path."""
    holder = vars(module)[HOLDER_ATTR]
    report = holder.report
    modules = module if holder.container == "" else getattr(module, holder.container)
    if holder.container == "adapters":
        entries = _patch_layer(module, lib, report.backend)
    else:
        entries = {name: (None, _invertible_reason(block), None) for name, block in modules.items()}
    current = {qualified(holder.prefix, name) for name in modules.keys()}
    for gone in holder.reported - current:
        for listed in (report.fused, report.library, report.library_in_training):
            listed.pop(gone, None)
    messages = []
    for name, (what, why, train_reason) in entries.items():
        q = qualified(holder.prefix, name)
        (report.library if what is not None else report.fused).pop(q, None)
        if what is not None:
            report.fused[q] = what
        else:
            report.library[q] = why
        if train_reason is not None:
            report.library_in_training[q] = train_reason
        else:
            report.library_in_training.pop(q, None)
        if q not in holder.reported and (why is not None or train_reason is not None):
            messages.append(added_message(name, train_reason if why is None else why, training=why is None))
    holder.reported = current
    for message in messages if warn else ():
        if message not in holder.warned:
            holder.warned.add(message)
            warnings.warn(message, AdapterPatchWarning, stacklevel=4)


def _invertible_reason(block) -> str:
    return (
        f"invertible adapter ({type(block).__name__}): a coupling block on the embeddings, not a bottleneck "
        "adapter (no fused kernel)"
    )


def _patch_layer(layer, lib, backend):
    """Classify and patch the adapter modules of ``layer`` not patched yet, and the layer's methods
    their plans need; returns {adapter name: (fused description or None, library reason or None,
    reason for the library's path while training or None)} for the modules classified now."""
    lp = getattr(layer, COMPOSE_ATTR)
    entries = {}
    for name, adapter in layer.adapters.items():
        if getattr(adapter, PLAN_ATTR, None) is not None:
            continue
        plan, what, train_reason = classify(adapter, lib.modeling, layer, backend)
        if plan is None:
            entries[name] = (None, what, None)
            continue
        setattr(adapter, PLAN_ATTR, plan)
        adapter.forward = BoundPatch(adapter_forward, adapter)
        entries[name] = (what, None, train_reason)
    plans = [getattr(a, PLAN_ATTR, None) for a in layer.adapters.values()]
    lp.unfused = {name: why for name, (what, why, _) in entries.items() if what is None}
    if any(p is not None and p.parallel for p in plans) and "bottleneck_layer_forward" not in vars(layer):
        # A lone active parallel adapter: the add of the sublayer output fused too.
        layer.bottleneck_layer_forward = BoundPatch(parallel_layer_forward, layer)
    if any(p is not None for p in plans) and not any(attr in vars(layer) for attr in COMPOSE_FUNCS):
        # Composition blocks over this layer's adapters (read through getattr by the library's compose).
        for attr, impl in COMPOSE_IMPLS.items():
            setattr(layer, attr, BoundPatch(impl, layer))
    return entries
