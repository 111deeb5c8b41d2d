"""``python -m adapterkern.bench multi``: many adapters at once against the Python loops users write.

At one point (default T=4096, d=1024, r=64 on a GPU; T=512, d=768 on a CPU), N adapters (default 8):

* stack: N adapters on the same input, outputs (N, T, d)
  - ``loop``: N eager adapters (Linear -> act -> Linear, * s, + x), one after the other
  - ``multi_adapter``: :func:`adapterkern.multi_adapter`, one launch
  - ``one adapter``: a single adapter, the yardstick of the issue's target (N in one launch within 1.5x of one)
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

Every variant of a group is timed in alternation and checked against the loop's output.
"""
from __future__ import annotations

import argparse
import uuid
from typing import Dict, List, Optional

COLUMNS = [
    "run_id", "date", "device", "device_type", "threads", "torch", "triton", "cuda", "adapterkern", "git_commit",
    "dtype", "group", "variant", "backend", "adapters", "tokens", "hidden", "bottleneck", "median_us", "iqr_us",
    "rounds", "speedup_vs_loop", "ratio_vs_one_adapter", "max_rel_diff",
]


def parser() -> argparse.ArgumentParser:
    from .cli import add_alternating_args

    p = argparse.ArgumentParser(prog="python -m adapterkern.bench multi", description=__doc__.splitlines()[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--tokens", type=int, help="default 4096 on GPU, 512 on CPU")
    p.add_argument("--hidden", type=int, help="default 1024 on GPU, 768 on CPU")
    p.add_argument("--bottleneck", type=int, default=64)
    p.add_argument("--activation", default="relu")
    p.add_argument("--backend", default="auto")
    add_alternating_args(p, "multi", rounds=7)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    import torch
    import torch.nn.functional as F

    import adapterkern as ak
    from adapterkern.activations import get_activation

    from . import timing
    from .cli import _device, default_csv
    from .envinfo import environment
    from .grid import default_dtype
    from .report import append_csv

    device = _device(args.device)
    for note in timing.prepare_cpu(device, args.threads, args.malloc):
        print(f"note: {note}")
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype(device)
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

    def eager(i, rows):
        return rows + scaling * F.linear(act(F.linear(rows, w_down[i], b_down[i])), w_up[i], b_up[i])

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

    stack_variants = {
        "loop": lambda: torch.stack([eager(i, x) for i in range(n)]),
        "multi_adapter": lambda: ak.multi_adapter(x, w_down, b_down, w_up, b_up, activation=args.activation,
                                                  scaling=scaling, backend=args.backend),
        "one adapter": lambda: ak.bottleneck_adapter(x, w_down[0], b_down[0], w_up[0], b_up[0],
                                                     activation=args.activation, scaling=scaling, backend=args.backend),
    }
    batch_variants = {"masked loop": masked_loop}
    from .impls import AdaptersLibraryAdapter, EagerAdapter, adapters_library_reason

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

        batch_variants["adapters BatchSplit"] = batch_split
    batch_variants.update({
        "batched": lambda: ak.bottleneck_adapter_batched(xb, token_index, w_down, b_down, w_up, b_up, activation=args.activation,
                                                         scaling=scaling, groups=groups, backend=args.backend),
        "one adapter": lambda: ak.bottleneck_adapter(xb, w_down[0], b_down[0], w_up[0], b_up[0],
                                                     activation=args.activation, scaling=scaling, backend=args.backend),
    })
    from adapterkern.nn import BottleneckAdapter
    from adapterkern.nn.fusion import AdapterFusion, fuse_adapters

    modules = []
    for i in range(n):
        a = BottleneckAdapter(d, r, activation=args.activation, scaling=scaling, backend=args.backend, device=device, dtype=dtype)
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

    fusion_variants = {
        "eager fusion" if library_fusion is None else "adapters BertFusion": eager_fusion,
        "adapterkern fusion": lambda: fuse_adapters(x, modules, fusion),
        "one adapter": stack_variants["one adapter"],
    }
    # A static mix sum_n w[n] * adapter_n(x): the loop, the (N, T, d) stack mixed by an einsum (per-token
    # weights, here all rows equal), and the fold into one adapter of rank N*r (weights of shape (N,)).
    mix = torch.softmax(torch.randn(n, generator=gen, device=device), 0).to(dtype)
    mix_variants = {
        "loop mix": lambda: x + sum(mix[i] * (eager(i, x) - x) for i in range(n)),
        "stack + einsum": lambda: ak.multi_adapter(x, w_down, b_down, w_up, b_up, activation=args.activation, scaling=scaling,
                                                   weights=mix.expand(t, n), backend=args.backend),
        "folded mix": lambda: ak.multi_adapter(x, w_down, b_down, w_up, b_up, activation=args.activation, scaling=scaling,
                                               weights=mix, backend=args.backend),
        "one adapter": stack_variants["one adapter"],
    }
    env = environment(device)
    run_id = uuid.uuid4().hex[:8]
    rows: List[Dict[str, object]] = []
    print(f"[multi] N={n} adapters, T={t}, d={d}, r={r}, {str(dtype).replace('torch.', '')} on {device}; "
          f"{args.rounds} alternating rounds", flush=True)
    for group, variants, tokens in (("stack", stack_variants, t), ("batch", batch_variants, tokens_b),
                                    ("mix", mix_variants, t), ("fusion", fusion_variants, t)):
        with torch.inference_mode():
            outs = {k: f().float() for k, f in variants.items()}
            times = timing.interleaved(list(variants.values()), device, rounds=args.rounds, min_block_s=args.block_ms / 1e3)
        loop_key = next(iter(variants))
        t_loop, t_one = times[0].median_s, times[-1].median_s
        for (label, _), tm in zip(variants.items(), times):
            ref = outs[loop_key] if label != "one adapter" else outs[label]
            diff = ((outs[label] - ref).abs().max() / ref.abs().max()).item()
            rows.append({
                "run_id": run_id, **env, "dtype": str(dtype).replace("torch.", ""), "group": group, "variant": label,
                "backend": "" if "loop" in label else args.backend, "adapters": n, "tokens": tokens, "hidden": d,
                "bottleneck": r, "median_us": tm.median_s * 1e6, "iqr_us": tm.iqr_s * 1e6, "rounds": tm.samples,
                "speedup_vs_loop": t_loop / tm.median_s, "ratio_vs_one_adapter": tm.median_s / t_one, "max_rel_diff": diff,
            })
    csv_path = append_csv(args.csv or default_csv("multi", device), rows, COLUMNS)
    print()
    print(format_table(rows))
    print(f"note: {env['device']}, torch {env['torch']}, commit {env['git_commit'] or '?'}; run {run_id}; "
          "rel diff against the loop's output")
    print(f"wrote {len(rows)} rows to {csv_path}")
    return 0


def format_table(rows: List[Dict[str, object]]) -> str:
    header = ["group", "variant", "median us", "IQR us", "vs loop", "vs one adapter", "rel diff"]
    body = [[str(r["group"]), str(r["variant"]), f"{r['median_us']:,.1f}", f"{r['iqr_us']:,.1f}",
             f"{r['speedup_vs_loop']:.2f}x", f"{r['ratio_vs_one_adapter']:.2f}x", f"{r['max_rel_diff']:.1e}"] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(b) for b in body])
