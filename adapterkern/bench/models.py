"""A BERT model with random weights (from ``transformers`` configs, no downloads), and
the adapter / LoRA insertion of the ``tradeoffs`` benchmark.

Adapter placement (Pfeiffer et al., 2021): one bottleneck adapter per layer, on the output of the
feed-forward sublayer, before that sublayer's residual add: ``h = ffn(x); h = h + adapter(h)``. In
BERT that wraps ``layer.output.dense`` (then dropout, ``LayerNorm(h + input)`` as before); in Llama
it wraps ``layer.mlp`` (then the decoder's residual add). The AdapterHub library's Pfeiffer config
adds a LayerNorm around the adapter input; that is not part of the adapter op and is left out, for
the eager and the fused adapter alike.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

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


def bert_model(layers: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A BERT-base-sized encoder (``layers`` layers, random weights, no pooler)."""
    from transformers import BertConfig, BertModel

    config = BertConfig(num_hidden_layers=layers, attn_implementation="sdpa")
    with torch.device(device):
        model = BertModel(config, add_pooling_layer=False)
    return model.to(dtype=dtype)
