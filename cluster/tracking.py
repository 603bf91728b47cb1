"""MLflow tracking of sweep runs: one parent run per sweep run, one child run per unit
(model x experiment) with its parameters, metrics (statistics, verdicts, timings) and
artifacts (Parquet, plots, reports).

The default store is embedded: ``sqlite:///RUN_DIR/mlflow.db`` with artifacts in
``RUN_DIR/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`` shows
it); ``MLFLOW_TRACKING_URI`` or the sweep's ``tracking_uri`` points elsewhere. When the store
cannot be reached the results stay on disk and ``eigengap track RUN_DIR`` uploads them later.
Which units are tracked is recorded in ``RUN_DIR/tracking.json``, so nothing is logged twice.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import pyarrow.parquet as pq

from cluster.store import write_json

EXPERIMENT = "eigengap"


def metric_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-. /]+", "_", text)[:250]


def unit_metrics(kind: str, unit_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Numbers and verdicts of one finished unit, read from its result files."""
    metrics: dict[str, float] = {}
    params: dict[str, str] = {}
    info = unit_dir / "unit.json"
    if info.is_file():
        metrics["seconds"] = float(json.loads(info.read_text())["seconds"])
    stats_file = {"validate": "validate.parquet", "steer": "verdicts.parquet"}.get(kind)
    if stats_file and (unit_dir / stats_file).is_file():
        for r in pq.read_table(unit_dir / stats_file).to_pylist():
            for key in ("value", "low", "high"):
                if r[key] is not None and math.isfinite(r[key]):
                    metrics[metric_name(f"{r['name']} {key}")] = float(r[key])
            if r.get("verdict"):
                params[metric_name(f"verdict {r['name']}")[:250]] = r["verdict"]
    if kind == "steer" and (unit_dir / "strategies.parquet").is_file():
        for r in pq.read_table(unit_dir / "strategies.parquet").to_pylist():
            metrics[f"effect {r['strategy']}"] = float(r["effect"])
    if kind == "patch" and (unit_dir / "patch.parquet").is_file():
        values = [v for v in pq.read_table(unit_dir / "patch.parquet")["restoration"].to_pylist() if v is not None]
        if values:
            metrics["max restoration"] = float(max(values))
        params_file = json.loads((unit_dir / "params.json").read_text())
        if "spearman_attribution_vs_exact" in params_file:
            metrics["spearman attribution vs exact"] = float(params_file["spearman_attribution_vs_exact"])
    if kind in ("scan", "validate") and (unit_dir / "scan.parquet").is_file():
        rows = pq.read_table(unit_dir / "scan.parquet").select(["layer", "gap"]).to_pylist()
        for layer in sorted({r["layer"] for r in rows}):
            gaps = [r["gap"] for r in rows if r["layer"] == layer and r["gap"] is not None and math.isfinite(r["gap"])]
            if gaps:
                metrics[f"min gap layer {layer}"] = min(gaps)
    return metrics, params


class Tracker:
    """Logs finished units of a sweep run; disabled (with a message) when the store is unreachable."""

    def __init__(self, uri: str, enabled: bool, run_dir: Path):
        self.uri, self.enabled, self.run_dir = uri, enabled, run_dir

    @classmethod
    def open(cls, uri: str | None, run_dir: Path, echo=print) -> Tracker:
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        probe_env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
        saved = {k: os.environ.get(k) for k in probe_env}
        os.environ.update(probe_env)  # an unreachable server fails in seconds, not after minutes of retries
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(uri).search_experiments(max_results=1)
        except Exception as err:  # any failure to reach the store: keep results on disk, say so
            echo(f"eigengap: the tracking store {uri} is unreachable ({type(err).__name__}: "
                 f"{str(err).splitlines()[0][:160] if str(err) else ''}); results stay in {run_dir}; "
                 f"upload them later with: eigengap track {run_dir}")
            return cls(uri, False, run_dir)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return cls(uri, True, run_dir)

    def where(self) -> str:
        if not self.enabled:
            return f"not tracked (store unreachable): eigengap track {self.run_dir}"
        if self.uri.startswith("sqlite:///"):
            return f"MLflow: mlflow ui --backend-store-uri {self.uri}"
        return f"MLflow: {self.uri}"

    def track_all(self, run_dir: Path, units) -> int:
        """Log every finished, not yet tracked unit; returns how many were logged."""
        if not self.enabled:
            return 0
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        state_file = run_dir / "tracking.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if state.get("uri") != self.uri:
            state = {"uri": self.uri, "parent": None, "units": {}}
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            local = self.uri.startswith("sqlite:///") and os.environ.get("MLFLOW_TRACKING_URI") is None
            experiment_id = client.create_experiment(
                EXPERIMENT, artifact_location=(run_dir / "mlartifacts").resolve().as_uri() if local else None)
        else:
            experiment_id = experiment.experiment_id
        sweep = json.loads((run_dir / "sweep.json").read_text())
        if state["parent"] is None:
            parent = client.create_run(experiment_id, run_name=run_dir.name,
                                       tags={"eigengap.sweep": sweep["config"]["name"], "eigengap.run_dir": str(run_dir)})
            client.log_batch(parent.info.run_id, params=[
                Param("config_hash", sweep["config_hash"]), Param("models", ",".join(sweep["config"]["models"])[:6000]),
                Param("experiments", ",".join(e["kind"] for e in sweep["config"]["experiments"]))])
            state["parent"] = parent.info.run_id
            write_json(state, state_file)
        logged = 0
        for unit in units:
            unit_dir = run_dir / unit.name
            if unit.name in state["units"] or not (unit_dir / "unit.json").is_file():
                continue
            child = client.create_run(experiment_id, run_name=f"{unit.model} {unit.kind}",
                                      tags={"mlflow.parentRunId": state["parent"], "eigengap.unit": unit.name})
            run_id = child.info.run_id
            metrics, verdicts = unit_metrics(unit.kind, unit_dir)
            params = {"model": unit.model, "kind": unit.kind, **{k: json.dumps(v)[:6000] for k, v in unit.params.items()},
                      **verdicts}
            client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                             params=[Param(k, str(v)) for k, v in params.items()])
            client.log_artifacts(run_id, str(unit_dir))
            client.set_terminated(run_id)
            state["units"][unit.name] = run_id
            write_json(state, state_file)
            logged += 1
        client.set_terminated(state["parent"])
        return logged
