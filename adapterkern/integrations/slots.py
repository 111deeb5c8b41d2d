"""Adapter slots: where the adapters of an :func:`~adapterkern.add_adapter` model live, and the
model's record of what each adapter name is.

A *place* is a module of the model that holds adapters. Its child ``bottleneck_adapters``
(:data:`SLOT_ATTR`) is an :class:`AdapterSlot`, one module per adapter name, and one forward hook on
the place applies the slot's active entry. How it is applied is the place's *mode*:

===============  =================================================================================
SEQUENTIAL       ``output -> adapter(output)``
PARALLEL         ``output -> adapter(input, residual=output)``
PARALLEL_SKIP    ``forward(h, skip) -> forward(h, adapter(skip))``: a post-LN module that adds the skip
PREFIX           an attention module: key/value prefixes, read by the prefix attention (no hook)
RENORM           a post-LN norm module ``norm(t)``: ``norm(t + adapter(norm(t)))``, the adapter reading the
                 normalised output with t as its residual, then the same norm again (the ``adapters``
                 library's ``original_ln_before``, its ``seq_bn`` in BERT-style models)
===============  =================================================================================

Every name in a model has a config of one *kind*: a subclass of :class:`SlotConfig`, entered in
:data:`CONFIG_KINDS` under the kind it names (``adapter``: :class:`~adapterkern.AdapterConfig`,
``fusion``: :class:`~adapterkern.integrations.compose.FusionConfig`; ``import adapterkern`` imports
both modules). Saving, loading, activating and deleting go through the methods the base class
declares, whatever the kind. The record (name -> config, in the order added) is kept in
``model.__dict__``: not a submodule, not in the state dict, copied with the model.

Per-call state. What a slot applies is its own ``active`` / ``dropped``, unless the running call
overrides them (:func:`overriding_slots`: routing, multi-task forwards). Overrides live in a context
variable, so they belong to the thread (or asyncio task) that set them and to the block that set
them: two threads routing one model do not see each other's routing, and leaving a nested block
gives back exactly the overrides the outer block had. Threads started *inside* a forward (e.g.
``nn.DataParallel``'s replicas) do not inherit them.
"""
from __future__ import annotations

import abc
import contextlib
import contextvars
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Type, Union

from torch import Tensor, nn

SLOT_ATTR = "bottleneck_adapters"

SEQUENTIAL = "sequential"
PARALLEL = "parallel"
PARALLEL_SKIP = "parallel_skip"
PREFIX = "prefix"
RENORM = "renorm"
MODES = (SEQUENTIAL, PARALLEL, PARALLEL_SKIP, PREFIX, RENORM)

_RECORD = "_adapterkern_configs"  # model.__dict__ key: {name: SlotConfig}
_DROP = "_adapterkern_drop_layers"  # model.__dict__ key: AdapterDrop's number of dropped layers
# model.__dict__ key: optimize_for_inference's record (adapterkern.integrations.inference), while the
# model is optimised; every slot of such a model has the same key in its __dict__ (value True)
OPTIMIZED_KEY = "_adapterkern_inference"

# kind name -> config class; filled by SlotConfig subclasses as they are defined
CONFIG_KINDS: Dict[str, Type["SlotConfig"]] = {}


@dataclass
class Place:
    """A module of a model that holds, or is to hold, adapters."""

    name: str  # qualified module name
    module: nn.Module
    mode: str
    hidden_size: int  # d of the (..., d) tensor the adapters there transform


class SlotConfig(abc.ABC):
    """What an adapter name of a model is: the base class of every config kind.

    A subclass names its kind in its class statement, ``class FusionConfig(SlotConfig, kind="fusion")``,
    and is entered in :data:`CONFIG_KINDS` under it. ``save_adapter`` writes ``kind`` and
    :meth:`to_dict`; ``load_adapter`` finds the class with :func:`config_class`.
    """

    kind: ClassVar[str]

    def __init_subclass__(cls, *, kind: str, **kwargs):
        super().__init_subclass__(**kwargs)
        taken = CONFIG_KINDS.get(kind)
        # the same class defined again (a module reload) takes its entry over; another class may not
        if taken is not None and (taken.__module__, taken.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"kind: {kind!r} is already the kind of {taken.__module__}.{taken.__qualname__}")
        cls.kind = kind
        CONFIG_KINDS[kind] = cls

    @property
    def requires(self) -> Tuple[str, ...]:
        """Names of the adapters this entry works on (a fusion: those it mixes). They must be in every
        slot that holds this entry, and cannot be deleted while it is there."""
        return ()

    def composition(self, name: str) -> Union[str, Callable]:
        """What :attr:`AdapterSlot.active` holds while this entry, called ``name``, is the model's active
        adapter: ``name`` itself (the slot applies ``slot[name]``) or a composition
        ``(slot, x, residual) -> y``."""
        return name

    @abc.abstractmethod
    def places_in(self, model: nn.Module) -> List[Place]:
        """The places an entry of this config goes on in ``model``, in model order, with their modes
        and widths; ``ValueError`` if it cannot go there. ``load_adapter`` accepts a saved place only
        if it is one of these, with the same mode and width."""

    @abc.abstractmethod
    def build_for_load(self, model: nn.Module, places: Sequence[Place], *, device=None) -> List[nn.Module]:
        """One fresh module per place (width ``place.hidden_size``; dtype and device of the module it
        sits on, or ``device`` if given) in the form ``save_adapter`` writes, for ``load_adapter`` to
        fill with the saved tensors. ``device="meta"`` builds the shapes without allocating them."""

    @abc.abstractmethod
    def to_dict(self) -> dict:
        """The config as JSON-serialisable fields, the inverse of :meth:`from_dict`."""

    @classmethod
    @abc.abstractmethod
    def from_dict(cls, data: dict) -> "SlotConfig":
        """The config from :meth:`to_dict`'s fields; ``ValueError`` / ``TypeError`` for bad ones."""


def config_class(kind) -> Type[SlotConfig]:
    """The config class of ``kind`` (the ``"kind"`` field of a saved adapter); ValueError if there is none."""
    if not isinstance(kind, str) or kind not in CONFIG_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(sorted(CONFIG_KINDS))}, got {kind!r}")
    return CONFIG_KINDS[kind]


@dataclass(frozen=True)
class SlotOverride:
    """What a slot applies during one call instead of its own ``active`` / ``dropped``.
    ``dropped`` None: the slot's own (AdapterDrop as set on the model)."""

    active: Union[None, str, Callable]
    dropped: Optional[bool] = None


# slot -> its override in the running call; replaced, never mutated (a block restores the mapping it found)
_OVERRIDES: contextvars.ContextVar[Mapping["AdapterSlot", SlotOverride]] = contextvars.ContextVar(
    "adapterkern_slot_overrides", default=MappingProxyType({})
)


@contextlib.contextmanager
def overriding_slots(overrides: Mapping["AdapterSlot", SlotOverride]):
    """Within the block, and in this thread / task only, each slot of ``overrides`` applies its
    override. Nested blocks stack; leaving one restores exactly the overrides in force before it."""
    token = _OVERRIDES.set(MappingProxyType({**_OVERRIDES.get(), **overrides}))
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


class AdapterSlot(nn.ModuleDict):
    """The adapters at one place of a model, by name.

    ``mode``: how the place applies its active entry (SEQUENTIAL, PARALLEL, PARALLEL_SKIP or PREFIX).
    ``hidden_size``: d of the (..., d) tensor transformed there. ``active``: None, the name of the
    entry applied, or a composition (a callable ``(slot, x, residual) -> y``, e.g. per-token routing
    over several adapters or a fusion; see :mod:`adapterkern.integrations.compose`). ``layer``: the
    place's layer index (None if it has none); ``dropped``: True while AdapterDrop switches this place off.
    A running call may override ``active`` and ``dropped`` (:meth:`current`).
    """

    def __init__(self, mode: str, hidden_size: int, layer: Optional[int] = None):
        super().__init__()
        self.mode = mode
        self.hidden_size = hidden_size
        self.layer = layer
        self.active = None
        self.dropped = False

    def current(self) -> Tuple[Union[None, str, Callable], bool]:
        """``(active, dropped)`` for the running call: its override where it has one, else the slot's own."""
        override = _OVERRIDES.get().get(self)
        if override is None:
            return self.active, self.dropped
        return override.active, self.dropped if override.dropped is None else override.dropped

    def apply(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """The active adapter (or composition) of the running call on x: ``residual + adapter(x)`` (residual None: x)."""
        active, _ = self.current()
        if isinstance(active, str):
            return self[active](x, residual=residual)
        return active(self, x, residual)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, layer={self.layer}, active={self.active!r}"


# Names an entry cannot have: AdapterSlot's own attributes (ModuleDict refuses them, after the slot exists).
_SLOT_PROTOTYPE = AdapterSlot(SEQUENTIAL, 1)


def slot_of(module: nn.Module) -> Optional[AdapterSlot]:
    """``module``'s AdapterSlot, or None if it holds no adapters."""
    slot = module.__dict__.get("_modules", {}).get(SLOT_ATTR)
    return slot if isinstance(slot, AdapterSlot) else None


def iter_slots(model: nn.Module) -> Iterator[Tuple[str, nn.Module, AdapterSlot]]:
    """(qualified module name, module, its slot) of every place of ``model``, in model order."""
    for name, module in model.named_modules():
        slot = slot_of(module)
        if slot is not None:
            yield name, module, slot


def _skip_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """PARALLEL_SKIP: replace the module's skip input (its 2nd argument) by ``skip + adapter(skip)``."""
    slot = slot_of(module)
    active, dropped = slot.current()
    if active is None or dropped:
        return None
    if len(args) >= 2:
        return args[:1] + (slot.apply(args[1]),) + args[2:], kwargs
    if "input_tensor" in kwargs:
        return args, {**kwargs, "input_tensor": slot.apply(kwargs["input_tensor"])}
    raise TypeError(f"{type(module).__name__}: a parallel adapter expects the skip input as the 2nd argument")


def _output_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """SEQUENTIAL: ``adapter(output)``; PARALLEL: ``adapter(input, residual=output)``; RENORM:
    ``module.forward(adapter(output, residual=input))`` (forward, not the call: no second hook)."""
    slot = slot_of(module)
    active, dropped = slot.current()
    if active is None or dropped:
        return None
    rest = ()
    if isinstance(output, tuple):
        output, rest = output[0], output[1:]
    x = None if slot.mode == SEQUENTIAL else (args[0] if args else next(iter(kwargs.values())))
    if slot.mode == SEQUENTIAL:
        output = slot.apply(output)
    elif slot.mode == RENORM:
        output = module.forward(slot.apply(output, residual=x))
    else:
        output = slot.apply(x, residual=output)
    return (output,) + rest if rest else output


def is_slot_hook(hook) -> bool:
    """Whether ``hook`` (an entry of a module's forward (pre-)hook dict) is one a slot put there."""
    return hook is _skip_pre_hook or hook is _output_hook


def _remove_hooks(module: nn.Module) -> None:
    # Found by identity rather than kept handles, so that a deep copy of the model cleans up its own hooks.
    for hooks, fn in ((module._forward_pre_hooks, _skip_pre_hook), (module._forward_hooks, _output_hook)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs"):
                getattr(module, extra, {}).pop(key, None)


def layer_index(module_name: str) -> Optional[int]:
    """The layer index in a qualified module name (its last numeric part), None if it has none."""
    numbers = [int(p) for p in module_name.split(".") if p.isdigit()]
    return numbers[-1] if numbers else None


def model_type(model: nn.Module) -> str:
    """The model family for messages: ``config.model_type`` of a transformers model, else the class name."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def reference_param(module: nn.Module, model: nn.Module) -> Tensor:
    """A parameter of ``module`` (else of ``model``): the dtype and device for adapters put there."""
    for p in module.parameters():
        return p
    for p in model.parameters():
        return p
    raise ValueError("model: has no parameters to take a dtype and device from")


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def routed_slots() -> Mapping["AdapterSlot", "SlotOverride"]:
    """The slots a routing block of this call / thread overrides (read-only)."""
    return _OVERRIDES.get()


def check_not_optimized(model: nn.Module, what: str) -> None:
    """RuntimeError if ``model`` (or a module with adapter slots of one) is optimised for inference:
    its merged layers would go on serving the adapter set-up they were built from."""
    check_model(model)
    if OPTIMIZED_KEY in model.__dict__ or any(OPTIMIZED_KEY in slot.__dict__ for _, _, slot in iter_slots(model)):
        raise RuntimeError(
            f"{what}: this model is optimised for inference (adapterkern.optimize_for_inference); "
            f"call adapterkern.undo_inference_optimization(model) first"
        )


def check_adapter_name(name) -> None:
    """ValueError unless ``name`` can name an entry of a slot: ASCII letters, digits, ``_`` and ``-``,
    not starting with a digit or ``-``, and not an attribute of :class:`AdapterSlot` (``keys``,
    ``training``, ``forward``, ``mode``, ...), which ``nn.ModuleDict`` cannot hold as a key."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ValueError(f"name: expected an identifier-like string (letters, digits, _ and -), got {name!r}")
    if hasattr(_SLOT_PROTOTYPE, name):
        raise ValueError(f"name: {name!r} is an attribute of the adapter slots (nn.ModuleDict / AdapterSlot); pick another name")


def _record(model: nn.Module) -> Dict[str, SlotConfig]:
    """The record, for reading: an empty one is not stored (a refused call leaves ``model.__dict__`` as it was)."""
    return model.__dict__.get(_RECORD, {})


def adapter_configs(model: nn.Module) -> Mapping[str, SlotConfig]:
    """Read-only view of ``model``'s record: name -> config of every adapter and fusion, in the order
    added. Only :func:`attach` and :func:`detach` change it."""
    check_model(model)
    return MappingProxyType(_record(model))


def check_new_name(model: nn.Module, name) -> None:
    """ValueError unless ``name`` is a valid adapter name that ``model`` does not use yet."""
    check_model(model)
    check_adapter_name(name)
    if name in _record(model):
        raise ValueError(f"name: this model already has an adapter or fusion {name!r}; delete_adapter() it first or pick another name")


def require_adapter(model: nn.Module, name) -> None:
    """ValueError unless ``model`` has an adapter (or fusion) ``name``."""
    check_model(model)
    if not isinstance(name, str) or name not in _record(model):
        have = list(_record(model))
        raise ValueError(f"name: no adapter {name!r} in this model (it has {have if have else 'none'})")


def drop_layers(model: nn.Module) -> int:
    """AdapterDrop's setting of ``model``: places in layers below it apply no adapter (0: none dropped)."""
    check_model(model)
    return model.__dict__.get(_DROP, 0)


def _is_dropped(layer: Optional[int], num_layers: int) -> bool:
    return layer is not None and layer < num_layers


def set_drop_layers(model: nn.Module, num_layers: int) -> None:
    """Record AdapterDrop's setting on ``model`` and apply it to every slot; :func:`attach` applies it
    to slots created later. ``num_layers`` is checked by the caller."""
    check_model(model)
    model.__dict__[_DROP] = num_layers
    for _, _, slot in iter_slots(model):
        slot.dropped = _is_dropped(slot.layer, num_layers)


def check_places(places: Sequence[Place]) -> None:
    """ValueError if a place already holds adapters of another mode, or holds a non-slot child
    called ``bottleneck_adapters``."""
    for place in places:
        slot = slot_of(place.module)
        if slot is not None and slot.mode != place.mode:
            raise ValueError(f"{place.name}: already holds {slot.mode} adapters; cannot add a {place.mode} one there")
        if slot is None and hasattr(place.module, SLOT_ATTR):
            raise ValueError(f"{place.name}: has an attribute {SLOT_ATTR!r} that is not an adapterkern AdapterSlot")


def attach(model: nn.Module, name: str, config: SlotConfig, places: Sequence[Place], modules: Sequence[nn.Module]) -> None:
    """Put ``modules[i]`` into the slot of ``places[i]`` under ``name`` (a slot and its hook are created
    where a place has none; new slots take the model's AdapterDrop setting) and record ``config`` for
    ``name``. All or nothing: everything is checked before the model changes (``name`` must be new,
    :func:`check_new_name`), and if a step fails anyway every change made so far is undone. PREFIX
    slots need the prefix attention switched on by the caller."""
    check_new_name(model, name)
    if not isinstance(config, SlotConfig):
        raise TypeError(f"config: expected a SlotConfig, got {type(config).__name__}")
    if len(places) != len(modules):
        raise ValueError(f"modules: expected one per place ({len(places)}), got {len(modules)}")
    if not all(isinstance(m, nn.Module) for m in modules):
        raise TypeError(f"modules: expected nn.Modules, got {[type(m).__name__ for m in modules]}")
    if len({id(p.module) for p in places}) != len(places):
        raise ValueError(f"places: a module appears twice in {[p.name for p in places]}")
    check_places(places)
    created: List[nn.Module] = []  # place modules given a new slot (and hook)
    filled: List[AdapterSlot] = []
    try:
        for place, module in zip(places, modules):
            slot = slot_of(place.module)
            if slot is None:
                slot = AdapterSlot(place.mode, place.hidden_size, layer_index(place.name))
                slot.dropped = _is_dropped(slot.layer, drop_layers(model))
                place.module.add_module(SLOT_ATTR, slot)
                created.append(place.module)
                if place.mode == PARALLEL_SKIP:
                    place.module.register_forward_pre_hook(_skip_pre_hook, with_kwargs=True)
                elif place.mode != PREFIX:
                    place.module.register_forward_hook(_output_hook, with_kwargs=True)
            slot[name] = module
            filled.append(slot)
        model.__dict__.setdefault(_RECORD, {})[name] = config
    except BaseException:
        for slot in filled:
            if name in slot._modules:
                del slot[name]
        for module in created:
            _remove_hooks(module)
            module._modules.pop(SLOT_ATTR, None)
        raise


def detach(model: nn.Module, name: str) -> None:
    """Take ``name`` out of every slot and out of the record; slots left empty go, with their hooks.
    Slots whose active entry was ``name`` are left with none."""
    require_adapter(model, name)
    entry = _record(model)[name].composition(name)
    for _, module, slot in list(iter_slots(model)):
        if name in slot:
            del slot[name]
            if slot.active == entry:
                slot.active = None
            if len(slot) == 0:
                _remove_hooks(module)
                del module._modules[SLOT_ATTR]
    del _record(model)[name]
