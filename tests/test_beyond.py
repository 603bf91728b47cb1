"""Beyond the gap over a sweep run: ``eigengap predict-importance`` and the report's section on a
synthetic run whose key_raw gap determines importance exactly (baselines are noise), and bad
input as one line with exit status 2."""

import json

import pytest

from cluster.store import read_parquet
from jobs import report
from jobs.beyond import AGREEMENT_TABLES, TABLES
from jobs.cli import main
from tests.synthetic_runs import SIZES, make_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("beyond") / "run", SIZES, seeds=(0, 1, 2), features=True)


def test_predict_importance_finds_the_planted_feature(run_dir, tmp_path, capsys):
    out = tmp_path / "predict"
    assert main(["predict-importance", str(run_dir), "--out", str(out), "--resamples", "60",
                 "--permutations", "400"]) == 0
    printed = capsys.readouterr().out
    for name, (_, schema) in {**TABLES, **AGREEMENT_TABLES}.items():
        read_parquet(out / name, schema)
    verdicts = {(r["target"], r["key"]): r for r in read_parquet(out / "feature_verdicts.parquet",
                                                                 TABLES["feature_verdicts.parquet"][1]).to_pylist()}
    assert verdicts[("importance", "spectral_feature_beats_baseline")]["verdict"] == "PASS"
    folds = read_parquet(out / "feature_folds.parquet", TABLES["feature_folds.parquet"][1]).to_pylist()
    assert {f["best_spectral"] for f in folds if f["target"] == "importance"} <= {
        "key_raw.gap", "key_raw.instability"}  # chosen on the other populations, exact predictors
    assert "importance / spectral_feature_beats_baseline (leave-one-population-out): PASS" in printed
    assert (out / "predict.md").read_text().startswith("# Beyond the gap")


def test_only_chosen_features(run_dir, tmp_path):
    out = tmp_path / "p2"
    assert main(["predict-importance", str(run_dir), "--out", str(out), "--features", "probs", "--resamples", "20",
                 "--permutations", "200"]) == 0
    rows = read_parquet(out / "feature_prediction.parquet", TABLES["feature_prediction.parquet"][1]).to_pylist()
    assert {r["feature"] for r in rows if r["group"] == "spectral" and r["target"] == "importance"} == {
        f"probs.{m}" for m in ("gap", "instability", "lambda3_ratio", "entropy", "effective_rank",
                               "participation_ratio", "stable_rank", "condition_number", "lambda1_share")}


def test_report_has_the_section(run_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "BEYOND_PERMUTATIONS", 400)
    out = tmp_path / "report"
    report.run(run_dir, out, echo=lambda *a: None, n_resamples=40, n_permutations=200, track=False)
    page = (out / "report.html").read_text()
    assert "Beyond the gap" in page and "key_captures_presoftmax" in page
    facts = json.loads((out / "summary.json").read_text())
    assert facts["verdicts"]["beyond/importance/spectral_feature_beats_baseline"] == "PASS"
    assert (out / "beyond_importance.png").stat().st_size > 0


@pytest.mark.parametrize("args, message", [
    (["--features", "key_raw.nonsense"], "unknown feature"),
    (["--features", "no_such_kernel"], "unknown feature"),
])
def test_bad_input(run_dir, tmp_path, capsys, args, message):
    assert main(["predict-importance", str(run_dir), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_a_run_without_features_cells_is_refused(tmp_path, capsys):
    plain = make_run(tmp_path / "plain", SIZES[:2], seeds=(0, 1))
    assert main(["predict-importance", str(plain)]) == 2
    assert "no finished features cell" in capsys.readouterr().err
    assert main(["predict-importance", str(tmp_path / "nowhere")]) == 2
    assert "not a sweep run" in capsys.readouterr().err


def test_other_hold_outs(run_dir, tmp_path):
    """Leave one family out (every synthetic model is gpt_neox: one group, no verdict) and leave
    one model out with whole groups resampled."""
    out = tmp_path / "fam"
    assert main(["predict-importance", str(run_dir), "--out", str(out), "--hold-out", "family", "--resamples", "20",
                 "--permutations", "200", "--features", "key_raw"]) == 0
    rows = read_parquet(out / "feature_verdicts.parquet", TABLES["feature_verdicts.parquet"][1]).to_pylist()
    assert {r["verdict"] for r in rows} == {"INCONCLUSIVE"} and all("nothing to hold out" in r["note"] for r in rows)
    out = tmp_path / "mod"
    assert main(["predict-importance", str(run_dir), "--out", str(out), "--hold-out", "model", "--replicate", "group",
                 "--resamples", "40", "--permutations", "200", "--features", "key_raw", "probs"]) == 0
    rows = read_parquet(out / "feature_verdicts.parquet", TABLES["feature_verdicts.parquet"][1]).to_pylist()
    first = next(r for r in rows if r["target"] == "importance" and r["key"] == "spectral_feature_beats_baseline")
    assert first["hold_out"] == "model" and first["n_groups"] == 12 and first["verdict"] == "PASS"
