"""The whole models the ``inference`` benchmark times, its four variants of each, and their FLOP counts.

Models (random weights from ``transformers`` configs, no downloads): a BERT-base-sized encoder
(``BertModel`` without pooler) and a Llama-style decoder (``LlamaForCausalLM``; the latency rows call
its ``.model``, the decoder stack without the LM head, so a 32 x 512 batch does not compute 16k x vocab
logits; generation runs the whole model). Variants of one model, all on the same backbone weights:

=======================  ===========================================================================
``no adapter``           the backbone alone
``eager adapter``        the same adapter places and hooks as adapterkern's, each place's adapter an
                         :class:`~adapterkern.bench.impls.EagerAdapter` (``nn.Linear`` -> act ->
                         ``nn.Linear``, ``* scaling``, ``+ residual``) with the adapterkern adapter's weights
``adapterkern adapter``  ``adapterkern.add_adapter`` (hook + fused op), adapter weights randomised
``optimised``            a copy of that model after ``adapterkern.optimize_for_inference``
=======================  ===========================================================================

FLOPs are counted from the shapes, matmuls only (2 FLOPs per multiply-add; element-wise work, norms and
softmax left out): each ``nn.Linear`` of the model 2·in·out per token, attention 4·S²·d per sequence and
layer (QKᵀ and AV; causal: 2·S·(S+1)·d, the half the mask keeps), one adapter place 4·d·r per token.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from .impls import EagerAdapter

ADAPTER_NAME = "bench"
PLACEMENTS = ("parallel", "pfeiffer")
VARIANTS = ("no adapter", "eager adapter", "adapterkern adapter", "optimised")
# max_rel_diff of the optimised model's output against the adapterkern model's, at most this (per dtype)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# The FFN's linear layers, by qualified name: BERT's intermediate.dense / output.dense (not
# attention.output.dense), Llama's mlp.{gate,up,down}_proj.
_FFN_LINEAR = re.compile(r"(\.\d+\.(intermediate|output)\.dense|\.mlp\.\w+_proj)$")


@dataclass(frozen=True)
class ModelSpec:
    """A whole model's shape: ``layers`` encoder/decoder layers of width ``hidden`` (d), FFN width
    ``intermediate``, ``heads`` query heads and ``kv_heads`` key/value heads, ``vocab`` token ids."""

    name: str
    family: str  # bert or llama
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    def describe(self) -> str:
        return (f"{self.name}: {self.layers} layers, d={self.hidden}, ffn={self.intermediate}, "
                f"heads={self.heads}/{self.kv_heads}, vocab={self.vocab}")


BERT_BASE = ModelSpec("bert-base", "bert", 12, 768, 3072, 12, 12, 30522)
LLAMA_SMALL = ModelSpec("llama-d1024", "llama", 8, 1024, 2816, 16, 16, 32000)  # the CPU stand-in
LLAMA_7B_LAYERS = ModelSpec("llama-7b-layers", "llama", 8, 4096, 11008, 32, 32, 32000)  # 7B's layer dims
BERT_TINY = ModelSpec("bert-tiny", "bert", 1, 64, 256, 4, 4, 128)  # the test suite's
LLAMA_TINY = ModelSpec("llama-tiny", "llama", 1, 64, 176, 4, 2, 128)


def parse_placements(text: str) -> List[str]:
    """``--placements``: comma-separated names of :data:`PLACEMENTS`."""
    placements = [p.strip() for p in text.split(",") if p.strip()]
    for placement in placements:
        if placement not in PLACEMENTS:
            raise SystemExit(f"--placements: unknown placement {placement!r}; expected {' or '.join(PLACEMENTS)}")
    return placements


def pick_specs(names: str, *, full: bool, gpu: bool, tiny: bool, bert_layers: Optional[int],
               llama_layers: Optional[int]) -> List[ModelSpec]:
    """The models ``--models`` names (``bert``, ``llama``), sized for the run: BERT-base with 4 layers
    (12 with ``full``), Llama d=1024 with 8 layers (Llama-7B layer dims with ``full`` on a GPU), or the
    tiny ones; ``*_layers`` override the layer counts."""
    specs = []
    for name in (n.strip() for n in names.split(",") if n.strip()):
        if name == "bert":
            spec = BERT_TINY if tiny else (BERT_BASE if full else replace(BERT_BASE, layers=4))
            specs.append(replace(spec, layers=bert_layers or spec.layers))
        elif name == "llama":
            spec = LLAMA_TINY if tiny else (LLAMA_7B_LAYERS if full and gpu else LLAMA_SMALL)
            specs.append(replace(spec, layers=llama_layers or spec.layers))
        else:
            raise SystemExit(f"--models: unknown model {name!r}; expected bert or llama")
    return specs


def build_backbone(spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model without adapters, random weights, in eval mode (initialised on ``device``)."""
    if spec.family == "bert":
        from transformers import BertConfig, BertModel

        config = BertConfig(num_hidden_layers=spec.layers, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                            num_attention_heads=spec.heads, vocab_size=spec.vocab, attn_implementation="sdpa")
        with torch.device(device):
            model = BertModel(config, add_pooling_layer=False)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(num_hidden_layers=spec.layers, hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                             num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads, vocab_size=spec.vocab,
                             pad_token_id=0, attn_implementation="sdpa")
        with torch.device(device):
            model = LlamaForCausalLM(config)
    return model.to(device=device, dtype=dtype).eval()


def hidden_states(spec: ModelSpec) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``forward(model, input_ids) -> (B, S, d)``: the encoder's / decoder stack's last hidden states
    (the Llama model's LM head is not run; no KV cache is kept)."""
    if spec.family == "bert":
        return lambda model, ids: model(input_ids=ids).last_hidden_state
    return lambda model, ids: model.model(input_ids=ids, use_cache=False).last_hidden_state


@torch.no_grad()
def randomise_adapters(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Every adapter projection's weight and bias drawn from N(0, std²) (``mam_adapter`` init, the parallel
    preset's, makes a fresh adapter the exact identity; a benchmark of the identity would prove nothing)."""
    from adapterkern.nn.bottleneck import BottleneckAdapter

    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, BottleneckAdapter):
            for lin in (module.adapter_down, module.adapter_up):
                for p in (lin.weight, lin.bias):
                    if p is not None:
                        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std))


def with_adapterkern(base: nn.Module, placement: str, reduction_factor: float, activation: str,
                     backend: str) -> nn.Module:
    """A copy of ``base`` with one adapterkern adapter (``AdapterConfig.parallel`` or ``.pfeiffer``,
    r = d / ``reduction_factor``) added, active and randomised."""
    import adapterkern

    presets = {"parallel": adapterkern.AdapterConfig.parallel, "pfeiffer": adapterkern.AdapterConfig.pfeiffer}
    if placement not in presets:
        raise SystemExit(f"--placements: unknown placement {placement!r}; expected {' or '.join(PLACEMENTS)}")
    model = copy.deepcopy(base)
    config = presets[placement](reduction_factor=reduction_factor, activation=activation, backend=backend)
    adapterkern.add_adapter(model, ADAPTER_NAME, config)
    randomise_adapters(model)
    return model


@torch.no_grad()
def eager_twin(adapterkern_model: nn.Module) -> nn.Module:
    """A copy of an adapterkern model whose adapters are :class:`EagerAdapter` modules with the same
    weights, at the same places, applied by the same hooks (only the adapter's arithmetic differs)."""
    from adapterkern.integrations.slots import iter_slots
    from adapterkern.nn.bottleneck import BottleneckAdapter

    model = copy.deepcopy(adapterkern_model)
    swapped = 0
    for _, _, slot in iter_slots(model):
        for name, adapter in list(slot.items()):
            if not isinstance(adapter, BottleneckAdapter):
                continue
            w = adapter.adapter_up.weight
            eager = EagerAdapter(adapter.hidden_size, adapter.bottleneck_size, adapter.activation).to(w.device, w.dtype)
            for mine, theirs in ((eager.down, adapter.adapter_down), (eager.up, adapter.adapter_up)):
                mine.weight.copy_(theirs.weight)
                if theirs.bias is None:
                    mine.bias = None
                else:
                    mine.bias.copy_(theirs.bias)
            scaling = adapter.scaling
            eager.scaling = scaling.detach().clone() if isinstance(scaling, torch.Tensor) else scaling
            slot[name] = eager
            swapped += 1
    if not swapped:
        raise ValueError("eager_twin: the model has no adapterkern adapter to replace")
    return model


def optimised_copy(adapterkern_model: nn.Module) -> Tuple[nn.Module, object]:
    """A copy of an adapterkern model after ``adapterkern.optimize_for_inference``, and its report.
    AttributeError when this adapterkern has no ``optimize_for_inference``."""
    import adapterkern

    optimize = getattr(adapterkern, "optimize_for_inference")
    model = copy.deepcopy(adapterkern_model)
    report = optimize(model)
    return model, report


# ------------------------------------------------------------------------------------------ FLOPs

def _linear_flops_per_token(module: nn.Module, pattern: Optional[re.Pattern] = None) -> int:
    """2·in·out summed over ``module``'s ``nn.Linear`` layers (those whose name matches ``pattern``)."""
    total = 0
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and (pattern is None or pattern.search("." + name)):
            total += 2 * sub.in_features * sub.out_features
    return total


def adapter_places(model: nn.Module) -> List[Tuple[int, int]]:
    """(d, r) of every adapter place of an adapterkern model."""
    from adapterkern.integrations.slots import iter_slots

    return [(a.adapter_down.in_features, a.adapter_down.out_features)
            for _, _, slot in iter_slots(model) for a in slot.values() if hasattr(a, "adapter_down")]


@dataclass(frozen=True)
class FlopModel:
    """Matmul FLOPs per token of one model's parts, from its shapes (see the module docstring)."""

    stack_per_token: int  # every nn.Linear of the encoder / decoder stack (no LM head)
    head_per_token: int  # the LM head (0 for BERT)
    ffn_per_token_per_layer: int  # one layer's FFN linear layers
    adapter_per_token: int  # every adapter place together: Σ 4·d·r
    adapter_per_token_per_place: int  # one place (the first): 4·d·r
    hidden: int
    layers: int
    causal: bool

    def attention(self, batch: int, seq: int) -> int:
        """QKᵀ and AV of ``batch`` sequences of ``seq`` tokens, all layers (causal: the kept half)."""
        per_layer = 2 * seq * (seq + 1) * self.hidden if self.causal else 4 * seq * seq * self.hidden
        return batch * self.layers * per_layer

    def forward(self, batch: int, seq: int) -> int:
        """The no-adapter stack on ``batch`` x ``seq`` tokens (no KV cache, no LM head)."""
        return batch * seq * self.stack_per_token + self.attention(batch, seq)

    def forward_ratio_pct(self, batch: int, seq: int) -> float:
        """The adapters' FLOPs in percent of the no-adapter forward's."""
        return 100.0 * batch * seq * self.adapter_per_token / self.forward(batch, seq)

    def ffn_ratio_pct(self) -> float:
        """One adapter place's FLOPs in percent of one layer's FFN (a parallel adapter beside a 4d FFN: r/(4d))."""
        return 100.0 * self.adapter_per_token_per_place / self.ffn_per_token_per_layer

    def generation(self, batch: int, prompt: int, new: int) -> int:
        """Greedy generation with a KV cache: the prompt and the first ``new - 1`` new tokens through the
        stack once each (causal attention over their context), the LM head once per new token."""
        tokens = prompt + new - 1
        return batch * (tokens * self.stack_per_token + new * self.head_per_token) + self.attention(batch, tokens)

    def generation_ratio_pct(self, batch: int, prompt: int, new: int) -> float:
        """The adapters' FLOPs in percent of the no-adapter generation's."""
        adapter = batch * (prompt + new - 1) * self.adapter_per_token
        return 100.0 * adapter / self.generation(batch, prompt, new)


def flop_model(spec: ModelSpec, backbone: nn.Module, adapterkern_model: nn.Module) -> FlopModel:
    """The :class:`FlopModel` of ``backbone`` (no adapters) and the adapters of ``adapterkern_model``."""
    stack = backbone if spec.family == "bert" else backbone.model
    head = 0 if spec.family == "bert" else _linear_flops_per_token(backbone.lm_head)
    places = adapter_places(adapterkern_model)
    if not places:
        raise ValueError("flop_model: the adapterkern model has no adapter places")
    return FlopModel(
        stack_per_token=_linear_flops_per_token(stack), head_per_token=head,
        ffn_per_token_per_layer=_linear_flops_per_token(stack, _FFN_LINEAR) // spec.layers,
        adapter_per_token=sum(4 * d * r for d, r in places), adapter_per_token_per_place=4 * places[0][0] * places[0][1],
        hidden=spec.hidden, layers=spec.layers, causal=spec.family == "llama",
    )


def relative_difference(out: torch.Tensor, reference: torch.Tensor) -> float:
    """max|out - reference| / max|reference| (in float32)."""
    out, reference = out.float(), reference.float()
    return ((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item()


def same_tokens_pct(tokens: torch.Tensor, reference: torch.Tensor, prompt: int) -> float:
    """Percent of the generated token ids (after the ``prompt``) equal to ``reference``'s."""
    a, b = tokens[:, prompt:], reference[:, prompt:]
    if a.shape != b.shape:
        return 0.0
    return 100.0 * (a == b).float().mean().item()


def variants_of(base: nn.Module, placement: str, reduction_factor: float, activation: str, backend: str,
                ) -> Tuple[Dict[str, nn.Module], Optional[object], Optional[str]]:
    """The four variants of one model (:data:`VARIANTS`, ``optimised`` only when it can be built), the
    optimiser's report, and why ``optimised`` is missing (None when it is there)."""
    fused = with_adapterkern(base, placement, reduction_factor, activation, backend)
    variants = {"no adapter": base, "eager adapter": eager_twin(fused), "adapterkern adapter": fused}
    import adapterkern

    if not hasattr(adapterkern, "optimize_for_inference"):
        return variants, None, ("adapterkern.optimize_for_inference is not in this checkout yet; "
                                "the optimised rows wait for a run that has it")
    try:
        variants["optimised"], report = optimised_copy(fused)
    except Exception as exc:  # noqa: BLE001 - reported, the other variants still run
        return variants, None, f"optimize_for_inference failed ({type(exc).__name__}: {exc})"
    return variants, report, None
