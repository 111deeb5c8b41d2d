"""The inference kernel of a sequential adapter fused with the residual add and the norm after it
(BERT's ``BertSelfOutput`` / ``BertOutput`` with a Pfeiffer / Houlsby adapter; Llama-style RMSNorm)::

    h   = z @ w_down.T + b_down                         (T, r)   on chip
    a   = act(h)                                        (T, r)   on chip, rounded to the weights' dtype
    y   = z + s * (a @ w_up.T + b_up) + residual        (T, d)   never stored
    out = (y - mean(y)) * rstd * norm_weight + norm_bias           LayerNorm, rstd = 1 / sqrt(var(y) + eps)
    out = y * rstd * norm_weight,  rstd = 1 / sqrt(mean(y**2) + eps)  RMSNorm

One program owns BLOCK_T token rows and walks d in BLOCK_D chunks three times:

* phase 0: ``h`` accumulated in fp32 over the d-chunks of z (reads z), ``a`` kept in registers;
* pass 1: each chunk's ``y`` (reads z, residual and w_up's chunk; one (BLOCK_T, R_PAD) x (R_PAD,
  BLOCK_D) dot) reduced into per-row statistics, nothing stored. LayerNorm combines the chunks'
  (count, mean, M2) with Chan et al.'s parallel update (the chunk's own mean, then the deviations
  from it), so a large common offset does not cancel as E[y^2] - E[y]^2 would; RMSNorm sums y^2;
* pass 2: ``y`` recomputed chunk by chunk (z, residual and w_up re-read: the program's rows were read
  moments ago, so from L2 on a GPU) and stored normalised, once.

HBM bytes (the rows' re-reads hit L2): read z and residual once, write out once, the weights once:
the floor 3·T·d·e + 2·d·r·e. L2 / on-chip traffic: z 3x, residual 2x, w_up 2x per program, w_down
once per program. FLOPs: 2·T·d·r (down) + 2 x 2·T·d·r (up, computed twice) = 6·T·d·r (1.5x the op's
4·T·d·r). See benchmarks/NOTES.md ("adapter_add_norm").

Statistics and every sum are in fp32 (fp64 for float64 inputs). Token offsets are int64; every dot
has all dims >= 16 (r padded to R_PAD, BLOCK_T >= 16); masks on T, d and r.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .language import (
    ADD_NORM_CONFIGS, PRUNE, acc_dtype, act, dot_precision, down_projection, padded_rank, t_bucket, unit_stride, up_slab,
)


@triton.jit
def _y_chunk(
    Z, stride_zt, stride_zd, RES, stride_rt, stride_rd, WU, stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value,
    a, offs_t, mask_t, d0, D, R,
    HAS_BU: tl.constexpr, HAS_S: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """(y, offs_d, mask_d, mask_td) of the d-chunk starting at d0: y = z + s * (a @ w_up.T + b_up) + res
    in ACC, 0 in masked-out columns (padded rows are masked by mask_td, never used)."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_td = mask_t[:, None] & mask_d[None, :]
    u = up_slab(a, WU, stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value, offs_d, mask_d, R,
                HAS_BU, HAS_S, PRECISION, ACC, R_PAD)
    z = tl.load(Z + offs_t[:, None] * stride_zt + offs_d[None, :] * stride_zd, mask=mask_td, other=0.0)
    res = tl.load(RES + offs_t[:, None] * stride_rt + offs_d[None, :] * stride_rd, mask=mask_td, other=0.0)
    y = z.to(ACC) + u + res.to(ACC)
    return y, offs_d, mask_d, mask_td


@triton.autotune(configs=ADD_NORM_CONFIGS, key=["D", "R_PAD", "T_BUCKET"], prune_configs_by=PRUNE)
@triton.jit
def add_norm_kernel(
    Z, stride_zt, stride_zd,  # (T, D)
    RES, stride_rt, stride_rd,  # (T, D)
    WD, stride_wd_r, stride_wd_d,  # (R, D)
    BD,  # (R,) contiguous
    WU, stride_wu_d, stride_wu_r,  # (D, R)
    BU,  # (D,) contiguous
    S, stride_s, scale_value,  # (1,) or (D,) with stride 0 or 1; scale_value when S is unused
    NW, NB,  # (D,) contiguous norm weight and bias
    OUT,  # (T, D) contiguous
    T, D, R, T_BUCKET, eps,
    ACT: tl.constexpr,
    HAS_BD: tl.constexpr,
    HAS_BU: tl.constexpr,
    HAS_S: tl.constexpr,
    HAS_NW: tl.constexpr,
    HAS_NB: tl.constexpr,
    RMS: tl.constexpr,
    PRECISION: tl.constexpr,
    ACC: tl.constexpr,
    R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_t = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T * stride may pass 2^31
    mask_t = offs_t < T
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R

    # Phase 0: h = z @ w_down.T over d in BLOCK_D chunks; (BLOCK_T, R_PAD) in registers.
    h = down_projection(Z, stride_zt, stride_zd, WD, stride_wd_r, stride_wd_d, offs_t, mask_t, 0, D, R,
                        PRECISION, ACC, R_PAD, BLOCK_T, BLOCK_D)
    if HAS_BD:
        h += tl.load(BD + offs_r, mask=mask_r, other=0.0).to(ACC)[None, :]
    # Padded bottleneck columns hold act(0) (non-zero for sigmoid): harmless, w_up's padded rows load as 0.
    a = act(h, ACT).to(WU.dtype.element_ty)

    # Pass 1: per-row statistics of y, chunk by chunk; nothing stored.
    count = tl.zeros((BLOCK_T,), dtype=ACC)  # columns seen so far (the same in every row)
    mean = tl.zeros((BLOCK_T,), dtype=ACC)
    m2 = tl.zeros((BLOCK_T,), dtype=ACC)  # LayerNorm: sum of squared deviations; RMSNorm: sum of y^2
    for d0 in range(0, D, BLOCK_D):
        y, offs_d, mask_d, mask_td = _y_chunk(
            Z, stride_zt, stride_zd, RES, stride_rt, stride_rd, WU, stride_wu_d, stride_wu_r, BU, S, stride_s,
            scale_value, a, offs_t, mask_t, d0, D, R, HAS_BU, HAS_S, PRECISION, ACC, R_PAD, BLOCK_D,
        )
        if RMS:
            m2 += tl.sum(tl.where(mask_td, y * y, 0.0), axis=1)
        else:
            n_c = tl.sum(mask_d.to(ACC), axis=0)  # this chunk's columns (>= 1)
            mean_c = tl.sum(tl.where(mask_td, y, 0.0), axis=1) / n_c
            dev = tl.where(mask_td, y - mean_c[:, None], 0.0)
            m2_c = tl.sum(dev * dev, axis=1)
            total = count + n_c
            delta = mean_c - mean
            mean += delta * (n_c / total)
            m2 += m2_c + delta * delta * (count * (n_c / total))
            count = total
    rstd = 1.0 / tl.sqrt(m2 / D + eps)  # m2 / D: the variance (LayerNorm) or mean(y^2) (RMSNorm)

    # Pass 2: recompute y, normalise, store once.
    for d0 in range(0, D, BLOCK_D):
        y, offs_d, mask_d, mask_td = _y_chunk(
            Z, stride_zt, stride_zd, RES, stride_rt, stride_rd, WU, stride_wu_d, stride_wu_r, BU, S, stride_s,
            scale_value, a, offs_t, mask_t, d0, D, R, HAS_BU, HAS_S, PRECISION, ACC, R_PAD, BLOCK_D,
        )
        if RMS:
            out = y * rstd[:, None]
        else:
            out = (y - mean[:, None]) * rstd[:, None]
        if HAS_NW:
            out *= tl.load(NW + offs_d, mask=mask_d, other=0.0).to(ACC)[None, :]
        if HAS_NB:
            out += tl.load(NB + offs_d, mask=mask_d, other=0.0).to(ACC)[None, :]
        tl.store(OUT + offs_t[:, None] * D + offs_d[None, :], out.to(OUT.dtype.element_ty), mask=mask_td)


def _vector(t: Optional[torch.Tensor], like: torch.Tensor):
    """A (n,) parameter as the kernel reads it (unit stride), or ``like`` as an unused pointer."""
    return like if t is None else unit_stride(t)


def adapter_add_norm_forward(
    z: torch.Tensor,
    residual: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    scale_value: float,
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    activation_id: int,
    eps: float,
    rms_norm: bool,
) -> torch.Tensor:
    """``norm(z + s * (act(z @ w_down.T + b_down) @ w_up.T + b_up) + residual)`` in one launch.

    ``z``, ``residual`` (T, d) any strides; ``w_down`` (r, d), ``w_up`` (d, r) any strides; biases,
    ``norm_weight``, ``norm_bias`` (n,) or None; ``scale`` (1,) / (d,) or None (then ``scale_value``).
    Returns a new contiguous (T, d) tensor of z's dtype. Grid: cdiv(T, BLOCK_T) programs.
    """
    num_tokens, d = z.shape
    r = w_down.shape[0]
    out = torch.empty((num_tokens, d), dtype=z.dtype, device=z.device)
    if num_tokens == 0:
        return out
    if scale is None:
        s, stride_s, s_val = w_up, 0, float(scale_value)
    else:
        s, stride_s, s_val = scale, (0 if scale.numel() == 1 else scale.stride(0)), 1.0
    add_norm_kernel[lambda meta: (triton.cdiv(num_tokens, meta["BLOCK_T"]),)](
        z, z.stride(0), z.stride(1),
        residual, residual.stride(0), residual.stride(1),
        w_down, w_down.stride(0), w_down.stride(1),
        _vector(b_down, w_down),
        w_up, w_up.stride(0), w_up.stride(1),
        _vector(b_up, w_up),
        s, stride_s, s_val,
        _vector(norm_weight, w_up), _vector(norm_bias, w_up),
        out,
        num_tokens, d, r, t_bucket(num_tokens), float(eps),
        ACT=activation_id,
        HAS_BD=b_down is not None,
        HAS_BU=b_up is not None,
        HAS_S=scale is not None,
        HAS_NW=norm_weight is not None,
        HAS_NB=norm_bias is not None,
        RMS=bool(rms_norm),
        PRECISION=dot_precision(z.dtype),
        ACC=acc_dtype(z.dtype),
        R_PAD=padded_rank(r),
    )
    return out
