"""Functional ops: each checks its arguments once, picks the backend, and calls it."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from . import library  # noqa: F401  (registers the torch.library ops)
from .activations import get_activation
from .backends import ADD_NORM, BATCHED, MULTI, SINGLE, reference, resolve_backend
from .routing import TokenGroups, per_token_index, token_groups

# float64 is accepted too (for gradcheck and references); the kernels then accumulate in float64.
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _check_param(t: Optional[Tensor], name: str, shape: tuple, x: Tensor, optional: bool, x_name: str = "x") -> None:
    """A weight or bias: a tensor of exactly ``shape`` with x's dtype and device (or None if optional);
    ``x_name``: what the messages call x."""
    if isinstance(t, Tensor) and t.shape == shape and t.dtype == x.dtype and t.device == x.device:
        return  # the common case in one test: the ops run at decode sizes, where checks are the cost
    if t is None:
        if optional:
            return
        raise TypeError(f"{name}: expected a tensor of shape {shape}, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {shape}, got {type(t).__name__}")
    if t.dim() != len(shape):
        raise ValueError(f"{name}: expected a {len(shape)}-D tensor of shape {shape}, got {_describe(t)}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {shape} (from {x_name}'s last dim and w_down's rows), got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name}: expected dtype {x.dtype} ({x_name}'s dtype), got {t.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name}: expected device {x.device} ({x_name}'s device), got {t.device}")


def _check_scaling(scaling, d: int, x: Tensor) -> None:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float, Tensor)):
        raise TypeError(f"scaling: expected a float or a tensor of shape (1,) or ({d},), got {type(scaling).__name__}")
    if isinstance(scaling, Tensor):
        if scaling.shape not in ((), (1,), (d,)):
            raise ValueError(f"scaling: expected a tensor of shape (1,) or ({d},), got shape {tuple(scaling.shape)}")
        if not scaling.is_floating_point():
            raise TypeError(f"scaling: expected a floating-point tensor, got dtype {scaling.dtype}")
        if scaling.device != x.device:
            raise ValueError(f"scaling: expected device {x.device} (x's device), got {scaling.device}")


def _check_x(x, name: str = "x") -> int:
    """x (called ``name`` in messages): a floating tensor (..., d) of a supported dtype; returns d."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape (..., d), got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] < 1:
        raise ValueError(f"{name}: expected shape (..., d) with d >= 1, got {tuple(x.shape)}")
    return x.shape[-1]


def _check_residual(residual, x: Tensor, add_residual: bool = True) -> None:
    """residual: None or a tensor like x; ``add_residual`` (the many-adapter ops) a bool that, when
    False, leaves no residual to give."""
    if not isinstance(add_residual, bool):
        raise TypeError(f"add_residual: expected a bool, got {type(add_residual).__name__}")
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual: expected None or a tensor of x's shape {tuple(x.shape)}, got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise ValueError(f"residual: expected x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual: expected dtype {x.dtype} (x's dtype), got {residual.dtype}")
    if residual.device != x.device:
        raise ValueError(f"residual: expected device {x.device} (x's device), got {residual.device}")
    if not add_residual:
        raise ValueError("residual: given with add_residual=False, where it would be ignored")


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on x's device type, or None where autocast is off.

    Under autocast the ops behave as ``nn.Linear`` does there: x, the weights, the biases and the
    residual (floating, not float64) are cast to that dtype, and the result is in it, on every
    backend (the op then runs with autocast off). The scaling is not cast (the kernels read it in float32).
    """
    try:
        enabled = torch.is_autocast_enabled(x.device.type)
    except RuntimeError:  # a device type autocast does not know (e.g. meta)
        return None
    return torch.get_autocast_dtype(x.device.type) if enabled else None


def _autocast(tensors, dtype: torch.dtype):
    """Autocast's cast of matmul inputs: floating tensors other than float64 to ``dtype``; None stays."""
    return [t.to(dtype) if isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t for t in tensors]


def _needs_preact(*tensors) -> bool:
    """Whether the forward must save the pre-activation: autograd is on and some input requires grad."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _kernel_scaling(scaling):
    """(scale tensor or None, Python float) as the kernel ops take them."""
    if isinstance(scaling, Tensor):
        return scaling, 1.0
    return None, float(scaling)


def bottleneck_adapter(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    *,
    activation: Optional[str] = "relu",
    scaling: Union[float, Tensor] = 1.0,
    residual: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """A bottleneck adapter in one call::

        y = residual + scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up)

    Args:
        x: (..., d) float32, float16 or bfloat16; any leading shape and strides.
        w_down: (r, d) down-projection weight (``nn.Linear(d, r).weight``), x's dtype and device.
        b_down: (r,) or None.
        w_up: (d, r) up-projection weight (``nn.Linear(r, d).weight``).
        b_up: (d,) or None.
        activation: a name from :data:`adapterkern.activations.ACTIVATION_NAMES` (``adapters`` library names).
        scaling: a Python float, or a tensor of shape (1,) or (d,) (learned / per-channel scaling; may
            require grad; any float dtype).
        residual: None for a sequential adapter (residual = x, Houlsby / Pfeiffer), or a tensor of x's
            shape for a parallel adapter (He et al.: the sublayer's output).
        backend: ``auto``, ``torch``, ``triton`` or ``cuda`` (see :mod:`adapterkern.backends`).

    Returns:
        y with x's shape and dtype (contiguous). Accumulation is in float32 on every backend.
    """
    d = _check_x(x)
    cast = _autocast_dtype(x)
    if cast is not None:
        x, w_down, b_down, w_up, b_up, residual = _autocast((x, w_down, b_down, w_up, b_up, residual), cast)
        with torch.autocast(x.device.type, enabled=False):
            return bottleneck_adapter(
                x, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, residual=residual, backend=backend
            )
    if not isinstance(w_down, Tensor):
        raise TypeError(f"w_down: expected a torch.Tensor of shape (r, {d}), got {type(w_down).__name__}")
    if w_down.dim() != 2 or w_down.shape[0] < 1:
        raise ValueError(f"w_down: expected a 2-D tensor of shape (r, {d}) with r >= 1, got {_describe(w_down)}")
    r = w_down.shape[0]
    _check_param(w_down, "w_down", (r, d), x, optional=False)
    _check_param(b_down, "b_down", (r,), x, optional=True)
    _check_param(w_up, "w_up", (d, r), x, optional=False)
    _check_param(b_up, "b_up", (d,), x, optional=True)
    _check_scaling(scaling, d, x)
    _check_residual(residual, x)
    act = get_activation(activation)
    name = resolve_backend(backend, x.device, SINGLE)

    flat = x.dim() != 2
    x2d = x.reshape(-1, d) if flat else x
    res2d = None if residual is None else (residual.reshape(-1, d) if flat else residual)
    if name == "torch":
        y = reference.bottleneck_adapter(x2d, w_down, b_down, w_up, b_up, scaling, res2d, act.name)
    else:
        scale, scale_value = _kernel_scaling(scaling.reshape(-1) if isinstance(scaling, Tensor) else scaling)
        save_preact = _needs_preact(x, w_down, b_down, w_up, b_up, scale, residual)
        y, _ = torch.ops.adapterkern.bottleneck_adapter_fwd(
            x2d, w_down, b_down, w_up, b_up, scale, scale_value, res2d, act.kernel_id, save_preact, name
        )
    return y.view(x.shape) if flat else y


def _check_stack(x: Tensor, w_down, b_down, w_up, b_up, scaling) -> int:
    """A stack of N adapters' weights for x (..., d); returns N."""
    d = x.shape[-1]
    for name, t, dims in (("w_down", w_down, "(N, r, d)"), ("w_up", w_up, "(N, d, r)")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor of shape {dims}, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name}: expected a 3-D tensor of shape {dims}, got {_describe(t)}")
    n, r = w_down.shape[0], w_down.shape[1]
    if n < 1 or r < 1:
        raise ValueError(f"w_down: expected shape (N, r, {d}) with N, r >= 1, got {tuple(w_down.shape)}")
    _check_param(w_down, "w_down", (n, r, d), x, optional=False)
    _check_param(b_down, "b_down", (n, r), x, optional=True)
    _check_param(w_up, "w_up", (n, d, r), x, optional=False)
    _check_param(b_up, "b_up", (n, d), x, optional=True)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float, Tensor)):
        raise TypeError(f"scaling: expected a float or a tensor of shape ({n},) or ({n}, {d}), got {type(scaling).__name__}")
    if isinstance(scaling, Tensor):
        if scaling.shape not in ((n,), (n, d)):
            raise ValueError(f"scaling: expected a tensor of shape ({n},) or ({n}, {d}), got shape {tuple(scaling.shape)}")
        _check_scaling(scaling.reshape(-1)[:1], d, x)  # dtype and device
    return n


def _stack_scaling(scaling, n: int):
    """A float, or the per-adapter scaling as (N, 1) / (N, d)."""
    return scaling.reshape(n, -1) if isinstance(scaling, Tensor) else scaling


# A static mix (weights of shape (N,)) is folded into one adapter when its rank N * r is at most this:
# the widest bottleneck the Triton kernels are tuned for (R_PAD 512 keeps the accumulators in registers).
MAX_FOLDED_RANK = 512


def _fold_static_mix(w_down, b_down, w_up, b_up, scale_2d, weights):
    """N adapters mixed by per-adapter ``weights`` (N,) are one adapter of rank N * r::

        sum_n weights[n] * scaling[n] * (act(x @ w_down[n].T + b_down[n]) @ w_up[n].T + b_up[n])
          = act(x @ W_down.T + B_down) @ W_up.T + B_up

    with W_down (N*r, d) the down-projections stacked, B_down their biases, W_up (d, N*r) the
    up-projections side by side, each scaled by weights[n] * scaling[n] (a scalar or per-row), and
    B_up = sum_n weights[n] * scaling[n] * b_up[n]. Returned as a stack of one: (1, N*r, d), (1, N*r),
    (1, d, N*r), (1, d). The products are formed in float32 (float64 for float64 weights) and rounded
    once to the weights' dtype; torch ops, so gradients reach the stacks, ``scaling`` and ``weights``.
    """
    n, r, d = w_down.shape
    math = torch.float64 if w_up.dtype == torch.float64 else torch.float32
    coef = weights.to(math).reshape(n, 1)
    if isinstance(scale_2d, Tensor):
        coef = coef * scale_2d.to(math)  # (N, 1) or (N, d)
    else:
        coef = coef * scale_2d
    w_up_mix = (w_up.to(math) * coef[:, :, None]).permute(1, 0, 2).reshape(1, d, n * r).to(w_up.dtype)
    b_down_cat = None if b_down is None else b_down.reshape(1, n * r)
    b_up_mix = None if b_up is None else (b_up.to(math) * coef).sum(0, keepdim=True).to(b_up.dtype)
    return w_down.reshape(1, n * r, d), b_down_cat, w_up_mix, b_up_mix


def multi_adapter(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    *,
    activation: Optional[str] = "relu",
    scaling: Union[float, Tensor] = 1.0,
    residual: Optional[Tensor] = None,
    add_residual: bool = True,
    weights: Optional[Tensor] = None,
    backend: str = "auto",
) -> Tensor:
    """N bottleneck adapters (one stack of weights) on the same input, in one launch::

        out[n] = res + scaling[n] * (act(x @ w_down[n].T + b_down[n]) @ w_up[n].T + b_up[n])

    Args:
        x: (..., d) float32, float16, bfloat16 (or float64); any leading shape and strides.
        w_down: (N, r, d) stacked down-projections (``nn.Linear(d, r).weight`` each); x's dtype and device.
        b_down: (N, r) or None.
        w_up: (N, d, r) stacked up-projections.
        b_up: (N, d) or None.
        activation: one activation for all N (see :data:`adapterkern.activations.ACTIVATION_NAMES`).
        scaling: a float, or a tensor of shape (N,) (one scalar per adapter) or (N, d) (per channel).
        residual: None (res = x) or a tensor of x's shape (parallel adapters).
        add_residual: False gives the adapters' own contributions ``scaling[n] * up_n(...)`` without
            ``res`` (what AdapterFusion mixes).
        weights: None, or mixing weights of shape (N,) or ``x.shape[:-1] + (N,)`` (per token); then the
            result is ``res + sum_n weights[..., n] * scaling[n] * up_n(...)`` of x's shape.
        backend: ``auto``, ``torch`` or ``triton`` (the CUDA extension has no multi-adapter kernel yet).

    Returns:
        (N, *x.shape) without ``weights``; x's shape with ``weights``. The stack is computed by one
        kernel launch (x's tiles reused from cache across the N adapters). Weights of shape (N,) with
        N * r <= :data:`MAX_FOLDED_RANK` are folded into one adapter of rank N * r (see
        ``_fold_static_mix``): one launch that writes only the mixed (..., d) result. Per-token weights
        are a PyTorch reduction over the (N, ..., d) stack.
    """
    d = _check_x(x)
    cast = _autocast_dtype(x)
    if cast is not None:
        x, w_down, b_down, w_up, b_up, residual = _autocast((x, w_down, b_down, w_up, b_up, residual), cast)
        with torch.autocast(x.device.type, enabled=False):
            return multi_adapter(
                x, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling, residual=residual,
                add_residual=add_residual, weights=weights, backend=backend,
            )
    n = _check_stack(x, w_down, b_down, w_up, b_up, scaling)
    _check_residual(residual, x, add_residual)
    if weights is not None:
        if not isinstance(weights, Tensor) or not weights.is_floating_point():
            raise TypeError(f"weights: expected a floating-point tensor of shape ({n},) or {tuple(x.shape[:-1]) + (n,)}")
        if weights.shape not in ((n,), tuple(x.shape[:-1]) + (n,)):
            raise ValueError(f"weights: expected shape ({n},) or {tuple(x.shape[:-1]) + (n,)}, got {tuple(weights.shape)}")
        if weights.device != x.device:
            raise ValueError(f"weights: expected device {x.device} (x's device), got {weights.device}")
    act = get_activation(activation)
    name = resolve_backend(backend, x.device, MULTI)

    folded = weights is not None and weights.dim() == 1 and n * w_down.shape[1] <= MAX_FOLDED_RANK
    if folded:
        w_down, b_down, w_up, b_up = _fold_static_mix(w_down, b_down, w_up, b_up, _stack_scaling(scaling, n), weights)
        n, scaling, weights = 1, 1.0, None

    x2d = x.reshape(-1, d)
    stack_residual = add_residual and weights is None
    res2d = None if residual is None or not stack_residual else residual.reshape(-1, d)
    scale_2d = _stack_scaling(scaling, n)
    if name == "torch":
        out = reference.multi_adapter(x2d, w_down, b_down, w_up, b_up, scale_2d, res2d, stack_residual, act.name)
    else:
        scale, scale_value = _kernel_scaling(scale_2d)
        save_preact = _needs_preact(x, w_down, b_down, w_up, b_up, scale, residual)
        out, _ = torch.ops.adapterkern.multi_adapter_fwd(
            x2d, w_down, b_down, w_up, b_up, scale, scale_value, res2d, stack_residual, act.kernel_id, save_preact, name
        )
    if folded:
        return out.view(x.shape)
    if weights is None:
        return out.view((n,) + tuple(x.shape))
    w = weights.to(out.dtype)
    mixed = torch.einsum("ntd,n->td", out, w) if w.dim() == 1 else torch.einsum("ntd,tn->td", out, w.reshape(-1, n))
    if add_residual:
        mixed = mixed + (x2d if residual is None else residual.reshape(-1, d))
    return mixed.view(x.shape)


def bottleneck_adapter_batched(
    x: Tensor,
    adapter_index: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    *,
    activation: Optional[str] = "relu",
    scaling: Union[float, Tensor] = 1.0,
    residual: Optional[Tensor] = None,
    add_residual: bool = True,
    groups: Optional[TokenGroups] = None,
    backend: str = "auto",
) -> Tensor:
    """A heterogeneous batch: every token (or sequence) through its own adapter of a stack, one launch::

        y[t] = res[t] + scaling[i] * (act(x[t] @ w_down[i].T + b_down[i]) @ w_up[i].T + b_up[i]),  i = adapter_index[t]
        y[t] = res[t]                                                                  where adapter_index[t] == -1

    Args:
        x: (..., d) float32, float16, bfloat16 (or float64).
        adapter_index: integer, shape x.shape[:-1] (per token) or x.shape[:1] (per sequence); -1 = no adapter.
        w_down, b_down, w_up, b_up, scaling: the stack, as in :func:`multi_adapter`.
        residual: None (res = x) or a tensor of x's shape.
        add_residual: False gives each token's adapter contribution only (0 for tokens with no
            adapter), as :func:`multi_adapter`'s ``add_residual=False``.
        groups: ``token_groups(adapter_index, N)`` of this same ``adapter_index`` tensor (per token), to
            compute once per batch and reuse in every layer (the index's values are checked there, once);
            groups of another index, or of one modified since, are a ValueError.
        backend: ``auto``, ``torch`` or ``triton``.

    Returns: x's shape and dtype. Weight gradients of an adapter sum over its tokens only.
    """
    d = _check_x(x)
    cast = _autocast_dtype(x)
    if cast is not None:
        x, w_down, b_down, w_up, b_up, residual = _autocast((x, w_down, b_down, w_up, b_up, residual), cast)
        with torch.autocast(x.device.type, enabled=False):
            return bottleneck_adapter_batched(
                x, adapter_index, w_down, b_down, w_up, b_up, activation=activation, scaling=scaling,
                residual=residual, add_residual=add_residual, groups=groups, backend=backend,
            )
    n = _check_stack(x, w_down, b_down, w_up, b_up, scaling)
    _check_residual(residual, x, add_residual)
    index = per_token_index(adapter_index, x)
    if groups is None:
        groups = token_groups(index, n)
    elif not isinstance(groups, TokenGroups):
        raise TypeError(f"groups: expected the TokenGroups of adapterkern.token_groups, got {type(groups).__name__}")
    else:
        groups.check_bound_to(adapter_index, index.numel(), n)
    act = get_activation(activation)
    name = resolve_backend(backend, x.device, BATCHED)
    x2d = x.reshape(-1, d)
    res2d = None if residual is None else residual.reshape(-1, d)
    scale_2d = _stack_scaling(scaling, n)
    if name == "torch":
        y = reference.batched_adapter(
            x2d, groups.perm, groups.counts, w_down, b_down, w_up, b_up, scale_2d, res2d, add_residual, act.name
        )
    else:
        scale, scale_value = _kernel_scaling(scale_2d)
        save_preact = _needs_preact(x, w_down, b_down, w_up, b_up, scale, residual)
        y, _ = torch.ops.adapterkern.batched_adapter_fwd(
            x2d, groups.perm, groups.counts, groups.starts, w_down, b_down, w_up, b_up, scale, scale_value, res2d, add_residual,
            act.kernel_id, save_preact, name,
        )
    return y.view(x.shape)


NORMS = ("layernorm", "rmsnorm")


def adapter_add_norm(
    z: Tensor,
    residual: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    *,
    activation: Optional[str] = "relu",
    scaling: Union[float, Tensor] = 1.0,
    eps: float = 1e-12,
    norm: str = "layernorm",
    backend: str = "auto",
) -> Tensor:
    """Inference: a sequential adapter, the residual add and the norm after it, in one kernel::

        y   = z + scaling * (act(z @ w_down.T + b_down) @ w_up.T + b_up) + residual
        out = F.layer_norm(y, (d,), norm_weight, norm_bias, eps)             norm="layernorm"
        out = y * rsqrt(mean(y**2, -1) + eps) * norm_weight                   norm="rmsnorm" (Llama)

    BERT / RoBERTa's ``BertSelfOutput`` / ``BertOutput`` with a Pfeiffer / Houlsby adapter compute
    ``LayerNorm(adapter(dense(h)) + input_tensor)``: ``z`` is ``dense(h)``, ``residual`` the block's
    ``input_tensor``, ``eps`` the LayerNorm's (BERT: 1e-12). The Triton kernel reads z and residual
    once from memory and writes ``out`` once (see benchmarks/NOTES.md, "adapter_add_norm").

    Args:
        z: (..., d) float32, float16, bfloat16 (or float64); any leading shape and strides.
        residual: a tensor of z's shape, dtype and device; any strides.
        w_down, b_down, w_up, b_up: the adapter, as in :func:`bottleneck_adapter` (``nn.Linear`` layout).
        norm_weight: (d,) or None (ones). norm_bias: (d,) or None (zeros); must be None for rmsnorm.
        activation, scaling: as in :func:`bottleneck_adapter` (scaling a float or a tensor of shape (1,) or (d,)).
        eps: a float > 0, added to the variance (layernorm) or to mean(y**2) (rmsnorm).
        norm: ``"layernorm"`` or ``"rmsnorm"``.
        backend: ``auto``, ``torch`` or ``triton`` (no CUDA C++ kernel).

    Returns:
        z's shape and dtype (contiguous). Statistics in float32 (float64 for float64 inputs). Under
        autocast, every floating input but the scaling is cast to autocast's dtype, as in the other ops.

    Gradients: an inference op. The ``torch`` backend is plain PyTorch and differentiable; the Triton
    kernel has no backward: its forward runs whatever the grad mode (forgetting ``torch.no_grad()``
    costs nothing), and a backward through it raises RuntimeError. Train with :func:`bottleneck_adapter`.
    """
    d = _check_x(z, "z")
    cast = _autocast_dtype(z)
    if cast is not None:
        z, residual, w_down, b_down, w_up, b_up, norm_weight, norm_bias = _autocast(
            (z, residual, w_down, b_down, w_up, b_up, norm_weight, norm_bias), cast
        )
        with torch.autocast(z.device.type, enabled=False):
            return adapter_add_norm(
                z, residual, w_down, b_down, w_up, b_up, norm_weight, norm_bias, activation=activation,
                scaling=scaling, eps=eps, norm=norm, backend=backend,
            )
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual: expected a torch.Tensor of z's shape {tuple(z.shape)}, got {type(residual).__name__}")
    if residual.shape != z.shape:
        raise ValueError(f"residual: expected z's shape {tuple(z.shape)}, got {tuple(residual.shape)}")
    _check_param(residual, "residual", tuple(z.shape), z, optional=False, x_name="z")
    if not isinstance(w_down, Tensor):
        raise TypeError(f"w_down: expected a torch.Tensor of shape (r, {d}), got {type(w_down).__name__}")
    if w_down.dim() != 2 or w_down.shape[0] < 1:
        raise ValueError(f"w_down: expected a 2-D tensor of shape (r, {d}) with r >= 1, got {_describe(w_down)}")
    r = w_down.shape[0]
    for t, name, shape, optional in (
        (w_down, "w_down", (r, d), False), (b_down, "b_down", (r,), True), (w_up, "w_up", (d, r), False),
        (b_up, "b_up", (d,), True), (norm_weight, "norm_weight", (d,), True), (norm_bias, "norm_bias", (d,), True),
    ):
        _check_param(t, name, shape, z, optional, x_name="z")
    if not isinstance(norm, str):
        raise TypeError(f"norm: expected a str (one of {', '.join(NORMS)}), got {type(norm).__name__}")
    if norm not in NORMS:
        raise ValueError(f"norm: unknown norm {norm!r}; expected one of {', '.join(NORMS)}")
    if norm == "rmsnorm" and norm_bias is not None:
        raise ValueError("norm_bias: rmsnorm has no bias; pass norm_bias=None")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise TypeError(f"eps: expected a float > 0, got {type(eps).__name__}")
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")
    _check_scaling(scaling, d, z)
    act = get_activation(activation)
    name = resolve_backend(backend, z.device, ADD_NORM)

    flat = z.dim() != 2  # 2-D inputs skip the reshapes (a few us each: much of a T = 1 call on the CPU)
    z2d, res2d = (z.reshape(-1, d), residual.reshape(-1, d)) if flat else (z, residual)
    if name == "torch":
        out = reference.adapter_add_norm(
            z2d, res2d, w_down, b_down, w_up, b_up, norm_weight, norm_bias, scaling, act.name, float(eps), norm == "rmsnorm"
        )
    else:
        scale, scale_value = _kernel_scaling(scaling.reshape(-1) if isinstance(scaling, Tensor) else scaling)
        out = torch.ops.adapterkern.adapter_add_norm_fwd(
            z2d, res2d, w_down, b_down, w_up, b_up, scale, scale_value, norm_weight, norm_bias, act.kernel_id,
            float(eps), norm == "rmsnorm", name,
        )
    return out.view(z.shape) if flat else out
