"""Host side of the fused Triton adapter kernels (forward, and a two-kernel backward): the launchers that are the kernel-backend interface.

Maths (row-major, ``nn.Linear`` layout: ``w_down`` (r, d), ``w_up`` (d, r))::

    h  = x @ w_down.T + b_down            (T, r)   pre-activation, kept on chip (saved only for training)
    a  = act(h)                           (T, r)
    y  = res + s * (a @ w_up.T + b_up)    (T, d)   res = x (sequential) or a separate tensor (parallel)

Backward, with dz = s * dy::

    dh      = (dz @ w_up) * act'(h)       (T, r)   kernel 1 (_bwd_dh_kernel)
    dx      = dh @ w_down (+ dy if res is x)        kernel 2 (_bwd_main_kernel), per (d-block, T-split)
    dw_down = dh.T @ x,  db_down = sum_T dh         kernel 2, partial sums per T-split
    dw_up   = dz.T @ a,  db_up = sum_T dz           kernel 2, partial sums per T-split
    ds      = sum_T dy * (a @ w_up.T + b_up)        kernel 2, partial sums per T-split

Weight gradients are deterministic: every program owns one (T-split, d-block) tile of a partial-sum
buffer, and the T-splits are summed on the host in a fixed order (no atomics).

Every ``tl.dot`` has all three dimensions >= 16 (the GPU compiler requires it): the bottleneck is padded
to ``R_PAD = max(16, next_pow2(r))`` and masked. Token offsets are int64, so T * stride can pass 2^31.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import triton

from .kernels import bwd_dh_kernel, bwd_main_kernel, decode_down_kernel, decode_up_kernel, fwd_kernel
from .language import acc_dtype, dot_precision, padded_rank, t_bucket, unit_stride


# ----------------------------------------------------------------------------------------------
# Host wrappers (the kernel-backend interface of adapterkern.backends)
# ----------------------------------------------------------------------------------------------


def _scale_args(scale: Optional[torch.Tensor], scale_value: float, like: torch.Tensor):
    """(pointer, stride over d, stride over adapters, value, HAS_S) for a (N, 1) / (N, D) scale or None."""
    if scale is None:
        return like, 0, 0, float(scale_value), False
    return scale, (0 if scale.shape[1] == 1 else scale.stride(1)), scale.stride(0), 1.0, True


# A T-split's fp32 partials (dw_down and dw_up: 2 x r x BLOCK_D x 4 bytes) are 2 r / tokens of the bf16 dy
# and x it reads (half as much again at r = 64 and 256 tokens), and the host reads them once more to sum them.
MIN_SPLIT_TOKENS = 256


def bwd_splits(num_tokens: int, programs_per_split: int, block_t: int, programs: int, min_tokens: int) -> int:
    """T-splits of bwd_main_kernel for one config: as many as keep its grid (``programs_per_split`` per
    split: d-blocks x the adapters of a stack) within ``programs``, so the last wave is nearly whole; at
    least one, and at most one per ``max(block_t, min_tokens)`` tokens (never more splits than token
    blocks, nor partials that outweigh their tokens)."""
    return max(1, min(programs // programs_per_split, triton.cdiv(num_tokens, max(block_t, min_tokens))))


def bwd_split_count(num_tokens: int, d: int, adapters: int, device: torch.device):
    """bwd_main_kernel's T-split count as a function of a config's meta-parameters (``meta["BLOCK_T"]``,
    ``meta["BLOCK_D"]``): ``adapters`` x cdiv(d, BLOCK_D) programs per split, aiming at two programs per
    SM on a GPU; in the interpreter at a small "GPU" and no token floor, so the tests' small shapes take
    several uneven (some empty) T-splits."""
    if device.type == "cuda":
        programs, min_tokens = 2 * torch.cuda.get_device_properties(device).multi_processor_count, MIN_SPLIT_TOKENS
    else:
        programs, min_tokens = 8, 1
    return lambda meta: bwd_splits(num_tokens, triton.cdiv(d, meta["BLOCK_D"]) * adapters, meta["BLOCK_T"],
                                   programs, min_tokens)


DECODE_MAX_TOKENS = 64  # at most this many tokens: the split-d decode kernels (one BLOCK_T row tile otherwise)
DECODE_BLOCK_D = 64
DECODE_MAX_R_PAD = 128  # wider bottlenecks: the (T_PAD, R_PAD) tiles spill registers (ptxas, sm_90): row tile
# ADAPTERKERN_TRITON_DECODE: "auto" (default: the decode kernels for T <= DECODE_MAX_TOKENS and r <= 128),
# "off" (never), "force" (whenever they can: no token groups); the benchmarks time "auto" against "off".
DECODE_ENV = "ADAPTERKERN_TRITON_DECODE"


def use_decode_kernels(num_tokens: int, grouped: bool, r: int = 1) -> bool:
    """Whether a forward of ``num_tokens`` tokens through a bottleneck of ``r`` takes the split-d decode kernels."""
    mode = os.environ.get(DECODE_ENV, "auto").strip().lower() or "auto"
    if mode not in ("auto", "off", "force"):
        raise ValueError(f"{DECODE_ENV}: expected auto, off or force, got {mode!r}")
    if grouped or num_tokens == 0 or mode == "off":
        return False
    return mode == "force" or (num_tokens <= DECODE_MAX_TOKENS and padded_rank(r) <= DECODE_MAX_R_PAD)


def decode_warps(t_pad: int, r_pad: int) -> int:
    """Warps of the decode kernels: 4, or 8 where the (T_PAD, R_PAD) fp32 tile would take more than
    32 registers per thread at 4 warps (it is held while the up-projection runs)."""
    return 4 if t_pad * r_pad <= 32 * 32 * 4 else 8


DECODE_PARTIAL_BUDGET = 64 * 1024  # bytes of partial sums each up-projection program reads (from L2)


def decode_grid(num_tokens: int, d: int, r: int, n_adapters: int, device: torch.device):
    """(d-splits of the down-projection, their chunk of d, output columns per up-projection program).

    Every up-projection program re-reads all the partial sums (splits x T_PAD x R_PAD fp32), so the split
    count is capped to keep that under DECODE_PARTIAL_BUDGET; the up-projection itself spreads over about
    two programs per SM (on a GPU; small uneven splits in the interpreter, for the tests)."""
    programs = 2 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3
    blocks = triton.cdiv(d, DECODE_BLOCK_D)
    split_bytes = max(16, triton.next_power_of_2(num_tokens)) * padded_rank(r) * 4  # one split's fp32 partial
    want = max(1, min(blocks, programs, DECODE_PARTIAL_BUDGET // split_bytes)) if device.type == "cuda" else 3
    chunk = DECODE_BLOCK_D * triton.cdiv(blocks, want)
    per_program = DECODE_BLOCK_D * triton.cdiv(blocks, max(1, min(blocks, triton.cdiv(programs, n_adapters))))
    return triton.cdiv(d, chunk), chunk, per_program


# ADAPTERKERN_TRITON_FORWARD: "l2" (default: fwd_kernel's L2_RESIDENT schedule where the residual is x) or
# "rowtile" (one program per row tile, every tile at once: the forward as it was; the benchmarks time both).
FORWARD_ENV = "ADAPTERKERN_TRITON_FORWARD"
# The share of the L2 the x tiles in flight may take under L2_RESIDENT: y (stored evict-first) and the
# weights pass through the rest.
L2_SHARE = 0.5
INTERPRETER_PROGRAMS = 3  # the interpreter's "L2": three tiles, so the tests' shapes take several tiles per program


def forward_mode() -> str:
    """ADAPTERKERN_TRITON_FORWARD, checked: "l2" or "rowtile"."""
    mode = os.environ.get(FORWARD_ENV, "l2").strip().lower() or "l2"
    if mode not in ("l2", "rowtile"):
        raise ValueError(f"{FORWARD_ENV}: expected l2 or rowtile, got {mode!r}")
    return mode


def l2_resident_programs(num_tokens: int, block_t: int, row_bytes: int, budget_bytes: int) -> int:
    """Programs of an L2_RESIDENT forward: as many as keep their x tiles (``block_t`` rows of ``row_bytes``
    each, one per program) within ``budget_bytes``; at least one, at most one per tile."""
    return max(1, min(triton.cdiv(num_tokens, block_t), budget_bytes // (block_t * row_bytes)))


def forward_programs(num_tokens: int, row_bytes: int, device: torch.device):
    """fwd_kernel's program count under L2_RESIDENT as a function of a config's ``meta["BLOCK_T"]``: the
    tiles of L2_SHARE of the GPU's L2, or INTERPRETER_PROGRAMS tiles in the interpreter."""
    if device.type == "cuda":
        budget = int(L2_SHARE * torch.cuda.get_device_properties(device).L2_cache_size)
        return lambda meta: l2_resident_programs(num_tokens, meta["BLOCK_T"], row_bytes, budget)
    return lambda meta: min(triton.cdiv(num_tokens, meta["BLOCK_T"]), INTERPRETER_PROGRAMS)


def _decode_forward(x, w_down, b_down, w_up, b_up, scale, scale_value, res, add_residual, activation_id, y, preact):
    """The forward of N adapters on few tokens in two launches: partial h per d-split (every split on its
    own program), then per block of output columns the partials summed in split order (deterministic,
    no atomics), the activation and the up-projection. Fills ``y`` (N, T, d) and ``preact`` (N, T, r)."""
    num_tokens, d = x.shape
    n_adapters, r = w_down.shape[0], w_down.shape[1]
    splits, chunk, d_per_program = decode_grid(num_tokens, d, r, n_adapters, x.device)
    t_pad, r_pad = max(16, triton.next_power_of_2(num_tokens)), padded_rank(r)
    acc = acc_dtype(x.dtype)
    partial = torch.empty((n_adapters, splits, t_pad, r_pad), dtype=torch.float64 if x.dtype == torch.float64 else torch.float32,
                          device=x.device)  # the kernels' ACC
    precision = dot_precision(x.dtype)
    decode_down_kernel[(splits, n_adapters)](
        x, x.stride(0), x.stride(1), w_down, w_down.stride(1), w_down.stride(2), w_down.stride(0), partial,
        num_tokens, d, r, chunk, PRECISION=precision, ACC=acc, R_PAD=r_pad, T_PAD=t_pad, BLOCK_D=DECODE_BLOCK_D,
        num_warps=decode_warps(t_pad, r_pad),
    )
    s, stride_s, stride_s_n, s_val, has_s = _scale_args(scale, scale_value, w_up)
    save_preact = preact.numel() > 0
    decode_up_kernel[(triton.cdiv(d, d_per_program), n_adapters)](
        partial, splits, res, res.stride(0), res.stride(1),
        b_down if b_down is not None else w_down, 0 if b_down is None else b_down.stride(0),
        w_up, w_up.stride(1), w_up.stride(2), w_up.stride(0),
        b_up if b_up is not None else w_up, 0 if b_up is None else b_up.stride(0),
        s, stride_s, stride_s_n, s_val, y, preact if save_preact else y,
        num_tokens, d, r, d_per_program,
        ACT=activation_id, HAS_BD=b_down is not None, HAS_BU=b_up is not None, HAS_S=has_s, ADD_RES=add_residual,
        SAVE_H=save_preact, PRECISION=precision, ACC=acc, R_PAD=r_pad, T_PAD=t_pad, BLOCK_D=DECODE_BLOCK_D,
        num_warps=decode_warps(t_pad, r_pad),
    )


def multi_adapter_forward(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    scale_value: float,
    residual: Optional[torch.Tensor],
    add_residual: bool,
    activation_id: int,
    save_preact: bool,
    groups: Optional[Sequence[torch.Tensor]] = None,
):
    """N adapters on one input, one launch: grid (T-blocks, N), adapter n's programs write ``y[n]``.

    With ``groups`` = (perm, counts, starts) (see :func:`token_groups`) it is the batched form
    instead: each token goes through the one adapter it is routed to (or none), grid (T-blocks, N + 1),
    and the results are y (T, d), preact (T, r).

    ``x``/``residual`` (T, d) any strides; ``w_down`` (N, r, d), ``w_up`` (N, d, r), biases (N, r) /
    (N, d) or None, ``scale`` (N, 1) / (N, d) or None (then ``scale_value``). Returns (y (N, T, d)
    contiguous, preact (N, T, r) or empty). ``y[n] = res + s_n * u_n`` with ``res`` = residual (x if
    None) when ``add_residual``, else 0.
    """
    num_tokens, d = x.shape
    n_adapters, r = w_down.shape[0], w_down.shape[1]
    b_down, b_up = unit_stride(b_down), unit_stride(b_up)
    stack = () if groups is not None else (n_adapters,)
    y = torch.empty(stack + (num_tokens, d), dtype=x.dtype, device=x.device)
    preact = torch.empty(stack + (num_tokens, r) if save_preact else (0,), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return y, preact
    res = x if residual is None else residual
    if use_decode_kernels(num_tokens, groups is not None, r):
        _decode_forward(x, w_down, b_down, w_up, b_up, scale, scale_value, res, add_residual, activation_id, y, preact)
        return y, preact
    s, stride_s, stride_s_n, s_val, has_s = _scale_args(scale, scale_value, w_up)
    perm, counts, starts = groups if groups is not None else (y, y, y)
    n_groups = n_adapters + 1 if groups is not None else n_adapters
    # L2_RESIDENT where the residual is x (the sequential adapter): the only case that reads x twice.
    l2_resident = forward_mode() == "l2" and groups is None and add_residual and residual is None
    programs = forward_programs(num_tokens, d * x.element_size(), x.device) if l2_resident else (
        lambda meta: triton.cdiv(num_tokens, meta["BLOCK_T"]))
    grid = lambda meta: (programs(meta), n_groups)  # noqa: E731
    fwd_kernel[grid](
        x, x.stride(0), x.stride(1),
        res, res.stride(0), res.stride(1),
        w_down, w_down.stride(1), w_down.stride(2),
        b_down if b_down is not None else w_down,
        w_up, w_up.stride(1), w_up.stride(2),
        b_up if b_up is not None else w_up,
        s, stride_s, s_val,
        y, preact if save_preact else y,
        w_down.stride(0), 0 if b_down is None else b_down.stride(0), w_up.stride(0),
        0 if b_up is None else b_up.stride(0), stride_s_n,
        perm, counts, starts,
        num_tokens, d, r, t_bucket(num_tokens),
        ACT=activation_id,
        HAS_BD=b_down is not None,
        HAS_BU=b_up is not None,
        HAS_S=has_s,
        ADD_RES=add_residual,
        SAVE_H=save_preact,
        GATHER=groups is not None,
        PRECISION=dot_precision(x.dtype),
        ACC=acc_dtype(x.dtype),
        R_PAD=padded_rank(r),
        L2_RESIDENT=l2_resident,
    )
    return y, preact


def multi_adapter_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    preact: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    scale_value: float,
    residual_is_x: bool,
    activation_id: int,
    needs: Sequence[bool],
    groups: Optional[Sequence[torch.Tensor]] = None,
):
    """Backward of :func:`multi_adapter_forward` for ``dy`` (N, T, d) (any strides; (T, d) for the
    batched form, with the same ``groups``). Returns
    (dx (T, d), dw_down (N, r, d), db_down, dw_up, db_up, dscale (scale's shape)), None where not needed.
    ``dx`` includes ``sum_n dy[n]`` when ``residual_is_x`` (x was added to every output)."""
    need_dx, need_dwd, need_dbd, need_dwu, need_dbu, need_ds = (bool(n) for n in needs)
    b_up = unit_stride(b_up)
    num_tokens, d = x.shape
    n_adapters, r = w_down.shape[0], w_down.shape[1]
    dev, dtype = x.device, x.dtype
    f32 = torch.float64 if dtype == torch.float64 else torch.float32  # partial sums
    if num_tokens == 0:
        zeros = lambda t: None if t is None else torch.zeros_like(t)  # noqa: E731
        return (
            torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx else None,
            zeros(w_down) if need_dwd else None,
            zeros(b_down) if need_dbd else None,
            zeros(w_up) if need_dwu else None,
            zeros(b_up) if need_dbu else None,
            zeros(scale) if need_ds else None,
        )
    s, stride_s, stride_s_n, s_val, has_s = _scale_args(scale, scale_value, w_up)
    precision = dot_precision(dtype)
    acc = acc_dtype(dtype)
    r_pad = padded_rank(r)
    tokens_key = t_bucket(num_tokens)

    gather = groups is not None
    if gather:  # one (T, d) dy: give it a stack axis of stride 0 so one set of arguments serves both forms
        dy = dy.unsqueeze(0)
    perm, counts, starts = groups if gather else (preact, preact, preact)
    n_groups = n_adapters + 1 if gather else n_adapters
    dh = None
    if need_dx or need_dwd or need_dbd:
        dh = torch.empty(((num_tokens, r) if gather else (n_adapters, num_tokens, r)), dtype=dtype, device=dev)
        bwd_dh_kernel[lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), n_groups)](
            dy, dy.stride(1), dy.stride(2),
            preact,
            w_up, w_up.stride(1), w_up.stride(2),
            s, stride_s, s_val,
            dh,
            0 if gather else dy.stride(0), w_up.stride(0), stride_s_n,
            perm, counts, starts,
            num_tokens, d, r, tokens_key,
            ACT=activation_id, HAS_S=has_s, GATHER=gather, PRECISION=precision, ACC=acc, R_PAD=r_pad,
        )

    # One adapter: dx in the kernel. A stack: dx = sum_n dh[n] @ w_down[n] is one (T, N r) x (N r, d)
    # matmul over the concatenated bottleneck, done after the kernel.
    fused_dx = need_dx and (n_adapters == 1 or gather)
    # The T-split count depends on the config (its BLOCK_D sets the grid's d-blocks): the kernel reads it
    # off its grid, and the partial-sum workspaces (N x `most` rows) have room for the most any config
    # takes. A batch's groups share the T tokens (one adapter's work in all); a stack's adapters each
    # take all of them.
    splits_of = bwd_split_count(num_tokens, d, 1 if gather else n_adapters, dev)
    most = max(splits_of(c.kwargs) for c in bwd_main_kernel.configs)
    workspace = lambda *shape: torch.empty((n_adapters * most,) + shape, dtype=f32, device=dev)  # noqa: E731
    dx = torch.empty((num_tokens, d), dtype=dtype, device=dev) if fused_dx else None
    dwd_p = workspace(r, d) if need_dwd else None
    dbd_p = workspace(r) if need_dbd else None
    dwu_p = workspace(d, r) if need_dwu else None
    dbu_p = workspace(d) if need_dbu else None
    ds_p = workspace(d) if need_ds else None
    launched = {}  # the split count of the last grid: the autotuner times every config first, then launches its pick

    def grid(meta):
        launched["splits"] = splits_of(meta)
        return triton.cdiv(d, meta["BLOCK_D"]), launched["splits"], n_groups

    if fused_dx or need_dwd or need_dbd or need_dwu or need_dbu or need_ds:
        dummy = preact
        bwd_main_kernel[grid](
            dy, dy.stride(1), dy.stride(2),
            x, x.stride(0), x.stride(1),
            preact,
            dh if dh is not None else dummy,
            w_down, w_down.stride(1), w_down.stride(2),
            w_up, w_up.stride(1), w_up.stride(2),
            b_up if b_up is not None else w_up,
            s, stride_s, s_val,
            dx if dx is not None else dummy,
            *(p if p is not None else dummy for p in (dwd_p, dbd_p, dwu_p, dbu_p, ds_p)),
            0 if gather else dy.stride(0), w_down.stride(0), w_up.stride(0), 0 if b_up is None else b_up.stride(0),
            stride_s_n, perm, counts, starts,
            num_tokens, d, r, tokens_key,
            GATHER=gather,
            ACT=activation_id,
            HAS_BU=b_up is not None,
            HAS_S=has_s,
            RES_IS_X=residual_is_x,
            NEED_DX=fused_dx, NEED_DWD=need_dwd, NEED_DBD=need_dbd,
            NEED_DWU=need_dwu, NEED_DBU=need_dbu, NEED_DS=need_ds,
            PRECISION=precision, ACC=acc, R_PAD=r_pad,
        )
    if need_dx and not fused_dx:
        dh_cat = dh.permute(1, 0, 2).reshape(num_tokens, n_adapters * r)
        dx = dh_cat @ w_down.reshape(n_adapters * r, d)
        if residual_is_x:
            dx += dy.sum(0, dtype=f32).to(dtype)

    def summed(partials):
        """The kernel's partials, the first N x splits rows of a workspace as (N, splits, ...), summed over
        the splits in a fixed order: deterministic."""
        splits = launched["splits"]
        return partials[: n_adapters * splits].view(n_adapters, splits, *partials.shape[1:]).sum(1)

    dw_down = summed(dwd_p).to(dtype) if need_dwd else None
    db_down = summed(dbd_p).to(dtype) if need_dbd else None
    dw_up = summed(dwu_p).to(dtype) if need_dwu else None
    db_up = summed(dbu_p).to(dtype) if need_dbu else None
    dscale = None
    if need_ds:
        ds = summed(ds_p)  # (N, d)
        dscale = (ds.sum(1, keepdim=True) if scale.shape[1] == 1 else ds).to(scale.dtype)
    return dx, dw_down, db_down, dw_up, db_up, dscale


def batched_adapter_forward(x, groups, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_residual,
                            activation_id, save_preact):
    """Each token through its own adapter of the stack (or none): see :func:`multi_adapter_forward`
    with ``groups``. Returns (y (T, d), preact (T, r) or empty); without ``add_residual`` a token's row
    is its adapter's contribution only (0 for tokens with no adapter)."""
    return multi_adapter_forward(
        x, w_down, b_down, w_up, b_up, scale, scale_value, residual, add_residual, activation_id, save_preact, groups=groups
    )


def batched_adapter_backward(dy, x, groups, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id, needs):
    """Backward of :func:`batched_adapter_forward`; dy (T, d)."""
    return multi_adapter_backward(
        dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id, needs, groups=groups
    )


def _as_stack(scale: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if scale is None else scale.reshape(1, -1)


def _unsqueeze(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.unsqueeze(0)


def adapter_forward(x, w_down, b_down, w_up, b_up, scale, scale_value, residual, activation_id, save_preact):
    """One adapter: :func:`multi_adapter_forward` with a stack of one. ``x``/``residual`` (T, d) any
    strides; returns (y (T, d) contiguous, preact (T, r) or empty)."""
    y, preact = multi_adapter_forward(
        x, w_down.unsqueeze(0), _unsqueeze(b_down), w_up.unsqueeze(0), _unsqueeze(b_up), _as_stack(scale),
        scale_value, residual, True, activation_id, save_preact,
    )
    return y[0], (preact[0] if save_preact else preact)


def adapter_backward(dy, x, preact, w_down, b_down, w_up, b_up, scale, scale_value, residual_is_x, activation_id, needs):
    """Fused backward of one adapter; returns (dx, dw_down, db_down, dw_up, db_up, dscale), None where not needed."""
    grads = multi_adapter_backward(
        dy.unsqueeze(0), x, preact.unsqueeze(0) if preact.numel() else preact, w_down.unsqueeze(0),
        _unsqueeze(b_down), w_up.unsqueeze(0), _unsqueeze(b_up), _as_stack(scale), scale_value, residual_is_x,
        activation_id, needs,
    )
    shapes = (x, w_down, b_down, w_up, b_up, scale)
    return tuple(None if g is None else (g if i == 0 else g.reshape(t.shape)) for i, (g, t) in enumerate(zip(grads, shapes)))
