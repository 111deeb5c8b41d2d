"""The modules :func:`~adapterkern.optimize_for_inference` puts into a model in place of the ones it
replaces (:mod:`adapterkern.integrations.inference` decides where, builds and records them).

* :class:`MergedLinear`: a linear layer holding a widened weight (the FFN's projection with a
  parallel adapter's projection stacked onto it), in ``nn.Linear`` layout (out, in) or transformers'
  ``Conv1D`` layout (in, out).
* :class:`MergedIntermediate` / :class:`MergedPostLNOutput` (BERT / RoBERTa), :class:`MergedMLP`
  (GPT-2), :class:`MergedGatedMLP` (Llama-style SwiGLU): an FFN with a parallel adapter merged into
  its own matmuls, ``y = FFN(x) + s * W_up act(W_down x + b_down) + s * b_up`` in the FFN's two
  matmuls, each r rows / columns wider.
* :class:`FusedAddNormOutput` (BERT / RoBERTa ``*SelfOutput`` / ``*Output``): the dense layer, then
  its sequential adapter, the residual add and the LayerNorm in one
  :func:`adapterkern.adapter_add_norm` call.

They compute eval-mode maths only (no dropout): each refuses to run in training mode. The merged
weights do not require grad (gradients through them would not reach the model's own parameters);
inputs that require grad are still differentiated through (out-of-place ops then).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import functional

TRAINING_MESSAGE = "optimised for inference: call adapterkern.undo_inference_optimization(model) first"


def refuse_training(module: nn.Module) -> None:
    if module.training:
        raise RuntimeError(f"{type(module).__name__} is in training mode, but the model is {TRAINING_MESSAGE}")


def _grad_needed(t: Tensor) -> bool:
    return torch.is_grad_enabled() and t.requires_grad


def split_activation(h: Tensor, n: int, ffn_act: Callable, adapter_act: Callable) -> Tensor:
    """``ffn_act`` on ``h[..., :n]`` (the FFN's columns), ``adapter_act`` on ``h[..., n:]`` (the
    adapter's r columns), as one (..., n + r) tensor. Without autograd: ``ffn_act`` on all of h (its
    r extra columns are overwritten), so the FFN's part is not copied."""
    adapter_part = adapter_act(h[..., n:])  # first: an in-place FFN activation must not change its input
    if _grad_needed(h):
        return torch.cat([ffn_act(h[..., :n]), adapter_part], dim=-1)
    out = ffn_act(h)
    out[..., n:] = adapter_part
    return out


class MergedLinear(nn.Module):
    """A linear layer with a widened weight. ``layout="linear"``: weight (out, in), ``F.linear`` (as
    ``nn.Linear``); ``layout="conv1d"``: weight (in, out), ``addmm`` (as transformers' ``Conv1D``)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor], layout: str):
        super().__init__()
        self.training = False  # (not .eval(): that would reach the original modules it reuses)
        if layout not in ("linear", "conv1d"):
            raise ValueError(f"layout: expected 'linear' or 'conv1d', got {layout!r}")
        self.layout = layout
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.out_features, self.in_features = weight.shape if layout == "linear" else weight.shape[::-1]

    def forward(self, x: Tensor) -> Tensor:
        if self.layout == "linear":
            return F.linear(x, self.weight, self.bias)
        x2d = x.reshape(-1, x.shape[-1])
        y = x2d @ self.weight if self.bias is None else torch.addmm(self.bias, x2d, self.weight)
        return y.view(x.shape[:-1] + (self.out_features,))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, layout={self.layout!r}"


class _MergedFFN(nn.Module):
    """Shared by the merged FFNs: the adapter's activation and the FFN's widths."""

    def _set_adapter(self, adapter_activation: str, adapter_act: Callable, ffn_size: int, bottleneck_size: int) -> None:
        self.adapter_activation = adapter_activation  # its name (adapterkern.activations)
        self.adapter_act = adapter_act
        self.ffn_size = ffn_size
        self.bottleneck_size = bottleneck_size

    def extra_repr(self) -> str:
        return f"ffn_size={self.ffn_size}, bottleneck_size={self.bottleneck_size}, adapter_activation={self.adapter_activation!r}"


class MergedIntermediate(_MergedFFN):
    """BERT's ``BertIntermediate`` with a parallel adapter's down-projection: ``dense`` (d -> n + r),
    then the FFN's activation on the first n columns and the adapter's on the last r."""

    def __init__(self, dense: MergedLinear, intermediate_act_fn, adapter_activation: str, adapter_act: Callable, ffn_size: int):
        super().__init__()
        self.training = False  # (not .eval(): that would reach the original modules it reuses)
        self.dense = dense
        self.intermediate_act_fn = intermediate_act_fn  # the original's (a module or a function)
        self._set_adapter(adapter_activation, adapter_act, ffn_size, dense.out_features - ffn_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        refuse_training(self)
        return split_activation(self.dense(hidden_states), self.ffn_size, self.intermediate_act_fn, self.adapter_act)


class MergedPostLNOutput(nn.Module):
    """BERT's ``BertOutput`` whose ``dense`` also takes the adapter's r activations (n + r -> d, the
    scaled up-projection and its bias folded in): ``LayerNorm(dropout(dense(h)) + input_tensor)``."""

    def __init__(self, dense: MergedLinear, layer_norm: nn.Module, dropout: nn.Module):
        super().__init__()
        self.training = False  # (not .eval(): that would reach the original modules it reuses)
        self.dense = dense
        self.LayerNorm = layer_norm
        self.dropout = dropout

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        refuse_training(self)
        return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)


class MergedMLP(_MergedFFN):
    """GPT-2's ``GPT2MLP`` with a parallel adapter merged: ``c_fc`` (d -> n + r), the FFN's and the
    adapter's activations, ``c_proj`` (n + r -> d), dropout."""

    def __init__(self, c_fc: MergedLinear, act, c_proj: MergedLinear, dropout: nn.Module, adapter_activation: str,
                 adapter_act: Callable, ffn_size: int):
        super().__init__()
        self.training = False  # (not .eval(): that would reach the original modules it reuses)
        self.c_fc = c_fc
        self.c_proj = c_proj
        self.act = act
        self.dropout = dropout
        self._set_adapter(adapter_activation, adapter_act, ffn_size, c_fc.out_features - ffn_size)

    def forward(self, hidden_states: Tensor) -> Tensor:
        refuse_training(self)
        h = split_activation(self.c_fc(hidden_states), self.ffn_size, self.act, self.adapter_act)
        return self.dropout(self.c_proj(h))


class MergedGatedMLP(_MergedFFN):
    """A Llama-style SwiGLU MLP with a parallel adapter merged: ``gate_up_proj`` is gate_proj, up_proj
    and the adapter's down-projection in one matmul (d -> 2n + r); ``down_proj`` (n + r -> d) takes
    ``act_fn(gate) * up`` and the adapter's activations."""

    def __init__(self, gate_up_proj: MergedLinear, down_proj: MergedLinear, act_fn, adapter_activation: str,
                 adapter_act: Callable, ffn_size: int):
        super().__init__()
        self.training = False  # (not .eval(): that would reach the original modules it reuses)
        self.gate_up_proj = gate_up_proj
        self.down_proj = down_proj
        self.act_fn = act_fn
        self._set_adapter(adapter_activation, adapter_act, ffn_size, gate_up_proj.out_features - 2 * ffn_size)

    def forward(self, x: Tensor) -> Tensor:
        refuse_training(self)
        n = self.ffn_size
        h = self.gate_up_proj(x)
        gate, up, adapter = h[..., :n], h[..., n:2 * n], h[..., 2 * n:]
        if _grad_needed(h):
            z = torch.cat([self.act_fn(gate) * up, self.adapter_act(adapter)], dim=-1)
        else:
            # in place, in h's own columns n .. 2n + r: down_proj reads them as a row-strided matrix
            up.mul_(self.act_fn(gate))
            adapter.copy_(self.adapter_act(adapter))
            z = h[..., n:]
        return self.down_proj(z)


class FusedAddNormOutput(nn.Module):
    """BERT's ``BertSelfOutput`` / ``BertOutput`` with a sequential adapter on its ``dense``:
    ``z = dense(h)`` (dropout is the identity in eval mode), then
    ``LayerNorm(z + s * (up(act(down(z))) + b_up) + input_tensor)`` in one
    :func:`adapterkern.adapter_add_norm` call with the adapter's own weights.

    ``dense`` is the original layer, which keeps its adapter slot (the adapter lives there); it is
    computed with ``F.linear`` on its weights, not called, so that its slot's hook does not apply the
    adapter a second time."""

    def __init__(self, dense: nn.Linear, layer_norm: nn.LayerNorm, dropout: nn.Module, adapter_name: str, backend: str,
                 order=("dense", "LayerNorm", "dropout")):
        super().__init__()
        self.training = False  # (not .eval(): that would reach the original modules it reuses)
        modules = {"dense": dense, "LayerNorm": layer_norm, "dropout": dropout}
        for name in order:  # the original's child order: the same state-dict key order
            setattr(self, name, modules[name])
        self.adapter_name = adapter_name
        self.backend = backend

    def forward(self, hidden_states: Tensor, input_tensor: Tensor) -> Tensor:
        refuse_training(self)
        dense, norm = self.dense, self.LayerNorm
        z = F.linear(hidden_states, dense.weight, dense.bias)
        adapter = dense.bottleneck_adapters[self.adapter_name]
        tensors = (adapter.adapter_down.weight, adapter.adapter_down.bias, adapter.adapter_up.weight, adapter.adapter_up.bias,
                   norm.weight, norm.bias)
        if torch.is_autocast_enabled(z.device.type):
            # The original adds the adapter's output (autocast's dtype) to input_tensor, then normalises
            # the sum in the promoted dtype (float32 when input_tensor is): the same here, autocast off.
            dtype = torch.promote_types(z.dtype, input_tensor.dtype)
            with torch.autocast(z.device.type, enabled=False):
                return self._add_norm(adapter, z.to(dtype), input_tensor.to(dtype), [None if t is None else t.to(dtype) for t in tensors])
        return self._add_norm(adapter, z, input_tensor, tensors)

    def _add_norm(self, adapter, z: Tensor, residual: Tensor, tensors) -> Tensor:
        w_down, b_down, w_up, b_up, norm_weight, norm_bias = tensors
        return functional.adapter_add_norm(
            z, residual, w_down, b_down, w_up, b_up, norm_weight, norm_bias, activation=adapter.activation,
            scaling=adapter.scaling, eps=self.LayerNorm.eps, norm="layernorm", backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"adapter={self.adapter_name!r}, backend={self.backend!r}"
