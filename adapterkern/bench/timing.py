"""Timers: a median and its spread (IQR) for one callable, the same way for every implementation.

* CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` after a short warm-up. Each sample is the
  mean of one block of calls; the median and IQR are over blocks.
* CUDA: ``triton.testing.do_bench(return_mode="all")``, which clears the L2 cache before every call and
  times each call with CUDA events; the median and IQR are over calls. Without Triton, the same with
  CUDA events and an explicit L2-clearing write. The callables themselves also rotate over several
  input sets (see :func:`rotation_sets`), so consecutive calls never reuse the same buffers.
* CUDA graphs (:func:`cuda_graph_callables`): one graph captured per input set, replayed in rotation,
  for the small-T regime where launch overhead dominates.
* :func:`copy_bandwidth`: the device-to-device copy bandwidth (bytes read + written per second of a
  large ``Tensor.copy_``), measured in the same run; it is the denominator of the memory floor.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class Timing:
    """One callable's measurement, in seconds per call."""

    median_s: float
    iqr_s: float
    samples: int  # how many measurements the median is taken over
    timer: str  # which method produced them


def _quantile(values: Sequence[float], q: float) -> float:
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_s: Sequence[float], timer: str) -> Timing:
    """Median and IQR of per-call times ``times_s`` (seconds); ``timer`` names how they were taken."""
    return Timing(
        median_s=statistics.median(times_s),
        iqr_s=_quantile(times_s, 0.75) - _quantile(times_s, 0.25),
        samples=len(times_s),
        timer=timer,
    )


def time_cpu(fn: Callable[[], object], min_run_time: float = 0.2, warmup_time: float = 0.02,
             samples_only: bool = False):
    """Median and IQR of ``fn`` on the CPU with ``torch.utils.benchmark`` (blocks of calls).

    With ``samples_only`` returns the raw per-call block means instead (to pool several rounds).
    """
    from torch.utils.benchmark import Timer

    end = time.perf_counter() + warmup_time
    while time.perf_counter() < end:
        fn()
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    m = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(m.times)  # per-call means of each block
    if samples_only:
        return times
    while len(times) < 3:  # keep at least 3 blocks so an IQR exists
        times += list(timer.blocked_autorange(min_run_time=min_run_time / 2).times)
    return summarize(times, "torch.utils.benchmark.blocked_autorange")


_L2_FLUSH: dict = {}


def _l2_bytes(device: torch.device) -> int:
    """The GPU's L2 cache size in bytes (64 MiB when the driver does not say)."""
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)


def time_cuda(fn: Callable[[], object], warmup_ms: float = 25.0, rep_ms: float = 100.0,
              device: torch.device | None = None) -> Timing:
    """Median and IQR (over calls) of ``fn`` on a CUDA device, L2 cleared before each call."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        try:
            times_ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        except (TypeError, AssertionError):  # a Triton whose do_bench has no return_mode="all"
            times_ms = None
        if isinstance(times_ms, (list, tuple)) and times_ms:
            return summarize([t * 1e-3 for t in times_ms], "triton.testing.do_bench")
    return _time_cuda_events(fn, warmup_ms, rep_ms, device or torch.device("cuda"))


def _time_cuda_events(fn: Callable[[], object], warmup_ms: float, rep_ms: float, device: torch.device) -> Timing:
    """:func:`time_cuda` without Triton: CUDA events around each call, an L2-sized write before each."""
    flush = _L2_FLUSH.get(device)
    if flush is None:
        flush = _L2_FLUSH[device] = torch.empty(2 * _l2_bytes(device) // 4, dtype=torch.int32, device=device)
    fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate_ms = max(start.elapsed_time(end) / 5, 1e-3)
    n_warmup = max(1, int(warmup_ms / estimate_ms))
    n_rep = max(10, int(rep_ms / estimate_ms))
    for _ in range(n_warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return summarize([s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)], "cuda events")


def time_fn(fn: Callable[[], object], device: torch.device, *, min_run_time: float, warmup_ms: float,
            rep_ms: float) -> Timing:
    """:func:`time_cuda` on a CUDA device (``warmup_ms``, ``rep_ms``), else :func:`time_cpu` (``min_run_time`` s)."""
    if device.type == "cuda":
        return time_cuda(fn, warmup_ms=warmup_ms, rep_ms=rep_ms, device=device)
    return time_cpu(fn, min_run_time=min_run_time)


def rotation_sets(set_bytes: int, device: torch.device, *, max_sets: int = 32) -> int:
    """How many input sets to rotate over so together they exceed the last-level cache twice over."""
    if device.type == "cuda":
        cache = _l2_bytes(device)
    else:
        cache = 32 * 2**20  # a typical server L3 slice; only keeps small inputs from being reused hot
    return int(min(max_sets, max(2, math.ceil(2 * cache / max(set_bytes, 1)))))


def cuda_graph_callables(steps: List[Callable[[], object]], device: torch.device) -> Callable[[], object]:
    """Capture ``steps[i]`` (one per input set) into CUDA graphs; return a callable replaying them in turn.

    Each step is run three times on a side stream first (autotuning, cuBLAS workspaces, autograd
    state), as graph capture requires. Raises whatever capture raises when an implementation cannot be
    captured; the caller records that and moves on.
    """
    graphs = []
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for step in steps:
            for _ in range(3):
                step()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    for step in steps:  # each graph has its own memory pool: replays never share scratch memory
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graphs.append(graph)
    torch.cuda.synchronize(device)
    state = {"i": 0}

    def replay() -> None:
        i = state["i"]
        state["i"] = (i + 1) % len(graphs)
        graphs[i].replay()

    replay.graphs = graphs  # keep them (and their memory pool) alive as long as the callable
    return replay


def copy_bandwidth(device: torch.device, nbytes: int, *, min_run_time: float = 0.2, warmup_ms: float = 10.0,
                   rep_ms: float = 50.0) -> float:
    """Bytes per second moved by ``dst.copy_(src)`` for ``nbytes`` buffers (read + write both counted)."""
    n = max(1, nbytes // 4)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    t = time_fn(copy, device, min_run_time=min_run_time, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return 2 * n * 4 / t.median_s


def interleaved(fns: Sequence[Callable[[], object]], device: torch.device, *, rounds: int,
                min_block_s: float) -> List[Timing]:
    """Time several callables in alternation (ABCABC...): each round times one block of calls of each.

    Used where the quantity of interest is a small difference between callables (the layer
    benchmark's adapter overhead): alternating cancels slow drift of a shared machine's speed.
    Returns one Timing per callable, over its rounds' per-call block means.
    """
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    per_block = []
    for fn in fns:  # warm-up, and how many calls fill one block
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        one = max(time.perf_counter() - t0, 1e-6)
        per_block.append(max(1, int(min_block_s / one)))
    samples: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            sync()
            t0 = time.perf_counter()
            for _ in range(per_block[k]):
                fn()
            sync()
            samples[k].append((time.perf_counter() - t0) / per_block[k])
    return [summarize(s, "interleaved perf_counter blocks") for s in samples]


_MALLOC_SETTING = {"value": "default"}


def tune_cpu_malloc() -> str:
    """Keep glibc malloc from returning every large CPU tensor to the OS (``mallopt``); say what was set.

    PyTorch has no caching allocator on the CPU: with glibc's defaults each tensor above the mmap
    threshold is a fresh ``mmap``, so every call pays page faults for its outputs and temporaries,
    which on a virtualised machine can cost more than the arithmetic and swamps the comparison. The
    harness raises the mmap and trim thresholds (the effect of running under jemalloc/tcmalloc), the
    same for every implementation, and records the setting in each row's ``malloc`` column.
    ``--malloc default`` measures with glibc's defaults instead.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        ok = False
    _MALLOC_SETTING["value"] = "glibc mmap/trim threshold 1GiB" if ok else "default (mallopt unavailable)"
    return _MALLOC_SETTING["value"]


def malloc_setting() -> str:
    """What :func:`tune_cpu_malloc` set (``default`` when it was not called): the CSVs' ``malloc`` column."""
    return _MALLOC_SETTING["value"]


def busy_cores_slowdown(threads: int) -> float:
    """How much slower a ``threads``-thread matmul runs than a 1-thread one right now (>1: cores busy).

    Leaves torch at ``threads`` threads. About 0.1 s.
    """
    a = torch.randn(256, 768)
    b = torch.randn(768, 768)

    def probe(n: int) -> float:
        torch.set_num_threads(n)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(15):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    t_one = probe(1)
    t_all = probe(threads)
    return t_all / t_one


BUSY_SLOWDOWN = 1.3


def choose_cpu_threads(requested: Optional[str]) -> Optional[str]:
    """Apply ``--threads`` (a number, or ``auto``/None); return a note saying what was chosen and why.

    ``auto`` keeps PyTorch's default (all cores) unless a quick probe shows the cores are busy with
    other work: then every parallel region waits for a descheduled thread, the multi-threaded matmul
    runs slower than a single-threaded one, and timings turn into scheduler noise (tens of ms per
    op on a shared 2-core machine). In that case it measures with one thread and says so. (The grid
    probes again before every point; see ``GridConfig.auto_threads``.)
    """
    if requested not in (None, "", "auto"):
        torch.set_num_threads(int(requested))
        return None
    n = torch.get_num_threads()
    if n <= 1:
        return None
    slowdown = busy_cores_slowdown(n)
    if slowdown > BUSY_SLOWDOWN:
        torch.set_num_threads(1)
        return (f"CPU threads: 1 (a {n}-thread matmul probe ran {slowdown:.1f}x slower than 1 thread: the "
                f"cores are busy with other work; --threads {n} to insist)")
    return None
