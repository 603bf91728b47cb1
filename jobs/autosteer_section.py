"""The report's sections on steering theory and automated steering (issue 18; success metrics 4 and
5), from the run's ``predict`` and ``autosteer`` cells.

- ``predict``: ``theory_predicts_steering`` over training seeds (``analysis.predict``): per
  (organism, concept/vector) with enough layers, and "all organisms (pooled layers)" per
  concept/vector (per seed index, the correlation over every organism's layers: the across-organism
  answer, so no "overall" row), Holm across the rows; the Fisher-metric bound's record over every
  measurement, each (model, layer) where it breaks named in the notes; the cost of the prediction
  relative to the per-layer search.
- ``autosteer``: ``autosteer_matches_oracle`` per (organism, concept) over seeds and overall
  (``analysis.autosteer``), and every strategy side by side: per population the across-seed mean
  of its difference from the oracle with the t-interval, its KL, steerability and anti-steerable
  fraction.

Tables written into the report directory: predict_verdicts.parquet, autosteer_verdicts.parquet,
autosteer_models.parquet (every cell's strategy rows), autosteer_strategies.parquet (per population
and strategy); figures predict.png and autosteer.png.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from spectral import tables as schemas

POOLED = "all organisms (pooled layers)"


@dataclass
class PredictSection:
    verdicts: list[dict]
    models: list[dict]
    """Per cell: population, seed, model, n_layers, spearman, bound record, timing ratio."""
    layers: list[dict] = field(default_factory=list)
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class AutosteerSection:
    verdicts: list[dict]
    models: list[dict]
    strategies: list[dict]
    plots: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- predict
def analyse_predict(data, load_cell) -> PredictSection | None:
    from analysis.crossmodel import population_of
    from analysis.predict import MIN_LAYERS, SeedPrediction, verdicts
    from jobs.predict import RESULT_FILE

    cells = [(cell, path) for cell, path in data.cells if cell.kind == "predict"]
    if not cells:
        return None
    seeds, models, layers, notes = [], [], [], []
    for cell, path in cells:
        loaded = load_cell("predict", path)
        if RESULT_FILE not in loaded:
            notes.append(f"{cell.model}: no {RESULT_FILE}")
            continue
        rows = loaded.table(RESULT_FILE).to_pylist()
        stats = loaded.table("predict_verdicts.parquet").to_pylist()
        primary = next(s for s in stats if s["key"] == "theory_predicts_steering")
        params = json.loads((Path(path) / "params.json").read_text()) if (Path(path) / "params.json").is_file() else {}
        config = params.get("config", {})
        what = f"{config.get('concept', 'sentiment')}/{config.get('vector', 'actadd')}"
        organism, seed = population_of(cell.model)
        pop = f"{organism}:{what}"
        seeds.append(SeedPrediction(pop, seed, float(primary["value"]), len(rows)))
        timing = params.get("timing", {})
        measurements = sum(len(r["violations"]) for r in rows)
        broken = [f"layer {r['layer']}: {len(r['violations'])} prompt(s), alpha*/scale {r['alpha_ratio']:.1f}"
                  for r in rows if r["violations"]]
        if broken:
            notes.append(f"the Fisher-metric bound breaks on {cell.model} ({what}): " + "; ".join(broken))
        models.append(dict(model=cell.model, population=pop, seed=seed, n_layers=len(rows), spearman=primary["value"],
                           low=primary["low"], high=primary["high"], violations=measurements,
                           n_measurements=len(rows) * int(primary["n_prompts"]),
                           first_order_over_search=timing.get("first_order_over_search", math.nan)))
        layers += [dict(population=pop, what=what, seed=seed, model=cell.model, layer=r["layer"],
                        predicted=r["first_order_effect"], measured=r["measured_effect"]) for r in rows]
    from scipy.stats import spearmanr

    for what in dict.fromkeys(r["what"] for r in layers):  # across organisms: per seed index, every organism's layers
        by_seed: dict = {}
        for r in layers:
            if r["what"] == what:
                by_seed.setdefault(r["seed"], []).append(r)
        for seed, rs in sorted(by_seed.items(), key=lambda kv: (kv[0] is None, kv[0])):
            if len({r["population"] for r in rs}) < 2:
                continue
            rho = spearmanr([r["predicted"] for r in rs], [r["measured"] for r in rs]).statistic
            seeds.append(SeedPrediction(f"{POOLED}:{what}", seed, float(rho), len(rs)))
    short = sorted({m["population"] for m in models if m["n_layers"] < MIN_LAYERS})
    if short:
        notes.append(f"{', '.join(short)}: fewer than {MIN_LAYERS} layers, no per-organism value (their layers count "
                     f"in '{POOLED}')")
    return PredictSection(verdicts(seeds, overall=False) if seeds else [], models, layers, notes=notes)


def predict_plot(layers: list[dict], path: Path) -> Path:
    """Measured against first-order predicted effect at the budget, every layer of every cell."""
    from analysis.render.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for i, pop in enumerate(sorted({r["population"] for r in layers})):
        rs = [r for r in layers if r["population"] == pop]
        ax.scatter([r["predicted"] for r in rs], [r["measured"] for r in rs], s=12, color=f"C{i}", label=pop)
    ax.set_xlabel("first-order predicted effect at the budget")
    ax.set_ylabel("measured effect at the budget")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------------------- autosteer
def analyse_autosteer(data, load_cell) -> AutosteerSection | None:
    import numpy as np

    from analysis.autosteer import SeedRun, verdicts
    from analysis.crossmodel import population_of
    from analysis.population import across_seeds
    from analysis.stats import CONFIDENCE
    from jobs.autosteer import RESULT_FILE

    cells = [(cell, path) for cell, path in data.cells if cell.kind == "autosteer"]
    if not cells:
        return None
    runs, models, notes = [], [], []
    for cell, path in cells:
        loaded = load_cell("autosteer", path)
        if RESULT_FILE not in loaded:
            notes.append(f"{cell.model}: no {RESULT_FILE}")
            continue
        rows = loaded.table(RESULT_FILE).to_pylist()
        pop, seed = population_of(cell.model)
        label = f"{pop}:{rows[0]['concept']}" if rows else pop
        runs.append(SeedRun(label, seed, rows))
        models += [dict(r, population=label, seed=seed) for r in rows]
    strategies = []
    for label in dict.fromkeys(r.population for r in runs):
        rs = [m for m in models if m["population"] == label]
        for name in dict.fromkeys(m["strategy"] for m in rs):
            ms = [m for m in rs if m["strategy"] == name]
            v, lo, hi, *_ = across_seeds([m["vs_oracle"] for m in ms], False, CONFIDENCE)
            oracle = [m for m in rs if m["strategy"] == "oracle"]
            same = [json.loads(m["layers"] or "{}").keys() == json.loads(o["layers"] or "{}").keys()
                    for m in ms for o in oracle if o["seed"] == m["seed"]]
            strategies.append(dict(
                population=label, strategy=name, family=ms[0]["family"], automated=ms[0]["automated"],
                system=ms[0]["system"], n_seeds=len(ms), effect=float(np.mean([m["effect"] for m in ms])),
                vs_oracle=v, vs_oracle_low=lo, vs_oracle_high=hi,
                ratio_to_oracle=float(np.mean([m["effect"] for m in ms]) / np.mean([o["effect"] for o in oracle]))
                if oracle and np.mean([o["effect"] for o in oracle]) > 0 else math.nan,
                oracle_layers=float(np.mean(same)) if same else math.nan,
                kl=float(np.mean([m["kl"] for m in ms])), loss_increase=float(np.mean([m["loss_increase"] for m in ms])),
                steerability=float(np.mean([m["steerability"] for m in ms])),
                anti_steerable=float(np.mean([m["anti_steerable"] for m in ms])),
                choice_seconds=float(np.mean([m["choice_seconds"] for m in ms]))))
    return AutosteerSection(verdicts(runs) if runs else [], models, strategies, notes=notes)


STRATEGY_SUMMARY_COLUMNS = ("population", "strategy", "family", "automated", "system", "n_seeds", "effect",
                            "vs_oracle", "vs_oracle_low", "vs_oracle_high", "ratio_to_oracle", "oracle_layers", "kl",
                            "loss_increase", "steerability", "anti_steerable", "choice_seconds")


def autosteer_plot(strategies: list[dict], path: Path) -> Path:
    """Per population, each strategy's across-seed mean difference from the oracle with its interval."""
    import numpy as np

    from analysis.render.plots import pyplot, save

    plt = pyplot()
    pops = list(dict.fromkeys(s["population"] for s in strategies))
    names = list(dict.fromkeys(s["strategy"] for s in strategies))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(names) + 2), 3.6))
    width = 0.8 / max(len(pops), 1)
    for i, pop in enumerate(pops):
        by = {s["strategy"]: s for s in strategies if s["population"] == pop}
        x = np.arange(len(names)) - 0.4 + (i + 0.5) * width
        v = np.array([by[n]["vs_oracle"] if n in by else np.nan for n in names])
        lo = np.array([by[n]["vs_oracle_low"] if n in by else np.nan for n in names])
        hi = np.array([by[n]["vs_oracle_high"] if n in by else np.nan for n in names])
        ax.errorbar(x, v, yerr=[np.nan_to_num(v - lo), np.nan_to_num(hi - v)], fmt="o", ms=3, capsize=1.5, label=pop)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("effect - oracle's (held out)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return save(fig, path)


# ---------------------------------------------------------------------------- the report's hooks
def section(data, out: Path, load_cell) -> dict | None:
    """Both sections (None for a kind without cells); their tables and figures written into ``out``."""
    from cluster.store import write_parquet

    predict = analyse_predict(data, load_cell)
    autosteer = analyse_autosteer(data, load_cell)
    if predict is not None:
        if predict.verdicts:
            write_parquet(schemas.from_rows(predict.verdicts, schemas.AUTOSTEER_VERDICTS, "predict verdicts"),
                          out / "predict_population_verdicts.parquet", schemas.AUTOSTEER_VERDICTS)
        if predict.layers:
            predict.plots["layers"] = predict_plot(predict.layers, out / "predict.png")
    if autosteer is not None:
        if autosteer.verdicts:
            write_parquet(schemas.from_rows(autosteer.verdicts, schemas.AUTOSTEER_VERDICTS, "autosteer verdicts"),
                          out / "autosteer_verdicts.parquet", schemas.AUTOSTEER_VERDICTS)
        if autosteer.models:
            write_parquet(schemas.from_rows([{k: m[k] for k in schemas.AUTOSTEER_STRATEGIES.names} for m in autosteer.models],
                                            schemas.AUTOSTEER_STRATEGIES, "autosteer models"),
                          out / "autosteer_models.parquet", schemas.AUTOSTEER_STRATEGIES)
            write_parquet(schemas.from_rows(autosteer.strategies, schemas.REPORT_AUTOSTEER_STRATEGIES,
                                            "autosteer strategies"), out / "autosteer_strategies.parquet",
                          schemas.REPORT_AUTOSTEER_STRATEGIES)
            autosteer.plots["strategies"] = autosteer_plot(autosteer.strategies, out / "autosteer.png")
    if predict is None and autosteer is None:
        return None
    return {"predict": predict, "autosteer": autosteer}


def verdict_facts(sections: dict) -> dict[str, str]:
    """summary.json verdict keys of both sections' verdict rows."""
    facts = {}
    for kind in ("predict", "autosteer"):
        s = sections.get(kind)
        for r in (s.verdicts if s is not None else []):
            facts[f"{r['population']}/{kind}/{r['key']}"] = r["verdict"]
    return facts
