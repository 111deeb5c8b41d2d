"""Run the bottleneck adapters of an AdapterHub ``adapters`` model through the fused op.

::

    import adapters, adapterkern
    adapters.init(model); model.add_adapter("a", config="seq_bn"); model.set_active_adapters("a")
    report = adapterkern.patch_adapters(model)      # returns what was fused and what was not (and why)
    adapterkern.unpatch_adapters(model)             # the library's own forward again

What is computed is the library's (``adapters`` 1.x, ``methods/modeling.py``), with the
down-projection, activation, up-projection, scaling and residual add done by
:func:`adapterkern.bottleneck_adapter`; the library's ``pre_forward`` / ``post_forward`` (the
model's LayerNorm, ``original_ln_before/after``, ``residual_before_ln``) are not touched.

* Sequential adapters (``seq_bn`` / Pfeiffer, ``double_seq_bn`` / Houlsby, AdapterPlus): the
  ``Adapter`` instance's ``forward(x, residual_input)`` is replaced by
  ``[ln_after](residual_input + s * up(act(down([ln_before](x)))))``: the fused op with
  ``residual=residual_input`` (None when that is ``x`` itself). It returns ``(output, None, None)``:
  the library's ``down`` and ``up`` intermediates are not computed (only AdapterFusion reads ``up``,
  and an adapter inside an active ``Fuse`` block keeps the library's forward at run time).
* Parallel adapters (``par_bn``, ``scaled_par_bn``, the adapter half of ``mam``): the library adds
  ``s * up(act(down(x)))`` to the sublayer output ``h`` in ``post_forward``, out of reach of the
  adapter's own forward, so the hook is the ``BottleneckLayer``'s ``bottleneck_layer_forward``:
  when the layer's active setup is a ``Stack`` with this one bottleneck adapter, it computes
  ``h + s * up(act(down(x)))`` in the fused op (``residual=h``) and then the library's
  ``original_ln_after`` step; other setups go through the library's ``compose`` (below).

Compositions: on each ``BottleneckLayer`` instance holding a fused adapter, the library's
``compose_batch_split`` / ``compose_parallel`` / ``compose_fuse`` are replaced (the library looks
them up with ``getattr``, so nested blocks reach them too); its ``pre_block``, ``repeat``, fusion
layer and ``post_forward`` run unchanged. A block whose children are plain names of fused adapters
that agree on bottleneck size, activation, bias layout and kind (sequential or parallel), without
``ln_before`` / ``ln_after``, runs in one launch per layer and place (the adapters' weights stacked
per call with ``torch.stack``: gradients reach each adapter's own parameters; an adapter of the block
with no rows gets zero gradients, as from the library's empty slice):

* ``BatchSplit`` (and ``MultiTask``, which the library runs as a ``BatchSplit`` of the sorted batch):
  :func:`adapterkern.bottleneck_adapter_batched` with a per-sequence index built from
  ``batch_sizes`` (the library's ``pre_block`` first: the first adapter's ``pre_forward``).
  A child not present in the layer keeps its rows unchanged (index -1), as the library passes them on.
* ``Parallel``: the library's replication (``repeat`` on the first ``Parallel`` layer, or input the
  model already replicated: ``adapter_input_parallelized``), then the batched op on the replicated
  batch, copy i of the batch through adapter i.
* ``Fuse``: the N adapters' ``s_n * up_n(...)`` (what the library stacks for AdapterFusion) from one
  :func:`adapterkern.multi_adapter` call (``add_residual=False``, the adapters' weights stacked per
  call), then the library's own fusion layer (``adapter_fusion_layer[...]``) on them, unchanged.
* ``Average``: the library's ``mean`` of the weighted children's outputs (below), the N adapters folded
  into one adapter of rank N * r by ``multi_adapter(weights=w / N, add_residual=False)`` (one launch),
  plus ``(sum_n w_n / N) * res`` for sequential adapters, in the dtype the library's float32 weights
  promote the states to.

Sequential children compute ``residual + s_n * up_n(...)`` with the residual the library hands them;
parallel children ``s_n * up_n(...)`` (the library adds the sub-layer output in ``post_forward``).
Other blocks keep the library's loop over their adapters (each fusable adapter still runs through the
fused op on its own): ``Split``, blocks with nested blocks or with adapters that disagree, and
``backend="cuda"`` (the CUDA extension has no multi-adapter / batched kernel). For the active setup at
patch time they are listed in the report and the warning; a block first met at run time warns once
per layer (:class:`AdapterPatchWarning`) with the reason (``compose_split`` is wrapped only for that). ``pad_and_concat`` is replaced too, so that the
library's loop can mix a fused adapter forward (no ``up``) with the library's own (an adapter
drawing dropout masks) instead of failing on the ``up`` no Fuse reads there. Where the library
itself fails (``Parallel`` of parallel adapters replicating the batch in the layer: its
``post_forward`` adds the unreplicated sub-layer output; a ``BatchSplit`` / ``Parallel`` whose first
or last adapter is missing in a layer), the patched model fails too.

``Average``'s numbers are the library's, quirk included: its ``mean`` over the N children's outputs,
with weights already normalised to sum to 1, computes ``(1/N) * sum_n w_n * (res + s_n * u_n)``, i.e.
the sub-layer's residual stream scaled by 1/N for sequential adapters (and each contribution by an
extra 1/N), which looks like a bug in the library. adapterkern's own API,
``adapterkern.multi_adapter(x, ..., weights=w)``, keeps the residual once: ``res + sum_n w_n * s_n * u_n``.

AdapterDrop (``model.set_active_adapters(setup, skip_layers=[...])``): the library consults
``skip_layers`` only in ``get_active_setup`` (no active setup in a skipped layer: the plain residual
and LayerNorm); every fused path is reached after that call (the patched ``bottleneck_layer_forward``
calls it, and the replaced adapter forwards and composition functions are only reached through the
library's ``compose``), so layers are skipped exactly as by the library.

Kept on the library's path (listed, with the reason, in one :class:`AdapterPatchWarning`):
PHM / Compacter projections, gating (``use_gating``), ``ln_after`` on the adapter branch alone
(parallel adapters, or ``adapter_residual_before_ln=False``), activations without a kernel, and,
while the module is training, dropout (p > 0) and stochastic depth (p > 0). At run time a call also
takes the library's path when its tensors do not fit the fused op (mixed dtypes or devices,
autocast, a residual of another shape) or when gating scores are requested, and a composition block
does when one of its adapters would draw dropout / stochastic-depth masks (training) or when
``backend="auto"`` resolves to the CUDA extension; that path is the library's own code, so the
numbers are the library's.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from types import MethodType
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..activations import get_activation
from ..backends import check_backend_name, resolve_backend
from ..functional import SUPPORTED_DTYPES, bottleneck_adapter, bottleneck_adapter_batched, multi_adapter, token_groups

__all__ = ["AdapterPatchReport", "AdapterPatchWarning", "patch_adapters", "unpatch_adapters"]

PLAN_ATTR = "_adapterkern_plan"  # on each patched Adapter / ParallelAdapter module
LAYER_ATTR = "_adapterkern_layer"  # on each BottleneckLayer whose bottleneck_layer_forward is replaced
COMPOSE_ATTR = "_adapterkern_compose"  # on each BottleneckLayer whose composition functions are replaced
# The library's composition functions replaced on the instance (the library looks them up with getattr).
COMPOSE_FUNCS = ("compose_batch_split", "compose_parallel", "compose_fuse", "compose_split", "compose_average", "pad_and_concat")


class AdapterPatchWarning(UserWarning):
    """Emitted once by :func:`patch_adapters` when some adapter modules keep the library's path."""


@dataclass
class AdapterPatchReport:
    """What :func:`patch_adapters` did, by qualified module name.

    ``fused``: modules that run through the fused op (value: what is fused).
    ``library``: modules that always keep the ``adapters`` library's path (value: why).
    ``library_in_training``: fused modules that take the library's path while in training mode (why).
    ``compositions`` / ``compositions_library``: the composition blocks of the active setup at patch
    time, per layer (``"<layer>: <block>"``), that run in one launch (value: how) / that keep the
    library's loop over their adapters (value: why). Setups activated later are decided per call.
    """

    backend: str
    fused: Dict[str, str] = field(default_factory=dict)
    library: Dict[str, str] = field(default_factory=dict)
    library_in_training: Dict[str, str] = field(default_factory=dict)
    compositions: Dict[str, str] = field(default_factory=dict)
    compositions_library: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        if not self.fused and not self.library:
            return "patch_adapters: no bottleneck adapter modules of the adapters library found"
        lines = [f"patch_adapters (backend={self.backend!r}): {len(self.fused)} fused, {len(self.library)} on the library path"]
        lines += [f"  fused    {name}: {what}" for name, what in self.fused.items()]
        lines += [f"  library  {name}: {why}" for name, why in self.library.items()]
        lines += [f"  library while training  {name}: {why}" for name, why in self.library_in_training.items()]
        lines += [f"  fused composition    {name}: {what}" for name, what in self.compositions.items()]
        lines += [f"  library composition  {name}: {why}" for name, why in self.compositions_library.items()]
        return "\n".join(lines)


@dataclass
class _Plan:
    """How one adapter module is computed on the fused path (plain data: survives deepcopy)."""

    parallel: bool
    activation: str  # adapterkern activation name
    backend: str


@dataclass
class _LayerPlan:
    """Per BottleneckLayer with a fused adapter: what composition functions need (plain data)."""

    backend: str
    unfused: Dict[str, str]  # adapter name -> why it keeps the library's path
    warned: set = field(default_factory=set)  # run-time warnings already given (one each)


# ------------------------------------------------------------------------------------------------
# Activation: map what the library instantiated (not its config string: old-checkpoint renames such
# as "gelu" -> "gelu_new" and "gelu_orig" -> "gelu" are applied before the module is built).
# ------------------------------------------------------------------------------------------------
_TRANSFORMERS_ACTIVATIONS = {
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_new",
    "FastGELUActivation": "gelu_new",
    "GELUTanh": "gelu_new",
    "PytorchGELUTanh": "gelu_new",
    "QuickGELUActivation": "quick_gelu",
    "SiLUActivation": "silu",
    "LinearActivation": "linear",
}
_TORCH_ACTIVATIONS = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.Identity: "linear",
}


def _activation_name(f) -> Optional[str]:
    """The adapterkern name for the library's activation callable ``f``, or None if there is none."""
    if f is F.leaky_relu:  # the library's own "leakyrelu"
        return "leakyrelu"
    t = type(f)
    if t in _TORCH_ACTIVATIONS:
        return _TORCH_ACTIVATIONS[t]
    if t is nn.LeakyReLU:
        return "leakyrelu" if f.negative_slope == 0.01 else None
    if t.__module__ == "transformers.activations":
        return _TRANSFORMERS_ACTIVATIONS.get(t.__name__)
    return None


def _resolve_activation(adapter: nn.Module):
    """(adapterkern name, None) or (None, reason). The name is checked numerically against the module."""
    f = getattr(adapter.non_linearity, "f", None)
    name = _activation_name(f)
    label = getattr(f, "__name__", None) or type(f).__name__
    if name is None:
        return None, f"activation {label} has no fused kernel"
    probe = torch.linspace(-8.0, 8.0, 161, dtype=torch.float64)
    try:
        with torch.no_grad():
            got = adapter.non_linearity(probe.clone())
        ok = torch.allclose(got, get_activation(name).fn(probe), rtol=1e-6, atol=1e-9)
    except Exception as e:  # noqa: BLE001  (an activation that cannot run on a CPU probe is not ours)
        return None, f"activation {label} could not be checked ({type(e).__name__})"
    if not ok:
        return None, f"activation {label} does not match adapterkern's {name!r} numerically"
    return name, None


def _describe_scaling(scaling) -> str:
    if isinstance(scaling, Tensor):
        return "learned" if scaling.numel() == 1 else f"channel ({scaling.numel()},)"
    return repr(float(scaling))


# ------------------------------------------------------------------------------------------------
# Classification: can this module's computation be expressed by the fused op?
# ------------------------------------------------------------------------------------------------
def _classify(adapter: nn.Module, lib, layer: nn.Module, backend: str):
    """(plan, description, train_reason) for a fusable module, else (None, reason, None)."""
    parallel = type(adapter) is lib.ParallelAdapter
    if type(adapter) not in (lib.Adapter, lib.ParallelAdapter):
        return None, f"{type(adapter).__name__} is not the library's Adapter / ParallelAdapter", None
    if "forward" in vars(adapter):
        return None, "its forward is already replaced on the instance (e.g. by an accelerate hook)", None
    if parallel and "bottleneck_layer_forward" in vars(layer) and not _is_ours(vars(layer)["bottleneck_layer_forward"]):
        return None, "its layer's bottleneck_layer_forward is already replaced on the instance", None
    down = list(adapter.adapter_down) if isinstance(adapter.adapter_down, nn.Sequential) else []
    if any(type(m) is lib.PHMLayer for m in down) or type(adapter.adapter_up) is lib.PHMLayer:
        return None, "PHM / Compacter projections (phm_layer=True)", None
    if adapter.use_gating:
        return None, "gating (use_gating=True): a per-sequence gate scales the adapter branch", None
    if adapter.add_layer_norm_after and parallel:
        return None, "ln_after on a parallel adapter: LayerNorm of the adapter branch before the residual add", None
    if adapter.add_layer_norm_after and not adapter.adapter_residual_before_ln:
        return None, "ln_after with adapter_residual_before_ln=False: LayerNorm of the adapter branch before the residual add", None
    expected = ([adapter.adapter_norm_before] if adapter.add_layer_norm_before else []) + [None, adapter.non_linearity]
    if (
        len(down) != len(expected)
        or type(down[-2]) is not nn.Linear
        or any(e is not None and m is not e for m, e in zip(down, expected))
        or type(adapter.adapter_up) is not nn.Linear
    ):
        return None, "adapter_down / adapter_up are not the library's Linear -> activation -> Linear", None
    drop_path = getattr(adapter, "DropPath", None)
    if drop_path is not None and not parallel and not _is_stochastic_depth(drop_path):
        return None, f"unrecognised DropPath module {type(drop_path).__name__}", None
    activation, why = _resolve_activation(adapter)
    if activation is None:
        return None, why, None

    train_reasons = []
    if adapter.dropout.p > 0:
        train_reasons.append(f"dropout p={adapter.dropout.p}")
    if drop_path is not None and not parallel and drop_path.p > 0:
        train_reasons.append(f"stochastic depth p={drop_path.p}")
    parts = [
        "parallel (output = h + s * up(act(down(x))), when the only active bottleneck adapter of its layer)"
        if parallel
        else "sequential (output = residual + s * up(act(down(x))))",
        f"activation={activation}",
        f"scaling={_describe_scaling(adapter.scaling)}",
    ]
    if adapter.add_layer_norm_before:
        parts.append("ln_before (LayerNorm, then the fused op)")
    if adapter.add_layer_norm_after:
        parts.append("ln_after (after the fused residual add)")
    train_reason = None
    if train_reasons:
        train_reason = " and ".join(train_reasons) + " (random masks: the library's path while training)"
    return _Plan(parallel=parallel, activation=activation, backend=backend), ", ".join(parts), train_reason


def _is_stochastic_depth(module: nn.Module) -> bool:
    t = type(module)
    return t.__name__ == "StochasticDepth" and t.__module__.startswith("torchvision.") and hasattr(module, "p")


# ------------------------------------------------------------------------------------------------
# Run-time: the fused forwards and the conditions under which a call keeps the library's path.
# ------------------------------------------------------------------------------------------------
def _training_randomness(adapter: nn.Module, parallel: bool) -> bool:
    """Whether the library would draw random masks now (dropout / stochastic depth in training mode)."""
    if adapter.dropout.training and adapter.dropout.p > 0:
        return True
    drop_path = getattr(adapter, "DropPath", None)  # only Adapter.forward (sequential) applies it
    return not parallel and drop_path is not None and drop_path.training and drop_path.p > 0


def _fits(x, residual, adapter: nn.Module) -> bool:
    """Whether the fused op computes exactly the library's maths on these tensors (same dtypes, devices, shape)."""
    if not isinstance(x, Tensor) or not isinstance(residual, Tensor):
        return False
    if x.dtype not in SUPPORTED_DTYPES or x.dim() < 1:
        return False
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        return False
    down, up = adapter.adapter_down[-2], adapter.adapter_up
    for p in (down.weight, down.bias, up.weight, up.bias):
        if p is not None and (p.dtype != x.dtype or p.device != x.device):
            return False
    s = adapter.scaling
    if isinstance(s, Tensor) and (s.dtype != x.dtype or s.device != x.device):
        return False  # the library's up * s would promote the dtype
    if torch.is_autocast_enabled(x.device.type):
        return False
    return True


def _fused_branch(adapter: nn.Module, plan: _Plan, x: Tensor, residual: Optional[Tensor]) -> Tensor:
    """residual + s * up(act(down(x))) through the fused op (residual None: x)."""
    down, up = adapter.adapter_down[-2], adapter.adapter_up
    return bottleneck_adapter(
        x,
        down.weight,
        down.bias,
        up.weight,
        up.bias,
        activation=plan.activation,
        scaling=adapter.scaling,
        residual=residual,
        backend=plan.backend,
    )


def _in_active_fuse(config, name: str) -> bool:
    """Whether adapter ``name`` sits in a Fuse block of the active setup (AdapterFusion reads its ``up``)."""
    from adapters.composition import AdapterCompositionBlock, Fuse
    from adapters.context import AdapterSetup

    context = AdapterSetup.get_context()
    setup = context.adapter_setup if context is not None else getattr(config, "active_setup", None)

    def visit(block) -> bool:
        if isinstance(block, Fuse) and name in block.flatten():
            return True
        return isinstance(block, AdapterCompositionBlock) and any(visit(c) for c in block.children)

    return visit(setup)


def _sequential_forward(self, x, residual_input, output_gating=False):
    """Patched ``Adapter.forward``: the library's result, through the fused op; returns (output, None, None)."""
    plan = getattr(self, PLAN_ATTR, None)
    original = type(self).forward
    if (
        plan is None
        or output_gating
        or _training_randomness(self, parallel=False)
        or _in_active_fuse(getattr(self, "_adapterkern_config", None), self.name)
    ):
        return original(self, x, residual_input, output_gating)
    h = self.adapter_norm_before(x) if self.add_layer_norm_before else x
    if not _fits(h, residual_input, self):
        return original(self, x, residual_input, output_gating)
    output = _fused_branch(self, plan, h, None if residual_input is h else residual_input)
    if self.add_layer_norm_after:  # classified: only with adapter_residual_before_ln=True
        output = self.adapter_norm_after(output)
    return output, None, None


def _single_stack_adapter(layer, setup) -> Optional[str]:
    """The one bottleneck adapter of this layer named by a Stack setup of plain names, else None."""
    from adapters.composition import Stack

    if type(setup) is not Stack or not all(isinstance(c, str) for c in setup.children):
        return None
    names = [c for c in setup.children if c in layer.adapters]
    return names[0] if len(names) == 1 else None


def _parallel_layer_forward(self, hidden_states, residual_input, layer_norm):
    """Patched ``BottleneckLayer.bottleneck_layer_forward``: a lone active parallel adapter runs fused.

    The library computes ``post_ln(h + s * up(act(down(x))))`` with h = ``hidden_states`` (the
    sublayer's output) and x = ``residual_input`` (its input); this is the fused op with ``residual=h``.
    """
    from adapters.composition import adjust_tensors_for_parallel
    from adapters.context import ForwardContext
    from adapters.methods.modeling import Adapter

    original = type(self).bottleneck_layer_forward
    context = ForwardContext.get_context()
    setup = self.get_active_setup()
    name = None if setup is None else _single_stack_adapter(self, setup)
    adapter = None if name is None else self.adapters[name]
    plan = getattr(adapter, PLAN_ATTR, None)
    if (
        plan is None
        or not plan.parallel
        or residual_input is None
        or (context is not None and getattr(context, "output_adapter_gating_scores", False))
        or _training_randomness(adapter, parallel=True)
    ):
        return original(self, hidden_states, residual_input, layer_norm)
    # As the library: batch sizes may differ (prefix tuning with Parallel blocks).
    (res,) = adjust_tensors_for_parallel(hidden_states, residual_input)
    (hid,) = adjust_tensors_for_parallel(res, hidden_states)
    x = adapter.adapter_norm_before(res) if adapter.add_layer_norm_before else res  # ParallelAdapter.pre_forward: x = input
    if not _fits(x, hid, adapter):
        return original(self, hidden_states, residual_input, layer_norm)
    output = _fused_branch(adapter, plan, x, hid)
    # ParallelAdapter.post_forward = (output + h), then Adapter.post_forward's original_ln_after step.
    return Adapter.post_forward(adapter, output, hid, res, layer_norm)


# ------------------------------------------------------------------------------------------------
# Compositions: BatchSplit / Parallel (one batched launch) and Fuse (one multi-adapter launch)
# ------------------------------------------------------------------------------------------------
class _Verdict(NamedTuple):
    """Whether a composition block runs in one launch in one layer: ``names`` its adapters in this
    layer (Fuse: one per child, in order), or ``why`` not (warned once), or neither (none of its
    adapters here: the library's code, silently)."""

    names: Tuple[str, ...] = ()
    why: Optional[str] = None


_LIBRARY_BLOCKS = {"Split": "Split (a split along the sequence) is not fused"}


def _analyse(layer, block) -> _Verdict:
    """Whether ``block`` (BatchSplit, Parallel, Fuse, Split, Average) can run in one launch in ``layer``."""
    from adapters.composition import AdapterCompositionBlock

    kind = type(block).__name__
    present = [c for c in block.children if isinstance(c, str) and c in layer.adapters]
    nested = [c for c in block.children if isinstance(c, AdapterCompositionBlock)]
    if not present and not nested:
        return _Verdict()  # none of its adapters in this layer: the library passes the state on
    if kind in _LIBRARY_BLOCKS:
        return _Verdict(why=_LIBRARY_BLOCKS[kind])
    if nested:
        return _Verdict(why=f"{kind} with a nested {type(nested[0]).__name__} block")
    lp = getattr(layer, COMPOSE_ATTR)
    if lp.backend == "cuda":
        return _Verdict(why="backend='cuda': the CUDA extension has no multi-adapter / batched kernel")
    names = tuple(present) if kind in ("Fuse", "Average") else tuple(dict.fromkeys(present))  # one slot per child
    props = {}
    for name in dict.fromkeys(names):
        adapter = layer.adapters[name]
        plan = getattr(adapter, PLAN_ATTR, None)
        if plan is None:
            why = lp.unfused.get(name, "not patched: added after patch_adapters (call it again)")
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
    """(stacked weights and scaling of adapters ``names``, activation, backend) for a fused composition call, or
    None when this call must take the library's path (training randomness, tensors that do not fit,
    gating scores requested, ``auto`` resolving to the CUDA extension)."""
    from adapters.context import ForwardContext

    context = ForwardContext.get_context()
    if context is not None and getattr(context, "output_adapter_gating_scores", False):
        return None
    adapters = [layer.adapters[name] for name in names]
    plans = [getattr(a, PLAN_ATTR, None) for a in adapters]
    if any(p is None for p in plans):
        return None
    for adapter, plan in zip(adapters, plans):
        if _training_randomness(adapter, plan.parallel) or not _fits(x, x if residual is None else residual, adapter):
            return None
    backend = plans[0].backend
    if resolve_backend(backend, x.device) == "cuda":
        return None
    downs = [a.adapter_down[-2] for a in adapters]
    ups = [a.adapter_up for a in adapters]
    w_down = torch.stack([m.weight for m in downs])
    w_up = torch.stack([m.weight for m in ups])
    b_down = None if downs[0].bias is None else torch.stack([m.bias for m in downs])
    b_up = None if ups[0].bias is None else torch.stack([m.bias for m in ups])
    scales = [a.scaling for a in adapters]
    if not any(isinstance(s, Tensor) for s in scales):
        values = [float(s) for s in scales]
        scaling = values[0] if len(set(values)) == 1 else x.new_tensor(values)
    elif all(not isinstance(s, Tensor) or s.numel() == 1 for s in scales):
        scaling = torch.stack([s.reshape(()) if isinstance(s, Tensor) else x.new_tensor(float(s)) for s in scales])
    else:
        d = x.shape[-1]
        scaling = torch.stack([s.reshape(-1).expand(d) if isinstance(s, Tensor) else x.new_full((d,), float(s)) for s in scales])
    return w_down, b_down, w_up, b_up, scaling, plans[0].activation, backend


def _row_groups(child_index: Tuple[int, ...], counts: List[int], n: int, x: Tensor):
    """Per-sequence adapter index (B,) for rows given by ``counts`` per child, and its token groups;
    made once per forward pass and shape (kept on the library's ForwardContext), used by every layer."""
    from adapters.context import ForwardContext

    key = ("adapterkern_groups", child_index, tuple(counts), n, tuple(x.shape[:-1]), x.device)
    context = ForwardContext.get_context()
    cache = None if context is None else context.__dict__.setdefault("_adapterkern_groups", {})
    if cache is not None and key in cache:
        return cache[key]
    index = torch.repeat_interleave(torch.tensor(child_index, dtype=torch.int64), torch.tensor(counts, dtype=torch.int64))
    index = index.to(x.device)
    per_token = index.reshape((-1,) + (1,) * (x.dim() - 2)).expand(x.shape[:-1])
    value = (index, token_groups(per_token, n))
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
    index, groups = _row_groups(child_index, counts, len(names), x)
    if parallel:
        residual = x.new_zeros(()).expand(x.shape)  # ParallelAdapter.forward: no residual (post_forward adds it)
    elif residual is x:
        residual = None
    passed_on = any(i < 0 and k > 0 for i, k in zip(child_index, counts))
    if passed_on and residual is not None:
        keep = (index < 0).reshape((-1,) + (1,) * (x.dim() - 1))
        residual = torch.where(keep, x, residual)  # index -1 gives the residual: make it x there
    return bottleneck_adapter_batched(
        x, index, w_down, b_down, w_up, b_up,
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


def _library_block(name):
    def compose(self, adapter_setup, state, lvl=0):
        _verdict(self, adapter_setup)  # warns once: this block keeps the library's loop
        return getattr(type(self), name)(self, adapter_setup, state, lvl)

    compose.__name__ = f"_{name}"
    return compose


_compose_split = _library_block("compose_split")


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


_COMPOSE_IMPLS = {
    "compose_batch_split": _compose_batch_split,
    "compose_parallel": _compose_parallel,
    "compose_fuse": _compose_fuse,
    "compose_split": _compose_split,
    "compose_average": _compose_average,
    "pad_and_concat": _pad_and_concat,
}


def _report_compositions(report: "AdapterPatchReport", layer_name: str, layer) -> None:
    """Record, for the layer's active setup now, which composition blocks run in one launch."""
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
            report.compositions[key] = _describe_block(kind, verdict, layer)
        elif verdict.why is not None:
            report.compositions_library[key] = verdict.why
            lp.warned.add(f"patch_adapters: {probe!r} keeps the adapters library's loop over its adapters: {verdict.why}")

    visit(setup)


def _is_ours(f) -> bool:
    return isinstance(f, MethodType) and (
        f.__func__ in (_sequential_forward, _parallel_layer_forward) or f.__func__ in _COMPOSE_IMPLS.values()
    )


# ------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------
def _check_model(model) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (set up with adapters.init), got {type(model).__name__}")


def unpatch_adapters(model: nn.Module) -> int:
    """Restore the ``adapters`` library's own forward on every module :func:`patch_adapters` patched.

    Returns the number of modules restored (0 if none was patched). Does not import ``adapters``.
    """
    _check_model(model)
    restored = 0
    for module in model.modules():
        touched = False
        for attr in ("forward", "bottleneck_layer_forward") + COMPOSE_FUNCS:
            if _is_ours(vars(module).get(attr)):
                delattr(module, attr)
                touched = True
        for attr in (PLAN_ATTR, LAYER_ATTR, COMPOSE_ATTR, "_adapterkern_config"):
            if attr in vars(module):
                delattr(module, attr)
                touched = True
        restored += touched
    return restored


def patch_adapters(model: nn.Module, backend: str = "auto") -> AdapterPatchReport:
    """Run every bottleneck adapter of an ``adapters``-library model through the fused op.

    Args:
        model: a model set up with ``adapters.init`` (or an ``AutoAdapterModel``), adapters added.
            Adapters added after the call are not patched: call again (patching is idempotent).
        backend: ``auto``, ``torch``, ``triton`` or ``cuda``, for every fused call.

    Returns:
        An :class:`AdapterPatchReport`. Modules that keep the library's path (always, or while
        training) and composition blocks of the active setup that keep the library's loop are
        listed with the reason in one :class:`AdapterPatchWarning`; a model without bottleneck
        adapters gives an empty report and a warning saying so.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``. ValueError: unknown ``backend``.
        ImportError: the ``adapters`` library is not installed.
    """
    _check_model(model)
    backend = check_backend_name(backend, "backend")
    try:
        from adapters.methods import modeling as lib
        from adapters.methods.bottleneck import BottleneckLayer
    except ImportError as e:
        raise ImportError(
            "patch_adapters needs the AdapterHub `adapters` library: pip install 'adapterkern[adapterhub]'"
        ) from e

    unpatch_adapters(model)
    report = AdapterPatchReport(backend=backend)
    for layer_name, layer in model.named_modules():
        if not isinstance(layer, BottleneckLayer) or not isinstance(getattr(layer, "adapters", None), nn.ModuleDict):
            continue
        patch_layer = False
        unfused = {}
        for adapter_name, adapter in layer.adapters.items():
            qualified = f"{layer_name}.adapters.{adapter_name}" if layer_name else f"adapters.{adapter_name}"
            plan, what, train_reason = _classify(adapter, lib, layer, backend)
            if plan is None:
                report.library[qualified] = what
                unfused[adapter_name] = what
                continue
            setattr(adapter, PLAN_ATTR, plan)
            if plan.parallel:
                patch_layer = True
            else:
                # The active setup lives in the model-wide adapters config: to see Fuse blocks at run time.
                setattr(adapter, "_adapterkern_config", getattr(layer, "adapters_config", None))
                adapter.forward = MethodType(_sequential_forward, adapter)
            report.fused[qualified] = what
            if train_reason is not None:
                report.library_in_training[qualified] = train_reason
        if patch_layer:
            setattr(layer, LAYER_ATTR, True)
            layer.bottleneck_layer_forward = MethodType(_parallel_layer_forward, layer)
        if len(unfused) < len(layer.adapters) and not any(attr in vars(layer) for attr in COMPOSE_FUNCS):
            # Composition blocks over this layer's adapters (read through getattr by the library's compose).
            setattr(layer, COMPOSE_ATTR, _LayerPlan(backend=backend, unfused=unfused))
            for attr, impl in _COMPOSE_IMPLS.items():
                setattr(layer, attr, MethodType(impl, layer))
            _report_compositions(report, layer_name, layer)

    if not report.fused and not report.library:
        warnings.warn(
            "patch_adapters: no bottleneck adapter modules of the adapters library found in the model; "
            "nothing was patched (add adapters first, then patch)",
            AdapterPatchWarning,
            stacklevel=2,
        )
    elif report.library or report.library_in_training or report.compositions_library:
        lines = []
        if report.library:
            lines.append(f"patch_adapters: {len(report.library)} adapter module(s) keep the adapters library's path:")
            lines += [f"  {name}: {why}" for name, why in report.library.items()]
        if report.library_in_training:
            lines.append(f"patch_adapters: {len(report.library_in_training)} fused module(s) take the library's path while training:")
            lines += [f"  {name}: {why}" for name, why in report.library_in_training.items()]
        if report.compositions_library:
            lines.append(
                f"patch_adapters: {len(report.compositions_library)} composition block(s) of the active setup keep the "
                "library's loop over their adapters:"
            )
            lines += [f"  {name}: {why}" for name, why in report.compositions_library.items()]
        warnings.warn("\n".join(lines), AdapterPatchWarning, stacklevel=2)
    return report
