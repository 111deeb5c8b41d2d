"""What every benchmark command shares: its common options, the set-up of a run (device, dtype, CPU
threads and allocator, provenance, run id, where the CSV goes), backend choice per op, the progress bar
and the plain-text tables.

Provenance: every CSV row starts with the :data:`PROVENANCE` columns (device name, library versions,
git commit, date), so a number can always be traced to the machine and the code that produced it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import functools
import os
import platform
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from adapterkern.backends import implements, resolve_backend

from . import timing

# The first columns of every CSV the benchmarks write, in this order.
PROVENANCE = ["run_id", "date", "device", "device_type", "threads", "torch", "triton", "cuda", "adapterkern",
              "git_commit"]
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
# Where runs write by default: git-ignored (``build/``), so ``make bench`` leaves the checkout clean.
RESULTS_DIR = os.path.join("build", "bench")
# The tracked reference results: written only when asked (``--reference``, ``make bench-reference``),
# to be committed as a deliberate act.
REFERENCE_DIR = os.path.join("benchmarks", "results")


# ------------------------------------------------------------------------------------------ options

def add_size_args(p: argparse.ArgumentParser, quick: str, full: str) -> None:
    """``--quick`` / ``--full`` (mutually exclusive), with what each means for this command."""
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help=quick)
    size.add_argument("--full", action="store_true", help=full)


def add_device_args(p: argparse.ArgumentParser, kind: str) -> None:
    """The options every command has: ``--dtype --device --threads --malloc --csv | --reference`` (read by
    :func:`start`)."""
    p.add_argument("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--device", help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--threads", default="auto",
                   help="CPU: torch threads; auto (default) = all cores unless a probe finds them busy, then 1")
    p.add_argument("--malloc", choices=("tuned", "default"), default="tuned",
                   help="CPU: raise glibc's mmap/trim thresholds so tensors are not page-faulted in on every "
                        "call (default tuned; see adapterkern.bench.timing.tune_cpu_malloc)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--csv", help=f"append results here (default {RESULTS_DIR}/{kind}-<device>.csv, git-ignored)")
    out.add_argument("--reference", action="store_true",
                     help=f"append to the tracked reference results, {REFERENCE_DIR}/{kind}-<device>.csv "
                          "(then commit them)")


def add_subcommand_args(p: argparse.ArgumentParser, kind: str, *, rounds: Optional[int],
                        rounds_help: Optional[str] = None) -> None:
    """The options of the subcommands, which time a few variants in alternation (:func:`timing.interleaved`):
    :func:`add_device_args`, ``--backend``, ``--rounds`` and ``--block-ms``."""
    add_device_args(p, kind)
    p.add_argument("--backend", default="auto",
                   help="adapterkern backend: auto (default), torch, triton or cuda; an op it has no kernel "
                        "for runs on auto's choice (a note says so)")
    p.add_argument("--rounds", type=int, default=rounds,
                   help=rounds_help or f"alternating rounds (default {rounds})")
    p.add_argument("--block-ms", type=float, default=50.0, help="time per block of calls (default 50 ms)")


# ------------------------------------------------------------------------------------ device, dtype

def parse_points(text: str) -> List[Tuple[int, int]]:
    """``--batches``: ``"1x1,1x128"`` -> ``[(1, 1), (1, 128)]`` (batch, sequence length)."""
    try:
        return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        raise SystemExit(f"--batches: expected comma-separated BxS such as 1x128, got {text!r}") from None


def pick_device(name: Optional[str]) -> torch.device:
    """``--device``: the named device, else CUDA when available, else the CPU."""
    if name:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available to this PyTorch build")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """The dtype without --dtype: bfloat16 on a GPU, float32 on a CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(name: Optional[str], device: torch.device) -> torch.dtype:
    """``--dtype``: one of :data:`DTYPES`, or the device's default when not given."""
    if not name:
        return default_dtype(device)
    if name not in DTYPES:
        raise SystemExit(f"--dtype: unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def prepare_cpu(device: torch.device, threads: Optional[str], malloc: str) -> List[str]:
    """On a CPU device, apply ``--threads`` and ``--malloc``; return the notes saying what was chosen."""
    notes: List[str] = []
    if device.type != "cpu":
        return notes
    threads_note = timing.choose_cpu_threads(threads)
    if threads_note:
        notes.append(threads_note)
    if malloc == "tuned":
        notes.append(f"CPU allocator: {timing.tune_cpu_malloc()} (--malloc default to measure without)")
    return notes


def backend_for(requested: str, device: torch.device, op: str, notes: List[str]) -> str:
    """The backend that runs ``op`` (``adapterkern.backends.SINGLE``, ``MULTI`` or ``BATCHED``) on
    ``device`` for ``--backend requested``: what ``requested`` resolves to, or, when that backend has no
    kernel for ``op``, what ``auto`` resolves to (appending a note). Exits with the reason when the
    requested backend is unknown or cannot run on ``device``."""
    try:
        asked = requested if implements(requested, op) else "auto"
        name = resolve_backend(asked, device, op)
    except (ValueError, RuntimeError) as exc:
        raise SystemExit(f"--backend {requested}: {exc}") from None
    if asked != requested:
        notes.append(f"--backend {requested} has no {op} kernel: {op} runs on {name}")
    return name


# ------------------------------------------------------------------------------------- provenance

def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else ``platform.processor()``, with the CPU count.

    The torch thread count is a separate column (``threads``): it can change between points."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    name = name or platform.processor() or platform.machine() or "cpu"
    return f"{name} ({os.cpu_count()} cpus)"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def device_slug(device: torch.device) -> str:
    """A short file-name-safe name for the device: ``cpu`` or e.g. ``nvidia-h200``."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def _version(module: str) -> str:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - any import failure means "not there"
        return ""
    return str(getattr(mod, "__version__", ""))


def adapterkern_version() -> str:
    try:
        from importlib.metadata import version

        return version("adapterkern")
    except Exception:  # noqa: BLE001 - not installed as a distribution (plain checkout)
        return _version("adapterkern")


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """Short commit of the checkout this package is imported from, ``+dirty`` when it has local changes.

    ``$ADAPTERKERN_GIT_COMMIT`` wins when set: a copy of the tree without ``.git`` (the GPU machine's,
    see benchmarks/gpu_check.sh) has no other way to know its commit."""
    given = os.environ.get("ADAPTERKERN_GIT_COMMIT", "").strip()
    if given:
        return given
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not commit:
            return ""
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def now_utc() -> str:
    """The CSVs' ``date``: ISO 8601, UTC, to the second."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def environment(device: torch.device) -> Dict[str, str]:
    """The :data:`PROVENANCE` columns but ``run_id``, as they are now (``threads``: torch's current count)."""
    return {
        "date": now_utc(),
        "device": device_name(device),
        "device_type": device.type,
        "threads": str(torch.get_num_threads()) if device.type == "cpu" else "",
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "",
        "adapterkern": adapterkern_version(),
        "git_commit": git_commit(),
    }


def new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx`` (UTC, then random hex): sorts by start time, unique across machines."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def provenance(env: Mapping[str, object], run_id: object, **versions: str) -> str:
    """One line naming the device, the versions (``versions``: more of them, e.g. transformers), the
    commit and the run; ``env`` is :func:`environment`'s dict or a CSV row."""
    extra = "".join(f", {name} {v}" for name, v in versions.items())
    return (f"device {env['device']}; torch {env['torch']}, triton {env['triton'] or '-'}, CUDA {env['cuda'] or '-'}"
            f"{extra}, commit {env['git_commit'] or '?'}; run {run_id}")


# -------------------------------------------------------------------------------------- output files

def default_csv(kind: str, device: torch.device, reference: bool = False) -> str:
    """``build/bench/<kind>-<device slug>.csv`` (git-ignored), or with ``reference`` the tracked
    ``benchmarks/results/<kind>-<device slug>.csv`` (both relative to the working directory)."""
    return os.path.join(REFERENCE_DIR if reference else RESULTS_DIR, f"{kind}-{device_slug(device)}.csv")


def csv_path(args: argparse.Namespace, kind: str, device: torch.device) -> str:
    """Where a command's rows go: ``--csv``, else :func:`default_csv` (``--reference``: the tracked file)."""
    return args.csv or default_csv(kind, device, reference=bool(getattr(args, "reference", False)))


def png_path(csv_path: str, given: Optional[str] = None) -> str:
    """``given``, else the CSV's path with ``.png``."""
    return given or os.path.splitext(csv_path)[0] + ".png"


# --------------------------------------------------------------------------------------------- a run

@dataclass
class Run:
    """One subcommand run: where it measures, the notes to print at the end, and its rows' provenance."""

    kind: str  # the subcommand; names the CSV and prefixes the progress lines
    device: torch.device
    dtype: torch.dtype
    notes: List[str]
    env: Dict[str, str]
    run_id: str
    csv: str  # where the rows are appended (append_csv may pick a file beside it)

    def say(self, text: str) -> None:
        """A progress line on stdout, ``[kind] text``."""
        print(f"[{self.kind}] {text}", flush=True)

    def note(self, text: str) -> None:
        """Keep ``text`` for the end of the run and print it now too."""
        self.notes.append(text)
        self.say(text)

    def backend(self, requested: str, op: str) -> str:
        """:func:`backend_for` on this run's device, its note (if any) kept with the run's."""
        return backend_for(requested, self.device, op, self.notes)

    def row(self, **fields: object) -> Dict[str, object]:
        """A CSV row: run id, provenance, the CPU allocator setting and the dtype, then ``fields``."""
        return {"run_id": self.run_id, **self.env,
                "malloc": timing.malloc_setting() if self.device.type == "cpu" else "",
                "dtype": dtype_name(self.dtype), **fields}

    def finish(self, table: str, rows: Sequence[object], path: str, *notes: str, **versions: str) -> int:
        """Print the table, the run's notes, then ``notes``, the provenance line and where the rows went;
        0 when there are rows, else 1."""
        print()
        print(table)
        for text in [*self.notes, *notes]:
            print(f"note: {text}")
        if not rows:
            print("no rows measured; nothing written")
            return 1
        print(f"note: {provenance(self.env, self.run_id, **versions)}")
        print(f"wrote {len(rows)} rows to {path}")
        return 0


def start(args: argparse.Namespace, kind: str,
          requires: Optional[Callable[[], Optional[str]]] = None) -> Optional[Run]:
    """The set-up of a subcommand from its :func:`add_device_args` options: the device, the CPU threads
    and allocator, the dtype, the provenance (after the thread choice) and the CSV path. ``requires``
    says why the subcommand cannot run here (an optional package missing) or returns None; when it says
    why, that is printed and the result is None (nothing to run: exit status 0)."""
    reason = requires() if requires is not None else None
    if reason:
        print(f"{kind} benchmark skipped: {reason}")
        return None
    device = pick_device(args.device)
    notes = prepare_cpu(device, args.threads, args.malloc)
    dtype = parse_dtype(args.dtype, device)
    return Run(kind, device, dtype, notes, environment(device), new_run_id(), csv_path(args, kind, device))


# -------------------------------------------------------------------------------------------- tables

def text_table(header: Sequence[str], cells: Sequence[Sequence[str]], *, left: Optional[int] = None,
               group: int = 0) -> str:
    """Columns padded to their widest cell and joined by two spaces, under ``header`` and a rule. The first
    ``left`` columns are left-aligned, the others right-aligned (all left-aligned when ``left`` is None); a
    blank line separates rows whose first ``group`` cells differ."""
    n_left = len(header) if left is None else left
    widths = [max([len(h), *(len(c[i]) for c in cells)]) for i, h in enumerate(header)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if i < n_left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

    out = [line(header), line(["-" * w for w in widths])]
    previous = None
    for c in cells:
        key = tuple(c[:group])
        if group and previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(line(c))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ progress

class _SimpleBar:
    """A one-line bar on stderr: redrawn in place on a terminal, a line every 5 s into a log file."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.n, self.enabled = max(total, 1), desc, 0, enabled
        self.start = time.perf_counter()
        self.postfix = ""
        self.tty = sys.stderr.isatty()
        self._last_print = 0.0

    def set_postfix(self, text: str) -> None:
        self.postfix = text
        self._draw()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw(force=self.n >= self.total)

    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not self.tty and not force and now - self._last_print < 5.0:
            return  # a log file gets a line every few seconds, not a flood
        self._last_print = now
        frac = min(self.n / self.total, 1.0)
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(24 * frac) + "." * (24 - int(24 * frac))
        line = f"{self.desc} [{bar}] {self.n}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s {self.postfix}"
        if self.tty:
            sys.stderr.write("\r" + line[:160].ljust(160))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _TqdmBar:
    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                        mininterval=0.5 if sys.stderr.isatty() else 5.0)

    def set_postfix(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def progress(total: int, desc: str, enabled: bool = True):
    """A progress bar over ``total`` units (``update``, ``set_postfix``, ``close``): tqdm when installed."""
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return _SimpleBar(total, desc, enabled)
    return _TqdmBar(total, desc, enabled)
