"""SAE training throughput (target: SAEs for every head of organism-l, 48 heads, k = 8,
expansion 8, 2M tokens, in at most 10 minutes on the 2-core CPU).

One ``train_head_saes`` call: every head's SAE (48; and, with ``--layer-saes``, the 6 layer SAEs
on top) trained in lockstep from one shared stream, one forward pass per prompt batch feeding
every SAE (``spectral.saes.activations.z_stream``); SAELens' ``MultiSAETrainer``, the job's
defaults (1,024 rows per step, lr 1e-2 -> 1e-3, 8,192 calibration rows). The prompts are fresh
organism text (``jobs.saes.organism_prompts``, the job's training seed). The figure is wall time
of the whole call (activation generation, calibration, training, folding, saving) and tokens per
second per SAE (every SAE sees every token). Also recorded: the time of the activation stream
alone (forward passes only) on a slice, so the share of the model's forward passes is visible.

    .venv/bin/python -m benchmarks.bench_saes [--tokens N] [--layer-saes]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from benchmarks.common import record

MODEL = "organism-l"
TOKENS = 2_000_000
TARGET_S = 600.0


def main(argv: list[str] | None = None) -> dict:
    from jobs.saes import SaesConfig, organism_prompts, token_limit, tokens_needed
    from spectral.kernels.scan import ScanSettings
    from spectral.models.adapter import HeadAdapter
    from spectral.models.loading import load_model
    from spectral.saes.activations import resolve_targets, z_stream
    from spectral.saes.train import SaeTrainingConfig, train_head_saes

    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=TOKENS)
    p.add_argument("--layer-saes", action="store_true")
    args = p.parse_args(argv)
    loaded = load_model(MODEL)
    adapter = HeadAdapter(loaded.model)
    job = SaesConfig(model=MODEL, out="unused", tokens=args.tokens)
    prompts = organism_prompts(40_000, tokens_needed(job), loaded.tokenizer, token_limit(job, loaded))
    settings = ScanSettings(batch_size=job.batch_size)
    # the stream alone on the first 64 batches: the forward passes' share
    targets = resolve_targets(adapter, None, None, args.layer_saes)
    start, rows = time.perf_counter(), 0
    for i, block in enumerate(z_stream(loaded, prompts, settings, targets)):
        rows += len(next(iter(block.values())))
        if i == 63:
            break
    stream_tps = rows / (time.perf_counter() - start)
    cfg = SaeTrainingConfig(ks=(8,), expansion=8, tokens=args.tokens, batch_size=job.sae_batch_size, lr=job.lr,
                            lr_end=job.lr_end)
    with tempfile.TemporaryDirectory() as d:
        result = train_head_saes(loaded, prompts, cfg, d, per_layer=args.layer_saes, settings=settings)
    evs = [s.explained_variance for s in result.saes if "H" in s.target]
    dead = [s.dead_features / s.d_sae for s in result.saes if "H" in s.target]
    out = {
        "model": MODEL, "heads": adapter.n_layers * adapter.n_heads, "layer_saes": args.layer_saes,
        "saes": len(result.saes), "k": 8, "expansion": 8, "tokens": result.tokens, "seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1), "stream_only_tokens_per_second": round(stream_tps, 1),
        "target_s": TARGET_S, "target_met": result.seconds <= TARGET_S and result.tokens >= TOKENS,
        "head_sae_held_out_ev_median": round(statistics.median(evs), 4), "head_sae_held_out_ev_min": round(min(evs), 4),
        "head_sae_dead_fraction_median": round(statistics.median(dead), 4),
    }
    print(f"{out['saes']} SAEs on {MODEL}, {out['tokens']:,} tokens: {out['seconds']:.0f} s, "
          f"{out['tokens_per_second']:,.0f} tokens/s (target <= {TARGET_S:.0f} s for 2M tokens: "
          f"{'met' if out['target_met'] else 'MISSED'}); median held-out EV {out['head_sae_held_out_ev_median']}",
          flush=True)
    record("saes", out)
    return out


if __name__ == "__main__":
    main()
