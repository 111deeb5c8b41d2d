"""Token routing for :func:`adapterkern.bottleneck_adapter_batched`: which tokens go through which
adapter of a stack, grouped once per batch.

:class:`TokenGroups` is made only by :func:`token_groups` and stays bound to the index it was made
from: the batched op accepts it only with that same index tensor, unmodified since (its version
counter is checked), so a stale or hand-made grouping cannot route tokens wrongly, and the kernels
never see group sizes or token ids that do not describe the batch (they also clamp them, so no value
can make them read or write outside the tensors).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

_MAKE = object()  # the key only token_groups holds: TokenGroups cannot be built by hand


def _check_integer_index(adapter_index, expected: str) -> None:
    if not isinstance(adapter_index, Tensor):
        raise TypeError(f"adapter_index: expected an integer tensor of shape {expected}, got {type(adapter_index).__name__}")
    if adapter_index.is_floating_point() or adapter_index.is_complex() or adapter_index.dtype == torch.bool:
        raise TypeError(f"adapter_index: expected an integer dtype, got {adapter_index.dtype}")


def _skip_host_checks(index: Tensor) -> bool:
    """Checks that read values on the host are skipped while capturing a CUDA graph or compiling."""
    return torch.compiler.is_compiling() or (index.is_cuda and torch.cuda.is_current_stream_capturing())


def check_index_range(index: Tensor, num_adapters: int) -> None:
    """Values in [-1, num_adapters); one host sync, skipped while capturing or compiling (then
    :func:`token_groups` routes out-of-range tokens to no adapter and counts them)."""
    if not _skip_host_checks(index) and index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < -1 or hi >= num_adapters:
            raise ValueError(
                f"adapter_index: values must lie in [-1, {num_adapters - 1}] (-1: no adapter), got [{lo}, {hi}]"
            )


class TokenGroups:
    """Tokens grouped by adapter: made by :func:`token_groups` only, for :func:`bottleneck_adapter_batched`.

    Computed on the index's device with no host synchronisation; sizes depend only on T and N, so a
    CUDA graph can replay them (refill them in place for a new routing with :meth:`update_`).

    Attributes (read them; writing to them invalidates the groups):
        perm: (T,) int64, token ids sorted by adapter (stable).
        counts: (N + 1,) int32, tokens per group; group 0 holds the tokens with no adapter (index -1,
            and out-of-range values where they could not be refused), group g the tokens of adapter g - 1.
        starts: (N + 1,) int32, where each group begins in ``perm``.
        out_of_range: () int64, how many index values lay outside [-1, N) and were routed to no
            adapter (always 0 where :func:`token_groups` could check them, as it raises instead);
            a device tensor: reading it is a host sync.
        index: the tensor the groups were made from; num_adapters: N.
    """

    def __init__(self, *args, **kwargs):
        raise TypeError("TokenGroups: made by adapterkern.token_groups(adapter_index, num_adapters) only")

    @classmethod
    def _create(cls, key, index: Tensor, num_adapters: int) -> "TokenGroups":
        if key is not _MAKE:
            raise TypeError("TokenGroups: made by adapterkern.token_groups(adapter_index, num_adapters) only")
        self = cls.__new__(cls)
        self.index, self.num_adapters = index, num_adapters
        self.perm, self.counts, self.starts, self.out_of_range = _group(index, num_adapters)
        self._versions = self._current_versions()
        return self

    def _tensors(self) -> Tuple[Tensor, ...]:
        return (self.index, self.perm, self.counts, self.starts)

    def _current_versions(self) -> Tuple[int, ...]:
        if torch.compiler.is_compiling():  # versions are not traced; a compiled graph cannot check them
            return ()
        # Inference tensors (made under torch.inference_mode) keep no version counter: unchecked.
        return tuple(-1 if t.is_inference() else t._version for t in self._tensors())

    def __iter__(self):
        """(perm, counts, starts), the groups as the kernels take them."""
        return iter((self.perm, self.counts, self.starts))

    def update_(self, adapter_index: Tensor) -> "TokenGroups":
        """Regroup in place for a new routing ``adapter_index`` (the same shape as before; it becomes the
        index these groups are bound to): what a CUDA graph captured with these groups replays."""
        if not isinstance(adapter_index, Tensor) or adapter_index.shape != self.index.shape:
            raise ValueError(f"adapter_index: expected a tensor of shape {tuple(self.index.shape)} (the groups' index)")
        _check_integer_index(adapter_index, str(tuple(self.index.shape)))
        if adapter_index.device != self.perm.device:
            raise ValueError(f"adapter_index: expected device {self.perm.device}, got {adapter_index.device}")
        check_index_range(adapter_index, self.num_adapters)
        for buffer, value in zip((self.perm, self.counts, self.starts, self.out_of_range), _group(adapter_index, self.num_adapters)):
            buffer.copy_(value)
        self.index = adapter_index
        self._versions = self._current_versions()
        return self

    def check_bound_to(self, adapter_index: Tensor, num_tokens: int, num_adapters: int) -> None:
        """ValueError naming ``groups`` unless these groups were made from ``adapter_index`` itself (the
        same tensor, unmodified since) for ``num_tokens`` tokens and ``num_adapters`` adapters."""
        if self.num_adapters != num_adapters or self.perm.numel() != num_tokens:
            raise ValueError(
                f"groups: made for {self.perm.numel()} tokens and {self.num_adapters} adapters, not {num_tokens} and {num_adapters}"
            )
        if self.index is not adapter_index:
            raise ValueError(
                "groups: made from another adapter_index tensor; pass the index the groups were made from "
                "(token_groups(adapter_index, num_adapters)), or let the op group the tokens (groups=None)"
            )
        if not torch.compiler.is_compiling() and self._versions and self._current_versions() != self._versions:
            raise ValueError(
                "groups: the index or the groups were modified in place after token_groups; call token_groups "
                "again, or groups.update_(adapter_index) to regroup into the same buffers"
            )

    def __repr__(self) -> str:
        return f"TokenGroups(num_tokens={self.perm.numel()}, num_adapters={self.num_adapters}, device={self.perm.device})"


def _group(index: Tensor, num_adapters: int):
    """(perm, counts, starts, out_of_range) of ``index``: values outside [-1, N) go to group 0."""
    flat = index.reshape(-1).to(torch.int64)
    valid = (flat >= -1) & (flat < num_adapters)
    group = torch.where(valid, flat + 1, 0)  # 0: no adapter
    counts = torch.zeros(num_adapters + 1, dtype=torch.int32, device=flat.device)
    counts.scatter_add_(0, group, torch.ones_like(group, dtype=torch.int32))
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    perm = torch.sort(group, stable=True).indices
    return perm, counts, starts, (~valid).sum()


def token_groups(adapter_index: Tensor, num_adapters: int) -> TokenGroups:
    """Group the tokens of ``adapter_index`` (any shape, integer, values in [-1, num_adapters)) by adapter.

    Compute it once per batch and pass it, with the same ``adapter_index`` tensor, to every layer's
    :func:`bottleneck_adapter_batched` call. The values are range-checked here (one host sync per
    batch, ValueError); while a CUDA graph is being captured or under torch.compile they cannot be,
    and out-of-range values route their tokens to no adapter, counted in ``groups.out_of_range``.
    """
    _check_integer_index(adapter_index, "(...)")
    if isinstance(num_adapters, bool) or not isinstance(num_adapters, int) or num_adapters < 1:
        raise ValueError(f"num_adapters: expected a positive int, got {num_adapters!r}")
    check_index_range(adapter_index, num_adapters)
    return TokenGroups._create(_MAKE, adapter_index, num_adapters)


def per_token_index(adapter_index, x: Tensor) -> Tensor:
    """``adapter_index`` given per token (x.shape[:-1]) or per sequence (x.shape[:1], for x of 3 or more
    dims), as one value per token, flattened (T,)."""
    expected = f"{tuple(x.shape[:-1])} or {tuple(x.shape[:1])}"
    _check_integer_index(adapter_index, expected)
    if adapter_index.device != x.device:
        raise ValueError(f"adapter_index: expected device {x.device} (x's device), got {adapter_index.device}")
    if adapter_index.shape == x.shape[:-1]:
        per_token = adapter_index
    elif x.dim() >= 3 and adapter_index.shape == x.shape[:1]:
        per_token = adapter_index.reshape((-1,) + (1,) * (x.dim() - 2)).expand(x.shape[:-1])
    else:
        raise ValueError(
            f"adapter_index: expected shape {tuple(x.shape[:-1])} (per token) or {tuple(x.shape[:1])} (per sequence), "
            f"got {tuple(adapter_index.shape)}"
        )
    return per_token.reshape(-1)
