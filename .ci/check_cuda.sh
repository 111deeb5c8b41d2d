#!/usr/bin/env bash
# Compile-check the CUDA kernels without a GPU.
#
#  * every csrc/*.cu is compiled with nvcc (-c, into a temp dir) for each arch in
#    $ADAPTERKERN_CHECK_ARCHS (default "80 90"), with the ptxas resource report (-Xptxas -v);
#  * csrc/bindings.cpp is compiled (host code, via nvcc) against the installed torch's headers (works with a CPU
#    torch build; skipped with a note when torch or its headers are missing, and in CHECK_CUDA_SOURCES runs);
#  * the report goes to benchmarks/results/ptxas_report.txt (raw ptxas lines + a per-kernel table);
#  * fails on any compile error, and on any kernel that spills (nonzero "bytes spill stores/loads")
#    unless a comment in csrc/ says `SPILL-OK: <kernel name> <reason>`;
#  * disassembles every object (cuobjdump -sass), writes per-kernel instruction-class counts to
#    sass_report.txt beside the ptxas report, and fails on a broken or stale
#    `SASS-PROMISE: <kernel-glob> [@sm_NN ...] <CLASS><op><N> ...` comment (syntax: .ci/sass_report.py).
#    Promises are read from csrc/, or from the CHECK_CUDA_SOURCES files when those replace it.
#
# Env: ADAPTERKERN_CHECK_ARCHS ("80 90"), CHECK_CUDA_JOBS (parallel nvcc jobs, default 2),
#      CHECK_CUDA_NVCC_EXTRA (extra nvcc flags),
#      CHECK_CUDA_REPORT (ptxas report path override; sass_report.txt is written beside it),
#      CHECK_CUDA_SOURCES (replace the .cu list and the promise files; tests use it to prove the gates fail),
#      CHECK_CUDA_SASS=skip (no SASS step, noted in the report; otherwise no cuobjdump fails the check),
#      CUOBJDUMP (default: on PATH, beside nvcc, else the triton wheel's; it needs nvdisasm beside it or on PATH),
#      PYTHON (interpreter whose torch to use and that runs sass_report.py; default .venv/bin/python, else python3),
#      NVCC (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
ARCHS="${ADAPTERKERN_CHECK_ARCHS:-80 90}"
JOBS="${CHECK_CUDA_JOBS:-2}"
REPORT_DIR="$ROOT/benchmarks/results"
REPORT="${CHECK_CUDA_REPORT:-$REPORT_DIR/ptxas_report.txt}"
REPORT_DIR="$(dirname "$REPORT")"
NVCC="${NVCC:-$(command -v nvcc || true)}"
if [[ -z "$NVCC" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [[ -z "$NVCC" ]]; then
  echo "check_cuda: FAIL: nvcc not found (put it on PATH or set NVCC / CUDA_HOME)" >&2
  exit 2
fi
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
# Same language level as torch's cpp_extension (C++20 since torch 2.10); no --use_fast_math.
# The optimisation flags are the extension build's own (adapterkern/cuda_toolchain.py).
read -ra BUILD_FLAGS <<< "$("$PYTHON" "$ROOT/adapterkern/cuda_toolchain.py" --nvcc-flags)" || exit 2
NVCC_FLAGS=(-std=c++20 "${BUILD_FLAGS[@]}" -Xptxas -v -I"$ROOT/csrc")
# shellcheck disable=SC2206
NVCC_FLAGS+=(${CHECK_CUDA_NVCC_EXTRA:-})  # e.g. "-maxrregcount=32" (the tests use it to force a spill)

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
mkdir -p "$REPORT_DIR"

shopt -s nullglob
SOURCES=(csrc/*.cu)
PROMISE_PATHS=(csrc)
# shellcheck disable=SC2206
if [[ -n "${CHECK_CUDA_SOURCES:-}" ]]; then  # self-test hook; csrc/'s promises would all be stale here
  SOURCES=(${CHECK_CUDA_SOURCES}); PROMISE_PATHS=("${SOURCES[@]}")
fi
if (( ${#SOURCES[@]} == 0 )); then echo "check_cuda: FAIL: no csrc/*.cu sources" >&2; exit 2; fi

echo "check_cuda: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "check_cuda: compiling ${#SOURCES[@]} source(s) for sm ${ARCHS} (${JOBS} jobs)"
start=$(date +%s)

# --- nvcc compiles, JOBS at a time --------------------------------------------------------
pids=(); names=()
for arch in $ARCHS; do
  for src in "${SOURCES[@]}"; do
    base="$(basename "$src" .cu)_sm${arch}"
    ( "$NVCC" "${NVCC_FLAGS[@]}" -gencode "arch=compute_${arch},code=sm_${arch}" -c "$src" -o "$TMP/$base.o" \
        >"$TMP/$base.log" 2>&1; echo $? >"$TMP/$base.rc" ) &
    pids+=($!); names+=("$src (sm_${arch})|$base")
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n 2>/dev/null || true; done
  done
done
wait
compile_fail=0
objects=()
for entry in "${names[@]}"; do
  label="${entry%%|*}"; base="${entry##*|}"
  rc="$(cat "$TMP/$base.rc" 2>/dev/null || echo 1)"
  if [[ "$rc" == 0 ]]; then
    objects+=("$TMP/$base.o")
  else
    compile_fail=1
    echo "check_cuda: FAIL: nvcc error compiling $label:" >&2
    grep -v "^ptxas info" "$TMP/$base.log" | head -n 40 >&2
  fi
done

# --- bindings.cpp syntax check against torch's headers --------------------------------------
bind_status="skipped"
# A CHECK_CUDA_SOURCES run checks those sources only (self-tests: this compile would be most of their time).
if [[ -n "${CHECK_CUDA_SOURCES:-}" ]]; then
  bind_status="skipped (CHECK_CUDA_SOURCES)"
elif [[ -f csrc/bindings.cpp ]]; then
  incs="$("$PYTHON" - <<'PY' 2>/dev/null
import sysconfig
from torch.utils.cpp_extension import include_paths
print(" ".join(["-I" + p for p in include_paths()] + ["-I" + sysconfig.get_paths()["include"]]))
PY
)"
  if [[ -z "$incs" ]]; then
    bind_status="skipped (torch not importable with $PYTHON)"
  else
    # A CPU torch build lacks the generated c10/cuda/impl/cuda_cmake_macros.h; the define below
    # skips that include (it only sets export macros), so the check works on CPU-only machines.
    # nvcc drives the host compiler for a .cpp file and adds the CUDA include directory itself.
    # shellcheck disable=SC2086
    if "$NVCC" -std=c++20 -O0 -c -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $incs -I"$ROOT/csrc" \
        csrc/bindings.cpp -o "$TMP/bindings.o" >"$TMP/bindings.log" 2>&1; then
      bind_status="ok"
    else
      bind_status="FAILED"
      compile_fail=1
      echo "check_cuda: FAIL: csrc/bindings.cpp does not compile against torch's headers:" >&2
      grep -E "error" "$TMP/bindings.log" | head -n 30 >&2
    fi
  fi
fi

# --- ptxas report, spill check ----------------------------------------------------------------
cat "$TMP"/*_sm*.log 2>/dev/null | grep -E "^ptxas (info|warning|error)|bytes stack frame" >"$TMP/ptxas_raw.txt" || true
DEMANGLE="$(command -v cu++filt || command -v c++filt || echo cat)"
"$DEMANGLE" <"$TMP/ptxas_raw.txt" >"$TMP/ptxas_demangled.txt"

python3 - "$TMP/ptxas_demangled.txt" "$REPORT" "$ROOT/csrc" "$bind_status" "$("$NVCC" --version | tail -n 2 | head -n 1)" \
    "$TMP/ptxas_kernels.tsv" <<'PY'
import re, sys, pathlib, datetime
raw_path, report_path, csrc, bind_status, nvcc_version, tsv_path = sys.argv[1:7]
lines = pathlib.Path(raw_path).read_text().splitlines()
kernels = []  # dicts: name, arch, regs, smem, stack, spill_st, spill_ld
cur = None
for ln in lines:
    m = re.search(r"Compiling entry function '(.*)' for '(sm_\d+a?)'", ln)
    if m:
        cur = {"name": m.group(1), "arch": m.group(2), "regs": 0, "smem": 0, "stack": 0, "spill_st": 0, "spill_ld": 0}
        kernels.append(cur)
        continue
    if cur is None:
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", ln)
    if m:
        cur["stack"], cur["spill_st"], cur["spill_ld"] = map(int, m.groups())
    m = re.search(r"Used (\d+) registers", ln)
    if m:
        cur["regs"] = int(m.group(1))
        s = re.search(r"(\d+) bytes smem", ln)
        cur["smem"] = int(s.group(1)) if s else 0
        cur = None

src_text = "\n".join(p.read_text(errors="replace") for p in pathlib.Path(csrc).rglob("*") if p.suffix in (".cu", ".cuh", ".h", ".cpp"))
def short(name):  # "void ns::kernel<Args>(Params)" -> "kernel<Args>"
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\(.*\)$", "", name)
    return name.replace("adapterkern::", "")
# For sass_report.py: the REGS column, and the short names its promises match (the same as this table's).
pathlib.Path(tsv_path).write_text("".join(f"{k['arch']}\t{k['regs']}\t{short(k['name'])}\t{k['name']}\n"
                                          for k in kernels))
def base(name):
    return re.sub(r"<.*$", "", short(name))
def spill_ok(name):
    return re.search(r"SPILL-OK:\s*" + re.escape(base(name)) + r"\b\s*\S", src_text) is not None

rows, bad = [], []
for k in kernels:
    spill = k["spill_st"] + k["spill_ld"]
    status = "ok"
    if spill:
        status = "spill (SPILL-OK)" if spill_ok(k["name"]) else "SPILL"
        if status == "SPILL":
            bad.append(k)
    rows.append((k["arch"], short(k["name"]), k["regs"], k["smem"], k["stack"], k["spill_st"], k["spill_ld"], status))
w = max([len(r[1]) for r in rows] + [6])
table = [f"{'arch':<6} {'kernel':<{w}} {'regs':>4} {'smem':>6} {'stack':>5} {'spill_st':>8} {'spill_ld':>8}  status",
         "-" * (w + 50)]
for r in sorted(rows):
    table.append(f"{r[0]:<6} {r[1]:<{w}} {r[2]:>4} {r[3]:>6} {r[4]:>5} {r[5]:>8} {r[6]:>8}  {r[7]}")
summary = (f"{len(kernels)} kernel compilations, {len(bad)} with unaccepted spills; "
           f"bindings.cpp: {bind_status}")
header = [f"# ptxas resource report for csrc/ ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC})",
          f"# {nvcc_version}",
          "# smem = static shared memory; the big kernels also take dynamic shared memory at launch",
          "# (sized per call by the launchers, see csrc/README.md).", ""]
pathlib.Path(report_path).write_text("\n".join(header + table + ["", summary, "", "# raw ptxas output", *lines]) + "\n")
print("\n".join(table))
print()
print("check_cuda: " + summary)
for k in bad:
    print(f"check_cuda: FAIL: {short(k['name'])} ({k['arch']}) spills {k['spill_st']} B stores / {k['spill_ld']} B loads;"
          f" fix it or add a comment 'SPILL-OK: {base(k['name'])} <reason>' in csrc/", file=sys.stderr)
if not kernels:
    print("check_cuda: FAIL: no kernels found in the ptxas output", file=sys.stderr)
    sys.exit(1)
sys.exit(1 if bad else 0)
PY
spill_rc=$?

# --- SASS census, SASS-PROMISE gate -------------------------------------------------------------
SASS_REPORT="$REPORT_DIR/sass_report.txt"
"$PYTHON" "$ROOT/.ci/sass_report.py" --report "$SASS_REPORT" --ptxas-kernels "$TMP/ptxas_kernels.tsv" \
  --nvcc "$NVCC" --demangle "$DEMANGLE" --promises "${PROMISE_PATHS[@]}" --objects "${objects[@]}"
sass_rc=$?

echo "check_cuda: reports written to ${REPORT#"$ROOT"/}, ${SASS_REPORT#"$ROOT"/} ($(( $(date +%s) - start )) s)"
if (( compile_fail )); then echo "check_cuda: RESULT: FAIL (compile errors)"; exit 1; fi
if (( spill_rc )); then echo "check_cuda: RESULT: FAIL (spills or no kernels)"; exit 1; fi
if (( sass_rc )); then echo "check_cuda: RESULT: FAIL (SASS: broken or stale SASS-PROMISE, or no SASS tools)"; exit 1; fi
echo "check_cuda: RESULT: OK"
