"""``eigengap autosteer`` on organism-l end to end (target: <= 2 minutes on this 2-core CPU), and
the cost of the first-order prediction against the oracle grid it replaces (target: <= 5 %).

Each round runs the command line ``eigengap autosteer --model organism-l`` (training seed 0, recipe
v5; every strategy, the sentiment concept's 64 evaluation prompts, the defaults) in a fresh process,
timed from the shell: import, model load, every strategy, writing. Inside the run, params.json's
timing gives the oracle grid (every layer matched to the budget on the 64 neutral prompts and
measured on the evaluation prompts) and the theory strategy's choice (``first_order`` for every
layer on the 32 selection prompts and the neutral prompts: the closed form, no steered forward pass);
their ratio is the prediction's cost relative to the search it replaces. ``eigengap predict`` runs
once too, for its own ratio (its closed form on all 64 evaluation prompts against its per-layer
search). Medians over ``--repeats`` rounds.

    EIGENGAP_CACHE=... .venv/bin/python -m benchmarks.bench_autosteer [--repeats 2] [--model organism-l]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import record, timed

TARGET_SECONDS = 120.0
TARGET_PREDICT_RATIO = 0.05


def _run(args: list[str]) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1"}
    subprocess.run([sys.executable, "-m", "jobs.cli", *args], check=True, env=env, stdout=subprocess.DEVNULL)


def measure(model: str, repeats: int) -> dict:
    walls, inside, grid, theory = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="bench-autosteer-") as tmp:
        for i in range(repeats):
            out = Path(tmp) / f"autosteer-{i}"
            walls.append(timed(lambda: _run(["autosteer", "--model", model, "--out", str(out)]))[1])
            timing = json.loads((out / "params.json").read_text())["timing"]
            inside.append(timing["seconds"])
            grid.append(timing["oracle_grid_seconds"])
            theory.append(timing["choice_seconds/theory"])
        out = Path(tmp) / "predict"
        _run(["predict", "--model", model, "--out", str(out)])
        predict = json.loads((out / "params.json").read_text())["timing"]
    wall = statistics.median(walls)
    ratio = statistics.median(t / g for t, g in zip(theory, grid))
    return {"model": model, "repeats": repeats, "wall_s_runs": [round(w, 2) for w in walls], "wall_s": round(wall, 2),
            "in_run_s": round(statistics.median(inside), 2), "oracle_grid_s": round(statistics.median(grid), 3),
            "theory_choice_s": round(statistics.median(theory), 3), "theory_over_grid": round(ratio, 4),
            "predict_first_order_s": round(predict["seconds_first_order"], 3),
            "predict_search_s": round(predict["seconds_search"], 3),
            "predict_over_search": round(predict["first_order_over_search"], 4),
            "target_seconds_met": wall <= TARGET_SECONDS,
            "target_predict_met": max(ratio, predict["first_order_over_search"]) <= TARGET_PREDICT_RATIO}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism-l")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    row = measure(args.model, args.repeats)
    print(f"autosteer {args.model}: {row['wall_s']:.1f} s wall (in the run {row['in_run_s']:.1f} s; target <= "
          f"{TARGET_SECONDS:.0f} s: {'met' if row['target_seconds_met'] else 'MISSED'}); first-order choice "
          f"{row['theory_choice_s']:.2f} s vs the oracle grid {row['oracle_grid_s']:.2f} s = {row['theory_over_grid']:.1%}; "
          f"predict's closed form {row['predict_first_order_s']:.2f} s vs its search {row['predict_search_s']:.2f} s = "
          f"{row['predict_over_search']:.1%} (target <= {TARGET_PREDICT_RATIO:.0%}: "
          f"{'met' if row['target_predict_met'] else 'MISSED'})", flush=True)
    result = {"benchmark": "autosteer", "target_seconds": TARGET_SECONDS, "target_predict_ratio": TARGET_PREDICT_RATIO,
              **row}
    record("autosteer", result)
    return result


if __name__ == "__main__":
    main()
