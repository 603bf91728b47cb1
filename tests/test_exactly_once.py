"""Exactly once: a sweep killed between a cell's result files and its marker (``cell.json``)
reruns that cell on resume, and every cell is then reported finished exactly once - in the
Parquet results, in the report and in MLflow.

The fault is real: the sweep runs in its own process, and the process is killed (``os._exit``,
no cleanup, no exception handlers) at the moment it is about to write the marker of its second
cell, after that cell's job has written every result file."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

from cluster.layout import Cell, RunLayout
from jobs.cli import main

KILLED = 97

INJECT = """
import os, sys
import jobs.sweep as sweep
from cluster.layout import RunLayout

real = sweep.write_json
def write_json(obj, path):
    if path.name == RunLayout.DONE and path.parent.name.startswith("experiment=1-"):
        assert any(path.parent.glob("*.parquet")), "the fault must come after the results"
        os._exit({killed})  # killed between the two writes
    return real(obj, path)
sweep.write_json = write_json
sys.exit(sweep.main(sys.argv[1:]))
"""


def mlflow_children(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("eigengap")
    return [r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" in r.data.tags]


def test_a_cell_killed_before_its_marker_is_rerun_and_counted_once(organism_cache, prompts_file, tmp_path, capsys):
    model = str(organism_cache)
    config = tmp_path / "s.yaml"
    config.write_text(yaml.safe_dump({"name": "once", "models": [model], "experiments": [
        {"kind": "scan", "params": {"prompts": str(prompts_file)}},
        {"kind": "patch", "params": {"task": "ioi", "n_examples": 8}}]}))
    out = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, "-c", INJECT.format(killed=KILLED), str(config), "--out", str(out)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == KILLED, killed.stderr[-2000:]

    layout = RunLayout(out / "once")
    scan_cell, patch_cell = Cell(model, 0, "scan"), Cell(model, 1, "patch")
    assert layout.finished(scan_cell)
    assert not layout.finished(patch_cell) and (layout.cell_dir(patch_cell) / "patch.parquet").is_file()

    # resume: the unfinished cell (results, no marker) is run again; the finished one is not
    stamp = layout.marker(scan_cell).stat().st_mtime_ns
    assert main(["sweep", str(config), "--out", str(out)]) == 0
    assert "1 of 2 cells already done" in capsys.readouterr().out
    assert layout.marker(scan_cell).stat().st_mtime_ns == stamp
    assert layout.finished(patch_cell)

    # Parquet: each cell's rows once
    from jobs.sweep import results

    patched = results(layout.root, "patch.parquet")
    assert patched["cell"].unique().to_pylist() == [patch_cell.name]
    assert patched.num_rows == len({(r["layer"], r["head"]) for r in patched.to_pylist()}) == 2 * 8
    assert results(layout.root, "scan.parquet").num_rows == 2 * 8

    # MLflow: one child run per cell
    children = mlflow_children(f"sqlite:///{layout.mlflow_db.resolve()}")
    assert sorted(r.data.tags["eigengap.cell"] for r in children) == sorted([scan_cell.name, patch_cell.name])

    # the report: both cells found once, none missing or unfinished
    from analysis.crossmodel import load_run
    from jobs.report import load_cell

    data = load_run(layout.root, load_cell)
    assert data.found == [f"{model}: experiment 0 (scan)", f"{model}: experiment 1 (patch)"]
    assert not [m for m in data.missing if "not finished" in m or "not run" in m]


def test_a_run_directory_of_an_older_eigengap_is_refused_not_rerun(prompts_file, tmp_path, capsys):
    """Cells marked by the old ``unit.json``: resume, track and report refuse with one line, and
    nothing in the directory is touched (rerunning would overwrite the old results)."""
    config = tmp_path / "s.yaml"
    model = "random:pythia-410m?layers=2&hidden=64&heads=4&vocab=512"
    config.write_text(yaml.safe_dump({"name": "old", "models": [model],
                                      "experiments": [{"kind": "scan", "params": {"prompts": str(prompts_file)}}]}))
    run_dir = tmp_path / "runs" / "old"
    cell = RunLayout(run_dir).cell_dir(Cell(model, 0, "scan"))
    cell.mkdir(parents=True)
    (run_dir / "sweep.json").write_text("{}")
    (cell / "unit.json").write_text("{}")
    (cell / "scan.parquet").write_text("old results")
    for argv in (["sweep", str(config), "--out", str(tmp_path / "runs")], ["track", str(run_dir)],
                 ["report", str(run_dir)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "written by an older eigengap" in err[0] and "unit.json" in err[0]
    assert (cell / "scan.parquet").read_text() == "old results" and (cell / "unit.json").is_file()
