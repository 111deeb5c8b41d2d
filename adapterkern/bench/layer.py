"""``python -m adapterkern.bench layer``: what an adapter costs inside one real transformer layer.

A BERT-base encoder layer and a Llama-7B-sized decoder layer (random weights from ``transformers``
configs, no downloads: layer 0 of a one-layer model of :mod:`adapterkern.bench.inference_models`),
each with a Pfeiffer adapter (``AdapterConfig.pfeiffer``, after the FFN) and, separately, a parallel
adapter (``AdapterConfig.parallel``, beside the FFN), r = d/16 by default, in four variants: no
adapter, eager adapter (``nn.Linear`` maths at the same hooks), adapterkern adapter (hook + fused op)
and optimised (``optimize_for_inference``; forward mode only, an optimised model does not train).
The layer is called on (B, S, d) hidden states; the four variants are timed in alternation
(ABCD ABCD ...) so a shared machine's drift cancels out of the differences.

Points: batch x sequence 1x1 (a decode-sized forward), 1x128 and 32x512; on a CPU, ``--quick`` (the
default) uses 1x1, 1x128, 4x128 and a Llama layer of d=1024; ``--full`` runs the real sizes.
``--tiny`` (d=64) is for the test suite.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from adapterkern.backends import SINGLE

from . import common, inference_models as im, models, timing
from .report import append_csv

COLUMNS = [
    *common.PROVENANCE, "transformers", "malloc", "mode", "dtype", "model", "placement", "hidden", "intermediate",
    "batch", "seq", "bottleneck", "variant", "backend", "median_ms", "iqr_ms", "rounds", "overhead_pct",
    "max_rel_diff",
]
LLAMA_7B_LAYER = replace(im.LLAMA_7B_LAYERS, name="llama-7b")
LLAMA_SMALL_LAYER = replace(im.LLAMA_SMALL, name="llama-d1024")  # the CPU --quick stand-in


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapterkern.bench layer", description=__doc__.splitlines()[0])
    common.add_size_args(p, quick="default; smaller sizes on CPU", full="the real sizes everywhere")
    p.add_argument("--tiny", action="store_true", help="d=64 layers and a few tokens (the test suite's)")
    p.add_argument("--models", default="bert,llama", help="bert, llama or both (default both)")
    p.add_argument("--placements", default="pfeiffer,parallel", help="pfeiffer, parallel or both (default both)")
    p.add_argument("--batches", help="comma-separated BxS (default 1x1,1x128,32x512; CPU --quick 1x1,1x128,4x128)")
    p.add_argument("--reduction-factor", type=float, default=16.0, help="bottleneck r = d / this (default 16)")
    p.add_argument("--activation", default="relu")
    p.add_argument("--mode", default="fwd", choices=("fwd", "fwd_bwd"),
                   help="fwd: inference; fwd_bwd: frozen backbone, gradients for the input and the adapter "
                        "(no optimised variant)")
    common.add_subcommand_args(p, "layer", rounds=None,
                               rounds_help="alternating rounds per point (default 7 quick, 15 full)")
    return p


def _specs(args: argparse.Namespace, cpu_quick: bool) -> List[im.ModelSpec]:
    """One-layer model specs (small vocabulary: the embedding is not timed) for ``--models``."""
    specs = []
    for name in (n.strip() for n in args.models.split(",") if n.strip()):
        if name == "bert":
            spec = im.BERT_TINY if args.tiny else im.BERT_BASE
        elif name == "llama":
            spec = im.LLAMA_TINY if args.tiny else (LLAMA_SMALL_LAYER if cpu_quick else LLAMA_7B_LAYER)
        else:
            raise SystemExit(f"--models: unknown model {name!r}; expected bert or llama")
        specs.append(replace(spec, layers=1, vocab=128))
    return specs


def layer_of(spec: im.ModelSpec, model: nn.Module) -> nn.Module:
    """Layer 0 of a one-layer BERT or Llama model (its adapters' hooks and optimised modules with it)."""
    return model.encoder.layer[0] if spec.family == "bert" else model.model.layers[0]


def layer_runner(spec: im.ModelSpec, model: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """``run(layer, x)``: the layer on (B, S, d) hidden states (Llama: with ``model``'s rotary tables,
    computed once per shape as a model computes them once per forward)."""
    if spec.family == "bert":
        def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
            out = layer(x)
            return out[0] if isinstance(out, tuple) else out
        return run
    rotary = model.model.rotary_emb
    cache: dict = {}

    def run(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        key = (x.shape[1], x.dtype)
        if key not in cache:
            pos = torch.arange(x.shape[1], device=x.device)[None]
            cache[key] = tuple(t.detach() for t in rotary(x, pos))
        out = layer(x, position_embeddings=cache[key])
        return out[0] if isinstance(out, tuple) else out
    return run


def _train_adapters_only(model: nn.Module) -> None:
    """Freeze ``model`` but its adapters (adapterkern's and the eager twin's)."""
    from adapterkern.nn.bottleneck import BottleneckAdapter

    from .impls import EagerAdapter

    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, (BottleneckAdapter, EagerAdapter)):
            for p in m.parameters():
                p.requires_grad_(True)


def main(argv: Optional[List[str]] = None) -> int:
    """``layer``: median time (ms) of one layer without / with an eager / with an adapterkern adapter /
    optimised, and the overhead in percent of the layer without; rows appended to the CSV point by point."""
    args = parser().parse_args(argv)
    run = common.start(args, "layer", requires=models.transformers_reason)
    if run is None:
        return 0
    import transformers  # present: models.transformers_reason() said so

    device, dtype = run.device, run.dtype
    cpu_quick = device.type == "cpu" and not args.full
    if args.batches:
        batches = common.parse_points(args.batches)
    elif args.tiny:
        batches = [(1, 1), (1, 8)]
    else:
        batches = [(1, 1), (1, 128), (4, 128)] if cpu_quick else [(1, 1), (1, 128), (32, 512)]
    placements = im.parse_placements(args.placements)
    rounds = args.rounds or (15 if args.full else 7)
    block_s = args.block_ms / 1000
    train = args.mode == "fwd_bwd"
    backend = run.backend(args.backend, SINGLE)
    run.say(f"{args.mode}, {common.dtype_name(dtype)} on {run.env['device']}; adapterkern backend "
            f"{backend}; {rounds} alternating rounds per point")

    rows: List[Dict[str, object]] = []
    csv_path = run.csv
    for spec in _specs(args, cpu_quick):
        torch.manual_seed(0)
        try:
            base = im.build_backbone(spec, device, dtype)
        except Exception as exc:  # noqa: BLE001 - e.g. an older transformers without these classes
            run.note(f"{spec.name}: could not build the layer ({type(exc).__name__}: {exc})")
            continue
        call = layer_runner(spec, base)
        for placement in placements:
            label = f"{spec.name} {placement}"
            try:
                variants, report, missing = im.variants_of(base, placement, args.reduction_factor,
                                                           args.activation, backend)
            except Exception as exc:  # noqa: BLE001
                run.note(f"{label}: could not add the adapters ({type(exc).__name__}: {exc})")
                continue
            if train:
                variants.pop("optimised", None)
                for model in variants.values():
                    _train_adapters_only(model)
            elif missing:
                run.note(f"optimised: skipped for {label}: {missing}")
            r = im.adapter_places(variants["adapterkern adapter"])[0][1]
            layers = {name: layer_of(spec, model) for name, model in variants.items()}
            for b, s in batches:
                rows_now = _point(run, spec, layers, call, placement, r, b, s, train, rounds, block_s, backend,
                                  mode=args.mode, transformers=transformers.__version__)
                rows.extend(rows_now)
                # point by point: a run that is killed keeps every finished point
                csv_path = append_csv(csv_path, rows_now, COLUMNS)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            del variants, layers
        del base
    return run.finish(format_table(rows), rows, csv_path,
                      "overhead = median with adapter / median without - 1, each variant timed in alternation; "
                      "rel diff = max|out - adapterkern's| / max|adapterkern's|",
                      transformers=transformers.__version__)


def _point(run: common.Run, spec: im.ModelSpec, layers: Dict[str, nn.Module], call, placement: str, r: int,
           b: int, s: int, train: bool, rounds: int, block_s: float, backend: str, **fields: object) -> List[Dict[str, object]]:
    """Every variant's row at batch ``b`` x sequence ``s`` (none when a call fails: noted)."""
    device, dtype = run.device, run.dtype
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

    label = f"{spec.name} {placement} {b}x{s}"
    run.say(f"{label}: r={r} ...")
    try:
        with torch.no_grad():
            outs = {name: call(layer, x) for name, layer in layers.items()}
        times = timing.interleaved([make(layer) for layer in layers.values()], device, rounds=rounds,
                                   min_block_s=block_s)
    except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 32x512: the next point may fit
        run.note(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return []
    t_none = times[0].median_s
    reference = outs["adapterkern adapter"]
    rows = []
    for name, t in zip(layers, times):
        diff = im.relative_difference(outs[name], reference)
        if name == "optimised" and diff > im.TOLERANCE.get(dtype, 1e-2):
            run.note(f"{label}: the optimised layer's output differs from the adapterkern layer's by {diff:.1e}")
        rows.append(run.row(
            **fields, model=spec.name, placement=placement, hidden=spec.hidden, intermediate=spec.intermediate,
            batch=b, seq=s, bottleneck=r if name != "no adapter" else 0, variant=name,
            backend=backend if name in ("adapterkern adapter", "optimised") else "", median_ms=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, rounds=t.samples,
            overhead_pct=100.0 * (t.median_s / t_none - 1.0), max_rel_diff=diff,
        ))
    return rows


def format_table(rows: List[Dict[str, object]]) -> str:
    """One line per variant and point, a blank line between points."""
    header = ["model", "adapter", "batch", "d", "r", "variant", "median ms", "IQR ms", "overhead", "rel diff"]
    cells = []
    for r in rows:
        cells.append([
            f"{r['model']}", str(r["placement"]), f"{r['batch']}x{r['seq']}", str(r["hidden"]),
            str(r["bottleneck"] or "-"), str(r["variant"]) + (f" ({r['backend']})" if r["backend"] else ""),
            f"{float(r['median_ms']):,.3f}", f"{float(r['iqr_ms']):,.3f}",
            "-" if r["variant"] == "no adapter" else f"{float(r['overhead_pct']):+.1f}%",
            "-" if r["variant"] in ("no adapter", "adapterkern adapter") else f"{float(r['max_rel_diff']):.1e}",
        ])
    return common.text_table(header, cells, left=6, group=3)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
