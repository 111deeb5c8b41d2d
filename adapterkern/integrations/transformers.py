"""Bottleneck adapters for Hugging Face ``transformers`` models, without the ``adapters`` library.

::

    cfg = AdapterConfig.pfeiffer(reduction_factor=16)
    add_adapter(model, "sentiment", cfg)          # inserted, active, fresh
    train_adapter(model, "sentiment", train_modules=("classifier",))  # everything else frozen
    save_adapter(model, "sentiment", "out/sentiment")   # safetensors + JSON, adapter tensors only
    load_adapter(other_model, "out/sentiment")

Each adapter sits at the *places* its :class:`AdapterConfig` names (modules of the model found by
their role, :mod:`adapterkern.integrations.placement`); the adapter modules become children of those
modules (:mod:`adapterkern.integrations.slots`), so the backbone's own state-dict keys do not change
and ``model.to(...)`` moves the adapters with it.
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

from torch import Tensor, nn

from ..nn.prefix import PrefixTuning
from .placement import AdapterConfig, build_adapters, find_places, module_width
from .prefix_attention import disable_prefix_attention, enable_prefix_attention, prefix_attention_enabled
from .slots import (
    PREFIX, AdapterSlot, Place, SlotConfig, adapter_configs, attach, check_adapter_name, check_model, check_new_name,
    check_places, config_class, detach, iter_slots, model_type, require_adapter, slot_of,
)

__all__ = [
    "AdapterConfig",  # defined in .placement
    "AdapterSlot",  # defined in .slots
    "AdapterSummary",
    "adapter_modules",
    "adapter_state_dict",
    "adapter_summary",
    "add_adapter",
    "delete_adapter",
    "get_active_adapter",
    "get_adapter_config",
    "list_adapters",
    "load_adapter",
    "save_adapter",
    "set_active_adapter",
    "train_adapter",
]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "adapterkern.adapter/1"
_ACTIVE = "_adapterkern_active"  # model.__dict__ key: the name set_active_adapter made active


def list_adapters(model: nn.Module) -> List[str]:
    """The names of the adapters (and fusions) added to ``model``, in the order they were added."""
    return list(adapter_configs(model))


def get_adapter_config(model: nn.Module, name: str) -> SlotConfig:
    """The config ``name`` was added with: an AdapterConfig, or a FusionConfig for a fusion."""
    require_adapter(model, name)
    return adapter_configs(model)[name]


def _insert(model: nn.Module, name: str, config: SlotConfig, places: Sequence[Place], modules: Sequence[nn.Module]) -> None:
    """:func:`~.slots.attach`, with the prefix attention switched on first where there are PREFIX
    places. Both check everything before they change the model, the places first."""
    check_places(places)
    if any(place.mode == PREFIX for place in places):
        enable_prefix_attention(model)  # the attention modules read their slots; idempotent
    attach(model, name, config, places, modules)


def add_adapter(model: nn.Module, name: str, config: Optional[AdapterConfig] = None, *, set_active: bool = True) -> None:
    """Insert a fresh adapter called ``name`` into ``model`` (a Hugging Face transformers model or any
    module with the same layout), at the places ``config`` names (default: :meth:`AdapterConfig.pfeiffer`).

    The adapters take the dtype and device of the module they sit on. With ``set_active`` (default)
    the new adapter becomes the active one. Several adapters may be added; one is active at a time.
    """
    check_new_name(model, name)
    if config is None:
        config = AdapterConfig.pfeiffer()
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config: expected an adapterkern.AdapterConfig, got {type(config).__name__}")
    places = find_places(model, config)
    _insert(model, name, config, places, build_adapters(model, config, places))
    if set_active:
        set_active_adapter(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter (or fusion) ``name``; places left with no adapter get their hooks removed."""
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
    check_model(model)
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
        # prefixes: the collapsed (H_kv, l, hd) tensors, not the shared MLP
        state = adapter.collapsed_state_dict() if isinstance(adapter, PrefixTuning) else adapter.state_dict()
        for key, value in state.items():
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
    """Freeze every parameter of ``model`` but adapter ``name``'s (and those of ``train_modules``,
    module names such as ``"classifier"`` matched against the end of qualified names, e.g. a task
    head), make ``name`` active, and return the :class:`AdapterSummary`."""
    require_adapter(model, name)
    if isinstance(train_modules, str):
        train_modules = (train_modules,)
    heads = []
    for pattern in train_modules:
        found = [m for n, m in model.named_modules() if n and (n == pattern or n.endswith("." + pattern))]
        if not found:
            top = [n for n, _ in model.named_children()]
            raise ValueError(f"train_modules: no module named {pattern!r} in this model (its top-level modules: {top})")
        heads += found
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(adapter_modules(model, name).values()) + heads:
        for p in module.parameters():
            p.requires_grad_(True)
    set_active_adapter(model, name)
    return adapter_summary(model)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file next to ``path`` and rename it over ``path``: a reader sees the old
    file or the new one, never part of one."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_adapter(model: nn.Module, name: str, directory: Union[str, Path]) -> Path:
    """Write adapter ``name`` to ``directory``: ``adapter_model.safetensors`` (its tensors only) and
    ``adapter_config.json`` (kind, config, places, dtypes, file size and SHA-256 of the weights), each
    file written atomically. Returns the directory."""
    from safetensors.torch import save as save_safetensors

    require_adapter(model, name)
    config = adapter_configs(model)[name]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    blob = save_safetensors(tensors, metadata={"format": FORMAT, "name": name})
    places = [{"module": place, "mode": slot.mode, "hidden_size": slot.hidden_size} for place, _, slot in iter_slots(model) if name in slot]
    meta = {
        "format": FORMAT,
        "name": name,
        "kind": config.kind,
        "model_type": model_type(model),
        "config": config.to_dict(),
        "places": places,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        "num_parameters": sum(v.numel() for v in tensors.values()),
        "weights_bytes": len(blob),
        "weights_sha256": hashlib.sha256(blob).hexdigest(),
    }
    _write_atomically(directory / WEIGHTS_NAME, blob)
    _write_atomically(directory / CONFIG_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return directory


def _load_error(directory: Path, why: str) -> ValueError:
    return ValueError(f"load_adapter: {directory} {why}; the model was not changed")


def load_adapter(model: nn.Module, directory: Union[str, Path], name: Optional[str] = None, *, set_active: bool = True) -> str:
    """Load an adapter written by :func:`save_adapter` into ``model`` (under ``name``, default the saved
    name) and return its name. Everything is checked before the model is touched: the files' integrity
    (size and SHA-256), the places (they must exist in this model), tensor names, shapes and dtypes.
    On any mismatch a ``ValueError`` says what, and the model is left unchanged."""
    from safetensors import SafetensorError
    from safetensors.torch import load as load_safetensors

    check_model(model)
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise _load_error(directory, f"has no {path.name}")
    try:
        meta = json.loads(config_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _load_error(directory, f"has a corrupt {CONFIG_NAME} ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _load_error(directory, f"{CONFIG_NAME} is not an adapterkern adapter (format {FORMAT!r} expected)")
    blob = weights_path.read_bytes()
    if len(blob) != meta.get("weights_bytes") or hashlib.sha256(blob).hexdigest() != meta.get("weights_sha256"):
        raise _load_error(directory, f"{WEIGHTS_NAME} does not match the size and SHA-256 in {CONFIG_NAME} (corrupt or replaced)")
    try:
        tensors = load_safetensors(blob)
        # "kind" is optional in format /1: a file without it holds an adapter
        config = config_class(meta.get("kind", "adapter")).from_dict(meta["config"])
        places_meta = meta["places"]
        expected = meta["tensors"]
        name = meta["name"] if name is None else name
    except (SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise _load_error(directory, f"is corrupt or incomplete ({type(exc).__name__}: {exc})") from None
    check_adapter_name(name)
    if name in adapter_configs(model):
        raise _load_error(directory, f"holds adapter {name!r}, which this model already has (pass name=...)")
    if set(tensors) != set(expected):
        raise _load_error(directory, f"has tensors {sorted(set(tensors) ^ set(expected))[:4]} not matching its config")
    for key, t in tensors.items():
        if list(t.shape) != expected[key]["shape"] or str(t.dtype).replace("torch.", "") != expected[key]["dtype"]:
            raise _load_error(directory, f"tensor {key!r} has shape {tuple(t.shape)}, dtype {t.dtype}, not what its config says")
        if not t.is_floating_point():
            raise _load_error(directory, f"tensor {key!r} has dtype {t.dtype}; adapter tensors are floating point")

    modules = dict(model.named_modules())
    places = []
    for p in places_meta:
        module = modules.get(p["module"])
        if module is None:
            raise _load_error(directory, f"puts an adapter on {p['module']!r}, which this {model_type(model)} model does not have")
        width = module_width(module, model, p["mode"])
        if width != p["hidden_size"]:
            raise _load_error(directory, f"was saved for hidden size {p['hidden_size']} at {p['module']!r}; this model has {width}")
        slot = slot_of(module)
        if slot is not None and slot.mode != p["mode"]:
            raise _load_error(directory, f"puts a {p['mode']} adapter on {p['module']!r}, which holds {slot.mode} adapters")
        if config.requires and (slot is None or not all(a in slot for a in config.requires)):
            raise _load_error(
                directory, f"is a {config.kind} of {list(config.requires)}; add or load those adapters first (missing at {p['module']!r})"
            )
        places.append(Place(p["module"], module, p["mode"], p["hidden_size"]))
    adapters = config.build_for_load(model, places)
    for place, adapter in zip(places, adapters):
        own = adapter.state_dict()
        theirs = {k[len(place.name) + 1 :]: v for k, v in tensors.items() if k.startswith(place.name + ".") and k[len(place.name) + 1 :] in own}
        if set(theirs) != set(own):
            raise _load_error(directory, f"lacks tensors {sorted(set(own) - set(theirs))} of the adapter at {place.name!r}")
        for key, value in theirs.items():
            if value.shape != own[key].shape:
                raise _load_error(directory, f"tensor '{place.name}.{key}' has shape {tuple(value.shape)}, expected {tuple(own[key].shape)}")
        adapter.load_state_dict({k: v.to(own[k].dtype) for k, v in theirs.items()})
    used = sum(len(a.state_dict()) for a in adapters)
    if used != len(tensors):
        raise _load_error(directory, "has tensors that belong to no place")
    _insert(model, name, config, places, adapters)
    if set_active:
        set_active_adapter(model, name)
    return name
