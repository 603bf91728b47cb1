"""``eigengap report``: cross-model report over synthetic sweep runs whose answers are known.

The runs (``tests/synthetic_runs.py``) have the sweep's layout and the result schemas of the
validate and steer jobs, with populations of seeds (``organism-s``, ``organism-s?seed=1``).
Importance is constructed to be high exactly for gap <= 0.49, so every calibrated threshold
lies near 0.49 and "0.77 holds" must FAIL; each model's minimum gap is an exact power of its
parameter count, so the power-law fit over the populations' means must recover it.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis.crossmodel import ALL, CROSS_POPULATION_METRICS, ENTROPY, MI_HEADS, POPULATION_METRICS, RULE
from cluster.store import read_parquet
from jobs import report
from spectral import tables
from spectral.errors import UsageError
from tests.synthetic_runs import MIN_GAP, POSITIVE_GAP, SIZES, make_run

FAST = {"n_resamples": 200, "n_permutations": 100}
SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(run dir, report dir, echoed lines) of the 4-population x 3-seed run, reported once."""
    run_dir = make_run(tmp_path_factory.mktemp("sweeps") / "four", seeds=SEEDS)
    lines: list[str] = []
    page = report.run(run_dir, echo=lines.append, **FAST)
    return run_dir, page.parent, lines


def _verdicts(out: Path) -> list[dict]:
    return read_parquet(out / "verdicts.parquet", tables.REPORT_VERDICTS).to_pylist()


# --- the 4-population run --------------------------------------------------------------

def test_thresholds_calibrate_near_the_constructed_gap_and_077_fails(four):
    run_dir, out, lines = four
    cal = read_parquet(out / "calibration.parquet", tables.REPORT_CALIBRATION).to_pylist()
    heads = [r for r in cal if r["target"] == "heads"]
    assert len(heads) == 4 * len(SEEDS)
    assert {(r["population"], r["seed"]) for r in heads} == {(s[0], k) for s in SIZES for k in SEEDS}
    for r in heads:  # important = gap <= 0.49 exactly: the Youden threshold is the largest positive gap
        assert r["threshold"] == pytest.approx(POSITIVE_GAP)
        assert r["auroc"] == pytest.approx(1.0)
    by = {(r["population"], r["key"]): r for r in _verdicts(out)}
    assert by[(ALL, "threshold_holds_heads")]["verdict"] == "FAIL"
    assert by[(ALL, "threshold_holds_layers")]["verdict"] == "FAIL"
    assert by[(ALL, "threshold_stable_heads")]["verdict"] == "PASS"  # every population: 0.49
    for s in SIZES:
        row = by[(s[0], "threshold_heads")]
        assert row["verdict"] == "FAIL" and row["value"] == pytest.approx(POSITIVE_GAP)
        assert row["n_seeds"] == 3 and row["seeds"] == "0, 1, 2"
        assert row["correction"].startswith("Holm over 4 population(s)")
    counts = {v: sum(r["verdict"] == v for r in _verdicts(out)) for v in ("PASS", "FAIL", "INCONCLUSIVE")}
    facts = json.loads((out / "summary.json").read_text())["verdicts"]  # every section's (here: the core's only)
    assert counts == {v: sum(x == v for x in facts.values()) for v in counts}
    assert lines[0] == (f"wrote {out / 'report.html'} (4 populations of 12 models; verdicts of every section: "
                        f"{counts['PASS']} PASS, "
                        f"{counts['FAIL']} FAIL, {counts['INCONCLUSIVE']} INCONCLUSIVE)")
    assert lines[1:] == [f"not logged to MLflow: {run_dir} has no tracked parent run "
                         f"(run `eigengap track {run_dir}` first)"]  # a synthetic run that no sweep tracked


def test_verdict_table_states_seeds_units_scheme_and_correction(four):
    _, out, _ = four
    rows = _verdicts(out)
    keys = {(r["population"], r["key"]) for r in rows}
    assert keys == {(s[0], k) for s in SIZES for k in POPULATION_METRICS} | {(ALL, k) for k in CROSS_POPULATION_METRICS}
    assert {r["verdict"] for r in rows} <= {"PASS", "FAIL", "INCONCLUSIVE"}
    assert set(pq.read_table(out / "verdicts.parquet").column_names) >= {
        "population", "key", "metric", "n_seeds", "seeds", "unit", "n_units", "groups", "value", "low", "high",
        "per_seed", "same_sign", "target", "p_pass_holm", "p_fail_holm", "verdict", "scheme", "correction", "note"}
    for r in rows:
        assert r["scheme"] and r["correction"], r
    by = {(r["population"], r["key"]): r for r in rows}
    r = by[("organism-m", "restoration_difference")]
    assert r["n_units"] == "64" and r["unit"] == "heads"  # 8 layers x 8 heads, both seeds
    assert r["groups"].startswith("unstable/stable heads per seed: ")
    assert r["scheme"].startswith("3 seeds: mean ± t(2) x SD/sqrt(3) of the seeds' values; per seed: value ± t(df)")
    assert "hierarchical bootstrap seeds -> heads -> examples (200)" in r["scheme"]  # beside it, not the verdict's
    assert np.isfinite(r["hier_low"]) and np.isfinite(r["hier_high"]) and r["hier_low"] < r["value"] < r["hier_high"]
    assert by[("organism-xs", "steering_difference")]["unit"] == "prompts"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rule"] == RULE
    detail = summary["verdict_details"]["organism-m/restoration_difference"]
    assert detail["n_seeds"] == 3 and detail["correction"].startswith("Holm over 4")
    assert summary["populations"]["organism-s"] == {"seeds": [0, 1, 2], "models": ["organism-s", "organism-s?seed=1", "organism-s?seed=2"],
                                                    "listed": ["organism-s", "organism-s?seed=1", "organism-s?seed=2"]}
    assert summary["missing"] == []
    assert summary["verdicts"]["organism-m/spectral_vs_random"] == "PASS"  # effect 2 vs 1 over 3 seeds x 8 prompts
    page = (out / "report.html").read_text()
    assert page.count("Rule (every verdict)") == 2  # verdicts and populations sections
    assert "Holm" in page and "earlier study" not in page  # the steer rows' "r = 0.61" note is not copied


def test_scaling_recovers_an_exact_power_law_over_population_means(four):
    _, out, _ = four
    rows = read_parquet(out / "scaling.parquet", tables.REPORT_SCALING).to_pylist()
    fit = next(r for r in rows if (r["quantity"], r["predictor"], r["kind"]) == ("min_gap", "parameters", "power"))
    assert fit["n"] == 4 and fit["exploratory"]
    assert fit["b"] == pytest.approx(MIN_GAP[1], abs=1e-9)
    assert fit["a"] == pytest.approx(MIN_GAP[0] * 1e6 ** -MIN_GAP[1], rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert "Exploratory" in (out / "report.html").read_text()


def test_information_and_files(four):
    _, out, _ = four
    info = read_parquet(out / "information.parquet", tables.REPORT_INFORMATION).to_pylist()
    mi = next(r for r in info if r["level"] == ALL and r["measure"] == MI_HEADS)
    assert mi["n"] == sum(s[2] * s[3] for s in SIZES) * len(SEEDS) and mi["value"] > mi["null_p95"]
    assert mi["n_strata"] == 4 * len(SEEDS) and mi["n_permutations"] == FAST["n_permutations"]
    assert np.isfinite(mi["mc_error"]) and np.isfinite(mi["p_holm"])
    entropy = next(r for r in info if r["level"] == "model" and r["model"] == "organism-s" and r["measure"] == ENTROPY)
    assert entropy["value"] > 0  # entropy = 2 - gap: unstable heads have more
    assert "Holm over 12" in entropy["family"]
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "summary.json", "verdicts.parquet", "calibration.parquet", "scaling.parquet",
            "information.parquet", "correlations.parquet", "gap_vs_importance.png", "steering_by_layer.png",
            "scaling.png", "generalization.png", "entropy_by_stability.png", "gap_landscape_0.png"} <= names


# --- degenerate runs -------------------------------------------------------------------

def test_single_model_is_one_model_and_has_no_scaling_fit(tmp_path):
    run_dir = make_run(tmp_path / "one", [("tiny<model>", 1e6, 4, 8, 64, 16)], seeds=(0,))
    page = report.run(run_dir, echo=lambda *a: None, **FAST)
    summary = json.loads((page.parent / "summary.json").read_text())
    reason = "scaling fits need at least 3 populations with size facts; this run has 1"
    assert summary["scaling"] == reason
    text = page.read_text()
    assert reason in text and "tiny&lt;model&gt;" in text and "tiny<model>" not in text
    assert pq.read_table(page.parent / "scaling.parquet").num_rows == 0
    rows = _verdicts(page.parent)
    cross = [r for r in rows if r["population"] == ALL]
    assert {r["verdict"] for r in cross} == {"INCONCLUSIVE"}
    assert any("at least 2 populations" in r["note"] for r in cross)
    own = [r for r in rows if r["population"] == "tiny<model>"]
    assert {r["seeds"] for r in own} == {"one model"}
    r = next(r for r in own if r["key"] == "restoration_difference")
    assert r["scheme"].startswith("one seed: value ± t(df) x SE x sqrt(n/(n-1)), SE from a bootstrap over heads -> "
                                  "examples")
    assert re.search(r"; per seed: t-scaled, df [\d.]+$", r["scheme"])  # Welch df of the two groups
    assert np.isnan(r["hier_low"]) and np.isnan(r["hier_high"])  # one model: no seeds to resample
    assert r["correction"].startswith("none needed")


@pytest.mark.parametrize("cell, name, change, message", [
    ("experiment=1-steer", "verdicts.parquet", lambda t: t.drop_columns(["key"]),
     "column 'key' missing (expected string)"),
    ("experiment=1-steer", "per_prompt.parquet", lambda t: t.drop_columns(["split", "family", "k", "draw"]),
     "column 'family' missing (expected string)"),
    ("experiment=0-validate", "scan.parquet", lambda t: t.set_column(t.column_names.index("gap"), "gap",
                                                                       pa.array([str(x) for x in t["gap"].to_pylist()])),
     "column 'gap' has type string, expected double"),
    ("experiment=0-validate", "patch_examples.parquet", None, "no such table"),
])
def test_tables_that_do_not_match_their_schema_are_refused(tmp_path, capsys, cell, name, change, message):
    """Tables written before the schemas (steering verdicts without keys, per-prompt effects
    without their split and arms, no per-example patching) are refused with one line naming the
    file and the column, never read by guesswork."""
    from jobs.cli import main

    run_dir = make_run(tmp_path / "old", SIZES[:2], seeds=(0,))
    path = run_dir / "model=organism-s" / cell / name
    if change is None:
        path.unlink()
    else:
        pq.write_table(change(pq.read_table(path)), path)
    with pytest.raises(UsageError) as err:
        report.run(run_dir, echo=lambda *a: None, **FAST)
    assert str(err.value) == f"{path}: {message}"
    assert main(["report", str(run_dir), "--resamples", "10", "--permutations", "10"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"eigengap report: error: {path}: {message}"]


def test_missing_steer_is_named(tmp_path, capsys):
    from jobs.cli import main

    run_dir = make_run(tmp_path / "partial", seeds=(0,))
    shutil.rmtree(run_dir / "model=organism-s" / "experiment=1-steer")
    (run_dir / "model=organism-m" / "experiment=1-steer" / "cell.json").unlink()
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out), "--resamples", "100", "--permutations", "10"]) == 0
    missing = ["organism-s: experiment 1 (steer) not run",
               "organism-m: experiment 1 (steer) not finished (no cell.json)"]
    assert json.loads((out / "summary.json").read_text())["missing"] == missing
    page = (out / "report.html").read_text()
    assert all(m in page for m in missing)
    echoed = [l for l in capsys.readouterr().out.splitlines() if l.startswith("report partial: missing")]
    assert echoed == ["report partial: missing 2: " + "; ".join(missing)]
    rows = {(r["population"], r["key"]): r for r in _verdicts(out)}
    assert rows[("organism-s", "steering_improvement")]["verdict"] == "INCONCLUSIVE"
    assert rows[("organism-s", "steering_improvement")]["note"] == "no finished steer experiment"


def test_non_finite_values_are_counted(tmp_path):
    run_dir = make_run(tmp_path / "nan", SIZES[:2], seeds=(0,))
    unit = run_dir / "model=organism-xs" / "experiment=0-validate"
    for name, column, rows, value in (("scan.parquet", "gap", [3, 5], np.nan),):
        table = pq.read_table(unit / name)
        values = table[column].to_numpy().copy()
        values[rows] = value
        pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values)), unit / name)
    ex = pq.read_table(unit / "patch_examples.parquet")
    clean = ex["metric_clean"].to_numpy().copy()
    head_rows = (ex["layer"].to_numpy() == 0) & (ex["head"].to_numpy() == 7)
    clean[head_rows] = ex["metric_corrupt"].to_numpy()[head_rows]  # clean == corrupt: restoration undefined
    pq.write_table(ex.set_column(ex.column_names.index("metric_clean"), "metric_clean", pa.array(clean)),
                   unit / "patch_examples.parquet")
    page = report.run(run_dir, echo=lambda *a: None, **FAST)
    excluded = json.loads((page.parent / "summary.json").read_text())["excluded_non_finite"]
    assert excluded["organism-xs"]["gap (scan)"] == 2
    assert excluded["organism-xs"]["restoration undefined (clean ~ corrupt)"] == 1
    assert excluded["organism-xs"]["gap or restoration (patched heads)"] == 3
    assert excluded["organism-s"]["gap (scan)"] == 0
    cal = {(r["model"], r["target"]): r for r in pq.read_table(page.parent / "calibration.parquet").to_pylist()}
    assert cal[("organism-xs", "heads")]["n"] == 4 * 8 - 3


def test_each_models_calibrated_threshold_is_a_metric_of_its_cell_run(tmp_path):
    """The report logs every model's calibrated threshold (and AUROC) with its interval to the
    MLflow child run of the cell it was calibrated on, under the same keys for every model; the
    parent run's keys are identifiers (model specs, populations, keys), never labels with values."""
    from mlflow.tracking import MlflowClient

    from cluster.layout import RunLayout, safe
    from jobs.tracking import EXPERIMENT, Tracker

    run_dir = make_run(tmp_path / "tracked", SIZES[:2], seeds=(0, 1))
    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    tracker = Tracker.open(uri, run_dir, echo=pytest.fail)
    assert tracker.track_all(run_dir, RunLayout(run_dir).cells()) == 8
    lines: list[str] = []
    report.run(run_dir, echo=lines.append, **FAST)
    assert lines[-1] == "logged the report's summary, verdicts and files to the sweep's MLflow parent run"
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    children = {r.data.tags["eigengap.cell"]: r.data.metrics for r in runs if "eigengap.cell" in r.data.tags}
    keys = [f"{q}/{s}" for q in ("calibrated_threshold", "calibration_auroc") for s in ("value", "low", "high")]
    validate = {cell: m for cell, m in children.items() if cell.endswith("-validate")}
    steer = {cell: m for cell, m in children.items() if cell.endswith("-steer")}
    assert len(validate) == len(steer) == 4
    for cells in (validate, steer):  # every model's run: the same keys (and one min_gap/layer_<l> per layer)
        assert len({frozenset(k for k in m if not re.fullmatch(r"min_gap/layer_\d+", k)) for m in cells.values()}) == 1
        assert all(set(keys) <= set(m) for m in cells.values())
    cal = {(r["model"], r["target"]): r for r in read_parquet(run_dir / "report" / "calibration.parquet",
                                                              tables.REPORT_CALIBRATION).to_pylist()}
    for cell, m in validate.items():
        model = next(r["model"] for r in cal.values() if cell.startswith(f"model={safe(r['model'])}/"))
        assert m["calibrated_threshold/value"] == pytest.approx(POSITIVE_GAP)
        assert (m["calibrated_threshold/low"], m["calibrated_threshold/high"]) == pytest.approx(
            (cal[(model, "heads")]["threshold_low"], cal[(model, "heads")]["threshold_high"]))
        assert m["calibration_auroc/value"] == pytest.approx(1.0)
    parent = next(r for r in runs if "eigengap.cell" not in r.data.tags).data.metrics
    assert "report/organism-s_seed_1/calibration_heads/threshold" in parent
    assert "report/organism-xs/scaling/min_gap" in parent
    assert all(re.fullmatch(r"report/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+", k) for k in parent), \
        [k for k in parent if not re.fullmatch(r"report/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)+", k)]
    assert not any("0.77" in k for k in parent)


def test_not_a_sweep_dir_is_a_usage_error(tmp_path, capsys):
    from jobs.cli import main

    with pytest.raises(UsageError, match="not a sweep run"):
        report.run(tmp_path)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"eigengap report: error: {tmp_path} is not a sweep run (no sweep.json): "
                   "pass the directory `eigengap sweep` wrote"]


# --- the page in a real browser --------------------------------------------------------

def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail("chromium is not on PATH: `make install` installs it (apt-get install -y chromium)")


def test_page_renders_in_a_headless_browser(four, tmp_path):
    from PIL import Image

    _, out, _ = four
    page = out / "report.html"
    text = page.read_text()
    assert "<script" not in text and not re.search(r"(src|href)=\"(https?:|//)", text)
    browser = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "page.png"
    subprocess.run([*browser, f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri()],
                   check=True, capture_output=True, timeout=60)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=float)
    assert pixels.shape == (4000, 1280) and pixels.var() > 100
    dom = subprocess.run([*browser, "--dump-dom", page.as_uri()], check=True, capture_output=True, text=True,
                         timeout=60).stdout
    assert '<section id="verdicts">' in dom and dom.count('class="num"') > 50
    assert dom.count('<td class="FAIL">FAIL</td>') >= 10
    uris = re.findall(r"<img [^>]*src=\"data:image/png;base64,([^\"]+)\"", dom)
    assert len(uris) == dom.count("<img") == 4 + 5  # 4 landscapes (one per population), 5 figures
    for data in uris:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.verify()
        assert image.format == "PNG"
