"""CSV rows of the benchmarks: appending and reading back; the grid's columns and printed table, and
``python -m adapterkern.bench table CSV``, which prints that table again from a grid CSV."""
from __future__ import annotations

import argparse
import csv
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

from .common import PROVENANCE, text_table

# Every grid row has exactly these columns, in this order. Provenance first (one run shares it),
# then the point, then the measurement and what is derived from it.
COLUMNS = [
    *PROVENANCE, "malloc",
    "mode", "dtype", "tokens", "hidden", "bottleneck", "activation", "impl", "cuda_graph",
    "median_us", "iqr_us", "samples", "timer", "rotate_sets",
    "floor_bytes", "copy_GBps", "floor_us", "pct_of_floor", "achieved_GBps", "achieved_GFLOPs",
    "speedup_vs_eager", "max_rel_err",
]
NUMERIC = [
    "tokens", "hidden", "bottleneck", "cuda_graph", "median_us", "iqr_us", "samples", "rotate_sets",
    "floor_bytes", "copy_GBps", "floor_us", "pct_of_floor", "achieved_GBps", "achieved_GFLOPs",
    "speedup_vs_eager", "max_rel_err",
]


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def append_csv(path: str, rows: Sequence[Dict[str, object]], columns: Sequence[str] = COLUMNS) -> str:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new or empty).

    If an existing file has a different header (an older version of the harness), the rows go to a
    new file beside it instead, so no file ever mixes layouts. Returns the path written.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if header != list(columns):
            stem, ext = os.path.splitext(path)
            path = f"{stem}.v{len(columns)}-{abs(hash(tuple(columns))) % 10**6}{ext or '.csv'}"
            return append_csv(path, rows, columns)
        new = False
    else:
        new = True
    with open(path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return path


def read_csv(path: str) -> List[Dict[str, str]]:
    """Every row of the CSV at ``path``, as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def latest_run(rows: List[Dict[str, str]], run_id: Optional[str] = None) -> List[Dict[str, str]]:
    """The rows of run ``run_id`` (default: the last run in the file)."""
    if not rows:
        return []
    run_id = run_id or rows[-1]["run_id"]
    return [r for r in rows if r["run_id"] == run_id]


def _num(row: Dict[str, object], key: str) -> float:
    try:
        return float(row[key])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return math.nan


def _cell(value: float, digits: int) -> str:
    if math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


TABLE_HEADER = ["mode", "dtype", "T", "d", "r", "impl", "thr", "median us", "IQR us", "GB/s", "floor us",
                "% floor", "vs eager", "rel err"]


def table_cells(rows: Iterable[Dict[str, object]]) -> List[List[str]]:
    """The cells of :data:`TABLE_HEADER` for each grid row (from a run or read back from a CSV)."""
    out = []
    for r in rows:
        impl = str(r["impl"]) + ("+graph" if str(r.get("cuda_graph")) in ("1", "True") else "")
        out.append([
            str(r["mode"]), str(r["dtype"]).replace("torch.", ""), str(r["tokens"]), str(r["hidden"]),
            str(r["bottleneck"]), impl, str(r.get("threads") or "-"),
            _cell(_num(r, "median_us"), 1), _cell(_num(r, "iqr_us"), 1), _cell(_num(r, "achieved_GBps"), 1),
            _cell(_num(r, "floor_us"), 1), _cell(_num(r, "pct_of_floor"), 1),
            _cell(_num(r, "speedup_vs_eager"), 2) + ("x" if not math.isnan(_num(r, "speedup_vs_eager")) else ""),
            f"{_num(r, 'max_rel_err'):.1e}",
        ])
    return out


def format_table(rows: Iterable[Dict[str, object]], markdown: bool = False) -> str:
    """The grid's table (a blank line between points), or a Markdown table."""
    cells = table_cells(rows)
    if markdown:
        lines = ["| " + " | ".join(TABLE_HEADER) + " |",
                 "|" + "|".join("---" if i < 7 else "---:" for i in range(len(TABLE_HEADER))) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    return text_table(TABLE_HEADER, cells, left=6, group=5)  # names left-aligned, numbers right


def main(argv: Optional[List[str]] = None) -> int:
    """``table``: print the table of one run of a grid CSV."""
    p = argparse.ArgumentParser(prog="python -m adapterkern.bench table",
                                description="Print the table of one run from a grid CSV.")
    p.add_argument("csv")
    p.add_argument("--run", help="run_id (default: the last run in the file)")
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    rows = latest_run(read_csv(args.csv), args.run)
    if not rows:
        print(f"{args.csv}: no rows")
        return 1
    print(format_table(rows, markdown=args.markdown))
    first = rows[0]
    print(f"\n{first['device']}; {first['dtype']}; torch {first['torch']}, triton {first['triton'] or '-'}, "
          f"CUDA {first['cuda'] or '-'}; commit {first['git_commit'] or '?'}; {first['date']}; "
          f"copy bandwidth {float(first['copy_GBps']):.1f} GB/s")
    return 0
