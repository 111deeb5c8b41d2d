"""AdapterFusion (Pfeiffer et al. 2021, https://arxiv.org/abs/2005.00247) with the semantics of the
AdapterHub ``adapters`` library (1.x: ``BertFusion`` in ``adapters/methods/modeling.py``; the presets
in ``adapters/configuration/adapter_fusion_config.py``; how it is fed in ``compose_fuse`` of
``adapters/methods/bottleneck.py``; the regularisation term in ``get_fusion_regularization_loss`` of
``adapters/model_mixin.py``).

With ``u_n`` the N adapters' outputs ``scaling_n * up_n(act(down_n(x)))`` (no residual; what
:func:`adapterkern.multi_adapter` returns with ``add_residual=False``), ``z`` the query and ``h`` the
residual, the library computes::

    s_n = u_n + h  if residual_before  else  u_n       (compose_fuse passes one tensor as key and
                                                        value, so BertFusion's in-place
                                                        ``value +=`` of the residual reaches the keys too)
    q   = W_q z + b_q          (z itself without ``query``)
    k_n = W_k s_n + b_k        (s_n itself without ``key``)
    v_n = W_v s_n              (no bias; s_n itself without ``value``)
    a   = softmax(dropout(q . k_n) / T)  over n      (no 1/sqrt(d); dropout on the scores)
    out = sum_n a_n v_n  (+ h  unless residual_before)

``value_before_softmax=False`` applies W_v after the weighted sum instead; W_v has no bias, so both
placements are the same function, and so is this module's evaluation, which uses the identities
``q . (W_k s + b_k) = (W_k^T q) . s + q . b_k`` and ``sum_n a_n W_v s_n = W_v sum_n a_n s_n``
(with ``sum_n a_n = 1`` for the residual): the two d x d projections run on the T query rows, not
on the N*T stack rows, and no (N, ..., d) key or value tensor is built. The results equal the
library's up to rounding (tests/test_integrations_adapterhub_fusion.py compares in float64 and float32).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..backends import MULTI, implements
from ..functional import bottleneck_adapter, multi_adapter
from .bottleneck import BottleneckAdapter, layout, stack_adapters

__all__ = [
    "FUSION_CONFIGS",
    "AdapterFusion",
    "freeze_for_fusion_training",
    "fuse_adapters",
    "fusion_regularization_loss",
    "resolve_fusion_config",
]

FIELDS = (
    "key", "query", "value", "query_before_ln", "regularization", "residual_before", "temperature",
    "value_before_softmax", "value_initialized", "dropout_prob",
)
# adapter_fusion_config.py: StaticAdapterFusionConfig and DynamicAdapterFusionConfig.
FUSION_CONFIGS = {
    "static": dict(key=True, query=True, value=False, query_before_ln=False, regularization=False, residual_before=False,
                   temperature=False, value_before_softmax=True, value_initialized=False, dropout_prob=None),
    "dynamic": dict(key=True, query=True, value=True, query_before_ln=False, regularization=True, residual_before=False,
                    temperature=False, value_before_softmax=True, value_initialized=True, dropout_prob=None),
}


def resolve_fusion_config(config) -> dict:
    """A full fusion config as a plain dict of the library's ten fields.

    ``config``: ``"dynamic"`` or ``"static"`` (the library's presets); a mapping, read as overrides of
    the ``"dynamic"`` preset (the library's default), so a full dict such as the library's
    ``AdapterFusionConfig.to_dict()`` is taken as it is; a dataclass (e.g. the library's
    ``AdapterFusionConfig``) or any object with ``to_dict()``. Unknown fields are a ``ValueError``.
    """
    if isinstance(config, str):
        if config not in FUSION_CONFIGS:
            raise ValueError(f"config: unknown fusion config {config!r}; expected one of {', '.join(FUSION_CONFIGS)}, a dict or a dataclass")
        return dict(FUSION_CONFIGS[config])
    if isinstance(config, Mapping):
        fields = dict(config)
    elif hasattr(config, "to_dict") and callable(config.to_dict):
        fields = dict(config.to_dict())
    elif dataclasses.is_dataclass(config) and not isinstance(config, type):
        fields = dataclasses.asdict(config)
    else:
        raise TypeError(f"config: expected 'dynamic', 'static', a dict or a dataclass, got {type(config).__name__}")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ValueError(f"config: unknown fusion config field(s) {', '.join(unknown)}; expected a subset of {', '.join(FIELDS)}")
    p = fields.get("dropout_prob")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1):
        raise ValueError(f"config: dropout_prob must be None or a float in [0, 1), got {p!r}")
    return {**FUSION_CONFIGS["dynamic"], **fields}


def _init_bert_(linear: nn.Linear) -> None:
    """The library's ``Adapter.init_bert_weights``: normal(0, 0.02) weight, zero bias."""
    with torch.no_grad():
        linear.weight.normal_(mean=0.0, std=0.02)
        if linear.bias is not None:
            linear.bias.zero_()


class AdapterFusion(nn.Module):
    """AdapterFusion over N adapters' outputs, as the ``adapters`` library's ``BertFusion``.

    Args:
        hidden_size: d.
        num_adapters: N, checked on every call when given (None: any N >= 1).
        config: ``"dynamic"`` (query, key, value, value initialised near the identity, regularisation
            term), ``"static"`` (query and key, no value), or a dict / dataclass of the library's
            fields (see :func:`resolve_fusion_config`).
        attention_probs_dropout_prob: the dropout on the scores when the config's ``dropout_prob`` is
            None or 0; the library takes it from the model config then (``fusion_config.dropout_prob
            or model_config.attention_probs_dropout_prob`` in the bottleneck layer's fusion set-up; BERT's is 0.1).

    Submodules and attributes have the library's names, so ``load_state_dict(bert_fusion.state_dict())``
    works both ways: ``query``, ``key`` (``nn.Linear(d, d)``, bert init), ``value`` (``nn.Linear(d, d,
    bias=False)``: identity with 1e-6 off the diagonal when ``value_initialized``, else bert init),
    ``dense`` (``nn.Linear(d, 1)``, only when query, key and value are all off; unused, as in the
    library), ``dropout``; ``T`` (a Python float, not in the state dict) and ``reduction``.

    Temperature (``BertFusion.__init__`` and ``forward``): ``T`` starts at 50.0 with ``temperature=True`` (else
    1.0), ``reduction = T / 1000``, and **every** forward call, in training and in eval mode alike and
    under ``torch.no_grad()`` too, divides the scores by the current ``T`` and then sets
    ``T = max(T - reduction, 1.0)``: from the 982nd call on, T is 1 (float steps of 0.05). This is
    the library's behaviour, replicated exactly (the same float operations): evaluation calls
    advance the schedule too. Set ``module.T`` to control it yourself.

    ``query_before_ln`` and ``regularization`` are kept in :attr:`config` but, as in the library,
    not read here: the first says which tensor the caller passes as ``query`` (the bottleneck layer's ``compose_fuse``),
    and the library adds the regularisation term whenever a fusion layer has a trainable value matrix
    (``get_fusion_regularization_loss``, and the ``adapters`` trainer's training step), whatever ``regularization`` says: see :meth:`regularization_loss`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_adapters: Optional[int] = None,
        config="dynamic",
        *,
        attention_probs_dropout_prob: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size: expected a positive int, got {hidden_size!r}")
        if num_adapters is not None and (isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 1):
            raise ValueError(f"num_adapters: expected None or a positive int, got {num_adapters!r}")
        self.config = resolve_fusion_config(config)
        self.hidden_size = hidden_size
        self.num_adapters = num_adapters
        p = self.config["dropout_prob"] or attention_probs_dropout_prob or 0.0
        self.dropout = nn.Dropout(float(p))
        factory = {"device": device, "dtype": dtype}
        d, cfg = hidden_size, self.config
        # Created and initialised in the library's order (``BertFusion.__init__``), so the same seed gives
        # the same initial weights.
        if not cfg["query"] and not cfg["key"] and not cfg["value"]:
            self.dense = nn.Linear(d, 1, **factory)  # the library creates it and never uses it
        if cfg["query"]:
            self.query = nn.Linear(d, d, **factory)
            _init_bert_(self.query)
        if cfg["key"]:
            self.key = nn.Linear(d, d, **factory)
            _init_bert_(self.key)
        if cfg["value"]:
            self.value = nn.Linear(d, d, bias=False, **factory)
            _init_bert_(self.value)
            if cfg["value_initialized"]:
                with torch.no_grad():
                    self.value.weight.fill_(0.000001).fill_diagonal_(1.0)
        self.T = 50.0 if cfg["temperature"] else 1.0
        self.reduction = self.T / 1000.0

    # -- checks --------------------------------------------------------------------------------
    def _check(self, query, adapter_outputs, residual) -> int:
        d = self.hidden_size
        param = next(self.parameters())
        for name, t in (("query", query), ("adapter_outputs", adapter_outputs), ("residual", residual)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype != param.dtype:
                raise TypeError(f"{name}: expected dtype {param.dtype} (the fusion's parameters' dtype), got {t.dtype}")
            if t.device != param.device:
                raise ValueError(f"{name}: expected device {param.device} (the fusion's parameters' device), got {t.device}")
        if query.dim() < 1 or query.shape[-1] != d:
            raise ValueError(f"query: expected shape (..., {d}) (hidden_size {d}), got {tuple(query.shape)}")
        if adapter_outputs.dim() != query.dim() + 1 or adapter_outputs.shape[1:] != query.shape or adapter_outputs.shape[0] < 1:
            raise ValueError(
                f"adapter_outputs: expected shape (N, *query.shape) = (N, {', '.join(map(str, query.shape))}) with N >= 1 "
                f"(the stack multi_adapter returns with add_residual=False), got {tuple(adapter_outputs.shape)}"
            )
        n = adapter_outputs.shape[0]
        if self.num_adapters is not None and n != self.num_adapters:
            raise ValueError(f"adapter_outputs: expected N = {self.num_adapters} adapters (num_adapters), got {n}")
        if residual.shape != query.shape:
            raise ValueError(f"residual: expected query's shape {tuple(query.shape)}, got {tuple(residual.shape)}")
        return n

    # -- forward -------------------------------------------------------------------------------
    def forward(self, query: Tensor, adapter_outputs: Tensor, residual: Tensor, *, output_attentions: bool = False):
        """Fuse N adapter outputs.

        Args:
            query: (..., d), the library's ``query`` (the adapters' input after the sublayer's
                LayerNorm, or before it with ``query_before_ln``).
            adapter_outputs: (N, ..., d), the adapters' ``scaling * up(...)`` without residual,
                stacked on dim 0 (:func:`adapterkern.multi_adapter` with ``add_residual=False``; the
                library stacks the same on dim -2).
            residual: (..., d), the library's ``adapter_residual``.
            output_attentions: also return the attention probabilities, (..., N), detached.

        Returns:
            (..., d) in the inputs' dtype (and the probabilities with ``output_attentions``). The
            scores' softmax runs in float32 for float16/bfloat16 inputs.
        """
        self._check(query, adapter_outputs, residual)
        cfg = self.config
        q = self.query(query) if cfg["query"] else query
        # scores_n = q . (W_k s_n + b_k) = (W_k^T q) . s_n + q . b_k, with s_n = u_n (+ h): the key
        # projection runs once per token instead of once per token and adapter.
        if cfg["key"]:
            qk = torch.matmul(q, self.key.weight)
            shift = torch.matmul(q, self.key.bias).unsqueeze(-1) if self.key.bias is not None else None
        else:
            qk, shift = q, None
        if cfg["residual_before"]:  # keys are u_n + h (key is value in compose_fuse)
            r_term = torch.einsum("...d,...d->...", qk, residual).unsqueeze(-1)
            shift = r_term if shift is None else shift + r_term
        scores = torch.einsum("...d,n...d->...n", qk, adapter_outputs)
        if shift is not None:
            scores = scores + shift  # a per-token constant; it matters only under dropout
        scores = self.dropout(scores)
        probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)) / self.T, dim=-1)
        self.T = max(self.T - self.reduction, 1.0)  # as BertFusion.forward: every call, train or eval
        probs = probs.to(adapter_outputs.dtype)
        context = torch.einsum("...n,n...d->...d", probs, adapter_outputs)
        if cfg["residual_before"]:
            context = context + residual  # sum_n a_n (u_n + h) = sum_n a_n u_n + h
        if cfg["value"]:
            context = self.value(context)  # = sum_n a_n W_v s_n: before or after the softmax alike
        if not cfg["residual_before"]:
            context = context + residual
        if output_attentions:
            return context, probs.detach()
        return context

    def regularization_loss(self) -> Optional[Tensor]:
        """The library's term for this layer: ``0.01 * ((I - W_v) ** 2).sum()`` (``get_fusion_regularization_loss``),
        a 0-dim tensor in float32 (float64 for a float64 value matrix), or None where the library
        adds nothing: no value matrix, or a frozen one. ``config["regularization"]`` is not consulted
        (the library never reads it); the ``adapters`` trainer back-propagates the sum over all fusion
        layers after every training step: see :func:`fusion_regularization_loss`.
        """
        if not self.config["value"] or not self.value.weight.requires_grad:
            return None
        w = self.value.weight
        target = torch.eye(self.hidden_size, device=w.device, dtype=torch.promote_types(torch.float32, w.dtype))
        return 0.01 * (target - w).pow(2).sum()

    def extra_repr(self) -> str:
        on = [k for k in ("query", "key", "value", "residual_before", "value_before_softmax", "temperature") if self.config[k]]
        return f"hidden_size={self.hidden_size}, num_adapters={self.num_adapters}, T={self.T:g}, {'+'.join(on)}"


def fusion_regularization_loss(modules: Union[nn.Module, Iterable[nn.Module]]) -> Optional[Tensor]:
    """The library's ``get_fusion_regularization_loss``: the sum of :meth:`AdapterFusion.regularization_loss`
    over every AdapterFusion in ``modules`` (a model, or several modules), None when none contributes."""
    roots = [modules] if isinstance(modules, nn.Module) else list(modules)
    total = None
    seen = set()
    for root in roots:
        for m in root.modules():
            if isinstance(m, AdapterFusion) and id(m) not in seen:
                seen.add(id(m))
                term = m.regularization_loss()
                if term is not None:
                    total = term if total is None else total + term
    return total


def freeze_for_fusion_training(
    adapters: Iterable[nn.Module], fusion: Union[nn.Module, Iterable[nn.Module]], *, unfreeze_adapters: bool = False
) -> List[nn.Parameter]:
    """The second stage of AdapterFusion training (the library's ``train_adapter_fusion``): the
    adapters frozen (trainable with ``unfreeze_adapters``), the fusion layer(s) trainable. Returns the
    trainable parameters (for the optimiser). Train/eval mode and the backbone are left alone."""
    fusions = [fusion] if isinstance(fusion, nn.Module) else list(fusion)
    trainable: List[nn.Parameter] = []
    for adapter in adapters:
        for p in adapter.parameters():
            p.requires_grad_(unfreeze_adapters)
            if unfreeze_adapters:
                trainable.append(p)
    for f in fusions:
        for p in f.parameters():
            p.requires_grad_(True)
            trainable.append(p)
    return trainable


# -- adapters -> stack -> fusion ---------------------------------------------------------------

def _adapter_outputs(x: Tensor, adapters: Sequence[BottleneckAdapter], backend: str) -> Tensor:
    """(N, *x.shape): each adapter's ``scaling * up(act(down(x)))`` without residual."""
    if implements(backend, MULTI) and all(layout(a) == layout(adapters[0]) for a in adapters):
        w_down, b_down, w_up, b_up, scaling = stack_adapters(adapters)
        return multi_adapter(
            x, w_down, b_down, w_up, b_up, activation=adapters[0].activation, scaling=scaling,
            add_residual=False, backend=backend,
        )
    # Different r / activation / bias layout (or a backend without a multi-adapter kernel): one fused
    # single-adapter call per adapter, on a zero residual.
    zeros = torch.zeros_like(x)
    return torch.stack([
        bottleneck_adapter(
            x, a.adapter_down.weight, a.adapter_down.bias, a.adapter_up.weight, a.adapter_up.bias,
            activation=a.activation, scaling=a.scaling, residual=zeros, backend=backend,
        )
        for a in adapters
    ])


def fuse_adapters(
    x: Tensor,
    adapters: Sequence[BottleneckAdapter],
    fusion: AdapterFusion,
    residual: Optional[Tensor] = None,
    query: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
    output_attentions: bool = False,
):
    """The library's ``compose_fuse`` on :class:`BottleneckAdapter` s: the N adapters on ``x`` (one
    :func:`adapterkern.multi_adapter` launch, ``add_residual=False``), then ``fusion``.

    Args:
        x: (..., d), the adapters' input.
        adapters: N >= 1 :class:`BottleneckAdapter` s of hidden size d. Adapters with the same
            bottleneck size, activation and bias layout are stacked (``torch.stack`` of their weights
            and scalings on every call: gradients reach each adapter's own parameters) into one
            launch; otherwise (or with ``backend="cuda"``, which has no multi-adapter kernel) each
            adapter is one fused single-adapter call, and the outputs are stacked.
        fusion: the :class:`AdapterFusion` layer.
        residual: the fusion's residual; None means x.
        query: the fusion's query; None means x (the library's default, ``query_before_ln=False``,
            queries with the adapters' input).
        backend: None (the adapters' common ``backend``, else ``auto``), ``auto``, ``torch``,
            ``triton`` or ``cuda``.
        output_attentions: also return the fusion's probabilities (..., N).

    Returns: (..., d), as ``fusion(query, stack, residual)``.
    """
    if not isinstance(fusion, AdapterFusion):
        raise TypeError(f"fusion: expected an adapterkern.nn.AdapterFusion, got {type(fusion).__name__}")
    if not isinstance(adapters, (Sequence, nn.ModuleList)):
        raise TypeError(f"adapters: expected a sequence (list, tuple, nn.ModuleList) of BottleneckAdapter, got {type(adapters).__name__}")
    adapters = list(adapters)
    if not adapters:
        raise ValueError("adapters: expected at least one adapter")
    for i, a in enumerate(adapters):
        if not isinstance(a, BottleneckAdapter):
            raise TypeError(f"adapters[{i}]: expected an adapterkern.nn.BottleneckAdapter, got {type(a).__name__}")
        if a.hidden_size != fusion.hidden_size:
            raise ValueError(f"adapters[{i}]: hidden size {a.hidden_size} differs from the fusion's hidden_size {fusion.hidden_size}")
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor of shape (..., {fusion.hidden_size}), got {type(x).__name__}")
    if backend is None:
        names = {a.backend for a in adapters}
        backend = names.pop() if len(names) == 1 else "auto"
    stack = _adapter_outputs(x, adapters, backend)
    return fusion(
        x if query is None else query,
        stack,
        x if residual is None else residual,
        output_attentions=output_attentions,
    )
