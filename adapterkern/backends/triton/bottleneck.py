"""Fused Triton kernels for the bottleneck adapter: forward, and a two-kernel backward.

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
import triton.language as tl

from ..precision import fp32_matmul_allows_tf32
from ...activations import (
    GELU,
    GELU_TANH,
    GELU_TANH_COEF,
    LEAKY_RELU,
    LEAKY_RELU_SLOPE,
    LINEAR,
    QUICK_GELU,
    QUICK_GELU_ALPHA,
    RELU,
    RELU6,
    SIGMOID,
    SILU,
    SQRT_2_OVER_PI,
    TANH,
)


@triton.jit
def _interpreter_probe():
    pass


# Whether Triton runs kernels defined now in its CPU interpreter: asked of Triton itself (it decides
# at definition time, from its own reading of TRITON_INTERPRET), so adapterkern and Triton agree.
INTERPRET = not isinstance(_interpreter_probe, triton.runtime.JITFunction)

# Activation ids and constants as Triton globals (must be tl.constexpr to be read inside a kernel).
_RELU = tl.constexpr(RELU)
_GELU = tl.constexpr(GELU)
_GELU_TANH = tl.constexpr(GELU_TANH)
_QUICK_GELU = tl.constexpr(QUICK_GELU)
_SILU = tl.constexpr(SILU)
_TANH = tl.constexpr(TANH)
_SIGMOID = tl.constexpr(SIGMOID)
_LEAKY_RELU = tl.constexpr(LEAKY_RELU)
_RELU6 = tl.constexpr(RELU6)
_LINEAR = tl.constexpr(LINEAR)
_SLOPE = tl.constexpr(LEAKY_RELU_SLOPE)
_QG_ALPHA = tl.constexpr(QUICK_GELU_ALPHA)
_GT_COEF = tl.constexpr(GELU_TANH_COEF)
_SQRT_2_OVER_PI = tl.constexpr(SQRT_2_OVER_PI)
_INV_SQRT_2 = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# Constants are tl.constexpr globals; keep the tensor on the left of `*` (in the interpreter,
# constexpr * tensor yields a constexpr wrapping the tensor, which tl.sigmoid rejects).


@triton.jit
def _tanh(x):
    # No libdevice in the interpreter: tanh(x) = 2 * sigmoid(2x) - 1.
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _act(h, ACT: tl.constexpr):
    """act(h), computed in h's (accumulator) dtype."""
    # relu / relu6 via tl.where, not tl.maximum / tl.minimum: those drop NaN (PyTorch propagates it).
    if ACT == _RELU:
        return tl.where(h < 0.0, 0.0, h)
    elif ACT == _GELU:
        return 0.5 * h * (1.0 + tl.erf(h * _INV_SQRT_2))
    elif ACT == _GELU_TANH:
        return 0.5 * h * (1.0 + _tanh((h + h * h * h * _GT_COEF) * _SQRT_2_OVER_PI))
    elif ACT == _QUICK_GELU:
        return h * tl.sigmoid(h * _QG_ALPHA)
    elif ACT == _SILU:
        return h * tl.sigmoid(h)
    elif ACT == _TANH:
        return _tanh(h)
    elif ACT == _SIGMOID:
        return tl.sigmoid(h)
    elif ACT == _LEAKY_RELU:
        return tl.where(h > 0.0, h, h * _SLOPE)
    elif ACT == _RELU6:
        return tl.where(h < 0.0, 0.0, tl.where(h > 6.0, 6.0, h))
    else:
        return h


@triton.jit
def _act_grad(h, ACT: tl.constexpr):
    """d act / d h in h's dtype (at kinks, the subgradient PyTorch's autograd uses)."""
    if ACT == _RELU:
        return tl.where(h > 0.0, 1.0, 0.0)
    elif ACT == _GELU:
        return 0.5 * (1.0 + tl.erf(h * _INV_SQRT_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI
    elif ACT == _GELU_TANH:
        t = _tanh((h + h * h * h * _GT_COEF) * _SQRT_2_OVER_PI)
        return 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * (1.0 + h * h * (3.0 * _GT_COEF)) * _SQRT_2_OVER_PI
    elif ACT == _QUICK_GELU:
        s = tl.sigmoid(h * _QG_ALPHA)
        return s + h * s * (1.0 - s) * _QG_ALPHA
    elif ACT == _SILU:
        s = tl.sigmoid(h)
        return s * (1.0 + h * (1.0 - s))
    elif ACT == _TANH:
        t = _tanh(h)
        return 1.0 - t * t
    elif ACT == _SIGMOID:
        s = tl.sigmoid(h)
        return s * (1.0 - s)
    elif ACT == _LEAKY_RELU:
        return tl.where(h > 0.0, 1.0, _SLOPE.value)
    elif ACT == _RELU6:
        return tl.where((h > 0.0) & (h < 6.0), 1.0, 0.0)
    else:
        return tl.full(h.shape, 1.0, h.dtype)


# The interpreter's dot hands bf16 operands to numpy as their raw uint16 bits (seen with Triton 3.9;
# triton-lang/triton#11584): relative errors of 1e8, no warning. Under the interpreter only, bf16
# operands are widened to fp32 first, which is exact and is what the tensor cores compute (exact
# products, fp32 sums); compiled kernels never take this branch.
_WIDEN_BF16_DOT_OPERANDS = tl.constexpr(INTERPRET)


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, ACC: tl.constexpr):
    """acc + a @ b accumulated in ACC (acc None: a fresh accumulator); every tl.dot goes through here."""
    if _WIDEN_BF16_DOT_OPERANDS:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
        if b.dtype == tl.bfloat16:
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=ACC)


# ----------------------------------------------------------------------------------------------
# Autotuning. Configs are pruned by the accumulator footprint (BLOCK_T x R_PAD fp32 per program);
# the interpreter gets one config, since it would otherwise time every one of them.
# ----------------------------------------------------------------------------------------------


def _configs(block_t, block_d, warps, stages):
    return [
        triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w, num_stages=s)
        for bt in block_t
        for bd in block_d
        for w in warps
        for s in stages
    ]


# ADAPTERKERN_TRITON_CONFIGS=few: two configs per kernel instead of the full sweep, for running the test
# suite on a GPU (every new shape key would otherwise compile and time 48 configs; gpu_check.sh sets it
# for its test stage only, the benchmarks autotune fully). Two, so the choice logic still runs.
_FEW_CONFIGS = os.environ.get("ADAPTERKERN_TRITON_CONFIGS", "") == "few"

if INTERPRET:
    _FWD_CONFIGS = _configs([32], [32], [4], [1])
    _BWD_CONFIGS = _configs([32], [32], [4], [1])
elif _FEW_CONFIGS:
    _FWD_CONFIGS = _configs([16, 64], [32], [4], [2])
    _BWD_CONFIGS = _configs([32, 64], [32], [4], [2])
else:
    _FWD_CONFIGS = _configs([16, 32, 64, 128], [32, 64, 128], [4, 8], [2, 3])
    _BWD_CONFIGS = _configs([32, 64], [32, 64, 128], [4, 8], [2, 3])


def _prune(configs, named_args, **kwargs):
    r_pad = named_args["R_PAD"] if "R_PAD" in named_args else kwargs["R_PAD"]
    t_bucket = named_args["T_BUCKET"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_T"] * r_pad <= 128 * 128  # accumulator registers
        and c.kwargs["BLOCK_D"] * r_pad <= 128 * 128
        and (c.kwargs["BLOCK_T"] <= max(16, t_bucket))  # no 128-row tiles for decode-size T
    ]
    return kept or configs[:1]


_PRUNE = {"early_config_prune": _prune}


def _t_bucket(num_tokens: int) -> int:
    """Autotuning key for T: powers of two up to 16384, so new sequence lengths rarely retune."""
    return min(triton.next_power_of_2(max(num_tokens, 1)), 16384)


# ----------------------------------------------------------------------------------------------
# Token groups. Every kernel works on *groups* of token rows, one adapter per group:
#   stack (GATHER=False): adapter n's group is every token, rows 0..T-1 (multi_adapter; one adapter
#     is a stack of one), and adapter n writes its own (T, D) / (T, R) slab of the outputs;
#   batch (GATHER=True): group g holds the tokens routed to adapter g - 1 (g = 0: "no adapter"), the
#     rows PERM[STARTS[g] : STARTS[g] + COUNTS[g]] (tokens sorted by adapter, computed once per batch
#     into fixed-size buffers), and every group writes its rows of one (T, D) output.
# Grid axis for the group is fixed (N or N + 1) and programs past their group's end exit at once, so
# the launch shape depends only on T and N: a CUDA graph can replay it for any routing.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _group_tile(local, g, PERM, COUNTS, STARTS, T, GATHER: tl.constexpr):
    """(rows (int64 token ids), mask, group size) for the group-local row numbers ``local`` of group g."""
    if GATHER:
        count = tl.load(COUNTS + g).to(tl.int64)
        mask = local < count
        rows = tl.load(PERM + tl.load(STARTS + g).to(tl.int64) + local, mask=mask, other=0).to(tl.int64)
    else:
        count = T  # an int argument: T == 1 arrives as a constexpr
        mask = local < count
        rows = local
    return rows, mask, count


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_FWD_CONFIGS, key=["D", "R_PAD", "T_BUCKET"], prune_configs_by=_PRUNE)
@triton.jit
def _fwd_kernel(
    X, stride_xt, stride_xd,  # (T, D)
    RES, stride_rt, stride_rd,  # (T, D); X itself when residual is x
    WD, stride_wd_r, stride_wd_d,  # (R, D)
    BD,  # (R,)
    WU, stride_wu_d, stride_wu_r,  # (D, R)
    BU,  # (D,)
    S, stride_s, scale_value,  # (1,) or (D,) with stride 0 or 1; scale_value when S is unused
    Y,  # (T, D) contiguous; a stack: (N, T, D)
    H,  # (T, R) contiguous pre-activation (written only when SAVE_H); a stack: (N, T, R)
    stride_wd_n, stride_bd_n, stride_wu_n, stride_bu_n, stride_s_n,  # adapter axis
    PERM, COUNTS, STARTS,  # token groups (GATHER only; see _group_tile)
    T, D, R, T_BUCKET,
    ACT: tl.constexpr,
    HAS_BD: tl.constexpr,
    HAS_BU: tl.constexpr,
    HAS_S: tl.constexpr,
    ADD_RES: tl.constexpr,
    SAVE_H: tl.constexpr,
    GATHER: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    local = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_t, mask_t, count = _group_tile(local, g, PERM, COUNTS, STARTS, T, GATHER)
    if GATHER:
        n = g.to(tl.int64) - 1  # group 0: tokens with no adapter
    else:
        n = g.to(tl.int64)
        Y += n * T * D
        H += n * T * R
    if pid.to(tl.int64) * BLOCK_T < count:
        if n < 0:
            _copy_rows(RES, stride_rt, stride_rd, Y, offs_t, mask_t, D, ADD_RES, BLOCK_T, BLOCK_D)
            if SAVE_H:  # defined values (zeros) in every row of the saved pre-activation
                offs_r = tl.arange(0, R_PAD)
                tl.store(H + offs_t[:, None] * R + offs_r[None, :], tl.zeros((BLOCK_T, R_PAD), dtype=H.dtype.element_ty),
                         mask=mask_t[:, None] & (offs_r < R)[None, :])
        else:
            _fwd_tile(
                X, stride_xt, stride_xd, RES, stride_rt, stride_rd,
                WD + n * stride_wd_n, stride_wd_r, stride_wd_d, BD + n * stride_bd_n,
                WU + n * stride_wu_n, stride_wu_d, stride_wu_r, BU + n * stride_bu_n,
                S + n * stride_s_n, stride_s, scale_value, Y, H, offs_t, mask_t, D, R,
                ACT, HAS_BD, HAS_BU, HAS_S, ADD_RES, SAVE_H, PRECISION, ACC, R_PAD, BLOCK_T, BLOCK_D,
            )


@triton.jit
def _copy_rows(SRC, stride_st, stride_sd, DST, rows, mask_t, D, COPY: tl.constexpr, BLOCK_T: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """DST[rows, :] = SRC[rows, :] (COPY) or 0 (DST contiguous (T, D)): tokens that no adapter touches."""
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask = mask_t[:, None] & (offs_d < D)[None, :]
        if COPY:
            v = tl.load(SRC + rows[:, None] * stride_st + offs_d[None, :] * stride_sd, mask=mask, other=0.0)
        else:
            v = tl.zeros((BLOCK_T, BLOCK_D), dtype=DST.dtype.element_ty)
        tl.store(DST + rows[:, None] * D + offs_d[None, :], v.to(DST.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_tile(
    X, stride_xt, stride_xd, RES, stride_rt, stride_rd,
    WD, stride_wd_r, stride_wd_d, BD, WU, stride_wu_d, stride_wu_r, BU,
    S, stride_s, scale_value, Y, H, offs_t, mask_t, D, R,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_S: tl.constexpr,
    ADD_RES: tl.constexpr, SAVE_H: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One adapter on the token rows ``offs_t`` (int64 ids, masked by ``mask_t``): rows of Y and H."""
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R

    # h = x @ w_down.T : reduce over d in BLOCK_D chunks, the (BLOCK_T, R_PAD) tile stays in registers.
    h = tl.zeros((BLOCK_T, R_PAD), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        x = tl.load(
            X + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
            mask=mask_t[:, None] & mask_d[None, :], other=0.0,
        )
        wd_t = tl.load(  # w_down[:, d-chunk].T  -> (BLOCK_D, R_PAD)
            WD + offs_r[None, :] * stride_wd_r + offs_d[:, None] * stride_wd_d,
            mask=mask_d[:, None] & mask_r[None, :], other=0.0,
        )
        h = _dot(x, wd_t, h, PRECISION, ACC)
    if HAS_BD:
        h += tl.load(BD + offs_r, mask=mask_r, other=0.0).to(ACC)[None, :]
    if SAVE_H:
        tl.store(H + offs_t[:, None] * R + offs_r[None, :], h.to(H.dtype.element_ty),
                 mask=mask_t[:, None] & mask_r[None, :])
    # Padded bottleneck columns hold act(0) (non-zero for sigmoid): harmless, w_up's padded rows are 0.
    a = _act(h, ACT).to(WU.dtype.element_ty)

    # y = res + s * (a @ w_up.T + b_up), one BLOCK_D slab of output columns at a time.
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        mask_td = mask_t[:, None] & mask_d[None, :]
        wu_t = tl.load(  # w_up[d-chunk, :].T -> (R_PAD, BLOCK_D)
            WU + offs_d[None, :] * stride_wu_d + offs_r[:, None] * stride_wu_r,
            mask=mask_r[:, None] & mask_d[None, :], other=0.0,
        )
        u = _dot(a, wu_t, None, PRECISION, ACC)
        if HAS_BU:
            u += tl.load(BU + offs_d, mask=mask_d, other=0.0).to(ACC)[None, :]
        if HAS_S:
            u *= tl.load(S + offs_d * stride_s, mask=mask_d, other=0.0).to(ACC)[None, :]
        else:
            u *= scale_value
        if ADD_RES:
            res = tl.load(RES + offs_t[:, None] * stride_rt + offs_d[None, :] * stride_rd, mask=mask_td, other=0.0)
            y = res.to(ACC) + u
        else:
            y = u
        tl.store(Y + offs_t[:, None] * D + offs_d[None, :], y.to(Y.dtype.element_ty), mask=mask_td)


# ----------------------------------------------------------------------------------------------
# Backward kernel 1: dh = (s * dy) @ w_up * act'(h), one BLOCK_T row block per program.
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_BWD_CONFIGS, key=["D", "R_PAD", "T_BUCKET"], prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dh_kernel(
    DY, stride_dyt, stride_dyd,  # (T, D)
    H,  # (T, R) contiguous
    WU, stride_wu_d, stride_wu_r,  # (D, R)
    S, stride_s, scale_value,
    DH,  # (T, R) contiguous, output
    stride_dy_n, stride_wu_n, stride_s_n,  # adapter axis; a stack's H and DH are (N, T, R) contiguous
    PERM, COUNTS, STARTS,  # token groups (GATHER only)
    T, D, R, T_BUCKET,
    ACT: tl.constexpr,
    HAS_S: tl.constexpr,
    GATHER: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    g = tl.program_id(1)
    offs_t, mask_t, count = _group_tile(pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T), g, PERM, COUNTS, STARTS, T, GATHER)
    if GATHER:
        n = g.to(tl.int64) - 1
    else:
        n = g.to(tl.int64)
        DY += n * stride_dy_n
        H += n * T * R
        DH += n * T * R
    if (n >= 0) & (pid.to(tl.int64) * BLOCK_T < count):
        _bwd_dh_tile(DY, stride_dyt, stride_dyd, H, WU + n * stride_wu_n, stride_wu_d, stride_wu_r,
                     S + n * stride_s_n, stride_s, scale_value, DH, offs_t, mask_t, D, R,
                     ACT, HAS_S, PRECISION, ACC, R_PAD, BLOCK_T, BLOCK_D)


@triton.jit
def _bwd_dh_tile(
    DY, stride_dyt, stride_dyd, H, WU, stride_wu_d, stride_wu_r, S, stride_s, scale_value, DH,
    offs_t, mask_t, D, R,
    ACT: tl.constexpr, HAS_S: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dh rows of one adapter for the token rows ``offs_t``."""
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    mask_tr = mask_t[:, None] & mask_r[None, :]

    da = tl.zeros((BLOCK_T, R_PAD), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        dz = tl.load(
            DY + offs_t[:, None] * stride_dyt + offs_d[None, :] * stride_dyd,
            mask=mask_t[:, None] & mask_d[None, :], other=0.0,
        ).to(ACC)
        if HAS_S:
            dz *= tl.load(S + offs_d * stride_s, mask=mask_d, other=0.0).to(ACC)[None, :]
        else:
            dz *= scale_value
        wu = tl.load(  # w_up[d-chunk, :] -> (BLOCK_D, R_PAD)
            WU + offs_d[:, None] * stride_wu_d + offs_r[None, :] * stride_wu_r,
            mask=mask_d[:, None] & mask_r[None, :], other=0.0,
        )
        da = _dot(dz.to(WU.dtype.element_ty), wu, da, PRECISION, ACC)
    h = tl.load(H + offs_t[:, None] * R + offs_r[None, :], mask=mask_tr, other=0.0).to(ACC)
    dh = da * _act_grad(h, ACT)
    tl.store(DH + offs_t[:, None] * R + offs_r[None, :], dh.to(DH.dtype.element_ty), mask=mask_tr)


# ----------------------------------------------------------------------------------------------
# Backward kernel 2: dx, and per-T-split partial sums of every parameter gradient.
# Grid: (cdiv(D, BLOCK_D), SPLITS); program (pid_d, pid_s) walks its contiguous range of T tiles.
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=_BWD_CONFIGS, key=["D", "R_PAD", "T_BUCKET"], prune_configs_by=_PRUNE)
@triton.jit
def _bwd_main_kernel(
    DY, stride_dyt, stride_dyd,  # (T, D)
    X, stride_xt, stride_xd,  # (T, D)
    H,  # (T, R) contiguous pre-activation
    DH,  # (T, R) contiguous, from kernel 1
    WD, stride_wd_r, stride_wd_d,  # (R, D)
    WU, stride_wu_d, stride_wu_r,  # (D, R)
    BU,  # (D,)
    S, stride_s, scale_value,
    DX,  # (T, D) contiguous output
    DWD_P,  # (SPLITS, R, D) partials in ACC dtype
    DBD_P,  # (SPLITS, R) fp32 partials
    DWU_P,  # (SPLITS, D, R) fp32 partials
    DBU_P,  # (SPLITS, D) fp32 partials
    DS_P,  # (SPLITS, D) fp32 partials of sum_T dy * u
    stride_dy_n, stride_wd_n, stride_wu_n, stride_bu_n, stride_s_n,  # adapter axis (grid axis 2)
    PERM, COUNTS, STARTS,  # token groups (GATHER only)
    T, D, R, T_BUCKET, SPLITS,
    GATHER: tl.constexpr,
    ACT: tl.constexpr,
    HAS_BU: tl.constexpr,
    HAS_S: tl.constexpr,
    RES_IS_X: tl.constexpr,
    NEED_DX: tl.constexpr,
    NEED_DWD: tl.constexpr,
    NEED_DBD: tl.constexpr,
    NEED_DWU: tl.constexpr,
    NEED_DBU: tl.constexpr,
    NEED_DS: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_d = tl.program_id(0)
    pid_s = tl.program_id(1)
    g = tl.program_id(2)
    # Adapter n: its dy, pre-activation, dh, weights and partial sums. dx of a stack (the sum over
    # adapters) is left to the host (NEED_DX is only set for one adapter, or for a batch, where every
    # token row belongs to one group).
    if GATHER:
        n = g.to(tl.int64) - 1
        count = tl.load(COUNTS + g).to(tl.int64)
    else:
        n = g.to(tl.int64)
        count = T
        DY += n * stride_dy_n
        H += n * T * R
        DH += n * T * R
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    num_tiles = tl.cdiv(count, BLOCK_T)
    tiles_per_split = tl.cdiv(num_tiles, SPLITS)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    if n < 0:
        if NEED_DX:  # tokens with no adapter: dx = dy (the residual is x) or 0
            for t_start in range(tile_lo * BLOCK_T, tile_hi * BLOCK_T, BLOCK_T):
                local = t_start + tl.arange(0, BLOCK_T).to(tl.int64)
                offs_t, mask_t, _ = _group_tile(local, g, PERM, COUNTS, STARTS, T, GATHER)
                mask_td = mask_t[:, None] & mask_d[None, :]
                if RES_IS_X:
                    dx = tl.load(DY + offs_t[:, None] * stride_dyt + offs_d[None, :] * stride_dyd, mask=mask_td, other=0.0)
                else:
                    dx = tl.zeros((BLOCK_T, BLOCK_D), dtype=ACC)
                tl.store(DX + offs_t[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mask_td)
    else:
        _bwd_main_adapter(
            DY, stride_dyt, stride_dyd, X, stride_xt, stride_xd, H, DH,
            WD + n * stride_wd_n, stride_wd_r, stride_wd_d, WU + n * stride_wu_n, stride_wu_d, stride_wu_r,
            BU + n * stride_bu_n, S + n * stride_s_n, stride_s, scale_value, DX,
            DWD_P + n * SPLITS * R * D, DBD_P + n * SPLITS * R, DWU_P + n * SPLITS * D * R,
            DBU_P + n * SPLITS * D, DS_P + n * SPLITS * D,
            PERM, COUNTS, STARTS, g, pid_d, pid_s, tile_lo, tile_hi, T, D, R, GATHER,
            ACT, HAS_BU, HAS_S, RES_IS_X, NEED_DX, NEED_DWD, NEED_DBD, NEED_DWU, NEED_DBU, NEED_DS,
            PRECISION, ACC, R_PAD, BLOCK_T, BLOCK_D,
        )


@triton.jit
def _bwd_main_adapter(
    DY, stride_dyt, stride_dyd, X, stride_xt, stride_xd, H, DH,
    WD, stride_wd_r, stride_wd_d, WU, stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value, DX,
    DWD_P, DBD_P, DWU_P, DBU_P, DS_P,
    PERM, COUNTS, STARTS, g, pid_d, pid_s, tile_lo, tile_hi, T, D, R,
    GATHER: tl.constexpr, ACT: tl.constexpr, HAS_BU: tl.constexpr, HAS_S: tl.constexpr,
    RES_IS_X: tl.constexpr, NEED_DX: tl.constexpr, NEED_DWD: tl.constexpr, NEED_DBD: tl.constexpr,
    NEED_DWU: tl.constexpr, NEED_DBU: tl.constexpr, NEED_DS: tl.constexpr,
    PRECISION: tl.constexpr, ACC: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One adapter's share of backward kernel 2: the group's tiles tile_lo..tile_hi, one d-block."""
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    mask_rd = mask_r[:, None] & mask_d[None, :]
    dtype = WD.dtype.element_ty

    wd = tl.load(WD + offs_r[:, None] * stride_wd_r + offs_d[None, :] * stride_wd_d, mask=mask_rd, other=0.0)
    wu_t = tl.load(WU + offs_d[None, :] * stride_wu_d + offs_r[:, None] * stride_wu_r, mask=mask_rd, other=0.0)
    if HAS_S:
        s = tl.load(S + offs_d * stride_s, mask=mask_d, other=0.0).to(ACC)
    if HAS_BU:
        bu = tl.load(BU + offs_d, mask=mask_d, other=0.0).to(ACC)

    acc_dwd = tl.zeros((R_PAD, BLOCK_D), dtype=ACC)
    acc_dwu = tl.zeros((BLOCK_D, R_PAD), dtype=ACC)
    acc_dbd = tl.zeros((R_PAD,), dtype=ACC)
    acc_dbu = tl.zeros((BLOCK_D,), dtype=ACC)
    acc_ds = tl.zeros((BLOCK_D,), dtype=ACC)

    for t_start in range(tile_lo * BLOCK_T, tile_hi * BLOCK_T, BLOCK_T):
        local = t_start + tl.arange(0, BLOCK_T).to(tl.int64)  # int64: T * stride may pass 2^31
        offs_t, mask_t, _ = _group_tile(local, g, PERM, COUNTS, STARTS, T, GATHER)
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tr = mask_t[:, None] & mask_r[None, :]
        dy = tl.load(DY + offs_t[:, None] * stride_dyt + offs_d[None, :] * stride_dyd, mask=mask_td, other=0.0)
        dy = dy.to(ACC)
        if NEED_DX or NEED_DWD or NEED_DBD:
            dh = tl.load(DH + offs_t[:, None] * R + offs_r[None, :], mask=mask_tr, other=0.0)
            if NEED_DX:
                dx = _dot(dh, wd, None, PRECISION, ACC)
                if RES_IS_X:
                    dx += dy
                tl.store(DX + offs_t[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mask_td)
            if NEED_DWD:
                x = tl.load(X + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd, mask=mask_td, other=0.0)
                acc_dwd = _dot(tl.trans(dh), x, acc_dwd, PRECISION, ACC)
            if NEED_DBD:
                acc_dbd += tl.sum(dh.to(ACC), axis=0)
        if NEED_DWU or NEED_DBU:
            if HAS_S:
                dz = dy * s[None, :]
            else:
                dz = dy * scale_value
            if NEED_DWU:
                h = tl.load(H + offs_t[:, None] * R + offs_r[None, :], mask=mask_tr, other=0.0).to(ACC)
                # Zero the padded / out-of-range rows of a: act(0) may be non-zero (sigmoid).
                a = tl.where(mask_tr, _act(h, ACT), 0.0).to(dtype)
                acc_dwu = _dot(tl.trans(dz.to(dtype)), a, acc_dwu, PRECISION, ACC)
            if NEED_DBU:
                acc_dbu += tl.sum(dz, axis=0)
        if NEED_DS:
            h = tl.load(H + offs_t[:, None] * R + offs_r[None, :], mask=mask_tr, other=0.0).to(ACC)
            a = tl.where(mask_tr, _act(h, ACT), 0.0).to(dtype)
            u = _dot(a, wu_t, None, PRECISION, ACC)
            if HAS_BU:
                u += bu[None, :]
            acc_ds += tl.sum(dy * u, axis=0)

    split = pid_s.to(tl.int64)
    if NEED_DWD:
        tl.store(DWD_P + split * R * D + offs_r[:, None] * D + offs_d[None, :], acc_dwd, mask=mask_rd)
    if NEED_DWU:
        tl.store(DWU_P + split * D * R + offs_d[:, None] * R + offs_r[None, :], acc_dwu,
                 mask=mask_d[:, None] & mask_r[None, :])
    if NEED_DBD:
        if pid_d == 0:
            tl.store(DBD_P + split * R + offs_r, acc_dbd, mask=mask_r)
    if NEED_DBU:
        tl.store(DBU_P + split * D + offs_d, acc_dbu, mask=mask_d)
    if NEED_DS:
        tl.store(DS_P + split * D + offs_d, acc_ds, mask=mask_d)


# ----------------------------------------------------------------------------------------------
# Host wrappers (the kernel-backend interface of adapterkern.backends)
# ----------------------------------------------------------------------------------------------


def _precision(dtype: torch.dtype):
    """fp32 matches torch's matmul (IEEE unless TF32 is allowed, see adapterkern.backends.precision).
    Other dtypes take Triton's default (the setting only applies to fp32 operands)."""
    if dtype == torch.float32:
        return "tf32" if fp32_matmul_allows_tf32() else "ieee"
    return None


def _acc_dtype(dtype: torch.dtype):
    """Accumulate in fp32; float64 inputs (gradcheck) accumulate in fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _r_pad(r: int) -> int:
    return max(16, triton.next_power_of_2(r))


def _scale_args(scale: Optional[torch.Tensor], scale_value: float, like: torch.Tensor):
    """(pointer, stride over d, stride over adapters, value, HAS_S) for a (N, 1) / (N, D) scale or None."""
    if scale is None:
        return like, 0, 0, float(scale_value), False
    return scale, (0 if scale.shape[1] == 1 else scale.stride(1)), scale.stride(0), 1.0, True


def _num_splits(num_tokens: int, d: int, device: torch.device) -> int:
    """How many T-splits the weight-gradient kernel uses: enough programs to fill the GPU, with at
    least ~4 tiles of 64 tokens per split so the partial-sum buffers stay small next to x."""
    if device.type == "cuda":
        programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs_wanted = 3  # interpreter: small, uneven splits exercise the split logic in tests
    d_blocks = triton.cdiv(d, 64)
    splits = triton.cdiv(programs_wanted, d_blocks)
    return max(1, min(splits, triton.cdiv(num_tokens, 256 if device.type == "cuda" else 32)))


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
    stack = () if groups is not None else (n_adapters,)
    y = torch.empty(stack + (num_tokens, d), dtype=x.dtype, device=x.device)
    preact = torch.empty(stack + (num_tokens, r) if save_preact else (0,), dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return y, preact
    res = x if residual is None else residual
    s, stride_s, stride_s_n, s_val, has_s = _scale_args(scale, scale_value, w_up)
    perm, counts, starts = groups if groups is not None else (y, y, y)
    n_groups = n_adapters + 1 if groups is not None else n_adapters
    grid = lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), n_groups)  # noqa: E731
    _fwd_kernel[grid](
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
        num_tokens, d, r, _t_bucket(num_tokens),
        ACT=activation_id,
        HAS_BD=b_down is not None,
        HAS_BU=b_up is not None,
        HAS_S=has_s,
        ADD_RES=add_residual,
        SAVE_H=save_preact,
        GATHER=groups is not None,
        PRECISION=_precision(x.dtype),
        ACC=_acc_dtype(x.dtype),
        R_PAD=_r_pad(r),
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
    precision = _precision(dtype)
    acc = _acc_dtype(dtype)
    r_pad = _r_pad(r)
    t_bucket = _t_bucket(num_tokens)

    gather = groups is not None
    if gather:  # one (T, d) dy: give it a stack axis of stride 0 so one set of arguments serves both forms
        dy = dy.unsqueeze(0)
    perm, counts, starts = groups if gather else (preact, preact, preact)
    n_groups = n_adapters + 1 if gather else n_adapters
    dh = None
    if need_dx or need_dwd or need_dbd:
        dh = torch.empty(((num_tokens, r) if gather else (n_adapters, num_tokens, r)), dtype=dtype, device=dev)
        _bwd_dh_kernel[lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]), n_groups)](
            dy, dy.stride(1), dy.stride(2),
            preact,
            w_up, w_up.stride(1), w_up.stride(2),
            s, stride_s, s_val,
            dh,
            0 if gather else dy.stride(0), w_up.stride(0), stride_s_n,
            perm, counts, starts,
            num_tokens, d, r, t_bucket,
            ACT=activation_id, HAS_S=has_s, GATHER=gather, PRECISION=precision, ACC=acc, R_PAD=r_pad,
        )

    # One adapter: dx in the kernel. A stack: dx = sum_n dh[n] @ w_down[n] is one (T, N r) x (N r, d)
    # matmul over the concatenated bottleneck, done after the kernel.
    fused_dx = need_dx and (n_adapters == 1 or gather)
    splits = _num_splits(num_tokens, d, dev)
    dx = torch.empty((num_tokens, d), dtype=dtype, device=dev) if fused_dx else None
    dwd_p = torch.empty((n_adapters, splits, r, d), dtype=f32, device=dev) if need_dwd else None
    dbd_p = torch.empty((n_adapters, splits, r), dtype=f32, device=dev) if need_dbd else None
    dwu_p = torch.empty((n_adapters, splits, d, r), dtype=f32, device=dev) if need_dwu else None
    dbu_p = torch.empty((n_adapters, splits, d), dtype=f32, device=dev) if need_dbu else None
    ds_p = torch.empty((n_adapters, splits, d), dtype=f32, device=dev) if need_ds else None
    if fused_dx or need_dwd or need_dbd or need_dwu or need_dbu or need_ds:
        dummy = preact
        _bwd_main_kernel[lambda meta: (triton.cdiv(d, meta["BLOCK_D"]), splits, n_groups)](
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
            num_tokens, d, r, t_bucket, splits,
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

    # Fixed-order reductions over the T-splits: deterministic.
    dw_down = dwd_p.sum(1).to(dtype) if need_dwd else None
    db_down = dbd_p.sum(1).to(dtype) if need_dbd else None
    dw_up = dwu_p.sum(1).to(dtype) if need_dwu else None
    db_up = dbu_p.sum(1).to(dtype) if need_dbu else None
    dscale = None
    if need_ds:
        ds = ds_p.sum(1)  # (N, d)
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
