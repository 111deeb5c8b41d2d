"""Transformer layers and models with random weights (from ``transformers`` configs, no downloads), and
the adapter / LoRA insertion the ``layer`` and ``tradeoffs`` benchmarks share.

Adapter placement (Pfeiffer et al., 2021): one bottleneck adapter per layer, on the output of the
feed-forward sublayer, before that sublayer's residual add: ``h = ffn(x); h = h + adapter(h)``. In
BERT that wraps ``layer.output.dense`` (then dropout, ``LayerNorm(h + input)`` as before); in Llama
it wraps ``layer.mlp`` (then the decoder's residual add). The AdapterHub library's Pfeiffer config
adds a LayerNorm around the adapter input; that is not part of the adapter op and is left out, for
the eager and the fused adapter alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from .impls import EagerAdapter, FusedAdapter

TRANSFORMERS_HINT = "`pip install transformers` (the bench extra) to run it"


def transformers_reason() -> Optional[str]:
    """None when transformers (with BERT and Llama) is importable, else why not."""
    try:
        import transformers  # noqa: F401
        from transformers import BertConfig, LlamaConfig  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return f"transformers is not importable ({type(exc).__name__}: {exc}); {TRANSFORMERS_HINT}"
    return None


class AdapterAfter(nn.Module):
    """``adapter(sublayer(x))``: a sequential adapter on a sublayer's output (residual = that output)."""

    def __init__(self, sublayer: nn.Module, adapter: nn.Module):
        super().__init__()
        self.sublayer = sublayer
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.sublayer(x))


def make_adapter(kind: str, hidden: int, bottleneck: int, activation: str, backend: str) -> nn.Module:
    """``eager`` (nn.Linear -> act -> nn.Linear, * scaling, + residual) or ``fused`` (adapterkern op)."""
    eager = EagerAdapter(hidden, bottleneck, activation)
    with torch.no_grad():  # BERT-style init, like the adapters library's default "bert"
        for lin in (eager.down, eager.up):
            lin.weight.normal_(0.0, 0.02)
            lin.bias.zero_()
    if kind == "eager":
        return eager
    if kind == "fused":
        return FusedAdapter(eager, backend)
    raise ValueError(f"adapter kind: expected 'eager' or 'fused', got {kind!r}")


def ffn_sites(model: nn.Module) -> List[Tuple[nn.Module, str]]:
    """(parent, attribute) of every feed-forward output to put an adapter after (BERT and Llama layers)."""
    sites = []
    for module in model.modules():
        name = type(module).__name__
        if name == "BertOutput":
            sites.append((module, "dense"))
        elif name == "LlamaDecoderLayer":
            sites.append((module, "mlp"))
    return sites


def add_adapters(model: nn.Module, kind: str, bottleneck: int, activation: str = "relu",
                 backend: str = "auto") -> List[nn.Module]:
    """Put one adapter after each feed-forward sublayer of ``model`` (in place); return the adapters."""
    adapters = []
    param = next(model.parameters())
    for parent, attr in ffn_sites(model):
        sub = getattr(parent, attr)
        hidden = sub.out_features if isinstance(sub, nn.Linear) else model_hidden(model)
        adapter = make_adapter(kind, hidden, bottleneck, activation, backend).to(param.device, param.dtype)
        setattr(parent, attr, AdapterAfter(sub, adapter))
        adapters.append(adapter)
    if not adapters:
        raise ValueError(f"add_adapters: found no BERT or Llama feed-forward sublayer in {type(model).__name__}")
    return adapters


def model_hidden(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "hidden_size", 0) or model.hidden_size)


class LoRALinear(nn.Module):
    """``base(x) + (x @ A.T) @ B.T * (alpha / rank)``, with ``merge()`` folding it into ``base``'s weight."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float = 1.0):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scale = alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, device=w.device, dtype=w.dtype) * 0.02)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank, device=w.device, dtype=w.dtype) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t()) @ self.lora_b.t() * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        self.base.weight += (self.lora_b.float() @ self.lora_a.float() * self.scale).to(self.base.weight.dtype)
        return self.base


def add_lora(model: nn.Module, rank: int, targets=("query", "value")) -> List[LoRALinear]:
    """LoRA on BERT's attention query and value projections (Hu et al.'s choice); returns the LoRA modules."""
    loras = []
    for module in list(model.modules()):
        if type(module).__name__ == "BertSelfAttention":
            for attr in targets:
                lora = LoRALinear(getattr(module, attr), rank)
                setattr(module, attr, lora)
                loras.append(lora)
    if not loras:
        raise ValueError(f"add_lora: found no BertSelfAttention in {type(model).__name__}")
    return loras


def merge_lora(model: nn.Module) -> None:
    """Fold every LoRALinear into its base weight and put the plain nn.Linear back (zero extra latency)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())


@dataclass
class LayerSpec:
    name: str  # bert-base, llama-7b, ...
    family: str  # bert or llama
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int

    def describe(self) -> str:
        return f"{self.name} (d={self.hidden}, ffn={self.intermediate}, heads={self.heads}/{self.kv_heads})"


BERT_BASE = LayerSpec("bert-base", "bert", 768, 3072, 12, 12)
LLAMA_7B = LayerSpec("llama-7b", "llama", 4096, 11008, 32, 32)
LLAMA_SMALL = LayerSpec("llama-d1024", "llama", 1024, 2816, 16, 16)  # CPU --quick stand-in


def build_layer(spec: LayerSpec, device: torch.device, dtype: torch.dtype
                ) -> Tuple[nn.Module, Callable[[nn.Module, torch.Tensor], torch.Tensor]]:
    """One encoder/decoder layer with random weights, and ``run(layer, x)`` that calls it on (B, S, d)."""
    if spec.family == "bert":
        from transformers import BertConfig
        from transformers.models.bert.modeling_bert import BertLayer

        config = BertConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                            num_attention_heads=spec.heads, attn_implementation="sdpa")
        with torch.device(device):  # initialise on the device: a 7B-sized layer is slow to init on a CPU
            layer = BertLayer(config)

        def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            out = module(x)
            return out[0] if isinstance(out, tuple) else out
    else:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        config = LlamaConfig(hidden_size=spec.hidden, intermediate_size=spec.intermediate,
                             num_attention_heads=spec.heads, num_key_value_heads=spec.kv_heads,
                             attn_implementation="sdpa")
        with torch.device(device):
            layer = LlamaDecoderLayer(config, layer_idx=0)
            rotary = LlamaRotaryEmbedding(config=config)
        cache: dict = {}

        def run(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
            key = (x.shape[1], x.dtype)
            if key not in cache:  # rotary tables once per shape, as a model computes them once per forward
                pos = torch.arange(x.shape[1], device=x.device)[None]
                cache[key] = tuple(t.detach() for t in rotary(x, pos))
            out = module(x, position_embeddings=cache[key])
            return out[0] if isinstance(out, tuple) else out

    layer = layer.to(device=device, dtype=dtype).eval()
    return layer, run


def bert_model(layers: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A BERT-base-sized encoder (``layers`` layers, random weights, no pooler)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=layers, attn_implementation="sdpa")
    with torch.device(device):
        model = BertModel(config, add_pooling_layer=False)
    return model.to(dtype=dtype)
