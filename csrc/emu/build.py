"""Build (and run) the host-emulated kernel test ``csrc/emu/test_kernels`` (csrc/README.md, "Host emulation").

The real csrc/ launchers and kernels are compiled with g++ (C++20) against the stand-in CUDA headers in
csrc/emu/include, with -DADAPTERKERN_HOST_EMULATION, in one of two sanitizer variants:

* ``asan``: AddressSanitizer + UndefinedBehaviorSanitizer, no recovery (every case);
* ``tsan``: ThreadSanitizer (run with ``--subset=tsan``, the race-prone cases);
* ``asan-only``: AddressSanitizer without UBSan, for the planted-bug builds of mutants.py.

Objects are cached by content (the compiler, the flags and every file the translation unit includes,
as listed by ``g++ -MM``), so a rebuild after editing one kernel header recompiles only what includes
it; translation units compile in parallel. Outputs go under ``build/emu/`` (git-ignored).

    python3 csrc/emu/build.py --variant asan --run            # build + run every case
    python3 csrc/emu/build.py --variant tsan --run --subset=tsan
    python3 csrc/emu/build.py --csrc /tmp/mutated/csrc ...     # build another copy of csrc/
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "build" / "emu"
SOURCES = ("adapter_fwd.cu", "adapter_bwd.cu",  # the launchers and, through them, every kernel
           "emu/emu.cpp", "emu/reference.cpp", "emu/selftest.cpp", "emu/test_kernels.cpp")
COMMON_FLAGS = ("-std=c++20", "-g1", "-DADAPTERKERN_HOST_EMULATION", "-fno-strict-aliasing", "-pthread",
                "-Wall", "-Wextra", "-Wno-unknown-pragmas")
# -O0: the ASan + UBSan build compiles in less than half the time of -O1 (UBSan's checks through the
# kernels' templates dominate) and runs about 1.5x slower; with the planted-bug builds of mutants.py,
# compiling is most of the cost. The sanitizers see the same errors at either level.
VARIANT_FLAGS = {
    "asan": ("-O0", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"),
    "tsan": ("-O0", "-fsanitize=thread"),
    # AddressSanitizer alone: the planted bugs' asan builds (mutants.py). None of them needs UBSan to be
    # caught, and without it a kernel translation unit compiles in half the time; whatever this build
    # catches, the asan build (a superset of its checks) catches too.
    "asan-only": ("-O0", "-fsanitize=address", "-fno-omit-frame-pointer"),
}
# The emulator's own sources (emu/: the runtime, the float64 reference, the driver) at -O1 instead: they
# are small and cheap to optimise, and the run spends half its time in them (warp collectives, barriers,
# the reference's loops) at -O0.
RUNTIME_OPT = "-O1"
# Sanitizer settings for the runs: stop at the first report, with a nonzero exit status.
RUN_ENV = {
    "ASAN_OPTIONS": "abort_on_error=0:detect_leaks=1:halt_on_error=1",
    "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:second_deadlock_stack=1",
}


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++")


def _options(variant: str, rel: str) -> list[str]:
    """The compile options of source ``rel`` (relative to csrc/) in ``variant``, include paths aside."""
    options = [*COMMON_FLAGS, *VARIANT_FLAGS[variant]]
    return [RUNTIME_OPT if f == "-O0" else f for f in options] if rel.startswith("emu/") else options


def _flags(csrc: Path, variant: str, rel: str) -> list[str]:
    return [*_options(variant, rel), f"-I{csrc / 'emu' / 'include'}", f"-I{csrc}", f"-I{csrc / 'emu'}"]


def _lang(src: Path) -> list[str]:
    return ["-x", "c++"] if src.suffix == ".cu" else []


def _object_key(cxx: str, version: str, variant: str, csrc: Path, rel: str) -> str:
    """Hash of the compiler, the options and the content (not the path: copies of csrc/ share objects)
    of every file source ``rel`` includes."""
    src = csrc / rel
    deps = subprocess.run([cxx, *_flags(csrc, variant, rel), "-MM", *_lang(src), str(src)],
                          capture_output=True, text=True, check=True).stdout
    files = deps.replace("\\\n", " ").split(":", 1)[1].split()
    h = hashlib.sha256(version.encode())
    for part in (*_options(variant, rel), src.name):
        h.update(part.encode() + b"\0")
    for f in files:
        h.update(Path(f).read_bytes() + b"\0")
    return h.hexdigest()[:24]


def _prune(out: Path, used: list[Path], max_age_days: float = 7.0) -> None:
    """Marks ``used`` as fresh and deletes cached objects and programs unused for ``max_age_days``."""
    now = time.time()
    for p in used:
        os.utime(p, (now, now))
    for p in [*out.glob("obj/*.o"), *out.glob("test_kernels-*")]:
        try:
            if now - p.stat().st_mtime > max_age_days * 86400:
                p.unlink()
        except FileNotFoundError:  # a concurrent build pruned it
            pass


def build(variant: str, csrc: Path = ROOT / "csrc", out: Path = DEFAULT_OUT, jobs: int | None = None) -> Path:
    """Compiles (what is not cached) and links the test program; returns its path."""
    cxx = compiler()
    if cxx is None:
        raise FileNotFoundError("g++ not found (set CXX)")
    csrc = csrc.resolve()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    objdir = out / "obj"
    objdir.mkdir(parents=True, exist_ok=True)

    def compile_one(rel: str) -> Path:
        src = csrc / rel
        obj = objdir / f"{Path(rel).stem}-{variant}-{_object_key(cxx, version, variant, csrc, rel)}.o"
        if not obj.exists():
            tmp = obj.with_suffix(f".{os.getpid()}.tmp")
            proc = subprocess.run([cxx, *_flags(csrc, variant, rel), "-c", *_lang(src), str(src), "-o", str(tmp)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {src} failed:\n{proc.stderr}")
            tmp.replace(obj)
        return obj

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        objects = list(pool.map(compile_one, SOURCES))
    link_key = hashlib.sha256("".join(o.name for o in objects).encode()).hexdigest()[:16]
    exe = out / f"test_kernels-{variant}-{link_key}"
    if not exe.exists():
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        proc = subprocess.run([cxx, *VARIANT_FLAGS[variant], "-pthread", *map(str, objects), "-o", str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"linking failed:\n{proc.stderr}")
        tmp.replace(exe)
    _prune(out, [*objects, exe])
    return exe


def run(exe: Path, args: list[str], timeout: float | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(exe), *args], env={**os.environ, **RUN_ENV}, capture_output=True, text=True,
                          timeout=timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=sorted(VARIANT_FLAGS), default="asan")
    ap.add_argument("--csrc", type=Path, default=ROOT / "csrc",
                    help="the csrc/ tree to build (default: this checkout's)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--run", action="store_true", help="run the program after building it (other arguments go to it)")
    ns, program_args = ap.parse_known_args()
    exe = build(ns.variant, ns.csrc, ns.out)
    print(f"built {exe}", file=sys.stderr)
    if not ns.run:
        return 0
    proc = subprocess.run([str(exe), *program_args], env={**os.environ, **RUN_ENV})
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
