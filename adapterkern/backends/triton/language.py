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


# ADAPTERKERN_TRITON_CONFIGS=few: two configs per kernel instead of the full sweep (the backward kernels:
# one or two per width and element size, _FEW_BWD), for running the test suite on a GPU (every new shape
# key would otherwise compile and time 48 configs; gpu_check.sh sets it for its test stage only, the
# benchmarks autotune fully). Two, so the choice logic still runs.
_FEW_CONFIGS = os.environ.get("ADAPTERKERN_TRITON_CONFIGS", "") == "few"

# The backward kernels' spaces: (BLOCK_T, BLOCK_D, warps, stages) -> {operand element size (2: bf16 /
# fp16, 4: fp32, 8: fp64): (narrowest, widest) R_PAD the prune gives it at}: where ptxas allocates it
# without register spills on sm_80 and sm_90 (ptxas -v on AOT compiles of the general kernel, no stride
# specialized; tests/test_backends_triton_compile.py compiles every config the prunes keep, bf16 and fp32
# at the widths where these tables change, fp16 and fp64 at 16, and fails on a spill).
# bwd_main_kernel keeps two (R_PAD, BLOCK_D) fp32 accumulators and the w_down / w_up tiles (dot operands,
# a copy per warp) live across its token loop, beside each step's (BLOCK_T, BLOCK_D) and (BLOCK_T, R_PAD)
# tiles: 64-row tiles on 4 warps (one warpgroup: wgmma) and 128-wide D blocks spill even at R_PAD 16,
# fp32 / fp64 fit only 16-row tiles, and from R_PAD 128 so does bf16 / fp16. At R_PAD 512 no config is
# spill-free (nor at 256 in bf16 / fp16 on sm_80): the 16-row ones there spill least (the test's
# allow-list), and the autotuner takes the faster. bwd_dh_kernel keeps one (BLOCK_T, R_PAD) accumulator:
# tiles up to 64 x 64 on 8 warps fit to R_PAD 128, 32 x 32 to 256, 16 x 32 on 8 warps at 512.
# Every width has a 16-row config (a short T takes it: no tile longer than the tokens, see _bwd_prune);
# they take one stage: wide fp32 / fp64 tiles in several stages overflow shared memory.
_ANY = 1 << 30  # no widest R_PAD
_BWD_MAIN_SPACE = {
    (32, 32, 4, 2): {2: (16, 16)},
    (64, 32, 8, 2): {2: (16, 16)},
    (32, 32, 8, 2): {2: (16, 64)},
    (32, 64, 8, 2): {2: (16, 64)},
    (16, 64, 8, 1): {4: (16, 16)},
    (16, 32, 8, 1): {2: (16, _ANY), 4: (32, 64)},  # fp32 at R_PAD 16: 32 bytes of spills with Triton 3.6
    (16, 16, 8, 1): {2: (512, _ANY), 4: (128, _ANY), 8: (16, _ANY)},
}
_BWD_DH_SPACE = {
    **{(bt, bd, 8, s): {2: (16, 128), 4: (16, 16)} for bt, bd in ((32, 64), (64, 32)) for s in (2, 3)},
    **{(bt, bd, 8, s): {2: (16, 64), 4: (16, 16)} for bt, bd in ((64, 64), (32, 128)) for s in (2, 3)},
    **{(32, 64, 4, s): {2: (16, 64), 4: (16, 16)} for s in (2, 3)},
    **{(32, 32, 8, s): {2: (16, 256), 4: (16, 256), 8: (16, 16)} for s in (2, 3)},
    (16, 32, 4, 1): {2: (16, 256), 4: (16, 256), 8: (16, 256)},
    (16, 32, 8, 1): {2: (512, _ANY), 4: (512, _ANY), 8: (512, _ANY)},
}
_FEW_BWD = {(32, 32, 8, 2), (16, 32, 8, 1), (16, 16, 8, 1), (16, 32, 4, 1)}


def _space(table):
    keys = [k for k in table if not _FEW_CONFIGS or k in _FEW_BWD]
    return [triton.Config({"BLOCK_T": bt, "BLOCK_D": bd}, num_warps=w, num_stages=s) for bt, bd, w, s in keys]


# ADD_NORM_CONFIGS: add_norm_kernel's; fwd_kernel's are the same tiles (FWD_CONFIGS) with the stage count
# also given as the constexpr STAGES, which its up-projection loop pipelines with (see kernels._up_projection).
if INTERPRET:
    ADD_NORM_CONFIGS = _configs([32], [32], [4], [1])
    BWD_MAIN_CONFIGS = BWD_DH_CONFIGS = _configs([32], [32], [4], [1])
elif _FEW_CONFIGS:
    ADD_NORM_CONFIGS = _configs([16, 64], [32], [4], [2])
    BWD_MAIN_CONFIGS, BWD_DH_CONFIGS = _space(_BWD_MAIN_SPACE), _space(_BWD_DH_SPACE)
else:
    ADD_NORM_CONFIGS = _configs([16, 32, 64, 128], [32, 64, 128], [4, 8], [2, 3])
    BWD_MAIN_CONFIGS, BWD_DH_CONFIGS = _space(_BWD_MAIN_SPACE), _space(_BWD_DH_SPACE)
FWD_CONFIGS = [triton.Config({**c.kwargs, "STAGES": c.num_stages}, num_warps=c.num_warps, num_stages=c.num_stages)
               for c in ADD_NORM_CONFIGS]


def _prune(configs, named_args, **kwargs):
    r_pad = named_args["R_PAD"] if "R_PAD" in named_args else kwargs["R_PAD"]
    t_bucket = named_args["T_BUCKET"]
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_T"] * r_pad <= 128 * 128  # accumulator registers
        and c.kwargs["BLOCK_D"] * r_pad <= 128 * 128
        # at most 64 fp32 values of the (BLOCK_T, BLOCK_D) output tile per thread: 128 x 128 on 4 warps spills
        # (ptxas: 836 bytes at R_PAD 64 in bf16, benchmarks/results/triton_sass_report.txt)
        and c.kwargs["BLOCK_T"] * c.kwargs["BLOCK_D"] <= 64 * 32 * c.num_warps
        and (c.kwargs["BLOCK_T"] <= max(16, t_bucket))  # no 128-row tiles for decode-size T
    ]
    return kept or configs[:1]


def _bwd_prune(table):
    """The early prune of a backward kernel over ``table`` (see _BWD_MAIN_SPACE): the configs given at this
    R_PAD and DY's element size, no tile longer than the tokens (a 16-row one is given at every width)."""

    def given(config, r_pad, size):
        lo, hi = table[(config.kwargs["BLOCK_T"], config.kwargs["BLOCK_D"], config.num_warps, config.num_stages)].get(
            size, (0, -1))
        return lo <= r_pad <= hi

    def prune(configs, named_args, **kwargs):
        r_pad = named_args["R_PAD"] if "R_PAD" in named_args else kwargs["R_PAD"]
        size = named_args["DY"].element_size()
        return [c for c in configs
                if given(c, r_pad, size) and c.kwargs["BLOCK_T"] <= max(16, named_args["T_BUCKET"])]

    return {"early_config_prune": prune}


PRUNE = {"early_config_prune": _prune}
BWD_MAIN_PRUNE = _bwd_prune(_BWD_MAIN_SPACE)
BWD_DH_PRUNE = _bwd_prune(_BWD_DH_SPACE)


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
