"""End to end as on a cluster: a Ray head started with `ray start --head` (dashboard on
127.0.0.1), an organism sweep sent with `ray job submit`, its Parquet rows and MLflow runs
checked, the cluster stopped."""

import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster.head import LocalHead

pytestmark = pytest.mark.slow


def live_members(group: int) -> list[int]:
    """Pids of the processes in process group ``group`` that are not zombies."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def test_sweep_submitted_to_a_ray_head(organism_cache, tmp_path):
    config = {"name": "organism-e2e", "models": [str(organism_cache)], "executor": "ray", "workers": 2,
              "experiments": [{"kind": "validate", "params": {"n_examples": 16}},
                              {"kind": "patch", "params": {"task": "ioi", "n_examples": 16, "examples_per_unit": 8}}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "runs"
    with LocalHead(num_cpus=2) as head:
        assert head.dashboard.startswith("http://127.0.0.1:")
        done = head.submit(["python", "-m", "jobs.sweep", str(path), "--out", str(out)], timeout=480)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "SUCCEEDED" in done.stdout + done.stderr or "succeeded" in done.stdout + done.stderr
        group = head.process.pid
    # the cluster is gone: no live process of its group is left (zombies wait for PID 1 to reap them)
    deadline = time.monotonic() + 20
    while live_members(group) and time.monotonic() < deadline:
        time.sleep(1)
    assert not live_members(group)

    run_dir = out / "organism-e2e"
    units = sorted(p.parent.relative_to(run_dir).as_posix() for p in run_dir.glob("model=*/experiment=*/cell.json"))
    model = units[0].split("/")[0]
    assert units == [f"{model}/experiment=0-validate", f"{model}/experiment=1-patch"]
    scan = pq.read_table(run_dir / units[0] / "scan.parquet")
    assert scan.num_rows == 2 * 8  # organism-xs: 2 layers x 8 heads
    assert {r["verdict"] for r in pq.read_table(run_dir / units[0] / "validate.parquet").to_pylist()} - {""} <= {
        "PASS", "FAIL", "INCONCLUSIVE"}
    patch = pq.read_table(run_dir / units[1] / "patch_examples.parquet")
    assert patch.num_rows == 16 * 16 and sorted(set(patch["example"].to_pylist())) == list(range(16))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("eigengap")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(parents) == 1 and len(children) == 2
    assert {r.data.params["kind"] for r in children} == {"validate", "patch"}
    assert all(r.info.status == "FINISHED" for r in runs)


def test_ray_cli_is_installed():
    """`ray start` / `ray job submit` come with the project (ray[default])."""
    done = subprocess.run([str(LocalHead().ray), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "ray" in done.stdout.lower()
