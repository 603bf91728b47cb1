"""Path patching of every sender head into one receiver: eigengap's batched replay vs the
one-path-at-a-time loop (issue 14, target >= 3x faster than the loop on organism-l).

    python -m benchmarks.bench_path_patching [--models organism-l] [--examples 32] [--repeats 3] [--threads N]

eigengap (``spectral.circuits.paths.path_patch``): two cached runs (clean, corrupt), then
senders x examples stacked along the batch, one replay per chunk from the cached residual
entering the receiver's layer, recomputing only the positions from the first clean/corrupt
difference on. Loop: for every sender, a full forward pass of the corrupt prompts with that
sender's clean-minus-corrupt write added to the receiver input (``receiver_deltas``), the
same computation as the plain-hook reference the tests compare with. Both include the
clean/corrupt caching. Receivers: a query input of the last layer and a key input of the
middle layer (senders: every head before it), and the logits (senders: every head).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.bench_patching import task_for
from benchmarks.common import interleaved_times, record
from spectral.causal.patching import cache_run, logit_diff
from spectral.circuits.paths import _deltas, _sender_change, path_patch
from spectral.circuits.split import receiver_deltas
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model

MODELS = ["organism-l"]
TARGET = 3.0


def batched(adapter, task, senders, receivers):
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    return path_patch(adapter, task, clean, corrupt, senders, receivers).patched


@torch.no_grad()
def one_path_loop(adapter, task, senders, receivers):
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    out = torch.empty(len(senders), len(task))
    for i, sender in enumerate(senders):
        change = _sender_change(adapter, clean, corrupt, sender)  # (n, pos, d_model)
        with receiver_deltas(adapter, _deltas(adapter, receivers, change, task, 1, 0, logits_at_last=False)):
            logits = adapter.model(input_ids=task.corrupt, attention_mask=task.mask, use_cache=False).logits
        out[i] = logit_diff(logits, task)
    return out


def bench(spec: str, n: int, repeats: int) -> list[dict]:
    loaded = load_model(spec)
    adapter = HeadAdapter(loaded.model)
    task = task_for(loaded, n)
    last = adapter.n_layers - 1
    mid = adapter.n_layers // 2
    cases = {f"({last}, 0, q)": ([(l, h) for l in range(last) for h in range(adapter.n_heads)], [(last, 0, "q")]),
             f"({mid}, 0, k)": ([(l, h) for l in range(mid) for h in range(adapter.n_heads)], [(mid, 0, "k")]),
             "logits": ([(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_heads)], [("logits",)])}
    rows = []
    for name, (senders, receivers) in cases.items():
        fns = {"eigengap_batched": lambda: batched(adapter, task, senders, receivers),
               "one_path_loop": lambda: one_path_loop(adapter, task, senders, receivers)}
        values = {k: fn() for k, fn in fns.items()}  # warm-up, and the answers to compare
        runs = interleaved_times(fns, repeats)
        med = {k: statistics.median(ts) for k, ts in runs.items()}
        row = {"model": spec, "receiver": name, "senders": len(senders), "layers": adapter.n_layers,
               "heads": adapter.n_heads, "examples": len(task), "positions": int(task.clean.shape[1]),
               "seconds": runs, "median_s": med,
               "speedup_vs_loop": med["one_path_loop"] / med["eigengap_batched"],
               "max_abs_difference_vs_loop": float((values["eigengap_batched"] - values["one_path_loop"]).abs().max()),
               "device": str(loaded.model.device)}
        row["target_met"] = row["speedup_vs_loop"] >= TARGET
        print(f"{spec} -> {name}: batched {med['eigengap_batched']:.2f}s  loop {med['one_path_loop']:.2f}s  "
              f"-> {row['speedup_vs_loop']:.1f}x", flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for spec in args.models.split(",") for row in bench(spec, args.examples, args.repeats)]
    record("path_patching", {"target_speedup_min": TARGET, "rows": rows,
                             "target_met": all(r["target_met"] for r in rows)})


if __name__ == "__main__":
    main()
