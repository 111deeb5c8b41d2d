"""The grid benchmark (``python -m adapterkern.bench``, the default command): every implementation at
every (mode, T, d, r) point, side by side in one run; a table, a CSV (appended) and a PNG.

Memory floor. The fewest bytes any implementation must move, over the copy bandwidth measured in the
same run (``Tensor.copy_`` of a buffer far larger than the caches, read + write counted):

* ``fwd`` (inference, ``residual = x``): read x, write y, read the weights once:
  ``(2*T*d + W) * e`` bytes, with ``W = 2*r*d + r + d`` weight elements and ``e`` the element size.
* ``fwd_bwd`` (frozen backbone: gradients for x and the adapter weights, not for anything upstream):
  forward as above, then backward reads dy and x (the bottleneck pre-activation recomputed from x
  rather than saved, which would cost 2*T*r more), writes dx, reads the weights and writes their
  gradients: ``(5*T*d + 3*W) * e`` bytes.

``pct_of_floor`` = floor time / measured median (100 = at the floor); ``achieved_GBps`` = floor bytes
/ median (the useful bandwidth). ``achieved_GFLOPs`` counts 4*T*d*r FLOPs forward and 12*T*d*r for
forward + backward. ``speedup_vs_eager`` = eager's median / this median, both from this run;
``max_rel_err`` = max |y - y_eager| / max |y_eager| on the first input set.
"""
from __future__ import annotations

import argparse
import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch

from . import common, impls as impls_mod, report, timing
from .plot import MATPLOTLIB_MISSING, have_matplotlib, plot_grid

QUICK_CPU = dict(tokens=[1, 64, 512, 4096], hidden=[768], bottleneck=[64], modes=["fwd", "fwd_bwd"])
QUICK_CUDA = dict(tokens=[1, 64, 4096, 16384], hidden=[768, 4096], bottleneck=[64], modes=["fwd", "fwd_bwd"])
FULL = dict(tokens=[1, 8, 64, 512, 4096, 16384], hidden=[768, 1024, 4096], bottleneck=[16, 64, 256],
            modes=["fwd", "fwd_bwd"])
# (T, d, r) run first in --full: the headline shapes (a Llama-7B-sized d at prefill, mid and decode T,
# and BERT-base at T=4096), so a run cut by --time-limit still has them.
PRIORITY = [(16384, 4096, 64), (64, 4096, 64), (1, 4096, 64), (4096, 768, 64)]
MODES = ("fwd", "fwd_bwd")


@dataclass
class GridConfig:
    """What :func:`run_grid` measures and how; ``notes`` collects what the run has to say."""

    device: torch.device
    dtype: torch.dtype
    tokens: List[int]
    hidden: List[int]
    bottleneck: List[int]
    modes: List[str]
    impl_patterns: Optional[List[str]] = None
    activation: str = "relu"
    scaling: float = 1.0
    cuda_graph: bool = True  # add "+graph" variants on CUDA for T <= graph_max_tokens
    graph_max_tokens: int = 64
    min_run_time: float = 0.15  # CPU: seconds of blocks per implementation and point, over all rounds
    cpu_rounds: int = 3  # CPU: alternating rounds the blocks are spread over
    auto_threads: int = 0  # CPU: >1 = before each point, use this many threads unless the cores are busy, then 1
    warmup_ms: float = 25.0  # CUDA: do_bench warm-up and repetition budgets
    rep_ms: float = 100.0
    copy_bytes: int = 256 * 2**20
    time_limit: Optional[float] = None  # seconds; points not started by then are skipped (and said so)
    priority_first: bool = False
    full: bool = False  # --full: also the slow-to-build defaults (compile-max-autotune on CUDA)
    seed: int = 0
    notes: List[str] = field(default_factory=list)

    def points(self) -> List[tuple]:
        """Every (mode, T, d, r), the :data:`PRIORITY` ones first when ``priority_first``."""
        pts = list(itertools.product(self.modes, self.tokens, self.hidden, self.bottleneck))
        if self.priority_first:
            rank = {p: i for i, p in enumerate(PRIORITY)}
            pts.sort(key=lambda p: rank.get((p[1], p[2], p[3]), len(rank)))
        return pts


def floor_bytes(mode: str, tokens: int, hidden: int, bottleneck: int, element_size: int) -> int:
    """The fewest bytes any implementation of ``mode`` must move at (T, d, r) (see the module docstring)."""
    weights = 2 * bottleneck * hidden + bottleneck + hidden
    if mode == "fwd":
        return (2 * tokens * hidden + weights) * element_size
    return (5 * tokens * hidden + 3 * weights) * element_size


def flops(mode: str, tokens: int, hidden: int, bottleneck: int) -> int:
    """FLOPs of the adapter's two matmuls, 2*T*d*r each: 4*T*d*r for fwd, 12*T*d*r for fwd_bwd (the
    backward's four matmuls: dx and both weight gradients)."""
    return (4 if mode == "fwd" else 12) * tokens * hidden * bottleneck


def _make_inputs(n_sets: int, tokens: int, hidden: int, cfg: GridConfig, needs_grad: bool, gen: torch.Generator):
    """``n_sets`` inputs x (T, d) and, for fwd_bwd, as many upstream gradients dy (T, d)."""
    xs, dys = [], []
    for _ in range(n_sets):
        x = torch.randn(tokens, hidden, generator=gen, device=cfg.device, dtype=torch.float32).to(cfg.dtype)
        xs.append(x.requires_grad_(needs_grad))
        if needs_grad:
            dys.append(torch.randn(tokens, hidden, generator=gen, device=cfg.device, dtype=torch.float32
                                   ).to(cfg.dtype))
    return xs, dys


def _steps(forward: Callable, params: List[torch.Tensor], xs, dys, mode: str) -> List[Callable[[], object]]:
    """One call per input set: the forward, or the forward and the gradients of x and ``params``."""
    if mode == "fwd":
        return [lambda x=x: forward(x) for x in xs]

    def step(x, dy):
        y = forward(x)
        return (y, *torch.autograd.grad(y, [x, *params], dy))

    return [lambda x=x, dy=dy: step(x, dy) for x, dy in zip(xs, dys)]


def _rotating(steps: List[Callable[[], object]]) -> Callable[[], object]:
    """A callable that runs ``steps`` in turn, one per call (no two consecutive calls share buffers)."""
    state = [0]
    n = len(steps)

    def call():
        i = state[0]
        state[0] = (i + 1) % n
        return steps[i]()

    return call


def run_grid(cfg: GridConfig, *, log: Callable[[str], None] = print, show_progress: bool = True,
             on_rows: Optional[Callable[[List[Dict[str, object]]], None]] = None) -> List[Dict[str, object]]:
    """Measure every selected implementation at every point; return the rows (see ``report.COLUMNS``).

    ``on_rows`` is called with each point's rows as soon as the point is done (:func:`main` appends them
    to the CSV there, so a run that is killed keeps every finished point).
    """
    started = time.perf_counter()
    chosen, notes = impls_mod.select(cfg.impl_patterns, cfg.device, full=cfg.full)
    cfg.notes.extend(notes)
    env = common.environment(cfg.device)
    run_id = common.new_run_id()
    element_size = torch.empty((), dtype=cfg.dtype).element_size()

    copy_bw = timing.copy_bandwidth(cfg.device, cfg.copy_bytes, min_run_time=cfg.min_run_time,
                                    warmup_ms=cfg.warmup_ms / 2, rep_ms=cfg.rep_ms / 2)
    cfg.notes.append(f"copy bandwidth (floor denominator): {copy_bw / 1e9:.1f} GB/s "
                     f"(copy_ of {cfg.copy_bytes / 2**20:.0f} MiB on {env['device']}"
                     + (f", {torch.get_num_threads()} threads" if cfg.device.type == "cpu" else "") + ")")

    points = cfg.points()
    graph_ok = cfg.cuda_graph and cfg.device.type == "cuda"
    units = [(p, impl, g) for p in points for impl in chosen for g in ((False, True) if graph_ok else (False,))
             if not g or (impl.graphable and p[1] <= cfg.graph_max_tokens)]
    rows: List[Dict[str, object]] = []
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    bar = common.progress(total=len(units), desc="adapter bench", enabled=show_progress)
    skipped = 0
    single = 0  # points that auto_threads ran on one thread
    by_point: Dict[tuple, List[tuple]] = {}
    for unit in units:
        by_point.setdefault(unit[0], []).append(unit)
    try:
        for point, point_units in by_point.items():
            if cfg.time_limit is not None and time.perf_counter() - started > cfg.time_limit:
                skipped += 1
                bar.update(len(point_units))
                continue
            if cfg.auto_threads > 1 and cfg.device.type == "cpu":
                busy = timing.busy_cores_slowdown(cfg.auto_threads) > timing.BUSY_SLOWDOWN
                torch.set_num_threads(1 if busy else cfg.auto_threads)
                single += busy
            point_env = dict(env, threads=str(torch.get_num_threads())) if cfg.device.type == "cpu" else env
            point_rows = _run_point(cfg, point, point_units, point_env, run_id, element_size, copy_bw, gen, bar,
                                    log)
            rows.extend(point_rows)
            if on_rows is not None and point_rows:
                on_rows(point_rows)
    finally:
        bar.close()
    if single:
        cfg.notes.append(f"CPU threads: {single} of {len(by_point)} points ran on 1 thread instead of "
                         f"{cfg.auto_threads}: a probe before them found the cores busy (see the threads column)")
    if skipped:
        cfg.notes.append(f"--time-limit {cfg.time_limit:.0f}s reached: {skipped} of {len(by_point)} points not run")
    return rows


def _run_point(cfg, point, units, env, run_id, element_size, copy_bw, gen, bar, log) -> List[Dict[str, object]]:
    """Measure one point. On CUDA each implementation is built and timed in turn (do_bench). On CPU
    all are built and warmed first, then timed in ``cfg.cpu_rounds`` alternating rounds (ABC ABC ...)
    whose blocks are pooled: a shared machine's slow spells then fall on every implementation alike."""
    mode, tokens, hidden, bottleneck = point
    needs_grad = mode == "fwd_bwd"
    torch.manual_seed(cfg.seed)
    eager = impls_mod.EagerAdapter(hidden, bottleneck, cfg.activation, cfg.scaling).to(cfg.device, cfg.dtype)
    fbytes = floor_bytes(mode, tokens, hidden, bottleneck, element_size)
    set_bytes = (2 if needs_grad else 1) * tokens * hidden * element_size
    n_sets = timing.rotation_sets(set_bytes, cfg.device)
    xs, dys = _make_inputs(n_sets, tokens, hidden, cfg, needs_grad, gen)
    floor_s = fbytes / copy_bw
    interleave = cfg.device.type == "cpu"
    if interleave:
        torch._dynamo.reset()  # once per point: at most one compiled entry per mode, never the cache limit
    done = []  # (impl, graphed, y0, n_sets, fn or Timing)
    for _, impl, graphed in units:
        label = f"{mode} T={tokens} d={hidden} r={bottleneck} {impl.name}{'+graph' if graphed else ''}"
        bar.set_postfix(label)
        try:
            if impl.compiled and not interleave:
                torch._dynamo.reset()
            forward, params = impl.build(eager)
            with torch.set_grad_enabled(needs_grad):
                steps = _steps(forward, params, xs, dys, mode)
                first = steps[0]()  # compiles / autotunes; its output is what the error check compares
                y0 = (first if mode == "fwd" else first[0]).detach().float()
                del first
                if graphed:
                    steps = steps[:8]
                    fn = timing.cuda_graph_callables(steps, cfg.device)
                else:
                    fn = _rotating(steps)
                result = fn if interleave else timing.time_fn(
                    fn, cfg.device, min_run_time=cfg.min_run_time, warmup_ms=cfg.warmup_ms, rep_ms=cfg.rep_ms)
            done.append((impl, graphed, y0, len(steps), result))
        except Exception as exc:  # noqa: BLE001 - one implementation failing must not lose the others
            cfg.notes.append(f"{label}: failed, {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log(f"[bench] {cfg.notes[-1]}")
        if not interleave:
            bar.update(1)
    if interleave and done:
        samples: List[List[float]] = [[] for _ in done]
        rounds = max(1, cfg.cpu_rounds)
        grad = torch.set_grad_enabled(needs_grad)
        with grad:
            for k, (impl, graphed, _, _, fn) in enumerate(done):  # warm-up, in the same order as timing
                timing.time_cpu(fn, min_run_time=0.0, warmup_time=0.01, samples_only=True)
            for _ in range(rounds):
                for k, (impl, graphed, _, _, fn) in enumerate(done):
                    samples[k] += timing.time_cpu(fn, min_run_time=cfg.min_run_time / rounds, warmup_time=0.0,
                                                  samples_only=True)
        done = [(impl, graphed, y0, n, timing.summarize(samples[k], f"torch.utils.benchmark.blocked_autorange, "
                                                                   f"{rounds} alternating rounds"))
                for k, (impl, graphed, y0, n, _) in enumerate(done)]
        bar.update(len(units))
    elif interleave:
        bar.update(len(units))

    out: List[Dict[str, object]] = []
    reference: Optional[torch.Tensor] = None
    eager_median: Optional[float] = None
    for impl, graphed, y0, n, t in done:
        if reference is None:
            reference = y0  # eager comes first at every point
        err = ((y0 - reference).abs().max() / reference.abs().max().clamp_min(1e-30)).item() if y0.numel() else 0.0
        if impl.name == "eager" and not graphed:
            eager_median = t.median_s
        out.append({
            "run_id": run_id, **env, "malloc": timing.malloc_setting() if cfg.device.type == "cpu" else "",
            "mode": mode, "dtype": common.dtype_name(cfg.dtype), "tokens": tokens, "hidden": hidden,
            "bottleneck": bottleneck, "activation": cfg.activation, "impl": impl.name, "cuda_graph": graphed,
            "median_us": t.median_s * 1e6, "iqr_us": t.iqr_s * 1e6, "samples": t.samples, "timer": t.timer,
            "rotate_sets": n,
            "floor_bytes": fbytes, "copy_GBps": copy_bw / 1e9, "floor_us": floor_s * 1e6,
            "pct_of_floor": 100.0 * floor_s / t.median_s, "achieved_GBps": fbytes / t.median_s / 1e9,
            "achieved_GFLOPs": flops(mode, tokens, hidden, bottleneck) / t.median_s / 1e9,
            "speedup_vs_eager": (eager_median / t.median_s) if eager_median else math.nan,
            "max_rel_err": err,
        })
    del xs, dys, done
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def parse_list(text: Optional[str], kind: Callable = int) -> Optional[List]:
    """``"1,64, 512"`` -> ``[1, 64, 512]`` (each item through ``kind``); None stays None."""
    if text is None:
        return None
    return [kind(v.strip()) for v in text.split(",") if v.strip()]


def default_grid(device: torch.device, full: bool) -> Dict[str, list]:
    """The (tokens, hidden, bottleneck, modes) lists of ``--quick`` on this device type, or of ``--full``."""
    if full:
        return dict(FULL)
    return dict(QUICK_CUDA if device.type == "cuda" else QUICK_CPU)


def parser(subcommands: Sequence[str] = ()) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m adapterkern.bench",
        description="Latency of the bottleneck adapter op over a grid of (T, d, r), every implementation "
                    "side by side in one run, against the memory floor measured in the same run."
                    + (f" Subcommands: {', '.join(subcommands)} (python -m adapterkern.bench SUBCOMMAND --help)."
                       if subcommands else ""),
    )
    common.add_size_args(p, quick="the small default grid (about a minute on a 2-core CPU)",
                         full="the whole grid: T 1..16384, d 768/1024/4096, r 16/64/256, fwd and fwd_bwd")
    p.add_argument("--tokens", help="comma-separated T values (overrides the grid's)")
    p.add_argument("--hidden", help="comma-separated d values")
    p.add_argument("--bottleneck", help="comma-separated r values")
    p.add_argument("--mode", help="fwd, fwd_bwd or both comma-separated (default both)")
    p.add_argument("--impl", help="comma-separated implementations or globs (eager is always run); see "
                                  "adapterkern.bench.impls. Default: every one that can run here")
    p.add_argument("--activation", default="relu")
    common.add_device_args(p, "grid")
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
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: Optional[List[str]] = None, subcommands: Sequence[str] = ()) -> int:
    """Run the grid from the command line: CSV appended point by point, table printed, PNG drawn.
    ``subcommands`` only names the other commands in ``--help``."""
    args = parser(subcommands).parse_args(argv)
    device = common.pick_device(args.device)
    auto_threads = torch.get_num_threads() if args.threads in (None, "", "auto") else 0
    # the grid probes the cores again before every point (GridConfig.auto_threads): this is the start
    notes = [n.replace("CPU threads: 1", "CPU threads at start: 1")
             for n in common.prepare_cpu(device, args.threads, args.malloc)]
    base = default_grid(device, args.full)
    modes = parse_list(args.mode, str) or base["modes"]
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--mode: unknown mode {m!r}; expected fwd or fwd_bwd")
    dtype = common.parse_dtype(args.dtype, device)
    full = bool(args.full)
    cfg = GridConfig(
        device=device, dtype=dtype,
        tokens=parse_list(args.tokens) or base["tokens"],
        hidden=parse_list(args.hidden) or base["hidden"],
        bottleneck=parse_list(args.bottleneck) or base["bottleneck"],
        modes=modes,
        impl_patterns=parse_list(args.impl, str),
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
        notes=notes,
    )
    print(f"[bench] {len(cfg.points())} points: modes {cfg.modes}, T {cfg.tokens}, d {cfg.hidden}, "
          f"r {cfg.bottleneck}, {common.dtype_name(dtype)} on {device}", flush=True)
    written = {"path": common.csv_path(args, "grid", device)}

    def append(point_rows):  # point by point: a run that is killed keeps every finished point
        written["path"] = report.append_csv(written["path"], point_rows)

    rows = run_grid(cfg, show_progress=not args.no_progress, on_rows=append)
    print()
    print(report.format_table(rows, markdown=args.markdown))
    print()
    noisy = [r for r in rows if float(r["iqr_us"]) > 0.25 * float(r["median_us"])]
    if noisy:
        cfg.notes.append(f"{len(noisy)} of {len(rows)} rows have IQR > 25% of the median: the machine was busy "
                         "(on a shared CPU, --threads 1 may be steadier); compare such rows with care")
    for note in cfg.notes:
        print(f"note: {note}")
    if not rows:
        print("no rows measured; nothing written")
        return 1
    print(f"note: {common.provenance(rows[0], rows[0]['run_id'])}")
    path = written["path"]
    print(f"wrote {len(rows)} rows to {path}")
    if args.plot and not have_matplotlib():
        print(f"--plot: {MATPLOTLIB_MISSING}")
        return 2
    if args.plot if args.plot is not None else have_matplotlib():
        png = plot_grid(report.latest_run(report.read_csv(path), str(rows[0]["run_id"])),
                        common.png_path(path, args.png))
        print(f"wrote {png}")
    elif args.plot is None:
        print(f"note: {MATPLOTLIB_MISSING}, no PNG drawn")
    return 0
