"""``python -m adapterkern.bench multi``: many adapters at once against the Python loops users write.

At one point (default T=4096, d=1024, r=64 on a GPU; T=512, d=768 on a CPU), N adapters (default 8):

* stack: N adapters on the same input, outputs (N, T, d)
  - ``loop``: N eager adapters (Linear -> act -> Linear, * s, + x), one after the other
  - ``multi_adapter``: :func:`adapterkern.multi_adapter`, one launch
  - ``one adapter``: a single adapter, the yardstick (N adapters in one launch against the time of one)
* batch: a heterogeneous batch, T tokens spread over N adapters (per-sequence routing, 8 sequences per
  adapter, each task's sequences contiguous, as the library's ``BatchSplit`` requires)
  - ``masked loop``: per adapter, index_select its rows, eager adapter, index_copy back
  - ``adapters BatchSplit``: when the ``adapters`` library is installed, its own bottleneck layer
    (``adapters.methods.modeling.Adapter``) on each task's slice and a concatenation, which is what
    its ``BatchSplit`` block does (``compose_batch_split``)
  - ``batched``: :func:`adapterkern.bottleneck_adapter_batched`, one launch (token groups precomputed once
    per batch, as the model integration does)
* mix: a static mix ``x + sum_n w[n] * s * up_n(...)`` (weights of shape (N,))
  - ``loop mix``: N eager adapters, weighted and summed
  - ``stack + einsum``: :func:`adapterkern.multi_adapter` with per-token weights (all rows equal): the
    (N, T, d) stack, then a PyTorch reduction
  - ``folded mix``: :func:`adapterkern.multi_adapter` with weights (N,): one adapter of rank N*r, one launch
* fusion: AdapterFusion (dynamic) over the N adapters' outputs
  - ``eager fusion``: N eager adapters, then the ``adapters`` library's formula written out (keys and
    values per adapter, softmax over N), or the library's own ``BertFusion`` when it is installed
  - ``adapterkern fusion``: :func:`adapterkern.nn.fusion.fuse_adapters` (one multi_adapter launch, then
    the fusion in d-space: 3 d x d matmuls instead of 2N + 1)

Every variant of a group is timed in alternation and checked against the loop's output. Each op runs on
the backend ``--backend`` resolves to for it (auto's choice for an op that backend has no kernel for);
the CSV's ``backend`` column says which.
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

import adapterkern as ak
from adapterkern.activations import get_activation
from adapterkern.backends import BATCHED, MULTI, SINGLE
from adapterkern.nn import BottleneckAdapter
from adapterkern.nn.fusion import AdapterFusion, fuse_adapters

from . import common, timing
from .impls import AdaptersLibraryAdapter, EagerAdapter, adapters_library_reason
from .report import append_csv

COLUMNS = [
    *common.PROVENANCE, "dtype", "group", "variant", "backend", "adapters", "tokens", "hidden", "bottleneck",
    "median_us", "iqr_us", "rounds", "speedup_vs_loop", "ratio_vs_one_adapter", "max_rel_diff",
]
Variants = Dict[str, Tuple[Callable[[], torch.Tensor], str]]  # label -> (call, adapterkern backend or "")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapterkern.bench multi", description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--tokens", type=int, help="default 4096 on GPU, 512 on CPU")
    p.add_argument("--hidden", type=int, help="default 1024 on GPU, 768 on CPU")
    p.add_argument("--bottleneck", type=int, default=64)
    p.add_argument("--activation", default="relu")
    common.add_subcommand_args(p, "multi", rounds=7)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``multi``: median time (us) of every variant of each group, its speed-up over the group's loop and
    its ratio to one adapter; outputs checked against the loop's (max relative difference)."""
    args = parser().parse_args(argv)
    run = common.start(args, "multi")
    device, dtype = run.device, run.dtype
    single, multi, batched = (run.backend(args.backend, op) for op in (SINGLE, MULTI, BATCHED))
    n, r = args.adapters, args.bottleneck
    t = args.tokens or (4096 if device.type == "cuda" else 512)
    d = args.hidden or (1024 if device.type == "cuda" else 768)
    gen = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    x = rand(t, d)
    w_down, b_down = rand(n, r, d, scale=d**-0.5), rand(n, r, scale=0.1)
    w_up, b_up = rand(n, d, r, scale=r**-0.5), rand(n, d, scale=0.1)
    scaling = 0.5
    act = get_activation(args.activation).fn
    adapter_kw = dict(activation=args.activation, scaling=scaling)

    def eager(i, rows):
        return rows + scaling * F.linear(act(F.linear(rows, w_down[i], b_down[i])), w_up[i], b_up[i])

    def one_adapter(inputs):
        return lambda: ak.bottleneck_adapter(inputs, w_down[0], b_down[0], w_up[0], b_up[0], backend=single,
                                             **adapter_kw)

    sequences = 8 * n
    seq_len = max(1, t // sequences)
    index = torch.arange(n, device=device).repeat_interleave(8)  # contiguous per task (BatchSplit's layout)
    token_index = index.repeat_interleave(seq_len)
    tokens_b = token_index.numel()
    xb = x[:tokens_b]
    groups = ak.token_groups(token_index, n)
    rows_of = [(token_index == i).nonzero().flatten() for i in range(n)]

    def masked_loop():
        out = xb.clone()
        for i, rows in enumerate(rows_of):
            out.index_copy_(0, rows, eager(i, xb.index_select(0, rows)))
        return out

    stack_variants: Variants = {
        "loop": (lambda: torch.stack([eager(i, x) for i in range(n)]), ""),
        "multi_adapter": (lambda: ak.multi_adapter(x, w_down, b_down, w_up, b_up, backend=multi, **adapter_kw), multi),
        "one adapter": (one_adapter(x), single),
    }
    batch_variants: Variants = {"masked loop": (masked_loop, "")}
    if adapters_library_reason() is None:
        library = []
        for i in range(n):
            e = EagerAdapter(d, r, args.activation, scaling)
            with torch.no_grad():
                e.down.weight.copy_(w_down[i]), e.down.bias.copy_(b_down[i])
                e.up.weight.copy_(w_up[i]), e.up.bias.copy_(b_up[i])
            library.append(AdaptersLibraryAdapter(e).to(device=device, dtype=dtype))
        sizes = [len(rows) for rows in rows_of]

        def batch_split():
            return torch.cat([lib(part) for lib, part in zip(library, xb.split(sizes))])

        batch_variants["adapters BatchSplit"] = (batch_split, "")
    batch_variants.update({
        "batched": (lambda: ak.bottleneck_adapter_batched(xb, token_index, w_down, b_down, w_up, b_up, groups=groups,
                                                          backend=batched, **adapter_kw), batched),
        "one adapter": (one_adapter(xb), single),
    })

    modules = []
    for i in range(n):
        a = BottleneckAdapter(d, r, activation=args.activation, scaling=scaling, backend=multi, device=device,
                              dtype=dtype)
        with torch.no_grad():
            a.adapter_down.weight.copy_(w_down[i]), a.adapter_down.bias.copy_(b_down[i])
            a.adapter_up.weight.copy_(w_up[i]), a.adapter_up.bias.copy_(b_up[i])
        modules.append(a)
    fusion = AdapterFusion(d, n, "dynamic", device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(torch.randn(p.shape, generator=gen, device=device).to(dtype) * 0.02)
    fusion.reduction = 0.0  # a fixed temperature, so repeated calls compute the same thing
    library_fusion = None
    try:  # the adapters library's own layer, when installed (the adapterhub extra)
        from adapters.configuration import AdapterFusionConfig
        from adapters.methods.modeling import BertFusion

        library_fusion = BertFusion(AdapterFusionConfig.load("dynamic"), d, 0.0).to(device=device, dtype=dtype).eval()
        library_fusion.load_state_dict(fusion.state_dict(), strict=False)
        library_fusion.T, library_fusion.reduction = fusion.T, 0.0
    except Exception:  # noqa: BLE001 - not installed, or another version's layout
        library_fusion = None

    def eager_fusion():
        ups = torch.stack([eager(i, x) - x for i in range(n)], dim=-2)  # (T, N, d)
        if library_fusion is not None:
            out = library_fusion(x[None], ups[None], ups[None], x[None])  # it wants (batch, T, N, d)
            return (out[0] if isinstance(out, tuple) else out)[0]
        q, k, v = fusion.query(x), fusion.key(ups), fusion.value(ups)
        probs = torch.softmax((q.unsqueeze(-2) * k).sum(-1) / fusion.T, dim=-1)
        return x + (probs.unsqueeze(-1) * v).sum(-2)

    fusion_variants: Variants = {
        "eager fusion" if library_fusion is None else "adapters BertFusion": (eager_fusion, ""),
        "adapterkern fusion": (lambda: fuse_adapters(x, modules, fusion), multi),
        "one adapter": stack_variants["one adapter"],
    }
    # A static mix sum_n w[n] * adapter_n(x): the loop, the (N, T, d) stack mixed by an einsum (per-token
    # weights, here all rows equal), and the fold into one adapter of rank N*r (weights of shape (N,)).
    mix = torch.softmax(torch.randn(n, generator=gen, device=device), 0).to(dtype)
    mix_variants: Variants = {
        "loop mix": (lambda: x + sum(mix[i] * (eager(i, x) - x) for i in range(n)), ""),
        "stack + einsum": (lambda: ak.multi_adapter(x, w_down, b_down, w_up, b_up, weights=mix.expand(t, n),
                                                    backend=multi, **adapter_kw), multi),
        "folded mix": (lambda: ak.multi_adapter(x, w_down, b_down, w_up, b_up, weights=mix, backend=multi,
                                                **adapter_kw), multi),
        "one adapter": stack_variants["one adapter"],
    }
    rows: List[Dict[str, object]] = []
    run.say(f"N={n} adapters, T={t}, d={d}, r={r}, {common.dtype_name(dtype)} on {device}; "
            f"{args.rounds} alternating rounds")
    for group, variants, tokens in (("stack", stack_variants, t), ("batch", batch_variants, tokens_b),
                                    ("mix", mix_variants, t), ("fusion", fusion_variants, t)):
        with torch.inference_mode():
            outs = {k: f().float() for k, (f, _) in variants.items()}
            times = timing.interleaved([f for f, _ in variants.values()], device, rounds=args.rounds,
                                       min_block_s=args.block_ms / 1e3)
        loop_key = next(iter(variants))
        t_loop, t_one = times[0].median_s, times[-1].median_s
        for (label, (_, backend)), tm in zip(variants.items(), times):
            ref = outs[loop_key] if label != "one adapter" else outs[label]
            diff = ((outs[label] - ref).abs().max() / ref.abs().max()).item()
            rows.append(run.row(
                group=group, variant=label, backend=backend, adapters=n, tokens=tokens, hidden=d, bottleneck=r,
                median_us=tm.median_s * 1e6, iqr_us=tm.iqr_s * 1e6, rounds=tm.samples,
                speedup_vs_loop=t_loop / tm.median_s, ratio_vs_one_adapter=tm.median_s / t_one, max_rel_diff=diff,
            ))
    path = append_csv(run.csv, rows, COLUMNS)
    return run.finish(format_table(rows), rows, path, "rel diff against the loop's output")


def format_table(rows: List[Dict[str, object]]) -> str:
    """One line per variant, grouped as measured."""
    header = ["group", "variant", "median us", "IQR us", "vs loop", "vs one adapter", "rel diff"]
    body = [[str(r["group"]), str(r["variant"]), f"{r['median_us']:,.1f}", f"{r['iqr_us']:,.1f}",
             f"{r['speedup_vs_loop']:.2f}x", f"{r['ratio_vs_one_adapter']:.2f}x", f"{r['max_rel_diff']:.1e}"] for r in rows]
    return common.text_table(header, body)
