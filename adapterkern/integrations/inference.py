"""Inference without the adapter's extra memory traffic: :func:`optimize_for_inference` and
:func:`undo_inference_optimization` for models set up with :func:`~adapterkern.add_adapter`.

Per place of the active adapter (:class:`InferenceReport` says which got what, and why):

* **merged** -- a parallel adapter beside an FFN (``parallel``, and the adapter half of ``mam``),
  ``y = FFN(x) + s * W_up act(W_down x + b_down) + s * b_up``, goes into the FFN's own matmuls:
  W_down stacked under the FFN's first projection (Llama: gate, up and W_down in one matmul), the
  FFN's activation on its columns and the adapter's on the last r, ``s * W_up`` appended as r input
  columns of the output projection and ``s * b_up`` added to its bias. BERT / RoBERTa (the adapter
  adds to the skip input of ``BertOutput``, ``LN(ffn(x) + x + s * up(...))``): ``intermediate`` and
  ``output`` are replaced; GPT-2 and Llama: ``mlp``. No adapter op runs there.
* **fused** -- a sequential adapter whose output meets the residual add and the LayerNorm in the
  same module (BERT / RoBERTa ``*SelfOutput`` / ``*Output``, Pfeiffer / Houlsby): that module is
  replaced by one that computes ``dense`` then one :func:`adapterkern.adapter_add_norm` call.
* **unchanged** -- everything else keeps the hook path (GPT-2 / Llama sequential adapters: their
  residual add is in the decoder layer; prefixes; compositions; AdapterDrop's dropped layers; other
  adapters' places; structures not recognised), with the reason.

The replaced modules are kept, untouched, and put back by :func:`undo_inference_optimization`. The
backbone is not copied: each original weight of a merged FFN becomes a view into the widened weight
that replaces it (its Parameter object stays the same), and undo gives it its own storage back with
the same values, shape and strides. The adapters stay where they were, with their own weights, so
:func:`~adapterkern.save_adapter` writes what it wrote before. While optimised, ``model.train()`` and
every call that would change what the model serves are refused (``RuntimeError``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .adapterhub_plans import BoundPatch
from .inference_modules import TRAINING_MESSAGE
from .inference_plans import Plan, Unchanged, carry_slots, check_replaced, plan_place
from .slots import OPTIMIZED_KEY, check_model, check_not_optimized, iter_slots, routed_slots
from .transformers import get_active_adapter

__all__ = ["InferenceReport", "optimize_for_inference", "undo_inference_optimization"]


@dataclass
class InferenceReport:
    """What :func:`optimize_for_inference` did, by place (the qualified name of every module of the
    model that holds adapters; each is in exactly one of the three).

    ``adapter``: the active adapter when it ran (None: none was active).
    ``merged``: parallel adapters merged into their FFN's matmuls (value: into what); no adapter op runs there.
    ``fused``: sequential adapters fused with the residual add and LayerNorm (value: how).
    ``unchanged``: places left on the hook path (value: why).
    """

    adapter: Optional[str]
    merged: Dict[str, str] = field(default_factory=dict)
    fused: Dict[str, str] = field(default_factory=dict)
    unchanged: Dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"optimize_for_inference (adapter {self.adapter!r}): {len(self.merged)} merged, {len(self.fused)} fused, "
            f"{len(self.unchanged)} unchanged"
        ]
        lines += [f"  merged     {name}: {what}" for name, what in self.merged.items()]
        lines += [f"  fused      {name}: {what}" for name, what in self.fused.items()]
        lines += [f"  unchanged  {name}: {why}" for name, why in self.unchanged.items()]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The record of an optimised model (model.__dict__[OPTIMIZED_KEY]): what undo puts back
# ------------------------------------------------------------------------------------------------


@dataclass
class _Swap:
    """``parent._modules[attr]`` was ``original``; now ``replacement``."""

    parent: nn.Module
    attr: str
    original: nn.Module
    replacement: nn.Module


@dataclass
class _Shared:
    """An original tensor (a Parameter of a replaced module) that is a view of ``merged`` while
    optimised: ``merged.narrow(dim, start, length)``; ``shape`` / ``stride`` are its own."""

    tensor: Tensor
    merged: Tensor
    dim: int
    start: int
    length: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]


@dataclass
class _Kept:
    """A tensor of a replaced module that no longer is in the model: undo moves it to ``reference``'s
    dtype and device, in case the optimised model was moved or cast (otherwise it is left as it is)."""

    tensor: Tensor
    reference: Tensor


@dataclass
class _State:
    report: InferenceReport
    swaps: List[_Swap] = field(default_factory=list)
    shared: List[_Shared] = field(default_factory=list)
    kept: List[_Kept] = field(default_factory=list)
    had_train: bool = False  # the model had an instance attribute ``train`` of its own
    previous_train: object = None


def _refusing_train(model: nn.Module, mode: bool = True):
    """``model.train`` while optimised: ``train(False)`` / ``eval()`` as usual, ``train(True)`` refused."""
    if mode:
        raise RuntimeError(f"model.train(): the model is {TRAINING_MESSAGE}")
    state = model.__dict__[OPTIMIZED_KEY]
    if state.had_train:
        return state.previous_train(False)
    return type(model).train(model, False)


# ------------------------------------------------------------------------------------------------
# Commit and undo
# ------------------------------------------------------------------------------------------------


def _commit(state: _State, plan: Plan) -> None:
    """Build the plan's modules, swap them in and make the originals' weights views of the merged
    ones, logging each step in ``state`` as it is done (so that :func:`_restore` can undo a part)."""
    built = plan.build()
    in_tree = set()
    for parent, attr, original, replacement in built.modules:
        carry_slots(original, replacement)
        in_tree |= {id(t) for t in replacement.parameters()} | {id(t) for t in replacement.buffers()}
    for parent, attr, original, replacement in built.modules:
        if parent._modules.get(attr) is not original:
            raise RuntimeError(f"optimize_for_inference: {attr} changed while the model was being optimised")
        parent._modules[attr] = replacement
        state.swaps.append(_Swap(parent, attr, original, replacement))
    shared_ids = set()
    for tensor, merged, dim, start, length in built.shared:
        entry = _Shared(tensor, merged, dim, start, length, tuple(tensor.shape), tuple(tensor.stride()))
        tensor.data = merged.detach().narrow(dim, start, length)
        state.shared.append(entry)
        shared_ids.add(id(tensor))
    reference = built.modules[-1][3]
    ref = next(iter(reference.parameters()))
    for _, _, original, _ in built.modules:
        for t in list(original.parameters()) + list(original.buffers()):
            if id(t) not in in_tree and id(t) not in shared_ids:
                state.kept.append(_Kept(t, ref))


def _materialise(entry: _Shared) -> Tensor:
    source = entry.merged.detach().narrow(entry.dim, entry.start, entry.length)
    out = torch.empty_strided(entry.shape, entry.stride, dtype=source.dtype, device=source.device)
    out.copy_(source)
    return out


def _restore(state: _State) -> None:
    """Undo what ``state`` logged, in reverse: original weights get their own storage back (from the
    merged weights, which hold their values), replaced modules go back."""
    for entry in reversed(state.shared):
        entry.tensor.data = _materialise(entry)
    for entry in state.kept:
        ref = entry.reference
        if entry.tensor.is_floating_point() and (entry.tensor.dtype != ref.dtype or entry.tensor.device != ref.device):
            entry.tensor.data = entry.tensor.data.to(device=ref.device, dtype=ref.dtype)
        elif entry.tensor.device != ref.device:
            entry.tensor.data = entry.tensor.data.to(device=ref.device)
    for swap in reversed(state.swaps):
        swap.parent._modules[swap.attr] = swap.original
    state.shared.clear()
    state.kept.clear()
    state.swaps.clear()


def optimize_for_inference(model: nn.Module) -> InferenceReport:
    """Make ``model`` (set up with :func:`~adapterkern.add_adapter`, in eval mode) serve its active
    adapter with less memory traffic, and report what each adapter place became.

    Parallel adapters beside an FFN are merged into the FFN's matmuls (no adapter op runs); BERT-style
    sequential adapters run with the residual add and LayerNorm in one
    :func:`adapterkern.adapter_add_norm` call; everything else keeps the hook path
    (:class:`InferenceReport` lists every place and why). Outputs equal the unoptimised model's up to
    rounding (the merged sums are accumulated in another order; the scaling is folded into W_up).

    Refused (``RuntimeError``, the model untouched): a model in training mode (``model.eval()``
    first; a module in training mode inside an FFN or output module to be replaced keeps that place
    on the hook path), a model already optimised, a call inside ``route_adapters`` /
    ``multi_task_forward``. Parameters that require grad are fine: the merged weights do not
    (inference only; gradients still flow to inputs that require grad).

    All or nothing: every place is checked before the model changes, and if building or swapping in
    a merged module fails anyway, what was done is undone (the model is as it was, bit for bit).
    While optimised, ``model.train()``, ``set_active_adapter``, ``train_adapter``, ``add_adapter``,
    ``delete_adapter``, ``load_adapter``, ``add_fusion``, ``route_adapters``, ``set_adapter_drop`` and
    ``multi_task_forward`` are refused; ``save_adapter`` saves the adapters' own tensors, as before.
    :func:`undo_inference_optimization` gives the original modules and weights back.
    """
    check_not_optimized(model, "optimize_for_inference")
    if model.training:
        raise RuntimeError(
            "optimize_for_inference: the model is in training mode; call model.eval() first "
            "(the merged layers compute eval-mode maths: no dropout)"
        )
    slots = list(iter_slots(model))
    routed = [name for name, _, slot in slots if slot in routed_slots()]
    if routed:
        raise RuntimeError("optimize_for_inference: called inside route_adapters / multi_task_forward (routing this call "
                           f"at {routed[0]!r}); optimise outside the block")
    adapter_name = get_active_adapter(model)
    report = InferenceReport(adapter_name)
    modules = dict(model.named_modules())
    module_uses: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        module_uses[id(m)] = module_uses.get(id(m), 0) + 1
    param_uses: Dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        param_uses[id(p)] = param_uses.get(id(p), 0) + 1
    plans: List[Plan] = []
    taken: Dict[int, str] = {}
    decisions: Dict[str, object] = {}
    for name, module, slot in slots:
        try:
            plan = plan_place(modules, name, module, slot, adapter_name)
            check_replaced(plan, module_uses, param_uses, taken)
        except Unchanged as why:
            decisions[name] = str(why)
            continue
        for parent, attr, _, _ in plan.replaced:
            taken[id(parent._modules[attr])] = name
        plans.append(plan)
        decisions[name] = plan
    for name, decision in decisions.items():
        if isinstance(decision, Plan):
            getattr(report, decision.kind)[name] = decision.description
        else:
            report.unchanged[name] = decision
    state = _State(report, had_train="train" in model.__dict__, previous_train=model.__dict__.get("train"))
    try:
        for plan in plans:
            _commit(state, plan)
        model.__dict__[OPTIMIZED_KEY] = state
        model.__dict__["train"] = BoundPatch(_refusing_train, model)
        for _, _, slot in iter_slots(model):
            slot.__dict__[OPTIMIZED_KEY] = True
    except BaseException:
        _restore(state)
        _unmark(model, state)
        raise
    return report


def _unmark(model: nn.Module, state: _State) -> None:
    """The model's ``train``, record and slot flags as they were before it was optimised."""
    if state.had_train:
        model.__dict__["train"] = state.previous_train
    else:
        model.__dict__.pop("train", None)
    model.__dict__.pop(OPTIMIZED_KEY, None)
    for _, _, slot in iter_slots(model):
        slot.__dict__.pop(OPTIMIZED_KEY, None)


def undo_inference_optimization(model: nn.Module) -> InferenceReport:
    """Undo :func:`optimize_for_inference`: the original modules back in their places, their weights
    in their own storage again (the same Parameter objects, values, shapes and strides), the model's
    ``train`` and the adapter calls allowed again. Returns the report of the optimisation undone (its
    ``merged`` and ``fused`` places are the ones restored). ``ValueError`` if ``model`` is not optimised.

    If the optimised model was moved or cast (``.to``, ``.half()``), the restored weights follow it:
    they are taken from the merged weights, which hold their values."""
    check_model(model)
    state = model.__dict__.get(OPTIMIZED_KEY)
    if not isinstance(state, _State):
        raise ValueError("undo_inference_optimization: this model is not optimised for inference (optimize_for_inference)")
    _restore(state)
    _unmark(model, state)
    return state.report
