"""The ``adapters`` library's composition blocks on a patched ``BottleneckLayer``: which of them run in
one launch, and the replacements of the layer's composition functions (:data:`COMPOSE_IMPLS`,
installed on the instance, bound by :class:`.BoundPatch`: the library looks them up with ``getattr``,
so nested blocks reach them too).

``BatchSplit`` / ``MultiTask`` / ``Parallel`` become one :func:`adapterkern.bottleneck_adapter_batched`
call, ``Fuse`` and ``Average`` one :func:`adapterkern.multi_adapter` call, over the block's adapters
stacked per call by :func:`adapterkern.nn.bottleneck.stack_weights` (gradients reach each adapter's
own parameters). The library's ``pre_block``, ``repeat``, fusion layer and ``post_forward`` run
unchanged; a block or call that cannot run in one launch takes the library's loop over its adapters.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..backends import BATCHED, MULTI, implements
from ..functional import bottleneck_adapter_batched, multi_adapter, token_groups
from ..nn.bottleneck import stack_weights
from .adapterhub_plans import PLAN_ATTR, fits, training_randomness, zero_residual
from .adapterhub_report import AdapterPatchReport, AdapterPatchWarning, qualified

__all__ = ["COMPOSE_ATTR", "COMPOSE_FUNCS", "COMPOSE_IMPLS", "LayerPlan", "report_compositions"]

COMPOSE_ATTR = "_adapterkern_compose"  # on each patched BottleneckLayer
# The library's composition functions replaced on the instance (the library looks them up with getattr).
COMPOSE_FUNCS = ("compose_batch_split", "compose_parallel", "compose_fuse", "compose_split", "compose_average", "pad_and_concat")


@dataclass
class LayerPlan:
    """Per patched BottleneckLayer: what its composition functions need (plain data)."""

    backend: str
    unfused: Dict[str, str] = field(default_factory=dict)  # adapter name -> why it keeps the library's path
    warned: set = field(default_factory=set)  # run-time warnings already given (one each)


class _Verdict(NamedTuple):
    """Whether a composition block runs in one launch in one layer: ``names`` its adapters in this
    layer (Fuse: one per child, in order), or ``why`` not (warned once), or neither (none of its
    adapters here: the library's code, silently)."""

    names: Tuple[str, ...] = ()
    why: Optional[str] = None


# The functional op each fused composition block calls (MultiTask: the library runs it as a BatchSplit
# of the sorted batch). Any other block keeps the library's loop over its adapters.
_BLOCK_OPS = {"BatchSplit": BATCHED, "MultiTask": BATCHED, "Parallel": BATCHED, "Fuse": MULTI, "Average": MULTI}
_NOT_FUSED = {"Split": "Split (a split along the sequence) is not fused"}


# What a Fuse block on the library's loop runs: the fusion layer reads each adapter's ``up``.
_FUSE_LOOP = "the adapters' own forwards are the library's too (its fusion layer reads their up-projections)"


def _analyse(layer, block) -> _Verdict:
    """Whether ``block`` (BatchSplit, Parallel, Fuse, Split, Average) can run in one launch in ``layer``."""
    verdict = _analyse_block(layer, block)
    if verdict.why is not None and type(block).__name__ == "Fuse":
        return verdict._replace(why=f"{verdict.why}; {_FUSE_LOOP}")
    return verdict


def _analyse_block(layer, block) -> _Verdict:
    from adapters.composition import AdapterCompositionBlock

    kind = type(block).__name__
    present = [c for c in block.children if isinstance(c, str) and c in layer.adapters]
    nested = [c for c in block.children if isinstance(c, AdapterCompositionBlock)]
    if not present and not nested:
        return _Verdict()  # none of its adapters in this layer: the library passes the state on
    op = _BLOCK_OPS.get(kind)
    if op is None:
        return _Verdict(why=_NOT_FUSED.get(kind, f"{kind} is not fused"))
    if nested:
        return _Verdict(why=f"{kind} with a nested {type(nested[0]).__name__} block")
    lp = getattr(layer, COMPOSE_ATTR)
    if not implements(lp.backend, op):
        return _Verdict(why=f"backend={lp.backend!r} has no {op} kernel")
    names = tuple(present) if kind in ("Fuse", "Average") else tuple(dict.fromkeys(present))  # one slot per child
    props = {}
    for name in dict.fromkeys(names):
        adapter = layer.adapters[name]
        plan = getattr(adapter, PLAN_ATTR, None)
        if plan is None:
            why = lp.unfused.get(name, "not patched: put in the layer past its add_adapter (call patch_adapters again)")
            return _Verdict(why=f"adapter {name!r} keeps the library's path ({why})")
        if adapter.add_layer_norm_before:
            return _Verdict(why=f"adapter {name!r} has ln_before (a LayerNorm of its own before the down-projection)")
        if adapter.add_layer_norm_after:
            return _Verdict(why=f"adapter {name!r} has ln_after (a LayerNorm of its own after the residual add)")
        down, up = adapter.adapter_down[-2], adapter.adapter_up
        props[name] = (
            "parallel" if plan.parallel else "sequential",
            down.weight.shape[0],
            plan.activation,
            (down.bias is None, up.bias is None),
        )
    labels = ("kind (sequential / parallel)", "bottleneck size", "activation", "bias layout")
    for i, label in enumerate(labels):
        if kind == "Fuse" and i == 0:
            continue  # Fuse reads s * up(...) only: the same for both kinds
        values = {name: p[i] for name, p in props.items()}
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{name}: {value}" for name, value in values.items())
            return _Verdict(why=f"its adapters differ in {label} ({listed})")
    return _Verdict(names=names)


def _describe_block(kind: str, verdict: _Verdict, layer) -> str:
    n = len(dict.fromkeys(verdict.names))
    what = "parallel" if getattr(layer.adapters[verdict.names[0]], PLAN_ATTR).parallel else "sequential"
    if kind == "Fuse":
        return f"one multi_adapter launch (add_residual=False) for the {n} adapters' s * up(...), then the library's fusion layer"
    if kind == "Average":
        return f"one multi_adapter launch: the {what} adapters' weighted mean folded into one adapter of rank {len(verdict.names)} * r"
    rows = "per-sequence index from batch_sizes" if kind in ("BatchSplit", "MultiTask") else "on the replicated batch, copy i through adapter i"
    return f"one bottleneck_adapter_batched launch over {n} {what} adapter(s) ({rows})"


def _verdict(layer, block) -> _Verdict:
    """:func:`_analyse`, warning once per layer and reason when the block keeps the library's loop."""
    verdict = _analyse(layer, block)
    if verdict.why is not None:
        lp = getattr(layer, COMPOSE_ATTR)
        message = f"patch_adapters: {block!r} keeps the adapters library's loop over its adapters: {verdict.why}"
        if message not in lp.warned:
            lp.warned.add(message)
            warnings.warn(message, AdapterPatchWarning, stacklevel=3)
    return verdict


def _stack(layer, names: Tuple[str, ...], x: Tensor, residual: Optional[Tensor]):
    """(:func:`stack_weights` of adapters ``names``, activation, backend) for a fused composition call,
    or None when this call must take the library's path (training randomness, tensors that do not fit,
    gating scores requested)."""
    from adapters.context import ForwardContext

    context = ForwardContext.get_context()
    if context is not None and getattr(context, "output_adapter_gating_scores", False):
        return None
    adapters = [layer.adapters[name] for name in names]
    plans = [getattr(a, PLAN_ATTR, None) for a in adapters]
    if any(p is None for p in plans):
        return None
    for adapter, plan in zip(adapters, plans):
        if training_randomness(adapter, plan.parallel) or not fits(x, x if residual is None else residual, adapter):
            return None
    # The library's Adapter (as classify checked): adapter_down = [ln_before,] Linear, activation; adapter_up = Linear.
    downs, ups = [a.adapter_down[-2] for a in adapters], [a.adapter_up for a in adapters]
    stacked = stack_weights(downs, ups, [a.scaling for a in adapters])
    return (*stacked, plans[0].activation, plans[0].backend)


def _row_groups(child_index: Tuple[int, ...], counts: List[int], n: int, x: Tensor):
    """Adapter index per token (x.shape[:-1]) for rows given by ``counts`` per child, and its token
    groups (bound to that index tensor); made once per forward pass and shape (kept on the library's
    ForwardContext), used by every layer."""
    from adapters.context import ForwardContext

    key = ("adapterkern_groups", child_index, tuple(counts), n, tuple(x.shape[:-1]), x.device)
    context = ForwardContext.get_context()
    cache = None if context is None else context.__dict__.setdefault("_adapterkern_groups", {})
    if cache is not None and key in cache:
        return cache[key]
    index = torch.repeat_interleave(torch.tensor(child_index, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64))
    index = index.to(x.device)
    per_token = index.reshape((-1,) + (1,) * (x.dim() - 2)).expand(x.shape[:-1])
    value = (per_token, token_groups(per_token, n))
    if cache is not None:
        cache[key] = value
    return value


def _child_index(block, names: Tuple[str, ...]) -> Tuple[int, ...]:
    """Each child's position in the weight stack ``names`` (-1: not in this layer). The stack holds
    every adapter of the block in the layer, one without rows too: the library runs it on an empty
    slice, so its gradients are zeros (not None) there as well."""
    return tuple(names.index(c) if c in names else -1 for c in block.children)


def _batched_rows(layer, names, child_index, counts: List[int], state, stacked):
    """The children's outputs for the rows of ``state`` (child i: the next ``counts[i]`` rows) in one
    batched launch: sequential adapters ``residual + s * up(...)``, parallel ones ``s * up(...)``;
    rows of a child not in this layer unchanged (the library passes its slice on)."""
    x, residual = state.hidden_states, state.adapter_residual
    w_down, b_down, w_up, b_up, scaling, activation, backend = stacked
    parallel = getattr(layer.adapters[names[0]], PLAN_ATTR).parallel
    per_token, groups = _row_groups(child_index, counts, len(names), x)
    if parallel:
        residual = zero_residual(x)
    elif residual is x:
        residual = None
    passed_on = any(i < 0 and k > 0 for i, k in zip(child_index, counts))
    if passed_on and residual is not None:
        keep = (per_token < 0).unsqueeze(-1)
        residual = torch.where(keep, x, residual)  # index -1 gives the residual: make it x there
    return bottleneck_adapter_batched(
        x, per_token, w_down, b_down, w_up, b_up,
        activation=activation, scaling=scaling, residual=residual, groups=groups, backend=backend,
    )


def _last(block, layer, state):
    """The library's ``last`` after a BatchSplit / Parallel: the last child's name, or the state's."""
    child = block.children[-1]
    return child if child in layer.adapters else state.last


def _compose_batch_split(self, adapter_setup, state, lvl=0):
    """Replaced ``compose_batch_split``: every child's slice of the batch through its adapter, one launch."""
    original = type(self).compose_batch_split
    verdict = _verdict(self, adapter_setup)
    sizes = adapter_setup.batch_sizes
    if (
        not verdict.names
        or sum(sizes) != self._bsz(state)  # the library raises
        or len(sizes) > len(adapter_setup.children)
        or any(b < 0 for b in sizes)
    ):
        return original(self, adapter_setup, state, lvl)
    counts = list(sizes) + [0] * (len(adapter_setup.children) - len(sizes))
    entry = state
    state = self.pre_block(adapter_setup, state)
    stacked = _stack(self, verdict.names, state.hidden_states, state.adapter_residual)
    if stacked is None:
        return original(self, adapter_setup, entry, lvl)  # pre_block is pure: the library redoes it
    child_index = _child_index(adapter_setup, verdict.names)
    hidden_states = _batched_rows(self, verdict.names, child_index, counts, state, stacked)
    return state._replace(hidden_states=hidden_states, bottleneck_up=None, last=_last(adapter_setup, self, state))


def _compose_parallel(self, adapter_setup, state, lvl=0):
    """Replaced ``compose_parallel``: the library's replication, then copy i of the batch through adapter i, one launch."""
    from adapters.context import ForwardContext

    original = type(self).compose_parallel
    verdict = _verdict(self, adapter_setup)
    context = ForwardContext.get_context()
    if not verdict.names or context is None or self.allow_multi_parallelize:
        return original(self, adapter_setup, state, lvl)
    channels = adapter_setup.parallel_channels
    if not context.adapters_parallelized:  # as the library: the first Parallel layer replicates the batch
        orig_batch_size = self._bsz(state)
        state = self.repeat(state, channels)
        context.adapters_parallelized = True
        context.original_batch_size = orig_batch_size
    elif self._bsz(state) % channels != 0:
        return original(self, adapter_setup, state, lvl)  # the library raises
    else:
        orig_batch_size = self._bsz(state) // channels
    replicated = state
    state = self.pre_block(adapter_setup, state)
    stacked = _stack(self, verdict.names, state.hidden_states, state.adapter_residual)
    if stacked is None:  # the library's loop on the replicated state (the context says replicated: it won't again)
        return original(self, adapter_setup, replicated, lvl)
    child_index = _child_index(adapter_setup, verdict.names)
    hidden_states = _batched_rows(self, verdict.names, child_index, [orig_batch_size] * channels, state, stacked)
    return state._replace(hidden_states=hidden_states, bottleneck_up=None, last=_last(adapter_setup, self, state))


def _compose_fuse(self, adapter_setup, state, lvl=0):
    """Replaced ``compose_fuse``: the adapters' s * up(...) from one multi-adapter launch, then the library's fusion layer."""
    from adapters.context import ForwardContext

    original = type(self).compose_fuse
    verdict = _verdict(self, adapter_setup)
    last = adapter_setup.last()
    if not verdict.names or last not in self.adapters or adapter_setup.name not in self.adapter_fusion_layer:
        return original(self, adapter_setup, state, lvl)  # nothing to fuse, or the library raises
    fusion_config, _ = self.adapters_config.get_fusion(adapter_setup.name)
    hidden_states, query, residual = self.adapters[last].pre_forward(
        state.hidden_states, state.input_tensor, state.layer_norm, fusion_config=fusion_config
    )
    stacked = _stack(self, verdict.names, hidden_states, None)
    if stacked is None or hidden_states.dim() != 3:
        return original(self, adapter_setup, state, lvl)
    state = state._replace(hidden_states=hidden_states, adapter_residual=residual)
    w_down, b_down, w_up, b_up, scaling, activation, backend = stacked
    up = multi_adapter(
        hidden_states, w_down, b_down, w_up, b_up,
        activation=activation, scaling=scaling, add_residual=False, backend=backend,
    )  # (N, B, L, d): the library's torch.stack of the children's ``up``
    up_list = up.permute(1, 2, 0, 3)
    context = ForwardContext.get_context()
    output_fusion_attns = context.output_adapter_fusion_attentions if context is not None else False
    fusion_output = self.adapter_fusion_layer[adapter_setup.name](
        query, up_list, up_list, state.adapter_residual, output_attentions=output_fusion_attns
    )
    if output_fusion_attns:
        hidden_states = fusion_output[0]
        self._store_fusion_attentions(adapter_setup.name, fusion_output[-1])
    else:
        hidden_states = fusion_output
    return state._replace(hidden_states=hidden_states, last=last)


def _compose_split(self, adapter_setup, state, lvl=0):
    """Replaced ``compose_split`` to warn once: a Split keeps the library's loop."""
    _verdict(self, adapter_setup)
    return type(self).compose_split(self, adapter_setup, state, lvl)


def _compose_average(self, adapter_setup, state, lvl=0):
    """Replaced ``compose_average``: the library's ``mean_n(w_n * out_n)`` over the children's outputs
    (sequential adapters: ``out_n = res + s_n * u_n``; parallel ones: ``s_n * u_n``) as one launch of the
    N adapters folded into one (``multi_adapter`` with weights ``w / N``), plus ``(sum_n w_n / N) * res``
    for sequential adapters; the result in the dtype the library's float32 weights promote the states to."""
    original = type(self).compose_average
    verdict = _verdict(self, adapter_setup)
    if not verdict.names or len(verdict.names) != len(adapter_setup.children) or state.hidden_states.dim() != 3:
        return original(self, adapter_setup, state, lvl)  # children missing here: the library's (failing) mean
    entry = state
    state = self.pre_block(adapter_setup, state)
    x, residual = state.hidden_states, state.adapter_residual
    stacked = _stack(self, verdict.names, x, residual)
    if stacked is None:
        return original(self, adapter_setup, entry, lvl)  # pre_block is pure: the library redoes it
    w_down, b_down, w_up, b_up, scaling, activation, backend = stacked
    weights = torch.tensor(adapter_setup.weights)  # as the library builds them (float32)
    dtype = torch.promote_types(x.dtype, weights.dtype)  # what the library's product promotes the states to
    w = weights.to(device=x.device, dtype=dtype) / len(verdict.names)
    mixed = multi_adapter(
        x, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, add_residual=False, weights=w, backend=backend,
    )
    hidden_states = mixed.to(dtype)
    if not getattr(self.adapters[verdict.names[0]], PLAN_ATTR).parallel:
        res = x if residual is None else residual
        hidden_states = hidden_states + res.to(dtype) * w.sum()
    return state._replace(hidden_states=hidden_states, bottleneck_up=None, last=adapter_setup.children[-1])


def _pad_and_concat(self, states):
    """Replaced ``pad_and_concat`` (the library's loop in BatchSplit / Parallel): a fused adapter
    forward returns no ``up``, so children mixing it with the library's forward (one adapter drawing
    dropout masks while training) concatenate no ``up`` (no Fuse reads it there) instead of failing."""
    if any(s.bottleneck_up is None for s in states):
        states = [s._replace(bottleneck_up=None) for s in states]
    return type(self).pad_and_concat(self, states)


COMPOSE_IMPLS = {
    "compose_batch_split": _compose_batch_split,
    "compose_parallel": _compose_parallel,
    "compose_fuse": _compose_fuse,
    "compose_split": _compose_split,
    "compose_average": _compose_average,
    "pad_and_concat": _pad_and_concat,
}


def report_compositions(report: AdapterPatchReport, layer_name: str, layer) -> None:
    """Record, for the layer's active setup now, which composition blocks run in one launch (and
    which of those take the library's loop while training), and which keep the library's loop."""
    from adapters.composition import AdapterCompositionBlock, BatchSplit, MultiTask, Stack

    setup = layer.get_active_setup()  # None in a skipped layer (skip_layers) or one without its adapters
    lp = getattr(layer, COMPOSE_ATTR)

    def visit(block):
        if not isinstance(block, AdapterCompositionBlock):
            return
        for child in block.children:
            visit(child)
        if type(block) is Stack:
            return
        probe = BatchSplit(*block.children, batch_sizes=0) if type(block) is MultiTask else block
        kind = type(block).__name__
        verdict = _analyse(layer, probe)
        key = f"{layer_name}: {block!r}"
        if verdict.names:
            what = _describe_block(kind, verdict, layer)
            training = {n: report.library_in_training.get(qualified(layer_name, "adapters", n)) for n in verdict.names}
            listed = "; ".join(f"{n!r}: {why}" for n, why in training.items() if why is not None)
            if listed:  # _stack refuses the launch when one of them would draw random masks
                what += f"; while training, the library's loop over its adapters ({listed})"
                what += f"; {_FUSE_LOOP}" if kind == "Fuse" else ""
            report.compositions[key] = what
        elif verdict.why is not None:
            report.compositions_library[key] = verdict.why
            lp.warned.add(f"patch_adapters: {probe!r} keeps the adapters library's loop over its adapters: {verdict.why}")

    visit(setup)
