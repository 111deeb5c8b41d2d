"""``python -m adapterkern.bench adapterdrop``: AdapterDrop's multi-task inference speed-up.

N task adapters (default 8, Pfeiffer placement) on a BERT-base-sized 12-layer encoder (random
weights, no downloads). Each run answers the same batch for all N tasks:

* ``loop``: N forward passes, one adapter active in each (what one would write without sharing);
* ``drop k``: :func:`adapterkern.multi_task_forward` with the adapters of the lowest k layers dropped:
  layers 0..k-1 run once on the batch, layers k..11 on the batch tiled N times, every adapter place
  serving the N adapters in one launch (:func:`adapterkern.bottleneck_adapter_batched`).

All variants are timed in alternation; the speed-up is relative to ``drop 0``. The adapters run on the
backend ``--backend`` resolves to for the batched op (auto's choice if it has no kernel for it). Rücklé et al. 2021
report, for 8 tasks at once with adapters dropped from the first five layers, 39% faster inference
(BERT-base, GPU); see benchmarks/NOTES.md.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch

import adapterkern as ak
from adapterkern.backends import BATCHED

from . import common, models, timing
from .models import bert_model
from .report import append_csv

COLUMNS = [
    *common.PROVENANCE, "dtype", "tasks", "layers", "hidden", "batch", "seq", "bottleneck", "backend", "variant",
    "drop_layers", "median_ms", "iqr_ms", "rounds", "speedup_vs_drop0", "max_rel_diff",
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapterkern.bench adapterdrop", description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--drops", default="0,3,5", help="comma-separated k: adapters dropped from layers 0..k-1")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--batch", type=int, help="sequences per task batch (default 1 on CPU, 8 on GPU)")
    p.add_argument("--seq", type=int, help="tokens per sequence (default 64 on CPU, 128 on GPU)")
    p.add_argument("--reduction-factor", type=int, default=16)
    p.add_argument("--no-loop", action="store_true", help="skip the N-pass loop baseline")
    common.add_subcommand_args(p, "adapterdrop", rounds=5)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``adapterdrop``: median time (ms) of answering one batch for every task, per variant, its speed-up
    over ``drop 0``, and its output's max relative difference from N passes with the same layers dropped."""
    args = parser().parse_args(argv)
    run = common.start(args, "adapterdrop", requires=models.transformers_reason)
    if run is None:
        return 0
    device, dtype = run.device, run.dtype
    batch = args.batch or (8 if device.type == "cuda" else 1)
    seq = args.seq or (128 if device.type == "cuda" else 64)
    drops = [int(k) for k in args.drops.split(",")]
    if any(not 0 <= k < args.layers for k in drops):
        raise SystemExit(f"--drops: each k must lie in [0, {args.layers - 1}]")
    if 0 not in drops:
        drops = [0] + drops
    # one backend for the loop's single-adapter calls and the shared passes' batched ones alike
    backend = run.backend(args.backend, BATCHED)

    torch.manual_seed(0)
    model = bert_model(args.layers, device, dtype).eval()
    hidden = model.config.hidden_size
    r = max(1, hidden // args.reduction_factor)
    names = [f"task{i}" for i in range(args.tasks)]
    for name in names:
        ak.add_adapter(model, name, ak.AdapterConfig.pfeiffer(bottleneck_size=r, backend=backend))
    with torch.no_grad():  # non-identity adapters, so that every variant's output is checked for real
        for p in (p for n, p in model.named_parameters() if "bottleneck_adapters" in n):
            p.normal_(0.0, 0.02)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)

    def loop():
        outs = []
        for name in names:
            ak.set_active_adapter(model, name)
            outs.append(model(input_ids=ids, attention_mask=mask).last_hidden_state)
        return torch.cat(outs)

    def shared(k):
        def f():
            return ak.multi_task_forward(model, names, drop_layers=k, input_ids=ids, attention_mask=mask).last_hidden_state
        return f

    variants = {f"drop {k}": (k, shared(k)) for k in drops}
    if not args.no_loop:
        variants = {"loop (N passes)": (0, loop), **variants}
    with torch.inference_mode():
        outs = {label: fn().float() for label, (_, fn) in variants.items()}
        # correctness next to speed: each drop k against N passes with the same k dropped
        refs = {}
        for k in drops:
            ak.set_adapter_drop(model, k)
            refs[k] = loop().float()
        ak.set_adapter_drop(model, 0)
        run.say(f"{args.tasks} tasks x batch {batch} x {seq} tokens, {args.layers} layers, d={hidden}, r={r}, "
                f"{common.dtype_name(dtype)} on {device}; {args.rounds} alternating rounds")
        times = timing.interleaved([fn for _, fn in variants.values()], device, rounds=args.rounds,
                                   min_block_s=args.block_ms / 1e3)
    t0 = times[list(variants).index("drop 0")].median_s
    rows: List[Dict[str, object]] = []
    for (label, (k, _)), t in zip(variants.items(), times):
        ref = refs[k]
        diff = ((outs[label] - ref).abs().max() / ref.abs().max()).item()
        rows.append(run.row(
            tasks=args.tasks, layers=args.layers, hidden=hidden, batch=batch, seq=seq, bottleneck=r, backend=backend,
            variant=label, drop_layers=k, median_ms=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, rounds=t.samples,
            speedup_vs_drop0=t0 / t.median_s, max_rel_diff=diff,
        ))
    path = append_csv(run.csv, rows, COLUMNS)
    return run.finish(
        format_table(rows), rows, path,
        "speed-up = median of drop 0 / median of the variant (each timed in alternation); rel diff = "
        "max |out - N passes with the same layers dropped| / max |out|",
        "Rücklé et al. 2021 (AdapterDrop): 8 tasks at once, adapters dropped from the first 5 layers: 39% faster")


def format_table(rows: List[Dict[str, object]]) -> str:
    """One line per variant."""
    header = ["variant", "median ms", "IQR ms", "speed-up vs drop 0", "rel diff"]
    body = [[str(r["variant"]), f"{r['median_ms']:,.2f}", f"{r['iqr_ms']:,.2f}", f"{r['speedup_vs_drop0']:.2f}x",
             f"{r['max_rel_diff']:.1e}"] for r in rows]
    return common.text_table(header, body)
