"""Bottleneck adapters for Hugging Face ``transformers`` models, without the ``adapters`` library.

::

    cfg = AdapterConfig.pfeiffer(reduction_factor=16)
    add_adapter(model, "sentiment", cfg)          # inserted, active, fresh
    train_adapter(model, "sentiment", train_modules=("classifier",))  # everything else frozen
    save_adapter(model, "sentiment", "out/sentiment")   # safetensors + JSON: adapter tensors (and modules_to_save)
    load_adapter(other_model, "out/sentiment")

Each adapter sits at the *places* its :class:`AdapterConfig` names (modules of the model found by
their role, :mod:`adapterkern.integrations.placement`); the adapter modules become children of those
modules (:mod:`adapterkern.integrations.slots`), so the backbone's own state-dict keys do not change
and ``model.to(...)`` moves the adapters with it. Those children are in ``model.state_dict()`` (keys
``<place>.bottleneck_adapters.<name>.<tensor>``); :func:`backbone_state_dict` and :func:`save_backbone`
leave them out. Saving and loading adapter files: :mod:`adapterkern.integrations.adapter_files`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from ..nn.prefix import PrefixTuning
from .placement import AdapterConfig, build_adapters, find_places
from .prefix_attention import disable_prefix_attention, enable_prefix_attention, prefix_attention_enabled
from .slots import (
    PREFIX, SLOT_ATTR, AdapterSlot, Place, SlotConfig, adapter_configs, attach, check_model, check_new_name,
    check_not_optimized, check_places, detach, iter_slots, require_adapter,
)

__all__ = [
    "AdapterConfig",  # defined in .placement
    "AdapterSlot",  # defined in .slots
    "AdapterSummary",
    "adapter_modules",
    "adapter_state_dict",
    "adapter_summary",
    "add_adapter",
    "backbone_state_dict",
    "delete_adapter",
    "get_active_adapter",
    "get_adapter_config",
    "list_adapters",
    "save_backbone",
    "saved_modules",
    "set_active_adapter",
    "train_adapter",
]

_ACTIVE = "_adapterkern_active"  # model.__dict__ key: the name set_active_adapter made active


def list_adapters(model: nn.Module) -> List[str]:
    """The names of the adapters (and fusions) added to ``model``, in the order they were added."""
    return list(adapter_configs(model))


def get_adapter_config(model: nn.Module, name: str) -> SlotConfig:
    """The config ``name`` was added with: an AdapterConfig, or a FusionConfig for a fusion."""
    require_adapter(model, name)
    return adapter_configs(model)[name]


def insert_adapter_modules(model: nn.Module, name: str, config: SlotConfig, places: Sequence[Place], modules: Sequence[nn.Module]) -> None:
    """:func:`~.slots.attach`, the prefix attention switched on first where there are PREFIX places.
    All or nothing: checked first; if attaching fails, prefix attention this call switched on goes off."""
    check_new_name(model, name)
    check_places(places)
    switch_on = any(place.mode == PREFIX for place in places) and not prefix_attention_enabled(model)
    if switch_on:
        enable_prefix_attention(model)  # the attention modules read their slots
    try:
        attach(model, name, config, places, modules)
    except BaseException:
        if switch_on:
            disable_prefix_attention(model)
        raise


def add_adapter(model: nn.Module, name: str, config: Optional[AdapterConfig] = None, *, set_active: bool = True) -> None:
    """Insert a fresh adapter called ``name`` into ``model`` (a Hugging Face transformers model or any
    module with the same layout), at the places ``config`` names (default: :meth:`AdapterConfig.pfeiffer`).

    The adapters take the dtype and device of the module they sit on. With ``set_active`` (default)
    the new adapter becomes the active one. Several adapters may be added; one is active at a time.
    """
    check_not_optimized(model, "add_adapter")
    check_new_name(model, name)
    if config is None:
        config = AdapterConfig.pfeiffer()
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config: expected an adapterkern.AdapterConfig, got {type(config).__name__}")
    places = find_places(model, config)
    check_saved_modules(model, config, places)
    insert_adapter_modules(model, name, config, places, build_adapters(model, config, places))
    if set_active:
        set_active_adapter(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter (or fusion) ``name``; places left with no adapter get their hooks removed."""
    check_not_optimized(model, "delete_adapter")
    require_adapter(model, name)
    configs = adapter_configs(model)
    users = [f"{configs[other].kind} {other!r}" for other, config in configs.items() if name in config.requires]
    if users:
        raise ValueError(f"name: adapter {name!r} is mixed by {', '.join(users)}; delete_adapter() that first")
    if get_active_adapter(model) == name:
        model.__dict__[_ACTIVE] = None
    detach(model, name)
    if prefix_attention_enabled(model) and not any(slot.mode == PREFIX for _, _, slot in iter_slots(model)):
        disable_prefix_attention(model)


def set_active_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Make ``name`` the adapter (or fusion) applied in every forward (None: no adapter, the plain backbone)."""
    check_not_optimized(model, "set_active_adapter")
    if name is not None:
        require_adapter(model, name)
    active = None if name is None else adapter_configs(model)[name].composition(name)
    for _, _, slot in iter_slots(model):
        slot.active = active if (name is not None and name in slot) else None
    model.__dict__[_ACTIVE] = name


def get_active_adapter(model: nn.Module) -> Optional[str]:
    check_model(model)
    return model.__dict__.get(_ACTIVE)


def adapter_modules(model: nn.Module, name: str) -> Dict[str, nn.Module]:
    """``{place's qualified module name: the module of adapter name there}`` (a BottleneckAdapter,
    a PrefixTuning at an attention place of a ``mam`` adapter, an AdapterFusion for a fusion)."""
    require_adapter(model, name)
    return {module_name: slot[name] for module_name, _, slot in iter_slots(model) if name in slot}


def adapter_state_dict(model: nn.Module, name: str) -> Dict[str, Tensor]:
    """Adapter ``name``'s tensors keyed ``"<place>.<parameter>"`` (e.g. ``encoder.layer.0.output.dense.adapter_down.weight``)."""
    out: Dict[str, Tensor] = {}
    for place, adapter in adapter_modules(model, name).items():
        for key, value in saved_tensors(adapter).items():
            out[f"{place}.{key}"] = value
    return out


@dataclass
class AdapterSummary:
    """Parameter counts: ``trainable`` of ``total`` (``percent``), and each adapter's size."""

    trainable: int
    total: int
    adapters: Dict[str, int] = field(default_factory=dict)
    active: Optional[str] = None

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        lines = [f"trainable parameters: {self.trainable:,} of {self.total:,} ({self.percent:.3f}%)"]
        for name, count in self.adapters.items():
            mark = " (active)" if name == self.active else ""
            lines.append(f"  adapter {name!r}: {count:,} parameters{mark}")
        return "\n".join(lines)


def adapter_summary(model: nn.Module) -> AdapterSummary:
    """Trainable and total parameter counts of ``model`` and each adapter's parameter count."""
    check_model(model)
    params = {id(p): p for p in model.parameters()}.values()

    def unique(modules):  # a prefix MLP is shared by every layer's PrefixTuning: count it once
        return {id(p): p for m in modules for p in m.parameters()}.values()

    sizes = {name: sum(p.numel() for p in unique(adapter_modules(model, name).values())) for name in list_adapters(model)}
    return AdapterSummary(
        trainable=sum(p.numel() for p in params if p.requires_grad),
        total=sum(p.numel() for p in params),
        adapters=sizes,
        active=get_active_adapter(model),
    )


def train_adapter(model: nn.Module, name: str, train_modules: Sequence[str] = ()) -> AdapterSummary:
    """Freeze every parameter of ``model`` but adapter ``name``'s, its config's ``modules_to_save`` and
    ``train_modules`` (module names such as ``"classifier"`` matched against the end of qualified names,
    e.g. a task head), make ``name`` active, and return the :class:`AdapterSummary`."""
    check_not_optimized(model, "train_adapter")
    require_adapter(model, name)
    if isinstance(train_modules, str):
        train_modules = (train_modules,)
    heads = list(find_modules(model, train_modules, "train_modules").values()) + list(saved_modules(model, name).values())
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(adapter_modules(model, name).values()) + heads:
        for p in module.parameters():
            p.requires_grad_(True)
    set_active_adapter(model, name)
    return adapter_summary(model)


def saved_tensors(module: nn.Module) -> Dict[str, Tensor]:
    """What is saved of one adapter module: prefixes as their collapsed (H_kv, l, hd) tensors, not the shared MLP."""
    return module.collapsed_state_dict() if isinstance(module, PrefixTuning) else module.state_dict()


def find_modules(model: nn.Module, patterns: Sequence[str], argument: str) -> Dict[str, nn.Module]:
    """``{qualified name: module}`` of the modules ``patterns`` name: each pattern is a module name
    matched against the end of qualified names (``"classifier"`` matches ``classifier`` and
    ``bert.pooler.classifier``). A pattern that matches nothing is a ValueError naming ``argument``."""
    found: Dict[str, nn.Module] = {}
    named = [(n, m) for n, m in model.named_modules() if n]
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"{argument}: expected module names, got {pattern!r}")
        hits = {n: m for n, m in named if n == pattern or n.endswith("." + pattern)}
        if not hits:
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"{argument}: no module named {pattern!r} in this model (its top-level modules: {top})")
        found.update(hits)
    return found


def adapter_places_in(model: nn.Module, module_name: str, places: Sequence[Place] = ()) -> List[str]:
    """The adapter places (``places``, and every slot of ``model``) at or below ``module_name``, or
    ``[module_name]`` when the module is itself inside an adapter slot: what a module saved with an
    adapter must not hold."""
    if f".{SLOT_ATTR}." in f".{module_name}.":
        return [module_name]
    occupied = [p.name for p in places] + [n for n, _, _ in iter_slots(model)]
    return [p for p in occupied if p == module_name or p.startswith(module_name + ".")]


def check_saved_modules(model: nn.Module, config: SlotConfig, places: Sequence[Place]) -> Dict[str, nn.Module]:
    """The modules ``config.modules_to_save`` names in ``model`` (none for configs without that field),
    checked: each exists, holds no adapter (no place of this or another adapter inside it, not inside an
    adapter slot) and has only floating-point tensors. ValueError naming the module otherwise."""
    modules = find_modules(model, getattr(config, "modules_to_save", ()), "modules_to_save")
    for module_name, module in modules.items():
        inside = adapter_places_in(model, module_name, places)
        if inside:
            raise ValueError(f"modules_to_save: {module_name!r} holds adapter places ({inside[:3]}) or is inside one; "
                             f"name the task head (e.g. 'classifier'), not a part of the backbone with adapters")
        odd = {k: str(t.dtype) for k, t in module_tensors(module).items() if not t.is_floating_point()}
        if odd:
            raise ValueError(f"modules_to_save: {module_name!r} has non-floating-point tensors {odd}; it cannot be saved with an adapter")
    return modules


def saved_modules(model: nn.Module, name: str) -> Dict[str, nn.Module]:
    """The modules saved and loaded with adapter ``name`` (its config's ``modules_to_save``), by qualified name."""
    require_adapter(model, name)
    return find_modules(model, getattr(adapter_configs(model)[name], "modules_to_save", ()), "modules_to_save")


def module_tensors(module: nn.Module) -> Dict[str, Tensor]:
    """``module.state_dict()`` without the adapters of any place inside it."""
    return {k: v for k, v in module.state_dict().items() if SLOT_ATTR not in k.split(".")}


def backbone_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """``model.state_dict()`` without any adapter's tensors: the keys and values of the model before
    :func:`add_adapter` (``model.state_dict()`` itself also holds every adapter, under
    ``<place>.bottleneck_adapters.<name>.``). Refused on a model under ``optimize_for_inference``, whose
    FFN weights hold merged adapters."""
    check_model(model)
    check_not_optimized(model, "backbone_state_dict")
    return module_tensors(model)


def save_backbone(model: nn.Module, directory, **save_pretrained_kwargs) -> None:
    """``model.save_pretrained(directory, state_dict=backbone_state_dict(model), ...)``: the clean
    backbone, loadable with ``from_pretrained`` and no adapterkern (``save_pretrained`` alone writes the
    adapters' keys too, which ``from_pretrained`` then reports as unexpected)."""
    if not hasattr(model, "save_pretrained"):
        raise TypeError(f"model: expected a transformers PreTrainedModel (with save_pretrained), got {type(model).__name__}")
    if "state_dict" in save_pretrained_kwargs:
        raise TypeError("save_backbone: state_dict is the backbone's; do not pass one")
    with torch.no_grad():
        model.save_pretrained(directory, state_dict=backbone_state_dict(model), **save_pretrained_kwargs)
