"""The circuits kind in a sweep and in the cross-model report: a population of random-weight
twins (two training seeds) on a task file, its circuits-vs-spectra verdicts, tables and page
section, and MLflow metrics under stable keys."""

import json

import pyarrow.parquet as pq
import yaml

from jobs.cli import main
from spectral import tables

TINY = "random:gpt2?layers=2&hidden=64&heads=4&vocab=300"


def test_circuits_in_a_sweep_and_the_report(tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    words = ["cat", "dog", "sun", "cup", "pen", "box", "map", "hat"]
    task.write_text("".join(json.dumps({"clean": f"the {a} and the {b} saw the {a}", "corrupt": f"the {b} and the {a} saw the {a}",
                                        "answer": "x", "distractor": "y"}) + "\n"
                            for a, b in zip(words, words[1:] + words[:1])))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "circ", "models": [TINY], "seeds": [0, 1], "experiments": [
        {"kind": "circuits", "params": {"task": str(task), "n_sequences": 8, "agreement_edges": 5, "steps": 2,
                                        "sizes": [1, 5, 20], "target": 0.5}}]}))
    assert main(["sweep", str(config), "--out", str(tmp_path / "runs")]) == 0
    run_dir = tmp_path / "runs" / "circ"
    assert main(["report", str(run_dir), "--resamples", "50", "--permutations", "50"]) == 0
    capsys.readouterr()
    report = run_dir / "report"
    verdicts = pq.read_table(report / "circuits.parquet")
    assert verdicts.schema.names == tables.REPORT_CIRCUITS.names
    row = next(r for r in verdicts.to_pylist() if r["key"] == "circuit_gap_difference")
    assert row["n_seeds"] == 2 and row["verdict"] in ("PASS", "FAIL", "INCONCLUSIVE") and row["correction"].startswith("Holm")
    per_model = pq.read_table(report / "circuit_models.parquet").to_pylist()
    assert len(per_model) == 2 and all(0 <= r["size"] <= r["n_edges"] for r in per_model)
    page = (report / "report.html").read_text()
    assert "Circuits and spectra" in page and "circuit_gap_difference" in page
    summary = json.loads((report / "summary.json").read_text())
    assert any(k.endswith("/circuits/circuit_gap_difference") for k in summary["verdicts"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("eigengap").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 2 and all("faithfulness/circuit" in r.data.metrics for r in children)
    assert len({frozenset(r.data.metrics) for r in children}) == 1  # the same keys for every model
