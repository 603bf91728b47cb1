"""``eigengap report``: cross-model report over synthetic sweep runs whose answers are known.

The runs are built here with the sweep's layout (sweep.json, model=<m>/model.json,
experiment=<i>-validate/, experiment=<i>-steer/, unit.json) and the result schemas of the
validate and steer jobs. Importance is constructed to be high exactly for gap <= 0.49, so
every calibrated threshold lies near 0.49 and "0.77 holds" must FAIL; each model's minimum
gap is an exact power of its parameter count, so the power-law fit must recover it.
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

from analysis.crossmodel import CROSS_MODEL_METRICS, PER_MODEL_METRICS
from jobs import report
from jobs.sweep import safe
from spectral.errors import UsageError

FAST = {"n_resamples": 200, "n_permutations": 20}
POSITIVE_GAP = 0.49
"""Largest gap of an important head (and of a steerable layer's weakest head)."""
MIN_GAP = (0.3, -0.1)
"""Each model's minimum gap is MIN_GAP[0] * (parameters / 1e6) ** MIN_GAP[1]."""
SIZES = [  # name, parameters, layers, heads per layer, d_model, d_head
    ("synth-xs", 1e6, 4, 8, 64, 16), ("synth-s", 4e6, 6, 8, 128, 32),
    ("synth-m", 1.6e7, 8, 8, 256, 32), ("synth-l", 6.4e7, 10, 8, 512, 64),
]


# --- building synthetic runs -----------------------------------------------------------

def _write(table: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(table), path)


def _finish(unit: Path, model: str, index: int, kind: str) -> None:
    (unit / "unit.json").write_text(json.dumps({"unit": {"model": model, "index": index, "kind": kind, "params": {}}}))


def synthetic_gaps(layers: int, heads: int, parameters: float, seed: int) -> np.ndarray:
    """(layers, heads) gaps: stable heads in [0.55, 0.95]; in the first half of the layers head 0
    is unstable (<= 0.49, one of them exactly 0.49); head 1 of layer 0 holds the minimum gap."""
    rng = np.random.default_rng(seed)
    gap = rng.uniform(0.55, 0.95, size=(layers, heads))
    n_unstable = layers // 2
    gap[:n_unstable, 0] = np.linspace(0.35, POSITIVE_GAP, n_unstable)
    gap[0, 1] = MIN_GAP[0] * (parameters / 1e6) ** MIN_GAP[1]
    return gap


def write_validate(unit: Path, model: str, gap: np.ndarray) -> None:
    layers, heads = gap.shape
    layer, head = np.divmod(np.arange(gap.size), heads)
    g = gap.ravel()
    importance = np.where(g <= POSITIVE_GAP, 0.8, 0.02 * (g - 0.5))
    scan = {"model": [model] * g.size, "layer": layer.astype(np.int32), "head": head.astype(np.int32), "gap": g,
            "entropy": 2.0 - g, "effective_rank": np.exp(2.0 - g), "lambda1": np.ones(g.size),
            "lambda2": 1 - g, "status": ["ok"] * g.size}
    _write(scan, unit / "scan.parquet")
    _write({"layer": layer, "head": head, "gap": g, "importance": importance, "unstable": g <= 0.77}, unit / "heads.parquet")
    ok = np.isfinite(g) & np.isfinite(importance)
    r = float(np.corrcoef(1 / g[ok], importance[ok])[0, 1])
    _write({"name": ["pearson r(importance, 1/gap)", "restoration ratio unstable/stable at gap <= 0.77"],
            "value": [r, 3.0], "low": [r - 0.05, 2.5], "high": [min(r + 0.05, 0.999), 3.5], "p_value": [0.001, np.nan],
            "target": [0.7, 2.0], "verdict": ["PASS" if r - 0.05 > 0.7 else "INCONCLUSIVE", "PASS"]},
           unit / "validate.parquet")


def write_steer(unit: Path, model: str, gap: np.ndarray) -> None:
    layers = gap.shape[0]
    min_gap = np.nanmin(gap, axis=1)
    steerable = min_gap <= POSITIVE_GAP
    effect = np.where(steerable, 2.0, 0.0)
    _write({"layer": np.arange(layers), "min_gap": min_gap, "mean_gap": np.nanmean(gap, axis=1),
            "scale": np.ones(layers), "effect": effect, "effect_low": effect - np.where(steerable, 0.5, 0.3),
            "effect_high": effect + 0.5, "kl": np.full(layers, 0.25)}, unit / "layers.parquet")
    r = float(np.corrcoef(min_gap, effect)[0, 1])
    _write({"name": ["improvement of spectral over baseline (mean effect)",
                     "effect lost by spectral vs the oracle's best layer (fraction)",
                     "pearson r(per-layer min gap, per-layer steering effect)"],
            "value": [0.3, 0.05, r], "low": [0.1, 0.0, r - 0.05], "high": [0.5, 0.08, r + 0.05],
            "target": [0.25, np.nan, np.nan], "verdict": ["INCONCLUSIVE", "", ""],
            "note": ["", "oracle best layer 0; spectral layers [0]; match: True", ""]}, unit / "verdicts.parquet")
    _write({"strategy": ["baseline", "spectral"], "effect": [1.5, 2.0]}, unit / "strategies.parquet")


def make_run(root: Path, sizes=SIZES, *, steer=True, facts=True) -> Path:
    """A finished synthetic sweep run with a validate and (optionally) a steer experiment."""
    experiments = [{"kind": "validate", "params": {}}] + ([{"kind": "steer", "params": {}}] if steer else [])
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({"config": {"models": [s[0] for s in sizes], "experiments": experiments},
                                                 "config_hash": "0" * 16, "run_id": root.name}))
    for seed, (name, params, layers, heads, d_model, d_head) in enumerate(sizes):
        model_dir = root / f"model={safe(name)}"
        gap = synthetic_gaps(layers, heads, params, seed)
        write_validate(model_dir / "experiment=0-validate", name, gap)
        _finish(model_dir / "experiment=0-validate", name, 0, "validate")
        if steer:
            write_steer(model_dir / "experiment=1-steer", name, gap)
            _finish(model_dir / "experiment=1-steer", name, 1, "steer")
        if facts:
            (model_dir / "model.json").write_text(json.dumps(
                {"model": name, "family": "gpt_neox", "parameters": params, "layers": layers, "heads": heads,
                 "d_model": d_model, "d_head": d_head}))
    return root


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> tuple[Path, Path, list[str]]:
    """(run dir, report dir, echoed lines) of the 4-model run, built and reported once."""
    run_dir = make_run(tmp_path_factory.mktemp("sweeps") / "four")
    lines: list[str] = []
    page = report.run(run_dir, echo=lines.append, **FAST)
    return run_dir, page.parent, lines


def _verdicts(out: Path) -> list[dict]:
    return pq.read_table(out / "verdicts.parquet").to_pylist()


# --- the 4-model run -------------------------------------------------------------------

def test_thresholds_calibrate_near_the_constructed_gap_and_077_fails(four):
    run_dir, out, lines = four
    cal = pq.read_table(out / "calibration.parquet").to_pylist()
    heads = [r for r in cal if r["target"] == "important heads"]
    assert len(heads) == 4
    for r in heads:  # important = gap <= 0.49 exactly: the Youden threshold is the largest positive gap
        assert r["threshold"] == pytest.approx(POSITIVE_GAP)
        assert r["auroc"] == pytest.approx(1.0)
        assert r["threshold_high"] <= POSITIVE_GAP + 1e-12
    for r in (r for r in cal if r["target"] == "steerable layers"):
        assert r["threshold"] == pytest.approx(POSITIVE_GAP)
    by = {(r["model"], r["key"]): r for r in _verdicts(out)}
    assert by[("all", "threshold_holds_heads")]["verdict"] == "FAIL"
    assert by[("all", "threshold_holds_layers")]["verdict"] == "FAIL"
    assert by[("all", "threshold_stable_heads")]["verdict"] == "PASS"  # every model: 0.49
    assert all(by[(s[0], "threshold_heads")]["verdict"] == "FAIL" for s in SIZES)
    # per model: r, ratio, layer choice PASS; both thresholds FAIL; the copied improvement INCONCLUSIVE;
    # all: both "0.77 holds" FAIL, both "stable" and both correlation consistencies PASS
    assert lines[0] == f"wrote {out / 'report.html'} (4 models; verdicts: 16 PASS, 10 FAIL, 4 INCONCLUSIVE)"
    assert lines[1:] == [f"not logged to MLflow: {run_dir} has no tracked parent run "
                         f"(run `eigengap track {run_dir}` first)"]  # a synthetic run that no sweep tracked


def test_verdicts_hold_every_success_metric_for_every_model(four):
    _, out, _ = four
    rows = _verdicts(out)
    keys = {(r["model"], r["key"]) for r in rows}
    assert keys == {(s[0], k) for s in SIZES for k in PER_MODEL_METRICS} | {("all", k) for k in CROSS_MODEL_METRICS}
    assert {r["verdict"] for r in rows} <= {"PASS", "FAIL", "INCONCLUSIVE"}
    assert set(pq.read_table(out / "verdicts.parquet").column_names) >= {
        "model", "metric", "value", "low", "high", "target", "verdict", "note"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["verdicts"]["synth-m/layer_choice"] == "PASS"  # effect lost [0, 0.08] <= 0.10
    assert summary["verdicts"]["synth-m/steering_improvement"] == "INCONCLUSIVE"  # copied from the steer job
    assert summary["models"] == [s[0] for s in SIZES] and summary["missing"] == []


def test_scaling_recovers_an_exact_power_law(four):
    _, out, _ = four
    rows = pq.read_table(out / "scaling.parquet").to_pylist()
    assert rows and {r["n"] for r in rows if r["quantity"].startswith("calibrated threshold (important")} == {4}
    fit = next(r for r in rows if (r["quantity"], r["predictor"], r["kind"]) == ("minimum gap", "parameters", "power"))
    assert fit["n"] == 4
    assert fit["b"] == pytest.approx(MIN_GAP[1], abs=1e-9)
    assert fit["a"] == pytest.approx(MIN_GAP[0] * 1e6 ** -MIN_GAP[1], rel=1e-9)
    assert fit["r2"] == pytest.approx(1.0, abs=1e-12)
    assert fit["loo_rel_error"] == pytest.approx(0.0, abs=1e-9)


def test_information_and_files(four):
    _, out, _ = four
    info = {(r["model"], r["measure"].split(",")[0]): r for r in pq.read_table(out / "information.parquet").to_pylist()}
    mi = info[("all (pooled)", "MI(gap")]
    assert mi["n"] == sum(s[2] * s[3] for s in SIZES) and mi["value"] > mi["null_p95"]
    entropy = info[("synth-s", "spectral entropy")]
    assert entropy["value"] > 0  # entropy = 2 - gap: unstable heads have more
    names = {p.name for p in out.iterdir()}
    assert {"report.html", "summary.json", "verdicts.parquet", "calibration.parquet", "scaling.parquet",
            "information.parquet", "gap_vs_importance.png", "steering_by_layer.png", "scaling.png",
            "generalization.png", "entropy_by_stability.png", "gap_landscape_0.png"} <= names


# --- degenerate runs -------------------------------------------------------------------

def test_single_model_has_no_scaling_fit_and_says_why(tmp_path):
    run_dir = make_run(tmp_path / "one", [("tiny<model>", 1e6, 4, 8, 64, 16)])
    page = report.run(run_dir, echo=lambda *a: None, **FAST)
    summary = json.loads((page.parent / "summary.json").read_text())
    reason = "scaling fits need at least 3 models with size facts; this run has 1"
    assert summary["scaling"] == reason
    text = page.read_text()
    assert reason in text and "tiny&lt;model&gt;" in text and "tiny<model>" not in text
    assert pq.read_table(page.parent / "scaling.parquet").num_rows == 0
    cross = [r for r in _verdicts(page.parent) if r["model"] == "all"]
    assert {r["verdict"] for r in cross} == {"INCONCLUSIVE"}
    assert any("at least 2 models" in r["note"] for r in cross)


def test_missing_steer_is_named(tmp_path, capsys):
    from jobs.cli import main

    run_dir = make_run(tmp_path / "partial")
    shutil.rmtree(run_dir / "model=synth-s" / "experiment=1-steer")
    (run_dir / "model=synth-m" / "experiment=1-steer" / "unit.json").unlink()
    out = tmp_path / "report"
    assert main(["report", str(run_dir), "--out", str(out), "--resamples", "100", "--permutations", "10"]) == 0
    missing = ["synth-s: experiment 1 (steer) not run", "synth-m: experiment 1 (steer) not finished (no unit.json)"]
    assert json.loads((out / "summary.json").read_text())["missing"] == missing
    page = (out / "report.html").read_text()
    assert all(m in page for m in missing)
    echoed = [l for l in capsys.readouterr().out.splitlines() if l.startswith("report partial: missing")]
    assert echoed == ["report partial: missing 2: " + "; ".join(missing)]
    rows = {(r["model"], r["key"]): r for r in _verdicts(out)}
    assert rows[("synth-s", "steering_improvement")]["verdict"] == "INCONCLUSIVE"
    assert rows[("synth-s", "steering_improvement")]["note"] == "no finished steer experiment for this model"


def test_non_finite_values_are_counted(tmp_path):
    run_dir = make_run(tmp_path / "nan", SIZES[:2])
    unit = run_dir / "model=synth-xs" / "experiment=0-validate"
    for name, column, rows, value in (("scan.parquet", "gap", [3, 5], np.nan), ("heads.parquet", "gap", [3], np.nan),
                                      ("heads.parquet", "importance", [7, 9], np.inf)):
        table = pq.read_table(unit / name)
        values = table[column].to_numpy().copy()
        values[rows] = value
        pq.write_table(table.set_column(table.column_names.index(column), column, pa.array(values)), unit / name)
    page = report.run(run_dir, echo=lambda *a: None, **FAST)
    excluded = json.loads((page.parent / "summary.json").read_text())["excluded_non_finite"]
    assert excluded["synth-xs"] == {"gap (scan)": 2, "entropy (scan)": 0, "gap or importance (patched heads)": 3,
                                    "min gap or effect (steered layers)": 0}
    assert excluded["synth-s"]["gap (scan)"] == 0
    cal = {(r["model"], r["target"]): r for r in pq.read_table(page.parent / "calibration.parquet").to_pylist()}
    assert cal[("synth-xs", "important heads")]["n"] == 4 * 8 - 3


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
    assert len(uris) == dom.count("<img") == 4 + 5  # 4 landscapes, importance, steering, generalization, scaling, entropy
    for data in uris:
        image = Image.open(io.BytesIO(base64.b64decode(data, validate=True)))
        image.verify()
        assert image.format == "PNG"
