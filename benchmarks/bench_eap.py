"""EAP scores for every edge of a model from <= 2 forward and 1 backward pass per batch (issue 14):
the edge count, the passes counted by hooks, and the time.

    python -m benchmarks.bench_eap [--model organism-l] [--examples 64] [--batch 32] [--repeats 3]

Task: the model's built-in IOI task (its ``tasks.json`` for an organism), corrupt ablation. Passes
are counted by a forward hook on the whole model (one count per forward pass) and, for each pass
whose logits need a gradient, a hook on the logits tensor (one count per backward pass through
them). Per batch EAP makes one forward pass of the corrupt prompts without gradients (the
ablated writes) and one forward and one backward pass of the clean prompts (every receiver
input's gradient and every sender's clean write). The time is the median over ``repeats`` runs
after one warm-up run (which also finds the norms ``receiver_deltas`` uses).
"""

from __future__ import annotations

import argparse
import statistics
from contextlib import contextmanager

import torch

from benchmarks.common import record, times
from spectral.causal.tasks import builtin_ioi, encode
from spectral.circuits.edges import build_graph, eap_scores
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model

TARGET_FORWARD, TARGET_BACKWARD = 2, 1


@contextmanager
def pass_counter(model: torch.nn.Module):
    """``{"forward": n, "backward": n}`` filled while active."""
    counts = {"forward": 0, "backward": 0}

    def on_backward(grad):
        counts["backward"] += 1

    def on_forward(module, args, output):
        counts["forward"] += 1
        logits = output.logits
        if logits.requires_grad:
            logits.register_hook(on_backward)

    handle = model.register_forward_hook(on_forward)
    try:
        yield counts
    finally:
        handle.remove()


def bench(spec: str, n: int, batch: int, repeats: int) -> dict:
    loaded = load_model(spec)
    adapter = HeadAdapter(loaded.model)
    task = encode(loaded.tokenizer, builtin_ioi(loaded, n, seed=0))
    graph = build_graph(adapter)
    run = lambda: eap_scores(adapter, task, "corrupt", steps=1, batch_size=batch, graph=graph)  # noqa: E731
    run()  # warm-up
    n_batches = -(-n // batch)
    with pass_counter(loaded.model) as counts:
        scores = run()
    seconds = times(run, repeats=repeats, warmup=0)
    row = {"model": spec, "layers": adapter.n_layers, "heads": adapter.n_heads, "examples": n, "batch": batch,
           "batches": n_batches, "positions": int(task.clean.shape[1]), "edges": graph.n_edges,
           "senders": len(graph.senders), "receiver_inputs": sum(g.n_receivers for g in graph.groups),
           "forward_per_batch": counts["forward"] / n_batches, "backward_per_batch": counts["backward"] / n_batches,
           "seconds": seconds, "median_s": statistics.median(seconds),
           "metric_clean": scores.metric_clean, "max_abs_score": float(scores.scores.abs().max()),
           "device": str(loaded.model.device)}
    row["target_met"] = (row["forward_per_batch"] <= TARGET_FORWARD and row["backward_per_batch"] <= TARGET_BACKWARD)
    print(f"{spec}: {graph.n_edges} edges, {row['forward_per_batch']:g} forward + {row['backward_per_batch']:g} "
          f"backward passes per batch, {row['median_s']:.2f}s for {n} examples", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism-l")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    row = bench(args.model, args.examples, args.batch, args.repeats)
    record("eap", {"target_forward_per_batch_max": TARGET_FORWARD, "target_backward_per_batch_max": TARGET_BACKWARD,
                   "rows": [row], "target_met": row["target_met"]})


if __name__ == "__main__":
    main()
