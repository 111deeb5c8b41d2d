"""The Triton building blocks every adapter kernel shares: the interpreter probe, activations and their
derivatives, the one ``dot``, the down-projection loop and the up-projection slab, the autotuning configs,
and the token-group tile of the stack / batched forms.

Jit functions here are called from the kernels of :mod:`adapterkern.backends.triton.kernels` and
:mod:`adapterkern.backends.triton.add_norm`.
"""
from __future__ import annotations

import os
from typing import Optional

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
def act(h, ACT: tl.constexpr):
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
def act_grad(h, ACT: tl.constexpr):
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
def dot(a, b, acc, PRECISION: tl.constexpr, ACC: tl.constexpr):
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


@triton.jit
def down_projection(
    X, stride_xt, stride_xd, WD, stride_wd_r, stride_wd_d, offs_t, mask_t, d_begin, d_end, R,
    PRECISION: tl.constexpr, ACC: tl.constexpr, R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``x[rows, d_begin:d_end] @ w_down[:, d_begin:d_end].T``: (BLOCK_T, R_PAD) in ACC, reduced over d
    in BLOCK_D chunks (the tile stays in registers)."""
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    h = tl.zeros((BLOCK_T, R_PAD), dtype=ACC)
    for d0 in range(d_begin, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_end
        x = tl.load(
            X + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd,
            mask=mask_t[:, None] & mask_d[None, :], other=0.0,
        )
        wd_t = tl.load(  # w_down[:, d-chunk].T  -> (BLOCK_D, R_PAD)
            WD + offs_r[None, :] * stride_wd_r + offs_d[:, None] * stride_wd_d,
            mask=mask_d[:, None] & mask_r[None, :], other=0.0,
        )
        h = dot(x, wd_t, h, PRECISION, ACC)
    return h


@triton.jit
def up_slab(a, WU, stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value, offs_d, mask_d, R,
            HAS_BU: tl.constexpr, HAS_S: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
            R_PAD: tl.constexpr):
    """``s * (a @ w_up[offs_d].T + b_up)`` for one slab of output columns, in ACC: ``a`` the (rows, R_PAD)
    activation in w_up's dtype, ``S`` the scale vector (stride ``stride_s``) when HAS_S, else ``scale_value``."""
    offs_r = tl.arange(0, R_PAD)
    wu_t = tl.load(  # w_up[d-chunk, :].T -> (R_PAD, BLOCK_D)
        WU + offs_d[None, :] * stride_wu_d + offs_r[:, None] * stride_wu_r,
        mask=(offs_r < R)[:, None] & mask_d[None, :], other=0.0,
    )
    u = dot(a, wu_t, None, PRECISION, ACC)
    if HAS_BU:
        u += tl.load(BU + offs_d, mask=mask_d, other=0.0).to(ACC)[None, :]
    if HAS_S:
        u *= tl.load(S + offs_d * stride_s, mask=mask_d, other=0.0).to(ACC)[None, :]
    else:
        u *= scale_value
    return u


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

# The backward of a wide bottleneck (R_PAD >= 256) in fp32 / fp64 stages tiles of 4- and 8-byte
# operands: every multi-stage config needs more shared memory than an A100 (163 KiB) or an H100 /
# H200 (227 KiB) has (332 KiB at R_PAD 512), so those launches also get single-stage 16-row configs,
# which fit (tests/test_backends_triton_compile.py compiles them and checks). Only they keep them.
_WIDE_BWD_R_PAD = 256

if INTERPRET:
    FWD_CONFIGS = _configs([32], [32], [4], [1])
    BWD_CONFIGS = _configs([32], [32], [4], [1])
    _WIDE_BWD_CONFIGS = []
elif _FEW_CONFIGS:
    FWD_CONFIGS = _configs([16, 64], [32], [4], [2])
    _WIDE_BWD_CONFIGS = _configs([16], [32], [4], [1])
    BWD_CONFIGS = _configs([32, 64], [32], [4], [2]) + _WIDE_BWD_CONFIGS
else:
    FWD_CONFIGS = _configs([16, 32, 64, 128], [32, 64, 128], [4, 8], [2, 3])
    _WIDE_BWD_CONFIGS = _configs([16], [32], [4, 8], [1])
    BWD_CONFIGS = _configs([32, 64], [32, 64, 128], [4, 8], [2, 3]) + _WIDE_BWD_CONFIGS
_WIDE_BWD_IDS = {id(c) for c in _WIDE_BWD_CONFIGS}


def _prune(configs, named_args, **kwargs):
    r_pad = named_args["R_PAD"] if "R_PAD" in named_args else kwargs["R_PAD"]
    t_bucket = named_args["T_BUCKET"]
    dy = named_args.get("DY")  # the backward kernels' first tensor; its element size sets the tile bytes
    wide = dy is not None and dy.element_size() >= 4 and r_pad >= _WIDE_BWD_R_PAD
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_T"] * r_pad <= 128 * 128  # accumulator registers
        and c.kwargs["BLOCK_D"] * r_pad <= 128 * 128
        and (c.kwargs["BLOCK_T"] <= max(16, t_bucket))  # no 128-row tiles for decode-size T
        and (wide or id(c) not in _WIDE_BWD_IDS)
    ]
    return kept or configs[:1]


PRUNE = {"early_config_prune": _prune}


def t_bucket(num_tokens: int) -> int:
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
def group_bounds(g, COUNTS, STARTS, T):
    """(start, count) of group g in PERM, clamped to [0, T]: TokenGroups are consistent by construction,
    and with the clamps no value of COUNTS / STARTS makes a kernel reach outside PERM or loop past T."""
    start = tl.minimum(tl.maximum(tl.load(STARTS + g).to(tl.int64), 0), T)
    count = tl.minimum(tl.maximum(tl.load(COUNTS + g).to(tl.int64), 0), T - start)
    return start, count


@triton.jit
def group_tile(local, g, PERM, COUNTS, STARTS, T, GATHER: tl.constexpr):
    """(rows (int64 token ids), mask, group size) for the group-local row numbers ``local`` of group g."""
    if GATHER:
        start, count = group_bounds(g, COUNTS, STARTS, T)
        mask = local < count
        rows = tl.load(PERM + start + local, mask=mask, other=0).to(tl.int64)
        mask = mask & (rows >= 0) & (rows < T)  # no row outside the tensors, whatever PERM holds
        rows = tl.where(mask, rows, 0)
    else:
        count = T  # an int argument: T == 1 arrives as a constexpr
        mask = local < count
        rows = local
    return rows, mask, count


# ----------------------------------------------------------------------------------------------
# Host side: the constexprs every launcher derives from its tensors
# ----------------------------------------------------------------------------------------------


def dot_precision(dtype: torch.dtype):
    """fp32 matches torch's matmul (IEEE unless TF32 is allowed, see adapterkern.backends.precision).
    Other dtypes take Triton's default (the setting only applies to fp32 operands)."""
    if dtype == torch.float32:
        return "tf32" if fp32_matmul_allows_tf32() else "ieee"
    return None


def acc_dtype(dtype: torch.dtype):
    """Accumulate in fp32; float64 inputs (gradcheck) accumulate in fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def padded_rank(r: int) -> int:
    """R_PAD: the bottleneck padded to a power of two of at least 16 (every tl.dot dim >= 16)."""
    return max(16, triton.next_power_of_2(r))


def unit_stride(vector: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bias or norm vector with unit stride along its last dim, as the kernels index it (a copy of r
    or d elements when it is a strided view); None stays None."""
    return vector if vector is None or vector.stride(-1) == 1 else vector.contiguous()
