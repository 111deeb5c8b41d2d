"""Prefix-tuning attention for Hugging Face ``transformers`` models, through their AttentionInterface.

::

    for place in attention_places(model):            # BERT/RoBERTa N.attention.self, GPT-2 N.attn, Llama N.self_attn
        slot = AdapterSlot("prefix", place.hidden_size, place.layer)
        slot["p"] = PrefixTuning(place.num_kv_heads, place.head_dim, hidden_size=place.hidden_size)
        slot.active = "p"
        place.module.add_module("bottleneck_adapters", slot)
    enable_prefix_attention(model)                   # attention implementation -> "adapterkern_prefix"
    ...
    disable_prefix_attention(model)                  # the previous implementation again

:func:`prefix_attention_forward` is registered as the attention implementation ``"adapterkern_prefix"``
(with transformers' SDPA mask builder as its mask function). In every attention module it looks at the
child ``bottleneck_adapters``: if that slot's active entry is a
:class:`~adapterkern.nn.prefix.PrefixTuning`, its ``(H_kv, l, hd)`` keys and values are prepended
(expanded over the batch; before any GQA head repetition) to the module's keys and values, the mask gets
``l`` leading columns that every query sees, and transformers' own SDPA attention runs on the result.
Otherwise the call is exactly transformers' ``"sdpa"`` attention. The prefixes never enter a KV cache:
the cache holds the real keys and the prefix is prepended again at every step.

Masks. The model builds its mask as for ``"sdpa"``: a boolean ``(B, 1, q, kv)`` mask (True: attend),
or None when SDPA's ``is_causal`` flag (or nothing) suffices. Given a mask (padding, or a causal mask
with KV-cache offsets already in it), ``l`` columns of True (boolean) or 0.0 (additive float) are
prepended. Given None on a causal module with q_len > 1, an explicit mask is built that reproduces
SDPA's ``is_causal`` (upper-left aligned: query i sees real keys 0..i; transformers only leaves the
mask out when q_len == k_len or the cache is empty, e.g. a static cache's prefill, whose unused slots
past q_len are cropped exactly as transformers' SDPA path crops them) plus all prefix columns. Given
None with q_len == 1 (decoding) or a non-causal module, no mask is needed: every key is visible.
"""
from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..nn.prefix import PrefixTuning
from .slots import check_model, layer_index, model_type, slot_of

ATTN_IMPLEMENTATION = "adapterkern_prefix"
_STATE = "_adapterkern_prefix_attention"  # model.__dict__ key: the configs' previous implementations

__all__ = [
    "ATTN_IMPLEMENTATION",
    "AttentionPlace",
    "active_prefix",
    "attention_places",
    "disable_prefix_attention",
    "enable_prefix_attention",
    "extend_with_prefix",
    "prefix_attention_enabled",
    "prefix_attention_forward",
    "register_prefix_attention",
]


def active_prefix(module: nn.Module) -> Optional[PrefixTuning]:
    """The :class:`PrefixTuning` applied in ``module``'s attention: the active entry of its
    ``bottleneck_adapters`` slot for the running call (:meth:`AdapterSlot.current`: a routing block's
    override, else the slot's own) if that is a PrefixTuning and the slot is not dropped, else None."""
    slot = slot_of(module)
    if slot is None:
        return None
    active, dropped = slot.current()
    if dropped or not isinstance(active, str) or active not in slot:
        return None
    entry = slot[active]
    return entry if isinstance(entry, PrefixTuning) else None


def extend_with_prefix(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    prefix_key: Tensor,
    prefix_value: Tensor,
    is_causal: bool,
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """Prepend prefix keys/values and extend the attention mask to match.

    Args:
        query: (B, H_q, q, hd).
        key, value: (B, H_kv, kv, hd) (the real keys, KV cache included; H_q a multiple of H_kv).
        attention_mask: None, a boolean mask (True: attend) or an additive float mask, broadcastable to
            (B, H_q, q, kv) with last dimension kv (a longer one is cut to kv, as transformers 4.x SDPA does).
        prefix_key, prefix_value: (H_kv, l, hd) or (B, H_kv, l, hd).
        is_causal: whether the module is causal (used only when ``attention_mask`` is None).

    Returns:
        ``(key, value, mask)``: keys/values (B, H_kv, l + kv', hd) and the mask for them, None when
        every query may see every key. kv' = kv, except for the mask-less causal case with kv > q,
        where keys are cut to the first q (SDPA's own behaviour there, see the module docstring).
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"query/key/value: expected (B, H, T, hd) tensors, got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}")
    batch, kv_heads, kv_len, _ = key.shape
    q_len = query.shape[2]
    if prefix_key.dim() == 3:
        prefix_key, prefix_value = prefix_key.unsqueeze(0), prefix_value.unsqueeze(0)
    if prefix_key.shape[1] != kv_heads or prefix_key.shape[-1] != key.shape[-1] or prefix_value.shape[-1] != value.shape[-1]:
        raise ValueError(
            f"prefix: keys {tuple(prefix_key.shape[1:])} / values {tuple(prefix_value.shape[1:])} do not fit this attention's "
            f"keys {tuple(key.shape[1:])} (expected ({kv_heads}, l, {key.shape[-1]}))"
        )
    length = prefix_key.shape[2]
    if prefix_value.shape[1:3] != (kv_heads, length):
        raise ValueError(f"prefix: values {tuple(prefix_value.shape)} do not match keys {tuple(prefix_key.shape)}")
    mask = attention_mask
    if mask is None:
        if is_causal and q_len > 1:
            if kv_len > q_len:  # mask-less causal with kv > q: an empty static cache's prefill (SDPA crops too)
                key, value, kv_len = key[:, :, :q_len], value[:, :, :q_len], q_len
            causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
            mask = torch.cat([causal.new_ones(q_len, length), causal], dim=-1)[None, None]
    else:
        if mask.shape[-1] > kv_len:
            mask = mask[..., :kv_len]
        elif mask.shape[-1] != kv_len:
            raise ValueError(f"attention_mask: last dimension {mask.shape[-1]}, expected the key length {kv_len}")
        if mask.dtype == torch.bool:
            pad = torch.ones(*mask.shape[:-1], length, dtype=torch.bool, device=mask.device)
        elif mask.is_floating_point():
            pad = torch.zeros(*mask.shape[:-1], length, dtype=mask.dtype, device=mask.device)
        else:
            raise TypeError(f"attention_mask: expected a bool or floating-point mask, got {mask.dtype}")
        mask = torch.cat([pad, mask], dim=-1)
    prefix_key = prefix_key.to(key.dtype).expand(batch, -1, -1, -1)
    prefix_value = prefix_value.to(value.dtype).expand(batch, -1, -1, -1)
    return torch.cat([prefix_key, key], dim=2), torch.cat([prefix_value, value], dim=2), mask


def _sdpa():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS["sdpa"]


def prefix_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs,
) -> Tuple[Tensor, None]:
    """transformers attention function: SDPA attention with ``module``'s active prefix prepended.

    query (B, H_q, q, hd), key/value (B, H_kv, kv, hd), mask as the model's SDPA mask; returns
    ``(attn_output (B, q, H_q, hd), None)``. Without an active prefix, exactly transformers' ``"sdpa"``."""
    sdpa = _sdpa()
    prefix = active_prefix(module)
    if prefix is None:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    if kwargs.get("position_bias") is not None:
        raise ValueError("prefix attention: attention with a position_bias (T5-style) is not supported")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    pk, pv = prefix.key_value()
    key, value, mask = extend_with_prefix(query, key, value, attention_mask, pk, pv, bool(causal))
    return sdpa(module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs)


def register_prefix_attention() -> str:
    """Register ``"adapterkern_prefix"`` with transformers' AttentionInterface (and the SDPA mask
    builder under the same name with AttentionMaskInterface). Idempotent; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, prefix_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    return ATTN_IMPLEMENTATION


# ------------------------------------------------------------------------------------------------
# Where prefixes go
# ------------------------------------------------------------------------------------------------

# (regex on the qualified name, attribute of the module holding head_dim), first family that matches wins
_ATTENTION_PATTERNS = [
    (r"\d+\.attention\.self", "attention_head_size"),  # BERT, RoBERTa, ELECTRA, XLM-R (not crossattention)
    (r"\d+\.attn", "head_dim"),  # GPT-2 (not crossattention)
    (r"\d+\.self_attn", "head_dim"),  # Llama, Mistral, Qwen, Gemma
]


@dataclass
class AttentionPlace:
    """One self-attention module of a model and the shapes a prefix for it needs."""

    name: str  # qualified module name
    module: nn.Module
    layer: Optional[int]
    num_kv_heads: int
    head_dim: int
    hidden_size: int  # the model's hidden size (the library's MLP input width)


def _config_int(config, *names) -> Optional[int]:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def attention_places(model: nn.Module) -> List[AttentionPlace]:
    """The self-attention modules of a BERT/RoBERTa (``N.attention.self``), GPT-2 (``N.attn``) or
    Llama/Mistral/Qwen-style (``N.self_attn``) model, in model order, with (num_kv_heads, head_dim)
    from its config (``num_key_value_heads`` if set, else the attention heads; ``head_dim`` if set,
    else hidden_size // heads), checked against the module's own head size."""
    check_model(model)
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError(f"model: a {type(model).__name__} has no .config (a Hugging Face transformers model expected)")
    hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
    heads = _config_int(config, "num_attention_heads", "n_head")
    if hidden is None or heads is None:
        raise ValueError(f"model: cannot read hidden_size / num_attention_heads from its {type(config).__name__}")
    kv_heads = _config_int(config, "num_key_value_heads") or heads
    head_dim = _config_int(config, "head_dim") or hidden // heads
    modules = [(n, m) for n, m in model.named_modules() if n]
    for pattern, head_attr in _ATTENTION_PATTERNS:
        found = [(n, m) for n, m in modules if re.search(r"(^|\.)" + pattern + "$", n)]
        if found:
            break
    else:
        raise ValueError(
            f"attention_places: cannot find the self-attention modules of this {model_type(model)} "
            f"model (known: BERT/RoBERTa N.attention.self, GPT-2 N.attn, Llama/Mistral/Qwen N.self_attn)"
        )
    places = []
    for name, module in found:
        own = getattr(module, head_attr, None)
        if isinstance(own, int) and own != head_dim:
            raise ValueError(f"{name}: head size {own}, but the config says {head_dim}")
        places.append(AttentionPlace(name, module, layer_index(name), kv_heads, head_dim, hidden))
    return places


# ------------------------------------------------------------------------------------------------
# Switching a model's attention implementation
# ------------------------------------------------------------------------------------------------


def _attention_configs(model: nn.Module) -> list:
    """The distinct configs of the model, of its sub-models (modules with a ``config``) and their sub-configs."""
    seen, out = set(), []
    stack = [getattr(module, "config", None) for module in model.modules()]
    while stack:
        config = stack.pop(0)
        if config is None or not hasattr(config, "_attn_implementation_internal") or id(config) in seen:
            continue
        seen.add(id(config))
        out.append(config)
        stack += [getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {}]
    return out


def _uses_attention_interface(module: nn.Module) -> bool:
    """Whether the attention module's code dispatches through ALL_ATTENTION_FUNCTIONS (source heuristic,
    as transformers' own ``_can_set_attn_implementation``); True when the source cannot be read."""
    for cls in type(module).__mro__:
        if cls is nn.Module or not issubclass(cls, nn.Module) or "forward" not in cls.__dict__:
            continue
        try:
            source = inspect.getsource(sys.modules[cls.__module__])
        except (OSError, TypeError, KeyError):
            return True
        return "ALL_ATTENTION_FUNCTIONS" in source
    return True


def prefix_attention_enabled(model: nn.Module) -> bool:
    return _STATE in getattr(model, "__dict__", {})


def enable_prefix_attention(model: nn.Module) -> None:
    """Switch ``model`` (and its sub-models) to the ``"adapterkern_prefix"`` attention implementation,
    remembering each config's previous one. Idempotent. Raises ``ValueError`` if the model's attention
    modules do not dispatch through transformers' AttentionInterface (e.g. BERT under transformers 4.x)."""
    places = attention_places(model)
    if prefix_attention_enabled(model):
        return
    for place in places[:1]:
        if not _uses_attention_interface(place.module):
            raise ValueError(
                f"enable_prefix_attention: {place.name} ({type(place.module).__name__}) does not dispatch through "
                f"transformers' AttentionInterface (this transformers version's {type(place.module).__name__} has its own "
                f"attention code), so prefixes cannot be applied there"
            )
    register_prefix_attention()
    configs = _attention_configs(model)
    model.__dict__[_STATE] = [(config, config._attn_implementation_internal) for config in configs]
    for config in configs:
        config._attn_implementation_internal = ATTN_IMPLEMENTATION


def disable_prefix_attention(model: nn.Module) -> None:
    """Restore the attention implementations ``enable_prefix_attention`` replaced (no-op if not enabled)."""
    check_model(model)
    saved = model.__dict__.pop(_STATE, None)
    for config, previous in saved or ():
        config._attn_implementation_internal = previous
