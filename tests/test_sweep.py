"""Sweeps: config validation, resume without duplicates, refusal to mix configs, MLflow
tracking in a real (SQLite) store, an unreachable store and a later upload."""

import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main


def write_sweep(path, model, **extra):
    config = {"name": "t", "models": [str(model)],
              "experiments": [{"kind": "validate", "params": {"n_examples": 8}},
                              {"kind": "patch", "params": {"task": "ioi", "method": "attribution", "n_examples": 8}}], **extra}
    path.write_text(yaml.safe_dump(config))
    return path


def mlflow_runs(uri):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("eigengap")
    return client.search_runs([experiment.experiment_id])


def test_sweep_tracks_and_resumes_without_duplicates(organism_cache, tmp_path, capsys):
    config = write_sweep(tmp_path / "s.yaml", organism_cache)
    out = tmp_path / "runs"
    assert main(["sweep", str(config), "--out", str(out)]) == 0
    run_dir = out / "t"
    units = sorted(p.parent.relative_to(run_dir).as_posix() for p in run_dir.glob("model=*/experiment=*/cell.json"))
    assert units == [f"model={organism_cache.as_posix().strip('/').replace('/', '_')}/experiment=0-validate",
                     f"model={organism_cache.as_posix().strip('/').replace('/', '_')}/experiment=1-patch"]
    stats = pq.read_table(next(run_dir.glob("model=*/experiment=0-validate/validate.parquet")))
    assert "pearson r(importance, 1/gap)" in stats["name"].to_pylist()
    from jobs.sweep import results

    patched = results(run_dir, "patch.parquet")  # both units patch every head of the 2 x 8
    assert patched.num_rows == 2 * 16 and patched["experiment"].value_counts().to_pylist() == [
        {"values": "0-validate", "counts": 16}, {"values": "1-patch", "counts": 16}]
    assert len({(r["cell"], r["layer"], r["head"]) for r in patched.to_pylist()}) == 32  # no duplicates
    uri = f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    validate_run = next(r for r in children if r.data.params["kind"] == "validate")
    assert {"importance_correlation/value", "importance_correlation/low", "importance_correlation/high"} \
        <= set(validate_run.data.metrics)  # stable keys: the same in every model's run, no values inside
    assert validate_run.data.params["verdict/importance_correlation"] in ("PASS", "FAIL", "INCONCLUSIVE")
    assert "seconds" in validate_run.data.metrics
    patch_run = next(r for r in children if r.data.params["kind"] == "patch")
    assert "spearman_attribution_vs_exact" in patch_run.data.metrics
    capsys.readouterr()

    stamps = {p: p.stat().st_mtime_ns for p in run_dir.glob("model=*/experiment=*/cell.json")}
    assert main(["sweep", str(config), "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps  # nothing recomputed
    assert len(mlflow_runs(uri)) == 3  # and nothing logged twice
    assert results(run_dir, "patch.parquet").num_rows == 2 * 16  # and no rows twice

    # the cross-model report of the run goes to the parent run too (one model: no scaling fit)
    assert main(["report", str(run_dir), "--resamples", "50", "--permutations", "20"]) == 0
    said = capsys.readouterr().out
    assert "logged the report's summary" in said and (run_dir / "report" / "report.html").is_file()
    parent = next(r for r in mlflow_runs(uri) if "mlflow.parentRunId" not in r.data.tags)
    assert any(k.startswith("report/") for k in parent.data.metrics)
    assert {v for k, v in parent.data.tags.items() if k.startswith("verdict/")} <= {"PASS", "FAIL", "INCONCLUSIVE"}
    assert any(k.startswith("verdict/") for k in parent.data.tags)

    # the same run id with another config is refused, nothing touched
    other = write_sweep(tmp_path / "other.yaml", organism_cache, workers=3)
    assert main(["sweep", str(other), "--out", str(out)]) == 2
    assert "belongs to a different sweep config" in capsys.readouterr().err


def test_unreachable_store_keeps_results_and_track_uploads_later(organism_cache, tmp_path, capsys):
    config = {"name": "u", "models": [str(organism_cache)], "tracking_uri": "http://127.0.0.1:9",
              "experiments": [{"kind": "patch", "params": {"task": "ioi", "n_examples": 4, "layers": [0]}}]}
    path = tmp_path / "u.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "runs"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "is unreachable" in said and f"eigengap track {out / 'u'}" in said
    assert next((out / "u").glob("model=*/experiment=0-patch/patch.parquet")).is_file()
    uri = f"sqlite:///{tmp_path / 'later.db'}"
    assert main(["track", str(out / "u"), "--tracking-uri", uri]) == 0
    assert len(mlflow_runs(uri)) == 2  # the parent and the one unit


@pytest.mark.parametrize("config, message", [
    ({"name": "x", "models": ["organism-xs"], "experiments": [{"kind": "train"}]}, "experiments.0.kind"),
    ({"name": "x", "models": ["organism-xs"], "experiments": [{"kind": "patch", "params": {"task": "ioi", "ridge": 1}}]},
     "experiments.0.params.ridge: Extra inputs are not permitted"),
    ({"name": "x", "models": [], "experiments": [{"kind": "scan"}]}, "models: List should have at least 1 item"),
    ({"name": "x", "models": ["m"], "experiments": [{"kind": "steer", "params": {"kl_budget": -1}}]},
     "experiments.0.params.kl_budget: Input should be greater than 0"),
    ({"name": "x", "models": ["EleutherAI/pythia-410m"], "seeds": [0, 1], "experiments": [{"kind": "scan"}]},
     "models: 'EleutherAI/pythia-410m' has no training seed"),
    ({"name": "x", "models": ["organism-s?seed=2"], "seeds": [0, 1], "experiments": [{"kind": "scan"}]},
     "models: 'organism-s?seed=2' already names a seed"),
    ({"name": "x", "models": ["organism-s"], "seeds": [1, 1], "experiments": [{"kind": "scan"}]},
     "seeds: seeds must be distinct"),
])
def test_invalid_sweep_config(tmp_path, capsys, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_example_sweeps_are_valid():
    from pathlib import Path

    from jobs.sweep import read_sweep, cells_of

    for path in sorted(Path(__file__).parent.parent.glob("sweeps/*.yaml")):
        config = read_sweep(path)
        assert cells_of(config), path
    population = read_sweep(Path(__file__).parent.parent / "sweeps" / "organisms.yaml").models
    assert len(population) == 4 * 5 and population[:3] == ["organism-xs", "organism-xs?seed=1", "organism-xs?seed=2"]
    assert population[-1] == "organism-l?seed=4"


def test_seeds_expand_organisms_and_random_twins():
    from jobs.sweep import SweepConfig, cells_of

    config = SweepConfig.model_validate({"name": "p", "models": ["organism-xs", "random:gpt2?layers=2"], "seeds": [0, 3],
                                         "experiments": [{"kind": "scan"}]})
    assert config.models == ["organism-xs", "organism-xs?seed=3", "random:gpt2?layers=2&seed=0",
                             "random:gpt2?layers=2&seed=3"]
    assert len(cells_of(config)) == 4
    again = SweepConfig.model_validate(config.model_dump())  # what sweep.json stores validates to itself
    assert again.models == config.models


def test_unreachable_ray_address_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n")
    assert main(["scan", "--model", "random:pythia-410m?layers=2&hidden=64&heads=4&vocab=512", "--prompts", str(prompts),
                 "--out", str(tmp_path / "o"), "--executor", "ray", "--ray-address", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Ray cluster at '127.0.0.1:9'" in err[0]
    assert not (tmp_path / "o" / "scan.parquet").exists()


def test_sweep_survives_a_killed_worker(organism_cache, tmp_path, ray_cluster):
    """A worker process killed mid-sweep is restarted by Ray and its unit retried: the final
    table has every (head, example) exactly once and equals a local run."""
    import threading
    import time

    import psutil

    params = {"task": "ioi", "n_examples": 32, "heads_per_unit": 1}
    config = {"name": "k", "models": [str(organism_cache)], "executor": "ray", "workers": 2,
              "experiments": [{"kind": "patch", "params": params}]}
    path = tmp_path / "k.yaml"
    path.write_text(yaml.safe_dump(config))
    killed = []

    def killer():  # kills the first worker actor process it sees, as soon as it sees it
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for proc in psutil.process_iter(["cmdline"]):
                if any("ModelWorker" in part for part in (proc.info["cmdline"] or [])):
                    try:
                        proc.kill()
                    except psutil.NoSuchProcess:
                        continue
                    killed.append(proc.pid)
                    return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    assert main(["sweep", str(path), "--out", str(tmp_path / "runs")]) == 0
    thread.join(timeout=5)
    assert killed, "no worker process was found to kill"
    remote = pq.read_table(next((tmp_path / "runs" / "k").glob("model=*/experiment=0-patch/patch_examples.parquet")))
    keys = list(zip(remote["layer"].to_pylist(), remote["head"].to_pylist(), remote["example"].to_pylist()))
    assert len(keys) == len(set(keys)) == 2 * 8 * 32  # every unit exactly once
    assert main(["patch", "--model", str(organism_cache), "--out", str(tmp_path / "local"),
                 *[f"--{k.replace('_', '-')}={v}" for k, v in params.items()]]) == 0
    local = pq.read_table(tmp_path / "local" / "patch_examples.parquet")
    assert local.equals(remote)
