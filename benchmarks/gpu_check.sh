#!/usr/bin/env bash
# The one prepared GPU session: build, smoke-check, benchmark, test and sanitize, within one command
# of at most 540 s on the lent GPU machine, losing nothing that finished when time runs out.
#
#   bash benchmarks/gpu_check.sh [COMMIT_FILE]        (or GPU_CHECK_COMMIT_FILE=COMMIT_FILE)
#
# COMMIT_FILE: `git rev-parse HEAD` then `git status --short`, written on the dev machine (the GPU
# machine gets the tree without .git); recorded in the results and in every CSV row
# (ADAPTERKERN_GIT_COMMIT); "unknown commit" when it is absent.
#
# Results: benchmarks/results/<UTC stamp>-<device>/ (env, install log, smoke logs, bench CSVs and
# logs, test log, sanitizer logs, autotune.txt with every chosen Triton config, stages.tsv, the
# timeline). At every stage boundary, when $OUT is set, $OUT/results.tgz (that folder) and
# $OUT/summary.txt (commit, device, each stage's status and time or why it was skipped, smoke
# verdicts, the headline bench rows, test counts, sanitizer verdicts) are re-made, each written
# beside and then renamed, so a later failure or kill still leaves the earlier stages' results.
# $OUT never holds more than four files.
#
# Deadline. Everything must end by START + GPU_CHECK_TOTAL_S (default 510 s: under the device call's
# 540 s limit). A stage starts only if its minimum useful time plus the kill grace fits before the
# deadline less a reserve for the final packaging; it then runs under `timeout -s INT -k GRACE` with
# min(planned, time left - reserve - grace), so SIGINT lets pytest print its summary and the
# benchmarks keep every point already appended to their CSV. A stage that does not fit is skipped
# and listed with the reason. Stages, in order of value (planned / minimum seconds on the GPU):
#   env 20/5; install 110/30 (pip install -e ., which builds adapterkern._C for this GPU's arch; if
#     that fails or runs out of time: ADAPTERKERN_NO_JIT=1, the cuda backend off)
#   smoke-triton 60/20, smoke-cuda 40/15: benchmarks/smoke_check.py, one process per backend (a CUDA
#     fault is sticky); a backend that fails in bf16, faults or runs out of time is dropped from
#     every later stage (benchmarks, sanitizer, and the tests via -k / ADAPTERKERN_BACKEND)
#   bench-priority 170/40: T=16384,64,1,8 d=4096 r=64, fwd and fwd_bwd: eager, adapters, every kernel
#     backend with its old and new kernels (-nodecode, -rowtile, -scalar, -nocluster), and their CUDA graphs; bench-compile 70/30: torch.compile at the same points (its cold
#     compiles, ~5-15 s a point, kept out of the way of the kernels' numbers)
#   tests 150/45: the suite without the CPU-only checks CI runs (Triton/nvcc compiles, the kernels'
#     host emulation, this script's dry run), two Triton configs per kernel
#   memcheck 60/25, racecheck 25/10: compute-sanitizer ("unavailable" on gVisor machines)
#   layer 45/20, inference 60/25 (whole models: the fused-op hook against optimize_for_inference,
#     generation tokens/s), bench-grid 90/30, multi 30/15, adapterdrop 30/15, bench-max-autotune 70/40,
#     tradeoffs 45/25
# Triton's autotuning results are shared by every stage (TRITON_CACHE_AUTOTUNING=1, one
# TRITON_CACHE_DIR for the run): each shape key is tuned once, not once per process.
#
# Exit status: the test stage's when it failed (pytest's code; 124: its time limit); else 3 when a
# smoke check failed; else 4 when the test stage did not run; else 0. Never a benchmark's.
#
# GPU_CHECK_DRY=1: the same control flow on a CPU machine in about a minute (tiny shapes, Triton's
# interpreter, a tiny test selection, results in a temp dir, nothing written in the repository):
# tests/test_benchmarks_gpu_check.py runs it. GPU_CHECK_SANITIZER names the compute-sanitizer to use;
# GPU_CHECK_RESULTS_DIR the folder the results folder is made in. PYTHON: the interpreter of every
# stage (default python3, the GPU image's; on the dev machine, .venv/bin/python).
set -u

# stage_grant PLANNED MIN LEFT GRACE: seconds to give a stage that has LEFT seconds before the
# deadline's reserve and may need GRACE more to die after its limit; 0 when MIN does not fit.
stage_grant() {
    local planned=$1 min=$2 left=$3 grace=$4 room
    room=$((left - grace))
    if ((room < min)); then echo 0; elif ((planned < room)); then echo "$planned"; else echo "$room"; fi
}

# pytest_exclusions BACKEND...: a -k expression deselecting the tests parametrized by these backends
# (ids such as test_x[cuda], test_x[float32-cuda-8], test_x[cuda-relu]); empty for none.
pytest_exclusions() {
    local expr="" b
    for b in "$@"; do
        expr+="${expr:+ and }not [$b] and not [$b- and not -$b- and not -$b]"
    done
    echo "$expr"
}

# GPU_CHECK_FUNCTIONS_ONLY=1: sourced for the functions above only (tests/test_benchmarks_gpu_check.py).
# shellcheck disable=SC2317
if [ "${GPU_CHECK_FUNCTIONS_ONLY:-0}" = 1 ]; then return 0 2>/dev/null || exit 0; fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1
START=$(date +%s)
DRY=${GPU_CHECK_DRY:-0}
PY=${PYTHON:-python3}
COMMIT_FILE=${1:-${GPU_CHECK_COMMIT_FILE:-}}
OUT=${OUT:-}

declare -A PLANNED MINIMUM
plan() { PLANNED[$1]=$2; MINIMUM[$1]=$3; }
if [ "$DRY" = 1 ]; then
    TOTAL=${GPU_CHECK_TOTAL_S:-80}; RESERVE=4; GRACE=2; SOFT_MARGIN=1
    plan env 15 2; plan smoke-triton 30 5; plan smoke-cuda 15 3; plan bench-priority 25 5; plan tests 25 5
    plan memcheck 10 2; plan racecheck 10 2; plan bench-grid 3 2; plan multi 15 3
    plan tradeoffs 20 999  # more than the whole dry budget: the skipped-for-time path
else
    TOTAL=${GPU_CHECK_TOTAL_S:-510}; RESERVE=15; GRACE=10; SOFT_MARGIN=25
    plan env 20 5; plan install 110 30; plan smoke-triton 60 20; plan smoke-cuda 40 15
    plan bench-priority 170 40; plan bench-compile 70 30; plan tests 150 45; plan memcheck 60 25
    plan racecheck 25 10
    plan layer 45 20; plan inference 60 25; plan bench-grid 90 30; plan multi 30 15; plan adapterdrop 30 15
    plan bench-max-autotune 70 40; plan tradeoffs 45 25
fi
DEADLINE=$((START + TOTAL))

slug() { tr '[:upper:]' '[:lower:]' | sed 's/[^a-z0-9]/-/g; s/--*/-/g; s/^-//; s/-$//'; }
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
if [ "$DRY" = 1 ]; then
    DEVICE_SLUG=cpu-dry
    # The temp folder goes, results and all, when they are packaged in $OUT; else only its Triton cache.
    trap 'if [ -n "$OUT" ]; then rm -rf "$WORK"; else rm -rf "$WORK/triton-cache"; fi' EXIT
else
    DEVICE_SLUG=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | slug)
    DEVICE_SLUG=${DEVICE_SLUG:-unknown-device}
fi
RESULTS_PARENT=${GPU_CHECK_RESULTS_DIR:-$([ "$DRY" = 1 ] && echo "$WORK" || echo "$ROOT/benchmarks/results")}
RES="$RESULTS_PARENT/$(date -u +%Y%m%d-%H%M%S)-$DEVICE_SLUG"
mkdir -p "$RES" "$WORK/triton-cache" || exit 1
[ -n "$OUT" ] && mkdir -p "$OUT"

# Every process of the run: the source tree importable, output unbuffered (a killed stage keeps its
# log), and one Triton cache whose autotuning results every stage reuses.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR="$WORK/triton-cache" TRITON_CACHE_AUTOTUNING=1
[ "$DRY" = 1 ] && export TRITON_INTERPRET=1

if [ -n "$COMMIT_FILE" ] && [ -s "$COMMIT_FILE" ]; then
    cp "$COMMIT_FILE" "$RES/commit.txt"
    COMMIT=$(head -1 "$COMMIT_FILE" | cut -c1-12)
    [ "$(wc -l < "$COMMIT_FILE")" -gt 1 ] && COMMIT+="+dirty"
    export ADAPTERKERN_GIT_COMMIT=$COMMIT
else
    echo "unknown commit (no commit file given: ${COMMIT_FILE:-none})" > "$RES/commit.txt"
fi

now() { date +%s; }
printf 'stage\tstatus\tstart_s\tseconds\tgrant_s\tplanned_s\tmin_s\tnote\n' > "$RES/stages.tsv"
OK_BACKENDS=()      # passed their smoke check (or failed in float32 only): used by every later stage
DROPPED=()          # failed it in bf16, faulted or ran out of time: excluded from every later stage
SMOKE_FAILED=0
TESTS_RC=""         # empty: the test stage did not run

exit_status() {
    if [ -n "$TESTS_RC" ] && [ "$TESTS_RC" != 0 ]; then echo "$TESTS_RC"
    elif [ "$SMOKE_FAILED" = 1 ]; then echo 3
    elif [ -z "$TESTS_RC" ]; then echo 4
    else echo 0; fi
}

# summary.txt and autotune.txt from the results folder's files (no torch import: a fraction of a second).
write_summary() {
    "$PY" - "$RES" "$TRITON_CACHE_DIR" "$(( $(now) - START ))" "$TOTAL" "$(exit_status)" \
        2>> "$RES/summary-errors.log" <<'PY'
import csv, glob, json, os, re, sys

res, cache, elapsed, total, status = sys.argv[1:6]


def read(name):
    path = os.path.join(res, name)
    return open(path, errors="replace").read() if os.path.exists(path) else ""


lines = []
commit = read("commit.txt").splitlines()
head = commit[0] if commit else "unknown commit"
changed = len(commit) - 1
lines.append(f"commit: {head}" + (f" (+{changed} changed files)" if changed > 0 and "unknown" not in head else ""))
env = dict(line.split(": ", 1) for line in read("env.txt").splitlines() if line.startswith(("device: ", "versions: ")))
lines.append(f"device: {env.get('device', '?')}; {env.get('versions', '?')}")
lines.append(f"results: {os.path.basename(res)}; {elapsed} s of {total} s; exit status so far {status}")
lines.append("stages (status, seconds used / granted / planned, note):")
with open(os.path.join(res, "stages.tsv")) as f:
    for row in csv.DictReader(f, delimiter="\t"):
        used = f"{row['seconds']}/{row['grant_s']}/{row['planned_s']}" if row["status"] != "skipped" else "-"
        lines.append(f"  {row['stage']:<19}{row['status']:<12}{used:<12}{row['note']}")

impl_order = ["eager", "adapters", "compile", "compile-max-autotune", "adapterkern-torch", "adapterkern-triton",
              "adapterkern-cuda"]
rows = []  # the priority points: the kernels' run, and torch.compile's beside its own eager
for name in ("grid-priority.csv", "grid-compile.csv"):
    path = os.path.join(res, name)
    if os.path.exists(path):
        rows += [r for r in csv.DictReader(open(path)) if name == "grid-priority.csv" or r["impl"] != "eager"]
if rows:
    best = {}  # (mode, T, d, r) -> impl -> the faster of plain / +graph
    for r in rows:
        key = (r["mode"], int(r["tokens"]), int(r["hidden"]), int(r["bottleneck"]))
        cell = best.setdefault(key, {})
        if r["impl"] not in cell or float(r["median_us"]) < float(cell[r["impl"]]["median_us"]):
            cell[r["impl"]] = r
    impls = [i for i in impl_order if any(i in c for c in best.values())]
    impls += sorted({i for c in best.values() for i in c} - set(impls))
    lines.append(f"headline ({rows[0]['dtype']}, grid-priority/compile.csv): "
                 "median us (g: CUDA graph) / % of floor / vs its run's eager")
    lines.append(f"  {'mode':<8}{'T':>6} {'d':>5} {'r':>4}  "
                 + " ".join(f"{i.replace('adapterkern-', 'ak-'):<18}" for i in impls))
    for key in sorted(best, key=lambda k: (k[0], -k[1], k[2], k[3])):
        cells = []
        for i in impls:
            r = best[key].get(i)
            cells.append("-" if r is None else f"{float(r['median_us']):.1f}{'g' if r['cuda_graph'] == '1' else ''} "
                         f"{float(r['pct_of_floor']):.0f}% {float(r['speedup_vs_eager']):.2f}x")
        lines.append(f"  {key[0]:<8}{key[1]:>6} {key[2]:>5} {key[3]:>4}  " + " ".join(f"{c:<18}" for c in cells))
    errs = {}
    for r in rows:
        errs[r["impl"]] = max(errs.get(r["impl"], 0.0), float(r["max_rel_err"]))
    lines.append("  max rel err vs eager: " + ", ".join(f"{i} {e:.1e}" for i, e in errs.items() if i != "eager"))
else:
    lines.append("headline: no grid-priority.csv rows")

log = read("tests.log")
if log:
    tail = [l for l in log.splitlines() if re.search(r"\d+ (passed|failed|error|skipped|deselected)", l)
            and re.search(r" in [\d.]+s", l)]
    lines.append("tests: " + (tail[-1].strip("= ") if tail else "no pytest summary line (see tests.log)"))
    lines += [f"  {l[:150]}" for l in log.splitlines() if l.startswith(("FAILED ", "ERROR "))][:6]

autotune = []  # (configs timed, line): the benchmarks' full sweeps first, then the two-config runs
for path in glob.glob(os.path.join(cache, "**", "*.autotune.json"), recursive=True):
    try:
        data = json.load(open(path))
        timings = [(t[0] if isinstance(t, list) else t, c) for c, t in data["configs_timings"]]
        t, c = min(timings, key=lambda x: x[0])
        autotune.append((len(timings), f"{os.path.basename(path)[:-len('.autotune.json')]} key={data['key']}: "
                         f"{c.get('kwargs')} warps={c.get('num_warps')} stages={c.get('num_stages')}, {t:.4f} ms "
                         f"(best of {len(timings)})"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        autotune.append((0, f"{path}: unreadable ({exc})"))
autotune.sort(key=lambda item: (-item[0], item[1]))
with open(os.path.join(res, "autotune.txt"), "w") as f:
    f.write("".join(line + "\n" for _, line in autotune) or "no Triton autotuning recorded (interpreter, or none ran)\n")
lines.append(f"autotune: {len(autotune)} Triton shape keys tuned, chosen configs in autotune.txt")
with open(os.path.join(res, "summary.txt"), "w") as f:
    f.write("gpu_check summary, re-made at every stage boundary\n" + "".join(l.rstrip() + "\n" for l in lines))
PY
}

# package: summary.txt and results.tgz into $OUT, each written beside and then renamed.
package() {
    write_summary
    [ -n "$OUT" ] || return 0
    cp "$RES/summary.txt" "$OUT/.summary.txt.tmp" && mv -f "$OUT/.summary.txt.tmp" "$OUT/summary.txt"
    tar -czf "$OUT/.results.tgz.tmp" -C "$RESULTS_PARENT" "$(basename "$RES")" \
        && mv -f "$OUT/.results.tgz.tmp" "$OUT/results.tgz"
}

record() {  # record NAME STATUS START SECONDS GRANT NOTE
    local name=$1
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$2" "$3" "$4" "$5" "${PLANNED[$name]:-0}" \
        "${MINIMUM[$name]:-0}" "${6//$'\t'/ }" >> "$RES/stages.tsv"
    echo "=== [$(( $(now) - START ))s] $name: $2${6:+ ($6)}"
    package
}

skip_stage() {  # skip_stage NAME REASON
    record "$1" skipped "$(( $(now) - START ))" 0 0 "$2"
}

# begin_stage NAME: sets GRANT and STAGE_T0, or records the stage as skipped for time and fails.
begin_stage() {
    local name=$1 left
    STAGE_T0=$(now)
    left=$((DEADLINE - RESERVE - STAGE_T0))
    GRANT=$(stage_grant "${PLANNED[$name]}" "${MINIMUM[$name]}" "$left" "$GRACE")
    if [ "$GRANT" = 0 ]; then
        skip_stage "$name" "not started: needs ${MINIMUM[$name]} s + ${GRACE} s grace, ${left} s left"
        return 1
    fi
    echo "=== [$((STAGE_T0 - START))s] $name (limit ${GRANT} s)"
}

# timed LOG CMD...: CMD under the stage's limit, output to $RES/LOG; sets RC.
timed() {
    local log=$1; shift
    timeout -s INT -k "$GRACE" "$GRANT" "$@" > "$RES/$log" 2>&1
    RC=$?
}

end_stage() {  # end_stage NAME STATUS NOTE
    record "$1" "$2" "$((STAGE_T0 - START))" "$(( $(now) - STAGE_T0 ))" "$GRANT" "$3"
}

rc_status() {  # the status word for RC: ok, cut (its time limit) or failed
    case $RC in 0) echo ok ;; 124 | 137) echo cut ;; *) echo failed ;; esac
}

trap 'record interrupted failed "$(( $(now) - START ))" 0 0 "gpu_check.sh got a signal"; exit 130' INT TERM
package
echo "gpu_check: results in $RES; deadline in ${TOTAL} s${OUT:+; packaged to $OUT at every stage}"

# ---------------------------------------------------------------------------------------------- env
# shellcheck disable=SC2317  # run through `bash -c collect_env`, under the stage's limit
collect_env() {
    date -u; uname -a; echo "cpus: $(nproc)"; free -g 2>/dev/null | head -2
    nvidia-smi 2>&1 | head -25
    "$PY" - <<'PY' 2>&1
import platform
from importlib import metadata

import torch

def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"

name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (no CUDA device)"
print(f"device: {name}")
print(f"versions: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {version('triton')}, "
      f"python {platform.python_version()}")
print("packages:", ", ".join(f"{n} {version(n)}" for n in ("transformers", "adapters", "matplotlib", "pytest",
                                                             "pytest-xdist", "numpy", "setuptools")))
PY
    command -v nvcc > /dev/null && nvcc --version | tail -2
    [ -n "$SANITIZER" ] && "$SANITIZER" --version 2>&1 | head -2
    echo "commit file: ${COMMIT_FILE:-none}"; cat "$RES/commit.txt"
}
SANITIZER=${GPU_CHECK_SANITIZER:-$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)}
export PY RES COMMIT_FILE SANITIZER
export -f collect_env
if begin_stage env; then
    timed env.txt bash -c collect_env
    end_stage env "$(rc_status)" "$(grep -m1 '^device: ' "$RES/env.txt" | cut -c9-)"
fi

# ---------------------------------------------------------------------------------------------- install
if [ "$DRY" = 1 ]; then
    skip_stage install "dry run: no install, no CUDA build"
elif begin_stage install; then
    ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
    ARCH=${ARCH:-90}
    timed install.log env ADAPTERKERN_CUDA_ARCHS="$ARCH" MAX_JOBS="$(nproc)" \
        "$PY" -m pip install -e . --no-deps --no-build-isolation --no-input --disable-pip-version-check
    status=$(rc_status)
    # The extension is built in place before pip installs anything, so it can be there even if pip failed.
    if timeout 60 "$PY" -c "import adapterkern._C" >> "$RES/install.log" 2>&1; then
        note="adapterkern._C built for sm_$ARCH (pip rc $RC)"
    else
        export ADAPTERKERN_NO_JIT=1  # no JIT build in every later process: the cuda backend is off
        note="no adapterkern._C (pip rc $RC): cuda backend off, ADAPTERKERN_NO_JIT=1"
        status=failed
    fi
    end_stage install "$status" "$note"
else
    export ADAPTERKERN_NO_JIT=1
fi

# ---------------------------------------------------------------------------------------------- smoke
SMOKE_SIZE=()
[ "$DRY" = 1 ] && SMOKE_SIZE=(--dry)
for backend in triton cuda; do
    if ! begin_stage "smoke-$backend"; then
        DROPPED+=("$backend")  # not checked: not trusted
        continue
    fi
    timed "smoke-$backend.log" env ADAPTERKERN_TRITON_CONFIGS=few \
        "$PY" benchmarks/smoke_check.py --backend "$backend" "${SMOKE_SIZE[@]}"
    verdict=$(grep -m1 '^VERDICT' "$RES/smoke-$backend.log" | sed 's/^VERDICT [a-z]*: //')
    # The verdict's word (see smoke_check.py), not the exit status: it stands if the exit is slow.
    case ${verdict%% *} in
        PASS) status=ok; OK_BACKENDS+=("$backend") ;;
        FAIL-FP32) status=failed; OK_BACKENDS+=("$backend"); SMOKE_FAILED=1 ;;
        UNAVAILABLE) status=unavailable ;;
        *) status=$(rc_status); [ "$status" = ok ] && status=failed
           DROPPED+=("$backend"); SMOKE_FAILED=1; verdict="${verdict:-"no verdict (rc $RC)"}; dropped" ;;
    esac
    end_stage "smoke-$backend" "$status" "$verdict"
done
BENCH_BACKEND=torch  # what the subcommands' fused adapters use: the first kernel backend that passed
for b in triton cuda; do
    if [[ " ${OK_BACKENDS[*]} " == *" $b "* ]]; then BENCH_BACKEND=$b; break; fi
done
if [[ " ${DROPPED[*]} " == *" triton "* ]]; then
    export ADAPTERKERN_BACKEND=$BENCH_BACKEND  # backend="auto" calls (tests, models) avoid triton
fi
# The grid's implementations but torch.compile (a stage of its own), the kernel backends those that
# passed their smoke check; triton's decode kernels (T <= 64) beside its one-row-tile kernel (-nodecode),
# its L2-resident forward schedule beside one program per row tile (-rowtile);
# cuda's decode path beside its one-launch forward (-nodecode), its vectorised forward beside the scalar one
# (-scalar), its cluster kernel (x read once at large d) beside the one-block kernel (-nocluster).
IMPLS="eager,adapters,adapterkern-torch"
for b in "${OK_BACKENDS[@]}"; do IMPLS+=",adapterkern-$b"; done
if [[ " ${OK_BACKENDS[*]} " == *" triton "* ]]; then IMPLS+=",adapterkern-triton-nodecode,adapterkern-triton-rowtile"; fi
if [[ " ${OK_BACKENDS[*]} " == *" cuda "* ]]; then IMPLS+=",adapterkern-cuda-nodecode,adapterkern-cuda-scalar,adapterkern-cuda-nocluster"; fi

# ---------------------------------------------------------------------------------------------- bench
if [ "$DRY" = 1 ]; then
    BENCH_COMMON=(--device cpu --dtype float32 --no-progress --no-plot --min-run-time 0.01 --rounds 1
                  --copy-mib 1 --threads 1)
else
    BENCH_COMMON=(--full --dtype bfloat16 --no-progress --no-plot --warmup-ms 10 --rep-ms 50 --copy-mib 1024)
fi

# bench_stage NAME CSV ARGS...: the grid CLI with a soft --time-limit (no point started after it)
# inside the stage's hard limit; every finished point is already in the CSV when it is cut.
bench_stage() {
    local name=$1 csv=$2 soft; shift 2
    begin_stage "$name" || return 0
    soft=$((GRANT > 2 * SOFT_MARGIN ? GRANT - SOFT_MARGIN : GRANT / 2 + 1))
    timed "$name.log" env TRITON_PRINT_AUTOTUNING=1 "$PY" -m adapterkern.bench "${BENCH_COMMON[@]}" \
        --time-limit "$soft" --csv "$RES/$csv" "$@"
    end_stage "$name" "$(rc_status)" \
        "$(csv_rows "$csv") rows in $csv; $(grep -c 'failed, ' "$RES/$name.log") impl failures logged"
}

csv_rows() {  # csv_rows FILE: data rows in a CSV of the results folder (0 when absent)
    if [ -s "$RES/$1" ]; then echo $(( $(wc -l < "$RES/$1") - 1 )); else echo 0; fi
}

# sub_stage NAME SUBCOMMAND ARGS...: a benchmark subcommand, CSV NAME.csv
sub_stage() {
    local name=$1 sub=$2 note; shift 2
    begin_stage "$name" || return 0
    timed "$name.log" "$PY" -m adapterkern.bench "$sub" --csv "$RES/$name.csv" "$@"
    note="$(csv_rows "$name.csv") rows in $name.csv"
    [ -s "$RES/$name.csv" ] || note+="; $(grep -m1 'skipped: ' "$RES/$name.log" | cut -c1-100)"
    end_stage "$name" "$(rc_status)" "$note"
}

if [ "$DRY" = 1 ]; then
    bench_stage bench-priority grid-priority.csv --tokens 4,1 --hidden 32 --bottleneck 8 --mode fwd,fwd_bwd \
        --impl "$IMPLS"
else
    bench_stage bench-priority grid-priority.csv --tokens 16384,64,1,8 --hidden 4096 --bottleneck 64 \
        --mode fwd,fwd_bwd --impl "$IMPLS"
fi
if [ "$DRY" = 1 ]; then
    skip_stage bench-compile "dry run: torch.compile's compiles would take most of a CPU minute"
else
    bench_stage bench-compile grid-compile.csv --tokens 16384,64,1 --hidden 4096 --bottleneck 64 \
        --mode fwd,fwd_bwd --impl compile
fi

# ---------------------------------------------------------------------------------------------- tests
if [ "$DRY" = 1 ]; then
    TEST_ARGS=(tests/test_backends.py)
else
    # CPU-only checks CI runs already: test_backends_triton_compile.py, the nvcc/ptxas checks (test_csrc_build.py's
    # GPU tests stay), the kernels' host emulation under sanitizers and this script's own dry run.
    # Two Triton configs per kernel: the full sweep would time 48 for every shape key.
    TEST_ARGS=(tests --ignore=tests/test_backends_triton_compile.py --ignore=tests/test_csrc_emulation.py
               --ignore=tests/test_benchmarks_gpu_check.py
               --deselect tests/test_csrc_build.py::test_kernels_compile_for_sm80_sm90_without_spills
               --deselect tests/test_csrc_build.py::test_spill_check_fails_on_a_spilling_kernel
               --maxfail=50)
    "$PY" -c "import xdist" 2> /dev/null && TEST_ARGS+=(-n "$(( $(nproc) < 12 ? $(nproc) : 12 ))")
    # A test stuck in a kernel ends its worker (thread method: a hung CUDA call never returns to Python)
    # and is reported, instead of holding the stage until its limit.
    "$PY" -c "import pytest_timeout" 2> /dev/null && TEST_ARGS+=(--timeout 90 --timeout-method thread)
    [[ " ${DROPPED[*]} " == *" cuda "* ]] && TEST_ARGS+=(--deselect tests/test_csrc_build.py)
fi
EXCLUDE=$(pytest_exclusions "${DROPPED[@]}")
[ -n "$EXCLUDE" ] && TEST_ARGS+=(-k "$EXCLUDE")
if begin_stage tests; then
    timed tests.log env ADAPTERKERN_TRITON_CONFIGS=few \
        "$PY" -m pytest "${TEST_ARGS[@]}" -q -rfE -p no:cacheprovider
    TESTS_RC=$RC
    end_stage tests "$(rc_status)" "pytest rc $RC${EXCLUDE:+; deselected: ${DROPPED[*]}}"
fi

# ---------------------------------------------------------------------------------------------- sanitizer
# sanitizer_stage NAME ARGS...: compute-sanitizer on benchmarks/sanitize_check.py; a machine whose
# driver refuses the sanitizer (gVisor: "Device not supported", then error 999) is reported as such.
SANITIZER_STATE=""
sanitizer_stage() {
    local name=$1 status note; shift
    if [ -z "$SANITIZER" ]; then skip_stage "$name" "compute-sanitizer not found"; return; fi
    if [ "$SANITIZER_STATE" = unavailable ]; then
        skip_stage "$name" "sanitizer unavailable on this machine"; return
    fi
    if [ ${#OK_BACKENDS[@]} = 0 ]; then skip_stage "$name" "no kernel backend in use after the smoke checks"; return; fi
    begin_stage "$name" || return 0
    # No caching allocator (each tensor its own allocation, so an access past its end is seen); two
    # Triton configs, timed afresh (not read from the autotuning cache), so both run under the tool.
    timed "$name.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 ADAPTERKERN_TRITON_CONFIGS=few \
        TRITON_CACHE_AUTOTUNING=0 "$SANITIZER" "$@"
    note=$(grep -m1 -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$RES/$name.log" | sed 's/^=* *//')
    if grep -qE 'Device not supported|error 999|CUDA_ERROR_UNKNOWN' "$RES/$name.log"; then
        SANITIZER_STATE=unavailable; status=unavailable
        note=$(grep -m1 -oE 'Device not supported|error 999|CUDA_ERROR_UNKNOWN' "$RES/$name.log")
        note="sanitizer unavailable on this machine ($note)"
    elif [ "$RC" = 99 ]; then status=failed; note="errors found: ${note:-see $name.log}"
    else status=$(rc_status); note="${note:-no sanitizer summary}; rc $RC"  # 1: a comparison in sanitize_check failed
    fi
    end_stage "$name" "$status" "$note"
}
sanitizer_stage memcheck --tool memcheck --error-exitcode 99 --print-limit 50 \
    "$PY" benchmarks/sanitize_check.py --backends "$(IFS=,; echo "${OK_BACKENDS[*]}")"
if [[ " ${OK_BACKENDS[*]} " == *" cuda "* ]]; then
    sanitizer_stage racecheck --tool racecheck --error-exitcode 99 --print-limit 50 \
        "$PY" benchmarks/sanitize_check.py --racecheck
else
    skip_stage racecheck "the cuda backend is not in use (see smoke-cuda)"
fi

# ---------------------------------------------------------------------------------------------- the rest
if [ "$DRY" = 1 ]; then
    skip_stage layer "dry run: GPU only"
    skip_stage inference "dry run: GPU only"
    # Far more than its limit, with no soft limit: the cut-by-its-limit path.
    bench_stage bench-grid grid-rest.csv --tokens 1,2,3,4,5,6,7,8,9,10,11,12 --hidden 32,48 --bottleneck 8 \
        --min-run-time 0.3 --impl eager --time-limit 999
    sub_stage multi multi --adapters 3 --tokens 96 --hidden 32 --bottleneck 8 --rounds 1 --block-ms 1 \
        --threads 1 --backend torch --device cpu
    skip_stage adapterdrop "dry run: GPU only"
    skip_stage bench-max-autotune "dry run: GPU only"
    sub_stage tradeoffs tradeoffs --device cpu --backend torch
else
    sub_stage layer layer --backend "$BENCH_BACKEND"
    sub_stage inference inference --backend "$BENCH_BACKEND"
    # The grid's other T at every d and r, (4096, 768, 64) first (T=16384/64/1 at d=4096 r=64: above).
    bench_stage bench-grid grid-rest.csv --tokens 4096,512,8 --hidden 4096,768,1024 --bottleneck 64,16,256 \
        --mode fwd,fwd_bwd --impl "$IMPLS"
    sub_stage multi multi --backend "$BENCH_BACKEND"
    sub_stage adapterdrop adapterdrop --backend "$BENCH_BACKEND"
    bench_stage bench-max-autotune grid-max-autotune.csv --tokens 16384,64 --hidden 4096 --bottleneck 64 \
        --mode fwd,fwd_bwd --impl compile-max-autotune --no-cuda-graph
    sub_stage tradeoffs tradeoffs --backend "$BENCH_BACKEND"
fi

STATUS=$(exit_status)
record finished "exit $STATUS" "$(( $(now) - START ))" 0 0 "results in $RES"
cat "$RES/summary.txt"
exit "$STATUS"
