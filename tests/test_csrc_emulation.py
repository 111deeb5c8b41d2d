"""The CUDA C++ kernels of csrc/ checked for numbers on the CPU (csrc/README.md, "Host emulation").

csrc/emu/build.py compiles the real launchers and kernels with g++ against host stand-ins of the
CUDA headers, and the driver csrc/emu/test_kernels.cpp compares the forward and every gradient with
an independent float64 reference over a case table (dtypes, tile sizes, r chunks, column splits,
strides, needs; see the driver). Two builds, one test each (pytest-xdist runs them in parallel):

* AddressSanitizer + UndefinedBehaviorSanitizer, every case;
* ThreadSanitizer, the race-prone subset (every barrier, shuffle and mma path).

The planted-bug checks (csrc/emu/mutants.py: each must fail) run with ADAPTERKERN_EMU_MUTANTS=1, which
`make test` (CI) sets (select them with ``-k planted_bug``): its CORE set, one bug per way the emulation
catches one (about a CPU minute cold); ADAPTERKERN_EMU_MUTANTS=all adds the other sixteen (a swapped fragment
layout, ldmatrix rows exchanged, off-by-one bounds, the decode path's splits, ...), as does
``python csrc/emu/mutants.py``. Objects are cached under build/emu/. Skipped only when g++ is not installed.
"""
from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

import pytest

EMU = Path(__file__).resolve().parents[1] / "csrc" / "emu"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


emu_mutants = _load("adapterkern_emu_mutants", EMU / "mutants.py")
emu_build = emu_mutants.build  # csrc/emu/build.py, as mutants.py loads it

pytestmark = pytest.mark.skipif(emu_build.compiler() is None, reason="g++ not found: host emulation of csrc/ not built")


def _run_all(variant: str, args: list[str]) -> str:
    exe = emu_build.build(variant)
    listed = emu_build.run(exe, ["--list", *args])
    assert listed.returncode == 0, listed.stdout + listed.stderr
    cases = [line for line in listed.stdout.splitlines() if line.strip()]
    proc = emu_build.run(exe, args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-30000:]
    passed = [line for line in proc.stdout.splitlines() if line.startswith("PASS ") and "selftest" not in line]
    assert len(passed) == len(cases) > 0, out[-30000:]
    assert re.search(r"^\d+ passed, 0 failed$", proc.stdout, re.M), out[-30000:]
    return out


def test_kernels_match_float64_reference_under_asan_ubsan():
    out = _run_all("asan", [])
    assert "selftest MmaTF32 tile" in out and "no-smem-f32" in out


def test_race_prone_cases_under_tsan():
    out = _run_all("tsan", ["--subset=tsan"])
    assert "[tsan]" in out


_MUTANTS_ENV = os.environ.get("ADAPTERKERN_EMU_MUTANTS", "")


@pytest.mark.skipif(_MUTANTS_ENV not in ("1", "all"),
                    reason="planted-bug checks (CPU minutes) run with ADAPTERKERN_EMU_MUTANTS=1, as make test does")
@pytest.mark.parametrize("mutant", emu_mutants.MUTANTS if _MUTANTS_ENV == "all" else emu_mutants.CORE,
                         ids=lambda m: m.name)
def test_planted_bug_is_caught(mutant):
    for result in emu_mutants.check((mutant,), baseline=False):
        assert result.caught, f"{mutant.name} ({mutant.why}) survives the {result.variant} build: {result.line}"
