"""Generation with per-token spectra of every head vs plain ``generate`` with a KV cache (issue 17,
point 3; target: ratio <= 1.3).

Per model, ``N_PROMPTS`` prompts of about ``PROMPT_TOKENS`` tokens, one batch of ``BATCH_SIZE``,
``NEW_TOKENS`` new tokens each (both paths generate exactly that many: ours with
``stop_at_eos=False``, ``generate`` with ``min_new_tokens``, which bars the end-of-sequence token,
so where a trained organism would end a text the two may pick different tokens; the number of
forward passes and their shapes are the same, and the record gives the tokens that agree).

- baseline: ``model.generate(ids, attention_mask, do_sample=False, max_new_tokens=N,
  min_new_tokens=N)`` under ``torch.no_grad``, KV cache on (the default), on the same left-padded
  batch;
- ``spectra``: ``generate_trajectories`` with every layer and head (the KV cache, the rank-one
  key statistics, every step's key-kernel spectra, the step attention and the trajectories
  table), spectra on worker threads (the default: one per usable core but one);
- ``spectra_in_loop``: the same with ``spectra_threads=0`` (the spectra in the generation loop).

After one warm-up of each, they are timed in alternation, ``--repeats`` rounds (background load
falls on all alike); figures are medians.

    EIGENGAP_CACHE=/work/cache .venv/bin/python -m benchmarks.bench_generation_dynamics
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import interleaved_times, record, token_prompts
from spectral.dynamics.generation import GenerationSettings, generate_trajectories, left_padded, spectra_threads
from spectral.models.adapter import HeadAdapter
from spectral.models.loading import load_model

MODELS = ("organism-l", "random:pythia-410m?layers=4")
N_PROMPTS = 8
BATCH_SIZE = 8
PROMPT_TOKENS = 16
NEW_TOKENS = 64
REPEATS = 3
TARGET_RATIO_MAX = 1.3


def measure(spec: str, new_tokens: int, repeats: int) -> dict:
    """Median times of the three paths (and the ratios to the baseline) for one model."""
    loaded = load_model(spec)
    adapter = HeadAdapter(loaded.model)
    texts = token_prompts(loaded.tokenizer, N_PROMPTS, PROMPT_TOKENS)
    settings = GenerationSettings(max_new_tokens=new_tokens, batch_size=BATCH_SIZE, stop_at_eos=False)
    in_loop = GenerationSettings(max_new_tokens=new_tokens, batch_size=BATCH_SIZE, stop_at_eos=False,
                                 spectra_threads=0)
    gen = generate_trajectories(loaded, texts, settings)  # warm-up, and the batch both paths read
    ids, mask = left_padded(gen.prompt_tokens, gen.pad_token, loaded.model.device)

    def baseline():
        with torch.no_grad():
            return loaded.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                                         min_new_tokens=new_tokens, pad_token_id=gen.pad_token)

    hf = baseline()[:, ids.shape[1]:].tolist()
    generate_trajectories(loaded, texts, in_loop)
    runs = interleaved_times({"generate": baseline, "spectra": lambda: generate_trajectories(loaded, texts, settings),
                              "spectra_in_loop": lambda: generate_trajectories(loaded, texts, in_loop)}, repeats)
    median = {name: statistics.median(times) for name, times in runs.items()}
    new = sum(len(row) for row in gen.tokens)
    assert new == len(texts) * new_tokens == sum(len(row) for row in hf)
    return {
        "model": spec, "spectra_threads": spectra_threads(settings), "layers": adapter.n_layers, "heads": adapter.n_heads, "d_head": adapter.d_head,
        "prompts": len(texts), "batch_size": BATCH_SIZE, "prompt_tokens": sum(map(len, gen.prompt_tokens)),
        "new_tokens": new, "steps": new_tokens, "rows": gen.trajectories.num_rows,
        "tokens_agreeing_with_generate": sum(a == b for r, h in zip(gen.tokens, hf) for a, b in zip(r, h)),
        **{f"{name}_s_runs": [round(t, 3) for t in times] for name, times in runs.items()},
        **{f"{name}_s": round(t, 3) for name, t in median.items()},
        "ratio": round(median["spectra"] / median["generate"], 3),
        "ratio_in_loop": round(median["spectra_in_loop"] / median["generate"], 3),
        "target_met": median["spectra"] / median["generate"] <= TARGET_RATIO_MAX,
    }


def main(argv: list[str] | None = None) -> dict:
    """Measure every model, record ``results/generation_dynamics.json`` (unless ``--no-record``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own choice)")
    parser.add_argument("--no-record", action="store_true", help="print only (a trial run on a busy machine)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for spec in MODELS:
        rows.append(measure(spec, args.new_tokens, args.repeats))
        row = rows[-1]
        print(f"{spec}: {row['prompts']} prompts x {row['steps']} new tokens ({row['prompt_tokens']} prompt tokens): "
              f"generate {row['generate_s']:.2f}s, with spectra {row['spectra_s']:.2f}s (ratio {row['ratio']:.2f}; "
              f"in the loop {row['ratio_in_loop']:.2f}; target <= {TARGET_RATIO_MAX}: "
              f"{'met' if row['target_met'] else 'MISSED'})", flush=True)
    result = {"benchmark": "generation_dynamics", "target_ratio_max": TARGET_RATIO_MAX, "repeats": args.repeats,
              "rows": rows}
    if not args.no_record:
        record("generation_dynamics", result)
    return result


if __name__ == "__main__":
    main()
