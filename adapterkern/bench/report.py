"""CSV rows of the grid benchmark: the columns, appending, reading back, and the printed table."""
from __future__ import annotations

import csv
import math
import os
from typing import Dict, Iterable, List, Optional, Sequence

# Every grid row has exactly these columns, in this order. Provenance first (one run shares it),
# then the point, then the measurement and what is derived from it.
COLUMNS = [
    "run_id", "date", "device", "device_type", "threads", "torch", "triton", "cuda", "adapterkern", "git_commit",
    "malloc",
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
    cells = table_cells(rows)
    if markdown:
        lines = ["| " + " | ".join(TABLE_HEADER) + " |",
                 "|" + "|".join("---" if i < 7 else "---:" for i in range(len(TABLE_HEADER))) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells]
        return "\n".join(lines)
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(TABLE_HEADER)]
    left = 6  # the first six columns are names, left-aligned; the numbers right-aligned

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(TABLE_HEADER), line(["-" * w for w in widths])]
    previous = None
    for c in cells:
        key = tuple(c[:5])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(line(c))
    return "\n".join(out)
