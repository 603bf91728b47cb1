"""All-head exact patching: eigengap's batched replay vs the one-head-at-a-time loop vs an
nnsight loop, on the same model and task (issue 4, target >= 3x faster than the naive loop).

    python -m benchmarks.bench_patching [--models organism-l,random:...] [--examples 32] [--repeats 3]

eigengap: two cached runs (clean, corrupt) and, per layer, one batched replay of all heads
from the cached residual entering that layer, recomputing only the positions from the first
clean/corrupt difference on (``patch_layer``, as ``eigengap patch`` runs it). Naive loop: for every
(layer, head), a full forward pass of the corrupt prompts with that head's result replaced
(the reference the tests compare with). nnsight loop: the same per-head loop written with
nnsight, editing the head's slice of the attention output projection's input. All three
patch the same heads on the same examples; the figures include the clean/corrupt caching.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import interleaved_times, record
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model
from spectral.causal.patching import cache_run, first_difference, logit_diff, patch_layer
from spectral.causal.tasks import Example, builtin_ioi, encode

MODELS = ["organism-l", "random:pythia-410m?layers=6&hidden=512&heads=8"]
TARGET = 3.0

NAMES = ["Mary", "John", "Kate", "Anna", "Paul", "Mark", "Lucy", "Emma"]  # same length: clean and corrupt align


def byte_ioi(n: int) -> list[Example]:
    """IOI-shaped examples for byte-level random models: single-byte answer and distractor."""
    out = []
    for i in range(n):
        a, b, c = NAMES[i % 8], NAMES[(i + 3) % 8], NAMES[(i + 5) % 8]
        out.append(Example(f"When {a} and {b} went to the park, {b} gave a ball to ",
                           f"When {a} and {b} went to the park, {c} gave a ball to ", a[0], b[0]))
    return out


def task_for(loaded, n: int):
    examples = byte_ioi(n) if loaded.spec.kind == "random" else builtin_ioi(loaded, n, seed=0)
    return encode(loaded.tokenizer, examples)


def eigengap_all_heads(adapter, task):
    clean, corrupt = cache_run(adapter, task.clean, task), cache_run(adapter, task.corrupt, task)
    heads, start = range(adapter.n_heads), first_difference(task.clean, task.corrupt)
    return torch.stack([patch_layer(adapter, corrupt, task, l, heads, clean.results[l], start)
                        for l in range(adapter.n_layers)])


@torch.no_grad()
def naive_all_heads(adapter, task):
    clean = cache_run(adapter, task.clean, task)
    out = torch.empty(adapter.n_layers, adapter.n_heads, len(task))
    for layer in range(adapter.n_layers):
        for head in range(adapter.n_heads):
            def edit(t, layer=layer, head=head):
                t = t.clone()
                t[:, :, head] = clean.results[layer][:, :, head]
                return t

            with adapter.trace([], edits={(layer, "result"): edit}):
                logits = adapter.model(input_ids=task.corrupt, attention_mask=task.mask, use_cache=False).logits
            out[layer, head] = logit_diff(logits, task)
    return out


@torch.no_grad()
def nnsight_all_heads(wrapped, adapter, task, d_head):
    out = torch.empty(adapter.n_layers, adapter.n_heads, len(task))
    for layer in range(adapter.n_layers):
        dense = wrapped.gpt_neox.layers[layer].attention.dense
        with wrapped.trace(task.clean, attention_mask=task.mask, use_cache=False):
            clean_in = dense.input.save()
        for head in range(adapter.n_heads):
            sl = slice(head * d_head, (head + 1) * d_head)
            with wrapped.trace(task.corrupt, attention_mask=task.mask, use_cache=False):
                dense.input[:, :, sl] = clean_in[:, :, sl]
                logits = wrapped.output.logits.save()
            out[layer, head] = logit_diff(logits, task)
    return out


def bench(spec: str, n: int, repeats: int) -> dict:
    import nnsight

    loaded = load_model(spec)
    model, adapter = loaded.model, HeadAdapter(loaded.model)
    task = task_for(loaded, n)
    wrapped = nnsight.NNsight(model)
    d_head = model.config.hidden_size // adapter.n_heads
    fns = {"eigengap_batched": lambda: eigengap_all_heads(adapter, task),
           "naive_loop": lambda: naive_all_heads(adapter, task),
           "nnsight_loop": lambda: nnsight_all_heads(wrapped, adapter, task, d_head)}
    values = {name: fn() for name, fn in fns.items()}  # warm-up, and the answers to compare
    diffs = {name: float((values[name] - values["naive_loop"]).abs().max()) for name in fns}
    runs = interleaved_times(fns, repeats)
    med = {name: statistics.median(ts) for name, ts in runs.items()}
    row = {"model": spec, "layers": adapter.n_layers, "heads": adapter.n_heads, "examples": len(task),
           "positions": int(task.clean.shape[1]), "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
           "seconds": runs, "median_s": med,
           "speedup_vs_naive": med["naive_loop"] / med["eigengap_batched"],
           "speedup_vs_nnsight": med["nnsight_loop"] / med["eigengap_batched"],
           "max_abs_difference_vs_naive": diffs, "device": str(model.device)}
    row["target_met"] = row["speedup_vs_naive"] >= TARGET
    print(f"{spec}: eigengap {med['eigengap_batched']:.2f}s  naive {med['naive_loop']:.2f}s  "
          f"nnsight {med['nnsight_loop']:.2f}s  -> {row['speedup_vs_naive']:.1f}x vs naive, "
          f"{row['speedup_vs_nnsight']:.1f}x vs nnsight", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = [bench(spec, args.examples, args.repeats) for spec in args.models.split(",")]
    record("patching", {"target_speedup_min": TARGET, "rows": rows,
                        "target_met": all(r["target_met"] for r in rows)})


if __name__ == "__main__":
    main()
