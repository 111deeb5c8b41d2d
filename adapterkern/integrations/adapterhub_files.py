"""Adapters saved by the AdapterHub ``adapters`` library, read into and written from ``add_adapter``
models, without that library (which pins ``transformers~=4.57``).

``load_adapterhub(model, directory)`` reads what the library's ``model.save_adapter(directory, name)``
wrote: ``adapter_config.json`` and the weights, ``adapter.safetensors`` (preferred) or
``pytorch_adapter.bin`` (a zip pickle, read only with ``torch.load(weights_only=True)``: plain tensors,
no code), and where present ``head_config.json`` with ``model_head.safetensors`` /
``pytorch_model_head.bin``. The library's config maps onto an :class:`~adapterkern.AdapterConfig`:

=============================================  ===========================================================
library config (fields that decide)            adapterkern
=============================================  ===========================================================
``seq_bn``: ``original_ln_before``, output      ``pfeiffer(original_ln_before=True)``
sequential, no ``original_ln_before``, output   ``pfeiffer()``
``double_seq_bn``: + ``mh_adapter``              ``houlsby()``
``par_bn``, ``scaled_par_bn`` (post-LN models)  ``parallel()``
``mam`` (post-LN models; prefix MLP, tanh)      ``mam(prefix_length, prefix_bottleneck)``
=============================================  ===========================================================

with ``reduction_factor`` (one value, or a per-layer mapping that resolves to one), ``non_linearity``
(the library's names and its rename of ``gelu`` in version-less files), ``scaling`` (float,
``learned``, ``channel``) and ``leave_out``. Anything else is refused with a ValueError naming it,
before the model is touched: Compacter / PHM, gating, the adapter's own LayerNorms, invertible and
cross-attention adapters, dropout / stochastic depth, ``original_ln_after: false``, ``residual_before_ln``
other than true with ``original_ln_before``, parallel adapters in pre-LN models (the library's read
the un-normalised residual stream, adapterkern's the MLP's input), prefix tuning alone, flat prefixes and
other methods. A classification head (two layers, tanh, the first token) loads into a BERT-style
``...ForSequenceClassification`` model as its ``pooler.dense`` and ``classifier``, a static-head model's
head (``"config": null``) into the same model class's own modules; other heads are reported as not loaded.
``load_adapterhub_fusion`` reads ``save_adapter_fusion``'s files into what ``add_fusion`` makes.

``save_adapterhub(model, name, directory)`` writes the library's format (safetensors, every config field,
``"version"``), which the library's ``load_adapter(directory, use_safetensors=True)`` reads.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..nn.fusion import resolve_fusion_config
from .compose import FusionConfig
from .placement import AdapterConfig, build_adapters, find_places
from .slots import (
    PARALLEL_SKIP, PREFIX, Place, adapter_configs, check_adapter_name, check_not_optimized, iter_slots, layer_index, require_adapter,
)
from .transformers import adapter_modules, insert_adapter_modules, set_active_adapter

__all__ = ["AdapterHubLoad", "load_adapterhub", "load_adapterhub_fusion", "save_adapterhub"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS = ("adapter.safetensors", "pytorch_adapter.bin")  # preferred first
HEAD_CONFIG_NAME = "head_config.json"
FUSION_CONFIG_NAME = "adapter_fusion_config.json"
FUSION_WEIGHTS = ("model_adapter_fusion.safetensors", "pytorch_model_adapter_fusion.bin")
HEAD_WEIGHTS = ("model_head.safetensors", "pytorch_model_head.bin")
LIBRARY_VERSION = "adapters.1.3.0"  # the format written (a version-less file makes the library rename gelu)
MAX_CONFIG_BYTES = 1 << 20
_LEGACY_ACTIVATIONS = {"gelu": "gelu_new", "gelu_orig": "gelu"}  # the library's rename for version-less files
# every field of the library's bottleneck config (BnConfig), with SeqBnConfig's values: what save writes
_BN_DEFAULTS = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None, "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False,
    "learn_phm": True, "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False,
    "non_linearity": "relu", "original_ln_after": True, "original_ln_before": True, "output_adapter": True,
    "phm_bias": True, "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False, "phm_rank": 1,
    "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False, "shared_phm_rule": True,
    "stochastic_depth": 0.0, "use_gating": False,
}
# options adapterkern's adapters cannot compute: (field, the value that is fine, what it is)
_REFUSED = (
    ("phm_layer", False, "Compacter / PHM layers"), ("use_gating", False, "gating (UniPELT)"),
    ("ln_before", False, "the adapter's own LayerNorm before it"), ("ln_after", False, "the adapter's own LayerNorm after it"),
    ("inv_adapter", None, "invertible adapters"), ("cross_adapter", False, "cross-attention adapters"),
)
# the library's tensor names -> adapterkern's BottleneckAdapter's
_LIB_TO_OURS = {"adapter_down.0.weight": "adapter_down.weight", "adapter_down.0.bias": "adapter_down.bias",
                "adapter_up.weight": "adapter_up.weight", "adapter_up.bias": "adapter_up.bias", "scaling": "scaling"}
_OURS_TO_LIB = {v: k for k, v in _LIB_TO_OURS.items()}


@dataclass
class AdapterHubLoad:
    """What :func:`load_adapterhub` did: the adapter's name in the model, the AdapterConfig it was mapped to,
    the weights file read, and what became of a saved head."""

    name: str
    config: AdapterConfig
    weights_file: str
    head: str = "no head in the directory"
    notes: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"adapter {self.name!r} from {self.weights_file}: {self.config}", f"head: {self.head}"]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _error(directory, why: str) -> ValueError:
    return ValueError(f"load_adapterhub: {directory} {why}; the model was not changed")


def _resolve(directory: Union[str, os.PathLike]) -> Path:
    """A local directory, or a Hub repo id fetched with ``huggingface_hub.snapshot_download`` (online only)."""
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path or a Hub repo id, got {type(directory).__name__}")
    path = Path(directory)
    if path.is_dir():
        return path
    text = str(directory)
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) and not path.exists():
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=[CONFIG_NAME, HEAD_CONFIG_NAME, *WEIGHTS, *HEAD_WEIGHTS]))
    raise ValueError(f"directory: {text!r} is neither a directory nor a Hub repo id (owner/name)")


def _read_json(directory: Path, name: str, config_may_be_null: bool = False) -> dict:
    path = directory / name
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise _error(directory, f"has a {name} of more than {MAX_CONFIG_BYTES} bytes")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _error(directory, f"has a corrupt {name} ({type(exc).__name__})") from None
    if not isinstance(data, dict) or not (isinstance(data.get("config"), dict) or
                                          (config_may_be_null and "config" in data and data["config"] is None)):
        raise _error(directory, f"has a {name} without a 'config' object: not a file of the adapters library")
    return data


def _activation(meta: dict, config: dict, directory: Path) -> str:
    name = config.get("non_linearity")
    if not isinstance(name, str):
        raise _error(directory, f"has non_linearity {name!r}; expected an activation name")
    name = name.lower()
    if "version" not in meta:
        name = _LEGACY_ACTIVATIONS.get(name, name)
    return "leakyrelu" if name == "leaky_relu" else name


def _mam_parts(config: dict, directory) -> Tuple[dict, dict]:
    """The bottleneck half of a MAM-style union and the AdapterConfig options of its prefix half."""
    parts = config.get("configs")
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(c, dict) for c in parts):
        raise _error(directory, "holds a union that is not one prefix tuning and one bottleneck config")
    prefix = next((c for c in parts if c.get("architecture") == "prefix_tuning"), None)
    bottleneck = next((c for c in parts if c.get("architecture") is None), None)
    if prefix is None or bottleneck is None:
        raise _error(directory, "holds a union that is not one prefix tuning and one bottleneck config (MAM)")
    for key, fine, what in (("flat", False, "a flat prefix (no reparametrisation MLP)"), ("use_gating", False, "prefix gating")):
        if prefix.get(key, fine) != fine:
            raise _error(directory, f"has {what} ({key}={prefix[key]!r}), which load_adapterhub does not map")
    if str(prefix.get("non_linearity", "tanh")).lower() != "tanh":
        raise _error(directory, f"has a prefix MLP with {prefix['non_linearity']!r}; adapterkern's uses tanh")
    if prefix.get("dropout") not in (None, 0, 0.0):
        raise _error(directory, f"has prefix dropout {prefix['dropout']!r}: not mapped (it changes training)")
    if sorted(prefix.get("leave_out") or []) != sorted(bottleneck.get("leave_out") or []):
        raise _error(directory, "has different leave_out for its prefixes and its adapter; adapterkern's mam has one")
    options = {"prefix_length": prefix.get("prefix_length"), "prefix_bottleneck": prefix.get("bottleneck_size")}
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in options.values()):
        raise _error(directory, f"has prefix_length / bottleneck_size {list(options.values())}; expected positive ints")
    return bottleneck, options


def _bottleneck_size(config: dict, hidden: int, layers: List[int], directory: Path) -> int:
    """r as the library computes it, ``int(d // reduction_factor)`` (at least 1), one value for every layer."""
    factor = config.get("reduction_factor")
    per_layer = factor if isinstance(factor, dict) else {"default": factor}
    sizes = set()
    for layer in layers:
        value = per_layer.get(str(layer), per_layer.get("default"))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _error(directory, f"has reduction_factor {factor!r}; expected a positive number for layer {layer}")
        sizes.add(max(1, int(hidden // value)))
    if len(sizes) != 1:
        raise _error(directory, f"has a per-layer reduction_factor {factor!r} giving bottlenecks {sorted(sizes)}: "
                                f"adapterkern's adapters have one size")
    return sizes.pop()


def adapter_config_from_library(model: nn.Module, meta: dict, directory: Union[str, Path] = "") -> AdapterConfig:
    """The :class:`AdapterConfig` that computes what the library's config ``meta`` (a parsed
    ``adapter_config.json``) computes in ``model``; ValueError naming what cannot be expressed."""
    config = meta["config"]
    architecture = config.get("architecture")
    prefix_options = {}
    if architecture == "union":
        config, prefix_options = _mam_parts(config, directory)
    elif architecture is not None:
        raise _error(directory, f"holds a {architecture!r} config; load_adapterhub reads bottleneck adapters and MAM "
                                f"(prefix tuning alone, LoRA and the other methods are not supported)")
    for key, fine, what in _REFUSED:
        if config.get(key) not in (fine, None):
            raise _error(directory, f"uses {what} ({key}={config[key]!r}), which adapterkern cannot compute")
    for key in ("dropout", "stochastic_depth"):
        if config.get(key) not in (None, 0, 0.0):
            raise _error(directory, f"has {key}={config[key]!r}: adapterkern's adapters have no {key} (it changes training)")
    if config.get("original_ln_after", True) is not True:
        raise _error(directory, "has original_ln_after=false (the adapter replaces the sub-layer's skip add and norm): "
                                "no adapterkern placement computes that")
    parallel = bool(config.get("is_parallel", False))
    mh, out = bool(config.get("mh_adapter", False)), bool(config.get("output_adapter", False))
    before = bool(config.get("original_ln_before", False))
    residual = config.get("residual_before_ln", True)
    if parallel:
        if mh or not out:
            raise _error(directory, "has a parallel adapter at the attention output: adapterkern's go beside the FFN only")
        placement, options = ("mam", prefix_options) if prefix_options else ("parallel", {})
    elif prefix_options:
        raise _error(directory, "is a union of prefix tuning and a sequential adapter: adapterkern's mam pairs the "
                                "prefixes with a parallel adapter")
    elif before:
        if residual is not True:
            raise _error(directory, f"has original_ln_before with residual_before_ln={residual!r}: only true is expressible")
        if mh or not out:
            raise _error(directory, "has original_ln_before with mh_adapter: the stream between the attention and the FFN has "
                                    "no module output in pre-LN models; adapterkern supports it after the FFN only")
        placement, options = "pfeiffer", {"original_ln_before": True}
    else:
        if residual == "post_add":
            raise _error(directory, "has residual_before_ln='post_add' without original_ln_before (the library itself fails)")
        if not out:
            raise _error(directory, "has an adapter at the attention output only; pass target_modules to add_adapter instead")
        placement, options = ("houlsby" if mh else "pfeiffer"), {}
    scaling = config.get("scaling", 1.0)
    if isinstance(scaling, bool) or not (isinstance(scaling, float) or scaling in ("learned", "channel")):
        raise _error(directory, f"has scaling {scaling!r}; the library accepts a float, 'learned' or 'channel'")
    leave_out = config.get("leave_out") or []
    if not isinstance(leave_out, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in leave_out):
        raise _error(directory, f"has leave_out {leave_out!r}; expected layer indices")
    try:
        draft = AdapterConfig(placement=placement, activation=_activation(meta, config, directory), scaling=scaling,
                              leave_out=tuple(leave_out), **options)
    except (TypeError, ValueError) as exc:
        raise _error(directory, f"has a config adapterkern cannot express ({exc})") from None
    places = [p for p in find_places(model, draft) if p.mode != PREFIX]
    if parallel and any(p.mode != PARALLEL_SKIP for p in places):
        raise _error(directory, "holds a parallel adapter for a pre-LN model: the library's reads the un-normalised "
                                "residual stream, adapterkern's the MLP's (normalised) input, a different function")
    hidden = places[0].hidden_size
    r = _bottleneck_size(config, hidden, sorted({layer_index(p.name) for p in places}), directory)
    return AdapterConfig(placement=placement, bottleneck_size=r, activation=draft.activation, scaling=scaling,
                         init="bert", leave_out=draft.leave_out, **options)


_BERT_PLACE = re.compile(r"^(?P<layer>.*\.\d+)\.(?P<where>attention\.output|output)(\.dense|\.LayerNorm)?$")
_PRE_LN_PLACE = re.compile(r"^(?P<layer>(.*\.)?\d+)(\.(?P<sub>attn|self_attn|mlp)(\.\w+)?)?$")


def library_location(place: Place) -> str:
    """The library's module name for the adapters of an adapterkern place: BERT-style
    ``<layer>.attention.output`` / ``<layer>.output``, pre-LN ``<layer>.attention_adapters`` / ``<layer>.output_adapters``."""
    m = _BERT_PLACE.match(place.name)
    if m:
        return f"{m['layer']}.{m['where']}"
    m = _PRE_LN_PLACE.match(place.name)
    if m and m["sub"] != "mlp" and m["sub"] is not None:
        return f"{m['layer']}.attention_adapters"
    if m:
        return f"{m['layer']}.output_adapters"
    raise ValueError(f"{place.name}: no adapters-library location for this place")


def _strip(key: str, prefix: str) -> str:
    return key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else key


def _library_targets(model, places, modules, lib_name: str) -> Tuple[Dict[str, Tensor], set]:
    """library key (without the base-model prefix) -> the tensor of the built modules it fills, and the
    keys a file may leave out (the library's per-layer copies of the shared prefix MLP)."""
    prefix = getattr(model, "base_model_prefix", "")
    targets, optional = {}, set()
    for place, module in zip(places, modules):
        if place.mode == PREFIX:  # one shared MLP: the pool's copy, and one per attention module
            for key, tensor in module.encoder.state_dict().items():
                targets[f"prefix_tuning.prefix_tunings.{lib_name}.self_prefix.{key}"] = tensor
                layer_key = f"{_strip(place.name, prefix)}.prefix_tuning.pool.prefix_tunings.{lib_name}.self_prefix.{key}"
                targets[layer_key] = tensor
                optional.add(layer_key)
            continue
        location = _strip(library_location(place), prefix)
        for ours, tensor in module.state_dict().items():
            targets[f"{location}.adapters.{lib_name}.{_OURS_TO_LIB[ours]}"] = tensor
    return targets, optional


def _read_tensors(directory: Path, names: Tuple[str, str], expected_bytes: int) -> Tuple[Dict[str, Tensor], str]:
    """The tensors of the preferred weights file that exists: safetensors, or a .bin read with
    torch.load(weights_only=True) after its size is checked against what the config implies."""
    safe, pickled = (directory / n for n in names)
    if safe.is_file():
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(safe), "pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, safe.name
        except (SafetensorError, OSError, ValueError) as exc:
            raise _error(directory, f"has a corrupt {safe.name} ({exc})") from None
    if not pickled.is_file():
        raise _error(directory, f"has neither {safe.name} nor {pickled.name}")
    size, limit = pickled.stat().st_size, 2 * expected_bytes + (1 << 20)
    if size > limit:
        raise _error(directory, f"has a {size}-byte {pickled.name}; its config implies about {expected_bytes} bytes of tensors")
    try:
        data = torch.load(str(pickled), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError, zip errors: all refused
        raise _error(directory, f"has a {pickled.name} that torch.load(weights_only=True) refuses: not a plain file of "
                                f"tensors ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in data.items()):
        raise _error(directory, f"has a {pickled.name} that is not a dict of tensors")
    return data, pickled.name


def _check_and_assign(directory, tensors: Dict[str, Tensor], targets: Dict[str, Tensor], prefix: str,
                      optional: frozenset = frozenset()) -> List[Tuple[Tensor, Tensor]]:
    """(target, value) pairs once every file key names one target (the base-model prefix optional), every
    required target is there with its shape, and keys naming one shared tensor hold equal values."""
    by_key = {}
    for key, value in tensors.items():
        short = _strip(key, prefix)
        if short not in targets:
            raise _error(directory, f"holds tensor {key!r}, which is no tensor of its adapter at this model's places")
        if short in by_key:
            raise _error(directory, f"holds tensor {key!r} twice (with and without the {prefix!r} prefix)")
        by_key[short] = value
    missing = sorted(set(targets) - set(by_key) - set(optional))
    if missing:
        raise _error(directory, f"lacks tensors {missing[:4]} of its adapter")
    pairs, seen = [], {}
    for short, value in by_key.items():
        target = targets[short]
        if tuple(value.shape) != tuple(target.shape) or not value.is_floating_point():
            raise _error(directory, f"holds {short!r} as {value.dtype} {tuple(value.shape)}; this model's adapter has "
                                    f"{tuple(target.shape)}")
        first = seen.setdefault(id(target), (short, value))
        if first[1] is not value and not torch.equal(first[1], value):
            raise _error(directory, f"holds {short!r} and {first[0]!r}, copies of one shared tensor, with different values")
        pairs.append((target, value))
    return pairs


def load_adapterhub(model: nn.Module, directory, name: Optional[str] = None, *, set_active: bool = True) -> AdapterHubLoad:
    """Read an adapter saved by the ``adapters`` library into ``model`` (an ``add_adapter``-style
    transformers model of the same family and width), under ``name`` (default: the saved name). All or
    nothing: the config is mapped, every tensor's name and shape checked, before the model changes."""
    check_not_optimized(model, "load_adapterhub")
    path = _resolve(directory)
    if not (path / CONFIG_NAME).is_file():
        raise _error(path, f"has no {CONFIG_NAME}")
    meta = _read_json(path, CONFIG_NAME)
    lib_name = meta.get("name")
    if not isinstance(lib_name, str) or not lib_name:
        raise _error(path, f"has a {CONFIG_NAME} without the adapter's name")
    name = lib_name if name is None else name
    check_adapter_name(name)
    if name in adapter_configs(model):
        raise _error(path, f"holds adapter {name!r}, which this model already has (pass name=...)")
    config = adapter_config_from_library(model, meta, path)
    places = find_places(model, config)
    modules = build_adapters(model, config, places)  # prefixes as the library's: one shared MLP
    targets, optional = _library_targets(model, places, modules, lib_name)
    expected_bytes = sum(t.numel() * 4 for t in targets.values())
    prefix = getattr(model, "base_model_prefix", "")
    tensors, weights_file = _read_tensors(path, WEIGHTS, expected_bytes)
    pairs = _check_and_assign(path, tensors, targets, prefix, frozenset(optional))
    head_pairs, head = _head(model, path, prefix)
    with torch.no_grad():
        for target, value in pairs:  # the built modules, not yet in the model
            target.copy_(value)
    insert_adapter_modules(model, name, config, places, modules)
    with torch.no_grad():
        for target, value in head_pairs:
            target.copy_(value)
    if set_active:
        set_active_adapter(model, name)
    return AdapterHubLoad(name, config, weights_file, head)


def load_adapterhub_fusion(model: nn.Module, directory, name: Optional[str] = None, *, set_active: bool = True) -> str:
    """Read an AdapterFusion saved by the library's ``save_adapter_fusion`` (``adapter_fusion_config.json``
    and its weights) into ``model`` as :func:`adapterkern.add_fusion` would make it, under ``name``
    (default: the library's name with its commas as ``_``), and return the name. The fused adapters must be
    in the model first (:func:`load_adapterhub`, same names). All or nothing, as ``load_adapterhub``."""
    check_not_optimized(model, "load_adapterhub_fusion")
    path = _resolve(directory)
    if not (path / FUSION_CONFIG_NAME).is_file():
        raise _error(path, f"has no {FUSION_CONFIG_NAME}")
    meta = _read_json(path, FUSION_CONFIG_NAME)
    adapters, lib_name = meta.get("adapter_names"), meta.get("name")
    if not isinstance(adapters, list) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise _error(path, f"has adapter_names {adapters!r}; expected the fused adapters' names")
    if not isinstance(lib_name, str) or not lib_name:
        raise _error(path, f"has a {FUSION_CONFIG_NAME} without the fusion's name")
    missing = [a for a in adapters if a not in adapter_configs(model)]
    if missing:
        raise _error(path, f"fuses {adapters}; load those adapters first (this model lacks {missing})")
    name = lib_name.replace(",", "_") if name is None else name
    check_adapter_name(name)
    if name in adapter_configs(model):
        raise _error(path, f"holds fusion {name!r}, which this model already has (pass name=...)")
    try:
        spec = FusionConfig(tuple(adapters), resolve_fusion_config(meta["config"]))
        places = spec.places_in(model)
    except (TypeError, ValueError) as exc:
        raise _error(path, f"has a fusion adapterkern cannot build here ({exc})") from None
    modules = spec.build_for_load(model, places)
    prefix = getattr(model, "base_model_prefix", "")
    targets = {f"{_strip(library_location(place), prefix)}.adapter_fusion_layer.{lib_name}.{key}": tensor
               for place, module in zip(places, modules) for key, tensor in module.state_dict().items()}
    tensors, _ = _read_tensors(path, FUSION_WEIGHTS, sum(t.numel() * 4 for t in targets.values()))
    pairs = _check_and_assign(path, tensors, targets, prefix)
    with torch.no_grad():
        for target, value in pairs:
            target.copy_(value)
    insert_adapter_modules(model, name, spec, places, modules)
    if set_active:
        set_active_adapter(model, name)
    return name


def _head(model: nn.Module, directory: Path, prefix: str) -> Tuple[List[Tuple[Tensor, Tensor]], str]:
    """The (target, value) pairs of a saved classification head mapped onto ``model``'s pooler and
    classifier, and what was done; no pairs (and the reason) where the head does not map."""
    if not (directory / HEAD_CONFIG_NAME).is_file():
        return [], "no head in the directory"
    meta = _read_json(directory, HEAD_CONFIG_NAME, config_may_be_null=True)
    config, head_name = meta["config"], meta.get("name")
    if config is None:
        return _static_head(model, directory, meta, prefix)
    layout = (config.get("head_type"), config.get("layers"), str(config.get("activation_function")).lower(),
              bool(config.get("use_pooler")), config.get("bias", True))
    if layout != ("classification", 2, "tanh", False, True):
        return [], (f"not loaded: a {config.get('head_type')} head with {config.get('layers')} layers, activation "
                    f"{config.get('activation_function')!r}, use_pooler {config.get('use_pooler')}; only the two-layer tanh "
                    f"classification head on the first token maps (onto a BERT-style pooler.dense + classifier)")
    base = getattr(model, prefix, None) if prefix else None
    pooler, classifier = getattr(base, "pooler", None), getattr(model, "classifier", None)
    if not isinstance(getattr(pooler, "dense", None), nn.Linear) or not isinstance(classifier, nn.Linear):
        return [], (f"not loaded: this {type(model).__name__} has no {prefix}.pooler.dense and classifier (a BERT-style "
                    f"...ForSequenceClassification model takes this head)")
    if not isinstance(getattr(pooler, "activation", None), nn.Tanh):
        return [], "not loaded: the model's pooler does not use tanh"
    tensors, weights_file = _read_tensors(directory, HEAD_WEIGHTS, 4 * (pooler.dense.weight.numel() + classifier.weight.numel() * 2))
    targets = {f"heads.{head_name}.1.weight": pooler.dense.weight, f"heads.{head_name}.1.bias": pooler.dense.bias,
               f"heads.{head_name}.4.weight": classifier.weight, f"heads.{head_name}.4.bias": classifier.bias}
    pairs = _check_and_assign(directory, tensors, {k: t.data for k, t in targets.items()}, "")
    return pairs, f"loaded from {weights_file} into {prefix}.pooler.dense and classifier ({config.get('num_labels')} labels)"


def _static_head(model: nn.Module, directory: Path, meta: dict, prefix: str) -> Tuple[List[Tuple[Tensor, Tensor]], str]:
    """A static-head model's head (``"config": null``: ``save_adapter`` of e.g. a
    ``BertForSequenceClassification`` with ``adapters.init`` writes every weight outside the base model):
    loaded into the same model class's own modules, names and shapes checked."""
    model_class = meta.get("model_class")
    if model_class != type(model).__name__:
        return [], f"not loaded: the head of a {model_class} (this model is a {type(model).__name__})"
    own = {k: v for k, v in model.state_dict().items() if not (prefix and k.startswith(prefix + "."))}
    tensors, weights_file = _read_tensors(directory, HEAD_WEIGHTS, sum(t.numel() * 4 for t in own.values()))
    pairs = _check_and_assign(directory, tensors, own, "", frozenset(set(own) - set(tensors)))
    if not pairs:
        return [], f"not loaded: {weights_file} holds no tensors"
    return pairs, f"loaded from {weights_file} into {', '.join(sorted({k.rsplit('.', 1)[0] for k in tensors}))}"


def _library_config(model: nn.Module, config: AdapterConfig, name: str) -> Tuple[dict, int]:
    """The library's bottleneck config dict (every field) for an adapterkern config it can express, and d."""
    if config.target_modules is not None or config.placement == "mam" or config.modules_to_save:
        raise ValueError(f"name: adapter {name!r} uses target_modules, mam or modules_to_save; the adapters library's "
                         f"format has no place for them")
    places = [p for p in find_places(model, config)]
    if config.placement == "parallel" and any(p.mode != PARALLEL_SKIP for p in places):
        raise ValueError(f"name: adapter {name!r} is a parallel adapter in a pre-LN model; the library's parallel adapter "
                         f"there reads another tensor (the un-normalised stream)")
    hidden = places[0].hidden_size
    r = next(iter(adapter_modules(model, name).values())).bottleneck_size
    out = dict(_BN_DEFAULTS)
    out.update(
        mh_adapter=config.placement == "houlsby", output_adapter=True, is_parallel=config.placement == "parallel",
        original_ln_before=config.original_ln_before, non_linearity=config.activation,
        reduction_factor=hidden / r, scaling=config.scaling, leave_out=list(config.leave_out),
        init_weights="mam_adapter" if config.placement == "parallel" else "bert",
    )
    if max(1, int(hidden // out["reduction_factor"])) != r:
        raise ValueError(f"name: adapter {name!r} has bottleneck {r} of d={hidden}, which no reduction_factor gives")
    return out, hidden


def save_adapterhub(model: nn.Module, name: str, directory) -> Path:
    """Write adapter ``name`` in the ``adapters`` library's format (``adapter_config.json`` +
    ``adapter.safetensors``): ``model.load_adapter(directory, use_safetensors=True)`` reads it. Files are
    written to temporary names and renamed into place; an existing adapter there is replaced."""
    from safetensors.torch import save as save_safetensors

    from .adapter_files import replace_files

    require_adapter(model, name)
    config = adapter_configs(model)[name]
    if not isinstance(config, AdapterConfig):
        raise ValueError(f"name: {name!r} is a {config.kind}; save_adapterhub writes adapters")
    library_config, hidden = _library_config(model, config, name)
    prefix = getattr(model, "base_model_prefix", "")
    tensors = {}
    for module_name, _, slot in iter_slots(model):
        if name not in slot:
            continue
        place = Place(module_name, None, slot.mode, slot.hidden_size)
        for ours, value in slot[name].state_dict().items():
            key = f"{_strip(library_location(place), prefix)}.adapters.{name}.{_OURS_TO_LIB[ours]}"
            tensors[key] = value.detach().to("cpu", torch.float32).contiguous()
    model_config = getattr(model, "config", None)
    meta = {"config": library_config, "hidden_size": hidden,
            "model_class": type(model).__name__, "model_name": getattr(model_config, "name_or_path", "") or "",
            "model_type": getattr(model_config, "model_type", ""), "name": name, "version": LIBRARY_VERSION}
    for value in meta["config"].values():
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"name: adapter {name!r} has a non-finite config value")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    replace_files(directory, {CONFIG_NAME: (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode(),
                              WEIGHTS[0]: save_safetensors(tensors)})
    return directory

