"""What a bottleneck adapter of an :func:`~adapterkern.add_adapter` model is (:class:`AdapterConfig`),
which modules of a Hugging Face ``transformers`` model it goes on, and the modules built for it.

Each adapter sits at *places*: modules of the model found by their role (or named by
``target_modules``), each with one forward hook. The adapter modules become children of those modules
(:mod:`adapterkern.integrations.slots`).

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
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

from torch import nn

from ..activations import get_activation
from ..backends import check_backend_name
from ..nn.bottleneck import INIT_SCHEMES, BottleneckAdapter
from ..nn.prefix import PrefixTuning
from .prefix_attention import attention_places
from .slots import (
    PARALLEL, PARALLEL_SKIP, PREFIX, RENORM, SEQUENTIAL, Place, SlotConfig, check_places, layer_index, model_type,
    reference_param,
)

PLACEMENTS = ("pfeiffer", "houlsby", "parallel", "mam")

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
    # after the FFN's residual add (original_ln_before): BERT's output norm, a pre-LN block's output
    "ffn_stream": [
        (r"\d+\.output\.LayerNorm", RENORM),  # BERT, RoBERTa: LN(t) -> LN(t + adapter(LN(t)))
        (r"h\.\d+", SEQUENTIAL),  # GPT-2 blocks: the residual stream after the MLP's add
        (r"layers\.\d+", SEQUENTIAL),  # Llama-style decoder layers
    ],
}
_PLACEMENT_ROLES = {"pfeiffer": ("ffn_output",), "houlsby": ("attn_output", "ffn_output"), "parallel": ("ffn",), "mam": ("ffn",)}


@dataclass
class AdapterConfig(SlotConfig, kind="adapter"):
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
            instead of the role table. They must name linear layers (``nn.Linear``, or transformers'
            ``Conv1D``); the adapter is applied sequentially on their outputs, or, for ``parallel``, as
            ``module(x) + s * up(act(down(x)))`` (the layer must map (..., d) to (..., d)).
        backend: ``auto``, ``torch``, ``triton`` or ``cuda``.
        prefix_length: ``mam`` only: key/value prefix length l per attention layer.
        prefix_bottleneck: ``mam`` only: the reparametrisation MLP's width (one MLP shared by all
            layers, as in the ``adapters`` library); the prefixes are saved collapsed (plain tensors).
        original_ln_before: ``pfeiffer`` only: the ``adapters`` library's ``original_ln_before`` (its
            ``seq_bn`` default): the adapter after the FFN's residual add, ``z -> z + s * up(act(down(z)))``
            on the residual stream z in pre-LN models (GPT-2, Llama: the block's output), and in post-LN
            BERT-style layers ``LN(h + x + s * up(act(down(LN(h + x)))))`` (the adapter reads the
            normalised sum; the layer's LayerNorm is applied again after it). False (default): the adapter
            on the FFN's output projection, before the residual add.
        modules_to_save: modules of the model trained, saved and loaded with this adapter, e.g. the
            task head ``["classifier"]`` (names matched against the end of qualified names, like
            ``train_adapter``'s ``train_modules``). They stay the model's own modules, shared by all
            its adapters: ``load_adapter`` copies the saved values into them.

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
    original_ln_before: bool = False
    modules_to_save: Tuple[str, ...] = ()

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
        elif not math.isfinite(self.scaling):
            raise ValueError(f"scaling: expected a finite float, 'learned' or 'channel', got {self.scaling!r}")
        else:
            self.scaling = float(self.scaling)
        if not isinstance(self.bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(self.bias).__name__}")
        if self.init not in INIT_SCHEMES:
            raise ValueError(f"init: expected one of {', '.join(INIT_SCHEMES)}, got {self.init!r}")
        if isinstance(self.leave_out, (str, bytes)) or not isinstance(self.leave_out, (list, tuple, set, frozenset, range)):
            raise TypeError(f"leave_out: expected a list of layer indices, got {self.leave_out!r}")
        if any(isinstance(i, bool) or not isinstance(i, int) for i in self.leave_out):
            raise TypeError(f"leave_out: expected layer indices (ints), got {self.leave_out!r}")
        self.leave_out = tuple(sorted(set(self.leave_out)))
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = (self.target_modules,)
            if not isinstance(self.target_modules, (list, tuple)) or not self.target_modules or not all(
                isinstance(t, str) and t for t in self.target_modules
            ):
                raise ValueError(f"target_modules: expected a non-empty list of module names, got {self.target_modules!r}")
            self.target_modules = tuple(self.target_modules)
            for pattern in self.target_modules:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise ValueError(f"target_modules: {pattern!r} is not a valid regular expression ({exc})") from None
        self.backend = check_backend_name(self.backend, "backend")
        for name in ("prefix_length", "prefix_bottleneck"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if not isinstance(self.original_ln_before, bool):
            raise TypeError(f"original_ln_before: expected a bool, got {type(self.original_ln_before).__name__}")
        if self.original_ln_before and (self.placement != "pfeiffer" or self.target_modules is not None):
            raise ValueError("original_ln_before: only with placement 'pfeiffer' and no target_modules (it names its own places)")
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = (self.modules_to_save,)
        if not isinstance(self.modules_to_save, (list, tuple)) or not all(isinstance(m, str) and m for m in self.modules_to_save):
            raise ValueError(f"modules_to_save: expected a list of module names, got {self.modules_to_save!r}")
        self.modules_to_save = tuple(dict.fromkeys(self.modules_to_save))
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
        out["modules_to_save"] = list(self.modules_to_save)
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
        for key in ("leave_out", "target_modules", "modules_to_save"):  # JSON lists; __post_init__ checks what they hold
            if isinstance(data.get(key), list):
                data[key] = tuple(data[key])
        return cls(**data)

    def places_in(self, model: nn.Module) -> List[Place]:
        return find_places(model, self)

    def build_for_load(self, model: nn.Module, places: Sequence[Place], *, device=None) -> list:
        """BottleneckAdapters, and plain-tensor PrefixTunings at PREFIX places (saved prefixes are collapsed)."""
        return build_adapters(model, self, places, collapsed_prefixes=True, device=device)


def module_width(module: nn.Module, model: nn.Module, mode: str) -> int:
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
    raise ValueError(f"cannot tell the hidden size at this place of a {model_type(model)} model; give target_modules of nn.Linear layers")


def _linear_features(module: nn.Module) -> Optional[Tuple[int, int]]:
    """(in, out) features of a linear layer: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2); else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    if isinstance(nx, int) and isinstance(nf, int) and isinstance(getattr(module, "weight", None), nn.Parameter):
        return nx, nf
    return None


def _check_target(place: Place, model: nn.Module) -> None:
    """ValueError unless a target_modules place is a linear layer the adapter fits on (a parallel
    adapter reads the layer's input and adds to its output: they need the same width)."""
    features = _linear_features(place.module)
    if features is None:
        raise ValueError(
            f"target_modules: {place.name!r} of this {model_type(model)} model is a {type(place.module).__name__}, "
            f"not a linear layer (nn.Linear or Conv1D); adapters on target_modules go on linear layers"
        )
    if place.mode == PARALLEL and features[0] != features[1]:
        raise ValueError(
            f"target_modules: {place.name!r} maps {features[0]} to {features[1]} features; a parallel adapter "
            f"needs a layer that keeps the width (it reads the layer's input and adds to its output)"
        )


def find_places(model: nn.Module, config: AdapterConfig) -> List[Place]:
    """The modules an adapter with this config goes on, in model order (leave_out applied), each
    checked: a mode that differs from the adapters already there, or a target_modules layer that is
    not linear (or, parallel, does not keep the width), is a ValueError."""
    modules = [(n, m) for n, m in model.named_modules() if n]
    places: List[Place] = []
    if config.target_modules is not None:
        mode = PARALLEL if config.placement == "parallel" else SEQUENTIAL
        for pattern in config.target_modules:
            found = [(n, m) for n, m in modules if re.search(r"(^|\.)" + pattern + "$", n)]
            if not found:
                raise ValueError(
                    f"target_modules: {pattern!r} matches no module of this {model_type(model)} model "
                    f"(module names look like {modules[len(modules) // 2][0]!r})"
                )
            places += [Place(n, m, mode, 0) for n, m in found]
    else:
        for role in ("ffn_stream",) if config.original_ln_before else _PLACEMENT_ROLES[config.placement]:
            for pattern, mode in _ROLE_PATTERNS[role]:
                found = [(n, m) for n, m in modules if re.search(r"(^|\.)" + pattern + "$", n)]
                if found:
                    places += [Place(n, m, mode, 0) for n, m in found]
                    break
            else:
                raise ValueError(
                    f"add_adapter: cannot find the {role} modules of this {model_type(model)} model "
                    f"(known: BERT/RoBERTa, GPT-2, Llama/Mistral/Qwen-style); pass AdapterConfig(target_modules=[...]) "
                    f"with the names of the modules to put the adapter on"
                )
    if config.placement == "mam":
        found = attention_places(model)
        if not found:
            raise ValueError(f"add_adapter: cannot find the attention modules of this {model_type(model)} model for prefix tuning")
        places += [Place(p.name, p.module, PREFIX, 0) for p in found]
    order = {n: i for i, (n, _) in enumerate(modules)}
    seen, unique = set(), []
    for place in sorted(places, key=lambda p: order[p.name]):
        if place.name not in seen and layer_index(place.name) not in config.leave_out:
            seen.add(place.name)
            unique.append(place)
    if not unique:
        raise ValueError(f"leave_out: {list(config.leave_out)} leaves no place for the adapter")
    check_places(unique)  # before the layer checks: a place of another mode is the clearer message
    for place in unique:
        if config.target_modules is not None:
            _check_target(place, model)
        place.hidden_size = module_width(place.module, model, place.mode)
    return unique


def _build_prefixes(model: nn.Module, config: AdapterConfig, places: Sequence[Place], collapsed: bool, device=None) -> list:
    """One PrefixTuning per attention place: sharing one reparametrisation MLP (fresh), or plain
    tensors (``collapsed``, what a saved adapter holds)."""
    info = {p.name: p for p in attention_places(model)}
    first = info[places[0].name]
    ref = reference_param(places[0].module, model)
    factory = {"device": ref.device if device is None else device, "dtype": ref.dtype}
    if collapsed:
        return [
            PrefixTuning(info[p.name].num_kv_heads, info[p.name].head_dim, config.prefix_length, reparametrize=False,
                         hidden_size=info[p.name].hidden_size, **factory)
            for p in places
        ]
    return PrefixTuning.shared(len(places), first.num_kv_heads, first.head_dim, config.prefix_length, config.prefix_bottleneck,
                               hidden_size=first.hidden_size, **factory)


def build_adapters(model: nn.Module, config: AdapterConfig, places: Sequence[Place], collapsed_prefixes: bool = False,
                   device=None) -> list:
    """One fresh module per place, with the dtype and device of the module it sits on (or ``device``):
    a BottleneckAdapter of width d = ``place.hidden_size``, or at PREFIX places a PrefixTuning (all
    sharing one reparametrisation MLP; with ``collapsed_prefixes``, plain (H_kv, l, hd) key and value tensors)."""
    prefix_places = [p for p in places if p.mode == PREFIX]
    prefixes = iter(_build_prefixes(model, config, prefix_places, collapsed_prefixes, device) if prefix_places else [])
    adapters = []
    for place in places:
        if place.mode == PREFIX:
            adapters.append(next(prefixes))
            continue
        d = place.hidden_size
        r = config.bottleneck_size if config.bottleneck_size is not None else max(1, int(d // config.reduction_factor))
        ref = reference_param(place.module, model)
        adapters.append(
            BottleneckAdapter(
                d, r, activation=config.activation, scaling=config.scaling, bias=config.bias, init=config.init,
                backend=config.backend, device=ref.device if device is None else device, dtype=ref.dtype,
            )
        )
    return adapters
