"""Sweeps (issue 6): 1 vs 2 Ray workers on a compute-bound patching sweep (target >= 1.6x on
the 2-core machine), and the fixed overhead of a sweep on a tiny job (target <= 10 s).

    python -m benchmarks.bench_sweep [--examples 4096] [--repeats 2]

Both run sweeps as users do. Speed-up: a Ray head on 127.0.0.1 (``ray start --head``, 2 CPUs)
and each sweep submitted with ``ray job submit -- python -m jobs.sweep CONFIG``: exact patching
of every head of organism-l on the built-in IOI task, data-parallel units of 64 examples. The
compared figure is the job's own time (cell.json: actors started, model loaded in each, every
unit, results gathered); it holds ~9 s of fixed cost per job here (an actor process importing
torch and transformers), which is why the sweep is made large enough to be compute-bound.
Overhead: a sweep of one tiny patch job (organism-xs, 4 examples, one layer, local executor)
run as ``python -m jobs.sweep``, process wall time minus the job's own time (Python start-up,
imports, config validation, MLflow store creation and tracking).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import record

TARGET_SPEEDUP = 1.6
TARGET_OVERHEAD_S = 10.0


def run_sweep(config: dict, root: Path, name: str) -> tuple[float, float]:
    """(process wall seconds, the cell's job seconds) of one sweep run."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "name": name}))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "jobs.sweep", str(path), "--out", str(root / "runs")], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    cell = json.loads(next((root / "runs" / name).glob("model=*/experiment=*/cell.json")).read_text())
    return wall, cell["seconds"]


def submitted(head, config: dict, root: Path, name: str) -> tuple[float, float]:
    """(submit-to-done wall seconds, the cell's job seconds) of one sweep sent with ray job submit."""
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**config, "name": name}))
    start = time.perf_counter()
    done = head.submit(["python", "-m", "jobs.sweep", str(path), "--out", str(root / "runs")])
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"ray job submit failed ({done.returncode}): {done.stderr[-2000:]}")
    cell = json.loads(next((root / "runs" / name).glob("model=*/experiment=*/cell.json")).read_text())
    return wall, cell["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from cluster.head import LocalHead
    from spectral.organisms import organism_dir

    organism_dir("organism-l")  # trained before timing
    organism_dir("organism-xs")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        patch = {"task": "ioi", "n_examples": args.examples, "examples_per_unit": 64}
        with LocalHead(num_cpus=2) as head:
            for workers in (1, 2):
                runs = [submitted(head, {"models": ["organism-l"], "executor": "ray", "workers": workers,
                                         "experiments": [{"kind": "patch", "params": patch}]}, root, f"w{workers}r{i}")
                        for i in range(args.repeats)]
                rows[workers] = {"submit_wall_s": [r[0] for r in runs], "job_s": [r[1] for r in runs]}
                print(f"{workers} worker(s): job {min(rows[workers]['job_s']):.1f} s, "
                      f"submit to done {min(rows[workers]['submit_wall_s']):.1f} s", flush=True)
        tiny = [run_sweep({"models": ["organism-xs"], "experiments": [
            {"kind": "patch", "params": {"task": "ioi", "n_examples": 4, "layers": [0]}}]}, root, f"tiny{i}")
                for i in range(3)]
    speedup = min(rows[1]["job_s"]) / min(rows[2]["job_s"])
    overheads = [wall - job for wall, job in tiny]
    overhead = sorted(overheads)[len(overheads) // 2]
    print(f"speed-up 1 -> 2 workers: {speedup:.2f}x (target >= {TARGET_SPEEDUP}); "
          f"fixed overhead {overhead:.1f} s (target <= {TARGET_OVERHEAD_S:g} s)")
    record("sweep", {"patching_sweep": {"model": "organism-l", "examples": args.examples, "examples_per_unit": 64,
                                        "launch": "ray start --head (2 CPUs) + ray job submit",
                                        "workers": rows, "speedup_1_to_2_workers": speedup,
                                        "target_speedup_min": TARGET_SPEEDUP, "target_met": speedup >= TARGET_SPEEDUP},
                     "tiny_sweep": {"wall_s": [t[0] for t in tiny], "job_s": [t[1] for t in tiny],
                                    "overhead_s": overheads, "median_overhead_s": overhead,
                                    "target_overhead_max_s": TARGET_OVERHEAD_S,
                                    "target_met": overhead <= TARGET_OVERHEAD_S}})


if __name__ == "__main__":
    main()
