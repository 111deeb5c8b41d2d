"""``python -m adapterkern.bench inference``: what adapters cost in whole models at inference time.

A BERT-base-sized encoder and a Llama-style decoder (random weights, no downloads; see
:mod:`adapterkern.bench.inference_models`), each with a parallel adapter (``AdapterConfig.parallel``)
and, separately, a Pfeiffer adapter (``AdapterConfig.pfeiffer``), r = d/16 by default, in four
variants: no adapter, eager adapter, adapterkern adapter, optimised (``optimize_for_inference``; only
when this adapterkern has it). All four are timed in alternation (ABCD ABCD ...) at each point.

* Latency rows: one forward of the encoder / decoder stack at batch x sequence 1x1 (a decode-sized
  forward), 1x128 and 32x512 (CPU ``--quick``, the default on a CPU: 1x1, 1x128, 4x128). Median and
  IQR (ms), overhead in percent of the no-adapter model, and beside it the adapters' share of the
  model's matmul FLOPs (``flop_ratio_pct``; ``ffn_flop_ratio_pct``: one place against one FFN, ≈ r/(4d)
  beside a 4d FFN), so a reader sees what the adapters cost against what they compute.
* Generation rows: greedy ``generate`` of the Llama model with its KV cache (``do_sample=False``,
  exactly ``--new-tokens`` new tokens), batch 1 and 8, a 16-token prompt (32 with ``--full``):
  tokens/s = batch x new tokens / median time of the whole call (prefill included).

``max_rel_diff``: max|out - ref| / max|ref| of the last hidden states against the adapterkern model's
(for ``no adapter`` it is the adapters' effect: far from 0, they are not the identity); generation
rows have ``same_tokens_pct`` instead. ``--tiny`` (1 layer, d=64) is for the test suite.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import torch

from adapterkern.backends import SINGLE

from . import common, inference_models as im, models, timing
from .report import append_csv

COLUMNS = [
    *common.PROVENANCE, "transformers", "malloc", "dtype", "part", "model", "placement", "layers", "hidden",
    "intermediate", "bottleneck", "variant", "backend", "batch", "seq", "new_tokens", "median_ms", "iqr_ms",
    "rounds", "overhead_pct", "flop_ratio_pct", "ffn_flop_ratio_pct", "tokens_per_s", "max_rel_diff",
    "same_tokens_pct",
]


def _parse_ints(text: str, option: str) -> List[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"{option}: expected comma-separated integers, got {text!r}") from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m adapterkern.bench inference", description=__doc__.splitlines()[0])
    common.add_size_args(p, quick="default; smaller sizes on CPU (BERT 4 layers, Llama d=1024, 4x128 at most)",
                         full="BERT-base with 12 layers, 32x512, Llama-7B layer dims on a GPU")
    p.add_argument("--tiny", action="store_true", help="1-layer d=64 models and a few tokens (the test suite's)")
    p.add_argument("--models", default="bert,llama", help="bert, llama or both (default both)")
    p.add_argument("--placements", default="parallel,pfeiffer", help="parallel, pfeiffer or both (default both)")
    p.add_argument("--parts", default="latency,generation", help="latency, generation or both (default both)")
    p.add_argument("--batches", help="latency points, comma-separated BxS (default 1x1,1x128,32x512; "
                                     "CPU --quick 1x1,1x128,4x128)")
    p.add_argument("--bert-layers", type=int, help="BERT layers (default 4; 12 with --full)")
    p.add_argument("--llama-layers", type=int, help="Llama layers (default 8)")
    p.add_argument("--generation-batches", default=None, help="generation batch sizes (default 1,8)")
    p.add_argument("--prompt", type=int, help="generation prompt tokens (default 16; 32 with --full)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per call (default 8 on CPU --quick, else 32)")
    p.add_argument("--reduction-factor", type=float, default=16.0, help="bottleneck r = d / this (default 16)")
    p.add_argument("--activation", default="relu")
    p.add_argument("--generation-rounds", type=int,
                   help="alternating rounds per generation point (default 5 quick, 10 full)")
    common.add_subcommand_args(p, "inference", rounds=None,
                               rounds_help="alternating rounds per latency point (default 7 quick, 15 full)")
    return p


class _Settings:
    """What one run measures, from the options and the device."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        cpu_quick = device.type == "cpu" and not args.full
        if args.tiny:
            points, gen_batches, prompt, new = [(1, 1), (1, 8)], [1, 2], 4, 3
        else:
            points = [(1, 1), (1, 128), (4, 128)] if cpu_quick else [(1, 1), (1, 128), (32, 512)]
            gen_batches, prompt, new = [1, 8], 32 if args.full else 16, 8 if cpu_quick else 32
        self.points = common.parse_points(args.batches) if args.batches else points
        self.gen_batches = _parse_ints(args.generation_batches, "--generation-batches") if args.generation_batches \
            else gen_batches
        self.prompt = args.prompt or prompt
        self.new_tokens = args.new_tokens or new
        self.rounds = args.rounds or (15 if args.full else 7)
        self.gen_rounds = args.generation_rounds or (10 if args.full else 5)
        self.block_s = args.block_ms / 1000
        self.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
        for part in self.parts:
            if part not in ("latency", "generation"):
                raise SystemExit(f"--parts: unknown part {part!r}; expected latency or generation")
        self.placements = im.parse_placements(args.placements)
        self.specs = im.pick_specs(args.models, full=args.full, gpu=device.type == "cuda", tiny=args.tiny,
                                   bert_layers=args.bert_layers, llama_layers=args.llama_layers)


def main(argv: Optional[List[str]] = None) -> int:
    """``inference``: median time (ms) of whole models without / with an eager / with an adapterkern
    adapter / optimised, overhead and FLOP ratio in percent, generation tokens/s; rows appended to the
    CSV point by point."""
    args = parser().parse_args(argv)
    run = common.start(args, "inference", requires=models.transformers_reason)
    if run is None:
        return 0
    import transformers  # present: models.transformers_reason() said so

    settings = _Settings(args, run.device)
    backend = run.backend(args.backend, SINGLE)
    run.say(f"{common.dtype_name(run.dtype)} on {run.env['device']}; adapterkern backend {backend}; "
            f"{settings.rounds} alternating rounds per latency point, {settings.gen_rounds} per generation point")
    bench = _Bench(run, settings, backend, transformers.__version__)
    for spec in settings.specs:
        bench.model(spec, args.reduction_factor, args.activation)
    return run.finish(
        format_table(bench.rows), bench.rows, bench.csv_path,
        "overhead = median / median of no adapter - 1, the variants timed in alternation; FLOPs = the adapters' "
        "matmul FLOPs in percent of the no-adapter model's (CSV ffn_flop_ratio_pct: one place vs one FFN); "
        "rel diff = max|out - adapterkern's| / max|adapterkern's| (no adapter: the adapters' effect)",
        "generation: tokens/s = batch x new tokens / median of the whole generate call (prefill included); "
        "same = percent of generated tokens equal to the adapterkern model's",
        transformers=transformers.__version__,
    )


class _Bench:
    """The rows of one run, measured model by model and written to the CSV point by point."""

    def __init__(self, run: common.Run, settings: _Settings, backend: str, transformers_version: str):
        self.run, self.settings, self.backend = run, settings, backend
        self.transformers_version = transformers_version
        self.rows: List[Dict[str, object]] = []
        self.csv_path = run.csv
        self.optimiser_noted = False

    def model(self, spec: im.ModelSpec, reduction_factor: float, activation: str) -> None:
        """Every placement, latency point and generation point of one model."""
        run = self.run
        run.say(spec.describe())
        torch.manual_seed(0)
        try:
            base = im.build_backbone(spec, run.device, run.dtype)
        except Exception as exc:  # noqa: BLE001 - e.g. an older transformers without these classes
            run.note(f"{spec.name}: could not build the model ({type(exc).__name__}: {exc})")
            return
        for placement in self.settings.placements:
            label = f"{spec.name} {placement}"
            try:
                variants, report, missing = im.variants_of(base, placement, reduction_factor, activation, self.backend)
            except Exception as exc:  # noqa: BLE001
                run.note(f"{label}: could not add the adapters ({type(exc).__name__}: {exc})")
                continue
            if report is not None:
                run.say(f"{label}: optimize_for_inference report:\n{report}")
            elif missing and not (self.optimiser_noted and "not in this checkout" in missing):
                run.note(f"optimised: skipped for {label}: {missing}")
                self.optimiser_noted = True
            flops = im.flop_model(spec, base, variants["adapterkern adapter"])
            r = im.adapter_places(variants["adapterkern adapter"])[0][1]
            fields = dict(model=spec.name, placement=placement, layers=spec.layers, hidden=spec.hidden,
                          intermediate=spec.intermediate, bottleneck=r)
            if "latency" in self.settings.parts:
                for batch, seq in self.settings.points:
                    self.latency_point(spec, variants, flops, fields, batch, seq)
            if "generation" in self.settings.parts and spec.family == "llama":
                for batch in self.settings.gen_batches:
                    self.generation_point(spec, variants, flops, fields, batch)
            del variants
            self._free()

    def _free(self) -> None:
        if self.run.device.type == "cuda":
            torch.cuda.empty_cache()

    def _ids(self, spec: im.ModelSpec, batch: int, seq: int) -> torch.Tensor:
        gen = torch.Generator(device=self.run.device).manual_seed(1000 * batch + seq)
        return torch.randint(3, spec.vocab, (batch, seq), generator=gen, device=self.run.device)

    def _time(self, label: str, fns: Sequence, rounds: int) -> Optional[List[timing.Timing]]:
        """:func:`timing.interleaved` of ``fns``, or None (with a note) when a call fails."""
        try:
            return timing.interleaved(fns, self.run.device, rounds=rounds, min_block_s=self.settings.block_s)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at 32x512: the next point may fit
            text = str(exc).splitlines()[0] if str(exc) else ""
            self.run.note(f"{label}: failed ({type(exc).__name__}: {text})")
            self._free()
            return None

    def _row(self, fields: Dict[str, object], name: str, t: timing.Timing, t_none: float, **more: object):
        return self.run.row(
            transformers=self.transformers_version, **fields, variant=name,
            backend=self.backend if name in ("adapterkern adapter", "optimised") else "",
            median_ms=t.median_s * 1e3, iqr_ms=t.iqr_s * 1e3, rounds=t.samples,
            overhead_pct=100.0 * (t.median_s / t_none - 1.0), **more,
        )

    def _write(self, first_new: int) -> None:
        # point by point: a run that is killed keeps every finished point
        self.csv_path = append_csv(self.csv_path, self.rows[first_new:], COLUMNS)

    def _check_optimised(self, label: str, diff: float) -> None:
        tolerance = im.TOLERANCE.get(self.run.dtype, 1e-2)
        if diff > tolerance:
            self.run.note(f"{label}: the optimised model's output differs from the adapterkern model's by "
                          f"{diff:.1e} (relative), more than the {tolerance:.0e} allowed for {self.run.dtype}")

    def latency_point(self, spec, variants, flops: im.FlopModel, fields, batch: int, seq: int) -> None:
        """One forward of every variant on ``batch`` x ``seq`` token ids, timed in alternation."""
        ids = self._ids(spec, batch, seq)
        forward = im.hidden_states(spec)
        outputs: Dict[str, torch.Tensor] = {}

        def make(name, model):
            def call():
                with torch.inference_mode():
                    outputs[name] = forward(model, ids)  # the last call's output, kept for the check
            return call

        label = f"{fields['model']} {fields['placement']} {batch}x{seq}"
        self.run.say(f"{label}: r={fields['bottleneck']} ...")
        times = self._time(label, [make(n, m) for n, m in variants.items()], self.settings.rounds)
        if times is None:
            return
        reference = outputs["adapterkern adapter"]
        first_new = len(self.rows)
        for (name, _), t in zip(variants.items(), times):
            diff = im.relative_difference(outputs[name], reference)
            if name == "optimised":
                self._check_optimised(label, diff)
            self.rows.append(self._row(
                fields, name, t, times[0].median_s, part="latency", batch=batch, seq=seq, new_tokens=0,
                flop_ratio_pct=0.0 if name == "no adapter" else flops.forward_ratio_pct(batch, seq),
                ffn_flop_ratio_pct=0.0 if name == "no adapter" else flops.ffn_ratio_pct(),
                max_rel_diff=diff,
            ))
        self._write(first_new)
        del outputs, ids
        self._free()

    def generation_point(self, spec, variants, flops: im.FlopModel, fields, batch: int) -> None:
        """Greedy generation of exactly ``new_tokens`` tokens with the KV cache, every variant in alternation."""
        prompt, new = self.settings.prompt, self.settings.new_tokens
        ids = self._ids(spec, batch, prompt)
        mask = torch.ones_like(ids)
        tokens: Dict[str, torch.Tensor] = {}

        def make(name, model):
            def call():
                with torch.inference_mode():
                    tokens[name] = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                                  max_new_tokens=new, min_new_tokens=new)
            return call

        label = f"{fields['model']} {fields['placement']} generate {batch}x{prompt}+{new}"
        self.run.say(f"{label} ...")
        times = self._time(label, [make(n, m) for n, m in variants.items()], self.settings.gen_rounds)
        if times is None:
            return
        reference = tokens["adapterkern adapter"]
        first_new = len(self.rows)
        for (name, _), t in zip(variants.items(), times):
            self.rows.append(self._row(
                fields, name, t, times[0].median_s, part="generation", batch=batch, seq=prompt, new_tokens=new,
                flop_ratio_pct=0.0 if name == "no adapter" else flops.generation_ratio_pct(batch, prompt, new),
                ffn_flop_ratio_pct=0.0 if name == "no adapter" else flops.ffn_ratio_pct(),
                tokens_per_s=batch * new / t.median_s,
                same_tokens_pct=im.same_tokens_pct(tokens[name], reference, prompt),
            ))
        self._write(first_new)
        del tokens, ids
        self._free()


def format_table(rows: Sequence[Dict[str, object]]) -> str:
    """One line per variant and point, a blank line between points."""
    header = ["model", "adapter", "point", "r", "variant", "median ms", "IQR ms", "overhead", "FLOPs", "tok/s",
              "rel diff / same"]
    cells = []
    for r in rows:
        generation = r["part"] == "generation"
        point = f"{r['batch']}x{r['seq']}" + (f"+{r['new_tokens']}" if generation else "")
        base = r["variant"] == "no adapter"
        if generation:
            check = f"{float(r['same_tokens_pct']):.0f}%"
        else:
            check = f"{float(r['max_rel_diff']):.1e}"
        cells.append([
            f"{r['model']} ({r['layers']}L)", str(r["placement"]), point, str(r["bottleneck"]),
            str(r["variant"]) + (f" ({r['backend']})" if r["backend"] else ""),
            f"{float(r['median_ms']):,.3f}", f"{float(r['iqr_ms']):,.3f}",
            "-" if base else f"{float(r['overhead_pct']):+.1f}%",
            "-" if base else f"{float(r['flop_ratio_pct']):.2f}%",
            f"{float(r['tokens_per_s']):,.1f}" if generation else "-",
            "-" if r["variant"] == "adapterkern adapter" else check,
        ])
    return common.text_table(header, cells, left=5, group=3)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
