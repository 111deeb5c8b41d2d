"""The benchmark harness (adapterkern.bench) runs a one-point grid on the CPU and writes a well-formed CSV.

Only the harness's plumbing is checked here; no speed is asserted (timings depend on the machine).
"""
import csv
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from adapterkern.bench import cli, common, report

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--tokens", "4", "--hidden", "32", "--bottleneck", "8", "--mode", "fwd",
        "--dtype", "float32", "--impl", "adapterkern-torch", "--no-progress", "--min-run-time", "0.005",
        "--copy-mib", "1"]
KINDS = ("grid", "layer", "tradeoffs", "adapterdrop", "multi")  # every command that writes a CSV


def _run(tmp_path, *extra):
    path = tmp_path / "grid.csv"
    assert cli.main([*TINY, "--csv", str(path), "--no-plot", *extra]) == 0
    return path


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_default_outputs_are_git_ignored():
    """Every command's default CSV (and the PNG beside it) is git-ignored and untracked in this checkout, so
    ``make bench`` leaves ``git status`` clean; ``--reference`` names the tracked reference results."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    cpu = torch.device("cpu")
    paths = [p for kind in KINDS for p in (common.default_csv(kind, cpu), common.png_path(common.default_csv(kind, cpu)))]
    assert all(not os.path.isabs(p) for p in paths)
    # check-ignore (without --no-index) does not report a tracked file as ignored: each path must be both
    ignored = _git(ROOT, "check-ignore", *paths)
    assert ignored.returncode == 0 and set(ignored.stdout.split()) == set(paths), (ignored.stdout, ignored.stderr)
    assert common.default_csv("grid", cpu, reference=True) == os.path.join("benchmarks", "results", "grid-cpu.csv")
    assert not common.default_csv("grid", cpu).startswith(common.REFERENCE_DIR)


def test_grid_with_default_paths_writes_nothing_tracked(tmp_path, monkeypatch):
    """A grid run without --csv, in a repository with this project's .gitignore and tracked reference
    results, leaves ``git status --porcelain`` empty; ``--reference`` appends to the tracked file."""
    if shutil.which("git") is None:
        pytest.skip("git not installed")
    repo = tmp_path / "repo"
    (repo / "benchmarks" / "results").mkdir(parents=True)
    shutil.copy(ROOT / ".gitignore", repo / ".gitignore")
    reference = repo / common.default_csv("grid", torch.device("cpu"), reference=True)
    reference.write_text(",".join(report.COLUMNS) + "\n")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    for args in (["init", "-q"], ["add", "-A"],
                 ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false", "commit", "-qm", "x"]):
        assert _git(repo, *args).returncode == 0
    monkeypatch.chdir(repo)
    plot = ["--plot"] if _have_matplotlib() else ["--no-plot"]
    assert cli.main([*TINY, *plot]) == 0
    assert _git(repo, "status", "--porcelain", "--untracked-files=all").stdout == ""
    written = report.read_csv(common.default_csv("grid", torch.device("cpu")))
    assert sorted(r["impl"] for r in written) == ["adapterkern-torch", "eager"]
    if plot == ["--plot"]:
        assert Path(common.png_path(common.default_csv("grid", torch.device("cpu")))).is_file()

    assert cli.main([*TINY, "--no-plot", "--reference"]) == 0  # the deliberate act: the tracked file changes
    assert _git(repo, "status", "--porcelain").stdout.split() == ["M", str(reference.relative_to(repo))]
    assert len(report.read_csv(str(reference))) == 2
    with pytest.raises(SystemExit):  # one or the other
        cli.main([*TINY, "--reference", "--csv", str(tmp_path / "x.csv")])


def _have_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_one_point_grid_writes_wellformed_csv(tmp_path, capsys):
    path = _run(tmp_path)
    out = capsys.readouterr().out
    assert "adapterkern-torch" in out and "eager" in out  # the table was printed

    with open(path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        body = list(reader)
    assert header == report.COLUMNS
    assert all(len(line) == len(header) for line in body)
    rows = [dict(zip(header, line)) for line in body]
    assert sorted(r["impl"] for r in rows) == ["adapterkern-torch", "eager"]  # one row per implementation
    assert len({r["run_id"] for r in rows}) == 1
    for r in rows:
        assert (r["mode"], r["dtype"], r["device_type"]) == ("fwd", "float32", "cpu")
        assert (int(r["tokens"]), int(r["hidden"]), int(r["bottleneck"])) == (4, 32, 8)
        assert r["torch"] and r["date"] and r["device"]
        for key in report.NUMERIC:
            value = float(r[key])
            assert math.isfinite(value), (key, r[key])
        for key in ("median_us", "floor_bytes", "copy_GBps", "floor_us", "pct_of_floor", "achieved_GBps",
                    "speedup_vs_eager"):
            assert float(r[key]) > 0, (key, r[key])
        assert float(r["iqr_us"]) >= 0
        assert float(r["max_rel_err"]) < 1e-5  # same weights, same maths
        # floor bytes: read x + write y + weights, fp32 (see adapterkern.bench.grid)
        assert int(r["floor_bytes"]) == (2 * 4 * 32 + 2 * 8 * 32 + 8 + 32) * 4
    eager = next(r for r in rows if r["impl"] == "eager")
    assert float(eager["speedup_vs_eager"]) == pytest.approx(1.0)


def test_second_run_appends_without_second_header(tmp_path):
    path = _run(tmp_path)
    _run(tmp_path)
    rows = report.read_csv(str(path))
    assert len(rows) == 4 and len({r["run_id"] for r in rows}) == 2
    assert len(report.latest_run(rows)) == 2


def test_unknown_mode_is_rejected(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["--mode", "sideways", "--csv", str(tmp_path / "x.csv"), "--no-plot"])


def test_plot_from_csv(tmp_path):
    pytest.importorskip("matplotlib")
    from adapterkern.bench import plot

    path = _run(tmp_path)
    png = tmp_path / "grid.png"
    assert plot.main([str(path), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("sub", ["layer", "tradeoffs", "adapterdrop"])
def test_subcommands_skip_cleanly_without_transformers(monkeypatch, capsys, tmp_path, sub):
    from adapterkern.bench import models

    monkeypatch.setattr(models, "transformers_reason", lambda: "transformers is not importable (test)")
    assert cli.main([sub, "--csv", str(tmp_path / "x.csv")]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "transformers" in out
    assert not (tmp_path / "x.csv").exists()


def test_adapterdrop_runs_and_checks_its_outputs(tmp_path, capsys):
    pytest.importorskip("transformers")
    import csv

    path = tmp_path / "ad.csv"
    argv = ["adapterdrop", "--layers", "2", "--tasks", "2", "--drops", "0,1", "--seq", "8", "--rounds", "1",
            "--block-ms", "1", "--threads", "1", "--backend", "torch", "--csv", str(path)]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader(path.open()))
    assert [r["variant"] for r in rows] == ["loop (N passes)", "drop 0", "drop 1"]
    assert all(float(r["max_rel_diff"]) < 1e-5 and float(r["median_ms"]) > 0 for r in rows)
    assert "speed-up vs drop 0" in capsys.readouterr().out


def test_multi_runs_and_checks_its_outputs(tmp_path):
    import csv

    path = tmp_path / "multi.csv"
    argv = ["multi", "--adapters", "3", "--tokens", "96", "--hidden", "32", "--bottleneck", "8", "--rounds", "1",
            "--block-ms", "1", "--threads", "1", "--backend", "torch", "--csv", str(path)]
    assert cli.main(argv) == 0
    rows = list(csv.DictReader(path.open()))
    assert [(r["group"], r["variant"]) for r in rows] == [
        ("stack", "loop"), ("stack", "multi_adapter"), ("stack", "one adapter"),
        ("batch", "masked loop"), ("batch", "batched"), ("batch", "one adapter"),
        ("mix", "loop mix"), ("mix", "stack + einsum"), ("mix", "folded mix"), ("mix", "one adapter"),
        ("fusion", "eager fusion"), ("fusion", "adapterkern fusion"), ("fusion", "one adapter"),
    ]
    assert all(float(r["max_rel_diff"]) < 1e-5 for r in rows)
