"""``python -m adapterkern.bench layer``: what an adapter costs inside a real transformer layer.

A BERT-base encoder layer and a Llama-7B-sized decoder layer (random weights from ``transformers``
configs, no downloads), each run three ways: without an adapter, with an eager adapter and with an
adapterkern adapter (Pfeiffer placement, see :mod:`adapterkern.bench.models`; bottleneck d/16 by
default). Prints each variant's median and its overhead as a percent of the layer without adapters,
at batch 1 x 128 tokens and 32 x 512. The three variants are timed in alternation (ABCABC...) so a
shared machine's drift cancels out of the differences. On CPU, ``--quick`` (the default) uses 1 x 128
and 4 x 128 and a Llama layer of d=1024 instead; ``--full`` runs the real sizes.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch

from adapterkern.backends import SINGLE

from . import common, models, timing
from .models import BERT_BASE, LLAMA_7B, LLAMA_SMALL, add_adapters, build_layer
from .report import append_csv

COLUMNS = [
    *common.PROVENANCE, "transformers", "malloc", "mode", "dtype", "model", "hidden", "intermediate", "batch",
    "seq", "bottleneck", "variant", "backend", "median_ms", "iqr_ms", "rounds", "overhead_pct", "max_rel_diff",
]
VARIANTS = {"none": "no adapter", "eager": "eager adapter", "fused": "adapterkern adapter"}


def _parse_batches(text: str) -> List[tuple]:
    """``"1x128,32x512"`` -> ``[(1, 128), (32, 512)]`` (batch, sequence length)."""
    out = []
    for item in text.split(","):
        b, s = item.lower().split("x")
        out.append((int(b), int(s)))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapterkern.bench layer", description=__doc__.splitlines()[0])
    common.add_size_args(p, quick="default; smaller sizes on CPU", full="the real sizes everywhere")
    p.add_argument("--models", default="bert,llama", help="bert, llama or both (default both)")
    p.add_argument("--batches", help="comma-separated BxS (default 1x128,32x512; CPU --quick 1x128,4x128)")
    p.add_argument("--reduction-factor", type=int, default=16, help="bottleneck r = d / this (default 16)")
    p.add_argument("--activation", default="relu")
    p.add_argument("--mode", default="fwd", choices=("fwd", "fwd_bwd"),
                   help="fwd: inference; fwd_bwd: frozen backbone, gradients for the input and the adapter")
    common.add_subcommand_args(p, "layer", rounds=None,
                               rounds_help="alternating rounds per point (default 7 quick, 15 full)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``layer``: median time (ms) of each layer without / with an eager / with an adapterkern adapter, and
    the adapters' overhead in percent of the layer without; rows appended to the CSV point by point."""
    args = parser().parse_args(argv)
    run = common.start(args, "layer", requires=models.transformers_reason)
    if run is None:
        return 0
    import transformers  # present: models.transformers_reason() said so

    device, dtype = run.device, run.dtype
    cpu_quick = device.type == "cpu" and not args.full
    batches = _parse_batches(args.batches) if args.batches else ([(1, 128), (4, 128)] if cpu_quick
                                                                 else [(1, 128), (32, 512)])
    specs = []
    for m in args.models.split(","):
        m = m.strip()
        if m == "bert":
            specs.append(BERT_BASE)
        elif m == "llama":
            specs.append(LLAMA_SMALL if cpu_quick else LLAMA_7B)
        else:
            raise SystemExit(f"--models: unknown model {m!r}; expected bert or llama")
    rounds = args.rounds or (15 if args.full else 7)
    block_s = args.block_ms / 1000
    train = args.mode == "fwd_bwd"
    backend = run.backend(args.backend, SINGLE)
    run.say(f"{args.mode}, {common.dtype_name(dtype)} on {run.env['device']}; adapterkern backend "
            f"{backend}; {rounds} alternating rounds per point")

    rows: List[Dict[str, object]] = []
    csv_path = run.csv
    for spec in specs:
        r = max(1, spec.hidden // args.reduction_factor)
        torch.manual_seed(0)
        try:
            base, call = build_layer(spec, device, dtype)
        except Exception as exc:  # noqa: BLE001 - e.g. an older transformers without these classes
            run.notes.append(f"{spec.name}: could not build the layer ({type(exc).__name__}: {exc})")
            continue
        variants = {"none": base}
        for kind in ("eager", "fused"):
            layer, _ = build_layer(spec, device, dtype)
            layer.load_state_dict(base.state_dict())
            adapters = add_adapters(layer, kind, r, args.activation, backend)
            variants[kind] = layer
            if kind == "fused":  # same adapter weights as the eager one
                adapters[0].eager.load_state_dict(eager_adapters[0].state_dict())
            else:
                eager_adapters = adapters
        for layer in variants.values():
            for p in layer.parameters():
                p.requires_grad_(False)
            if train:
                for m in layer.modules():
                    if type(m).__name__ == "EagerAdapter":
                        for p in m.parameters():
                            p.requires_grad_(True)
        for b, s in batches:
            gen = torch.Generator(device=device).manual_seed(1)
            x = torch.randn(b, s, spec.hidden, generator=gen, device=device).to(dtype)
            dy = torch.randn(b, s, spec.hidden, generator=gen, device=device).to(dtype) if train else None
            if train:
                x.requires_grad_(True)

            def make(layer):
                if not train:
                    def f():
                        with torch.inference_mode():
                            return call(layer, x)
                    return f
                trainable = [x, *[p for p in layer.parameters() if p.requires_grad]]

                def g():
                    y = call(layer, x)
                    torch.autograd.grad(y, trainable, dy)
                    return y
                return g

            fns = [make(v) for v in variants.values()]
            label = f"{spec.name} {b}x{s}"
            run.say(f"{label}: r={r} ...")
            try:
                with torch.no_grad():
                    outs = [call(v, x).float() for v in variants.values()]
                times = timing.interleaved(fns, device, rounds=rounds, min_block_s=block_s)
            except Exception as exc:  # noqa: BLE001
                run.note(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            t_none = times[0].median_s
            first_new = len(rows)
            for (name, _), t, out in zip(variants.items(), times, outs):
                diff = ((out - outs[1]).abs().max() / outs[1].abs().max()).item() if name != "none" else 0.0
                rows.append(run.row(
                    transformers=transformers.__version__, mode=args.mode, model=spec.name, hidden=spec.hidden,
                    intermediate=spec.intermediate, batch=b, seq=s, bottleneck=r if name != "none" else 0,
                    variant=VARIANTS[name], backend=backend if name == "fused" else "",
                    median_ms=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, rounds=t.samples,
                    overhead_pct=100.0 * (t.median_s / t_none - 1.0), max_rel_diff=diff,
                ))
            # point by point: a run that is killed keeps every finished point
            csv_path = append_csv(csv_path, rows[first_new:], COLUMNS)
            del x, dy, outs
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del variants, base
    return run.finish(format_table(rows), rows, csv_path,
                      "overhead = median with adapter / median without - 1, each variant timed in alternation; "
                      "max_rel_diff compares the adapterkern layer's output with the eager one's",
                      transformers=transformers.__version__)


def format_table(rows: List[Dict[str, object]]) -> str:
    """One line per variant and point, a blank line between points."""
    header = ["model", "batch", "d", "r", "variant", "median ms", "IQR ms", "overhead", "rel diff"]
    cells = []
    for r in rows:
        cells.append([
            f"{r['model']}", f"{r['batch']}x{r['seq']}", str(r["hidden"]), str(r["bottleneck"] or "-"),
            str(r["variant"]) + (f" ({r['backend']})" if r["backend"] else ""),
            f"{float(r['median_ms']):,.3f}", f"{float(r['iqr_ms']):,.3f}",
            "-" if r["variant"] == "no adapter" else f"{float(r['overhead_pct']):+.1f}%",
            "-" if r["variant"] != "adapterkern adapter" else f"{float(r['max_rel_diff']):.1e}",
        ])
    return common.text_table(header, cells, left=5, group=2)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
