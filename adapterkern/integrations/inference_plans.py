"""How :func:`~adapterkern.optimize_for_inference` reads a model: per adapter place, a :class:`Plan`
(merge the parallel adapter into the FFN's matmuls, or fuse the sequential adapter with the residual
add and LayerNorm), or :class:`Unchanged` saying why the place keeps the hook path; the widened
weights each plan builds. Plans are checked without touching the model (:func:`plan_place`,
:func:`check_replaced`); :mod:`adapterkern.integrations.inference` builds and swaps them in."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..activations import get_activation
from ..backends import ADD_NORM, implements
from ..nn.bottleneck import BottleneckAdapter
from .inference_modules import FusedAddNormOutput, MergedGatedMLP, MergedIntermediate, MergedLinear, MergedMLP, MergedPostLNOutput
from .slots import PARALLEL, PARALLEL_SKIP, PREFIX, RENORM, SEQUENTIAL, SLOT_ATTR, AdapterSlot, is_slot_hook, slot_of

__all__ = ["Built", "Plan", "Unchanged", "carry_slots", "check_replaced", "plan_place"]



# ------------------------------------------------------------------------------------------------
# Reading the model: linear layers, hooks, structures
# ------------------------------------------------------------------------------------------------


def _linear_layout(module: nn.Module) -> Optional[str]:
    """``"linear"`` for a plain ``nn.Linear``, ``"conv1d"`` for transformers' ``Conv1D``, else None
    (subclasses, quantised or parametrised layers are not merged)."""
    if type(module) is nn.Linear:
        return "linear"
    cls = type(module)
    if (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.") and isinstance(getattr(module, "nx", None), int)
            and isinstance(getattr(module, "nf", None), int)):
        w, b = getattr(module, "weight", None), getattr(module, "bias", None)
        if isinstance(w, nn.Parameter) and tuple(w.shape) == (module.nx, module.nf) and isinstance(b, nn.Parameter) and tuple(b.shape) == (module.nf,):
            return "conv1d"
    return None


def _features(module: nn.Module) -> Tuple[int, int]:
    """(in, out) of a layer :func:`_linear_layout` accepts."""
    if _linear_layout(module) == "linear":
        return module.in_features, module.out_features
    return module.nx, module.nf


def _children(module: nn.Module) -> Dict[str, nn.Module]:
    return {k: v for k, v in module._modules.items() if k != SLOT_ATTR and v is not None}


def _foreign_hooks(module: nn.Module) -> Optional[str]:
    """What, other than adapterkern's own slot hooks, changes how ``module`` runs; None if nothing."""
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    if not all(is_slot_hook(h) for h in hooks):
        return "forward hooks"
    if module._backward_hooks or getattr(module, "_backward_pre_hooks", None):
        return "backward hooks"
    if "forward" in module.__dict__:
        return "a forward patched on the instance"
    return None


def _slots_below(module: nn.Module) -> Dict[str, AdapterSlot]:
    """Relative name -> slot of every adapter slot in ``module``'s subtree (its own under "")."""
    out = {}
    for name, m in module.named_modules():
        slot = slot_of(m)
        if slot is not None:
            out[name] = slot
    return out


def _signature(cls, method: str) -> List[str]:
    try:
        return list(inspect.signature(getattr(cls, method)).parameters)
    except (TypeError, ValueError, AttributeError):
        return []


def _is_post_ln_output(module: nn.Module) -> bool:
    """BERT's ``BertSelfOutput`` / ``BertOutput`` (RoBERTa's, ELECTRA's, ... are copies):
    ``LayerNorm(dropout(dense(hidden_states)) + input_tensor)``."""
    kids = _children(module)
    return (
        set(kids) == {"dense", "LayerNorm", "dropout"}
        and type(kids["dense"]) is nn.Linear
        and type(kids["LayerNorm"]) is nn.LayerNorm
        and len(kids["LayerNorm"].normalized_shape) == 1
        and kids["LayerNorm"].normalized_shape[0] == kids["dense"].out_features
        and type(kids["dropout"]) is nn.Dropout
        and _signature(type(module), "forward") == ["self", "hidden_states", "input_tensor"]
    )


def _is_intermediate(module: nn.Module) -> bool:
    """BERT's ``BertIntermediate``: ``intermediate_act_fn(dense(hidden_states))``."""
    kids = _children(module)
    return (
        set(kids) - {"intermediate_act_fn"} == {"dense"}
        and type(kids["dense"]) is nn.Linear
        and callable(getattr(module, "intermediate_act_fn", None))
        and _signature(type(module), "forward") == ["self", "hidden_states"]
    )


def _parent(modules: Dict[str, nn.Module], name: str) -> Tuple[nn.Module, str, str]:
    """(parent module, attribute, parent's qualified name) of the module called ``name``."""
    parent_name, _, attr = name.rpartition(".")
    return modules[parent_name], attr, parent_name


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


class Unchanged(Exception):
    """A place that keeps the hook path; the message says why."""


# ------------------------------------------------------------------------------------------------
# Building the widened weights
# ------------------------------------------------------------------------------------------------


def _acc_dtype(t: Tensor) -> torch.dtype:
    """The dtype the scaling is folded in (then rounded once to the weight's dtype)."""
    return torch.float64 if t.device.type in ("cpu", "cuda") else torch.float32


def _scaled_up(adapter: BottleneckAdapter) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """(s * W_up (d, r), s * b_up (d,) or None, s as a (1,) or (d,) tensor in the accumulation dtype)."""
    w, b, s = adapter.adapter_up.weight.detach(), adapter.adapter_up.bias, adapter.scaling
    acc = _acc_dtype(w)
    s = s.detach().to(acc).reshape(-1) if isinstance(s, Tensor) else torch.tensor([float(s)], dtype=acc, device=w.device)
    ws = (w.to(acc) * s[:, None]).to(w.dtype)
    bs = None if b is None else (b.detach().to(acc) * s).to(b.dtype)
    return ws, bs, s


def _cat_bias(parts: List[Tuple[Optional[Tensor], int]], like: Tensor) -> Optional[Tensor]:
    """The biases of stacked outputs, zeros where a part has none; None if no part has one."""
    if all(b is None for b, _ in parts):
        return None
    return torch.cat([torch.zeros(n, dtype=like.dtype, device=like.device) if b is None else b.detach() for b, n in parts])


@dataclass
class Built:
    """A replacement, and which original tensors become views of which merged ones."""

    modules: List[Tuple[nn.Module, str, nn.Module, nn.Module]]  # (parent, attr, original, replacement)
    shared: List[Tuple[Tensor, Tensor, int, int, int]]  # (original tensor, merged tensor, dim, start, length)


def _wide_in(layer: nn.Module, adapter: BottleneckAdapter, extra: List[nn.Module] = ()) -> Tuple[MergedLinear, list]:
    """The FFN's first projection(s) (``layer`` and ``extra``, all d -> n) with W_down stacked as r more
    outputs: (MergedLinear d -> k*n + r, [(original tensor, merged tensor, dim, start, length)])."""
    layout = _linear_layout(layer)
    layers = [layer, *extra]
    n = _features(layer)[1]
    wd, bd = adapter.adapter_down.weight.detach(), adapter.adapter_down.bias
    if layout == "linear":
        weight = torch.cat([m.weight.detach() for m in layers] + [wd], dim=0)
        weight_dim = 0
    else:
        weight = torch.cat([m.weight.detach() for m in layers] + [wd.t()], dim=1)
        weight_dim = 1
    bias = _cat_bias([(m.bias, n) for m in layers] + [(bd, wd.shape[0])], weight)
    merged = MergedLinear(weight, bias, layout)
    shared = []
    for i, m in enumerate(layers):
        shared.append((m.weight, merged.weight, weight_dim, i * n, n))
        if m.bias is not None:
            shared.append((m.bias, merged.bias, 0, i * n, n))
    return merged, shared


def _wide_out(layer: nn.Module, adapter: BottleneckAdapter) -> Tuple[MergedLinear, list]:
    """The FFN's output projection (n -> d) with s * W_up as r more inputs and s * b_up in its bias."""
    layout = _linear_layout(layer)
    n = _features(layer)[0]
    ws, bs, s = _scaled_up(adapter)
    if layout == "linear":
        weight, weight_dim = torch.cat([layer.weight.detach(), ws], dim=1), 1
    else:
        weight, weight_dim = torch.cat([layer.weight.detach(), ws.t()], dim=0), 0
    b = layer.bias
    if adapter.adapter_up.bias is None:
        bias = None if b is None else b.detach()  # the same storage: the original bias is shared as it is
    elif b is None:
        bias = bs
    else:
        up = adapter.adapter_up.bias.detach()
        bias = (b.detach().to(s.dtype) + up.to(s.dtype) * s).to(b.dtype)
    merged = MergedLinear(weight, bias, layout)
    shared = [(layer.weight, merged.weight, weight_dim, 0, n)]
    return merged, shared


def _check_adapter(adapter, d: int, like: Tensor) -> BottleneckAdapter:
    if type(adapter) is not BottleneckAdapter:
        raise Unchanged(f"the active entry here is a {type(adapter).__name__}, not a plain BottleneckAdapter")
    if adapter.hidden_size != d:
        raise Unchanged(f"the adapter's width {adapter.hidden_size} is not the FFN's {d}")
    for p in adapter.parameters():
        if p.dtype != like.dtype or p.device != like.device:
            raise Unchanged(f"the adapter's tensors ({p.dtype}, {p.device}) differ from the FFN's ({like.dtype}, {like.device})")
    return adapter


def _describe_adapter(name: str, adapter: BottleneckAdapter) -> str:
    s = adapter.scaling
    scaling = f"scaling {s:g}" if not isinstance(s, Tensor) else ("learned scaling" if s.numel() == 1 else "per-channel scaling")
    return f"{name!r} (r={adapter.bottleneck_size}, {adapter.activation}, {scaling})"


# ------------------------------------------------------------------------------------------------
# Plans: what one place becomes (checked without touching the model; built and swapped at commit)
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    place: str
    kind: str  # "merged" or "fused"
    description: str
    # (parent, attr, qualified name, relative names of the adapter slots below it it may carry) per module replaced
    replaced: List[Tuple[nn.Module, str, str, Tuple[str, ...]]]
    build: Callable[[], Built]


def _plan_bert_parallel(modules, place: str, out: nn.Module, adapter_name: str, adapter) -> Plan:
    layer, attr, layer_name = _parent(modules, place)
    intermediate = getattr(layer, "intermediate", None)
    if attr != "output" or not isinstance(intermediate, nn.Module) or not callable(getattr(type(layer), "feed_forward_chunk", None)):
        raise Unchanged(f"not the output module of a BERT-style layer (intermediate -> output through feed_forward_chunk): "
                         f"{type(layer).__name__}.{attr}")
    if not _is_post_ln_output(out) or not _is_intermediate(intermediate):
        raise Unchanged(f"unknown FFN structure: {type(intermediate).__name__} -> {type(out).__name__} "
                         f"(expected BertIntermediate -> BertOutput-style modules)")
    dense_in, dense_out = intermediate.dense, out.dense
    d, n = dense_in.in_features, dense_in.out_features
    if dense_out.in_features != n or dense_out.out_features != d:
        raise Unchanged(f"the FFN's projections do not chain: {d} -> {n}, then {dense_out.in_features} -> {dense_out.out_features}")
    adapter = _check_adapter(adapter, d, dense_in.weight)
    r = adapter.bottleneck_size
    act = get_activation(adapter.activation)

    def build() -> Built:
        wide_in, shared_in = _wide_in(dense_in, adapter)
        wide_out, shared_out = _wide_out(dense_out, adapter)
        new_intermediate = MergedIntermediate(wide_in, intermediate.intermediate_act_fn, act.name, act.fn, n)
        new_out = MergedPostLNOutput(wide_out, out.LayerNorm, out.dropout)
        return Built([(layer, "intermediate", intermediate, new_intermediate), (layer, "output", out, new_out)],
                      shared_in + shared_out)

    return Plan(
        place, "merged",
        f"parallel adapter {_describe_adapter(adapter_name, adapter)} merged into {_join(layer_name, 'intermediate.dense')} "
        f"({d} -> {n} + {r}, then the FFN's activation and {act.name}) and {_join(place, 'dense')} ({n} + {r} -> {d}, "
        f"scaled W_up and b_up folded in); the skip input is the layer's own: 2 matmuls, no adapter op",
        [(layer, "intermediate", _join(layer_name, "intermediate"), ("", "dense")), (layer, "output", place, ("", "dense"))], build,
    )


def _plan_mlp_parallel(modules, place: str, mlp: nn.Module, adapter_name: str, adapter) -> Plan:
    parent, attr, _ = _parent(modules, place)
    kids = _children(mlp)
    if set(kids) == {"c_fc", "c_proj", "act", "dropout"}:
        return _plan_gpt2(place, parent, attr, mlp, kids, adapter_name, adapter)
    if set(kids) == {"gate_proj", "up_proj", "down_proj", "act_fn"}:
        return _plan_gated(place, parent, attr, mlp, kids, adapter_name, adapter)
    raise Unchanged(f"unknown FFN structure: a {type(mlp).__name__} with children {sorted(kids)} "
                     f"(merged: GPT-2's c_fc/act/c_proj/dropout and Llama-style gate_proj/up_proj/down_proj/act_fn)")


def _plan_gpt2(place, parent, attr, mlp, kids, adapter_name, adapter) -> Plan:
    c_fc, c_proj = kids["c_fc"], kids["c_proj"]
    layouts = {_linear_layout(c_fc), _linear_layout(c_proj)}
    if None in layouts or len(layouts) != 1 or type(kids["dropout"]) is not nn.Dropout:
        raise Unchanged(f"unknown FFN structure: {type(mlp).__name__}'s c_fc / c_proj are {type(c_fc).__name__} / "
                         f"{type(c_proj).__name__} (merged: both nn.Linear or both transformers' Conv1D)")
    (d, n), (n2, d2) = _features(c_fc), _features(c_proj)
    if (n2, d2) != (n, d) or _signature(type(mlp), "forward")[:2] != ["self", "hidden_states"]:
        raise Unchanged(f"the FFN's projections do not chain: {d} -> {n}, then {n2} -> {d2}")
    adapter = _check_adapter(adapter, d, c_fc.weight)
    r = adapter.bottleneck_size
    act = get_activation(adapter.activation)

    def build() -> Built:
        wide_in, shared_in = _wide_in(c_fc, adapter)
        wide_out, shared_out = _wide_out(c_proj, adapter)
        new = MergedMLP(wide_in, kids["act"], wide_out, kids["dropout"], act.name, act.fn, n)
        return Built([(parent, attr, mlp, new)], shared_in + shared_out)

    return Plan(
        place, "merged",
        f"parallel adapter {_describe_adapter(adapter_name, adapter)} merged into {place}.c_fc ({d} -> {n} + {r}, then the "
        f"FFN's activation and {act.name}) and {place}.c_proj ({n} + {r} -> {d}, scaled W_up and b_up folded in): "
        f"2 matmuls, no adapter op",
        [(parent, attr, place, ("", "c_fc", "c_proj"))], build,
    )


def _plan_gated(place, parent, attr, mlp, kids, adapter_name, adapter) -> Plan:
    gate, up, down = kids["gate_proj"], kids["up_proj"], kids["down_proj"]
    if any(_linear_layout(m) != "linear" for m in (gate, up, down)) or not callable(kids["act_fn"]):
        raise Unchanged(f"unknown FFN structure: {type(mlp).__name__}'s projections are not all plain nn.Linear")
    d, n = gate.in_features, gate.out_features
    if (up.in_features, up.out_features) != (d, n) or (down.in_features, down.out_features) != (n, d):
        raise Unchanged(f"the FFN's projections do not chain: gate {d} -> {n}, up {up.in_features} -> {up.out_features}, "
                         f"down {down.in_features} -> {down.out_features}")
    if (gate.bias is None) != (up.bias is None) or len(_signature(type(mlp), "forward")) != 2:
        raise Unchanged(f"unknown FFN structure: {type(mlp).__name__} (gate and up biases differ, or its forward takes more than x)")
    adapter = _check_adapter(adapter, d, gate.weight)
    r = adapter.bottleneck_size
    act = get_activation(adapter.activation)

    def build() -> Built:
        wide_in, shared_in = _wide_in(gate, adapter, [up])
        wide_out, shared_out = _wide_out(down, adapter)
        new = MergedGatedMLP(wide_in, wide_out, kids["act_fn"], act.name, act.fn, n)
        return Built([(parent, attr, mlp, new)], shared_in + shared_out)

    return Plan(
        place, "merged",
        f"parallel adapter {_describe_adapter(adapter_name, adapter)} merged into {place}: gate_proj, up_proj and the "
        f"adapter's W_down in one matmul ({d} -> 2 x {n} + {r}, then act(gate) * up and {act.name}), and down_proj "
        f"({n} + {r} -> {d}, scaled W_up and b_up folded in): 2 matmuls, no adapter op",
        [(parent, attr, place, ("", "down_proj"))], build,
    )


def _add_norm_backend(backend: str) -> str:
    return backend if implements(backend, ADD_NORM) else "auto"


def _plan_sequential(modules, place: str, dense: nn.Module, adapter_name: str, adapter) -> Plan:
    output, attr, output_name = _parent(modules, place)
    if not output_name or attr != "dense" or not _is_post_ln_output(output):
        raise Unchanged(
            "sequential adapter: no residual add and norm after it in the same module (GPT-2 / Llama: the residual add "
            "is in the decoder layer); runs the fused adapter op through its hook"
        )
    adapter = _check_adapter(adapter, dense.out_features, dense.weight)
    norm = output.LayerNorm
    if norm.weight is not None and (norm.weight.dtype != dense.weight.dtype or norm.weight.device != dense.weight.device):
        raise Unchanged(f"the LayerNorm's weights ({norm.weight.dtype}) differ from the dense layer's ({dense.weight.dtype})")
    grand, grand_attr, _ = _parent(modules, output_name)
    backend = _add_norm_backend(adapter.backend)
    order = [k for k in output._modules if k != SLOT_ATTR]

    def build() -> Built:
        new = FusedAddNormOutput(output.dense, output.LayerNorm, output.dropout, adapter_name, backend, order)
        return Built([(grand, grand_attr, output, new)], [])

    how = f"backend {backend!r}" + ("" if backend == adapter.backend else f" (the adapter's {adapter.backend!r} has no adapter_add_norm)")
    return Plan(
        place, "fused",
        f"sequential adapter {_describe_adapter(adapter_name, adapter)}, the residual add and {output_name}.LayerNorm in one "
        f"adapterkern.adapter_add_norm call after {place} ({how}); {output_name} ({type(output).__name__}) replaced",
        [(grand, grand_attr, output_name, ("", "dense"))], build,
    )


def plan_place(modules, place: str, module: nn.Module, slot: AdapterSlot, adapter_name: Optional[str]) -> Plan:
    """How the place becomes faster, or Unchanged(why not)."""
    active, dropped = slot.current()
    if adapter_name is None:
        raise Unchanged("no adapter is active")
    if adapter_name not in slot:
        raise Unchanged(f"holds no entry of the active adapter {adapter_name!r} (only {list(slot)}): runs nothing")
    if slot.mode == PREFIX:
        raise Unchanged("prefix tuning: the attention reads the prefixes itself; kept as it is")
    if not isinstance(active, str):
        raise Unchanged(f"the active entry is a composition ({active!r}); compositions keep the hook path")
    if dropped:
        raise Unchanged(f"layer {slot.layer} is dropped by AdapterDrop (set_adapter_drop): no adapter runs here")
    adapter = slot[active]
    if slot.mode == PARALLEL_SKIP:
        return _plan_bert_parallel(modules, place, module, adapter_name, adapter)
    if slot.mode == PARALLEL:
        return _plan_mlp_parallel(modules, place, module, adapter_name, adapter)
    if slot.mode == SEQUENTIAL:
        return _plan_sequential(modules, place, module, adapter_name, adapter)
    if slot.mode == RENORM:
        raise Unchanged("the adapter sits between two applications of the LayerNorm (original_ln_before); "
                        "runs the fused adapter op through its hook")
    raise Unchanged(f"unknown mode {slot.mode!r}")


def check_replaced(plan: Plan, module_uses: Dict[int, int], param_uses: Dict[int, int], taken: Dict[int, str]) -> None:
    """Unchanged unless every module the plan replaces can go: used once in the model and not
    replaced by another plan, no hooks or patches on it or below it, its parameters not tied
    elsewhere, and every adapter slot below it one the replacement carries over (under the same
    name) and, but for the plan's own place, applying nothing (other adapters' places)."""
    for parent, attr, name, carried in plan.replaced:
        original = parent._modules[attr]
        if id(original) in taken:
            raise Unchanged(f"{name} is also replaced for the place {taken[id(original)]}")
        for sub_name, sub in original.named_modules(remove_duplicate=False):
            if _inside_slot(sub_name):
                continue
            if module_uses.get(id(sub), 0) > 1:
                raise Unchanged(f"{_join(name, sub_name)} is used more than once in the model (shared or tied)")
            hooks = _foreign_hooks(sub)
            if hooks:
                raise Unchanged(f"{_join(name, sub_name)} has {hooks}, which replacing it would drop")
            if sub.training:
                raise Unchanged(f"{_join(name, sub_name)} is in training mode (the merged modules compute eval-mode maths)")
        for p_name, p in original.named_parameters(remove_duplicate=False):
            if not _inside_slot(p_name) and param_uses.get(id(p), 0) > 1:
                raise Unchanged(f"{_join(name, p_name)} is tied to another parameter of the model")
        for sub_name, slot in _slots_below(original).items():
            qualified = _join(name, sub_name)
            if sub_name not in carried:
                raise Unchanged(f"{qualified} holds adapters ({list(slot)}) that the merged modules have no place for")
            active, dropped = slot.current()
            if qualified != plan.place and active is not None and not dropped:
                raise Unchanged(f"{qualified} applies adapter {active!r}, which the replacement would skip")


def _inside_slot(qualified: str) -> bool:
    """Whether the (relative) module or parameter name lies in an adapter slot."""
    return SLOT_ATTR in qualified.split(".")


def carry_slots(original: nn.Module, replacement: nn.Module) -> None:
    """Give ``replacement`` the adapter slots of ``original``'s subtree under the same relative names
    (so their qualified names in the model stay the same); RuntimeError if one has no module there."""
    below = dict(replacement.named_modules())
    for rel, slot in _slots_below(original).items():
        target = below.get(rel)
        if target is None:
            raise RuntimeError(f"optimize_for_inference: the replacement of a {type(original).__name__} has no module {rel!r} for its adapters")
        if slot_of(target) is None:
            target.add_module(SLOT_ATTR, slot)
        elif slot_of(target) is not slot:
            raise RuntimeError(f"optimize_for_inference: {rel!r} of the replacement holds other adapters")
