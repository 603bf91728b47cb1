"""The experiment registry: every kind's record is complete, a record missing a field fails at
import naming the field, and a new kind added through the registry alone (tests/toy_experiment.py
plus one ``register`` call) runs in a sweep, in ``plan`` and in the report, and reaches MLflow."""

import dataclasses

import pytest
import yaml

from jobs import registry
from jobs.cli import main

TINY = "random:pythia-410m?layers=3&hidden=64&heads=4&vocab=512"


def test_every_registered_kind_has_a_complete_record():
    for kind in registry.kinds():
        record = registry.experiment(kind)
        assert record.kind == kind
        assert all(getattr(record, f.name) is not None for f in dataclasses.fields(record))
        facts = registry.ModelFacts(parameters=10 ** 6, layers=4, heads=8)
        assert record.cost({}, facts) > 0  # a kind never falls back on another's cost model


def test_a_record_missing_a_field_fails_naming_it():
    from tests import toy_experiment as toy

    complete = {f.name: getattr(toy.EXPERIMENT, f.name) for f in dataclasses.fields(toy.EXPERIMENT)}
    for field in ("cost", "metrics", "load", "tables"):
        partial = {k: v for k, v in complete.items() if k != field}
        with pytest.raises(TypeError, match=repr(field)):
            registry.Experiment(**partial)
    with pytest.raises(TypeError, match="'cost' must be callable"):
        registry.Experiment(**{**complete, "cost": 3})
    with pytest.raises(TypeError, match="'tables'"):
        registry.Experiment(**{**complete, "tables": {"toy.csv": None}})


def test_an_unknown_kind_in_a_sweep_is_one_line(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "u", "models": [TINY], "experiments": [{"kind": "nope"}]}))
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown experiment kind 'nope'" in err


@pytest.fixture
def toy_kind():
    registry.register("toy", "tests.toy_experiment")
    yield registry.experiment("toy")
    registry.unregister("toy")


def test_a_toy_kind_through_the_registry_alone(toy_kind, tmp_path, capsys):
    path = tmp_path / "toy.yaml"
    models = [TINY, TINY.replace("layers=3", "layers=2")]
    path.write_text(yaml.safe_dump({"name": "toy", "models": models,
                                    "experiments": [{"kind": "toy", "params": {"scale": 2.0}}]}))

    # the command line knows it
    assert main(["toy", "--model", TINY, "--out", str(tmp_path / "one"), "--scale", "3"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["toy", "--model", TINY, "--out", str(tmp_path / "one"), "--scale", "-1"]) == 2
    assert "--scale" in capsys.readouterr().err

    # plan costs it with its own model
    assert main(["plan", "--model", TINY, "--sweep", str(path)]) == 0
    said = capsys.readouterr().out
    assert "toy" in said and "~3,000 token-forwards" in said

    # the sweep runs it; MLflow gets its metrics
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 0
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "toy"
    from jobs.sweep import results

    table = results(run_dir, "toy.parquet")
    assert sorted(table["value"].to_pylist()) == [2.0, 2.0, 4.0, 4.0, 6.0]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    runs = client.search_runs([client.get_experiment_by_name("eigengap").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert sorted(r.data.metrics["toy_total"] for r in children) == [6.0, 12.0]
    assert {r.data.params["verdict/toy_positive"] for r in children} == {"PASS"}

    # the report shows its cells, with the metrics its record hands over
    assert main(["report", str(run_dir), "--resamples", "20", "--permutations", "10", "--no-track"]) == 0
    page = (run_dir / "report" / "report.html").read_text()
    assert "toy_total" in page and "toy_positive" in page


def test_reading_every_record_loads_no_model_stack():
    """cli, sweep, plan, tracking and the report read the records (and the report parses the
    models' specs): the job modules import torch, transformers, matplotlib (and MLflow, Ray)
    inside their run functions only, the organisms' training only when a model is built."""
    import subprocess
    import sys

    code = ("import sys\nfrom jobs import registry\nfor k in registry.kinds(): registry.experiment(k)\n"
            "import jobs.cli, jobs.report, jobs.sweep, jobs.plan, jobs.tracking\n"
            "from spectral.models.specs import population\n"
            "assert population('organism-s?seed=2') == ('organism-s', 2)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'mlflow', 'ray') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_help_of_every_command_renders(capsys):
    """``eigengap --help`` and each command's ``--help`` print and exit 0 (a help string with a bare
    '%', as in "1 % FPR", once broke argparse's formatting of the whole list)."""
    from jobs.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit) as done:
        parser.parse_args(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for kind in registry.KINDS:
        assert kind in text
        with pytest.raises(SystemExit) as done:
            parser.parse_args([kind, "--help"])
        assert done.value.code == 0
