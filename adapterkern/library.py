"""torch.library registration of the fused kernel ops, so they survive torch.compile and CUDA graphs.

One forward / backward op pair per op of :mod:`adapterkern.backends` (the ``backend`` string argument
picks the kernel-backend module), all made by :func:`_register` from one parameter list:

* ``adapterkern::bottleneck_adapter_fwd(x, w_down, b_down, w_up, b_up, scale, scale_value, residual,
  activation_id, save_preact, backend) -> (y, preact)``
* ``adapterkern::bottleneck_adapter_bwd(dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value,
  residual_is_x, activation_id, backend, needs) -> (dx, dw_down, db_down, dw_up, db_up, dscale)``
* ``adapterkern::multi_adapter_fwd`` / ``multi_adapter_bwd``: the same for a stack of N adapters on one
  input (``w_down`` (N, r, d), ...; ``y`` (N, T, d)), with ``add_residual`` after ``residual``.
* ``adapterkern::batched_adapter_fwd`` / ``batched_adapter_bwd``: the stack with each token routed to
  one adapter; the token groups ``perm, counts, starts`` follow ``x`` in both ops.
* ``adapterkern::adapter_add_norm_fwd(z, residual, w_down, b_down, w_up, b_up, scale, scale_value,
  norm_weight, norm_bias, activation_id, eps, rms_norm, backend) -> out``: the inference op (a
  sequential adapter, the residual add and the norm in one kernel; :func:`_register_add_norm`). No
  backward kernel: its autograd formula is ``adapterkern::adapter_add_norm_no_backward``, an op that
  raises when run (so a backward through it is a clear error) and whose fake gives the gradients'
  shapes (so torch.compile can still trace a graph whose inputs require grad).

Shapes and semantics are the kernel-backend interface documented in :mod:`adapterkern.backends`.
The forward saves only the pre-activation for backward, never the (T, d) output (see
benchmarks/NOTES.md for the byte count); a backward through a forward called with
``save_preact=False`` is an error (the functional ops set it whenever a gradient can be needed).
Outputs not needed are returned as empty tensors by the backward op (custom ops cannot return None)
and turned into None here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .backends import ADD_NORM, BATCHED, MULTI, SINGLE, kernel_functions

# (name, schema type) of the adapter's weights, as every op takes them.
_WEIGHTS = (
    ("w_down", "Tensor"), ("b_down", "Tensor?"), ("w_up", "Tensor"), ("b_up", "Tensor?"),
    ("scale", "Tensor?"), ("scale_value", "float"),
)
_GROUPS = (("perm", "Tensor"), ("counts", "Tensor"), ("starts", "Tensor"))
# The inputs with a gradient, in the order of the backward op's outputs.
_GRAD_INPUTS = ("x", "w_down", "b_down", "w_up", "b_up", "scale")


@dataclass(frozen=True)
class _OpSpec:
    """One op's registration: ``name`` (ops ``adapterkern::{name}_fwd`` / ``_bwd``), the backend
    ``op``, whether it takes ``add_residual`` and the token groups, and the fake forward's
    (y shape, preact shape) from (T, d, w_down.shape)."""

    name: str
    op: str
    add_residual: bool
    groups: bool
    output_shapes: Callable[[int, int, tuple], tuple]

    @property
    def forward_params(self) -> tuple:
        return (
            (("x", "Tensor"),) + (_GROUPS if self.groups else ()) + _WEIGHTS + (("residual", "Tensor?"),)
            + ((("add_residual", "bool"),) if self.add_residual else ())
            + (("activation_id", "int"), ("save_preact", "bool"), ("backend", "str"))
        )

    @property
    def backward_params(self) -> tuple:
        return (
            (("dy", "Tensor"), ("x", "Tensor")) + (_GROUPS if self.groups else ()) + (("preact", "Tensor"),)
            + _WEIGHTS + (("residual_is_x", "bool"), ("activation_id", "int"), ("backend", "str"), ("needs", "bool[]"))
        )


def _schema(params: tuple, returns: str) -> str:
    return "(" + ", ".join(f"{kind} {name}" for name, kind in params) + ") -> " + returns


def _named(params: tuple, args: tuple) -> dict:
    return dict(zip((name for name, _ in params), args))


def _kernel_args(spec: _OpSpec, a: dict, head: tuple, middle: tuple, tail: tuple) -> list:
    """The kernel-backend call's arguments: ``head``, the groups as one tuple, ``middle``, the weights, ``tail``."""
    groups = [(a["perm"], a["counts"], a["starts"])] if spec.groups else []
    return [a[n] for n in head] + groups + [a[n] for n in middle] + [a[n] for n, _ in _WEIGHTS] + [a[n] for n in tail]


def _register(spec: _OpSpec) -> None:
    forward_params, backward_params = spec.forward_params, spec.backward_params
    forward_tail = ("residual",) + (("add_residual",) if spec.add_residual else ()) + ("activation_id", "save_preact")

    def forward(*args):
        a = _named(forward_params, args)
        kernel_forward, _ = kernel_functions(a["backend"], spec.op)
        return kernel_forward(*_kernel_args(spec, a, ("x",), (), forward_tail))

    def forward_fake(*args):
        a = _named(forward_params, args)
        x = a["x"]
        y_shape, preact_shape = spec.output_shapes(x.shape[0], x.shape[1], tuple(a["w_down"].shape))
        return x.new_empty(y_shape), x.new_empty(preact_shape if a["save_preact"] else (0,))

    def check_backward_inputs(a: dict) -> None:
        """dy and preact must be what this op's forward made for x and w_down: the kernels index them so."""
        x = a["x"]
        y_shape, preact_shape = spec.output_shapes(x.shape[0], x.shape[1], tuple(a["w_down"].shape))
        for name, shape in (("dy", y_shape), ("preact", preact_shape)):
            if tuple(a[name].shape) != shape:
                raise ValueError(
                    f"{name}: expected shape {shape} (the forward's, for x {tuple(x.shape)} and w_down "
                    f"{tuple(a['w_down'].shape)}), got {tuple(a[name].shape)}"
                )

    def backward_op(*args):
        a = _named(backward_params, args)
        check_backward_inputs(a)
        _, kernel_backward = kernel_functions(a["backend"], spec.op)
        grads = kernel_backward(*_kernel_args(spec, a, ("dy", "x"), ("preact",), ("residual_is_x", "activation_id", "needs")))
        return tuple(a["x"].new_empty(0) if g is None else g for g in grads)

    def backward_fake(*args):
        """Gradients have their inputs' shapes (contiguous); those not needed are empty."""
        a = _named(backward_params, args)
        check_backward_inputs(a)
        return tuple(
            torch.empty_like(a[n], memory_format=torch.contiguous_format) if need and a[n] is not None else a["x"].new_empty(0)
            for need, n in zip(a["needs"], _GRAD_INPUTS)
        )

    fwd = torch.library.custom_op(
        f"adapterkern::{spec.name}_fwd", forward, mutates_args=(), schema=_schema(forward_params, "(Tensor, Tensor)")
    )
    fwd.register_fake(forward_fake)
    bwd = torch.library.custom_op(
        f"adapterkern::{spec.name}_bwd", backward_op, mutates_args=(), schema=_schema(backward_params, "(" + ", ".join(["Tensor"] * len(_GRAD_INPUTS)) + ")")
    )
    bwd.register_fake(backward_fake)
    forward_names = [name for name, _ in forward_params]
    saved = ("x", *(name for name, _ in _GROUPS if spec.groups), "w_down", "b_down", "w_up", "b_up", "scale")

    def setup_context(ctx, inputs, output):
        a = _named(forward_params, inputs)
        ctx.save_for_backward(output[1], *(a[n] for n in saved))
        add_residual = a.get("add_residual", True)
        ctx.scale_value = a["scale_value"]
        ctx.residual_is_x = add_residual and a["residual"] is None
        ctx.add_residual = add_residual
        ctx.activation_id = a["activation_id"]
        ctx.backend = a["backend"]

    def backward(ctx, dy, _dpreact):
        preact, *tensors = ctx.saved_tensors
        t = dict(zip(saved, tensors))
        need = dict(zip(forward_names, ctx.needs_input_grad))
        needs = [need[n] for n in _GRAD_INPUTS]
        grads = dict.fromkeys(forward_names)
        if any(needs):
            if preact.numel() == 0 and t["x"].shape[0] * t["w_down"].shape[-2] > 0:
                raise RuntimeError(
                    f"adapterkern: backward through {spec.name}_fwd called with save_preact=False; call it "
                    "through the adapterkern functional ops, which save the pre-activation when grads are needed"
                )
            groups = [t[n] for n, _ in _GROUPS] if spec.groups else []
            outs = bwd(
                dy, t["x"], *groups, preact, t["w_down"], t["b_down"], t["w_up"], t["b_up"], t["scale"], ctx.scale_value,
                ctx.residual_is_x, ctx.activation_id, ctx.backend, needs,
            )
            grads.update((n, g) for n, g, wanted in zip(_GRAD_INPUTS, outs, needs) if wanted)
        if need["residual"] and ctx.add_residual:
            grads["residual"] = dy.sum(0) if spec.op == MULTI else dy
        return tuple(grads[n] for n in forward_names)

    fwd.register_autograd(backward, setup_context=setup_context)


_register(_OpSpec("bottleneck_adapter", SINGLE, add_residual=False, groups=False,
                  output_shapes=lambda t, d, w: ((t, d), (t, w[0]))))
_register(_OpSpec("multi_adapter", MULTI, add_residual=True, groups=False,
                  output_shapes=lambda t, d, w: ((w[0], t, d), (w[0], t, w[1]))))
_register(_OpSpec("batched_adapter", BATCHED, add_residual=True, groups=True,
                  output_shapes=lambda t, d, w: ((t, d), (t, w[1]))))


# The inference op (forward only): adapter_add_norm.
_ADD_NORM_PARAMS = (
    ("z", "Tensor"), ("residual", "Tensor"), *_WEIGHTS, ("norm_weight", "Tensor?"), ("norm_bias", "Tensor?"),
    ("activation_id", "int"), ("eps", "float"), ("rms_norm", "bool"), ("backend", "str"),
)
ADD_NORM_NO_BACKWARD = (
    "adapter_add_norm: the {backend} kernel is inference-only (it has no backward); run it under torch.no_grad() "
    "/ torch.inference_mode(), or train with adapterkern.bottleneck_adapter followed by the norm (or "
    "adapter_add_norm(..., backend='torch'), which is differentiable)"
)


def _register_add_norm() -> None:
    def forward(*args):
        a = _named(_ADD_NORM_PARAMS, args)
        kernel_forward, _ = kernel_functions(a["backend"], ADD_NORM)
        return kernel_forward(*(a[n] for n, _ in _ADD_NORM_PARAMS[:-1]))

    def forward_fake(z, *_):
        return z.new_empty(z.shape)

    fwd = torch.library.custom_op(
        "adapterkern::adapter_add_norm_fwd", forward, mutates_args=(), schema=_schema(_ADD_NORM_PARAMS, "Tensor")
    )
    fwd.register_fake(forward_fake)

    def no_backward(grad, shape, dtype, backend):
        raise RuntimeError(ADD_NORM_NO_BACKWARD.format(backend=backend))

    nobwd = torch.library.custom_op(
        "adapterkern::adapter_add_norm_no_backward", no_backward, mutates_args=(),
        schema="(Tensor grad, SymInt[] shape, ScalarType dtype, str backend) -> Tensor",
    )
    nobwd.register_fake(lambda grad, shape, dtype, backend: grad.new_empty(shape, dtype=dtype))
    names = [n for n, _ in _ADD_NORM_PARAMS]

    def setup_context(ctx, inputs, output):
        ctx.like = [(t.shape, t.dtype) if isinstance(t, Tensor) else None for t in inputs]
        ctx.backend = inputs[names.index("backend")]

    def backward(ctx, grad):
        # Every gradient asked for comes from the raising op (none is silently None or zero).
        return tuple(
            nobwd(grad, list(like[0]), like[1], ctx.backend) if need and like is not None else None
            for need, like in zip(ctx.needs_input_grad, ctx.like)
        )

    fwd.register_autograd(backward, setup_context=setup_context)


_register_add_norm()
