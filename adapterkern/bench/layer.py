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
import os
import time
import uuid
from typing import Dict, List, Optional

LAYER_COLUMNS = [
    "run_id", "date", "device", "device_type", "threads", "torch", "triton", "cuda", "adapterkern", "git_commit",
    "transformers", "malloc", "mode", "dtype", "model", "hidden", "intermediate", "batch", "seq", "bottleneck",
    "variant", "backend", "median_ms", "iqr_ms", "rounds", "overhead_pct", "max_rel_diff",
]


def _parse_batches(text: str):
    out = []
    for item in text.split(","):
        b, s = item.lower().split("x")
        out.append((int(b), int(s)))
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapterkern.bench layer", description=__doc__.splitlines()[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="default; smaller sizes on CPU")
    size.add_argument("--full", action="store_true", help="the real sizes everywhere")
    p.add_argument("--models", default="bert,llama", help="bert, llama or both (default both)")
    p.add_argument("--batches", help="comma-separated BxS (default 1x128,32x512; CPU --quick 1x128,4x128)")
    p.add_argument("--reduction-factor", type=int, default=16, help="bottleneck r = d / this (default 16)")
    p.add_argument("--activation", default="relu")
    p.add_argument("--backend", default="auto", help="adapterkern backend for the fused adapter (default auto)")
    p.add_argument("--mode", default="fwd", choices=("fwd", "fwd_bwd"),
                   help="fwd: inference; fwd_bwd: frozen backbone, gradients for the input and the adapter")
    p.add_argument("--dtype", help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device")
    p.add_argument("--rounds", type=int, help="alternating rounds per point (default 7 quick, 15 full)")
    p.add_argument("--block-ms", type=float, default=None, help="time per block of calls (default 50 ms)")
    p.add_argument("--threads", default="auto", help="CPU: torch threads (default auto, see the grid's --help)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    p.add_argument("--csv", help="append results here (default benchmarks/results/layer-<device>.csv)")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = parser().parse_args(argv)
    from .models import transformers_reason

    reason = transformers_reason()
    if reason:
        print(f"layer benchmark skipped: {reason}")
        return 0
    import torch
    import transformers

    from . import envinfo, grid, timing
    from .cli import _device, default_csv
    from .models import BERT_BASE, LLAMA_7B, LLAMA_SMALL, add_adapters, build_layer
    from .report import append_csv

    device = _device(args.device)
    notes: List[str] = timing.prepare_cpu(device, args.threads, args.malloc)
    dtype = grid.DTYPES[args.dtype] if args.dtype else grid.default_dtype(device)
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
    block_s = (args.block_ms or 50.0) / 1000
    env = envinfo.environment(device)
    run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
    train = args.mode == "fwd_bwd"
    try:
        import adapterkern
        from adapterkern.backends import resolve_backend

        backend = resolve_backend(args.backend, device)
    except Exception as exc:  # noqa: BLE001
        print(f"layer benchmark: the adapterkern op is not usable here ({type(exc).__name__}: {exc})")
        return 1
    del adapterkern
    print(f"[layer] {args.mode}, {str(dtype).replace('torch.', '')} on {env['device']}; adapterkern backend "
          f"{backend}; {rounds} alternating rounds per point", flush=True)

    rows: List[Dict[str, object]] = []
    csv_path = args.csv or default_csv("layer", device)
    for spec in specs:
        r = max(1, spec.hidden // args.reduction_factor)
        torch.manual_seed(0)
        try:
            base, run = build_layer(spec, device, dtype)
        except Exception as exc:  # noqa: BLE001 - e.g. an older transformers without these classes
            notes.append(f"{spec.name}: could not build the layer ({type(exc).__name__}: {exc})")
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
                            return run(layer, x)
                    return f
                trainable = [x, *[p for p in layer.parameters() if p.requires_grad]]

                def g():
                    y = run(layer, x)
                    torch.autograd.grad(y, trainable, dy)
                    return y
                return g

            fns = [make(v) for v in variants.values()]
            label = f"{spec.name} {b}x{s}"
            print(f"[layer] {label}: r={r} ...", flush=True)
            try:
                with torch.no_grad():
                    outs = [run(v, x).float() for v in variants.values()]
                times = timing.interleaved(fns, device, rounds=rounds, min_block_s=block_s)
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
                print(f"[layer] {notes[-1]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            t_none = times[0].median_s
            first_new = len(rows)
            for (name, _), t, out in zip(variants.items(), times, outs):
                diff = ((out - outs[1]).abs().max() / outs[1].abs().max()).item() if name != "none" else 0.0
                rows.append({
                    "run_id": run_id, **env, "transformers": transformers.__version__,
                    "malloc": timing.malloc_setting() if device.type == "cpu" else "",
                    "mode": args.mode, "dtype": str(dtype).replace("torch.", ""), "model": spec.name,
                    "hidden": spec.hidden, "intermediate": spec.intermediate, "batch": b, "seq": s,
                    "bottleneck": r if name != "none" else 0,
                    "variant": {"none": "no adapter", "eager": "eager adapter", "fused": "adapterkern adapter"}[name],
                    "backend": backend if name == "fused" else "",
                    "median_ms": t.median_s * 1e3, "iqr_ms": t.iqr_s * 1e3, "rounds": t.samples,
                    "overhead_pct": 100.0 * (t.median_s / t_none - 1.0), "max_rel_diff": diff,
                })
            csv_path = append_csv(csv_path, rows[first_new:], LAYER_COLUMNS)  # now: a killed run keeps it
            del x, dy, outs
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del variants, base
    print()
    print(format_layer_table(rows))
    for n in notes:
        print(f"note: {n}")
    print("note: overhead = median with adapter / median without - 1, each variant timed in alternation; "
          "max_rel_diff compares the adapterkern layer's output with the eager one's")
    if rows:
        print(f"note: {env['device']}; torch {env['torch']}, transformers {transformers.__version__}, "
              f"commit {env['git_commit'] or '?'}; run {run_id}")
        print(f"wrote {len(rows)} rows to {csv_path}")
    return 0 if rows else 1


def format_layer_table(rows: List[Dict[str, object]]) -> str:
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
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]

    def line(v):
        return "  ".join(x.ljust(w) if i < 5 else x.rjust(w) for i, (x, w) in enumerate(zip(v, widths)))

    out = [line(header), line(["-" * w for w in widths])]
    prev = None
    for c in cells:
        if prev is not None and c[:2] != prev:
            out.append("")
        prev = c[:2]
        out.append(line(c))
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
