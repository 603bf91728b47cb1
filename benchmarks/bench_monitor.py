"""The streaming spectral monitor during generation vs plain ``generate`` with a KV cache (issue 19;
target: ratio <= 1.2).

Per model 8 prompts (the Pythia twin: 16 tokens of the demo lines; organism-l: 8 benign prompts of
its own language from the monitor suite, 8-14 tokens), one batch, 64 new tokens each (both paths generate exactly that
many: the monitor with ``stop_at_eos=False``, ``generate`` with ``min_new_tokens``). The monitor is
fitted beforehand on 32 other prompts (not timed); timed: ``SpectralMonitor.score_generation``
(generation, every head's per-step key spectra and step attention, the features and the spectral
detectors' scores) against ``model.generate``; after one warm-up each, alternating, ``--repeats``
rounds, medians.

    EIGENGAP_CACHE=... .venv/bin/python -m benchmarks.bench_monitor
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import interleaved_times, record, token_prompts
from spectral.dynamics.generation import left_padded
from spectral.models.loading import load_model
from spectral.monitor import SpectralMonitor

MODELS = ("organism-l", "random:pythia-410m?layers=4")
N_PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 8, 16, 64
TARGET_RATIO_MAX = 1.2


def measure(spec: str, repeats: int) -> dict:
    loaded = load_model(spec)
    if spec.startswith("organism"):  # the organism's own language (the demo lines are not in its vocabulary)
        import json

        from spectral.models.loading import checkpoint_path
        from spectral.monitor.suite import organism_suite

        suite = organism_suite(json.loads((checkpoint_path(loaded) / "tasks.json").read_text()), 32, N_PROMPTS, 8)
        benign, texts = list(suite.fit), list(suite.calibration)
    else:
        texts = token_prompts(loaded.tokenizer, N_PROMPTS, PROMPT_TOKENS)
        benign = token_prompts(loaded.tokenizer, 32, PROMPT_TOKENS, first=N_PROMPTS)
    monitor = SpectralMonitor(loaded, ["spectral"]).fit(benign)
    gen, _ = monitor.score_generation(texts, NEW_TOKENS, N_PROMPTS)  # warm-up, and the batch generate reads
    ids, mask = left_padded(gen.prompt_tokens, gen.pad_token, loaded.model.device)

    def baseline():
        with torch.no_grad():
            return loaded.model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                                         min_new_tokens=NEW_TOKENS, pad_token_id=gen.pad_token)

    baseline()
    times = interleaved_times({"generate": baseline,
                               "monitor": lambda: monitor.score_generation(texts, NEW_TOKENS, N_PROMPTS)}, repeats)
    g, m = statistics.median(times["generate"]), statistics.median(times["monitor"])
    return {"model": spec, "generate_s": round(g, 3), "monitor_s": round(m, 3), "ratio": round(m / g, 3),
            "runs": {k: [round(x, 3) for x in v] for k, v in times.items()}, "target_met": m / g <= TARGET_RATIO_MAX,
            "generated_tokens": N_PROMPTS * NEW_TOKENS, "prompt_tokens": sum(len(r) for r in gen.prompt_tokens)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    rows = [measure(spec, args.repeats) for spec in MODELS]
    for r in rows:
        print(f"{r['model']}: monitor {r['monitor_s']:.2f} s vs generate {r['generate_s']:.2f} s = {r['ratio']:.2f}x "
              f"(target <= {TARGET_RATIO_MAX}: {'met' if r['target_met'] else 'MISSED'})", flush=True)
    result = {"benchmark": "monitor", "target_ratio_max": TARGET_RATIO_MAX, "new_tokens": NEW_TOKENS,
              "prompts": N_PROMPTS, "rows": rows}
    record("monitor", result)
    return result


if __name__ == "__main__":
    main()
