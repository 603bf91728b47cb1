"""``eigengap regularize`` on organism-xs: every arm x 3 training seeds, training plus measurements,
wall-clock (issue 20; target: within 15 minutes on the 2-core CPU).

Runs the command itself (``jobs.regularize.run``) into ``--out`` with the organism cache at
``--cache``: an empty cache times everything including the baseline organisms' training; the
default cache (where the baselines are usually trained already, being the suite's organisms) times
the arms alone. ``--workers 2`` trains the missing models in 2 processes of 1 torch thread each.
Per model the training seconds come from the job's part files (with workers they overlap: their
sum exceeds the wall time).

    .venv/bin/python -m benchmarks.bench_regularize --cache /tmp/empty-cache --out /tmp/regularize-bench
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from benchmarks.common import record

TARGET_S = 15 * 60


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, required=True, help="organism cache (EIGENGAP_CACHE) to train into")
    parser.add_argument("--out", type=Path, required=True, help="the job's output directory (must not hold results)")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", default=None, help="default: every arm")
    parser.add_argument("--workers", type=int, default=1, help="training processes (the job's --workers)")
    args = parser.parse_args(argv)
    os.environ["EIGENGAP_CACHE"] = str(args.cache)
    from jobs.config import validate
    from jobs.regularize import PARTS, RegularizeConfig, run

    cached_before = sorted(p.name for p in (args.cache / "organisms").glob("organism-xs*")) \
        if (args.cache / "organisms").is_dir() else []
    config = validate(RegularizeConfig, {"organism": "xs", "seeds": args.seeds, "out": args.out,
                                         "workers": args.workers,
                                         **({"arms": args.arms} if args.arms else {})})
    t0 = time.perf_counter()
    run(config, echo=lambda *a: None)
    total = time.perf_counter() - t0
    parts = [json.loads(p.read_text()) for p in sorted((args.out / PARTS).glob("*.json"))]
    trained = [p for p in parts if p["entry"] not in cached_before]
    train_s = sum(p["training"]["train_seconds"] for p in trained)
    result = {"benchmark": "regularize", "organism": "organism-xs", "seeds": args.seeds, "arms": config.arm_names(),
              "models": len(parts), "trained_here": len(trained), "cached_before": len(parts) - len(trained),
              "total_s": round(total, 1), "training_s": round(train_s, 1),
              "measurement_s": round(total - train_s, 1),
              "train_s_per_arm": {a: [p["training"]["train_seconds"] for p in trained if p["arm"] == a]
                                  for a in config.arm_names()},
              "workers": args.workers, "torch_threads": torch.get_num_threads(), "target_s": TARGET_S,
              "target_met": total <= TARGET_S}
    print(f"organism-xs, {len(config.arm_names())} arms x seeds {args.seeds}: {total / 60:.1f} min "
          f"({len(trained)} models trained here, {train_s / 60:.1f} min of training; target 15 min: "
          f"{'met' if total <= TARGET_S else 'MISSED'})", flush=True)
    name = "regularize" if not cached_before else "regularize_arms_only"
    record(name if args.workers == 1 else f"{name}_workers{args.workers}", result)
    return result


if __name__ == "__main__":
    main()
