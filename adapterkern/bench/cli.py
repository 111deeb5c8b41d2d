"""``python -m adapterkern.bench``: the grid benchmark (default), and the ``layer``, ``tradeoffs``,
``adapterdrop``, ``multi``, ``plot`` and ``table`` subcommands. ``python -m adapterkern.bench SUBCOMMAND --help`` for each."""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

SUBCOMMANDS = ("layer", "tradeoffs", "adapterdrop", "multi", "plot", "table")


def _device(name: Optional[str]):
    import torch

    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available to this PyTorch build")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_alternating_args(p: argparse.ArgumentParser, kind: str, rounds: int) -> None:
    """The options of the benchmarks that time a few variants in alternation (timing.interleaved)."""
    p.add_argument("--dtype", help="default bfloat16 on GPU, float32 on CPU")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--rounds", type=int, default=rounds, help=f"alternating rounds (default {rounds})")
    p.add_argument("--block-ms", type=float, default=50.0, help="time per block of calls (default 50 ms)")
    p.add_argument("--threads", default="auto", help="CPU: torch threads (default auto, see the grid's --help)")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned")
    p.add_argument("--csv", help=f"append here (default benchmarks/results/{kind}-<device>.csv)")


def default_csv(kind: str, device) -> str:
    from .envinfo import device_slug

    return os.path.join("benchmarks", "results", f"{kind}-{device_slug(device)}.csv")


def grid_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adapterkern.bench",
        description="Latency of the bottleneck adapter op over a grid of (T, d, r), every implementation "
                    "side by side in one run, against the memory floor measured in the same run. "
                    f"Subcommands: {', '.join(SUBCOMMANDS)} (python -m adapterkern.bench SUBCOMMAND --help).",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the small default grid (about a minute on a 2-core CPU)")
    size.add_argument("--full", action="store_true",
                      help="the whole grid: T 1..16384, d 768/1024/4096, r 16/64/256, fwd and fwd_bwd")
    p.add_argument("--tokens", help="comma-separated T values (overrides the grid's)")
    p.add_argument("--hidden", help="comma-separated d values")
    p.add_argument("--bottleneck", help="comma-separated r values")
    p.add_argument("--mode", help="fwd, fwd_bwd or both comma-separated (default both)")
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--impl", help="comma-separated implementations or globs (eager is always run); see "
                                  "adapterkern.bench.impls. Default: every one that can run here")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--activation", default="relu")
    p.add_argument("--csv", help="append results here (default benchmarks/results/grid-<device>.csv)")
    plot = p.add_mutually_exclusive_group()
    plot.add_argument("--plot", dest="plot", action="store_true", default=None,
                      help="draw the PNG (default: when matplotlib is installed)")
    plot.add_argument("--no-plot", dest="plot", action="store_false")
    p.add_argument("--png", help="PNG path (default: the CSV path with .png)")
    p.add_argument("--no-cuda-graph", action="store_true", help="skip the +graph variants on CUDA")
    p.add_argument("--graph-max-tokens", type=int, default=64)
    p.add_argument("--min-run-time", type=float,
                   help="CPU: seconds of timed blocks per implementation and point (default 0.3, --full 1.0)")
    p.add_argument("--rounds", type=int, default=3,
                   help="CPU: the blocks are spread over this many alternating rounds across implementations")
    p.add_argument("--warmup-ms", type=float, help="CUDA: do_bench warm-up (default 10 quick / 25 full)")
    p.add_argument("--rep-ms", type=float, help="CUDA: do_bench repetition time (default 40 quick / 100 full)")
    p.add_argument("--copy-mib", type=float, help="size of the copy that measures bandwidth "
                                                  "(default 1024 MiB on GPU, 256 MiB on CPU)")
    p.add_argument("--time-limit", type=float, help="seconds; points not started by then are skipped and reported")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="CPU: raise glibc's mmap/trim thresholds so tensors are not page-faulted in on every "
                        "call (default tuned; see adapterkern.bench.timing.tune_cpu_malloc)")
    p.add_argument("--threads", default="auto",
                   help="CPU: torch threads; auto (default) = all cores unless a probe finds them busy, then 1")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def grid_main(argv: List[str]) -> int:
    args = grid_parser().parse_args(argv)
    from . import grid, report, timing
    from .plot import have_matplotlib, plot_grid

    device = _device(args.device)
    import torch

    auto_threads = torch.get_num_threads() if args.threads in (None, "", "auto") else 0
    threads_note = timing.choose_cpu_threads(args.threads) if device.type == "cpu" else None
    base = grid.default_grid(device, args.full)
    modes = grid.parse_list(args.mode, str) or base["modes"]
    for m in modes:
        if m not in grid.MODES:
            raise SystemExit(f"--mode: unknown mode {m!r}; expected fwd or fwd_bwd")
    if args.dtype and args.dtype not in grid.DTYPES:
        raise SystemExit(f"--dtype: unknown dtype {args.dtype!r}; expected one of {', '.join(grid.DTYPES)}")
    dtype = grid.DTYPES[args.dtype] if args.dtype else grid.default_dtype(device)
    full = bool(args.full)
    cfg = grid.GridConfig(
        device=device, dtype=dtype,
        tokens=grid.parse_list(args.tokens) or base["tokens"],
        hidden=grid.parse_list(args.hidden) or base["hidden"],
        bottleneck=grid.parse_list(args.bottleneck) or base["bottleneck"],
        modes=modes,
        impl_patterns=grid.parse_list(args.impl, str),
        activation=args.activation,
        cuda_graph=not args.no_cuda_graph,
        graph_max_tokens=args.graph_max_tokens,
        min_run_time=args.min_run_time if args.min_run_time is not None else (1.0 if full else 0.3),
        warmup_ms=args.warmup_ms if args.warmup_ms is not None else (25.0 if full else 10.0),
        rep_ms=args.rep_ms if args.rep_ms is not None else (100.0 if full else 40.0),
        copy_bytes=int((args.copy_mib if args.copy_mib is not None else (1024 if device.type == "cuda" else 256))
                       * 2**20),
        cpu_rounds=args.rounds,
        auto_threads=auto_threads,
        time_limit=args.time_limit,
        priority_first=full,
        full=full,
        seed=args.seed,
    )
    if threads_note:
        cfg.notes.append(threads_note.replace("CPU threads: 1", "CPU threads at start: 1"))
    if device.type == "cpu" and args.malloc == "tuned":
        cfg.notes.append(f"CPU allocator: {timing.tune_cpu_malloc()} (--malloc default to measure without)")
    print(f"[bench] {len(cfg.points())} points: modes {cfg.modes}, T {cfg.tokens}, d {cfg.hidden}, "
          f"r {cfg.bottleneck}, {str(dtype).replace('torch.', '')} on {device}", flush=True)
    written = {"path": args.csv or default_csv("grid", device)}

    def append(point_rows):
        written["path"] = report.append_csv(written["path"], point_rows)

    rows = grid.run_grid(cfg, show_progress=not args.no_progress, on_rows=append)
    print()
    print(report.format_table(rows, markdown=args.markdown))
    print()
    noisy = [r for r in rows if float(r["iqr_us"]) > 0.25 * float(r["median_us"])]
    if noisy:
        cfg.notes.append(f"{len(noisy)} of {len(rows)} rows have IQR > 25% of the median: the machine was busy "
                         "(on a shared CPU, --threads 1 may be steadier); compare such rows with care")
    for note in cfg.notes:
        print(f"note: {note}")
    if rows:
        print(f"note: device {rows[0]['device']}; torch {rows[0]['torch']}, triton {rows[0]['triton'] or '-'}, "
              f"CUDA {rows[0]['cuda'] or '-'}, commit {rows[0]['git_commit'] or '?'}; run {rows[0]['run_id']}")
    if not rows:
        print("no rows measured; nothing written")
        return 1
    path = written["path"]
    print(f"wrote {len(rows)} rows to {path}")
    want_plot = args.plot if args.plot is not None else have_matplotlib()
    if args.plot and not have_matplotlib():
        print("--plot: matplotlib is not installed; `pip install matplotlib` to draw the PNG")
        return 2
    if want_plot:
        png = plot_grid(report.latest_run(report.read_csv(path), str(rows[0]["run_id"])),
                        args.png or os.path.splitext(path)[0] + ".png")
        print(f"wrote {png}")
    elif args.plot is None:
        print("note: matplotlib not installed, no PNG drawn (pip install matplotlib)")
    return 0


def table_main(argv: List[str]) -> int:
    from . import report

    p = argparse.ArgumentParser(prog="python -m adapterkern.bench table",
                                description="Print the table of one run from a grid CSV.")
    p.add_argument("csv")
    p.add_argument("--run", help="run_id (default: the last run in the file)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    rows = report.latest_run(report.read_csv(args.csv), args.run)
    if not rows:
        print(f"{args.csv}: no rows")
        return 1
    print(report.format_table(rows, markdown=args.markdown))
    first = rows[0]
    print(f"\n{first['device']}; {first['dtype']}; torch {first['torch']}, triton {first['triton'] or '-'}, "
          f"CUDA {first['cuda'] or '-'}; commit {first['git_commit'] or '?'}; {first['date']}; "
          f"copy bandwidth {float(first['copy_GBps']):.1f} GB/s")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        sub, rest = argv[0], argv[1:]
        if sub == "layer":
            from .layer import main as layer_main

            return layer_main(rest)
        if sub == "tradeoffs":
            from .tradeoffs import main as tradeoffs_main

            return tradeoffs_main(rest)
        if sub == "adapterdrop":
            from .adapterdrop import main as adapterdrop_main

            return adapterdrop_main(rest)
        if sub == "multi":
            from .multi import main as multi_main

            return multi_main(rest)
        if sub == "plot":
            from .plot import main as plot_main

            return plot_main(rest)
        return table_main(rest)
    return grid_main(argv)
