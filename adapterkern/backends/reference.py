"""The pure-PyTorch backend: runs on any device, differentiable by ordinary autograd.

It is the documented fallback (what CPU users run) and the maths the kernels are tested against,
so it is written for speed within eager PyTorch: for T > r the up-projection bias, the scaling and
the residual add are folded into one ``addmm`` (the residual is its ``beta`` term, the bias a column
of ones appended to the bottleneck activations, the scaling folded into the small (d, r) weight), so
the (T, d) output is written in a single pass; for T <= r (decode) refolding the weight would cost
more than the output, so bias goes into ``addmm`` and scaling + residual into one ``add``/``addcmul``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from ..activations import get_activation


def bottleneck_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scaling: Union[float, torch.Tensor],
    residual: Optional[torch.Tensor],
    activation: str,
) -> torch.Tensor:
    """``residual + scaling * (act(x @ w_down.T + b_down) @ w_up.T + b_up)`` on 2-D ``x`` (T, d).

    ``w_down`` (r, d), ``w_up`` (d, r) (``nn.Linear`` layout), biases (r,)/(d,) or None, ``scaling`` a
    Python float or a tensor of shape (1,) or (d,), ``residual`` (T, d) or None (meaning ``x``).
    Arguments are assumed checked (see :func:`adapterkern.functional.bottleneck_adapter`).
    Returns a new (T, d) tensor of ``x``'s dtype.
    """
    act = get_activation(activation).fn
    hidden = act(torch.nn.functional.linear(x, w_down, b_down))

    res = x if residual is None else residual
    if x.shape[0] <= w_up.shape[1]:
        # Few tokens (T <= r, decode): refolding the (d, r) weight costs more than two small passes over
        # the (T, d) output, so apply the bias in the matmul and the scaling and residual in one more op.
        up = torch.nn.functional.linear(hidden, w_up, b_up)
        if isinstance(scaling, torch.Tensor):
            return torch.addcmul(res, up, scaling.to(x.dtype))
        return torch.add(res, up, alpha=scaling)

    w_eff, b_eff = w_up, b_up
    if isinstance(scaling, torch.Tensor):
        scale = scaling.to(x.dtype).reshape(-1, 1)  # (1, 1) or (d, 1)
        w_eff = w_up * scale
        b_eff = None if b_up is None else b_up * scale.reshape(-1)
    elif scaling != 1.0:
        w_eff = w_up * scaling
        b_eff = None if b_up is None else b_up * scaling
    if b_eff is not None:
        hidden = torch.cat([hidden, hidden.new_ones(hidden.shape[0], 1)], dim=1)
        w_eff = torch.cat([w_eff, b_eff.unsqueeze(1)], dim=1)
    return torch.addmm(res, hidden, w_eff.t())


def multi_adapter(
    x: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scaling: Union[float, torch.Tensor],
    residual: Optional[torch.Tensor],
    add_residual: bool,
    activation: str,
) -> torch.Tensor:
    """N adapters on one 2-D input ``x`` (T, d): returns (N, T, d) with
    ``out[n] = res + scaling[n] * (act(x @ w_down[n].T + b_down[n]) @ w_up[n].T + b_up[n])``.

    ``w_down`` (N, r, d), ``w_up`` (N, d, r), biases (N, r) / (N, d) or None, ``scaling`` a float or a
    tensor of shape (N, 1) or (N, d); ``res`` is ``residual`` (x if None) when ``add_residual``, else 0.
    """
    act = get_activation(activation).fn
    hidden = torch.matmul(x, w_down.transpose(1, 2))  # (N, T, r)
    if b_down is not None:
        hidden = hidden + b_down.unsqueeze(1)
    hidden = act(hidden)
    if b_up is None:
        up = torch.bmm(hidden, w_up.transpose(1, 2))
    else:
        up = torch.baddbmm(b_up.unsqueeze(1), hidden, w_up.transpose(1, 2))
    if isinstance(scaling, torch.Tensor):
        up = up * scaling.to(x.dtype).unsqueeze(1)
    elif scaling != 1.0:
        up = up * scaling
    if not add_residual:
        return up
    return up + (x if residual is None else residual)


def batched_adapter(
    x: torch.Tensor,
    perm: torch.Tensor,
    counts: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    scaling: Union[float, torch.Tensor],
    residual: Optional[torch.Tensor],
    add_residual: bool,
    activation: str,
) -> torch.Tensor:
    """Each token of ``x`` (T, d) through its own adapter of the stack: the tokens of group g
    (``perm``'s slice of length ``counts[g]``; group 0 = no adapter, group g = adapter g - 1) go through
    :func:`bottleneck_adapter` together, the others keep ``residual`` (x if None). Without
    ``add_residual`` the residual is 0 everywhere. ``scaling`` a float or (N, 1) / (N, d). Reads
    ``counts`` on the host (one sync; this is the CPU fallback); under torch.compile, where sizes must
    not depend on values, every adapter runs on every token instead (N times the FLOPs) and each token
    takes its own adapter's row."""
    res = x if residual is None else residual
    if not add_residual:
        res = residual = torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)
    if torch.compiler.is_compiling():
        return _batched_adapter_static(x, perm, counts, w_down, b_down, w_up, b_up, scaling, res, activation)
    parts, start = [], 0
    for g, count in enumerate(counts.tolist()):
        rows = perm[start : start + count]
        start += count
        if count == 0:
            continue
        if g == 0:  # no adapter
            parts.append(res.index_select(0, rows))
            continue
        s = scaling[g - 1] if isinstance(scaling, torch.Tensor) else scaling
        parts.append(
            bottleneck_adapter(
                x.index_select(0, rows), w_down[g - 1], None if b_down is None else b_down[g - 1], w_up[g - 1],
                None if b_up is None else b_up[g - 1], s, None if residual is None else residual.index_select(0, rows),
                activation,
            )
        )
    if not parts:
        return res.clone()
    # The groups' rows in sorted order, then one gather back to token order.
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return torch.cat(parts).index_select(0, inverse)


def _batched_adapter_static(x, perm, counts, w_down, b_down, w_up, b_up, scaling, res, activation):
    """:func:`batched_adapter` with shapes that depend on T and N only: the (N, T, d) stack of every
    adapter on every token, then each token's row of its own adapter (``res`` for group 0)."""
    num_tokens, n = x.shape[0], w_down.shape[0]
    labels = torch.repeat_interleave(torch.arange(n + 1, device=x.device), counts.to(torch.int64), output_size=num_tokens)
    group = torch.empty_like(labels).scatter_(0, perm, labels)  # each token's group: 0 none, g adapter g - 1
    stack = multi_adapter(x, w_down, b_down, w_up, b_up, scaling, res, True, activation)
    chosen = stack[(group - 1).clamp_min(0), torch.arange(num_tokens, device=x.device)]
    return torch.where((group > 0)[:, None], chosen, res)


def adapter_add_norm(
    z: torch.Tensor,
    residual: torch.Tensor,
    w_down: torch.Tensor,
    b_down: Optional[torch.Tensor],
    w_up: torch.Tensor,
    b_up: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    scaling: Union[float, torch.Tensor],
    activation: str,
    eps: float,
    rms_norm: bool,
) -> torch.Tensor:
    """``norm(z + scaling * (act(z @ w_down.T + b_down) @ w_up.T + b_up) + residual)`` on 2-D (T, d).

    A sequential adapter on the sublayer output ``z``, the block's residual add, then LayerNorm (or
    RMSNorm when ``rms_norm``: ``y * rsqrt(mean(y**2) + eps) * norm_weight``, torch's ``F.rms_norm``).
    In the fewest eager ops: one add (``z + residual``) that becomes the ``beta`` term of the
    adapter's up-projection ``addmm`` (:func:`bottleneck_adapter`, scaling folded into the (d, r)
    weight for T > r), then the norm. The un-normalised sum is rounded once to z's dtype (the
    norms' statistics are float32 for float16 / bfloat16, as torch's kernels compute them).
    Differentiable by ordinary autograd. Arguments are assumed checked.
    """
    y = bottleneck_adapter(z, w_down, b_down, w_up, b_up, scaling, torch.add(z, residual), activation)
    d = (z.shape[-1],)
    if rms_norm:
        return F.rms_norm(y, d, norm_weight, eps)
    return F.layer_norm(y, d, norm_weight, norm_bias, eps)
