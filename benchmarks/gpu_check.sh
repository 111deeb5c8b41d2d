#!/usr/bin/env bash
# One prepared GPU session (at most about 8 minutes; the device is lent rarely and briefly):
#   1. pip install -e . --no-deps --no-build-isolation   (the GPU image has torch/triton, no internet)
#   2. the test suite (pytest tests, in parallel with pytest-xdist when installed) under a time limit;
#      compute-sanitizer memcheck on a short forward + backward of the CUDA and Triton backends
#      (benchmarks/sanitize_check.py) if it exists
#   3. the benchmark grid in bf16 (python -m adapterkern.bench --full), in three stages:
#        A  every point of the issue's grid: eager, adapters (if installed), every adapterkern
#           backend, and their CUDA-graph variants at T <= 64   (target points first)
#        B  torch.compile (default mode) on a subgrid, beside eager and adapterkern
#        C  torch.compile max-autotune at the target shape d=4096, r=64, T=64 and 16384
#   4. the transformer-layer benchmark (BERT-base and Llama-7B-sized layers), then, if time is left,
#      the many-adapter benchmark (multi), AdapterDrop's multi-task benchmark and the trade-off report
# Everything goes to benchmarks/results/<date>-<device>/ (logs, CSVs, PNGs, environment) and is
# copied to $OUT when that is set. Every stage has a hard time limit; the grid appends each point to
# its CSV as soon as it is measured, so a stage cut short keeps what it finished. The script never
# fails on a benchmark: its exit status is the test suite's.
#
# Budgets (seconds) can be overridden from the environment: GPU_CHECK_TESTS_S, GPU_CHECK_GRID_S,
# GPU_CHECK_COMPILE_S, GPU_CHECK_AUTOTUNE_S, GPU_CHECK_LAYER_S, GPU_CHECK_TOTAL_S.
# GPU_CHECK_NO_CUDA_BUILD=1 skips the install (and so the CUDA extension build).
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
PY=${PYTHON:-python}
TESTS_S=${GPU_CHECK_TESTS_S:-170}
GRID_S=${GPU_CHECK_GRID_S:-120}
COMPILE_S=${GPU_CHECK_COMPILE_S:-75}
AUTOTUNE_S=${GPU_CHECK_AUTOTUNE_S:-60}
LAYER_S=${GPU_CHECK_LAYER_S:-60}
TOTAL_S=${GPU_CHECK_TOTAL_S:-460}

elapsed() { echo $(( $(date +%s) - START )); }
# budget N: N, or what is left of TOTAL_S if that is less (at least 10)
budget() { local left=$(( TOTAL_S - $(elapsed) )); local b=$1; (( left < b )) && b=$left; (( b < 10 )) && b=10; echo "$b"; }
stage() { echo; echo "=== [$(elapsed)s] $*"; }

SLUG=$($PY - <<'PYEOF' 2>/dev/null || echo unknown-device
import torch
if torch.cuda.is_available():
    n = torch.cuda.get_device_name(0).lower()
    print("".join(c if c.isalnum() else "-" for c in n).strip("-"))
else:
    print("cpu")
PYEOF
)
RES="benchmarks/results/$(date -u +%Y%m%d-%H%M%S)-${SLUG}"
mkdir -p "$RES"
echo "gpu_check: results in $RES"

copy_out() {
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/results" && cp -r "$RES"/. "$OUT/results/" 2>/dev/null; fi
}
trap copy_out EXIT

stage "environment"
{
    date -u; uname -a; nvidia-smi 2>&1 | head -20
    $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
    $PY -c "import triton; print('triton', triton.__version__)" 2>&1
    for m in transformers adapters matplotlib tqdm pytest; do $PY -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>&1 | tail -1; done
    git rev-parse HEAD 2>&1; git status --short 2>&1 | head -20
} > "$RES/env.txt" 2>&1
cat "$RES/env.txt"

stage "install"
# setup.py builds the CUDA extension (adapterkern._C) itself when torch has CUDA and nvcc is found:
# build only for this GPU's architecture, with every core, under a time limit. If that fails or runs
# out of time, the package is still importable from the repository root (python -m runs from here),
# and ADAPTERKERN_NO_JIT=1 keeps later stages from starting a JIT build: the cuda backend is then
# reported unavailable and the triton and torch backends are measured.
ARCH=$($PY -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}{n}')" 2>/dev/null || echo 90)
if [ "${GPU_CHECK_NO_CUDA_BUILD:-0}" = "1" ]; then
    echo "GPU_CHECK_NO_CUDA_BUILD=1: no install, no CUDA build"; export ADAPTERKERN_NO_JIT=1
else
    ADAPTERKERN_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" timeout -k 5 "$(budget 200)" \
        $PY -m pip install -e . --no-deps --no-build-isolation > "$RES/install.log" 2>&1
    INSTALL_RC=$?
    echo "install rc=$INSTALL_RC (sm_$ARCH)"; grep -i "adapterkern setup" "$RES/install.log" | tail -3; tail -3 "$RES/install.log"
    if [ $INSTALL_RC -ne 0 ]; then
        echo "install failed or timed out: running from the source tree, ADAPTERKERN_NO_JIT=1"; export ADAPTERKERN_NO_JIT=1
    fi
fi
$PY -c "import adapterkern, torch; print('adapterkern', adapterkern.__version__, 'from', adapterkern.__file__); \
print('backends on cuda:', adapterkern.available_backends('cuda'))" 2>&1 | tee -a "$RES/env.txt"

# Two Triton configs per kernel in the tests (ADAPTERKERN_TRITON_CONFIGS=few): the full autotuning sweep
# would compile and time 48 configs for every new shape key of the suite; the benchmarks below tune fully.
# Even so the suite launches ~350 distinct kernel specialisations (counted under the interpreter,
# 2026-11-29), each a compile of ~0.3-1 s (Triton 3.6, sm_90, measured on this project's 2-core CPU):
# several minutes in one process, so the tests run in parallel with pytest-xdist (on the GPU image)
# when it is importable. --maxfail instead of -x: a rare GPU run should show every failure it can.
XDIST=()
if $PY -c "import xdist" 2>/dev/null; then
    WORKERS=$(nproc); (( WORKERS > 12 )) && WORKERS=12; XDIST=(-n "$WORKERS")
fi
stage "tests (limit $(budget "$TESTS_S")s; ${XDIST[*]:-serial})"
ADAPTERKERN_TRITON_CONFIGS=few timeout -k 10 "$(budget "$TESTS_S")" $PY -m pytest tests "${XDIST[@]}" --maxfail=25 -q \
    -p no:cacheprovider > "$RES/tests.log" 2>&1
TESTS_RC=$?
echo "tests rc=$TESTS_RC (124 = time limit reached)"; tail -15 "$RES/tests.log"

# compute-sanitizer memcheck on a short forward + backward of the CUDA (and Triton) backend.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ -n "$SANITIZER" ]; then
    stage "compute-sanitizer memcheck (limit $(budget 90)s)"
    timeout -k 10 "$(budget 90)" "$SANITIZER" --tool memcheck --error-exitcode 99 $PY benchmarks/sanitize_check.py \
        > "$RES/memcheck.log" 2>&1
    echo "memcheck rc=$? (0: clean; 99: memcheck found errors; 124: time limit)"; tail -n 25 "$RES/memcheck.log"
else
    stage "compute-sanitizer not found: memcheck skipped"
fi

# run_grid NAME LIMIT ARGS...: the grid CLI with a soft --time-limit (no new point after it) inside a
# hard timeout; the table is reprinted from the CSV if the process was cut short.
run_grid() {
    local name=$1 limit; limit=$(budget "$2"); shift 2
    stage "grid $name (limit ${limit}s)"
    timeout -k 10 "$((limit + 20))" $PY -m adapterkern.bench --full --dtype bfloat16 --no-progress \
        --warmup-ms 10 --rep-ms 50 --copy-mib 1024 --time-limit "$limit" \
        --csv "$RES/grid-$name.csv" "$@" > "$RES/grid-$name.log" 2>&1
    local rc=$?
    echo "grid $name rc=$rc"
    if [ $rc -ne 0 ] && [ -s "$RES/grid-$name.csv" ]; then
        $PY -m adapterkern.bench table "$RES/grid-$name.csv" > "$RES/grid-$name.table.txt" 2>&1
        $PY -m adapterkern.bench plot "$RES/grid-$name.csv" >> "$RES/grid-$name.log" 2>&1
        cat "$RES/grid-$name.table.txt"
    else
        grep -v '^\[bench\] ' "$RES/grid-$name.log" | tail -n 200
    fi
}

run_grid main "$GRID_S" --impl 'eager,adapters,adapterkern-*'
run_grid compile "$COMPILE_S" --tokens 1,64,4096,16384 --hidden 768,4096 --bottleneck 64 \
    --impl 'compile,adapterkern-*'
run_grid autotune "$AUTOTUNE_S" --tokens 16384,64 --hidden 4096 --bottleneck 64 --mode fwd,fwd_bwd \
    --impl 'compile,compile-max-autotune,adapterkern-*' --no-cuda-graph

stage "layer benchmark (limit $(budget "$LAYER_S")s)"
timeout -k 10 "$(budget "$LAYER_S")" $PY -m adapterkern.bench layer --csv "$RES/layer.csv" > "$RES/layer.log" 2>&1
echo "layer rc=$?"; tail -n 40 "$RES/layer.log"

# Many adapters at once (issue: multi-adapter) and AdapterDrop's multi-task speed-up, if time is left.
for sub in multi adapterdrop; do
    if (( TOTAL_S - $(elapsed) > 100 )); then
        stage "$sub benchmark (limit $(budget 40)s)"
        timeout -k 10 "$(budget 40)" $PY -m adapterkern.bench $sub --csv "$RES/$sub.csv" > "$RES/$sub.log" 2>&1
        echo "$sub rc=$?"; tail -n 12 "$RES/$sub.log"
    else
        stage "$sub skipped: $(( TOTAL_S - $(elapsed) ))s left of ${TOTAL_S}s"
    fi
done

if (( TOTAL_S - $(elapsed) > 70 )); then
    stage "trade-offs (limit $(budget 60)s)"
    timeout -k 10 "$(budget 60)" $PY -m adapterkern.bench tradeoffs --csv "$RES/tradeoffs.csv" \
        > "$RES/tradeoffs.log" 2>&1
    echo "tradeoffs rc=$?"; tail -n 15 "$RES/tradeoffs.log"
else
    stage "trade-offs skipped: $(( TOTAL_S - $(elapsed) ))s left of ${TOTAL_S}s"
fi

stage "done in $(elapsed)s; results in $RES"
ls -la "$RES"
exit "$TESTS_RC"
