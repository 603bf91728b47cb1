"""``eigengap regularize`` (experiment kind ``regularize``, issue 20): train an organism under several
training arms (baseline, sigma-reparam, a key-kernel gap penalty, an attention-entropy regulariser,
controlled instability: ``spectral.training.arms``) from the same training seeds, measure each
trained model (``spectral.regularize.measure``: spectra, task quality, few-shot learning, head
importance, steerability per layer at a matched KL budget) and compare each arm with the baseline
over the seeds (``analysis.regularize``: paired differences with t-intervals, three verdict families
with Holm).

Every arm's model is an organism cache entry of its own (``NAME[-seedN]-ARM``; the baseline is the
suite's organism), trained once and reused by every later run; each model's measurements are kept in
``--out/parts/`` as soon as they exist and reused when the same model and settings come again, so a
run that stops is resumed by running it again. A sweep cell names one seed (``organism-xs?seed=1``);
the report pools the cells of a population over their seeds.

Writes into ``--out``: regularize_models.parquet, regularize_heads.parquet, regularize_layers.parquet,
regularize_contrasts.parquet, regularize_verdicts.parquet (written last: its presence means the run
completed), params.json, summary.md (with the rules), regularize_gaps.png (gap distributions per arm,
targeted heads vs the rest) and regularize_contrasts.png.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from jobs.config import JobConfig, out_dir_ready
from jobs.registry import PROMPT_TOKENS, Experiment
from spectral import tables as schemas
from spectral.training.arms import ARMS, BASELINE

RESULT_FILE = "regularize_verdicts.parquet"
PARTS = "parts"


class RegularizeConfig(JobConfig):
    model: str = "organism-xs"
    """The organism whose recipe the arms modify: organism-NAME[?seed=N] (a sweep fills it)."""
    out: Path
    """Output directory (regularize_*.parquet, params.json, summary.md, plots; parts/ keeps each model's measurements)."""
    organism: str | None = None
    """Shorthand for --model: xs, s, m, l or organism-NAME."""
    arms: str = ",".join(ARMS)
    """Training arms, comma separated (baseline is always added: every other arm is compared with it)."""
    seeds: str | None = None
    """Training seeds, e.g. 0,1,2 or 0-4 (default: the model spec's seed); verdicts need at least 2."""
    steps: int | None = Field(None, ge=1)
    """Train for this many steps instead of the recipe's (a pilot; cached under its own entry names)."""
    gap_heads: str | None = None
    """gap-penalty: the heads it acts on, L.H,... or L.* or all (default: all)."""
    gap_target: float | None = None
    """gap-penalty: the target gap in (0, 1) (default 0.95)."""
    gap_direction: Literal["up", "down"] | None = None
    """gap-penalty: push the gaps up (>= target) or down (<= target) (default: up)."""
    unstable_heads: str | None = None
    """controlled-instability: the heads held unstable (default: the first half of the middle layer's heads)."""
    unstable_target: float | None = None
    """controlled-instability: the gap those heads are held at or below, in (0, 1) (default 0.5)."""
    penalty_weight: float | None = None
    """Weight of the gap arms' penalty (default 10)."""
    entropy_direction: Literal["up", "down"] | None = None
    """entropy: reward high (up) or low (down) attention entropy (default: up)."""
    entropy_weight: float | None = None
    """entropy: the regulariser's weight (default 0.05)."""
    kl_budget: float = Field(0.25, gt=0)
    """Steerability: the mean KL (nats) on the neutral prompts every layer's vector is matched to."""
    n_prompts: int = Field(48, gt=0)
    """Key-scan prompts and held-out loss texts per model."""
    n_sequences: int = Field(128, gt=0)
    """ICL / few-shot sequences per model."""
    n_ioi: int = Field(48, gt=0)
    """IOI examples for the exact patching."""
    n_steer: int = Field(32, gt=0)
    """Sentiment evaluation (and neutral) prompts for the steerability."""
    workers: int = Field(1, ge=1)
    """Train the models that are not cached yet in this many processes at once (each with its share of
    the CPU's threads; on the 2-core CPU 2 workers train 1.3x faster than one). Measuring stays serial."""
    force: bool = False
    """Overwrite an existing regularize_verdicts.parquet in --out."""

    @model_validator(mode="after")
    def _checked(self):
        from spectral.organisms.suite import parse_seeds

        if self.organism is not None:
            name = self.organism if self.organism.startswith("organism-") else f"organism-{self.organism}"
            object.__setattr__(self, "model", name)
        parse_seeds(self.seeds)
        self.specs()  # every arm and option resolved against the organism's shape
        return self

    def arm_names(self) -> list[str]:
        names = [a.strip() for a in self.arms.split(",") if a.strip()]
        unknown = [a for a in names if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm {unknown[0]!r} (known: {', '.join(ARMS)})")
        if len(set(names)) != len(names):
            raise ValueError("an arm is named twice")
        return [BASELINE] + [a for a in names if a != BASELINE]

    def specs(self) -> dict:
        """arm -> its resolved ``ArmSpec`` (None for the baseline)."""
        from spectral.organisms.suite import arm_spec

        options = {
            "gap-penalty": dict(heads=self.gap_heads, target=self.gap_target, direction=self.gap_direction,
                                weight=self.penalty_weight),
            "controlled-instability": dict(heads=self.unstable_heads, target=self.unstable_target,
                                           weight=self.penalty_weight),
            "entropy": dict(direction=self.entropy_direction, weight=self.entropy_weight),
        }
        names = self.arm_names()
        given = {"gap-penalty": ("--gap-", self.gap_heads, self.gap_target, self.gap_direction),
                 "controlled-instability": ("--unstable-", self.unstable_heads, self.unstable_target),
                 "entropy": ("--entropy-", self.entropy_direction, self.entropy_weight)}
        for arm, (prefix, *values) in given.items():
            if arm not in names and any(v is not None for v in values):
                raise ValueError(f"{prefix}* options are given but the arm {arm} is not in --arms")
        return {a: arm_spec(self.model, a, **options.get(a, {})) for a in names}

    def seed_list(self) -> list[int]:
        from spectral.organisms.suite import parse_seeds, split_name

        return parse_seeds(self.seeds) or [split_name(self.model)[1]]


def _settings(config: RegularizeConfig):
    from spectral.regularize.measure import Settings

    return Settings(n_prompts=config.n_prompts, n_sequences=config.n_sequences, n_ioi=config.n_ioi,
                    n_steer=config.n_steer, kl_budget=config.kl_budget)


def _train_one(job: tuple) -> str:
    """A worker process's task: train one (arm, seed) model into the cache (``train_all``)."""
    from spectral.organisms.suite import train_organism

    base, seed, spec, steps = job
    return str(train_organism(base, seed, arm=spec, steps=steps, progress=False))


def _worker_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def train_all(config: RegularizeConfig, specs: dict, seeds: list[int], echo) -> None:
    """Train every (arm, seed) model that is not cached yet, in ``config.workers`` processes (each
    with ``cpu_count // workers`` torch threads); the cache's entry locks keep two processes from
    training the same entry. One worker: nothing is done here (each model is trained when measured)."""
    import multiprocessing
    import os
    from concurrent.futures import ProcessPoolExecutor

    from spectral.organisms.suite import cache_root, entry_name, recipe_of, split_name

    base, _ = split_name(config.model)
    # Seed by seed: a worker's next model then mostly shares its training set, built once per
    # process (``spectral.organisms.train.training_data``). Ordering each seed's costliest arms
    # first was tried and was slower (17.4 against 16.7 min): the two memory-heavy arms (entropy,
    # gap penalty) then trained side by side and slowed each other more than the shorter tail saved.
    missing = [(base, seed, spec, config.steps) for seed in seeds for spec in specs.values()
               if not (cache_root() / entry_name(recipe_of(base, seed, arm=spec, steps=config.steps))).is_dir()]
    if config.workers == 1 or len(missing) < 2:
        return
    threads = max(1, (os.cpu_count() or 1) // config.workers)
    echo(f"training {len(missing)} models in {config.workers} processes ({threads} torch thread(s) each)")
    with ProcessPoolExecutor(config.workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_threads, initargs=(threads,)) as pool:
        for path in pool.map(_train_one, missing):
            echo(f"trained {path}")


def measure_model(config: RegularizeConfig, arm: str, spec, seed: int, parts: Path, echo) -> dict:
    """Train (or reuse) one arm's model and measure it (or reuse its part file)."""
    from dataclasses import asdict

    from cluster.store import write_json
    from spectral.models.loading import load_model
    from spectral.organisms.suite import entry_name, recipe_of, split_name, training_report, train_organism
    from spectral.regularize.measure import measure_arm

    base, _ = split_name(config.model)
    recipe = recipe_of(base, seed, arm=spec, steps=config.steps)
    entry = entry_name(recipe)
    settings = asdict(_settings(config))
    part = parts / f"{entry}.json"
    if part.is_file():
        saved = json.loads(part.read_text())
        if saved.get("settings") == settings and saved.get("recipe") == recipe.as_dict():
            echo(f"{arm} seed {seed}: measurements reused from {part}")
            return saved
    t0 = time.perf_counter()
    path = train_organism(base, seed, arm=spec, steps=config.steps, progress=False)
    report = training_report(path)
    loaded = load_model(str(path))
    m = measure_arm(loaded, json.loads((path / "tasks.json").read_text()), entry, _settings(config))
    scan = m.scan.to_pylist()
    record = {
        "recipe": recipe.as_dict(), "settings": settings, "entry": entry, "arm": arm, "seed": seed,
        "options": spec.describe() if spec is not None else arm, "direction": spec.direction if spec else "",
        "targeted": [list(h) for h in spec.heads] if spec is not None else [],
        "training": {"train_seconds": report.get("train_seconds", float("nan")),
                     "train_threads": report.get("environment", {}).get("threads", float("nan")),
                     "final_loss": report.get("final_loss", float("nan")),
                     "final_arm_loss": report.get("final_arm_loss", float("nan"))},
        "model": m.model,
        "heads": [{"layer": int(r["layer"]), "head": int(r["head"]), "gap": float(r["gap"]),
                   "restoration": float(m.importance.get((int(r["layer"]), int(r["head"])), float("nan")))}
                  for r in scan],
        "layers": [{"layer": l, **v} for l, v in sorted(m.steering.items())],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(record, part)  # atomic: a run that stops keeps every finished model
    echo(f"{arm} seed {seed}: {entry} measured in {record['seconds']} s")
    return record


def arm_run(population: str, record: dict):
    from analysis.regularize import ArmRun

    return ArmRun(population, record["arm"], int(record["seed"]), record["direction"],
                  tuple(tuple(h) for h in record["targeted"]), record["model"], record["heads"], record["layers"])


def run(config: RegularizeConfig, *, echo=print):
    from analysis.regularize import contrast_rows, head_summary, importance_ranks, verdict_rows
    from cluster.store import write_json, write_parquet, write_text
    from spectral.organisms.suite import split_name

    start = time.perf_counter()
    out_dir_ready(config.out, RESULT_FILE, config.force)
    specs = config.specs()
    seeds = config.seed_list()
    population, _ = split_name(config.model)
    parts = config.out / PARTS
    train_all(config, specs, seeds, echo)
    records = [measure_model(config, arm, spec, seed, parts, echo) for seed in seeds for arm, spec in specs.items()]
    runs = [arm_run(population, r) for r in records]

    model_rows, head_rows, layer_rows = [], [], []
    for rec, r in zip(records, runs):
        summary = head_summary(r, r.targeted)
        targeted = {tuple(h) for h in rec["targeted"]}
        restoration = {(h["layer"], h["head"]): h["restoration"] for h in rec["heads"]}
        rank = importance_ranks(restoration)
        model_rows.append({"population": population, "arm": rec["arm"], "options": rec["options"], "seed": rec["seed"],
                           "entry": rec["entry"], "direction": rec["direction"],
                           "targeted": ",".join(f"{l}.{h}" for l, h in rec["targeted"]),
                           **{k: float(rec["training"][k]) for k in ("train_seconds", "final_loss", "final_arm_loss")},
                           **{k: float(rec["model"][k]) for k in schemas.REGULARIZE_MODEL_MEASURES}, **summary})
        head_rows += [{"population": population, "arm": rec["arm"], "seed": rec["seed"], "layer": h["layer"],
                       "head": h["head"], "targeted": (h["layer"], h["head"]) in targeted, "gap": h["gap"],
                       "restoration": h["restoration"], "importance_rank": rank[(h["layer"], h["head"])]}
                      for h in rec["heads"]]
        layers_targeted = {l for l, _ in targeted}
        layer_rows += [{"population": population, "arm": rec["arm"], "seed": rec["seed"], "layer": row["layer"],
                        "targeted": row["layer"] in layers_targeted, "effect": row["effect"], "kl": row["kl"],
                        "scale": row["scale"], "note": row["note"]} for row in rec["layers"]]
    contrasts = contrast_rows(runs)
    verdicts = verdict_rows(runs)
    text = summary_text(config, population, seeds, specs, model_rows, contrasts, verdicts, time.perf_counter() - start,
                        mixed_threads(records))

    out = config.out
    write_json({"config": config.model_dump(mode="json"), "arms": {a: (s.describe() if s else a) for a, s in specs.items()},
                "seeds": seeds, "entries": [r["entry"] for r in records]}, out / "params.json")
    write_parquet(schemas.from_rows(model_rows, schemas.REGULARIZE_MODELS, "models"), out / "regularize_models.parquet",
                  schemas.REGULARIZE_MODELS)
    write_parquet(schemas.from_rows(head_rows, schemas.REGULARIZE_HEADS, "heads"), out / "regularize_heads.parquet",
                  schemas.REGULARIZE_HEADS)
    write_parquet(schemas.from_rows(layer_rows, schemas.REGULARIZE_LAYERS, "layers"), out / "regularize_layers.parquet",
                  schemas.REGULARIZE_LAYERS)
    write_parquet(schemas.from_rows(contrasts, schemas.REGULARIZE_CONTRASTS, "contrasts"),
                  out / "regularize_contrasts.parquet", schemas.REGULARIZE_CONTRASTS)
    gaps_plot(head_rows, out / "regularize_gaps.png", f"{population}: key-kernel gap per head and arm ({len(seeds)} seeds)")
    contrasts_plot(contrasts, out / "regularize_contrasts.png", f"{population}: arm - baseline over seeds (95 % t-interval)")
    write_text(text + "\n", out / "summary.md")
    write_parquet(schemas.from_rows(verdicts, schemas.REGULARIZE_VERDICTS, "verdicts"), out / RESULT_FILE,
                  schemas.REGULARIZE_VERDICTS)
    echo(text)
    echo(f"wrote {out}")
    return model_rows, contrasts, verdicts


def mixed_threads(records: list[dict]) -> dict[int, dict[str, int]]:
    """Seeds whose models were trained at different torch thread counts, from the part files'
    training facts (parts written before the count was kept are skipped): {seed: {arm: threads}}."""
    by_seed: dict[int, dict[str, int]] = {}
    for r in records:
        threads = r["training"].get("train_threads")
        if threads is not None and threads == threads:  # known, not NaN
            by_seed.setdefault(int(r["seed"]), {})[r["arm"]] = int(threads)
    return {s: arms for s, arms in by_seed.items() if len(set(arms.values())) > 1}


KEY_CONTRASTS = ("gap_targeted", "gap_rest", "fraction_unstable", "few_shot_gain_1", "few_shot_loss_1", "icl_score", "induction_accuracy",
                 "ioi_accuracy", "heldout_loss", "importance_rank_targeted")


def summary_text(config, population, seeds, specs, model_rows, contrasts, verdicts, seconds,
                 mixed: dict[int, dict[str, int]] | None = None) -> str:
    from analysis.regularize import rule

    def num(x, f=".3g"):
        return "nan" if x is None or x != x else format(x, f)

    lines = [f"# eigengap regularize: {population}, seeds {','.join(map(str, seeds))}", "",
             f"Arms (each trained from the same seeds as the baseline{'' if config.steps is None else f', {config.steps}-step pilot'}):"]
    lines += [f"- {s.describe() if s else a}" for a, s in specs.items()]
    lines += ["", "| arm | seed | train s | loss | gap targeted | gap rest | unstable | one-shot gain | one-shot loss | ICL | IOI | held-out loss |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in model_rows:
        lines.append(f"| {r['arm']} | {r['seed']} | {num(r['train_seconds'], '.0f')} | {num(r['final_loss'])} | "
                     f"{num(r['gap_targeted'])} | {num(r['gap_rest'])} | {num(r['fraction_unstable'], '.2f')} | "
                     f"{num(r['few_shot_gain_1'])} | {num(r['few_shot_loss_1'])} | {num(r['icl_score'])} | {num(r['ioi_accuracy'], '.2f')} | "
                     f"{num(r['heldout_loss'])} |")
    lines += ["", "Arm - baseline, mean over seeds with its 95 % t-interval (paired by training seed; descriptive):", "",
              "| arm | measure | baseline | arm | difference [95 % CI] |", "|---|---|---|---|---|"]
    for c in contrasts:
        if c["measure"] in KEY_CONTRASTS or c["measure"].startswith("steer_effect"):
            lines.append(f"| {c['arm']} | {c['measure']} | {num(c['baseline'])} | {num(c['arm_value'])} | "
                         f"{num(c['value'])} [{num(c['low'])}, {num(c['high'])}] |")
    lines += ["", "## Verdicts", ""]
    if not verdicts:
        lines.append("No verdict: no gap arm among --arms.")
    for v in verdicts:
        where = f" layer {v['layer']}" if v["layer"] >= 0 else ""
        lines.append(f"- **{v['verdict']}** {v['key']} ({v['arm']}{where}): D = {num(v['value'])} "
                     f"[{num(v['low'])}, {num(v['high'])}], Holm p(PASS) {num(v['p_pass_holm'])}, "
                     f"p(FAIL) {num(v['p_fail_holm'])}; {v['per_seed']}")
    if len(seeds) < 2:
        lines.append("- one seed: every verdict is INCONCLUSIVE (the seeds are the replicates); pass --seeds 0,1,2")
    lines += ["", "Rules:", ""] + [f"- {rule(k)}" for k in sorted({v['key'] for v in verdicts})]
    for seed, arms in sorted((mixed or {}).items()):
        lines += ["", f"Note: seed {seed}'s models were trained at different torch thread counts ("
                  + ", ".join(f"{a} {t}" for a, t in arms.items()) + "): the same initial weights and batches, but "
                  "not bit-for-bit pairs (the thread count changes float reductions; docs/ORGANISMS.md)."]
    lines += ["", f"Finished in {seconds:.0f} s."]
    return "\n".join(lines)


def gaps_plot(head_rows, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arms = list(dict.fromkeys(r["arm"] for r in head_rows))
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 3.6))
    rng = np.random.default_rng(0)
    for i, arm in enumerate(arms):
        for targeted, color in ((False, "tab:gray"), (True, "tab:red")):
            g = [r["gap"] for r in head_rows if r["arm"] == arm and r["targeted"] == targeted]
            if g:
                ax.scatter(i + (0.15 if targeted else -0.15) + rng.uniform(-0.08, 0.08, len(g)), g, s=10, color=color,
                           alpha=0.7, label=("targeted heads" if targeted else "other heads") if i == 0 or arm != arms[0] else None)
    ax.axhline(0.77, color="k", lw=0.8, ls="--")
    ax.set_xticks(range(len(arms)), arms, rotation=20)
    ax.set_ylabel("key-kernel gap (held-out prompts)")
    ax.set_title(title, fontsize=9)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def contrasts_plot(contrasts, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ("gap_targeted", "few_shot_gain_1", "icl_score", "heldout_loss", "ioi_accuracy")
    rows = [c for c in contrasts if c["measure"] in shown or c["measure"].startswith("steer_effect")]
    measures = list(dict.fromkeys(c["measure"] for c in rows))
    arms = list(dict.fromkeys(c["arm"] for c in rows))
    fig, axes = plt.subplots(1, max(1, len(measures)), figsize=(2.3 * max(1, len(measures)), 3.2), squeeze=False)
    for ax, measure in zip(axes[0], measures):
        for i, arm in enumerate(arms):
            c = next((c for c in rows if c["arm"] == arm and c["measure"] == measure), None)
            if c is None:
                continue
            err = [[c["value"] - c["low"]], [c["high"] - c["value"]]] if c["low"] == c["low"] else None
            ax.errorbar(i, c["value"], yerr=err, fmt="o", capsize=3)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(arms)), arms, rotation=60, fontsize=7)
        ax.set_title(measure, fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Per verdict row its D (``value/<key>/<arm>[/layer<L>]``) and verdict; per arm the mean targeted gap."""
    from cluster.store import read_parquet

    metrics, params = {}, {}
    if (cell_dir / RESULT_FILE).is_file():
        for r in read_parquet(cell_dir / RESULT_FILE, schemas.REGULARIZE_VERDICTS).to_pylist():
            key = f"{r['key']}/{r['arm']}" + (f"/layer{r['layer']}" if r["layer"] >= 0 else "")
            metrics[f"value/{key}"] = float(r["value"])
            params[f"verdict/{key}"] = r["verdict"]
    models = cell_dir / "regularize_models.parquet"
    if models.is_file():
        rows = read_parquet(models, schemas.REGULARIZE_MODELS, ["arm", "gap_targeted"]).to_pylist()
        for arm in dict.fromkeys(r["arm"] for r in rows):
            values = [r["gap_targeted"] for r in rows if r["arm"] == arm]
            metrics[f"gap_targeted/{arm}"] = float(sum(values) / len(values))
    return metrics, params


def cost(params, facts) -> float:
    """Training dominates: per arm and seed the recipe's steps x 32 sequences x 48 tokens, forward and backward
    (about 3 forward passes each)."""
    arms = len([a for a in str(params.get("arms", ",".join(ARMS))).split(",") if a.strip()])
    steps = params.get("steps") or 1840
    return float(arms * steps * 32 * 48 * 3 + arms * 2000 * PROMPT_TOKENS)


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="regularize", help="train an organism under spectral-regularisation arms and compare each with the baseline",
    config=RegularizeConfig, run=run,
    tables={RESULT_FILE: schemas.REGULARIZE_VERDICTS, "regularize_models.parquet": schemas.REGULARIZE_MODELS,
            "regularize_heads.parquet": schemas.REGULARIZE_HEADS, "regularize_layers.parquet": schemas.REGULARIZE_LAYERS,
            "regularize_contrasts.parquet": schemas.REGULARIZE_CONTRASTS},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["regularize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
