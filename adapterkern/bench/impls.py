"""The implementations the benchmark puts side by side, each built on the same weights.

Names (``--impl`` takes a comma-separated list of these or of glob patterns such as ``adapterkern-*``):

=========================  ======================================================================
``eager``                  what users write: ``nn.Linear`` -> activation -> ``nn.Linear``, then
                           ``* scaling``, then ``+ residual`` (:class:`EagerAdapter`). Always run:
                           it is the baseline of every speedup and of the error check.
``adapters``               the AdapterHub ``adapters`` library's ``adapters.methods.modeling.Adapter``
                           (sequential bottleneck, Pfeiffer config), when that package is installed.
``compile``                ``torch.compile(eager)`` in the default mode, specialised to the shape
                           (``dynamic=False``; dynamo is reset before each point so no cache limit
                           ever sends it back to eager).
``compile-max-autotune``   the same with ``mode="max-autotune"`` (that mode already runs the compiled
                           graph under CUDA graphs). By default only in ``--full`` on GPU; else when named.
``adapterkern-<backend>``  ``adapterkern.bottleneck_adapter(..., backend=<backend>)`` for each backend
                           in ``adapterkern.available_backends(device)``. On CPU the ``triton`` backend
                           runs in the Triton interpreter (a correctness tool, not a fast path), so it
                           is only run when named explicitly.
``adapterkern-triton-nodecode``  the triton backend with its decode kernels off (``ADAPTERKERN_TRITON_DECODE=off``):
                           the one-row-tile kernel at T <= 64 too, timed beside ``adapterkern-triton``.
``adapterkern-triton-rowtile``  the triton backend's forward with one program per row tile (``ADAPTERKERN_TRITON_FORWARD=rowtile``):
                           every tile at once, x's second read unbounded by the L2, the residual load outside
                           the pipeline; timed beside the L2-resident schedule of ``adapterkern-triton``.
``adapterkern-cuda-nodecode``  the cuda backend without its d-split decode launch (``ADAPTERKERN_CUDA_DECODE=off``).
``adapterkern-cuda-scalar``  the cuda backend's scalar-memory forward and token-backward kernels
                           (``ADAPTERKERN_CUDA_VECTOR=off``: 2-byte loads and stores, register-staged k-stages)
                           where the vectorised ones (16-byte cp.async, ldmatrix, 16-byte epilogue) would run.
``adapterkern-cuda-nocluster``  the cuda backend without thread-block clusters (``ADAPTERKERN_CUDA_CLUSTER=off``):
                           at large d the vectorised one-block kernels, which re-read x for the forward's
                           residual and dy in the backward's second phase.
``<impl>+graph``           CUDA only, T <= ``--graph-max-tokens``: the same calls captured in a CUDA graph.
=========================  ======================================================================
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ..activations import get_activation

Forward = Callable[[torch.Tensor], torch.Tensor]


class EagerAdapter(nn.Module):
    """The bottleneck adapter as users write it in eager PyTorch (the baseline)."""

    def __init__(self, hidden_size: int, bottleneck_size: int, activation: str = "relu", scaling: float = 1.0):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.act = get_activation(activation).fn
        self.up = nn.Linear(bottleneck_size, hidden_size)
        self.scaling = scaling
        self.activation = activation

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        out = self.up(self.act(self.down(x))) * self.scaling
        return out + (x if residual is None else residual)


class FusedAdapter(nn.Module):
    """``adapterkern.bottleneck_adapter`` on the parameters of an :class:`EagerAdapter` (shared, not copied);
    ``env``: environment settings in force during each call (e.g. the Triton decode switch)."""

    def __init__(self, eager: EagerAdapter, backend: str = "auto", env: Optional[dict] = None):
        super().__init__()
        self.eager = eager
        self.backend = backend
        self.env = dict(env or {})

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        import adapterkern

        e = self.eager
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            return adapterkern.bottleneck_adapter(
                x, e.down.weight, e.down.bias, e.up.weight, e.up.bias,
                activation=e.activation, scaling=e.scaling, residual=residual, backend=self.backend,
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def adapters_library_reason() -> Optional[str]:
    """None when ``adapters.methods.modeling.Adapter`` can be imported, else why not."""
    try:
        import adapters.methods.modeling  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure (missing, incompatible transformers) means skip
        return f"the AdapterHub `adapters` package is not importable ({type(exc).__name__}: {exc})"
    return None


class AdaptersLibraryAdapter(nn.Module):
    """The ``adapters`` library's bottleneck layer, loaded with an :class:`EagerAdapter`'s weights."""

    def __init__(self, eager: EagerAdapter):
        super().__init__()
        from adapters import SeqBnConfig
        from adapters.methods.modeling import Adapter

        d, r = eager.up.out_features, eager.up.in_features
        config = SeqBnConfig(reduction_factor=d / r, non_linearity=eager.activation, scaling=float(eager.scaling))
        self.inner = Adapter("bench", d, r, config)
        with torch.no_grad():
            linears = [m for m in self.inner.adapter_down if isinstance(m, nn.Linear)]
            linears[0].weight.copy_(eager.down.weight)
            linears[0].bias.copy_(eager.down.bias)
            self.inner.adapter_up.weight.copy_(eager.up.weight)
            self.inner.adapter_up.bias.copy_(eager.up.bias)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.inner(x, x if residual is None else residual)[0]


@dataclass
class Impl:
    name: str
    build: Callable[[EagerAdapter], Tuple[Forward, List[torch.Tensor]]]  # -> (forward, trainable params)
    compiled: bool = False  # needs torch._dynamo.reset() first
    graphable: bool = True  # a "+graph" variant makes sense


def _eager(e: EagerAdapter):
    return e, list(e.parameters())


def _adapters(e: EagerAdapter):
    m = AdaptersLibraryAdapter(e).to(device=e.up.weight.device, dtype=e.up.weight.dtype)
    return m, list(m.parameters())


def _compiled(mode: Optional[str]):
    def build(e: EagerAdapter):
        return torch.compile(e, mode=mode, dynamic=False), list(e.parameters())

    return build


def _fused(backend: str, env: Optional[dict] = None):
    def build(e: EagerAdapter):
        return FusedAdapter(e, backend, env), list(e.parameters())

    return build


def adapterkern_backends(device: torch.device) -> Tuple[List[str], Optional[str]]:
    """The adapterkern backends with a single-adapter kernel that can run on ``device`` (or [] and the
    reason there are none)."""
    try:
        from adapterkern.backends import SINGLE, available_backends, implements

        return [b for b in available_backends(device) if implements(b, SINGLE)], None
    except Exception as exc:  # noqa: BLE001 - the op not importable: report it, bench the rest
        return [], f"adapterkern.available_backends failed ({type(exc).__name__}: {exc})"


def all_impls(device: torch.device, full: bool = False) -> Tuple[List[Impl], List[Impl], List[str]]:
    """(default implementations, ones run only when named, notes about ones that cannot run here).

    ``compile-max-autotune`` is a default only for ``--full`` on CUDA: it autotunes every new shape
    (minutes over a grid), so the quick grid runs it only when named."""
    notes: List[str] = []
    default = [Impl("eager", _eager)]
    on_request: List[Impl] = []
    reason = adapters_library_reason()
    if reason is None:
        default.append(Impl("adapters", _adapters))
    else:
        notes.append(f"adapters: skipped, {reason}; install it with `pip install adapters` to compare")
    default.append(Impl("compile", _compiled(None), compiled=True))
    max_autotune = Impl("compile-max-autotune", _compiled("max-autotune"), compiled=True, graphable=False)
    (default if device.type == "cuda" and full else on_request).append(max_autotune)
    backends, reason = adapterkern_backends(device)
    if reason:
        notes.append(f"adapterkern-*: skipped, {reason}")
    for b in backends:
        impls = [Impl(f"adapterkern-{b}", _fused(b))]
        if b == "triton":  # the decode kernels against the row-tile kernel; the two forward schedules
            from ..backends.triton.bottleneck import DECODE_ENV, FORWARD_ENV

            impls.append(Impl("adapterkern-triton-nodecode", _fused(b, {DECODE_ENV: "off"})))
            impls.append(Impl("adapterkern-triton-rowtile", _fused(b, {FORWARD_ENV: "rowtile"})))
        if b == "cuda":  # the d-split decode path against the one-launch forward; both memory paths
            impls.append(Impl("adapterkern-cuda-nodecode", _fused(b, {"ADAPTERKERN_CUDA_DECODE": "off"})))
            impls.append(Impl("adapterkern-cuda-scalar", _fused(b, {"ADAPTERKERN_CUDA_VECTOR": "off"})))
            impls.append(Impl("adapterkern-cuda-nocluster", _fused(b, {"ADAPTERKERN_CUDA_CLUSTER": "off"})))
        if device.type == "cpu" and b == "triton":
            on_request += impls
            notes.append("adapterkern-triton: not run by default on CPU (Triton interpreter); name it in --impl to run")
        else:
            default += impls
    return default, on_request, notes


def select(patterns: Optional[List[str]], device: torch.device, full: bool = False) -> Tuple[List[Impl], List[str]]:
    """The implementations to run: ``eager`` first, then the defaults or those matching ``patterns``."""
    default, on_request, notes = all_impls(device, full)
    if not patterns:
        return default, notes
    candidates = default + on_request
    chosen = [candidates[0]]  # eager: the baseline
    for impl in candidates[1:]:
        if any(fnmatch.fnmatchcase(impl.name, p) for p in patterns):
            chosen.append(impl)
    known = {i.name for i in candidates} | {"eager"}
    for p in patterns:
        if not any(fnmatch.fnmatchcase(n, p) for n in known):
            notes.append(f"--impl {p}: matches nothing that can run on {device.type} "
                         f"(can run: {', '.join(sorted(known))})")
    return chosen, notes
