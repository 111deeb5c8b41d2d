"""Draw PNGs from the benchmark CSVs (needs matplotlib, an optional extra: ``pip install matplotlib``).

``python -m adapterkern.bench plot CSV [--out PNG] [--run RUN_ID] [--bottleneck R]``: latency vs T
for one run of the grid, one line per implementation, one panel per hidden size d (rows: fwd and
fwd_bwd), log-log, with the memory floor of that run as a dashed line.
"""
from __future__ import annotations

import argparse
import os
from collections import defaultdict
from typing import Dict, List, Optional

from .common import png_path
from .report import latest_run, read_csv

MATPLOTLIB_MISSING = "matplotlib is not installed (`pip install matplotlib`, or the 'bench' extra)"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_grid(rows: List[Dict[str, str]], out: str, bottleneck: Optional[int] = None) -> str:
    """Draw grid ``rows`` (one run) to the PNG ``out``: median latency (us) against T, log-log, at one
    bottleneck ``r`` (default 64 if measured); returns ``out``."""
    plt = _pyplot()
    if not rows:
        raise ValueError("plot: no rows to draw")
    rs = sorted({int(r["bottleneck"]) for r in rows})
    r_sel = bottleneck if bottleneck is not None else (64 if 64 in rs else rs[len(rs) // 2])
    rows = [r for r in rows if int(r["bottleneck"]) == r_sel]
    modes = [m for m in ("fwd", "fwd_bwd") if any(r["mode"] == m for r in rows)]
    ds = sorted({int(r["hidden"]) for r in rows})
    fig, axes = plt.subplots(len(modes), len(ds), figsize=(max(6.0, 4.2 * len(ds)), 3.4 * len(modes)),
                             squeeze=False)
    impl_names: List[str] = []
    for r in rows:
        name = r["impl"] + ("+graph" if r["cuda_graph"] == "1" else "")
        if name not in impl_names:
            impl_names.append(name)
    colors = {n: f"C{i % 10}" for i, n in enumerate(impl_names)}
    for i, mode in enumerate(modes):
        for j, d in enumerate(ds):
            ax = axes[i][j]
            series: Dict[str, list] = defaultdict(list)
            floor: Dict[int, float] = {}
            for r in rows:
                if r["mode"] != mode or int(r["hidden"]) != d:
                    continue
                name = r["impl"] + ("+graph" if r["cuda_graph"] == "1" else "")
                series[name].append((int(r["tokens"]), float(r["median_us"])))
                floor[int(r["tokens"])] = float(r["floor_us"])
            for name in impl_names:
                pts = sorted(series.get(name, []))
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=name,
                            color=colors[name], linestyle="--" if name.endswith("+graph") else "-")
            if floor:
                ts = sorted(floor)
                ax.plot(ts, [floor[t] for t in ts], color="black", linestyle=":", label="memory floor")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{mode}, d={d}, r={r_sel}", fontsize=9)
            ax.set_xlabel("tokens T")
            if j == 0:
                ax.set_ylabel("median latency (us)")
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    first = rows[0]
    fig.suptitle(f"bottleneck adapter, {first['dtype']}, {first['device']}\n"
                 f"torch {first['torch']}, triton {first['triton'] or '-'}, commit {first['git_commit'] or '?'}, "
                 f"{first['date']}", fontsize=8)
    ncol = min(len(labels), 3 if len(ds) == 1 else 5)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.04 * ((len(labels) + ncol - 1) // ncol), 1, 0.93))
    return _save(plt, fig, out)


def plot_bars(rows: List[Dict[str, str]], label_key: str, metrics: List[tuple], title: str, out: str) -> str:
    """One bar panel per metric ``(column, axis label[, log scale])``, one bar per row (``label_key`` names it)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.4), squeeze=False)
    labels = [r[label_key] for r in rows]
    for ax, (key, axis_label, *log) in zip(axes[0], metrics):
        values = []
        for r in rows:
            try:
                values.append(float(r[key]))
            except (TypeError, ValueError):
                values.append(0.0)
        ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(axis_label, fontsize=9)
        if log and log[0]:
            ax.set_yscale("log")
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _save(plt, fig, out)


def main(argv: Optional[List[str]] = None) -> int:
    """``plot``: draw one run of a grid CSV to a PNG."""
    p = argparse.ArgumentParser(prog="python -m adapterkern.bench plot", description=__doc__.splitlines()[0])
    p.add_argument("csv", help="a grid CSV written by python -m adapterkern.bench")
    p.add_argument("--out", help="PNG path (default: the CSV's path with .png)")
    p.add_argument("--run", help="run_id to draw (default: the last run in the file)")
    p.add_argument("--bottleneck", type=int, help="which r to draw (default: 64 if measured)")
    args = p.parse_args(argv)
    if not have_matplotlib():
        print(f"plot: {MATPLOTLIB_MISSING}")
        return 2
    rows = latest_run(read_csv(args.csv), args.run)
    out = plot_grid(rows, png_path(args.csv, args.out), args.bottleneck)
    print(f"wrote {out}")
    return 0
