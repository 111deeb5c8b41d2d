"""SASS census and SASS-PROMISE gate for .ci/check_cuda.sh (run by it after the nvcc compiles).

Disassembles each compiled object (cuobjdump -sass), counts instruction classes per kernel, writes
sass_report.txt and checks the `SASS-PROMISE:` comments. ptxas can only say "no spills, N registers";
whether the loads the design relies on came out 128 bits wide, or as cp.async / ldmatrix, is only
visible in the SASS, and silently regresses when a pointer loses its alignment or __restrict__.

Promise syntax (one line, in a comment in any file scanned):
    SASS-PROMISE: <kernel-glob> [@sm_NN ...] <CLASS><op><N> [<CLASS><op><N> ...]
  kernel-glob  fnmatch glob (case-sensitive) on the short kernel name of the report, e.g.
               adapter_fwd_kernel<Mma16816<*>, 64>  (it may contain spaces);
  @sm_NN       optional, restricts the promise to those archs (default: every arch compiled);
  op           >=, <= or ==;  CLASS  one of CLASSES below (REGS: registers from ptxas).
The tokens after the glob are the trailing run of conditions and @sm_NN tokens. A promise fails the
check when a matching kernel breaks a condition, and when its glob matches no kernel compiled for
its archs (a stale promise must not pass silently); one whose @sm_NN archs were all left out of
this run is reported as not checked.

Counts are static: each instruction of the kernel's SASS once (callees are inlined into the
kernel's listing), not how often it runs.
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

# Ops whose width matters for the design (vectorised global / shared accesses). The width is the
# access size; .U8/.U16 also count the sign-extending .S8/.S16 forms, and no size token means 32 bits.
WIDTH_OPS = ("LDG", "STG", "LDGSTS", "LDS", "STS")
WIDTHS = ("U8", "U16", "32", "64", "128")
WIDTH_TOKENS = {"U8": "U8", "S8": "U8", "U16": "U16", "S16": "U16", "64": "64", "128": "128"}
# LDSM = ldmatrix, HMMA = mma.sync; LD/ST (generic addressing) and LDL/STL (local memory) are counted
# so a kernel whose global traffic went generic or local cannot satisfy an LDG promise vacuously.
TOTAL_OPS = ("LDSM", "HMMA", "LD", "ST", "LDL", "STL")
CLASSES = tuple(c for op in WIDTH_OPS for c in (op, *(f"{op}.{w}" for w in WIDTHS))) + TOTAL_OPS + ("REGS",)
LEGEND = ("# LDG/STG global, LDGSTS cp.async, LDS/STS shared, each as a total and by access width (.U8/.U16 include\n"
          "# the signed forms; .32 is the unsuffixed form); LDSM ldmatrix; HMMA mma.sync; LD/ST generic-address;\n"
          "# LDL/STL local memory; REGS registers (ptxas). Static counts: each instruction in the SASS once.")

INSN = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?\w+\s+)?([A-Z][A-Z0-9_.]*)")
COND = re.compile(r"^([A-Z][A-Z0-9.]*)(>=|<=|==)(\d+)$")
OPS = {">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, "==": lambda a, b: a == b}


def classes_of(opcode: str) -> list[str]:
    op, *mods = opcode.split(".")
    if op in WIDTH_OPS:
        width = next((WIDTH_TOKENS[m] for m in mods if m in WIDTH_TOKENS), "32")
        return [op, f"{op}.{width}"]
    return [op] if op in TOTAL_OPS else []


def rel(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        return str(path)


def first_version_line(tool: str) -> str:
    out = subprocess.run([tool, "--version"], capture_output=True, text=True).stdout.splitlines()
    return next((ln for ln in out if "release" in ln), out[0] if out else "unknown version")


def find_tools(nvcc: str) -> tuple[str, str] | None:
    """(cuobjdump, nvdisasm): $CUOBJDUMP if set, else PATH, beside nvcc, the Triton wheel's copies.

    cuobjdump -sass runs nvdisasm, which it looks for beside itself, on PATH or in $NVDISASM_PATH.
    """
    if os.environ.get("CUOBJDUMP"):
        candidates = [os.environ["CUOBJDUMP"]]
    else:
        candidates = [shutil.which("cuobjdump") or "", os.path.join(os.path.dirname(nvcc), "cuobjdump")]
        spec = importlib.util.find_spec("triton")  # its wheel ships both tools (CUDA 13.x)
        if spec and spec.submodule_search_locations:
            bin_dir = os.path.join(spec.submodule_search_locations[0], "backends", "nvidia", "bin")
            candidates.append(os.path.join(bin_dir, "cuobjdump"))
    for cuobjdump in candidates:
        if not (cuobjdump and os.path.isfile(cuobjdump) and os.access(cuobjdump, os.X_OK)):
            continue
        nvdisasms = [os.path.join(os.path.dirname(cuobjdump), "nvdisasm"), shutil.which("nvdisasm") or ""]
        if os.environ.get("NVDISASM_PATH"):
            nvdisasms.append(os.path.join(os.environ["NVDISASM_PATH"], "nvdisasm"))
        for nvdisasm in nvdisasms:
            if nvdisasm and os.path.isfile(nvdisasm) and os.access(nvdisasm, os.X_OK):
                return cuobjdump, nvdisasm
    return None


def disassemble(cuobjdump: str, obj: str) -> list[tuple[str, str, Counter]]:
    """[(arch, mangled kernel name, class counts)] for every kernel in the object's SASS."""
    proc = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump -sass {obj} failed: {proc.stderr.strip()}")
    kernels, arch, counts = [], "", Counter()
    for ln in proc.stdout.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", ln)
        if m:
            arch = m.group(1)
            continue
        m = re.match(r"\s*Function : (\S+)", ln)
        if m:
            counts = Counter()
            kernels.append((arch, m.group(1), counts))
            continue
        m = INSN.match(ln)
        if m and kernels:
            counts.update(classes_of(m.group(1)))
    return kernels


def read_promises(paths: list[Path], root: Path) -> tuple[list[dict], list[str]]:
    files = sorted(f for p in paths for f in ([p] if p.is_file() else p.rglob("*"))
                   if f.suffix in (".cu", ".cuh", ".h", ".cpp"))
    promises, errors = [], []
    for f in files:
        for lineno, ln in enumerate(f.read_text(errors="replace").splitlines(), 1):
            m = re.search(r"SASS-PROMISE:(.*)", ln)
            if not m:
                continue
            where = f"{rel(f, root)}:{lineno}"
            tokens = m.group(1).replace("*/", " ").split()
            conds, archs, bad = [], [], []
            while tokens and (tokens[-1].startswith("@") or any(op in tokens[-1] for op in OPS)):
                tok = tokens.pop()
                c = COND.match(tok)
                if re.fullmatch(r"@sm_\w+", tok):
                    archs.append(tok[1:])
                elif c and c.group(1) in CLASSES:
                    conds.append((c.group(1), c.group(2), int(c.group(3))))
                else:
                    bad.append(tok)
            if bad or not tokens or not conds:
                errors.append(f"malformed SASS-PROMISE at {where}" + (f" (bad: {' '.join(bad[::-1])})" if bad else "")
                              + f": want 'SASS-PROMISE: <kernel-glob> [@sm_NN ...] <CLASS><op><N> ...' ending the line,"
                              f" op one of >= <= ==, CLASS one of {' '.join(CLASSES)}")
                continue
            promises.append({"where": where, "glob": " ".join(tokens), "archs": sorted(archs), "conds": conds[::-1]})
    return promises, errors


def table(rows: list[dict]) -> list[str]:
    shown = [c for c in CLASSES if c == "REGS" or any(r["counts"][c] for r in rows)]
    w = max([len(r["kernel"]) for r in rows] + [6])
    widths = [max(len(c), *(len(str(r["counts"][c])) for r in rows)) for c in shown]
    head = f"{'arch':<6} {'kernel':<{w}} " + " ".join(f"{c:>{cw}}" for c, cw in zip(shown, widths))
    lines = [f"# classes 0 for every kernel: {' '.join(c for c in CLASSES if c not in shown) or '(none)'}", "",
             head, "-" * len(head)]
    for r in rows:
        cells = " ".join(f"{r['counts'][c]:>{cw}}" for c, cw in zip(shown, widths))
        lines.append(f"{r['arch']:<6} {r['kernel']:<{w}} {cells}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", required=True)
    ap.add_argument("--ptxas-kernels", required=True,
                    help="TSV from check_cuda.sh: arch, registers, short name (as in the ptxas table), demangled name")
    ap.add_argument("--nvcc", required=True)
    ap.add_argument("--demangle", required=True)
    ap.add_argument("--promises", nargs="*", default=[], help="files / directories to read SASS-PROMISE comments from")
    ap.add_argument("--objects", nargs="*", default=[])
    args = ap.parse_args()
    root = Path(__file__).resolve().parents[1]
    stamp = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}"
    header = [f"# SASS report for the kernels checked by .ci/check_cuda.sh ({stamp})",
              f"# nvcc: {first_version_line(args.nvcc)}"]

    def no_census(note: str) -> None:  # the report must not keep a previous run's table
        Path(args.report).write_text("\n".join(header + ["", note]) + "\n")

    mode = os.environ.get("CHECK_CUDA_SASS", "")
    if mode not in ("", "skip"):
        print(f"check_cuda: FAIL: CHECK_CUDA_SASS={mode!r}: only 'skip' (or unset) is understood", file=sys.stderr)
        return 2
    if mode == "skip":
        no_census("SASS check skipped (CHECK_CUDA_SASS=skip): no disassembly, SASS-PROMISE comments not checked")
        print("check_cuda: SASS check skipped (CHECK_CUDA_SASS=skip)")
        return 0
    tools = find_tools(args.nvcc)
    if tools is None:
        tried = (f"CUOBJDUMP={os.environ['CUOBJDUMP']}" if os.environ.get("CUOBJDUMP")
                 else "PATH, beside nvcc, the triton wheel's backends/nvidia/bin")
        msg = (f"no cuobjdump with an nvdisasm (beside it, on PATH or in NVDISASM_PATH) found (tried {tried}); "
               "set CUOBJDUMP, or CHECK_CUDA_SASS=skip to check without SASS")
        no_census(f"SASS check FAILED: {msg}")
        print(f"check_cuda: FAIL: {msg}", file=sys.stderr)
        return 1
    cuobjdump, nvdisasm = tools
    demangler = subprocess.run([args.demangle, "--version"], capture_output=True, text=True).stdout.splitlines()
    header += [f"# cuobjdump: {first_version_line(cuobjdump)} ({rel(Path(cuobjdump), root)})",
               f"# nvdisasm: {first_version_line(nvdisasm)} ({rel(Path(nvdisasm), root)})",
               f"# demangler: {demangler[0] if demangler else args.demangle}", LEGEND]

    ptxas: dict[tuple[str, str], tuple[str, int]] = {}  # (arch, demangled name) -> (short name, registers)
    for ln in Path(args.ptxas_kernels).read_text().splitlines():
        arch, n, short, name = ln.split("\t", 3)
        # A kernel compiled in two objects: the larger count, for the REGS bound.
        ptxas[(arch, name)] = (short, max(int(n), ptxas.get((arch, name), ("", 0))[1]))

    try:
        found = [k for obj in args.objects for k in disassemble(cuobjdump, obj)]
    except RuntimeError as e:
        no_census(f"SASS check FAILED: {e}")
        print(f"check_cuda: FAIL: {e}", file=sys.stderr)
        return 1
    demangled = subprocess.run([args.demangle], input="".join(f"{name}\n" for _, name, _ in found),
                               capture_output=True, text=True).stdout.splitlines()
    rows, failures = [], []
    for (arch, _, counts), name in zip(found, demangled):
        if (arch, name) not in ptxas:  # REGS would read 0 and pass any bound
            failures.append(f"{name} ({arch}) is in the SASS but not in the ptxas report")
        short, counts["REGS"] = ptxas.get((arch, name), (name, 0))
        rows.append({"arch": arch, "kernel": short, "counts": counts})
    rows.sort(key=lambda r: (r["arch"], r["kernel"], [r["counts"][c] for c in CLASSES]))
    compiled_archs = sorted({r["arch"] for r in rows})

    promises, errors = read_promises([Path(p) for p in args.promises], root)
    failures += errors
    results = []
    for p in promises:
        archs = [a for a in p["archs"] if a in compiled_archs] if p["archs"] else compiled_archs
        text = p["where"] + ": " + " ".join([p["glob"], *("@" + a for a in p["archs"]),
                                             *(f"{c}{op}{n}" for c, op, n in p["conds"])])
        if not archs:
            results.append(f"{text}: not checked ({' '.join(p['archs'])} not compiled in this run)")
            continue
        matched = [r for r in rows if r["arch"] in archs and fnmatch.fnmatchcase(r["kernel"], p["glob"])]
        if not matched:
            failures.append(f"stale SASS-PROMISE at {p['where']}: '{p['glob']}' matches no kernel compiled for "
                            f"{' '.join(archs)}")
            results.append(f"{text}: STALE (matches no kernel)")
            continue
        broken = [f"{r['kernel']} ({r['arch']}): {c} = {r['counts'][c]}, promised {op} {n}"
                  for r in matched for c, op, n in p["conds"] if not OPS[op](r["counts"][c], n)]
        failures += [f"SASS-PROMISE broken: {b} ({p['where']})" for b in broken]
        results.append(f"{text}: {'BROKEN' if broken else 'kept'} ({len(matched)} kernel compilation(s))")

    summary = (f"{len(rows)} kernel compilations, {len(promises)} SASS-PROMISE comment(s), "
               f"{len(failures)} failure(s)")
    body = table(rows) if rows else ["(no kernels in the SASS)"]
    Path(args.report).write_text("\n".join(header + body + ["", "# SASS-PROMISE comments", *(results or ["(none)"]),
                                                            "", summary]) + "\n")
    print("check_cuda: SASS: " + summary)
    for f in failures:
        print(f"check_cuda: FAIL: {f}", file=sys.stderr)
    if not rows:
        print("check_cuda: FAIL: no kernels found in the SASS", file=sys.stderr)
        return 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
