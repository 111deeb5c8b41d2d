"""The Triton kernels of the bottleneck adapter: the forward and the two backward kernels, each over
groups of token rows (see :func:`adapterkern.backends.triton.language.group_tile`); the maths and the
host wrappers that launch them are in :mod:`adapterkern.backends.triton.bottleneck`.
"""
from __future__ import annotations

import triton
import triton.language as tl

from .language import (
    BWD_DH_CONFIGS, BWD_DH_PRUNE, BWD_MAIN_CONFIGS, BWD_MAIN_PRUNE, FWD_CONFIGS, PRUNE, act, act_grad, dot,
    down_projection, group_bounds, group_tile, up_slab,
)

# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=FWD_CONFIGS, key=["D", "R_PAD", "T_BUCKET", "L2_RESIDENT"], prune_configs_by=PRUNE)
@triton.jit
def fwd_kernel(
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
    PERM, COUNTS, STARTS,  # token groups (GATHER only; see group_tile)
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
    STAGES: tl.constexpr,  # the config's num_stages (FWD_CONFIGS)
    L2_RESIDENT: tl.constexpr,
):
    """Program (p, g) runs row tiles p, p + P, p + 2P, ... of group g (P = the grid's first axis): one tile
    each where the grid covers every tile; fewer programs with L2_RESIDENT (bottleneck.forward_programs), so
    that the x tiles in flight fit the L2 and the residual re-read of x after its down-projection hits it.
    L2_RESIDENT also pipelines every load of the up-projection loop (the residual's included) and stores y
    evict-first, so that y does not push the x tiles out of the L2."""
    g = tl.program_id(1)
    if GATHER:
        n = g.to(tl.int64) - 1  # group 0: tokens with no adapter
    else:
        n = g.to(tl.int64)
        Y += n * T * D
        H += n * T * R
    # The L2-resident loop calls its tile as a non-inlined function: inlined into the loop, the compiler
    # hoists the weights' pointer tiles out of it and keeps them live across both projections (1.5-2x the
    # registers, spills). The row-tile grid's one tile per program runs inline, as it always has.
    if L2_RESIDENT:
        for tile in range(tl.program_id(0), tl.cdiv(T, BLOCK_T), tl.num_programs(0)):
            _fwd_row_tile_noinline(
                tile, n, X, stride_xt, stride_xd, RES, stride_rt, stride_rd, WD, stride_wd_r, stride_wd_d, BD, WU,
                stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value, Y, H, PERM, COUNTS, STARTS, g, T, D, R,
                ACT, HAS_BD, HAS_BU, HAS_S, ADD_RES, SAVE_H, GATHER, PRECISION, ACC, R_PAD, BLOCK_T, BLOCK_D, STAGES,
                L2_RESIDENT, stride_wd_n, stride_bd_n, stride_wu_n, stride_bu_n, stride_s_n,
            )
    else:
        _fwd_row_tile(
            tl.program_id(0), n, X, stride_xt, stride_xd, RES, stride_rt, stride_rd, WD, stride_wd_r, stride_wd_d, BD,
            WU, stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value, Y, H, PERM, COUNTS, STARTS, g, T, D, R,
            ACT, HAS_BD, HAS_BU, HAS_S, ADD_RES, SAVE_H, GATHER, PRECISION, ACC, R_PAD, BLOCK_T, BLOCK_D, STAGES,
            L2_RESIDENT, stride_wd_n, stride_bd_n, stride_wu_n, stride_bu_n, stride_s_n,
        )


@triton.jit
def _fwd_row_tile(
    tile, n, X, stride_xt, stride_xd, RES, stride_rt, stride_rd, WD, stride_wd_r, stride_wd_d, BD, WU,
    stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value, Y, H, PERM, COUNTS, STARTS, g, T, D, R,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_S: tl.constexpr, ADD_RES: tl.constexpr,
    SAVE_H: tl.constexpr, GATHER: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, L2_RESIDENT: tl.constexpr,
    stride_wd_n, stride_bd_n, stride_wu_n, stride_bu_n, stride_s_n,
):
    """Row tile ``tile`` of group g (adapter n; n < 0: the tokens no adapter takes, copied or zeroed)."""
    start = tile * BLOCK_T  # < T: no int32 overflow (an int under the interpreter)
    offs_t, mask_t, count = group_tile(start + tl.arange(0, BLOCK_T).to(tl.int64), g, PERM, COUNTS, STARTS, T, GATHER)
    if start < count:
        if n < 0:
            _copy_rows(RES, stride_rt, stride_rd, Y, offs_t, mask_t, D, ADD_RES, BLOCK_T, BLOCK_D)
            if SAVE_H:  # defined values (zeros) in every row of the saved pre-activation
                offs_r = tl.arange(0, R_PAD)
                tl.store(H + offs_t[:, None] * R + offs_r[None, :],
                         tl.zeros((BLOCK_T, R_PAD), dtype=H.dtype.element_ty), mask=mask_t[:, None] & (offs_r < R)[None, :])
        else:
            _fwd_tile(
                X, stride_xt, stride_xd, RES, stride_rt, stride_rd,
                WD + n * stride_wd_n, stride_wd_r, stride_wd_d, BD + n * stride_bd_n,
                WU + n * stride_wu_n, stride_wu_d, stride_wu_r, BU + n * stride_bu_n,
                S + n * stride_s_n, stride_s, scale_value, Y, H, offs_t, mask_t, D, R,
                ACT, HAS_BD, HAS_BU, HAS_S, ADD_RES, SAVE_H, PRECISION, ACC, R_PAD, BLOCK_T, BLOCK_D,
                STAGES, L2_RESIDENT,
            )


_fwd_row_tile_noinline = triton.jit(noinline=True)(_fwd_row_tile.fn)


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
def _up_projection(
    a, RES, stride_rt, stride_rd, WU, stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value, Y,
    offs_t, mask_t, d_begin, d_end, D, R,
    HAS_BU: tl.constexpr, HAS_S: tl.constexpr, ADD_RES: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr, L2_RESIDENT: tl.constexpr,
):
    """``y[rows, d_begin:d_end] = res + s * (a @ w_up[d_begin:d_end].T + b_up)``, one BLOCK_D slab of
    output columns at a time (``a``: the (rows, R_PAD) activation, w_up's dtype; Y contiguous (T, D)).
    L2_RESIDENT: the loop pipelined in STAGES stages (Triton then moves every load of it by cp.async, where
    its default pipelines only a dot's operands), y stored evict-first."""
    for d0 in tl.range(d_begin, d_end, BLOCK_D, num_stages=STAGES if L2_RESIDENT else None):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < d_end
        mask_td = mask_t[:, None] & mask_d[None, :]
        u = up_slab(a, WU, stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value, offs_d, mask_d, R,
                    HAS_BU, HAS_S, PRECISION, ACC, R_PAD)
        if ADD_RES:
            res = tl.load(RES + offs_t[:, None] * stride_rt + offs_d[None, :] * stride_rd, mask=mask_td, other=0.0)
            y = res.to(ACC) + u
        else:
            y = u
        tl.store(Y + offs_t[:, None] * D + offs_d[None, :], y.to(Y.dtype.element_ty), mask=mask_td,
                 eviction_policy="evict_first" if L2_RESIDENT else "")


@triton.jit
def _fwd_tile(
    X, stride_xt, stride_xd, RES, stride_rt, stride_rd,
    WD, stride_wd_r, stride_wd_d, BD, WU, stride_wu_d, stride_wu_r, BU,
    S, stride_s, scale_value, Y, H, offs_t, mask_t, D, R,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_S: tl.constexpr,
    ADD_RES: tl.constexpr, SAVE_H: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr,
    R_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, STAGES: tl.constexpr,
    L2_RESIDENT: tl.constexpr,
):
    """One adapter on the token rows ``offs_t`` (int64 ids, masked by ``mask_t``): rows of Y and H."""
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    h = down_projection(X, stride_xt, stride_xd, WD, stride_wd_r, stride_wd_d, offs_t, mask_t, 0, D, R,
                         PRECISION, ACC, R_PAD, BLOCK_T, BLOCK_D)
    if HAS_BD:
        h += tl.load(BD + offs_r, mask=mask_r, other=0.0).to(ACC)[None, :]
    if SAVE_H:
        tl.store(H + offs_t[:, None] * R + offs_r[None, :], h.to(H.dtype.element_ty),
                 mask=mask_t[:, None] & mask_r[None, :])
    # Padded bottleneck columns hold act(0) (non-zero for sigmoid): harmless, w_up's padded rows are 0.
    a = act(h, ACT).to(WU.dtype.element_ty)
    _up_projection(a, RES, stride_rt, stride_rd, WU, stride_wu_d, stride_wu_r, BU, S, stride_s, scale_value, Y,
                   offs_t, mask_t, 0, D, D, R, HAS_BU, HAS_S, ADD_RES, PRECISION, ACC, R_PAD, BLOCK_D, STAGES,
                   L2_RESIDENT)


# ----------------------------------------------------------------------------------------------
# Decode forward (T <= DECODE_MAX_TOKENS): the d-reduction split across programs, then a
# deterministic second pass, so a few tokens still spread over the whole GPU.
# ----------------------------------------------------------------------------------------------


@triton.jit
def decode_down_kernel(
    X, stride_xt, stride_xd,  # (T, D)
    WD, stride_wd_r, stride_wd_d, stride_wd_n,  # (N, R, D)
    PARTIAL,  # (N, SPLITS, T_PAD, R_PAD) in ACC: one partial h per d-split, every element written
    T, D, R, CHUNK,
    PRECISION: tl.constexpr, ACC: tl.constexpr, R_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program (split, n): ``x[:, chunk] @ w_down[n][:, chunk].T`` over its CHUNK of d."""
    split = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    splits = tl.num_programs(0).to(tl.int64)
    offs_t = tl.arange(0, T_PAD).to(tl.int64)
    d_begin = split * CHUNK
    d_end = tl.minimum(d_begin + CHUNK, D)
    h = down_projection(X, stride_xt, stride_xd, WD + n * stride_wd_n, stride_wd_r, stride_wd_d, offs_t, offs_t < T,
                         d_begin, d_end, R, PRECISION, ACC, R_PAD, T_PAD, BLOCK_D)
    offs_r = tl.arange(0, R_PAD)
    tl.store(PARTIAL + (n * splits + split) * T_PAD * R_PAD + offs_t[:, None] * R_PAD + offs_r[None, :], h)


@triton.jit
def decode_up_kernel(
    PARTIAL, SPLITS,  # from decode_down_kernel
    RES, stride_rt, stride_rd,  # (T, D)
    BD, stride_bd_n,  # (N, R)
    WU, stride_wu_d, stride_wu_r, stride_wu_n,  # (N, D, R)
    BU, stride_bu_n,  # (N, D)
    S, stride_s, stride_s_n, scale_value,
    Y, H,  # (N, T, D), (N, T, R) contiguous (H written only when SAVE_H, by the programs with pid 0)
    T, D, R, D_PER_PROGRAM,
    ACT: tl.constexpr, HAS_BD: tl.constexpr, HAS_BU: tl.constexpr, HAS_S: tl.constexpr, ADD_RES: tl.constexpr,
    SAVE_H: tl.constexpr, PRECISION: tl.constexpr, ACC: tl.constexpr, R_PAD: tl.constexpr, T_PAD: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Program (pid, n): h = the partials summed in split order (deterministic), then y for its
    D_PER_PROGRAM output columns."""
    pid = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1).to(tl.int64)
    offs_t = tl.arange(0, T_PAD).to(tl.int64)
    mask_t = offs_t < T
    offs_r = tl.arange(0, R_PAD)
    mask_r = offs_r < R
    tile = offs_t[:, None] * R_PAD + offs_r[None, :]
    h = tl.zeros((T_PAD, R_PAD), dtype=ACC)
    for split in range(0, SPLITS):
        h += tl.load(PARTIAL + (n * SPLITS + split) * T_PAD * R_PAD + tile)
    if HAS_BD:
        h += tl.load(BD + n * stride_bd_n + offs_r, mask=mask_r, other=0.0).to(ACC)[None, :]
    if SAVE_H:
        if pid == 0:
            tl.store(H + n * T * R + offs_t[:, None] * R + offs_r[None, :], h.to(H.dtype.element_ty),
                     mask=mask_t[:, None] & mask_r[None, :])
    a = act(h, ACT).to(WU.dtype.element_ty)
    d_begin = pid * D_PER_PROGRAM
    _up_projection(a, RES, stride_rt, stride_rd, WU + n * stride_wu_n, stride_wu_d, stride_wu_r, BU + n * stride_bu_n,
                   S + n * stride_s_n, stride_s, scale_value, Y + n * T * D, offs_t, mask_t,
                   d_begin, tl.minimum(d_begin + D_PER_PROGRAM, D), D, R, HAS_BU, HAS_S, ADD_RES, PRECISION, ACC,
                   R_PAD, BLOCK_D, None, False)


# ----------------------------------------------------------------------------------------------
# Backward kernel 1: dh = (s * dy) @ w_up * act'(h), one BLOCK_T row block per program.
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=BWD_DH_CONFIGS, key=["D", "R_PAD", "T_BUCKET"], prune_configs_by=BWD_DH_PRUNE)
@triton.jit
def bwd_dh_kernel(
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
    offs_t, mask_t, count = group_tile(pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T), g, PERM, COUNTS, STARTS, T, GATHER)
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
        da = dot(dz.to(WU.dtype.element_ty), wu, da, PRECISION, ACC)
    h = tl.load(H + offs_t[:, None] * R + offs_r[None, :], mask=mask_tr, other=0.0).to(ACC)
    dh = da * act_grad(h, ACT)
    tl.store(DH + offs_t[:, None] * R + offs_r[None, :], dh.to(DH.dtype.element_ty), mask=mask_tr)


# ----------------------------------------------------------------------------------------------
# Backward kernel 2: dx, and per-T-split partial sums of every parameter gradient.
# Grid: (cdiv(D, BLOCK_D), SPLITS, groups); program (pid_d, pid_s, g) walks its contiguous range of T tiles.
# The split count is read off the grid: the host picks it per config (from BLOCK_T and BLOCK_D).
# ----------------------------------------------------------------------------------------------


@triton.autotune(configs=BWD_MAIN_CONFIGS, key=["D", "R_PAD", "T_BUCKET"], prune_configs_by=BWD_MAIN_PRUNE)
@triton.jit
def bwd_main_kernel(
    DY, stride_dyt, stride_dyd,  # (T, D)
    X, stride_xt, stride_xd,  # (T, D)
    H,  # (T, R) contiguous pre-activation
    DH,  # (T, R) contiguous, from kernel 1
    WD, stride_wd_r, stride_wd_d,  # (R, D)
    WU, stride_wu_d, stride_wu_r,  # (D, R)
    BU,  # (D,)
    S, stride_s, scale_value,
    DX,  # (T, D) contiguous output
    DWD_P,  # (N, SPLITS, R, D) partials in ACC dtype (a stack's adapters, also for a batch's groups 1..N)
    DBD_P,  # (N, SPLITS, R) partials in ACC dtype
    DWU_P,  # (N, SPLITS, D, R) partials in ACC dtype
    DBU_P,  # (N, SPLITS, D) partials in ACC dtype
    DS_P,  # (N, SPLITS, D) partials in ACC dtype of sum_T dy * u
    stride_dy_n, stride_wd_n, stride_wu_n, stride_bu_n, stride_s_n,  # adapter axis (grid axis 2)
    PERM, COUNTS, STARTS,  # token groups (GATHER only)
    T, D, R, T_BUCKET,
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
    splits = tl.num_programs(1)
    # Adapter n: its dy, pre-activation, dh, weights and partial sums. dx of a stack (the sum over
    # adapters) is left to the host (NEED_DX is only set for one adapter, or for a batch, where every
    # token row belongs to one group).
    if GATHER:
        n = g.to(tl.int64) - 1
        _, count = group_bounds(g, COUNTS, STARTS, T)
    else:
        n = g.to(tl.int64)
        count = T
        DY += n * stride_dy_n
        H += n * T * R
        DH += n * T * R
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    num_tiles = tl.cdiv(count, BLOCK_T)
    tiles_per_split = tl.cdiv(num_tiles, splits)
    tile_lo = pid_s * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)
    if n < 0:
        if NEED_DX:  # tokens with no adapter: dx = dy (the residual is x) or 0
            for t_start in range(tile_lo * BLOCK_T, tile_hi * BLOCK_T, BLOCK_T):
                local = t_start + tl.arange(0, BLOCK_T).to(tl.int64)
                offs_t, mask_t, _ = group_tile(local, g, PERM, COUNTS, STARTS, T, GATHER)
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
            DWD_P + n * splits * R * D, DBD_P + n * splits * R, DWU_P + n * splits * D * R,
            DBU_P + n * splits * D, DS_P + n * splits * D,
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
        offs_t, mask_t, _ = group_tile(local, g, PERM, COUNTS, STARTS, T, GATHER)
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tr = mask_t[:, None] & mask_r[None, :]
        dy = tl.load(DY + offs_t[:, None] * stride_dyt + offs_d[None, :] * stride_dyd, mask=mask_td, other=0.0)
        dy = dy.to(ACC)
        if NEED_DX or NEED_DWD or NEED_DBD:
            dh = tl.load(DH + offs_t[:, None] * R + offs_r[None, :], mask=mask_tr, other=0.0)
            if NEED_DX:
                dx = dot(dh, wd, None, PRECISION, ACC)
                if RES_IS_X:
                    dx += dy
                tl.store(DX + offs_t[:, None] * D + offs_d[None, :], dx.to(DX.dtype.element_ty), mask=mask_td)
            if NEED_DWD:
                x = tl.load(X + offs_t[:, None] * stride_xt + offs_d[None, :] * stride_xd, mask=mask_td, other=0.0)
                acc_dwd = dot(tl.trans(dh), x, acc_dwd, PRECISION, ACC)
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
                a = tl.where(mask_tr, act(h, ACT), 0.0).to(dtype)
                acc_dwu = dot(tl.trans(dz.to(dtype)), a, acc_dwu, PRECISION, ACC)
            if NEED_DBU:
                acc_dbu += tl.sum(dz, axis=0)
        if NEED_DS:
            h = tl.load(H + offs_t[:, None] * R + offs_r[None, :], mask=mask_tr, other=0.0).to(ACC)
            a = tl.where(mask_tr, act(h, ACT), 0.0).to(dtype)
            u = dot(a, wu_t, None, PRECISION, ACC)
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
