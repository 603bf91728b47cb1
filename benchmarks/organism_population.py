"""Quality of the organism recipes over training seeds: trains every (size, seed) pair in
parallel worker processes and evaluates each on the held-out quality set.

    python -m benchmarks.organism_population --sizes xs,s,m,l --seeds 0-4 --workers 2 \
        --out benchmarks/results/organism_population.jsonl [--set steps=1500 --variant longer]

One JSON line per organism: the recipe, the seed, the training time, the quality figures
and which bars it met. ``--set KEY=VALUE`` overrides recipe fields (for recipe searches);
``--device cuda`` trains on a GPU (the weights then differ from a CPU run: the population's
statistics are what should agree, not the bits). This is the measurement behind the seed
table of docs/ORGANISMS.md; it is not part of ``make test``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path


def _one(job: dict) -> dict:
    import torch

    torch.set_num_threads(job["threads"])
    if job["device"] == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from spectral.models.loading import load_model
    from spectral.organisms.evaluate import evaluate
    from spectral.organisms.language import TASKS
    from spectral.organisms.suite import SUITE
    from spectral.organisms.train import train

    name = f"organism-{job['size']}"
    if job["cache"] and not job["overrides"]:
        # the suite's own recipe: train into the organism cache (reused when valid) and evaluate that
        from spectral.organisms.suite import train_organism, training_report

        path = train_organism(name, job["seed"], progress=False)
        seconds = training_report(path)["train_seconds"]
        report = training_report(path)
        quality = evaluate(load_model(str(path)), TASKS)
    else:
        recipe = replace(SUITE[name], seed=job["seed"], **job["overrides"])
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            report = train(recipe, Path(tmp) / "m", progress=False)
            seconds = time.perf_counter() - start
            quality = evaluate(load_model(str(Path(tmp) / "m")), TASKS)
    return {"variant": job["variant"], "size": job["size"], "seed": job["seed"], "overrides": job["overrides"],
            "device": job["device"], "train_seconds": round(seconds, 1), "final_loss": report["final_loss"],
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **quality.as_dict()}


def main(argv: list[str] | None = None) -> None:
    from spectral.organisms.suite import parse_seeds

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="xs,s,m,l")
    parser.add_argument("--seeds", default="0-4", help="a range A-B or a list A,B,C")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: cores / workers)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="recipe override")
    parser.add_argument("--variant", default="suite")
    parser.add_argument("--cache", action="store_true",
                        help="train the suite's recipes into the organism cache ($EIGENGAP_CACHE) and keep them")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    types = {f.name: f.type for f in fields(__import__("spectral.organisms.train", fromlist=["Recipe"]).Recipe)}
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = float(value) if types.get(key) == "float" else int(value)
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    jobs = [{"size": size, "seed": seed, "overrides": overrides, "device": args.device, "threads": threads,
             "variant": args.variant, "cache": args.cache} for size in args.sizes.split(",") for seed in parse_seeds(args.seeds)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    with ctx.Pool(args.workers) as pool, args.out.open("a") as out:
        for row in pool.imap_unordered(_one, jobs):
            out.write(json.dumps(row) + "\n")
            out.flush()
            bars = row["passes"]
            print(f"{row['variant']} {row['size']} seed {row['seed']}: induction {row['induction_accuracy']:.3f} "
                  f"IOI {min(row['ioi_accuracy_abba'], row['ioi_accuracy_baba']):.3f} "
                  f"sentiment low {row['sentiment_ci_low']:.2f} {row['train_seconds']} s "
                  f"{'ok' if all(bars.values()) else 'MISSED ' + str(bars)}", flush=True)


if __name__ == "__main__":
    main()
