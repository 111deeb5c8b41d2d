"""Planted bugs: each mutation of csrc/ must make the host-emulated kernel test fail.

For every mutant, csrc/ is copied to a temporary directory, one source edit is applied (the edited
text must occur exactly once), and the test program is built and run in the mutant's variants:
``asan`` (AddressSanitizer, every case: numerics and memory errors; build.py's asan-only build) and/or
``tsan`` (ThreadSanitizer, the race-prone subset). The unmutated copy must pass both. Prints, per mutant and variant, whether
the bug was caught and the first line that says so.

    python3 csrc/emu/mutants.py                 # every mutant; exit status 1 if one survives
    python3 csrc/emu/mutants.py --only no-b_up  # one mutant
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path


def _load_build():  # csrc/emu/build.py, under a name that cannot clash with an installed `build` package
    name = "adapterkern_emu_build"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("build.py"))
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


build = _load_build()


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str
    file: str      # relative to csrc/
    old: str
    new: str
    variants: tuple[str, ...]  # where it must be caught
    why: str
    core: bool = True  # in the suite's set (ADAPTERKERN_EMU_MUTANTS=1); the others with =all or this CLI
    cases: str = ""    # run only the cases whose description contains this (test_kernels --filter): the
                       # vectorised / cluster paths' bugs need not wait for every scalar-path case


MUTANTS = (
    Mutant("swapped-fragment", "kernels/common.cuh",
           "    f.r[1] = ld_u32(a + (g + 8) * ld + 2 * t);\n    f.r[2] = ld_u32(a + g * ld + 2 * t + 8);\n",
           "    f.r[1] = ld_u32(a + g * ld + 2 * t + 8);\n    f.r[2] = ld_u32(a + (g + 8) * ld + 2 * t);\n",
           ("asan",), "Mma16816::load_a: registers a2,a3 and a4,a5 exchanged (rows g+8 vs columns +8)", core=False),
    Mutant("missing-barrier", "kernels/common.cuh",
           "    warp_tile_mma<Op, MT, NT>(acc, a + k0, lda, ws + wn0 * LDW, LDW);\n    __syncthreads();\n",
           "    warp_tile_mma<Op, MT, NT>(acc, a + k0, lda, ws + wn0 * LDW, LDW);\n",
           ("tsan",), "smem_by_weight_mma: no barrier between the MMAs on a weight stage and the next stage's store", core=False),
    Mutant("bound-off-by-one", "kernels/common.cuh",
           "      return (n < N && k < K) ? w[n * swn + k * swk] : zero;\n",
           "      return (n < N && k <= K) ? w[n * swn + k * swk] : zero;\n",
           ("asan",), "smem_by_weight_mma: the weight load reads column k = K (one past the last)", core=False),
    Mutant("missing-barrier-fwd", "kernels/adapter_fwd.cuh",
           "          warp_tile_mma<Op, L::MT, L::NT>(acc, a, ldx, Ws + wn0 * LDW, LDW);\n          __syncthreads();\n",
           "          warp_tile_mma<Op, L::MT, L::NT>(acc, a, ldx, Ws + wn0 * LDW, LDW);\n",
           ("tsan",), "forward phase 1: no barrier between the k-stage's MMAs and the next stage's stores"),
    Mutant("missing-barrier-partial", "kernels/adapter_fwd.cuh",
           "      warp_tile_mma<Op, L::MT, L::NT>(acc, Xs + wm0 * LD, LD, Ws + wn0 * LD, LD);\n      __syncthreads();\n",
           "      warp_tile_mma<Op, L::MT, L::NT>(acc, Xs + wm0 * LD, LD, Ws + wn0 * LD, LD);\n",
           ("tsan",), "decode down-projection: no barrier between a k-stage's MMAs and the next stage's stores", core=False),
    Mutant("decode-drops-a-split", "kernels/adapter_fwd.cuh",
           "for (int sp = 0; sp < p.ksplit; ++sp)",
           "for (int sp = 1; sp < p.ksplit; ++sp)",
           ("asan",), "the decode path's sum of the d-split partials leaves out the first split", core=False),
    Mutant("decode-chunk-overlap", "kernels/adapter_fwd.cuh",
           "  const int k_end = min(p.d, k_begin + p.k_chunk);",
           "  const int k_end = min(p.d, k_begin + p.k_chunk + kBK);",
           ("asan",), "the decode path's d-splits overlap by one k-stage (counted twice)", core=False),
    Mutant("token-bound-off-by-one", "kernels/adapter_fwd.cuh",
           "    return (t < p.T && col < p.d) ? x[t * p.sx0 + col * p.sx1] : zero;\n",
           "    return (t <= p.T && col < p.d) ? x[t * p.sx0 + col * p.sx1] : zero;\n",
           ("asan",), "the forward's x load reads token t = T (one past the last)"),
    Mutant("vec-wait-one-stage-late", "kernels/adapter_fwd.cuh",
           "          cp_async_wait<kStages - 2>();\n          __syncthreads();                      // stage k0",
           "          cp_async_wait<kStages - 1>();\n          __syncthreads();                      // stage k0",
           ("asan",), "vectorised phase 1: the MMAs read a k-stage whose cp.async group has not been waited for", cases="vec-"),
    Mutant("vec-ldsm-row-order", "kernels/common.cuh",
           "ldsm_x4(f.r, a + (lane & 7) * ld + ((lane >> 3) & 1) * 8 * ld + (lane >> 4) * 8);",
           "ldsm_x4(f.r, a + (lane & 7) * ld + ((lane >> 3) & 1) * 8 + (lane >> 4) * 8 * ld);",
           ("asan",), "ldmatrix A fragment: matrices 1 and 2 (rows 8-15 / columns 8-15) exchanged", cases="vec-", core=False),
    Mutant("vec-missing-barrier-ys", "kernels/adapter_fwd.cuh",
           "      });\n      __syncthreads();\n      // y = res + Ys",
           "      });\n      // y = res + Ys",
           ("tsan",), "vectorised epilogue: the copy-out reads Ys without a barrier after the fragment stores", core=False, cases="vec-"),
    Mutant("vec-token-bound-off-by-one", "kernels/adapter_fwd.cuh",
           "copy_chunk_async(dst, x + t * p.sx0 + j, t < p.T ? p.d - j : 0, x);",
           "copy_chunk_async(dst, x + t * p.sx0 + j, t <= p.T ? p.d - j : 0, x);",
           ("asan",), "vectorised x copies read token t = T (one past the last)", core=False, cases="vec-"),
    Mutant("vec-residual-ring-slot", "kernels/adapter_fwd.cuh",
           "          S* rs = Rs + (q / ksteps % kStages) * BT * LDR;",
           "          S* rs = Rs + ((q / ksteps + 1) % kStages) * BT * LDR;",
           ("asan",), "vectorised epilogue: a tile's residual lands in the ring slot of the next tile", core=False, cases="vec-"),
    Mutant("cluster-missing-sync", "kernels/adapter_fwd.cuh",
           "    cluster_sync();\n    for (int idx = threadIdx.x; idx < BT * rpad; idx += kThreads) {",
           "    for (int idx = threadIdx.x; idx < BT * rpad; idx += kThreads) {",
           ("tsan",), "cluster kernel: the partials of the other blocks read over DSMEM before the cluster barrier", cases="cluster"),
    Mutant("cluster-own-partials", "kernels/adapter_fwd.cuh",
           "v += map_shared_rank(Ps, c)[row * ldp + i];",
           "v += Ps[row * ldp + i];",
           ("asan",), "cluster kernel: each block sums its own partial gridDim.y times instead of the cluster's", core=False, cases="cluster"),
    Mutant("bvec-missing-zs-barrier", "kernels/adapter_bwd_vec.cuh",
           "          Zs[row * LDW + c] = from_f<S>(to_f(a[row * lda + c]) * sc);\n        __syncthreads();\n",
           "          Zs[row * LDW + c] = from_f<S>(to_f(a[row * lda + c]) * sc);\n",
           ("tsan",), "vectorised backward: the MMAs read a k-stage of dz before every warp has converted it", core=False,
           cases="bvec-"),
    Mutant("bvec-cluster-own-partials", "kernels/adapter_bwd_vec.cuh",
           "v += map_shared_rank(Ps, cb)[row * ldp + i];",
           "v += Ps[row * ldp + i];",
           ("asan",), "backward cluster kernel: each block sums its own partial dH instead of the cluster's", core=False,
           cases="bvec-cluster"),
    Mutant("bvec-dy-ring-slot", "kernels/adapter_bwd_vec.cuh",
           "S* rs = Rs + (m % kStages) * BT * LDR;",
           "S* rs = Rs + ((m + 1) % kStages) * BT * LDR;",
           ("asan",), "vectorised backward, dy unstaged: a tile's dy lands in the ring slot of the next tile", core=False,
           cases="bvec-unstaged"),
    Mutant("bvec-wgrad-convert-barrier", "kernels/adapter_bwd_vec.cuh",
           "      });\n      __syncthreads();\n    }\n    if (p.need_w) warp_tile_mma_kmajor",
           "      });\n    }\n    if (p.need_w) warp_tile_mma_kmajor",
           ("tsan",), "vectorised weight gradients: the MMAs read a stage before every warp has applied dz / act to it",
           core=False, cases="vec-"),
    Mutant("ldsm-trans-matrix-order", "kernels/common.cuh",
           "ldsm_x4_t(f.r, a + ((lane & 7) + (lane >> 4) * 8) * ld + ((lane >> 3) & 1) * 8);",
           "ldsm_x4_t(f.r, a + ((lane & 7) + ((lane >> 3) & 1) * 8) * ld + (lane >> 4) * 8);",
           ("asan",), "ldmatrix .trans A fragment: matrices 1 and 2 (m 8-15 / k 8-15) exchanged", core=False),
    Mutant("divergent-barrier", "kernels/adapter_bwd.cuh",
           "      if (lane < 4) {\n#pragma unroll\n",
           "      if (lane < 4) {\n        __syncthreads();\n#pragma unroll\n",
           ("asan",), "a __syncthreads reached by 4 lanes of each warp (a hang on the GPU): must abort, not hang"),
    Mutant("no-b_up", "kernels/adapter_fwd.cuh",
           "        bcol[nt][h] = (j < j_end && bu != nullptr) ? to_f(bu[j * p.sbu]) : 0.0f;\n",
           "        bcol[nt][h] = 0.0f;\n",
           ("asan",), "the forward epilogue drops b_up"),
)

# The suite's set (tests/test_csrc_emulation.py with ADAPTERKERN_EMU_MUTANTS=1): one planted bug per way the
# emulation catches one, each rebuilding a single kernel translation unit: a wrong number (no-b_up), an
# out-of-bounds read under ASan (token-bound-off-by-one), a race under TSan (missing-barrier-fwd), a barrier
# not every thread reaches (divergent-barrier), shared memory read before its cp.async wait
# (vec-wait-one-stage-late), a missing cluster barrier (cluster-missing-sync). The fragment and ldmatrix
# layouts of common.cuh have their selftests besides (selftest.cpp, float64 tiles).
CORE = tuple(m for m in MUTANTS if m.core)

VARIANT_ARGS = {"asan": ["--fail-fast"], "tsan": ["--subset=tsan", "--fail-fast"]}  # one failure is the verdict
_REPORT = re.compile(r"^(emu: FATAL.*|.*ERROR: AddressSanitizer.*|.*runtime error.*|WARNING: ThreadSanitizer.*)$", re.M)


@dataclasses.dataclass
class Result:
    mutant: str
    variant: str
    caught: bool
    line: str  # the first failing case, and the first sanitizer / emulator report if there is one
    seconds: float


# The build each kind of check uses: ASan without UBSan for the asan checks (build.py: half the compile time;
# a bug it catches, the suite's ASan + UBSan build catches too), ThreadSanitizer for the tsan ones.
BUILD_VARIANT = {"asan": "asan-only", "tsan": "tsan"}


def run_variant(csrc: Path, variant: str, out: Path, cases: str = "") -> tuple[int, str, float]:
    start = time.monotonic()
    exe = build.build(BUILD_VARIANT[variant], csrc, out)
    proc = build.run(exe, VARIANT_ARGS[variant] + ([f"--filter={cases}"] if cases else []))
    fail = next((ln for ln in proc.stdout.splitlines() if ln.startswith("FAIL ")), "")
    report = _REPORT.search(proc.stderr)
    line = " / ".join(x for x in (fail, report.group(1).strip() if report else "") if x) or "passes"
    return proc.returncode, line, time.monotonic() - start


def check(mutants: tuple[Mutant, ...], out: Path = build.DEFAULT_OUT, baseline: bool = True) -> list[Result]:
    """Runs the baseline (must pass) and every mutant (must fail in its variants)."""
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="adapterkern-mutants-") as tmp:
        if baseline:
            for variant in ("asan", "tsan"):
                rc, line, secs = run_variant(build.ROOT / "csrc", variant, out)
                results.append(Result("(none)", variant, rc != 0, line, secs))
        for m in mutants:
            csrc = Path(tmp) / m.name / "csrc"
            shutil.copytree(build.ROOT / "csrc", csrc)
            target = csrc / m.file
            text = target.read_text()
            if text.count(m.old) != 1:
                raise RuntimeError(f"mutant {m.name}: the text to replace occurs {text.count(m.old)} times in {m.file}")
            target.write_text(text.replace(m.old, m.new))
            for variant in m.variants:
                rc, line, secs = run_variant(csrc, variant, out, m.cases)
                results.append(Result(m.name, variant, rc != 0, line, secs))
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", help="mutant name (repeatable); default: all")
    ap.add_argument("--all-variants", action="store_true", help="run every mutant in both variants (report only)")
    ns = ap.parse_args()
    chosen = tuple(m for m in MUTANTS if not ns.only or m.name in ns.only)
    if ns.all_variants:
        chosen = tuple(dataclasses.replace(m, variants=("asan", "tsan")) for m in chosen)
    required = {m.name: m.variants for m in MUTANTS}
    ok = True
    for r in check(chosen):
        if r.mutant == "(none)":
            verdict, good = ("FAILS (baseline)", False) if r.caught else ("passes", True)
        else:
            verdict, good = ("caught", True) if r.caught else ("NOT caught", r.variant not in required[r.mutant])
        ok = ok and good
        print(f"{r.mutant:22} {r.variant:5} {verdict:10} {r.seconds:6.1f} s  {r.line}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
