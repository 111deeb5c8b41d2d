"""Smoke check of one kernel backend, in a process of its own (gpu_check.sh's first GPU stage).

    python3 benchmarks/smoke_check.py --backend triton        # or cuda; --dry: tiny CPU shapes

Forward and backward (dx and every weight and bias gradient) of ``adapterkern.bottleneck_adapter``
on the backend and on the ``torch`` backend, both against a float64 computation from the same
(rounded) inputs, at the shapes the benchmarks care about: the target T=16384, d=4096, r=64, decode
sizes T=1 and T=64, and T=540,000 at d=4096 (T*d > 2^31: the int64 offsets). Each case in bf16 and
in float32 with TF32 allowed (``torch.backends.cuda.matmul.fp32_precision = "tf32"``, restored
afterwards). A case passes when every output is finite and its error (max |out - ref| / max |ref|)
is within max(floor, 2 x the torch backend's own error): the floor is the test suite's bf16 bound
(1.6e-2) and four TF32 unit roundoffs (2e-3) for float32, so a kernel may be as inexact as torch's
own matmuls in the same dtype, twice over, and no worse. The float64 reference is streamed over
row chunks, so even the T=540,000 case is checked on every row, at the cost of a few GEMMs.

New tensors are poisoned (NaN) before each kernel call: ``torch.empty``/``empty_like`` fill theirs,
and on CUDA the caching allocator is handed a freed all-ones-bits block (NaN in every float dtype)
that the extension's C++ allocations reuse, so an unwritten output element fails the check.

One line per case, then ``VERDICT <backend>: <word> (...)``, the word and the exit status saying the
same: PASS (0) every case passed; FAIL-FP32 (1) a float32 case failed but every bf16 case passed and
no CUDA error occurred (the bf16 benchmarks may still use the backend); FAIL (2) a bf16 case failed,
a CUDA error occurred (sticky: the rest of the process is poisoned, so it stops there) or the run
was interrupted; UNAVAILABLE (3) the backend cannot run here. gpu_check.sh reads the word, which
stands even when the process is slow to exit after printing it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass

import torch  # not Triton: TRITON_INTERPRET is read when adapterkern imports it, in main()

EXIT_PASS, EXIT_FP32_ONLY, EXIT_DROP, EXIT_UNAVAILABLE = 0, 1, 2, 3
# Case shapes (name, T, d, r); --dry swaps in tiny ones that keep the structure (the "huge" stand-in
# spans several reference chunks).
GPU_CASES = [("target", 16384, 4096, 64), ("decode", 1, 4096, 64), ("short", 64, 4096, 64),
             ("T*d>2^31", 540_000, 4096, 64)]
DRY_CASES = [("target", 96, 64, 16), ("decode", 1, 64, 16), ("short", 64, 64, 16), ("T*d>2^31 stand-in", 300, 40, 8)]
DRY_CHUNK_ROWS = 64
FLOOR = {"bfloat16": 1.6e-2, "float32+tf32": 2e-3}
SCALING = 0.5
GRAD_NAMES = ("x", "w_down", "b_down", "w_up", "b_up")


@dataclass
class Inputs:
    x: object
    w_down: object
    b_down: object
    w_up: object
    b_up: object
    dy: object


def make_inputs(tokens, hidden, rank, dtype, device, gen) -> Inputs:
    """Fresh random inputs at scales where every term of y matters (never zeros)."""
    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    return Inputs(x=rand(tokens, hidden), w_down=rand(rank, hidden, scale=hidden ** -0.5), b_down=rand(rank),
                  w_up=rand(hidden, rank, scale=rank ** -0.5), b_up=rand(hidden), dy=rand(tokens, hidden))


@contextlib.contextmanager
def poisoned_allocations(device, nbytes):
    """Every tensor allocated inside starts as NaN where that can be arranged (see the module doc)."""
    if device.type == "cuda":
        block = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(255)
        del block  # back to the caching allocator, bytes intact, for the next allocations to reuse
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poison(real_empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(real_empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = real_empty, real_empty_like


@contextlib.contextmanager
def fp32_matmul_precision(precision):
    """torch's CUDA-matmul float32 precision set to ``precision`` ("tf32" / "ieee") inside, restored after."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        saved = matmul.fp32_precision
        matmul.fp32_precision = precision
        try:
            yield
        finally:
            matmul.fp32_precision = saved
    else:  # a torch before the fp32_precision API
        saved = matmul.allow_tf32
        matmul.allow_tf32 = precision == "tf32"
        try:
            yield
        finally:
            matmul.allow_tf32 = saved


def run_op(adapterkern, backend, inp: Inputs):
    """(y, {name: gradient}) of the op on ``backend``, synchronised so errors surface here."""
    leaves = [getattr(inp, n).detach().requires_grad_() for n in GRAD_NAMES]
    x, w_down, b_down, w_up, b_up = leaves
    y = adapterkern.bottleneck_adapter(x, w_down, b_down, w_up, b_up, activation="relu", scaling=SCALING,
                                       backend=backend)
    grads = torch.autograd.grad(y, leaves, inp.dy)
    if y.is_cuda:
        torch.cuda.synchronize()
    return y.detach(), dict(zip(GRAD_NAMES, grads))


def errors_vs_float64(inp: Inputs, y, grads, chunk_rows):
    """{name: (max |out - ref| / max |ref|, all finite)} for y and every gradient, against float64
    maths written from the formula, streamed over ``chunk_rows`` rows at a time:
        y = x + s * (relu(x @ Wd^T + bd) @ Wu^T + bu)
        dz = s * dy; dh = (dz @ Wu) * [h > 0]; dx = dy + dh @ Wd
        dWu = dz^T @ a; dbu = sum dz; dWd = dh^T @ x; dbd = sum dh"""
    f64 = torch.float64
    wd, bd, wu, bu = (t.to(f64) for t in (inp.w_down, inp.b_down, inp.w_up, inp.b_up))
    sums = {n: torch.zeros_like(t) for n, t in (("w_down", wd), ("b_down", bd), ("w_up", wu), ("b_up", bu))}
    diff = {"y": 0.0, "x": 0.0}
    scale = {"y": 0.0, "x": 0.0}
    finite = {n: bool(torch.isfinite(g).all()) for n, g in grads.items()}
    finite["y"] = bool(torch.isfinite(y).all())
    for start in range(0, inp.x.shape[0], chunk_rows):
        rows = slice(start, start + chunk_rows)
        x = inp.x[rows].to(f64)
        dy = inp.dy[rows].to(f64)
        h = x @ wd.T + bd
        a = h.clamp_min(0)
        y_ref = x + SCALING * (a @ wu.T + bu)
        dz = SCALING * dy
        dh = (dz @ wu) * (h > 0)
        dx_ref = dy + dh @ wd
        sums["w_up"] += dz.T @ a
        sums["b_up"] += dz.sum(0)
        sums["w_down"] += dh.T @ x
        sums["b_down"] += dh.sum(0)
        for name, got, ref in (("y", y[rows], y_ref), ("x", grads["x"][rows], dx_ref)):
            diff[name] = max(diff[name], (got.to(f64) - ref).abs().max().item())
            scale[name] = max(scale[name], ref.abs().max().item())
    out = {}
    for name in ("y", *GRAD_NAMES):
        if name in sums:
            ref = sums[name]
            d, s = (grads[name].to(f64) - ref).abs().max().item(), ref.abs().max().item()
        else:
            d, s = diff[name], scale[name]
        out[name] = (d / max(s, 1e-30), finite[name])
    return out


def check_case(adapterkern, backend, inp: Inputs, kind, chunk_rows):
    """(passed, one-line report): the backend against float64 within max(floor, 2 x torch's error)."""
    nbytes = 3 * inp.x.numel() * inp.x.element_size()  # y, dx and slack: the kernel's new tensors
    with poisoned_allocations(inp.x.device, nbytes):
        y, grads = run_op(adapterkern, backend, inp)
    got = errors_vs_float64(inp, y, grads, chunk_rows)
    del y, grads
    y, grads = run_op(adapterkern, "torch", inp)
    plain = errors_vs_float64(inp, y, grads, chunk_rows)
    del y, grads
    rows = []  # (err / bound, label, err, bound, finite)
    for name, (err, finite) in got.items():
        bound = max(FLOOR[kind], 2 * plain[name][0])
        rows.append((err / bound if finite else float("inf"), "y" if name == "y" else "d" + name, err, bound, finite))
    over = [f"{label} {err:.1e}" + ("" if finite else " non-finite") for ratio, label, err, _, finite in rows
            if not ratio <= 1.0]
    _, label, err, bound, _ = max(rows, key=lambda row: row[0])
    detail = f"worst {label} {err:.1e} (bound {bound:.1e})"
    if over:
        detail += "; over the bound: " + ", ".join(over)
    return not over, detail


def is_cuda_error(exc) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc)
    return "CUDA error" in text or "cudaError" in text or "illegal memory access" in text


def run_cases(adapterkern, backend, device, seed):
    """Run every case, printing one line each; returns [(kind, True / False / None for skipped)]."""
    cases = DRY_CASES if device.type == "cpu" else GPU_CASES
    gen = torch.Generator(device=device).manual_seed(seed)
    results = []
    for kind, dtype, precision in (("bfloat16", torch.bfloat16, "ieee"), ("float32+tf32", torch.float32, "tf32")):
        for name, tokens, hidden, rank in cases:
            chunk_rows = DRY_CHUNK_ROWS if device.type == "cpu" else max(1, 2**27 // (8 * hidden))
            label = f"{backend} {kind} {name} T={tokens} d={hidden} r={rank}"
            start = time.perf_counter()
            try:
                with fp32_matmul_precision(precision):
                    inp = make_inputs(tokens, hidden, rank, dtype, device, gen)
                    passed, detail = check_case(adapterkern, backend, inp, kind, chunk_rows)
                del inp
            except torch.cuda.OutOfMemoryError as exc:
                results.append((kind, None))
                print(f"skip {label}: out of memory ({str(exc).splitlines()[0]})", flush=True)
                torch.cuda.empty_cache()
                continue
            except Exception as exc:  # noqa: BLE001 - report every failure; a CUDA error ends the run
                results.append((kind, False))
                print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                      flush=True)
                if device.type == "cuda" and is_cuda_error(exc):
                    print(f"VERDICT {backend}: FAIL (CUDA error: the process's CUDA context is unusable; "
                          "remaining cases not run)", flush=True)
                    os._exit(EXIT_DROP)  # no clean-up: a poisoned context can hang in destructors
                continue
            results.append((kind, passed))
            print(f"{'ok  ' if passed else 'FAIL'} {label}: {detail} [{time.perf_counter() - start:.1f}s]", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return results


def verdict(backend, results):
    """(exit status, the VERDICT line) for the case results of run_cases."""
    failed = [kind for kind, ok in results if ok is False]
    skipped = sum(ok is None for _, ok in results)
    ran = len(results) - skipped
    note = f"; {skipped} skipped (out of memory)" if skipped else ""
    if not failed:
        return EXIT_PASS, f"VERDICT {backend}: PASS ({ran} of {ran} cases{note})"
    if "bfloat16" in failed:
        return EXIT_DROP, f"VERDICT {backend}: FAIL ({len(failed)} of {ran} cases{note}; a bf16 case failed: drop it)"
    return EXIT_FP32_ONLY, (f"VERDICT {backend}: FAIL-FP32 ({len(failed)} of {ran} cases{note}; float32 only: "
                            "the bf16 benchmarks keep it)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, choices=("triton", "cuda"))
    p.add_argument("--dry", action="store_true", help="tiny shapes on the CPU (Triton's interpreter)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.dry:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when Triton defines the kernels: before the import
    import adapterkern
    from adapterkern.backends import is_available, kernel_backend

    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    if not is_available(args.backend, device):
        reason = kernel_backend(args.backend).unavailable_reason(device)
        print(f"VERDICT {args.backend}: UNAVAILABLE on {device}: {reason}", flush=True)
        return EXIT_UNAVAILABLE
    try:
        results = run_cases(adapterkern, args.backend, device, args.seed)
    except KeyboardInterrupt:  # gpu_check.sh's time limit (SIGINT): a partial run never passes
        print(f"VERDICT {args.backend}: FAIL (interrupted by the time limit)", flush=True)
        return EXIT_DROP
    status, line = verdict(args.backend, results)
    print(line, flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
