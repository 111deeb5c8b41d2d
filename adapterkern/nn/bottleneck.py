"""``BottleneckAdapter``: the nn.Module over :func:`adapterkern.bottleneck_adapter`."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..activations import get_activation
from ..backends import check_backend_name
from ..functional import bottleneck_adapter

_FSDPModule = None  # FSDP2's module class (torch.distributed.fsdp, torch >= 2.6), where torch has it
if torch.distributed.is_available():
    from torch.distributed.fsdp import FSDPModule as _FSDPModule

INIT_SCHEMES = ("bert", "houlsby", "mam_adapter")


def _init_(down: nn.Linear, up: nn.Linear, scheme: str) -> None:
    """The AdapterHub ``adapters`` library's init schemes for the down/up projections."""
    with torch.no_grad():
        if scheme == "bert":
            for layer in (down, up):
                layer.weight.normal_(mean=0.0, std=0.02)
        elif scheme == "houlsby":
            for layer in (down, up):
                nn.init.trunc_normal_(layer.weight, mean=0.0, std=1e-2, a=-2e-2, b=2e-2)
        elif scheme == "mam_adapter":
            nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
            nn.init.zeros_(up.weight)  # a fresh adapter is exactly the identity
        else:
            raise ValueError(f"init: unknown scheme {scheme!r}; expected one of {', '.join(INIT_SCHEMES)}")
        for layer in (down, up):
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


class BottleneckAdapter(nn.Module):
    """``y = residual + scaling * up(act(down(x)))`` through the fused op.

    Args:
        hidden_size: d, the model's hidden size.
        bottleneck_size: r, the adapter's bottleneck size.
        activation: an ``adapters``-library activation name (see :data:`adapterkern.ACTIVATION_NAMES`).
        scaling: a float, ``"learned"`` (a trainable scalar, init 1) or ``"channel"`` (a trainable (d,)
            vector, init 1), as in the ``adapters`` library.
        bias: whether both projections have biases.
        init: ``"bert"`` (normal, std 0.02), ``"houlsby"`` (truncated normal, std 0.01) or
            ``"mam_adapter"`` (Kaiming-uniform down, zero up: the exact identity).
        backend: ``auto``, ``torch``, ``triton`` or ``cuda``.

    Submodules ``adapter_down`` (``nn.Linear(d, r)``) and ``adapter_up`` (``nn.Linear(r, d)``) hold the weights.
    ``forward(x, residual=None)``: x (..., d); residual None (sequential adapter) or x's shape (parallel).
    """

    def __init__(
        self,
        hidden_size: int,
        bottleneck_size: int,
        activation: str = "relu",
        scaling: Union[float, str] = 1.0,
        bias: bool = True,
        init: str = "bert",
        backend: str = "auto",
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("bottleneck_size", bottleneck_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size
        self.bottleneck_size = bottleneck_size
        self.activation = get_activation(activation).name
        self.backend = check_backend_name(backend, "backend")
        self.adapter_down = nn.Linear(hidden_size, bottleneck_size, bias=bias, **factory)
        self.adapter_up = nn.Linear(bottleneck_size, hidden_size, bias=bias, **factory)
        self._set_scaling(scaling, factory)
        _init_(self.adapter_down, self.adapter_up, init)

    def _set_scaling(self, scaling, factory) -> None:
        if isinstance(scaling, str):
            if scaling == "learned":
                self.scaling = nn.Parameter(torch.ones(1, **factory))
            elif scaling == "channel":
                self.scaling = nn.Parameter(torch.ones(self.hidden_size, **factory))
            else:
                raise ValueError(f"scaling: expected a float, 'learned' or 'channel', got {scaling!r}")
        elif isinstance(scaling, (int, float)) and not isinstance(scaling, bool):
            if not math.isfinite(scaling):
                raise ValueError(f"scaling: expected a finite float, got {scaling!r}")
            self.scaling = float(scaling)
        else:
            raise TypeError(f"scaling: expected a float, 'learned' or 'channel', got {type(scaling).__name__}")

    @classmethod
    def from_linear(
        cls,
        down: nn.Linear,
        up: nn.Linear,
        activation: str = "relu",
        scaling: Union[float, str, Tensor] = 1.0,
        backend: str = "auto",
    ) -> "BottleneckAdapter":
        """Wrap an existing ``Linear(d, r) -> act -> Linear(r, d)`` pair, sharing its parameters.

        ``scaling`` may also be an existing ``nn.Parameter`` (shared, not copied).
        """
        if not isinstance(down, nn.Linear) or not isinstance(up, nn.Linear):
            raise TypeError(f"down, up: expected nn.Linear modules, got {type(down).__name__}, {type(up).__name__}")
        if up.in_features != down.out_features or up.out_features != down.in_features:
            raise ValueError(
                f"down, up: expected Linear(d, r) and Linear(r, d), got Linear({down.in_features}, "
                f"{down.out_features}) and Linear({up.in_features}, {up.out_features})"
            )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.hidden_size, self.bottleneck_size = down.in_features, down.out_features
        self.activation = get_activation(activation).name
        self.backend = check_backend_name(backend, "backend")
        self.adapter_down, self.adapter_up = down, up
        if isinstance(scaling, Tensor):
            self.scaling = scaling
        else:
            self._set_scaling(scaling, {"device": up.weight.device, "dtype": up.weight.dtype})
        return self

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        for linear in (self.adapter_down, self.adapter_up):
            # FSDP2: a projection made an FSDP unit of its own (fully_shard on it, as a wrap policy over
            # leaf modules with trainable weights does) holds sharded DTensors until its forward runs,
            # and the fused op reads its weight without calling it: unshard it as its pre-forward would.
            # FSDP's post-backward callback then reduce-scatters its gradients and reshards it.
            if _FSDPModule is not None and isinstance(linear, _FSDPModule):
                linear.unshard()
        return bottleneck_adapter(
            x,
            self.adapter_down.weight,
            self.adapter_down.bias,
            self.adapter_up.weight,
            self.adapter_up.bias,
            activation=self.activation,
            scaling=self.scaling,
            residual=residual,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        scaling = self.scaling if isinstance(self.scaling, float) else f"tensor{tuple(self.scaling.shape)}"
        return (
            f"hidden_size={self.hidden_size}, bottleneck_size={self.bottleneck_size}, "
            f"activation={self.activation!r}, scaling={scaling}, backend={self.backend!r}"
        )


def layout(adapter: "BottleneckAdapter") -> tuple:
    """What adapters must share to run as one stack: (r, activation, no down bias, no up bias)."""
    return (adapter.bottleneck_size, adapter.activation, adapter.adapter_down.bias is None, adapter.adapter_up.bias is None)


def stack_adapters(adapters: Sequence["BottleneckAdapter"]):
    """The adapters as one stack for :func:`adapterkern.multi_adapter` / ``bottleneck_adapter_batched``:
    :func:`stack_weights` of their projections and scalings. They must share :func:`layout` (the
    caller checks)."""
    return stack_weights(
        [a.adapter_down for a in adapters], [a.adapter_up for a in adapters], [a.scaling for a in adapters]
    )


def stack_weights(downs: Sequence[nn.Linear], ups: Sequence[nn.Linear], scalings: Sequence[Union[float, Tensor]]):
    """N adapters' projections as one stack, the one stacking rule of every fused many-adapter path.

    Args:
        downs: N ``nn.Linear(d, r)`` (weight (r, d)), all with or all without a bias.
        ups: N ``nn.Linear(r, d)`` (weight (d, r)), all with or all without a bias.
        scalings: N Python floats or float tensors of shape (), (1,) or (d,).

    Returns:
        (w_down (N, r, d), b_down (N, r) or None, w_up (N, d, r), b_up (N, d) or None, scaling), stacked
        from the modules' own parameters on every call (differentiable). ``scaling`` is a Python float
        when all are the same float; else a tensor of shape (N,) when every scaling is a scalar, or
        (N, d) when one is per channel. Its dtype is float32 promoted with the tensor scalings' dtypes
        (float32 unless one is float64): the kernels multiply the scaling in their float32 accumulator,
        so a Python float reaches them unrounded whatever the weights' dtype (the torch backend computes
        in x's dtype throughout, the scaling too).
    """
    def stack(tensors):
        return torch.stack(list(tensors))

    w_up = stack(m.weight for m in ups)
    return (
        stack(m.weight for m in downs),
        None if downs[0].bias is None else stack(m.bias for m in downs),
        w_up,
        None if ups[0].bias is None else stack(m.bias for m in ups),
        _stack_scalings(list(scalings), w_up.shape[1], w_up.device),
    )


def _stack_scalings(scalings: list, d: int, device: torch.device):
    if all(not isinstance(s, Tensor) for s in scalings):
        if all(s == scalings[0] for s in scalings):
            return float(scalings[0])
        return torch.tensor([float(s) for s in scalings], dtype=torch.float32, device=device)
    dtype = torch.float32
    for s in scalings:
        if isinstance(s, Tensor):
            dtype = torch.promote_types(dtype, s.dtype)
    flat = [s.reshape(-1).to(dtype) if isinstance(s, Tensor) else torch.full((1,), float(s), dtype=dtype, device=device) for s in scalings]
    if all(f.numel() == 1 for f in flat):
        return torch.cat(flat)
    return torch.stack([f.expand(d) for f in flat])
