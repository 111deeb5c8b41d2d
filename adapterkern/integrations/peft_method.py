"""Bottleneck adapters as a PEFT method: ``get_peft_model(model, BottleneckConfig(...))``.

The tuner inserts adapterkern's adapters with :func:`adapterkern.add_adapter` (same places, same
initialisation, same fused op), so a PEFT model and an ``add_adapter`` model given the same config and
seed compute the same numbers. PEFT's own machinery does the rest: ``modules_to_save`` (task heads,
wrapped per adapter), ``save_pretrained`` (adapter tensors and heads only, safetensors, with the config),
``PeftModel.from_pretrained`` / ``AutoPeftModelFor*``, several named adapters, ``disable_adapter()``.

PEFT accepts only the method names of its closed ``PeftType`` enum: :func:`register` adds one member,
``ADAPTERKERN_BOTTLENECK``, to that enum and registers the config and tuner under it with
``peft.utils.register_peft_method``. That is the only change to PEFT, made once, for the PEFT versions in
:data:`TESTED_PEFT_VERSIONS` (others: ImportError, unless ``ADAPTERKERN_PEFT_ANY_VERSION=1``).
A saved adapter records ``"peft_type": "ADAPTERKERN_BOTTLENECK"``; PEFT without ``import adapterkern.peft``
does not know that type and fails with ``KeyError: 'ADAPTERKERN_BOTTLENECK'``.

The tuner uses these parts of PEFT: ``PeftConfig``, ``BaseTuner`` (its ``__init__``, ``active_adapters``,
``_check_new_adapter_config``, ``_enable_adapter_layers`` for the wrapped heads and the state-dict hooks
``_get_adapter_state_dict`` / ``_remove_adapter_name_from_key`` / ``_remap_adapter_state_dict_for_load``),
``BaseTunerLayer`` (one status module per model, for ``get_model_status``),
``peft.utils.other.set_additional_trainable_modules`` and ``peft.tuners.tuners_utils.set_adapter`` (the
wrapped heads), ``_delete_auxiliary_adapter``.
"""
from __future__ import annotations

import enum
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

from torch import nn

from .placement import AdapterConfig, find_places
from .slots import SLOT_ATTR, iter_slots, layer_index
from .transformers import add_adapter, delete_adapter, set_active_adapter

PEFT_TYPE_NAME = "ADAPTERKERN_BOTTLENECK"
METHOD_NAME = PEFT_TYPE_NAME.lower()
TESTED_PEFT_VERSIONS = ("0.21",)  # major.minor
PRESETS = {"pfeiffer": AdapterConfig.pfeiffer, "houlsby": AdapterConfig.houlsby, "parallel": AdapterConfig.parallel}
LOAD_HINT = "import adapterkern.peft before loading (pip install adapterkern[peft])"


def check_peft_version():
    import peft

    major_minor = ".".join(peft.__version__.split(".")[:2])
    if major_minor not in TESTED_PEFT_VERSIONS and os.environ.get("ADAPTERKERN_PEFT_ANY_VERSION") != "1":
        raise ImportError(
            f"adapterkern.peft is tested with peft {', '.join(v + '.x' for v in TESTED_PEFT_VERSIONS)}, not "
            f"{peft.__version__}: it extends PEFT's PeftType enum, whose internals may differ. Install a tested "
            f"version, or set ADAPTERKERN_PEFT_ANY_VERSION=1 to try anyway"
        )


def _add_enum_member(enum_cls: type, name: str) -> enum.Enum:
    """``enum_cls[name]``, added (value ``name``) if the enum lacks it: PeftType is a closed
    ``(str, Enum)``; this adds one member the way the enum's own metaclass lays them out."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_, member._value_ = name, name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)  # the enum metaclass refuses new members through setattr
    return member


_REGISTERED = False


def register() -> None:
    """Make ``ADAPTERKERN_BOTTLENECK`` a PEFT method (idempotent; ``import adapterkern.peft`` calls it)."""
    global _REGISTERED
    if _REGISTERED:
        return
    check_peft_version()
    from peft.utils import PeftType, register_peft_method

    _add_enum_member(PeftType, PEFT_TYPE_NAME)
    config_cls, model_cls = peft_classes()
    register_peft_method(name=METHOD_NAME, config_cls=config_cls, model_cls=model_cls, prefix=model_cls.prefix)
    _REGISTERED = True


_CLASSES: Dict[str, type] = {}


def _adapter_of(parameter_name: str) -> Optional[str]:
    """The adapter a parameter belongs to (``...bottleneck_adapters.<name>....``), None for the backbone's."""
    parts = parameter_name.split(".")
    return parts[parts.index(SLOT_ATTR) + 1] if SLOT_ATTR in parts[:-1] else None


def peft_classes():
    """(BottleneckConfig, BottleneckModel), defined on first use: their bases come from peft."""
    if not _CLASSES:
        _define_classes()
    return _CLASSES["config"], _CLASSES["model"]


def _define_classes() -> None:
    from peft import PeftConfig
    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _delete_auxiliary_adapter, set_adapter
    from peft.utils import PeftType
    from peft.utils.other import set_additional_trainable_modules

    @dataclass
    class BottleneckConfig(PeftConfig):
        """A bottleneck adapter (Houlsby / Pfeiffer / parallel) as a PEFT config.

        ``preset``: ``"pfeiffer"`` (after each FFN output), ``"houlsby"`` (after the attention and the FFN
        outputs) or ``"parallel"`` (beside the FFN; MAM's adapter: r = d/2, scaling 4, identity init).
        ``bottleneck_size`` / ``reduction_factor``, ``activation``, ``scaling`` (float, ``"learned"``,
        ``"channel"``), ``init`` (``bert``, ``houlsby``, ``mam_adapter``), ``adapter_bias``: None keeps the
        preset's (see :class:`adapterkern.AdapterConfig`). ``layers_to_transform`` (indices, or one) or
        ``leave_out``: which layers get adapters. ``target_modules``: module-name regexes of linear layers
        instead of the role table. ``modules_to_save``: PEFT's (e.g. a task head; sequence
        classification adds ``classifier`` / ``score``). ``backend``: adapterkern's kernel backend.
        """

        preset: str = field(default="pfeiffer", metadata={"help": "pfeiffer, houlsby or parallel"})
        bottleneck_size: Optional[int] = field(default=None, metadata={"help": "r; None: d / reduction_factor"})
        reduction_factor: Optional[float] = field(default=None, metadata={"help": "d / r (None: the preset's)"})
        activation: Optional[str] = field(default=None, metadata={"help": "adapters-library name (None: the preset's)"})
        scaling: Optional[Union[float, str]] = field(default=None, metadata={"help": "float, learned or channel"})
        init: Optional[str] = field(default=None, metadata={"help": "bert, houlsby or mam_adapter"})
        adapter_bias: Optional[bool] = field(default=None, metadata={"help": "biases in the adapter's projections"})
        layers_to_transform: Optional[Union[List[int], int]] = field(default=None, metadata={"help": "layers with adapters"})
        leave_out: Optional[List[int]] = field(default=None, metadata={"help": "layers without adapters"})
        target_modules: Optional[Union[List[str], str]] = field(default=None, metadata={"help": "linear-layer regexes"})
        modules_to_save: Optional[List[str]] = field(default=None, metadata={"help": "modules trained and saved too"})
        backend: str = field(default="auto", metadata={"help": "auto, torch, triton or cuda"})
        loader: str = field(default=LOAD_HINT, metadata={"help": "what loading this adapter needs"})

        def __post_init__(self):
            super().__post_init__()
            self.peft_type = PeftType[PEFT_TYPE_NAME]
            self.loader = LOAD_HINT
            if self.layers_to_transform is not None and self.leave_out:
                raise ValueError("layers_to_transform, leave_out: give one of them, not both")
            layers = self.layers_to_transform
            if layers is not None:
                layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
                if not isinstance(layers, (list, tuple)) or not layers or any(
                        isinstance(i, bool) or not isinstance(i, int) for i in layers):
                    raise ValueError(f"layers_to_transform: expected layer indices, got {self.layers_to_transform!r}")
                self.layers_to_transform = sorted(set(layers))
            self.adapter_config()  # every other field checked now, by AdapterConfig

        def adapter_config(self, leave_out: Sequence[int] = ()) -> AdapterConfig:
            """The :class:`adapterkern.AdapterConfig` of this config (``leave_out`` added to its own)."""
            if self.preset not in PRESETS:
                hint = " (MAM's adapter is 'parallel'; its prefixes are not part of this method)" if self.preset == "mam" else ""
                raise ValueError(f"preset: expected one of {', '.join(PRESETS)}, got {self.preset!r}{hint}")
            chosen = {"bottleneck_size": self.bottleneck_size, "reduction_factor": self.reduction_factor,
                      "activation": self.activation, "scaling": self.scaling, "init": self.init, "bias": self.adapter_bias}
            overrides = {k: v for k, v in chosen.items() if v is not None}
            targets = self.target_modules
            if targets is not None:
                overrides["target_modules"] = (targets,) if isinstance(targets, str) else tuple(targets)
            overrides["leave_out"] = tuple(set(self.leave_out or ()) | set(leave_out))
            return PRESETS[self.preset](backend=self.backend, **overrides)

    class BottleneckStatus(nn.Module, BaseTunerLayer):
        """What ``peft.get_model_status`` / ``get_layer_status`` report for the model's adapterkern
        adapters: one entry for all places (the adapters are enabled and activated together)."""

        adapter_layer_names = ()
        other_param_names = ()

        def __init__(self, tuner):
            super().__init__()
            self.__dict__["_tuner"] = tuner  # not a submodule: no second path to the model

        @property
        def disable_adapters(self) -> bool:
            return self._tuner.adapters_disabled

        @property
        def active_adapters(self) -> List[str]:
            return list(self._tuner.active_adapters)

        @property
        def merged_adapters(self) -> List[str]:
            return []

        def _get_available_adapters(self) -> set:
            return set(self._tuner.peft_config)

    class BottleneckModel(BaseTuner):
        """The PEFT tuner: adapters inserted by :func:`adapterkern.add_adapter`, one adapterkern adapter per
        PEFT adapter name. One adapter is active at a time."""

        prefix = f"{SLOT_ATTR}."
        tuner_layer_cls = BottleneckStatus
        target_module_mapping: Dict[str, List[str]] = {}

        def __init__(self, model, peft_config, adapter_name, low_cpu_mem_usage=False, state_dict=None):
            self.adapters_disabled = False
            super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)
            self.status = BottleneckStatus(self)

        # --- adapters in, out, on and off
        def inject_adapter(self, model, adapter_name, autocast_adapter_dtype=True, low_cpu_mem_usage=False,
                           state_dict=None):
            """``add_adapter(model, adapter_name, ...)`` with this adapter's config, all or nothing; then PEFT's
            housekeeping (the active adapter, what trains, ``modules_to_save``). ``low_cpu_mem_usage`` and
            ``state_dict`` are accepted and not needed: the places come from the config, the adapters are small."""
            config = self.peft_config[adapter_name]
            if not isinstance(config, BottleneckConfig):
                raise TypeError(f"peft_config: expected a BottleneckConfig, got {type(config).__name__}")
            self._check_new_adapter_config(config)
            adapter_config = config.adapter_config(self._left_out_layers(model, config))
            add_adapter(model, adapter_name, adapter_config, set_active=False)
            places = [name for name, _, slot in iter_slots(model) if adapter_name in slot]
            self.targeted_module_names.extend(n for n in places if n not in self.targeted_module_names)
            self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)
            self._mark_only_adapters_as_trainable(model)
            set_additional_trainable_modules(model=model, peft_config=config, model_config=BaseTuner.get_model_config(self),
                                             adapter_name=adapter_name,
                                             activate_adapter=adapter_name in self.active_adapters)

        @staticmethod
        def _left_out_layers(model, config) -> List[int]:
            """The layers ``layers_to_transform`` leaves out (ValueError for an index with no place)."""
            if config.layers_to_transform is None:
                return []
            layers = {layer_index(p.name) for p in find_places(model, config.adapter_config())}
            unknown = sorted(set(config.layers_to_transform) - layers)
            if unknown:
                raise ValueError(f"layers_to_transform: this model has no layers {unknown} with adapter places "
                                 f"(its layers: {sorted(i for i in layers if i is not None)})")
            return sorted(i for i in layers if i is not None and i not in config.layers_to_transform)

        def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
            names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
            if len(names) != 1:
                raise ValueError(f"adapter_name: one adapter is active at a time, got {names}")
            (name,) = names
            if name not in self.peft_config:
                raise ValueError(f"adapter_name: no adapter {name!r} (this model has {sorted(self.peft_config)})")
            set_adapter(self.model, name, inference_mode=inference_mode, layer_cls=BottleneckStatus)  # wrapped heads
            for param_name, p in self.model.named_parameters():
                owner = _adapter_of(param_name)
                if owner is not None:
                    p.requires_grad_(owner == name and not inference_mode)
            self.active_adapter = name
            if not self.adapters_disabled:
                set_active_adapter(self.model, name)

        def _enable_adapter_layers(self, enabled: bool = True) -> None:
            super()._enable_adapter_layers(enabled)  # the wrapped heads
            self.adapters_disabled = not enabled
            set_active_adapter(self.model, self.active_adapters[0] if enabled and self.active_adapters else None)

        def delete_adapter(self, adapter_name: str) -> None:
            if adapter_name not in self.peft_config:
                raise ValueError(f"Adapter {adapter_name} does not exist")
            delete_adapter(self.model, adapter_name)
            del self.peft_config[adapter_name]
            if adapter_name in self.active_adapters:  # PEFT's rule: the first remaining adapter becomes active
                self.active_adapter = list(self.peft_config)[:1]
            _delete_auxiliary_adapter(self.model, adapter_name, new_active_adapters=self.active_adapters)
            set_active_adapter(self.model, self.active_adapters[0] if self.active_adapters and not self.adapters_disabled
                               else None)

        def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
            """Everything frozen but the active adapter, unless its config is in inference mode (the wrapped
            heads manage their own flags)."""
            from peft.utils.other import AuxiliaryTrainingWrapper

            wrapped = {id(p) for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper) for p in m.parameters()}
            trainable = {n for n in self.active_adapters if not self.peft_config[n].inference_mode}
            for name, p in model.named_parameters():
                if id(p) not in wrapped:
                    p.requires_grad_(_adapter_of(name) in trainable)

        # --- what PEFT may not do with a bottleneck adapter
        def _check_merge_allowed(self):
            raise ValueError(
                "merge_and_unload / merge_adapter: a bottleneck adapter is not a weight delta (it has a non-linearity "
                "between its projections), so it cannot be merged into the backbone's weights. For inference at "
                "no extra memory traffic use adapterkern.optimize_for_inference(peft_model.get_base_model()), which "
                "merges parallel adapters into the FFN's matmuls and fuses sequential ones with the residual add"
            )

        def merge_adapter(self, adapter_names=None, safe_merge: bool = False) -> None:
            self._check_merge_allowed()

        def _unload_and_optionally_merge(self, merge=True, progressbar=False, safe_merge=False, adapter_names=None):
            if merge:
                self._check_merge_allowed()
            for name in list(self.peft_config):
                delete_adapter(self.model, name)
            return super()._unload_and_optionally_merge(merge=False)

        def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
            return False

        def _prepare_adapter_config(self, peft_config, model_config):
            return peft_config

        def _create_and_replace(self, *args, **kwargs):  # inject_adapter does not replace modules
            raise NotImplementedError("BottleneckModel inserts adapters with adapterkern.add_adapter")

        @staticmethod
        def _check_target_module_exists(peft_config, key):
            return False

        # --- the state dict: keys "<place>.bottleneck_adapters.<name>.<tensor>" saved without "<name>."
        @classmethod
        def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
            marker = f".{SLOT_ATTR}.{adapter_name}."
            return {k: v for k, v in state_dict.items() if marker in f".{k}"}

        @classmethod
        def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
            return f".{key}".replace(f".{SLOT_ATTR}.{adapter_name}.", f".{SLOT_ATTR}.", 1)[1:]

        @classmethod
        def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
            checkpoint_to_model = {}
            for model_key in cls._get_adapter_state_dict(model, config, adapter_name, model.state_dict(), []):
                checkpoint_key = cls._remove_adapter_name_from_key(model_key, adapter_name)
                checkpoint_to_model[checkpoint_key] = model_key
                if not model_key.startswith("base_model.model."):
                    checkpoint_to_model["base_model.model." + checkpoint_key] = model_key
            return {checkpoint_to_model.get(k, k): v for k, v in state_dict.items()}

    BottleneckConfig.__module__ = BottleneckModel.__module__ = BottleneckStatus.__module__ = "adapterkern.peft"
    _CLASSES.update(config=BottleneckConfig, model=BottleneckModel, status=BottleneckStatus)
