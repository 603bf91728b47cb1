"""``eigengap predict`` on the smallest organism: the table it writes has its schema, each layer's
first-order prediction is ``first_order`` called directly, each measured effect is the steer job's
own measurement at the same scale, and bad input is one line, exit 2, nothing written."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cluster.store import read_parquet
from jobs.cli import main
from spectral import tables

BUDGET = 0.25


@pytest.fixture(scope="module")
def predicted(organism_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict") / "out"
    assert main(["predict", "--model", str(organism_cache), "--out", str(out)]) == 0
    return out


def test_writes_its_tables(predicted):
    layers = read_parquet(predicted / "predict.parquet", tables.PREDICT)
    assert layers.schema.equals(tables.PREDICT)
    assert layers["layer"].to_pylist() == [0, 1]  # the smallest organism has 2 layers
    stats = read_parquet(predicted / "predict_verdicts.parquet", tables.PREDICT_VERDICTS).to_pylist()
    primary = next(s for s in stats if s["key"] == "theory_predicts_steering")
    assert primary["predictor"] == "first_order" and primary["statistic"] == "spearman"
    assert primary["verdict"] == "INCONCLUSIVE"  # 2 layers: a correlation is +-1 by construction
    params = json.loads((predicted / "params.json").read_text())
    assert params["budget_kl"] == BUDGET
    assert {"seconds_first_order", "seconds_search", "first_order_over_search"} <= params["timing"].keys()
    text = (predicted / "summary.md").read_text()
    assert "theory_predicts_steering" in text and "Timing:" in text and "over training seeds and organisms is the report" in text
    for r in layers.to_pylist():
        assert abs(r["measured_kl"] - BUDGET) <= 0.02 * BUDGET  # matched within match_budget's tolerance
        assert r["line_search_alpha"] == pytest.approx(r["measured_scale"])  # the same search
        assert r["bound_holds"] == (r["violations"] == []) and 0 <= r["within_bound"] <= 1


def test_matches_first_order_and_the_steer_measurement(predicted, organism):
    from jobs.steer import SteerUnit, steer_unit
    from spectral.models.adapter import HeadAdapter
    from spectral.steering.concepts import concept_for
    from spectral.steering.vectors import actadd
    from spectral.theory.first_order import first_order

    rows = pq.read_table(predicted / "predict.parquet").to_pylist()
    concept = concept_for("sentiment", organism)
    adapter = HeadAdapter(organism.model)
    vectors = {l: v.cpu() for l, v in actadd(adapter, organism.tokenizer, concept, range(2), "cpu", "last").items()}
    for r in rows:
        l = r["layer"]
        fo = first_order(adapter, organism.tokenizer, concept, l, vectors[l], "all", source="sentiment")
        assert r["first_order_effect"] == pytest.approx(fo.effect_at_budget(BUDGET), rel=1e-6)
        assert r["alpha_star"] == pytest.approx(fo.alpha_star(BUDGET), rel=1e-6)
        assert r["slope"] == pytest.approx(float(fo.slope.mean()), rel=1e-6)
        unit = SteerUnit(f"layer {l}", concept, vectors, {l: 1.0}, "all", r["measured_scale"], BUDGET)
        m = steer_unit(organism, unit)
        assert r["measured_effect"] == pytest.approx(float(np.mean(m["effect"])), rel=1e-5)
        assert r["measured_kl"] == pytest.approx(float(np.mean(m["kl"])), rel=1e-5)


GOOD = {"name": "c", "pairs": [["a", "b"]], "prompts": ["x"], "target": [" good"], "opposite": [" bad"], "neutral": ["q"]}


@pytest.mark.parametrize("concept, extra, message", [
    (None, ["--kl-budget", "0"], "--kl-budget: Input should be greater than 0"),
    (None, ["--kl-budget", "-1"], "--kl-budget: Input should be greater than 0"),
    (None, ["--concept", "no-such-concept"], "no-such-concept"),
    ({**GOOD, "target": [" good bad"]}, [], "target word ' good bad' is 2 tokens, not one"),
])
def test_bad_input(organism_cache, tmp_path, capsys, concept, extra, message):
    out = tmp_path / "out"
    args = ["predict", "--model", str(organism_cache), "--out", str(out), *extra]
    if concept is not None:
        path = tmp_path / "concept.json"
        path.write_text(json.dumps(concept))
        args += ["--concept", str(path)]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and errors[0].startswith("eigengap predict: error: "), errors
    assert message in errors[0]
    assert not out.exists()


def test_a_layer_whose_vector_is_zero_is_left_out_and_named(organism_cache, tmp_path):
    """The names concept's pairs all end in ' to': at layer 0 (the token embedding) their CAA vector is zero."""
    out = tmp_path / "out"
    assert main(["predict", "--model", str(organism_cache), "--out", str(out), "--concept", "names",
                 "--vector", "caa"]) == 0
    assert read_parquet(out / "predict.parquet", tables.PREDICT)["layer"].to_pylist() == [1]
    assert json.loads((out / "params.json").read_text())["zero_vector_layers"] == [0]
    assert "Left out: layer(s) 0" in (out / "summary.md").read_text()
