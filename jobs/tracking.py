"""MLflow tracking of sweep runs: one parent run per sweep run, one child run per cell
(an experiment on a model) with its parameters, metrics (statistics, verdicts, timings) and
artifacts (Parquet, plots, reports).

The default store is embedded: ``sqlite:///RUN_DIR/mlflow.db`` with artifacts in
``RUN_DIR/mlartifacts`` (``mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`` shows
it); ``MLFLOW_TRACKING_URI`` or the sweep's ``tracking_uri`` points elsewhere. When the store
cannot be reached the results stay on disk and ``eigengap track RUN_DIR`` uploads them later.
Which cells are tracked is recorded in ``RUN_DIR/tracking.json``, so nothing is logged twice.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cluster.layout import Cell, RunLayout
from cluster.store import write_json

EXPERIMENT = "eigengap"


def metric_name(text: str) -> str:
    """``text`` as an MLflow metric/param/tag name (a model given as a path contributes
    slashes: MLflow refuses empty or dot path segments)."""
    name = re.sub(r"[^A-Za-z0-9_\-. /]+", "_", text)
    name = "/".join(part for part in name.split("/") if part.strip(" .")) or "_"
    return name[:250]


def cell_metrics(cell: Cell, cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Numbers and verdicts of one finished cell: its experiment kind's ``metrics`` (stable keys,
    see ``jobs.registry``) and the cell's wall time."""
    from jobs.registry import experiment

    metrics, params = experiment(cell.kind).metrics(cell_dir)
    marker = cell_dir / RunLayout.DONE
    if marker.is_file():
        metrics = {**metrics, "seconds": float(json.loads(marker.read_text())["seconds"])}
    return metrics, params


def default_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"


def empty_store(directory: Path) -> Path:
    """A new, empty embedded store (MLflow's schema migrations take seconds: done ahead, in the
    tracking process, while the sweep validates its config)."""
    from mlflow.tracking import MlflowClient

    path = directory / "mlflow.db"
    MlflowClient(f"sqlite:///{path.resolve()}").search_experiments(max_results=1)
    return path


class Tracker:
    """Logs finished cells of a sweep run; disabled (with a message) when the store is unreachable."""

    def __init__(self, uri: str, enabled: bool, run_dir: Path):
        self.uri, self.enabled, self.run_dir = uri, enabled, run_dir

    @classmethod
    def open(cls, uri: str | None, run_dir: Path, echo=print, template: Path | None = None) -> Tracker:
        """Reach the store (``uri``, else MLFLOW_TRACKING_URI, else the run's embedded SQLite
        file, created from ``template``, an empty store made beforehand, when there is one)."""
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = uri or default_uri(run_dir)
        embedded = run_dir / "mlflow.db"
        if template is not None and uri == f"sqlite:///{embedded.resolve()}" and not embedded.exists():
            import shutil

            shutil.copyfile(template, embedded.with_suffix(".db.tmp"))
            os.replace(embedded.with_suffix(".db.tmp"), embedded)
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

    def track_all(self, run_dir: Path, cells: list[Cell]) -> int:
        """Log every finished, not yet tracked cell; returns how many were logged."""
        if not self.enabled:
            return 0
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        layout = RunLayout(run_dir)
        state_file = layout.tracking_file
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if state.get("uri") != self.uri:
            state = {"uri": self.uri, "parent": None, "cells": {}}
        experiment = client.get_experiment_by_name(EXPERIMENT)
        if experiment is None:
            local = self.uri.startswith("sqlite:///") and os.environ.get("MLFLOW_TRACKING_URI") is None
            experiment_id = client.create_experiment(
                EXPERIMENT, artifact_location=(run_dir / "mlartifacts").resolve().as_uri() if local else None)
        else:
            experiment_id = experiment.experiment_id
        sweep = layout.sweep_state()
        if state["parent"] is None:
            parent = client.create_run(experiment_id, run_name=run_dir.name,
                                       tags={"eigengap.sweep": sweep["config"]["name"], "eigengap.run_dir": str(run_dir)})
            client.log_batch(parent.info.run_id, params=[
                Param("config_hash", sweep["config_hash"]), Param("models", ",".join(sweep["config"]["models"])[:6000]),
                Param("experiments", ",".join(e["kind"] for e in sweep["config"]["experiments"]))])
            state["parent"] = parent.info.run_id
            write_json(state, state_file)
        logged = 0
        for cell in cells:
            cell_dir = layout.cell_dir(cell)
            if cell.name in state["cells"] or not layout.finished(cell):
                continue
            child = client.create_run(experiment_id, run_name=f"{cell.model} {cell.kind}",
                                      tags={"mlflow.parentRunId": state["parent"], "eigengap.cell": cell.name})
            run_id = child.info.run_id
            metrics, verdicts = cell_metrics(cell, cell_dir)
            params = {"model": cell.model, "kind": cell.kind, **{k: json.dumps(v)[:6000] for k, v in cell.params.items()},
                      **verdicts}
            client.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                             params=[Param(k, str(v)) for k, v in params.items()])
            client.log_artifacts(run_id, str(cell_dir))
            client.set_terminated(run_id)
            state["cells"][cell.name] = run_id
            write_json(state, state_file)
            logged += 1
        client.set_terminated(state["parent"])
        return logged


def log_report(run_dir: Path, report_dir: Path, echo=print) -> str | None:
    """Log a cross-model report to the sweep's MLflow runs: its summary metrics (keys of
    identifiers: model specs, population names, verdict and quantity keys), verdicts as tags, the
    page and tables as artifacts to the parent run; each model's calibrated threshold and its
    AUROC (``calibrated_threshold/value|low|high``, ``calibration_auroc/...``: summary.json's
    ``cell_metrics``) to the child run of the cell it was calibrated on, so that MLflow's compare
    view lines the models' thresholds up. Returns the parent run id, or None (with one line saying
    why) when the run was never tracked or the store cannot be reached."""
    state_file = run_dir / "tracking.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if not state.get("parent"):
        echo(f"not logged to MLflow: {run_dir} has no tracked parent run (run `eigengap track {run_dir}` first)")
        return None
    tracker = Tracker.open(state["uri"], run_dir, echo)
    if not tracker.enabled:
        return None
    from mlflow.entities import Metric, RunTag
    from mlflow.tracking import MlflowClient

    summary = json.loads((report_dir / "summary.json").read_text())
    client = MlflowClient(tracker.uri)
    parent = state["parent"]
    metrics = [Metric(metric_name(f"report/{k}"), float(v), 0, 0) for k, v in summary["metrics"].items()]
    tags = [RunTag(metric_name(f"verdict/{k}")[:250], v) for k, v in summary["verdicts"].items()]
    for i in range(0, max(len(metrics), len(tags)), 500):  # MLflow's batch limits
        client.log_batch(parent, metrics=metrics[i:i + 500], tags=tags[i:i + 500])
    untracked = []
    for cell, values in summary["cell_metrics"].items():
        run_id = state.get("cells", {}).get(cell)
        if run_id is None:
            untracked.append(cell)
        elif values:  # every model's cell gets every key (NaN where undefined): the compare view lines them up
            client.log_batch(run_id, metrics=[Metric(k, float("nan") if v is None else float(v), 0, 0)
                                              for k, v in values.items()])
    if untracked:
        echo(f"calibrated thresholds not logged to MLflow for {len(untracked)} cell(s) without a tracked run: "
             + ", ".join(untracked))
    client.log_artifacts(parent, str(report_dir), artifact_path="report")
    return parent


_STATE: dict = {}
"""The tracking process's state between requests (the empty store made by warm)."""


def _handle(request: dict) -> dict:
    """One request of the tracking process: warm (import MLflow), open (reach or create the store
    and the parent run), track (log finished cells)."""
    if request["op"] == "warm":  # import MLflow; make an empty store if the run will need one
        from mlflow.tracking import MlflowClient  # noqa: F401

        if request["scratch"]:
            _STATE["template"] = empty_store(Path(request["scratch"]))
        return {}
    run_dir = Path(request["run_dir"])
    if request["op"] == "open":
        messages: list[str] = []
        tracker = Tracker.open(request["uri"], run_dir, messages.append, template=_STATE.get("template"))
        tracker.track_all(run_dir, [])
        return {"uri": tracker.uri, "enabled": tracker.enabled, "messages": messages}
    from jobs import registry

    for kind, module in request["kinds"].items():  # kinds registered at run time (plug-ins) are known here too
        if registry.KINDS.get(kind) != module:
            registry.register(kind, module)
    cells = [Cell(**c) for c in request["cells"]]
    return {"logged": Tracker(request["uri"], request["enabled"], run_dir).track_all(run_dir, cells)}


def serve() -> None:
    """The tracking process: one JSON request per line on stdin, one JSON reply per line on the
    original stdout (anything else printed goes to stderr)."""
    import sys
    import traceback

    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        try:
            reply = {"ok": _handle(json.loads(line))}
        except Exception as err:  # reported to the sweep, which raises it
            reply = {"error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc()}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


class BackgroundTracker:
    """A Tracker working in its own process (``python -m jobs.tracking``), started with the
    sweep: importing MLflow, creating the store and the parent run overlap the sweep's validation
    and compute instead of adding to them. ``open`` once the run directory is known (nothing is
    written before); ``finish`` logs the finished cells and returns the Tracker."""

    def __init__(self, echo=print):
        import subprocess
        import sys
        import tempfile
        from concurrent.futures import ThreadPoolExecutor

        import jobs

        root = str(Path(jobs.__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
        self.process = subprocess.Popen([sys.executable, "-m", "jobs.tracking"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env, text=True)
        self.calls = ThreadPoolExecutor(1)  # requests run in order, one at a time
        self.echo, self.reported, self.opened, self.run_dir = echo, False, None, None
        embedded = "MLFLOW_TRACKING_URI" not in os.environ
        self.scratch = tempfile.mkdtemp(prefix="eigengap-mlflow-") if embedded else None
        self._call({"op": "warm", "scratch": self.scratch})

    def _call(self, request: dict):
        def ask():
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"the tracking process exited (status {self.process.wait()})")
            reply = json.loads(line)
            if "error" in reply:
                raise RuntimeError(f"tracking failed: {reply['error']}\n{reply['trace']}")
            return reply["ok"]

        return self.calls.submit(ask)

    def open(self, uri: str | None, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.opened = self._call({"op": "open", "uri": uri, "run_dir": str(run_dir)})

    def poll(self) -> None:
        """Say as soon as it is known that the store is unreachable."""
        if self.opened is not None and not self.reported and self.opened.done():
            self._report()

    def _report(self) -> dict:
        state = self.opened.result()
        if not self.reported:
            for message in state["messages"]:
                self.echo(message)
            self.reported = True
        return state

    def finish(self, cells: list[Cell]) -> Tracker:
        from jobs import registry

        try:
            state = self._report()
            if state["enabled"]:
                self._call({"op": "track", "uri": state["uri"], "enabled": True, "run_dir": str(self.run_dir),
                            "cells": [c.as_dict() for c in cells], "kinds": dict(registry.KINDS)}).result()
            return Tracker(state["uri"], state["enabled"], self.run_dir)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the tracking process: at once while it only imports; once it has started writing
        the store, after it finishes (a store is never left half-created)."""
        if self.opened is None:
            self.process.kill()
        self.calls.shutdown(wait=True, cancel_futures=True)
        if self.process.stdin and not self.process.stdin.closed:
            try:
                self.process.stdin.close()
            except BrokenPipeError:
                pass
        self.process.wait()
        if self.scratch:
            import shutil

            shutil.rmtree(self.scratch, ignore_errors=True)


if __name__ == "__main__":
    serve()
