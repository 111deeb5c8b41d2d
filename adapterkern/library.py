"""torch.library registration of the fused kernel ops, so they survive torch.compile and CUDA graphs.

Two custom ops, shared by every kernel backend (the ``backend`` string argument picks the module):

* ``adapterkern::bottleneck_adapter_fwd(x, w_down, b_down, w_up, b_up, scale, scale_value, residual,
  activation_id, save_preact, backend) -> (y, preact)``
* ``adapterkern::bottleneck_adapter_bwd(dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value,
  residual_is_x, activation_id, backend, needs) -> (dx, dw_down, db_down, dw_up, db_up, dscale)``

* ``adapterkern::multi_adapter_fwd`` / ``multi_adapter_bwd``: the same for a stack of N adapters on one
  input (``w_down`` (N, r, d), ...; ``y`` (N, T, d)), with ``add_residual``.

Shapes and semantics are the kernel-backend interface documented in :mod:`adapterkern.backends`.
The forward saves only the pre-activation (T, r) for backward, never the (T, d) output (see
benchmarks/NOTES.md for the byte count). Outputs not needed are returned as empty tensors by the
backward op (custom ops cannot return None) and turned into None here.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import kernel_backend


@torch.library.custom_op("adapterkern::bottleneck_adapter_fwd", mutates_args=())
def bottleneck_adapter_fwd(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    scale: Optional[Tensor],
    scale_value: float,
    residual: Optional[Tensor],
    activation_id: int,
    save_preact: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return kernel_backend(backend).adapter_forward(
        x, w_down, b_down, w_up, b_up, scale, scale_value, residual, activation_id, save_preact
    )


@bottleneck_adapter_fwd.register_fake
def _(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, activation_id, save_preact, backend):
    num_tokens, d = x.shape
    preact_shape = (num_tokens, w_down.shape[0]) if save_preact else (0,)
    return x.new_empty((num_tokens, d)), x.new_empty(preact_shape)


@torch.library.custom_op("adapterkern::bottleneck_adapter_bwd", mutates_args=())
def bottleneck_adapter_bwd(
    dy: Tensor,
    x: Tensor,
    preact: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    scale: Optional[Tensor],
    scale_value: float,
    residual_is_x: bool,
    activation_id: int,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = kernel_backend(backend).adapter_backward(
        dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id, needs
    )
    return tuple(x.new_empty(0) if g is None else g for g in grads)


def _bwd_fake(dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id, backend, needs):
    """Gradients have their inputs' shapes (contiguous); those not needed are empty."""
    likes = (x, w_down, b_down, w_up, b_up, scale)
    return tuple(
        torch.empty_like(t, memory_format=torch.contiguous_format) if need and t is not None else x.new_empty(0)
        for need, t in zip(needs, likes)
    )


bottleneck_adapter_bwd.register_fake(_bwd_fake)


def _register_autograd(fwd_op, bwd_op, kind: str) -> None:
    """Autograd for a forward op whose args are (x, w_down, b_down, w_up, b_up, scale, scale_value,
    residual, <extra>, activation_id, save_preact, backend), <extra> being nothing (``kind`` "single"),
    add_residual ("multi"), or add_residual and the token groups perm, counts, starts ("batched"). The backward op gets
    the saved pre-activation (and the groups); d_residual is dy (summed over the stack for "multi")."""

    def setup_context(ctx, inputs, output):
        x, w_down, b_down, w_up, b_up, scale, scale_value, residual = inputs[:8]
        add_residual = inputs[8] if kind in ("multi", "batched") else True
        groups = list(inputs[9:12]) if kind == "batched" else []
        activation_id, _, backend = inputs[-3:]
        ctx.save_for_backward(x, output[1], w_down, b_down, w_up, b_up, scale, *groups)
        ctx.scale_value = scale_value
        ctx.residual_is_x = add_residual and residual is None
        ctx.add_residual = add_residual
        ctx.activation_id = activation_id
        ctx.backend = backend

    def backward(ctx, dy, _dpreact):
        x, preact, w_down, b_down, w_up, b_up, scale, *groups = ctx.saved_tensors
        need_x, need_wd, need_bd, need_wu, need_bu, need_s, _, need_res = ctx.needs_input_grad[:8]
        needs = [need_x, need_wd, need_bd, need_wu, need_bu, need_s]
        grads = [None] * 6
        if any(needs):
            if preact.numel() == 0 and x.shape[0] * w_down.shape[-2] > 0:
                raise RuntimeError(
                    "adapterkern: backward through an adapter op called with save_preact=False; call it "
                    "through adapterkern.bottleneck_adapter / multi_adapter, which save it when grads are needed"
                )
            outs = bwd_op(
                dy, x, preact, w_down, b_down, w_up, b_up, scale, ctx.scale_value, ctx.residual_is_x,
                ctx.activation_id, ctx.backend, needs, *groups,
            )
            grads = [g if need else None for g, need in zip(outs, needs)]
        d_residual = None
        if need_res and ctx.add_residual:
            d_residual = dy.sum(0) if kind == "multi" else dy
        n_rest = len(ctx.needs_input_grad) - 8
        return (*grads, None, d_residual) + (None,) * n_rest

    fwd_op.register_autograd(backward, setup_context=setup_context)


_register_autograd(bottleneck_adapter_fwd, torch.ops.adapterkern.bottleneck_adapter_bwd, "single")


@torch.library.custom_op("adapterkern::multi_adapter_fwd", mutates_args=())
def multi_adapter_fwd(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    scale: Optional[Tensor],
    scale_value: float,
    residual: Optional[Tensor],
    add_residual: bool,
    activation_id: int,
    save_preact: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return kernel_backend(backend).multi_adapter_forward(
        x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_residual, activation_id, save_preact
    )


@multi_adapter_fwd.register_fake
def _(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_residual, activation_id, save_preact, backend):
    (num_tokens, d), (n, r) = x.shape, w_down.shape[:2]
    return x.new_empty((n, num_tokens, d)), x.new_empty((n, num_tokens, r) if save_preact else (0,))


@torch.library.custom_op("adapterkern::multi_adapter_bwd", mutates_args=())
def multi_adapter_bwd(
    dy: Tensor,
    x: Tensor,
    preact: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    scale: Optional[Tensor],
    scale_value: float,
    residual_is_x: bool,
    activation_id: int,
    backend: str,
    needs: list[bool],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = kernel_backend(backend).multi_adapter_backward(
        dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id, needs
    )
    return tuple(x.new_empty(0) if g is None else g for g in grads)


multi_adapter_bwd.register_fake(_bwd_fake)
_register_autograd(multi_adapter_fwd, torch.ops.adapterkern.multi_adapter_bwd, "multi")


@torch.library.custom_op("adapterkern::batched_adapter_fwd", mutates_args=())
def batched_adapter_fwd(
    x: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    scale: Optional[Tensor],
    scale_value: float,
    residual: Optional[Tensor],
    add_residual: bool,
    perm: Tensor,
    counts: Tensor,
    starts: Tensor,
    activation_id: int,
    save_preact: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return kernel_backend(backend).batched_adapter_forward(
        x, (perm, counts, starts), w_down, b_down, w_up, b_up, scale, scale_value, residual, add_residual,
        activation_id, save_preact,
    )


@batched_adapter_fwd.register_fake
def _(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_residual, perm, counts, starts, activation_id, save_preact, backend):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], w_down.shape[1]) if save_preact else (0,))


@torch.library.custom_op("adapterkern::batched_adapter_bwd", mutates_args=())
def batched_adapter_bwd(
    dy: Tensor,
    x: Tensor,
    preact: Tensor,
    w_down: Tensor,
    b_down: Optional[Tensor],
    w_up: Tensor,
    b_up: Optional[Tensor],
    scale: Optional[Tensor],
    scale_value: float,
    residual_is_x: bool,
    activation_id: int,
    backend: str,
    needs: list[bool],
    perm: Tensor,
    counts: Tensor,
    starts: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = kernel_backend(backend).batched_adapter_backward(
        dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id, needs,
        (perm, counts, starts),
    )
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@batched_adapter_bwd.register_fake
def _(dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id, backend, needs, perm, counts, starts):
    return _bwd_fake(dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id, backend, needs)


_register_autograd(batched_adapter_fwd, torch.ops.adapterkern.batched_adapter_bwd, "batched")
