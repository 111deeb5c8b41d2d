"""benchmarks/gpu_check.sh and benchmarks/smoke_check.py, without a GPU.

* The script's dry run (GPU_CHECK_DRY=1) end to end: every stage's control flow on the CPU, one stage
  skipped for lack of time, one cut by its limit, a sanitizer that refuses the device; it must end
  inside its deadline, never hold more than 8 files in $OUT, leave a readable results.tgz and a
  summary naming every stage, exit as documented and write nothing in the repository.
* Its deadline arithmetic and its pytest deselection of dropped backends, as units; shellcheck.
* smoke_check's checker against backends that are wrong in the ways it exists to catch.
"""
from __future__ import annotations

import csv
import importlib.util
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import adapterkern

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
DRY_TOTAL_S = 80
STAGES = ["env", "install", "smoke-triton", "smoke-cuda", "bench-priority", "bench-compile", "tests", "memcheck", "racecheck",
          "layer", "inference", "bench-grid", "multi", "adapterdrop", "bench-max-autotune", "tradeoffs", "finished"]
FAKE_COMMIT = "feedface" * 5
FAKE_SANITIZER = """#!/bin/sh
echo "========= COMPUTE-SANITIZER"
echo "========= Error: Device not supported"
exit 1
"""

needs_bash = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _bash(snippet: str) -> str:
    """Run ``snippet`` after sourcing gpu_check.sh's functions only; its stdout."""
    proc = subprocess.run(["bash", "-c", f'GPU_CHECK_FUNCTIONS_ONLY=1; . "{SCRIPT}"; {snippet}'],
                          capture_output=True, text=True, timeout=60, check=True)
    return proc.stdout.strip()


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_script_is_shellcheck_clean():
    proc = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_bash
@pytest.mark.parametrize("planned,minimum,left,grace,expected", [
    (100, 20, 400, 10, 100),  # plenty of time: the plan
    (100, 20, 60, 10, 50),    # tight: what is left once the grace is kept back
    (100, 20, 30, 10, 20),    # exactly the minimum fits
    (100, 20, 29, 10, 0),     # it does not: skipped
    (100, 20, -5, 10, 0),     # past the deadline already
])
def test_stage_grant(planned, minimum, left, grace, expected):
    assert int(_bash(f"stage_grant {planned} {minimum} {left} {grace}")) == expected


@needs_bash
def test_pytest_exclusions_deselect_exactly_the_dropped_backends(tmp_path):
    (tmp_path / "test_ids.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('b', ['torch', 'triton', 'cuda'])\n"
        "def test_alone(b): pass\n"
        "@pytest.mark.parametrize('dtype', ['float32', 'bf16'])\n"
        "@pytest.mark.parametrize('b', ['torch', 'triton', 'cuda'])\n"
        "@pytest.mark.parametrize('n', [8])\n"
        "def test_inner(n, b, dtype): pass\n"
        "@pytest.mark.parametrize('act', ['relu'])\n"
        "@pytest.mark.parametrize('b', ['torch', 'cuda'])\n"
        "def test_first(b, act): pass\n"
        "def test_cuda_named_but_not_parametrized(): pass\n"
    )
    assert _bash("pytest_exclusions") == ""

    def collected(*dropped):
        expr = _bash("pytest_exclusions " + " ".join(dropped))
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                               "-k", expr, str(tmp_path / "test_ids.py")],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path,
                              env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")})
        return {line.split("::", 1)[1] for line in proc.stdout.splitlines() if "::" in line}

    kept = collected("cuda")
    assert kept == {"test_alone[torch]", "test_alone[triton]", "test_inner[8-torch-float32]",
                    "test_inner[8-torch-bf16]", "test_inner[8-triton-float32]", "test_inner[8-triton-bf16]",
                    "test_first[torch-relu]", "test_cuda_named_but_not_parametrized"}
    assert collected("cuda", "triton") == {n for n in kept if "triton" not in n}


def _members(tgz: Path) -> dict:
    with tarfile.open(tgz) as tar:
        return {m.name.split("/", 1)[1]: tar.extractfile(m).read().decode() for m in tar.getmembers()
                if m.isfile()}


def _git_status():
    """`git status` where the script runs and writes: benchmarks/ (results/ with ignored files too) and
    the repository's top level; other folders may be edited by others meanwhile. None without git."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    run = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout  # noqa: E731
    results = run("status", "--porcelain", "--ignored", "--untracked-files=all", "--", "benchmarks/results")
    here = [line for line in run("status", "--porcelain", "--untracked-files=all", "--", "benchmarks", ".").splitlines()
            if line[3:].startswith("benchmarks/") or "/" not in line[3:].rstrip("/")]
    return set(results.splitlines()), set(here)


def _dry_run(tmp_path, total_s):
    """Run the dry run with a deadline of ``total_s``; check what holds for every budget and return
    (exit status, summary.txt, {file: text} of results.tgz, {stage: stages.tsv row})."""
    out = tmp_path / "out"
    commit_file = tmp_path / "commit.txt"
    commit_file.write_text(f"{FAKE_COMMIT}\n M adapterkern/functional.py\n")
    sanitizer = tmp_path / "compute-sanitizer"
    sanitizer.write_text(FAKE_SANITIZER)
    sanitizer.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "TRITON_INTERPRET"}
    env.update(GPU_CHECK_DRY="1", GPU_CHECK_TOTAL_S=str(total_s), OUT=str(out), PYTHON=sys.executable,
               GPU_CHECK_RESULTS_DIR=str(tmp_path / "results"), GPU_CHECK_SANITIZER=str(sanitizer))
    before = _git_status()

    most = [0]
    done = threading.Event()

    def watch():  # the most files $OUT ever holds, and that it never holds a folder
        while not done.is_set():
            if out.exists():
                entries = list(out.iterdir())
                assert all(e.is_file() for e in entries), entries
                most[0] = max(most[0], len(entries))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    proc = subprocess.run(["bash", str(SCRIPT), str(commit_file)], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    wall = time.monotonic() - start
    done.set()
    watcher.join()
    log = proc.stdout + proc.stderr

    # Every stage is granted time only up to the deadline less a reserve for the last packaging; the
    # slack is for that packaging (a few short Python runs and a tar) on a machine busy with other tests.
    assert wall <= total_s + 10, (wall, log)
    assert 1 <= most[0] <= 8, most[0]
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "summary.txt"], log
    files = _members(out / "results.tgz")
    for name in ("env.txt", "commit.txt", "stages.tsv", "autotune.txt", "summary.txt"):
        assert name in files, (name, sorted(files))
    assert files["summary-errors.log"] == "", files["summary-errors.log"]
    summary = (out / "summary.txt").read_text()
    assert files["summary.txt"] == summary
    assert len(summary.splitlines()) <= 60, summary
    assert f"commit: {FAKE_COMMIT} (+1 changed files)" in summary

    stages = {row["stage"]: row for row in csv.DictReader(io.StringIO(files["stages.tsv"]), delimiter="\t")}
    assert list(stages) == STAGES, list(stages)
    for name, row in stages.items():
        assert any(line.split()[:2] == [name, row["status"].split()[0]] for line in summary.splitlines()), (name, summary)
        if row["status"] == "skipped":
            assert row["note"], name  # with the reason
        elif name != "finished":  # ran: within its limit and the kill grace (2 s), give or take a second
            assert int(row["seconds"]) <= int(row["grant_s"]) + 2 + 1, row
            assert int(row["start_s"]) + int(row["grant_s"]) <= total_s, row  # never granted past the deadline
            assert f"{name}.log" in files or name == "env", (name, sorted(files))
    assert stages["finished"]["status"] == f"exit {proc.returncode}"
    assert proc.returncode == _documented_exit_status(stages), (proc.returncode, summary)
    assert _git_status() == before
    return proc.returncode, summary, files, stages


def _documented_exit_status(stages):
    """The test stage's status when it failed; else 3 when a smoke check failed; else 4 when the test
    stage did not run; else 0 (gpu_check.sh's header)."""
    tests = stages["tests"]
    tests_rc = None if tests["status"] == "skipped" else int(tests["note"].split("pytest rc ")[1].split(";")[0])
    if tests_rc:
        return tests_rc
    if any(stages[s]["status"] in ("failed", "cut") for s in ("smoke-triton", "smoke-cuda")):
        return 3
    return 4 if tests_rc is None else 0


@needs_bash
def test_dry_run(tmp_path):
    _, summary, files, stages = _dry_run(tmp_path, DRY_TOTAL_S)
    assert stages["install"]["status"] == "skipped" and "dry run" in stages["install"]["note"]
    assert stages["tradeoffs"]["status"] == "skipped" and stages["tradeoffs"]["note"].startswith("not started: needs 999")
    # The first stages always start; a busy machine may leave no time for the later ones, and a stage
    # not started then says so (slow stages make a later one miss the deadline, never fail it).
    for name in ("env", "smoke-triton"):
        assert stages[name]["status"] != "skipped", (name, summary)
    for name in ("smoke-cuda", "bench-priority", "tests"):
        assert stages[name]["status"] != "skipped" or stages[name]["note"].startswith("not started: needs"), (name, summary)
    assert stages["smoke-cuda"]["status"] in ("unavailable", "skipped")
    assert stages["bench-grid"]["status"] in ("cut", "skipped")  # far more work than its limit
    if stages["memcheck"]["status"] != "skipped":
        assert stages["memcheck"]["status"] == "unavailable"
        assert "sanitizer unavailable on this machine (Device not supported)" in summary
    if stages["bench-priority"]["status"] == "ok":
        rows = list(csv.DictReader(io.StringIO(files["grid-priority.csv"])))
        assert rows and {r["git_commit"] for r in rows} == {FAKE_COMMIT[:12] + "+dirty"}
        assert {r["impl"] for r in rows} >= {"eager", "adapterkern-torch"}
        assert "headline (float32, grid-priority/compile.csv)" in summary
    if stages["tests"]["status"] == "ok":  # tests/test_backends.py, the dry selection
        assert re.search(r"tests: \d+ passed", summary) and "failed" not in summary.split("tests: ")[1].splitlines()[0], summary


@needs_bash
def test_dry_run_short_deadline(tmp_path):
    """A deadline shorter than the work: stages are cut to it, the rest not started, and the run ends in time."""
    _, summary, _, stages = _dry_run(tmp_path, 25)
    ran = [row for name, row in stages.items() if row["status"] != "skipped" and name != "finished"]
    assert any(int(row["grant_s"]) < int(row["planned_s"]) for row in ran), summary  # cut to the deadline
    assert any(row["note"].startswith("not started") for row in stages.values()), summary


# ------------------------------------------------------------------------------------------------
# smoke_check's checker: it must fail a backend that is wrong, and pass one that is right.
# ------------------------------------------------------------------------------------------------
def _smoke():
    spec = importlib.util.spec_from_file_location("smoke_check", ROOT / "benchmarks" / "smoke_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def _faulty(kind):
    """An adapterkern stand-in: backend 'torch' is the real one; 'faulty' is it, wrong in one way."""
    def op(x, w_down, b_down, w_up, b_up, *, backend, **kw):
        if backend == "torch":
            return adapterkern.bottleneck_adapter(x, w_down, b_down, w_up, b_up, backend="torch", **kw)
        if kind == "w_down grad":  # forward right, d w_down 5% off
            w = w_down * 1.0
            w.register_hook(lambda g: g * 1.05)
            return adapterkern.bottleneck_adapter(x, w, b_down, w_up, b_up, backend="torch", **kw)
        y = adapterkern.bottleneck_adapter(x, w_down, b_down, w_up, b_up, backend="torch", **kw)
        if kind == "last row":  # an offset bug at the end of the tensor
            return y + torch.zeros_like(y).index_fill_(0, torch.tensor([y.shape[0] - 1]), 0.1) * y.detach().abs().max()
        out = torch.empty_like(y)  # "unwritten": the last row never stored
        out[:-1] = y[:-1]
        return out

    return SimpleNamespace(bottleneck_adapter=op)


@pytest.mark.parametrize("kind", ["bfloat16", "float32+tf32"])
def test_smoke_reference_and_a_right_backend(kind):
    smoke = _smoke()
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    inp = smoke.make_inputs(40, 32, 8, dtype, torch.device("cpu"), torch.Generator().manual_seed(1))
    passed, detail = smoke.check_case(_faulty(None), "torch", inp, kind, chunk_rows=16)
    assert passed, detail
    # The streamed float64 reference itself: the torch backend in float32 (CPU: IEEE) is within rounding of it.
    inp32 = smoke.make_inputs(40, 32, 8, torch.float32, torch.device("cpu"), torch.Generator().manual_seed(2))
    y, grads = smoke.run_op(adapterkern, "torch", inp32)
    errors = smoke.errors_vs_float64(inp32, y, grads, chunk_rows=16)
    assert set(errors) == {"y", *smoke.GRAD_NAMES}
    assert all(finite and err < 1e-5 for err, finite in errors.values()), errors


@pytest.mark.parametrize("kind", ["bfloat16", "float32+tf32"])
@pytest.mark.parametrize("fault,caught", [("last row", "y"), ("unwritten", "non-finite"), ("w_down grad", "dw_down")])
def test_smoke_fails_a_wrong_backend(kind, fault, caught):
    smoke = _smoke()
    dtype = torch.bfloat16 if kind == "bfloat16" else torch.float32
    inp = smoke.make_inputs(40, 32, 8, dtype, torch.device("cpu"), torch.Generator().manual_seed(3))
    passed, detail = smoke.check_case(_faulty(fault), "faulty", inp, kind, chunk_rows=16)
    assert not passed, detail
    assert caught in detail.split("over the bound: ")[1], detail


def test_smoke_verdict_exit_codes_and_words():
    """gpu_check.sh keys on the verdict's word; the exit status says the same."""
    smoke = _smoke()

    def verdict(results):
        code, line = smoke.verdict("triton", results)
        return code, line.split()[2]

    assert verdict([("bfloat16", True), ("float32+tf32", True)]) == (smoke.EXIT_PASS, "PASS")
    assert verdict([("bfloat16", True), ("float32+tf32", None)]) == (smoke.EXIT_PASS, "PASS")  # out of memory
    assert verdict([("bfloat16", True), ("float32+tf32", False)]) == (smoke.EXIT_FP32_ONLY, "FAIL-FP32")
    assert verdict([("bfloat16", False), ("float32+tf32", True)]) == (smoke.EXIT_DROP, "FAIL")
