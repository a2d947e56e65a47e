"""results_runs.py end to end on the digits smoke suite: parallel runs, kept runs, the tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.accuracy import results_runs


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/results/ lands here
    monkeypatch.setattr(results_runs, "RESULTS_DIR", tmp_path / "results")
    return tmp_path


def test_digits_smoke_suite_runs_in_parallel_and_tabulates(in_tmp, capsys):
    argv = ["--suite", "digits-smoke", "--parallel", "2", "--threads", "1"]
    results_runs.main([*argv, "--methods", "lsq"])  # BWRF rows: not trained, not shown
    (table_json,) = (in_tmp / "results").glob("results_table_digits-smoke_*.json")
    rows = json.loads(table_json.read_text())
    assert sorted(r["run"] for r in rows) == ["fp", "lsq_w2a2", "lsq_w3a3", "lsq_w4a4"]
    results_runs.main([*argv, "--methods", "lsq", "bwrf"])  # the LSQ runs kept, not retrained
    out = capsys.readouterr().out
    assert out.count("done before, kept") == 4
    rows = json.loads(table_json.read_text())
    assert len(rows) == 7 and {r["run"] for r in rows} >= {"bwrf_w2a2", "bwrf_w4a4"}
    for r in rows:  # each row's records were copied beside the table
        assert (in_tmp / "results" / "runs" / "digits-smoke" / r["run"] / "metrics.jsonl").is_file()
    markdown = table_json.with_suffix(".md").read_text()
    paired = [line for line in markdown.splitlines() if line.startswith("| digits") and
              line.count("|") == 9]  # fmt: skip
    assert len(paired) == 3  # BWRF − LSQ for each bit width
    by_run = {r["run"]: r["final"]["acc"] for r in rows}
    expected = by_run["bwrf_w2a2"] - by_run["lsq_w2a2"]
    assert any(f"{expected:+.2f}" in line and "W2A2 | BWRF − LSQ" in line for line in paired)
    # One more method at one bit width: LSQ+KD is BWRF without branches, paired with LSQ too
    results_runs.main([*argv, "--methods", "lsq_kd", "--bits", "2"])
    rows = json.loads(table_json.read_text())
    assert len(rows) == 8 and "lsq_kd_w2a2" in {r["run"] for r in rows}
    (kd,) = [r for r in rows if r["run"] == "lsq_kd_w2a2"]
    assert "--method bwrf --branches none" in kd["command"] and kd["args"]["branches"] == []
    expected = kd["final"]["acc"] - by_run["lsq_w2a2"]
    markdown = table_json.with_suffix(".md").read_text()
    assert f"W2A2 | LSQ+KD − LSQ | 1 | 1 | {expected:+.2f}" in markdown
    # A fresh clone has the kept records but no runs/: --table-only tabulates those
    shutil.rmtree(in_tmp / "runs")
    results_runs.main([*argv, "--table-only"])
    assert json.loads(table_json.read_text()) == rows


def test_multi_epoch_suite_plots_per_epoch_curves(in_tmp):
    results_runs.main(["--suite", "digits-smoke", "--epochs-qat", "2", "--methods", "bwrf",
                       "--threads", "1"])  # fmt: skip
    (table_md,) = (in_tmp / "results").glob("results_table_digits-smoke_*.md")
    (curves,) = (in_tmp / "results").glob("results_digits-smoke_curves_*.png")
    assert f"]({curves.name})" in table_md.read_text()
    history = (in_tmp / "results" / "runs" / "digits-smoke" / "bwrf_w2a2" / "metrics.jsonl")
    assert len(history.read_text().splitlines()) == 2  # the curve's two epochs


def test_suite_from_scratch_has_no_fp_run(in_tmp):
    results_runs.main(["--suite", "digits-scratch-smoke", "--threads", "1", "--parallel", "2"])
    (table_json,) = (in_tmp / "results").glob("results_table_digits-scratch-smoke_*.json")
    rows = {r["run"]: r for r in json.loads(table_json.read_text())}
    assert sorted(rows) == ["e2e", "k2"]  # no FP run: both methods start from scratch
    assert not (in_tmp / "runs" / "results" / "digits-scratch-smoke" / "fp").exists()
    assert all("--init-from" not in r["command"] for r in rows.values())
    assert rows["e2e"]["variant"] == "e2e" and rows["k2"]["args"]["method"] == "contsup"
    expected = rows["k2"]["final"]["acc"] - rows["e2e"]["final"]["acc"]
    assert f"| FP | ContSup K=2 − E2E | 1 | 1 | {expected:+.2f} |" in (
        table_json.with_suffix(".md").read_text()
    )


def test_every_suite_names_weights_that_exist():
    """The start and teacher weights each suite passes to bwrf-train (a wrong path only fails
    when the run starts, hours into a queue)."""
    shared = results_runs.default_shared_dir() / "weights"
    if not shared.is_dir():
        pytest.skip(f"no ../shared/weights at {shared} (a user's machine)")
    for name, spec in results_runs.suites().items():
        options = [*(spec.fp or []), *spec.options]
        options += [o for v in spec.variants.values() for o in v.options]
        paths = [options[i + 1] for i, o in enumerate(options)
                 if o in ("--init-from", "--teacher-from")]  # fmt: skip
        for path in paths:
            assert Path(path).is_file(), f"suite {name}: {path}"
