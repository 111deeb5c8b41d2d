"""Several adapters of an :func:`~adapterkern.add_adapter` model at once: AdapterFusion over named
adapters, per-sequence routing (multi-task serving and training in one batch), AdapterDrop (static,
stochastic, and the N-task form that runs the lower layers once), in one launch per place.

::

    add_fusion(model, "fused", ["sst", "mnli", "qqp"], "dynamic")   # active; train_adapter(model, "fused")
                                                                    # trains the fusion only (stage 2)
    with route_adapters(model, ["sst", "mnli", "qqp"], adapter_index):   # (B,) or (B, L); -1: none
        out = model(**batch)                      # each sequence through its own adapter

    set_adapter_drop(model, 5)                    # no adapters in layers 0-4
    out = multi_task_forward(model, ["a", "b"], drop_layers=5, input_ids=ids)   # batch N*B, task-major

A composition is a callable stored in each place's ``AdapterSlot.active``; it receives
``(slot, x, residual)`` and returns ``residual + adapter(x)`` for its tokens.

Routing belongs to the call: :func:`route_adapters` and :func:`multi_task_forward` do not write
to the model; they override what its slots apply for the running thread and block only
(:func:`~adapterkern.integrations.slots.overriding_slots`). Two threads may route one model at once,
and a block nested in another gives the outer one's routing back exactly when it ends.
AdapterDrop (:func:`set_adapter_drop`) is a setting of the model, kept for places added later.
"""
from __future__ import annotations

import contextlib
import contextvars
import random
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from ..functional import bottleneck_adapter_batched, token_groups
from ..nn.bottleneck import BottleneckAdapter, layout, stack_adapters
from ..routing import check_index_range
from ..nn.fusion import AdapterFusion, fuse_adapters, resolve_fusion_config
from .placement import AdapterConfig
from .slots import (
    PREFIX, RENORM, SEQUENTIAL, AdapterSlot, Place, SlotConfig, SlotOverride, adapter_configs, attach, check_model, check_new_name,
    check_not_optimized, iter_slots, overriding_slots, reference_param, require_adapter, set_drop_layers,
)
from .transformers import set_active_adapter


# ---------------------------------------------------------------------------------------------
# AdapterFusion (Pfeiffer et al. 2021) over named adapters
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Fuse:
    """Composition: the fusion ``name`` over ``adapters`` (their outputs from one multi_adapter launch).
    Equal when name and adapters are, so that the slots holding a fusion can be found by value."""

    name: str
    adapters: Tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "adapters", tuple(self.adapters))

    def __call__(self, slot: AdapterSlot, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        return fuse_adapters(x, [slot[n] for n in self.adapters], slot[self.name], residual=residual)

    def __repr__(self) -> str:
        return f"Fuse({self.name!r}, {list(self.adapters)})"


@dataclass
class FusionConfig(SlotConfig, kind="fusion"):
    """A fusion in an add_adapter model: which adapters it mixes and the fusion layer's config
    (the ``adapters`` library's fields, see :func:`adapterkern.nn.fusion.resolve_fusion_config`)."""

    adapters: Tuple[str, ...]
    fusion: dict

    @property
    def requires(self) -> Tuple[str, ...]:
        return self.adapters

    def composition(self, name: str) -> Fuse:
        return Fuse(name, self.adapters)

    def places_in(self, model: nn.Module) -> List[Place]:
        """Every sequential (Pfeiffer / Houlsby, also after the norm: RENORM) place of ``model`` that
        holds all the adapters mixed."""
        places = [
            Place(n, m, slot.mode, slot.hidden_size)
            for n, m, slot in iter_slots(model)
            if slot.mode in (SEQUENTIAL, RENORM) and all(a in slot for a in self.adapters)
        ]
        if not places:
            raise ValueError(f"adapters: no sequential (pfeiffer/houlsby) place holds all of {list(self.adapters)}; fusion needs them")
        return places

    def build_for_load(self, model: nn.Module, places: Sequence[Place], *, device=None) -> List[AdapterFusion]:
        """One fresh AdapterFusion of width ``place.hidden_size`` per place, with the dtype and device of
        the module it sits on, or ``device`` (a fresh fusion and a loaded one have the same form)."""
        layers = []
        for place in places:
            ref = reference_param(place.module, model)
            layers.append(AdapterFusion(place.hidden_size, len(self.adapters), dict(self.fusion),
                                        device=ref.device if device is None else device, dtype=ref.dtype))
        return layers

    def to_dict(self) -> dict:
        return {"adapters": list(self.adapters), "fusion": dict(self.fusion)}

    @classmethod
    def from_dict(cls, data: dict) -> "FusionConfig":
        if not isinstance(data, dict) or set(data) != {"adapters", "fusion"}:
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"config: expected a fusion config with fields adapters, fusion; got {got}")
        adapters, fusion = data["adapters"], data["fusion"]
        if not isinstance(adapters, (list, tuple)) or not adapters or not all(isinstance(a, str) for a in adapters):
            raise ValueError(f"config: adapters: expected a non-empty list of adapter names, got {type(adapters).__name__}")
        if not isinstance(fusion, (str, dict)):
            raise ValueError(f"config: fusion: expected a fusion config name or dict, got {type(fusion).__name__}")
        return cls(tuple(adapters), resolve_fusion_config(fusion))


def add_fusion(model: nn.Module, name: str, adapters: Sequence[str], config="dynamic", *, set_active: bool = True) -> None:
    """Add an AdapterFusion layer called ``name`` over the named adapters at every sequential place
    (Pfeiffer / Houlsby placements) that holds all of them. With ``set_active`` it becomes the active
    setup: each place computes the N adapters in one launch and mixes them with its fusion layer.
    Stage 2 of the paper's training: ``train_adapter(model, name)`` trains the fusion layers only.
    ``config``: ``"dynamic"``, ``"static"`` or a dict of the ``adapters`` library's fusion fields.
    Save and load it like an adapter (the named adapters must be in the model first)."""
    check_not_optimized(model, "add_fusion")
    check_new_name(model, name)
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise TypeError(f"adapters: expected a non-empty list of adapter names, got {adapters!r}")
    for a in adapters:
        require_adapter(model, a)
        if not isinstance(adapter_configs(model)[a], AdapterConfig):
            raise ValueError(f"adapters: {a!r} is a {adapter_configs(model)[a].kind}; a fusion mixes adapters")
    spec = FusionConfig(tuple(adapters), resolve_fusion_config(config))
    places = spec.places_in(model)
    attach(model, name, spec, places, spec.build_for_load(model, places))
    if set_active:
        set_active_adapter(model, name)


def _stack_adapters(adapters: List[BottleneckAdapter]):
    """(w_down, b_down, w_up, b_up, scaling, activation, backend) of adapters served in one launch."""
    first = adapters[0]
    for a in adapters[1:]:
        if layout(a) != layout(first):
            raise ValueError(
                "route_adapters: adapters served in one launch must share bottleneck size, activation and bias "
                f"layout; got (r, activation, no_bias_down, no_bias_up) {layout(first)} and {layout(a)}"
            )
    return (*stack_adapters(adapters), first.activation, first.backend)


class Route:
    """Composition: token t of the batch goes through adapter ``names[index[t]]`` (-1 or None: none).

    ``index``: (B,) per sequence or (B, L) per token, integer, values in [-1, len(names)). The token
    groups are computed once per (place layout, batch shape) and reused by every place.
    """

    def __init__(self, names: Sequence[Optional[str]], index: Tensor):
        self.names = list(names)
        self.index = index
        # (adapters present at a place, token shape) -> (index into those adapters per token, its groups):
        # built at the first place of each layout, then reused by every layer (no per-layer host copies).
        self._routing: Dict[tuple, tuple] = {}

    def _place_routing(self, present: List[str], x: Tensor):
        key = (tuple(present), tuple(x.shape[:-1]))
        if key not in self._routing:
            index = self.index
            # checked here, at the first place: the batch is known only once the model runs
            if index.dim() == 1 and (x.dim() < 2 or x.shape[0] != index.shape[0]):
                raise ValueError(
                    f"adapter_index: has {index.shape[0]} entries (one per sequence), but the batch has "
                    f"{x.shape[0] if x.dim() >= 2 else 'no'} sequences (this place's input is {tuple(x.shape)})"
                )
            if index.dim() == 1:
                index = index.reshape((-1,) + (1,) * (x.dim() - 2)).expand(x.shape[:-1])
            if index.shape != x.shape[:-1]:
                raise ValueError(f"adapter_index: has shape {tuple(self.index.shape)}; this place's input is {tuple(x.shape)}")
            lut = torch.tensor([-1] + [present.index(n) if n in present else -1 for n in self.names], device=x.device)
            local = lut[index.to(device=x.device, dtype=torch.long) + 1]
            self._routing[key] = (local, token_groups(local, len(present)))
        return self._routing[key]

    def __call__(self, slot: AdapterSlot, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        present = [n for n in self.names if n is not None and n in slot]
        if not present:
            return x if residual is None else residual
        local, groups = self._place_routing(present, x)
        w_down, b_down, w_up, b_up, scaling, activation, backend = _stack_adapters([slot[n] for n in present])
        return bottleneck_adapter_batched(
            x, local, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, residual=residual,
            groups=groups, backend=backend,
        )

    def __repr__(self) -> str:
        return f"Route({self.names})"


def _check_names(model: nn.Module, names: Sequence[Optional[str]]) -> List[Optional[str]]:
    check_model(model)
    if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names:
        raise TypeError(f"names: expected a non-empty list of adapter names (None for no adapter), got {names!r}")
    for name in names:
        if name is not None:
            require_adapter(model, name)
    prefixed = sorted({n for _, _, slot in iter_slots(model) if slot.mode == PREFIX for n in names if n in slot})
    if prefixed:
        raise ValueError(f"names: {prefixed} have prefix tuning (mam), which cannot be routed per sequence (yet)")
    return list(names)


_INDEX_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)


def _check_index(adapter_index, count: int) -> None:
    if not isinstance(adapter_index, Tensor) or adapter_index.dtype not in _INDEX_DTYPES or adapter_index.dim() not in (1, 2):
        got = f"a {adapter_index.dtype} tensor of shape {tuple(adapter_index.shape)}" if isinstance(adapter_index, Tensor) else type(adapter_index).__name__
        raise TypeError(f"adapter_index: expected an integer tensor (not bool, float or complex) of shape (B,) or (B, L), got {got}")
    check_index_range(adapter_index, count)


@contextlib.contextmanager
def route_adapters(model: nn.Module, names: Sequence[Optional[str]], adapter_index: Tensor):
    """Within the block, sequence b (or token (b, l)) of every forward goes through adapter
    ``names[adapter_index[b]]`` (index -1, or a None name: no adapter), all adapters of a place in one
    launch (:func:`adapterkern.bottleneck_adapter_batched`). Differentiable: a mixed batch trains
    every routed adapter at once.

    The routing holds for this thread and this block only: the model is not changed (its active
    adapter and AdapterDrop setting stay as they are), other threads run it as they would without the
    block, and a nested block's routing ends with it. A (B,) index whose length is not the batch
    size is a ValueError at the first adapter place of the forward."""
    check_not_optimized(model, "route_adapters")
    names = _check_names(model, names)
    _check_index(adapter_index, len(names))
    route = Route(names, adapter_index)
    with overriding_slots({slot: SlotOverride(route) for _, _, slot in iter_slots(model)}):
        yield route


# ---------------------------------------------------------------------------------------------
# AdapterDrop (Rücklé et al. 2021)
# ---------------------------------------------------------------------------------------------


def set_adapter_drop(model: nn.Module, num_layers: int) -> None:
    """Switch off every adapter place in layers ``0 .. num_layers - 1`` (0: none dropped). Places
    without a layer index are never dropped. Unlike ``AdapterConfig(leave_out=...)`` this keeps the
    adapters' weights and can change between forwards. It is a setting of the model: places added
    later (``add_adapter``, ``load_adapter``, ``add_fusion``) follow it too."""
    check_not_optimized(model, "set_adapter_drop")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
        raise ValueError(f"num_layers: expected an int >= 0, got {num_layers!r}")
    set_drop_layers(model, num_layers)


class StochasticAdapterDrop:
    """Training-time AdapterDrop: each :meth:`step` drops the adapters of the lowest k layers, k drawn
    uniformly from ``0 .. max_layers`` (default: the model's number of adapter layers - 1), so one
    trained adapter serves every k at inference. Reproducible: its own ``random.Random(seed)``.

    Call :meth:`step` before each training forward; :meth:`disable` (or ``set_adapter_drop(model, 0)``)
    for evaluation.
    """

    def __init__(self, model: nn.Module, max_layers: Optional[int] = None, seed: int = 0):
        check_model(model)
        layers = sorted({slot.layer for _, _, slot in iter_slots(model) if slot.layer is not None})
        if not layers:
            raise ValueError("model: has no adapter places with a layer index")
        self.model = model
        self.max_layers = layers[-1] if max_layers is None else max_layers
        if isinstance(self.max_layers, bool) or not isinstance(self.max_layers, int) or self.max_layers < 0:
            raise ValueError(f"max_layers: expected an int >= 0, got {max_layers!r}")
        self.rng = random.Random(seed)
        self.current = 0

    def step(self) -> int:
        self.current = self.rng.randint(0, self.max_layers)
        set_adapter_drop(self.model, self.current)
        return self.current

    def disable(self) -> None:
        self.current = 0
        set_adapter_drop(self.model, 0)


def _layer_modules(model: nn.Module) -> Dict[int, nn.Module]:
    """Layer index -> the transformer layer module holding that layer's adapter places."""
    out: Dict[int, nn.Module] = {}
    modules = dict(model.named_modules())
    for name, _, slot in iter_slots(model):
        if slot.layer is None:
            continue
        parts = name.split(".")
        cut = max(i for i, p in enumerate(parts) if p == str(slot.layer))
        out.setdefault(slot.layer, modules[".".join(parts[: cut + 1])])
    return out


def _expand_batch(value, batch: int, tasks: int):
    """Tile every tensor of batch size ``batch`` (2-D or more) ``tasks`` times along dim 0 (task-major)."""
    if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == batch:
        return value.repeat((tasks,) + (1,) * (value.dim() - 1))
    if isinstance(value, tuple):
        return tuple(_expand_batch(v, batch, tasks) for v in value)
    return value


# The multi_task_forward calls running in this thread / task: their tiling hooks act for these only.
_TILING_CALLS: contextvars.ContextVar[frozenset] = contextvars.ContextVar("adapterkern_tiling_calls", default=frozenset())


def multi_task_forward(model: nn.Module, names: Sequence[Optional[str]], drop_layers: int = 0, **inputs):
    """Run ``model(**inputs)`` for N task adapters at once with AdapterDrop's sharing: the layers below
    ``drop_layers`` (which get no adapters) run once on the batch of B; from layer ``drop_layers`` on the
    batch is tiled to N * B (task-major: rows ``i*B .. (i+1)*B - 1`` are task ``names[i]``) and every
    place serves the N adapters in one launch. Returns the model's output for the N * B batch.

    ``drop_layers=0`` is plain multi-task inference (the embeddings still run once). The routing and
    the drop hold for this call only (the model's own AdapterDrop setting is not used or changed):
    other threads running the model meanwhile are not affected.
    """
    check_not_optimized(model, "multi_task_forward")
    names = _check_names(model, names)
    layers = _layer_modules(model)
    if not layers:
        raise ValueError("model: has no adapter places with a layer index")
    if isinstance(drop_layers, bool) or not isinstance(drop_layers, int) or not 0 <= drop_layers <= max(layers):
        raise ValueError(f"drop_layers: expected an int in [0, {max(layers)}], got {drop_layers!r}")
    call = object()  # this call, as its tiling hooks know it
    route = Route(names, torch.empty(0, dtype=torch.long))
    state = {}

    def expand(module, args, kwargs=None):
        # Hooks are shared by every thread running the model: another thread's forward (or one that
        # snapshotted the hooks as this call removed them, so without kwargs) passes through untouched.
        if kwargs is None or call not in _TILING_CALLS.get():
            return None
        batch = state.get("batch")
        if batch is None:
            first = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
            batch = state["batch"] = first.shape[0]
            route.index = torch.arange(len(names), device=first.device).repeat_interleave(batch)
        return tuple(_expand_batch(a, batch, len(names)) for a in args), {k: _expand_batch(v, batch, len(names)) for k, v in kwargs.items()}

    overrides = {
        slot: SlotOverride(route, dropped=slot.layer is not None and slot.layer < drop_layers) for _, _, slot in iter_slots(model)
    }
    later = [m for i, m in layers.items() if i >= drop_layers]
    handles = []
    token = _TILING_CALLS.set(_TILING_CALLS.get() | {call})
    try:
        with overriding_slots(overrides):
            for m in later:
                handles.append(m.register_forward_pre_hook(expand, with_kwargs=True))
            return model(**inputs)
    finally:
        for h in handles:
            h.remove()
        _TILING_CALLS.reset(token)
