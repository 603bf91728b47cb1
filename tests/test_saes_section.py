"""The report's SAE section on a synthetic run with planted effects: unstable heads with a higher
superposition index, feature-aware steering ahead of ActAdd, features above random directions;
each verdict PASSes, its tables are written and the page shows them."""

import json

import pytest

from cluster.store import read_parquet
from jobs import report
from spectral import tables
from tests.synthetic_runs import SIZES, make_run


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    run_dir = make_run(tmp_path_factory.mktemp("saes") / "run", SIZES[:2], seeds=(0, 1, 2), steer=False, saes=True)
    out = tmp_path_factory.mktemp("saes") / "report"
    report.run(run_dir, out, echo=lambda *a: None, n_resamples=60, n_permutations=200, track=False)
    return out


def test_planted_effects_pass(out):
    facts = json.loads((out / "summary.json").read_text())["verdicts"]
    for pop in ("organism-xs", "organism-s"):
        assert facts[f"{pop}/saes/unstable_more_superposition"] == "PASS"
        assert facts[f"{pop}/saes/feature_steering_beats_actadd"] == "PASS"
        for variable in ("ioi_io", "sentiment"):
            assert facts[f"{pop}/saes/sae_features_beat_random/{variable}"] == "PASS"


def test_tables_and_page(out):
    verdicts = read_parquet(out / "sae_verdicts.parquet", tables.REPORT_SAE_VERDICTS).to_pylist()
    main = [r for r in verdicts if not r["exploratory"]]
    assert len(main) == 2 and all(r["value"] == pytest.approx(1.0, abs=0.3) for r in main)
    models = read_parquet(out / "sae_models.parquet", tables.REPORT_SAE_MODELS)
    assert models.num_rows == 6 * 8 * 2  # 6 models x 8 metrics x 2 thresholds
    steering = read_parquet(out / "sae_steering_verdicts.parquet", tables.REPORT_SAE_STEERING_VERDICTS).to_pylist()
    assert [r["value"] for r in steering] == pytest.approx([0.5, 0.5], abs=0.15)
    truth = read_parquet(out / "sae_groundtruth_verdicts.parquet", tables.REPORT_SAE_GROUNDTRUTH).to_pylist()
    assert len(truth) == 4 and all(r["value"] == pytest.approx(0.1) for r in truth)
    page = (out / "report.html").read_text()
    assert "SAEs on heads" in page and "feature_steering_beats_actadd" in page and "sae_features_beat_random" in page
    assert (out / "sae_differences.png").stat().st_size > 0
