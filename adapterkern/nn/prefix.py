"""Prefix tuning (Li & Liang 2021), the attention half of the MAM adapter (He et al. 2022).

Each attention layer gets ``l`` learned key and value vectors per key/value head, prepended to the
layer's own keys and values (:mod:`adapterkern.integrations.prefix_attention` does the attention).
During training the prefixes are *reparametrised*, as in the AdapterHub ``adapters`` library::

    E          = embedding table                       (l, d)      # d: the model's hidden size
    h          = act(E @ W1.T + b1)                    (l, b)      # b: bottleneck (800 in MAMConfig)
    kv         = h @ W2.T + b2                         (l, n_layers * 2 * H * hd)
    k, v of layer i = kv.view(l, n_layers, 2, H, hd)[:, i, 0 / 1].transpose(0, 1)   each (H, l, hd)

Like the library, one such MLP (a :class:`PrefixEncoder`) can serve every layer of a model
(:meth:`PrefixTuning.shared`); a :class:`PrefixTuning` built on its own owns an MLP for one layer.
:meth:`PrefixTuning.collapse` evaluates the MLP once and keeps only the resulting ``(H, l, hd)``
key and value tensors as parameters: that is the form for inference and for saving.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import get_activation

__all__ = ["PrefixEncoder", "PrefixTuning", "prefix_from_adapterhub"]


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what}: expected a positive int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{what}: expected a positive int, got {value}")
    return value


def _check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout: expected a float in [0, 1), got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: expected a float in [0, 1), got {p}")
    return float(p)


class _Act(nn.Module):
    """An activation by ``adapters``-library name, as a module (slot 1 of ``control_trans``)."""

    def __init__(self, name: str):
        super().__init__()
        self.name = get_activation(name).name
        self.fn = get_activation(name).fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return self.name


class PrefixEncoder(nn.Module):
    """The reparametrisation MLP of prefix tuning, for ``num_layers`` attention layers at once.

    Parameter names and layout are the ``adapters`` library's ``PrefixTuning`` module's
    (``wte.weight`` (l, d), ``control_trans.0`` Linear(d, b), ``control_trans.2`` Linear(b,
    num_layers * 2 * H * hd)), so ``encoder.load_state_dict(library_module.state_dict())`` works;
    the initialisation is the library's too (torch defaults: N(0, 1) embedding, Kaiming-uniform linears).

    Args:
        num_layers: how many attention layers the output feeds (1 for a per-layer MLP).
        num_kv_heads: H, key/value heads per layer.
        head_dim: hd.
        prefix_length: l.
        bottleneck_size: b.
        hidden_size: d, the width of the embedding table (the library uses the model's hidden size).
        non_linearity: an ``adapters``-library activation name (default ``"tanh"``, the library's).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        prefix_length: int = 30,
        bottleneck_size: int = 800,
        hidden_size: Optional[int] = None,
        non_linearity: str = "tanh",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.num_layers = _positive_int(num_layers, "num_layers")
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.prefix_length = _positive_int(prefix_length, "prefix_length")
        self.bottleneck_size = _positive_int(bottleneck_size, "bottleneck_size")
        self.hidden_size = num_kv_heads * head_dim if hidden_size is None else _positive_int(hidden_size, "hidden_size")
        factory = {"device": device, "dtype": dtype}
        self.wte = nn.Embedding(self.prefix_length, self.hidden_size, **factory)
        self.control_trans = nn.Sequential(
            nn.Linear(self.hidden_size, self.bottleneck_size, **factory),
            _Act(non_linearity),
            nn.Linear(self.bottleneck_size, self.num_layers * 2 * self.num_kv_heads * self.head_dim, **factory),
        )

    @property
    def non_linearity(self) -> str:
        return self.control_trans[1].name

    def key_value(self, layer: int = 0) -> Tuple[Tensor, Tensor]:
        """Layer ``layer``'s prefix keys and values, each (num_kv_heads, prefix_length, head_dim).

        Only that layer's rows of the second projection are evaluated."""
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.num_layers:
            raise ValueError(f"layer: expected an int in [0, {self.num_layers}), got {layer!r}")
        width = 2 * self.num_kv_heads * self.head_dim
        down, act, up = self.control_trans
        h = act(F.linear(self.wte.weight, down.weight, down.bias))  # (l, b)
        rows = slice(layer * width, (layer + 1) * width)
        kv = F.linear(h, up.weight[rows], None if up.bias is None else up.bias[rows])  # (l, 2 * H * hd)
        kv = kv.view(self.prefix_length, 2, self.num_kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return kv[0], kv[1]

    def forward(self) -> Tensor:
        """Every layer's prefixes: (num_layers, 2, num_kv_heads, prefix_length, head_dim) (index 0 keys, 1 values)."""
        kv = self.control_trans(self.wte.weight)  # (l, num_layers * 2 * H * hd)
        kv = kv.view(self.prefix_length, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        return kv.permute(1, 2, 3, 0, 4)

    def extra_repr(self) -> str:
        return (
            f"num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
            f"prefix_length={self.prefix_length}, bottleneck_size={self.bottleneck_size}, hidden_size={self.hidden_size}"
        )


class PrefixTuning(nn.Module):
    """Learned key/value prefixes for ONE attention module.

    :meth:`key_value` (= ``forward()``) returns ``(k, v)``, each ``(num_kv_heads, prefix_length,
    head_dim)``; the attention prepends them (expanded over the batch) to the layer's keys and values.

    Two forms:

    * reparametrised (``reparametrize=True``): the prefixes are the output of a :class:`PrefixEncoder`
      (attribute ``encoder``; parameters ``encoder.wte.weight``, ``encoder.control_trans.{0,2}.*``).
      By default the module owns an encoder for itself alone; :meth:`shared` builds the modules of a
      whole model around ONE encoder (the ``adapters`` library's layout: one MLP, ``n_layers * 2 * H * hd``
      outputs), each module reading its layer's slice. A shared encoder is a child of every module that
      uses it (``parameters()`` of a model lists it once; each module's ``state_dict()`` repeats it).
    * collapsed (``reparametrize=False``, or after :meth:`collapse`): two parameters ``prefix_key`` and
      ``prefix_value``, each ``(num_kv_heads, prefix_length, head_dim)``, no MLP. A fresh collapsed
      module starts from N(0, 1) (the library's ``FlatPrefixTuning``).

    Args:
        num_kv_heads: H, the attention's key/value heads (< query heads under GQA).
        head_dim: hd.
        prefix_length: l (default 30).
        bottleneck_size: b of the reparametrisation MLP (default 800, ``adapters.MAMConfig``'s).
        reparametrize: whether to build the MLP (training form) or plain prefixes.
        hidden_size: d, the embedding width of the MLP (default ``num_kv_heads * head_dim``; the
            library uses the model's hidden size: pass it to import library weights).
        non_linearity: the MLP's activation (default ``"tanh"``).
        dropout: dropout on the prefixes in training mode (one mask for the whole batch; default 0).
        encoder, layer: use row block ``layer`` of an existing (shared) :class:`PrefixEncoder`
            instead of a fresh one; its sizes must match.
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        prefix_length: int = 30,
        bottleneck_size: int = 800,
        reparametrize: bool = True,
        hidden_size: Optional[int] = None,
        device=None,
        dtype=None,
        *,
        non_linearity: str = "tanh",
        dropout: float = 0.0,
        encoder: Optional[PrefixEncoder] = None,
        layer: int = 0,
    ):
        super().__init__()
        self.num_kv_heads = _positive_int(num_kv_heads, "num_kv_heads")
        self.head_dim = _positive_int(head_dim, "head_dim")
        self.prefix_length = _positive_int(prefix_length, "prefix_length")
        self.bottleneck_size = _positive_int(bottleneck_size, "bottleneck_size")
        if hidden_size is not None:
            _positive_int(hidden_size, "hidden_size")
        if not isinstance(reparametrize, bool):
            raise TypeError(f"reparametrize: expected a bool, got {type(reparametrize).__name__}")
        self.dropout = _check_dropout(dropout)
        self.layer = 0
        if encoder is not None:
            if not isinstance(encoder, PrefixEncoder):
                raise TypeError(f"encoder: expected a PrefixEncoder, got {type(encoder).__name__}")
            if not reparametrize:
                raise ValueError("encoder: given with reparametrize=False; a collapsed prefix has no encoder")
            for attr, mine in (("num_kv_heads", num_kv_heads), ("head_dim", head_dim), ("prefix_length", prefix_length),
                               ("bottleneck_size", bottleneck_size), ("hidden_size", hidden_size)):
                theirs = getattr(encoder, attr)
                if mine is not None and theirs != mine:
                    raise ValueError(f"encoder: has {attr}={theirs}, this prefix was asked for {attr}={mine}")
            if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < encoder.num_layers:
                raise ValueError(f"layer: expected an int in [0, {encoder.num_layers}) (the encoder's layers), got {layer!r}")
            self.encoder = encoder
            self.layer = layer
        elif reparametrize:
            self.encoder = PrefixEncoder(1, num_kv_heads, head_dim, prefix_length, bottleneck_size, hidden_size,
                                         non_linearity, device=device, dtype=dtype)
        else:
            shape = (num_kv_heads, prefix_length, head_dim)
            self.prefix_key = nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
            self.prefix_value = nn.Parameter(torch.randn(shape, device=device, dtype=dtype))
        self.hidden_size = self.encoder.hidden_size if self.reparametrized else (
            num_kv_heads * head_dim if hidden_size is None else hidden_size
        )

    @classmethod
    def shared(
        cls,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        prefix_length: int = 30,
        bottleneck_size: int = 800,
        hidden_size: Optional[int] = None,
        device=None,
        dtype=None,
        *,
        non_linearity: str = "tanh",
        dropout: float = 0.0,
    ) -> List["PrefixTuning"]:
        """``num_layers`` reparametrised prefixes around ONE :class:`PrefixEncoder` (the library's
        layout; its ``n_layers * 2 * H * hd`` outputs split by layer): entry i reads row block i."""
        encoder = PrefixEncoder(num_layers, num_kv_heads, head_dim, prefix_length, bottleneck_size, hidden_size,
                                non_linearity, device=device, dtype=dtype)
        return [
            cls(num_kv_heads, head_dim, prefix_length, bottleneck_size, True, hidden_size, dropout=dropout,
                encoder=encoder, layer=i)
            for i in range(num_layers)
        ]

    @property
    def reparametrized(self) -> bool:
        """True while the prefixes come from an MLP (False once collapsed)."""
        return "encoder" in self._modules

    def _raw_key_value(self) -> Tuple[Tensor, Tensor]:
        if self.reparametrized:
            return self.encoder.key_value(self.layer)
        return self.prefix_key, self.prefix_value

    def key_value(self) -> Tuple[Tensor, Tensor]:
        """``(k, v)``, each (num_kv_heads, prefix_length, head_dim), differentiable w.r.t. this module's parameters."""
        k, v = self._raw_key_value()
        if self.dropout > 0 and self.training:
            k, v = F.dropout(k, self.dropout, True), F.dropout(v, self.dropout, True)
        return k, v

    def forward(self) -> Tuple[Tensor, Tensor]:
        return self.key_value()

    @torch.no_grad()
    def collapse(self) -> "PrefixTuning":
        """Replace the MLP by plain parameters ``prefix_key`` / ``prefix_value`` holding its current
        output (in place; the prefixes, hence the outputs, stay bitwise the same). They require grad
        if the MLP's parameters did. No-op on a collapsed module. Returns self."""
        if not self.reparametrized:
            return self
        requires_grad = any(p.requires_grad for p in self.encoder.parameters())
        k, v = self.encoder.key_value(self.layer)
        del self.encoder  # a shared encoder stays with the modules still using it
        self.layer = 0
        self.prefix_key = nn.Parameter(k.detach().clone(), requires_grad=requires_grad)
        self.prefix_value = nn.Parameter(v.detach().clone(), requires_grad=requires_grad)
        return self

    @torch.no_grad()
    def collapsed_state_dict(self) -> Dict[str, Tensor]:
        """``{"prefix_key": k, "prefix_value": v}`` (detached copies, each (num_kv_heads, prefix_length,
        head_dim)): the state dict this module would have after :meth:`collapse`, without changing it
        (what to save; loads into ``PrefixTuning(..., reparametrize=False)``)."""
        k, v = self._raw_key_value()
        return {"prefix_key": k.detach().clone(), "prefix_value": v.detach().clone()}

    def extra_repr(self) -> str:
        form = (f"reparametrized (bottleneck_size={self.bottleneck_size}, layer {self.layer} of "
                f"{self.encoder.num_layers})" if self.reparametrized else "collapsed")
        return f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, prefix_length={self.prefix_length}, {form}"


# ------------------------------------------------------------------------------------------------
# Import from the AdapterHub ``adapters`` library
# ------------------------------------------------------------------------------------------------


def _library_module(source: Any, name: Optional[str], location_key: str) -> nn.Module:
    if isinstance(source, nn.Module) and type(source).__name__ in ("PrefixTuning", "FlatPrefixTuning") and hasattr(source, "n_layers"):
        return source
    if not isinstance(source, nn.Module):
        raise TypeError(f"source: expected an adapters-library prefix module or model, got {type(source).__name__}")
    pools = [m for m in source.modules() if type(m).__name__ == "PrefixTuningPool"]
    if not pools:
        raise TypeError(
            f"source: a {type(source).__name__} is neither an adapters-library PrefixTuning / FlatPrefixTuning module "
            f"nor a model holding a PrefixTuningPool"
        )
    if name is None:
        raise ValueError("name: required when source is a model (the adapter whose prefixes to import)")
    group = pools[0].prefix_tunings[name] if name in pools[0].prefix_tunings else None
    if group is None:
        raise ValueError(f"name: the model has no prefix tuning {name!r} (it has {list(pools[0].prefix_tunings)})")
    if location_key not in group:
        raise ValueError(f"location_key: {location_key!r} not in adapter {name!r} (it has {list(group.keys())})")
    for layer in source.modules():
        if type(layer).__name__ == "PrefixTuningLayer" and name in getattr(layer, "prefix_gates", {}):
            raise ValueError(f"adapter {name!r} uses prefix gating (use_gating=True), which adapterkern does not implement")
    return group[location_key]


def prefix_from_adapterhub(
    source: Any, name: Optional[str] = None, location_key: str = "self_prefix", *, collapse: bool = False
) -> List[PrefixTuning]:
    """adapterkern prefixes with the weights of an AdapterHub ``adapters``-library prefix tuning.

    Args:
        source: the library's per-location module (``PrefixTuning`` or the ejected ``FlatPrefixTuning``,
            found at ``model.base_model.prefix_tuning.prefix_tunings[name][location_key]``), or a model
            set up by the library (then ``name`` is required).
        name: the adapter's name (when ``source`` is a model).
        location_key: which prefix group of the model (``"self_prefix"`` for BERT / RoBERTa / GPT-2 /
            Llama self-attention; ``"cross_prefix"``, ``"encoder_prefix"`` for encoder-decoders).
        collapse: return collapsed prefixes (plain tensors) instead of reparametrised ones.

    Returns:
        One :class:`PrefixTuning` per layer holding the prefix, in the library's prefix order (layer
        order, layers in ``leave_out`` skipped): entry i reproduces the library's ``(key, value)`` of
        prefix i, ``(batch, H, l, hd)`` there, ``(H, l, hd)`` here. A reparametrised source gives modules
        around one shared :class:`PrefixEncoder` holding copies of the library's weights.
    """
    lib = _library_module(source, name, location_key)
    config = lib.config
    dropout = float(getattr(config, "dropout", 0.0) or 0.0)
    n_layers, heads, hd, l = int(lib.n_layers), int(lib.n_heads), int(lib.n_embd_per_head), int(config.prefix_length)
    if isinstance(lib.control_trans, nn.Parameter):  # FlatPrefixTuning: (l, n_layers, 2, H, hd) flattened
        flat = lib.control_trans.detach()
        if flat.numel() != l * n_layers * 2 * heads * hd:
            raise ValueError(
                f"source: a FlatPrefixTuning of {flat.numel()} values is not prefix_length {l} x {n_layers} layers x 2 x "
                f"{heads} heads x {hd} (an ejected prefix of a model whose H * hd != hidden size?)"
            )
        kv = flat.view(l, n_layers, 2, heads, hd).permute(1, 2, 3, 0, 4)
        out = []
        for i in range(n_layers):
            p = PrefixTuning(heads, hd, l, int(getattr(config, "bottleneck_size", 800)), reparametrize=False,
                             hidden_size=int(lib.input_size), device=flat.device, dtype=flat.dtype, dropout=dropout)
            with torch.no_grad():
                p.prefix_key.copy_(kv[i, 0])
                p.prefix_value.copy_(kv[i, 1])
            out.append(p)
        return out
    ref = lib.wte.weight
    prefixes = PrefixTuning.shared(
        n_layers, heads, hd, l, int(config.bottleneck_size), hidden_size=int(lib.input_size),
        device=ref.device, dtype=ref.dtype, non_linearity=str(config.non_linearity).lower(), dropout=dropout,
    )
    state = {k: v for k, v in lib.state_dict().items() if k.startswith(("wte.", "control_trans."))}
    prefixes[0].encoder.load_state_dict(state)
    if collapse:
        for p in prefixes:
            p.collapse()
    return prefixes
