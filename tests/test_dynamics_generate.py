"""``eigengap dynamics generate`` end to end on the smallest organism: the tables match their
schemas, the trajectories equal ``generate_trajectories`` called directly, the change-points equal
the detector's on each series, the plots and texts are written, and bad input is one line with
exit status 2 and nothing written."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from jobs import dynamics_generate as job
from jobs.cli import main
from jobs.registry import experiment
from spectral import tables
from spectral.dynamics.changepoints import change_points
from spectral.dynamics.generation import GenerationSettings, generate_trajectories
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import parse_spec

PROMPTS = ["Alice likes the", "The green cat sees", "Repeat: muv tep mus vux ryd | muv"]
STEPS = 8  # >= the detector's 6 points per series


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def cell(organism_cache, prompt_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("dyngen") / "cell"
    code = main(["dynamics", "generate", "--model", str(organism_cache), "--prompts", str(prompt_file),
                 "--max-new-tokens", str(STEPS), "--out", str(out)])
    assert code == 0
    return out


def test_tables_and_files(cell, organism):
    traj = pq.read_table(cell / job.RESULT_FILE)
    assert traj.schema.equals(tables.TRAJECTORIES)
    adapter = HeadAdapter(organism.model)
    heads = adapter.n_layers * adapter.n_heads
    texts = json.loads((cell / job.TEXTS_FILE).read_text())
    assert [t["text"] for t in texts] == PROMPTS
    assert traj.num_rows == sum(len(t["tokens"]) for t in texts) * heads
    assert all(t["generated"] == organism.tokenizer.decode(t["tokens"]) for t in texts)
    changes = pq.read_table(cell / job.CHANGES_FILE)
    assert changes.schema.equals(job.CHANGEPOINTS) and changes.num_rows == len(PROMPTS) * heads
    for name in ("gap_trajectories.png", "gap_steps_heatmap.png", "summary.md", "params.json"):
        assert (cell / name).stat().st_size > 0, name
    summary = (cell / "summary.md").read_text()
    assert "Caveat" in summary and "heads with a change-point" in summary
    params = json.loads((cell / "params.json").read_text())
    assert params["n_prompts"] == 3 and params["summary"]["n_heads"] == heads


def test_rows_equal_generate_trajectories_called_directly(cell, organism):
    direct = generate_trajectories(organism, PROMPTS, GenerationSettings(max_new_tokens=STEPS))
    written = pq.read_table(cell / job.RESULT_FILE)
    assert written.drop(["model"]).equals(direct.trajectories.drop(["model"]))
    texts = json.loads((cell / job.TEXTS_FILE).read_text())
    assert [t["tokens"] for t in texts] == direct.tokens


def test_change_points_are_the_detectors_on_each_series(cell):
    traj = pq.read_table(cell / job.RESULT_FILE).to_pylist()
    rows = pq.read_table(cell / job.CHANGES_FILE).to_pylist()
    for r in rows[::7]:
        series = sorted((t["step"], t["gap"]) for t in traj
                        if (t["prompt"], t["layer"], t["head"]) == (r["prompt"], r["layer"], r["head"]))
        steps, gap = np.array([s for s, _ in series]), np.array([g for _, g in series])
        assert r["n_steps"] == len(steps) and r["gap_change"] == pytest.approx(gap[-1] - gap[0])
        assert r["gap_range"] == pytest.approx(gap.max() - gap.min())
        if len(steps) < 6:
            assert not r["detected"] and r["n_changes"] is None
            continue
        cp = change_points(gap, steps)
        assert r["detected"] and r["n_changes"] == len(cp.indices)
        assert r["change_steps"] == ",".join(str(int(steps[i])) for i in cp.indices)


def test_the_registry_reads_the_cell(cell):
    record = experiment("dynamics_generate")
    data = record.load(cell)
    assert job.RESULT_FILE in data and job.CHANGES_FILE in data
    metrics, _ = record.metrics(cell)
    assert 0 <= metrics["changes/share_series"] <= 1 and metrics["series/prompts"] == 3
    assert record.cost({"n_prompts": 3, "max_new_tokens": 8}, None) > 0


def test_default_prompts_of_an_organism_are_its_episodes(organism_cache):
    prompts, source = job.default_prompts(parse_spec(str(organism_cache)), 4)
    assert len(prompts) == 4 and "organism episodes" in source and all(len(p.split()) >= 2 for p in prompts)
    demo, source = job.default_prompts(parse_spec("random:pythia-410m"), 3)
    assert len(demo) == 3 and source == "spectral/data/demo_prompts.txt"


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens: Input should be greater than 0"),
    (["--max-new-tokens", "-2"], "--max-new-tokens: Input should be greater than 0"),
    (["--prompts", "MISSING"], "does not exist"),
    (["--prompts", "EMPTY"], "is empty"),
    (["--layers", "9"], "--layers: layer 9 out of range"),
    (["--heads", "0,99"], "--heads: head 99 out of range"),
])
def test_bad_input_is_one_line_and_writes_nothing(organism_cache, tmp_path, capsys, argv, message):
    (tmp_path / "empty.txt").write_text("\n\n")
    argv = [{"MISSING": str(tmp_path / "missing.txt"), "EMPTY": str(tmp_path / "empty.txt")}.get(a, a) for a in argv]
    out = tmp_path / "bad"
    code = main(["dynamics", "generate", "--model", str(organism_cache), "--out", str(out), *argv])
    err = capsys.readouterr().err
    said = err.split("eigengap dynamics: error:")
    assert code == 2 and len(said) == 2 and message in said[1].splitlines()[0] and "Traceback" not in err, err
    assert len(said[1].strip().splitlines()) == 1 and not out.exists()


def test_report_section(cell, tmp_path):
    from types import SimpleNamespace

    from analysis.render.html import SECTIONS
    from jobs.dynamics_generate_section import section
    from jobs.registry import load_cell

    data = SimpleNamespace(cells=[(SimpleNamespace(kind="dynamics_generate", model="organism-xs"), cell),
                                  (SimpleNamespace(kind="scan", model="organism-xs"), cell)])
    s = section(data, tmp_path, load_cell)
    assert len(s.models) == 1 and s.models[0]["n_prompts"] == 3 and s.models[0]["generated_tokens"] > 0
    rows = pq.read_table(tmp_path / "dynamics_generate_models.parquet").to_pylist()
    params = json.loads((cell / "params.json").read_text())["summary"]
    assert rows[0]["share_series_with_change"] == pytest.approx(params["share_series_with_change"])
    assert (tmp_path / "dynamics_generate.png").stat().st_size > 0
    assert {"overview", "organism-xs/trajectories", "organism-xs/heatmap"} <= set(s.plots)
    render = dict((k, f) for k, _, f in SECTIONS)["dynamics_generate"]
    html = render(None, None, {"dynamics_generate": s})
    assert "series with a change-point" in html and html.count("<img") == 3
    assert "No dynamics_generate" in render(None, None, {})
