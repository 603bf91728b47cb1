"""Organism training with 30 training checkpoints vs without (target: ratio <= 1.15).

Both runs train organism-xs's recipe (2 layers, 8 heads, d_model 128, batch 32 x 48 tokens)
cut to ``--steps`` steps (default 300 of its 1,840; ``--steps 1840`` is the full recipe), one
torch thread, into a temporary directory: ``spectral.organisms.train.train`` end to end (data,
model, loop, final save), with ``checkpoints=0`` and ``checkpoints=30``. Fewer steps make the
ratio pessimistic: the 30 saves cost the same while the training shrinks. The two are timed
in alternation, ``--repeats`` rounds, so background load falls on both alike; the ratio is of
the medians. The time spent inside the checkpoint saves (``checkpoint_seconds`` of the
training report) is recorded too: it measures the saves alone, whatever else the machine runs.

    .venv/bin/python -m benchmarks.bench_checkpoints [--steps 300] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import record, timed
from spectral.organisms.suite import SUITE
from spectral.organisms.train import train

CHECKPOINTS = 30
TARGET_RATIO_MAX = 1.15


def measure(steps: int, repeats: int) -> dict:
    """Alternating timings of training without and with checkpoints."""
    plain = replace(SUITE["organism-xs"], steps=steps)
    kept = replace(plain, checkpoints=CHECKPOINTS)
    runs: dict[str, list[float]] = {"plain": [], "checkpoints": []}
    saving: list[float] = []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoints-") as tmp:
        for i in range(repeats):
            runs["plain"].append(timed(lambda: train(plain, Path(tmp) / f"plain-{i}", progress=False))[1])
            report, seconds = timed(lambda: train(kept, Path(tmp) / f"kept-{i}", progress=False))
            runs["checkpoints"].append(seconds)
            saving.append(report["checkpoint_seconds"])
    t_plain, t_kept = statistics.median(runs["plain"]), statistics.median(runs["checkpoints"])
    return {"recipe": plain.as_dict(), "checkpoints": CHECKPOINTS, "steps": steps, "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
            "plain_s_runs": [round(t, 2) for t in runs["plain"]],
            "checkpoints_s_runs": [round(t, 2) for t in runs["checkpoints"]],
            "ratio_per_round": [round(k / p, 3) for p, k in zip(runs["plain"], runs["checkpoints"])],
            "plain_s": round(t_plain, 2), "checkpoints_s": round(t_kept, 2), "ratio": round(t_kept / t_plain, 3),
            "saving_s_runs": saving, "saving_fraction": round(statistics.median(saving) / t_kept, 4),
            "target_met": t_kept / t_plain <= TARGET_RATIO_MAX}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps of the cut recipe (default 300)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds (default 2)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    row = measure(args.steps, args.repeats)
    print(f"organism-xs recipe at {args.steps} steps: plain {row['plain_s']:.1f} s, {CHECKPOINTS} checkpoints "
          f"{row['checkpoints_s']:.1f} s, ratio {row['ratio']:.3f} (target <= {TARGET_RATIO_MAX}: "
          f"{'met' if row['target_met'] else 'MISSED'}); the saves themselves {row['saving_fraction']:.1%} of the run",
          flush=True)
    result = {"benchmark": "checkpoints", "target_ratio_max": TARGET_RATIO_MAX, **row}
    record("checkpoints", result)
    return result


if __name__ == "__main__":
    main()
