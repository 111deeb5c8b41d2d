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
KINDS = ("grid", "layer", "inference", "tradeoffs", "adapterdrop", "multi")  # every command that writes a CSV


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


@pytest.mark.parametrize("sub", ["layer", "inference", "tradeoffs", "adapterdrop"])
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


INFERENCE_TINY = ["inference", "--tiny", "--rounds", "1", "--generation-rounds", "1", "--block-ms", "1", "--threads", "1",
                  "--backend", "torch", "--dtype", "float32"]


def _inference_rows(path):
    rows = report.read_csv(str(path))
    points = {}
    for r in rows:
        points.setdefault((r["model"], r["placement"], r["part"], r["batch"], r["seq"], r["new_tokens"]), []).append(r)
    return rows, points


def test_inference_runs_every_variant_on_tiny_models(tmp_path, capsys):
    """``inference --tiny``: every model x placement x point has the four variants, finite overheads
    and FLOP ratios, and outputs that match the adapterkern model's (the optimised model's within
    float32 rounding; the no-adapter model's do not: the adapters are not the identity)."""
    pytest.importorskip("transformers")
    path = tmp_path / "inference.csv"
    assert cli.main([*INFERENCE_TINY, "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "optimize_for_inference report" in out
    rows, points = _inference_rows(path)
    from adapterkern.bench import inference

    assert list(rows[0]) == inference.COLUMNS and len({r["run_id"] for r in rows}) == 1
    assert {(m, pl, part) for m, pl, part, *_ in points} == {
        (m, pl, part) for m in ("bert-tiny", "llama-tiny") for pl in ("parallel", "pfeiffer")
        for part in (("latency", "generation") if m == "llama-tiny" else ("latency",))
    }
    assert len(points) == 2 * 2 * 2 + 2 * 2  # 2 latency points per model and placement, 2 generation points for llama
    for key, group in points.items():
        assert [r["variant"] for r in group] == ["no adapter", "eager adapter", "adapterkern adapter", "optimised"], key
        for r in group:
            assert float(r["median_ms"]) > 0 and float(r["iqr_ms"]) >= 0
            for column in ("overhead_pct", "flop_ratio_pct", "ffn_flop_ratio_pct"):
                assert math.isfinite(float(r[column])), (key, column, r[column])
            adapted = r["variant"] != "no adapter"
            assert (float(r["flop_ratio_pct"]) > 0) == adapted and int(r["bottleneck"]) == 4
            if adapted:  # one place (4·d·r) over one FFN: BERT 2 linears d x i, Llama 3 (gate, up, down)
                d, i, linears = 64, int(r["intermediate"]), 3 if key[0] == "llama-tiny" else 2
                assert float(r["ffn_flop_ratio_pct"]) == pytest.approx(100 * 4 * d * 4 / (linears * 2 * d * i))
            if r["part"] == "latency":
                diff = float(r["max_rel_diff"])  # against the adapterkern model's output
                if adapted:
                    assert diff < 1e-4, (key, r["variant"], diff)
                else:
                    assert diff > 1e-4, (key, diff)  # the adapters change the output
                assert r["tokens_per_s"] == ""
            else:
                assert float(r["tokens_per_s"]) > 0 and 0 <= float(r["same_tokens_pct"]) <= 100
                assert int(r["new_tokens"]) == 3 and int(r["seq"]) == 4


def test_inference_without_the_optimiser_skips_that_variant_with_a_note(tmp_path, monkeypatch, capsys):
    pytest.importorskip("transformers")
    import adapterkern

    monkeypatch.delattr(adapterkern, "optimize_for_inference", raising=False)
    path = tmp_path / "inference.csv"
    argv = [*INFERENCE_TINY, "--models", "bert", "--placements", "parallel", "--batches", "1x4", "--csv", str(path)]
    assert cli.main(argv) == 0
    assert "optimize_for_inference is not in this checkout" in capsys.readouterr().out
    rows, _ = _inference_rows(path)
    assert [r["variant"] for r in rows] == ["no adapter", "eager adapter", "adapterkern adapter"]


def test_inference_flop_model_counts_the_shapes():
    """The FLOP model of BERT-tiny (d = 64, FFN 4d, r = 4): a parallel adapter beside the FFN is r/(4d)
    of its FLOPs; against the whole forward, 4·d·r per token over 24·d² per token plus 4·S²·d of attention."""
    pytest.importorskip("transformers")
    from adapterkern.bench import inference_models as im

    base = im.build_backbone(im.BERT_TINY, torch.device("cpu"), torch.float32)
    fused = im.with_adapterkern(base, "parallel", 16, "relu", "torch")
    flops = im.flop_model(im.BERT_TINY, base, fused)
    d, r, s = 64, 4, 8
    assert flops.ffn_ratio_pct() == pytest.approx(100 * r / (4 * d))
    assert flops.forward(1, s) == s * 24 * d * d + 4 * s * s * d
    assert flops.forward_ratio_pct(1, s) == pytest.approx(100 * s * 4 * d * r / (s * 24 * d * d + 4 * s * s * d))
    eager = im.eager_twin(fused)
    ids = torch.randint(3, 128, (2, s))
    forward = im.hidden_states(im.BERT_TINY)
    with torch.no_grad():
        assert im.relative_difference(forward(eager, ids), forward(fused, ids)) < 1e-5
        assert im.relative_difference(forward(base, ids), forward(fused, ids)) > 1e-4


LAYER_TINY = ["layer", "--tiny", "--rounds", "1", "--block-ms", "1", "--threads", "1", "--backend", "torch",
              "--dtype", "float32"]


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_layer_runs_every_variant_on_tiny_layers(tmp_path, capsys, mode):
    """``layer --tiny``: every model x placement x point has its variants (forward: the optimised one
    too, within float32 rounding of the adapterkern layer; the no-adapter layer is not: the adapters are
    not the identity), and no note of a failed point."""
    pytest.importorskip("transformers")
    from adapterkern.bench import layer

    path = tmp_path / "layer.csv"
    assert cli.main([*LAYER_TINY, "--mode", mode, "--csv", str(path)]) == 0
    out = capsys.readouterr().out
    assert "failed" not in out and "differs" not in out, out
    rows = report.read_csv(str(path))
    assert list(rows[0]) == layer.COLUMNS
    points = {}
    for r in rows:
        points.setdefault((r["model"], r["placement"], r["batch"], r["seq"]), []).append(r)
    assert set(points) == {(m, pl, "1", s) for m in ("bert-tiny", "llama-tiny") for pl in ("pfeiffer", "parallel")
                           for s in ("1", "8")}
    expected = ["no adapter", "eager adapter", "adapterkern adapter"] + (["optimised"] if mode == "fwd" else [])
    for key, group in points.items():
        assert [r["variant"] for r in group] == expected, key
        for r in group:
            assert float(r["median_ms"]) > 0 and math.isfinite(float(r["overhead_pct"]))
            diff = float(r["max_rel_diff"])
            assert diff > 1e-4 if r["variant"] == "no adapter" else diff < 1e-5, (key, r["variant"], diff)
