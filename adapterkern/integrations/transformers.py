"""Bottleneck adapters for Hugging Face ``transformers`` models, without the ``adapters`` library.

::

    cfg = AdapterConfig.pfeiffer(reduction_factor=16)
    add_adapter(model, "sentiment", cfg)          # inserted, active, fresh
    train_adapter(model, "sentiment", train_modules=("classifier",))  # everything else frozen
    save_adapter(model, "sentiment", "out/sentiment")   # safetensors + JSON, adapter tensors only
    load_adapter(other_model, "out/sentiment")

Where adapters go. Each adapter sits at a *place*: a module of the model found by its role, to which
one forward hook is attached. The adapter modules become children of that module (attribute
``bottleneck_adapters``, one :class:`~adapterkern.nn.BottleneckAdapter` per adapter name), so the
backbone's own state-dict keys do not change and ``model.to(...)`` moves the adapters with it.

=============  ==========================  =====================  =====================
role           BERT / RoBERTa              GPT-2                  Llama / Mistral / Qwen
=============  ==========================  =====================  =====================
attn_output    ``N.attention.output.dense`` ``N.attn.c_proj``     ``N.self_attn.o_proj``
ffn_output     ``N.output.dense``          ``N.mlp.c_proj``       ``N.mlp.down_proj``
ffn            ``N.output`` (BertOutput)   ``N.mlp``              ``N.mlp``
=============  ==========================  =====================  =====================

Sequential adapters (``pfeiffer``: ffn_output; ``houlsby``: attn_output and ffn_output) transform
the sublayer's output before the model adds its residual (Houlsby et al. 2019):
``h -> h + s * up(act(down(h)))``. The parallel adapter (He et al. 2022) reads the FFN's input x and
adds ``s * up(act(down(x)))`` to the FFN's output, through the fused op's separate-residual form; in
post-LN BERT-style layers, where the FFN's output module also adds the skip and normalises, the
adapter's ``x + s * up(...)`` replaces that module's skip input (``LN(ffn(x) + x + s * up(...))``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..activations import get_activation
from ..backends import check_backend_name
from ..nn.bottleneck import INIT_SCHEMES, BottleneckAdapter

PLACEMENTS = ("pfeiffer", "houlsby", "parallel", "mam")
SLOT_ATTR = "bottleneck_adapters"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
FORMAT = "adapterkern.adapter/1"

# Modes of a place: how the active adapter is applied around the module's forward.
SEQUENTIAL = "sequential"  # output -> adapter(output)
PARALLEL = "parallel"  # output -> adapter(input, residual=output)
PARALLEL_SKIP = "parallel_skip"  # forward(h, skip) -> forward(h, adapter(skip)): post-LN "output + skip"
PREFIX = "prefix"  # an attention module: key/value prefixes, read by the prefix attention (no hook)

# role -> [(regex on the module's qualified name, mode)], first match per model family wins.
_ROLE_PATTERNS: Dict[str, List[Tuple[str, str]]] = {
    "attn_output": [
        (r"\d+\.attention\.output\.dense", SEQUENTIAL),  # BERT, RoBERTa, ELECTRA, XLM-R
        (r"\d+\.attn\.c_proj", SEQUENTIAL),  # GPT-2 (not crossattention.c_proj)
        (r"\d+\.self_attn\.o_proj", SEQUENTIAL),  # Llama, Mistral, Qwen, Gemma
    ],
    "ffn_output": [
        (r"\d+\.output\.dense", SEQUENTIAL),
        (r"\d+\.mlp\.c_proj", SEQUENTIAL),
        (r"\d+\.mlp\.down_proj", SEQUENTIAL),
    ],
    "ffn": [
        (r"\d+\.output", PARALLEL_SKIP),
        (r"\d+\.mlp", PARALLEL),
    ],
}
_PLACEMENT_ROLES = {"pfeiffer": ("ffn_output",), "houlsby": ("attn_output", "ffn_output"), "parallel": ("ffn",), "mam": ("ffn",)}


@dataclass
class AdapterConfig:
    """What an adapter is and where it goes.

    Args:
        placement: ``"pfeiffer"`` (after the FFN output), ``"houlsby"`` (after the attention output and
            the FFN output), ``"parallel"`` (beside the FFN) or ``"mam"`` (the parallel adapter plus
            prefix tuning in every attention layer, He et al. 2022).
        bottleneck_size: r. If None, ``hidden_size // reduction_factor`` (at least 1).
        reduction_factor: d / r when ``bottleneck_size`` is None.
        activation: an ``adapters``-library activation name.
        scaling: a float, ``"learned"`` or ``"channel"``.
        init: ``"bert"``, ``"houlsby"`` or ``"mam_adapter"`` (zero up-projection: a fresh adapter is the identity).
        bias: whether the projections have biases.
        leave_out: layer indices that get no adapter (AdapterDrop's static form).
        target_modules: module names (regexes matched against the end of the qualified name) to use
            instead of the role table; the adapter is applied sequentially on their outputs, or, for
            ``parallel``, as ``module(x) + s * up(act(down(x)))`` (the module must map (..., d) to (..., d)).
        backend: ``auto``, ``torch``, ``triton`` or ``cuda``.
        prefix_length: ``mam`` only: key/value prefix length l per attention layer.
        prefix_bottleneck: ``mam`` only: the reparametrisation MLP's width (one MLP shared by all
            layers, as in the ``adapters`` library); the prefixes are saved collapsed (plain tensors).

    The presets follow the ``adapters`` library's defaults: :meth:`pfeiffer` (r = d/16, relu, scaling 1,
    bert init), :meth:`houlsby` (r = d/16, swish), :meth:`parallel` (r = d/2, relu, scaling 4, mam_adapter init),
    :meth:`mam` (that parallel adapter plus prefixes of length 30 through an MLP of width 800, ``MAMConfig``).
    """

    placement: str = "pfeiffer"
    bottleneck_size: Optional[int] = None
    reduction_factor: float = 16.0
    activation: str = "relu"
    scaling: Union[float, str] = 1.0
    init: str = "bert"
    bias: bool = True
    leave_out: Tuple[int, ...] = ()
    target_modules: Optional[Tuple[str, ...]] = None
    backend: str = "auto"
    prefix_length: int = 30
    prefix_bottleneck: int = 800

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement: expected one of {', '.join(PLACEMENTS)}, got {self.placement!r}")
        if self.bottleneck_size is not None and (
            isinstance(self.bottleneck_size, bool) or not isinstance(self.bottleneck_size, int) or self.bottleneck_size < 1
        ):
            raise ValueError(f"bottleneck_size: expected a positive int or None, got {self.bottleneck_size!r}")
        if isinstance(self.reduction_factor, bool) or not isinstance(self.reduction_factor, (int, float)) or not (
            self.reduction_factor > 0 and math.isfinite(self.reduction_factor)
        ):
            raise ValueError(f"reduction_factor: expected a positive number, got {self.reduction_factor!r}")
        self.activation = get_activation(self.activation).name
        if isinstance(self.scaling, str):
            if self.scaling not in ("learned", "channel"):
                raise ValueError(f"scaling: expected a float, 'learned' or 'channel', got {self.scaling!r}")
        elif isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise TypeError(f"scaling: expected a float, 'learned' or 'channel', got {type(self.scaling).__name__}")
        else:
            self.scaling = float(self.scaling)
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init: expected one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.leave_out):
            raise TypeError(f"leave_out: expected layer indices (ints), got {self.leave_out!r}")
        self.leave_out = tuple(sorted(set(self.leave_out)))
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = (self.target_modules,)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules: expected a non-empty list of module names, got {self.target_modules!r}")
            self.target_modules = tuple(self.target_modules)
        self.backend = check_backend_name(self.backend, "backend")
        for name in ("prefix_length", "prefix_bottleneck"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if self.placement == "mam" and self.target_modules is not None:
            raise ValueError("target_modules: not supported with placement 'mam' (its places are the FFNs and the attention modules)")

    @classmethod
    def pfeiffer(cls, **overrides) -> "AdapterConfig":
        """One adapter after each FFN output (Pfeiffer et al. 2021; ``adapters``' ``seq_bn``)."""
        return cls(**{"placement": "pfeiffer", "reduction_factor": 16, "activation": "relu", **overrides})

    @classmethod
    def houlsby(cls, **overrides) -> "AdapterConfig":
        """Adapters after the attention output and the FFN output (Houlsby et al. 2019; ``double_seq_bn``)."""
        return cls(**{"placement": "houlsby", "reduction_factor": 16, "activation": "swish", **overrides})

    @classmethod
    def parallel(cls, **overrides) -> "AdapterConfig":
        """A scaled adapter beside the FFN (He et al. 2022; ``adapters``' ``par_bn``)."""
        defaults = {"placement": "parallel", "reduction_factor": 2, "activation": "relu", "scaling": 4.0, "init": "mam_adapter"}
        return cls(**{**defaults, **overrides})

    @classmethod
    def mam(cls, **overrides) -> "AdapterConfig":
        """The MAM adapter (He et al. 2022; ``adapters``' ``MAMConfig``): the scaled parallel adapter beside
        the FFN plus prefix tuning (l = 30, MLP width 800) in every attention layer."""
        defaults = {"placement": "mam", "reduction_factor": 2, "activation": "relu", "scaling": 4.0, "init": "mam_adapter"}
        return cls(**{**defaults, **overrides})

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["leave_out"] = list(self.leave_out)
        out["target_modules"] = None if self.target_modules is None else list(self.target_modules)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "AdapterConfig":
        if not isinstance(data, dict):
            raise TypeError(f"config: expected a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"config: unknown fields {unknown}; expected a subset of {sorted(known)}")
        data = dict(data)
        data["leave_out"] = tuple(data.get("leave_out", ()))
        if data.get("target_modules") is not None:
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


class AdapterSlot(nn.ModuleDict):
    """The adapters at one place of a model, by name.

    ``active``: None, the name of the adapter applied, or a composition (a callable
    ``(slot, x, residual) -> y``, e.g. per-token routing over several adapters or a fusion; see
    :mod:`adapterkern.integrations.compose`). ``layer``: the place's layer index (None if it has none);
    ``dropped``: True while AdapterDrop switches this place off.
    """

    def __init__(self, mode: str, hidden_size: int, layer: Optional[int] = None):
        super().__init__()
        self.mode = mode
        self.hidden_size = hidden_size
        self.layer = layer
        self.active = None
        self.dropped = False

    def apply(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        """The active adapter (or composition) on x: ``residual + adapter(x)`` (residual None: x)."""
        if isinstance(self.active, str):
            return self[self.active](x, residual=residual)
        return self.active(self, x, residual)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, layer={self.layer}, active={self.active!r}"


def _slot_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    """PARALLEL_SKIP: replace the module's skip input (its 2nd argument) by ``skip + adapter(skip)``."""
    slot: AdapterSlot = getattr(module, SLOT_ATTR)
    if slot.active is None or slot.dropped:
        return None
    if len(args) >= 2:
        return args[:1] + (slot.apply(args[1]),) + args[2:], kwargs
    if "input_tensor" in kwargs:
        return args, {**kwargs, "input_tensor": slot.apply(kwargs["input_tensor"])}
    raise TypeError(f"{type(module).__name__}: a parallel adapter expects the skip input as the 2nd argument")


def _slot_post_hook(module: nn.Module, args: tuple, kwargs: dict, output):
    """SEQUENTIAL: ``adapter(output)``; PARALLEL: ``adapter(input, residual=output)``."""
    slot: AdapterSlot = getattr(module, SLOT_ATTR)
    if slot.active is None or slot.dropped:
        return None
    rest = ()
    if isinstance(output, tuple):
        output, rest = output[0], output[1:]
    if slot.mode == SEQUENTIAL:
        output = slot.apply(output)
    else:
        x = args[0] if args else next(iter(kwargs.values()))
        output = slot.apply(x, residual=output)
    return (output,) + rest if rest else output


def _layer_index(module_name: str) -> Optional[int]:
    numbers = [int(p) for p in module_name.split(".") if p.isdigit()]
    return numbers[-1] if numbers else None


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or type(model).__name__


def _module_width(module: nn.Module, model: nn.Module, mode: str) -> int:
    """d of the tensor the adapter transforms at this place."""
    if mode == SEQUENTIAL:
        if isinstance(module, nn.Linear):
            return module.out_features
        if hasattr(module, "nf"):  # transformers' Conv1D (GPT-2)
            return int(module.nf)
    config = getattr(model, "config", None)
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size at this place of a {_model_type(model)} model; give target_modules of nn.Linear layers")


def _first_param(module: nn.Module, model: nn.Module) -> Tensor:
    for p in module.parameters():
        return p
    for p in model.parameters():
        return p
    raise ValueError("model: has no parameters to take a dtype and device from")


@dataclass
class _Place:
    name: str  # qualified module name
    module: nn.Module
    mode: str
    hidden_size: int


def _find_places(model: nn.Module, config: AdapterConfig) -> List[_Place]:
    """The modules an adapter with this config goes on, in model order (leave_out applied)."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    places: List[_Place] = []
    if config.target_modules is not None:
        mode = PARALLEL if config.placement == "parallel" else SEQUENTIAL
        for pattern in config.target_modules:
            found = [(n, m) for n, m in modules if re.search(r"(^|\.)" + pattern + "$", n)]
            if not found:
                raise ValueError(
                    f"target_modules: {pattern!r} matches no module of this {_model_type(model)} model "
                    f"(module names look like {modules[len(modules) // 2][0]!r})"
                )
            places += [_Place(n, m, mode, 0) for n, m in found]
    else:
        for role in _PLACEMENT_ROLES[config.placement]:
            for pattern, mode in _ROLE_PATTERNS[role]:
                found = [(n, m) for n, m in modules if re.search(r"(^|\.)" + pattern + "$", n)]
                if found:
                    places += [_Place(n, m, mode, 0) for n, m in found]
                    break
            else:
                raise ValueError(
                    f"add_adapter: cannot find the {role} modules of this {_model_type(model)} model "
                    f"(known: BERT/RoBERTa, GPT-2, Llama/Mistral/Qwen-style); pass AdapterConfig(target_modules=[...]) "
                    f"with the names of the modules to put the adapter on"
                )
    if config.placement == "mam":
        from .prefix_attention import attention_places

        found = attention_places(model)
        if not found:
            raise ValueError(f"add_adapter: cannot find the attention modules of this {_model_type(model)} model for prefix tuning")
        places += [_Place(p.name, p.module, PREFIX, 0) for p in found]
    order = {n: i for i, (n, _) in enumerate(modules)}
    seen, unique = set(), []
    for place in sorted(places, key=lambda p: order[p.name]):
        if place.name not in seen and _layer_index(place.name) not in config.leave_out:
            seen.add(place.name)
            place.hidden_size = _module_width(place.module, model, place.mode)
            unique.append(place)
    if not unique:
        raise ValueError(f"leave_out: {list(config.leave_out)} leaves no place for the adapter")
    return unique


def _iter_slots(model: nn.Module) -> Iterator[Tuple[str, nn.Module, AdapterSlot]]:
    for name, module in model.named_modules():
        slot = module.__dict__.get("_modules", {}).get(SLOT_ATTR)
        if isinstance(slot, AdapterSlot):
            yield name, module, slot


def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")


def _check_adapter_name(name) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name):
        raise ValueError(f"name: expected an identifier-like string (letters, digits, _ and -), got {name!r}")


def _configs(model: nn.Module) -> Dict[str, AdapterConfig]:
    if "_adapterkern_configs" not in model.__dict__:
        model.__dict__["_adapterkern_configs"] = {}
    return model.__dict__["_adapterkern_configs"]


def list_adapters(model: nn.Module) -> List[str]:
    """The names of the adapters added to ``model``, in the order they were added."""
    _check_model(model)
    return list(_configs(model))


def get_adapter_config(model: nn.Module, name: str) -> AdapterConfig:
    _require_adapter(model, name)
    return _configs(model)[name]


def _require_adapter(model: nn.Module, name: str) -> None:
    _check_model(model)
    if name not in _configs(model):
        have = list_adapters(model)
        raise ValueError(f"name: no adapter {name!r} in this model (it has {have if have else 'none'})")


def _build_prefixes(model: nn.Module, config: AdapterConfig, places: List[_Place], collapsed: bool) -> list:
    """One PrefixTuning per attention place: sharing one reparametrisation MLP (fresh), or plain
    tensors (``collapsed``, what a saved adapter holds)."""
    from ..nn.prefix import PrefixTuning
    from .prefix_attention import attention_places

    info = {p.name: p for p in attention_places(model)}
    first = info[places[0].name]
    ref = _first_param(places[0].module, model)
    factory = {"device": ref.device, "dtype": ref.dtype}
    if collapsed:
        return [
            PrefixTuning(info[p.name].num_kv_heads, info[p.name].head_dim, config.prefix_length, reparametrize=False,
                         hidden_size=info[p.name].hidden_size, **factory)
            for p in places
        ]
    return PrefixTuning.shared(len(places), first.num_kv_heads, first.head_dim, config.prefix_length, config.prefix_bottleneck,
                               hidden_size=first.hidden_size, **factory)


def _build_adapters(model: nn.Module, config: AdapterConfig, places: List[_Place], collapsed_prefixes: bool = False) -> list:
    """One module per place: a BottleneckAdapter, or a PrefixTuning at PREFIX places."""
    prefix_places = [p for p in places if p.mode == PREFIX]
    prefixes = iter(_build_prefixes(model, config, prefix_places, collapsed_prefixes) if prefix_places else [])
    adapters = []
    for place in places:
        if place.mode == PREFIX:
            adapters.append(next(prefixes))
            continue
        d = place.hidden_size
        r = config.bottleneck_size if config.bottleneck_size is not None else max(1, int(d // config.reduction_factor))
        ref = _first_param(place.module, model)
        adapters.append(
            BottleneckAdapter(
                d, r, activation=config.activation, scaling=config.scaling, bias=config.bias, init=config.init,
                backend=config.backend, device=ref.device, dtype=ref.dtype,
            )
        )
    return adapters


def _attach(model: nn.Module, name: str, config: AdapterConfig, places: List[_Place], adapters: List[BottleneckAdapter]) -> None:
    for place, adapter in zip(places, adapters):
        slot = place.module._modules.get(SLOT_ATTR)
        if slot is None:
            slot = AdapterSlot(place.mode, place.hidden_size, _layer_index(place.name))
            place.module.add_module(SLOT_ATTR, slot)
            if place.mode == PARALLEL_SKIP:
                place.module.register_forward_pre_hook(_slot_pre_hook, with_kwargs=True)
            elif place.mode == PREFIX:
                from .prefix_attention import enable_prefix_attention

                enable_prefix_attention(model)  # the attention reads the slot; idempotent
            else:
                place.module.register_forward_hook(_slot_post_hook, with_kwargs=True)
        elif slot.mode != place.mode:
            raise ValueError(f"{place.name}: already holds {slot.mode} adapters; cannot add a {place.mode} one there")
        slot[name] = adapter
    _configs(model)[name] = config


def _remove_hooks(module: nn.Module) -> None:
    # Found by identity rather than kept handles, so that a deep copy of the model cleans up its own hooks.
    for hooks, fn in ((module._forward_pre_hooks, _slot_pre_hook), (module._forward_hooks, _slot_post_hook)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            for extra in ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs"):
                getattr(module, extra, {}).pop(key, None)


def add_adapter(model: nn.Module, name: str, config: Optional[AdapterConfig] = None, *, set_active: bool = True) -> None:
    """Insert a fresh adapter called ``name`` into ``model`` (a Hugging Face transformers model or any
    module with the same layout), at the places ``config`` names (default: :meth:`AdapterConfig.pfeiffer`).

    The adapters take the dtype and device of the module they sit on. With ``set_active`` (default)
    the new adapter becomes the active one. Several adapters may be added; one is active at a time.
    """
    _check_model(model)
    _check_adapter_name(name)
    if config is None:
        config = AdapterConfig.pfeiffer()
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config: expected an adapterkern.AdapterConfig, got {type(config).__name__}")
    if name in _configs(model):
        raise ValueError(f"name: this model already has an adapter {name!r}; delete_adapter() it first or pick another name")
    places = _find_places(model, config)
    _attach(model, name, config, places, _build_adapters(model, config, places))
    if set_active:
        set_active_adapter(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter (or fusion) ``name``; places left with no adapter get their hooks removed."""
    _require_adapter(model, name)
    users = [f for f, c in _configs(model).items() if name in getattr(c, "adapters", ())]
    if users:
        raise ValueError(f"name: adapter {name!r} is mixed by fusion {users}; delete_adapter() the fusion first")
    if get_active_adapter(model) == name:
        model.__dict__["_adapterkern_active"] = None
    for _, module, slot in list(_iter_slots(model)):
        if name in slot:
            del slot[name]
            if slot.active == name or getattr(slot.active, "name", None) == name:
                slot.active = None
            if len(slot) == 0:
                _remove_hooks(module)
                del module._modules[SLOT_ATTR]
    del _configs(model)[name]
    if not any(slot.mode == PREFIX for _, _, slot in _iter_slots(model)):
        from .prefix_attention import disable_prefix_attention, prefix_attention_enabled

        if prefix_attention_enabled(model):
            disable_prefix_attention(model)


def set_active_adapter(model: nn.Module, name: Optional[str]) -> None:
    """Make ``name`` the adapter applied in every forward (None: no adapter, the plain backbone)."""
    _check_model(model)
    if name is not None:
        _require_adapter(model, name)
    config = None if name is None else _configs(model)[name]
    active = config.composition(name) if hasattr(config, "composition") else name  # a fusion: its composition
    for _, _, slot in _iter_slots(model):
        slot.active = active if (name is not None and name in slot) else None
    model.__dict__["_adapterkern_active"] = name


def get_active_adapter(model: nn.Module) -> Optional[str]:
    _check_model(model)
    return model.__dict__.get("_adapterkern_active")


def adapter_modules(model: nn.Module, name: str) -> Dict[str, BottleneckAdapter]:
    """``{place's qualified module name: the BottleneckAdapter of adapter name there}``."""
    _require_adapter(model, name)
    return {module_name: slot[name] for module_name, _, slot in _iter_slots(model) if name in slot}


def adapter_state_dict(model: nn.Module, name: str) -> Dict[str, Tensor]:
    """Adapter ``name``'s tensors keyed ``"<place>.<parameter>"`` (e.g. ``encoder.layer.0.output.dense.adapter_down.weight``)."""
    out: Dict[str, Tensor] = {}
    for place, adapter in adapter_modules(model, name).items():
        state = adapter.collapsed_state_dict() if hasattr(adapter, "collapsed_state_dict") else adapter.state_dict()
        for key, value in state.items():  # prefixes: the collapsed (l, ...) tensors, not the shared MLP
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
    _check_model(model)
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
    _require_adapter(model, name)
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


def save_adapter(model: nn.Module, name: str, directory: Union[str, Path]) -> Path:
    """Write adapter ``name`` to ``directory``: ``adapter_model.safetensors`` (its tensors only) and
    ``adapter_config.json`` (config, places, dtype, file size and SHA-256 of the weights). Returns the directory."""
    from safetensors.torch import save_file

    _require_adapter(model, name)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model, name).items()}
    weights = directory / WEIGHTS_NAME
    save_file(tensors, str(weights), metadata={"format": FORMAT, "name": name})
    places = [
        {"module": place, "mode": getattr(module, SLOT_ATTR).mode, "hidden_size": getattr(module, SLOT_ATTR).hidden_size}
        for place, module, slot in _iter_slots(model)
        if name in slot
    ]
    meta = {
        "format": FORMAT,
        "name": name,
        "kind": getattr(_configs(model)[name], "kind", "adapter"),
        "model_type": _model_type(model),
        "config": _configs(model)[name].to_dict(),
        "places": places,
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for k, v in tensors.items()},
        "num_parameters": sum(v.numel() for v in tensors.values()),
        "weights_bytes": weights.stat().st_size,
        "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    (directory / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
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

    _check_model(model)
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
        if meta.get("kind", "adapter") == "fusion":
            from .compose import FusionConfig

            config = FusionConfig.from_dict(meta["config"])
        else:
            config = AdapterConfig.from_dict(meta["config"])
        places_meta = meta["places"]
        expected = meta["tensors"]
        name = meta["name"] if name is None else name
    except (SafetensorError, KeyError, TypeError, ValueError) as exc:
        raise _load_error(directory, f"is corrupt or incomplete ({type(exc).__name__}: {exc})") from None
    _check_adapter_name(name)
    if name in _configs(model):
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
            raise _load_error(directory, f"puts an adapter on {p['module']!r}, which this {_model_type(model)} model does not have")
        width = _module_width(module, model, p["mode"])
        if width != p["hidden_size"]:
            raise _load_error(directory, f"was saved for hidden size {p['hidden_size']} at {p['module']!r}; this model has {width}")
        slot = module._modules.get(SLOT_ATTR)
        if slot is not None and slot.mode != p["mode"]:
            raise _load_error(directory, f"puts a {p['mode']} adapter on {p['module']!r}, which holds {slot.mode} adapters")
        if hasattr(config, "adapters") and (slot is None or not all(a in slot for a in config.adapters)):
            raise _load_error(directory, f"is a fusion of {list(config.adapters)}; add or load those adapters first (missing at {p['module']!r})")
        places.append(_Place(p["module"], module, p["mode"], p["hidden_size"]))
    if hasattr(config, "build"):  # a fusion layer per place
        adapters = [config.build(p.hidden_size, _first_param(p.module, model)) for p in places]
    else:
        adapters = _build_adapters(model, config, places, collapsed_prefixes=True)
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
    _attach(model, name, config, places, adapters)
    if set_active:
        set_active_adapter(model, name)
    return name
