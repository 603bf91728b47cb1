"""The report's training-dynamics section on a synthetic sweep run (2 populations x 3 seeds, one
dynamics_train cell per seed): every head's gap shifts 3 checkpoints before the ICL score drops;
the verdict PASSes in both populations (Holm over the two); the training loss falls smoothly (no early
transient), so the verdict beyond the loss is written too; its tables, figure and page are written."""

import json

import numpy as np
import pytest

from cluster.store import read_parquet
from jobs import dynamics_train as job
from jobs import report
from spectral import tables
from spectral.dynamics.changepoints import log_step
from tests.synthetic_runs import SIZES, conforming, finish, make_run

STEPS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 13, 17, 22, 29, 38, 49, 63, 82, 106, 138, 178, 231, 300, 388, 503, 652, 845,
         1096, 1420, 1840]
"""organism-xs's 30 checkpoint steps."""
LEAD = 3
"""Checkpoints by which the gaps change before the ICL score."""


def write_cell(unit, model: str, population: str, seed: int, rng) -> None:
    """A dynamics_train cell: ICL score 0 -> -4 at a checkpoint in 15..20, 4 heads' gaps +3 noise
    SDs (0.1) three checkpoints earlier, each series with unit-SD-scaled noise."""
    t = int(rng.integers(15, 21))
    x = log_step(STEPS)
    icl = np.where(np.arange(30) >= t, -4.0, 0.0) + rng.normal(0, 0.1, 30)
    base = dict(population=[population] * 30, seed=[seed] * 30, model=[model] * 30, step=STEPS, log_step=x)
    rows = conforming(dict(base, checkpoint=[f"step-{s}" for s in STEPS], icl_score=icl,
                           train_loss=6 - np.log10(np.array(STEPS)) + rng.normal(0, 0.05, 30),
                           icl_form=["organism"] * 30), tables.DYNAMICS_CHECKPOINTS)
    from cluster.store import write_parquet

    write_parquet(rows, unit / job.CHECKPOINTS_FILE, tables.DYNAMICS_CHECKPOINTS)
    heads = {k: [] for k in ("population", "seed", "model", "step", "log_step", "layer", "head", "gap")}
    for h in range(4):
        gap = 0.2 + np.where(np.arange(30) >= t - LEAD, 0.3, 0.0) + rng.normal(0, 0.1, 30)
        for i in range(30):
            for k, v in (("population", population), ("seed", seed), ("model", model), ("step", STEPS[i]),
                         ("log_step", x[i]), ("layer", h // 2), ("head", h % 2), ("gap", gap[i])):
                heads[k].append(v)
    write_parquet(conforming(heads, tables.DYNAMICS_HEADS), unit / job.HEADS_FILE, tables.DYNAMICS_HEADS)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamics_train")
    run_dir = make_run(root / "run", SIZES[:2], seeds=(0, 1, 2), steer=False)
    sweep = json.loads((run_dir / "sweep.json").read_text())
    sweep["config"]["experiments"].append({"kind": "dynamics_train", "params": {}})
    (run_dir / "sweep.json").write_text(json.dumps(sweep))
    rng = np.random.default_rng(11)
    for model_dir in sorted(run_dir.glob("model=*")):
        model = json.loads((model_dir / "model.json").read_text())["model"]
        population, _, seed = model.partition("?seed=")
        unit = model_dir / "experiment=1-dynamics_train"
        write_cell(unit, model, population, int(seed or 0), rng)
        finish(unit, model, 1, "dynamics_train")
    out = root / "report"
    report.run(run_dir, out, echo=lambda *a: None, n_resamples=60, n_permutations=200, track=False)
    return out


def test_planted_lead_passes_in_both_populations(out):
    facts = json.loads((out / "summary.json").read_text())["verdicts"]
    assert facts["organism-xs/dynamics/spectral_changes_precede_icl"] == "PASS"
    assert facts["organism-s/dynamics/spectral_changes_precede_icl"] == "PASS"
    verdicts = read_parquet(out / "dynamics_train_verdicts.parquet", tables.REPORT_DYNAMICS_VERDICTS).to_pylist()
    main = [r for r in verdicts if r["key"] == "spectral_changes_precede_icl"]
    assert len(main) == 2 and all(r["k"] == 3 and r["high"] < 0 for r in main)
    beyond = [r for r in verdicts if r["key"] == "spectral_changes_precede_icl_beyond_loss"]
    assert len(beyond) == 2 and all("Holm over 2 population" in r["correction"] for r in beyond)
    assert facts["organism-xs/dynamics/spectral_changes_precede_icl_beyond_loss"] == beyond[0]["verdict"]
    assert len([r for r in verdicts if r["key"] == "control_loss_lag"]) == 2
    assert all("Holm over 2 population" in r["correction"] for r in main)
    # 3 checkpoints of the log-spaced grid around steps 20-100: about 0.3-0.4 decades
    assert all(-0.6 < r["value"] < -0.2 for r in main)


def test_tables_figure_and_page(out):
    models = read_parquet(out / "dynamics_train_models.parquet", tables.REPORT_DYNAMICS_MODELS).to_pylist()
    gap = [m for m in models if m["metric"] == "gap"]
    assert len(gap) == 6 and all(m["n_heads"] == 4 and m["n_precede"] >= 3 for m in gap)
    assert (out / "dynamics_train_lags.png").stat().st_size > 0
    page = (out / "report.html").read_text()
    assert "Training dynamics" in page and "spectral_changes_precede_icl" in page
    assert "spectral_changes_precede_icl_beyond_loss" in page and "control_loss_lag" in page
    assert "heads with a late gap change" in page
