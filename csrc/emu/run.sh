#!/usr/bin/env bash
# Host emulation of the CUDA kernels (csrc/README.md, "Host emulation"): builds csrc/emu/test_kernels
# with ASan + UBSan and runs every case, then with ThreadSanitizer and runs the race-prone subset.
# Arguments go to both runs (e.g. --case=NAME, --seed=N). MUTANTS=1 also checks the planted bugs
# (csrc/emu/mutants.py; minutes). Needs g++ only; objects are cached under build/emu/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${PYTHON:-python3}"
"$PY" csrc/emu/build.py --variant asan --run "$@"
"$PY" csrc/emu/build.py --variant tsan --run --subset=tsan "$@"
if [[ "${MUTANTS:-0}" == 1 ]]; then "$PY" csrc/emu/mutants.py; fi
