"""``eigengap autosteer``: automated steering (layers, multi-layer weights, coefficient) under a KL
budget, every strategy side by side at the same budget on the same prompts, against the oracle grid
(issue 18, point 3; success metric 5).

The strategies and their measures are ``spectral.steering.autosteer``'s; the rows, intervals and
one model's reading of ``autosteer_matches_oracle`` are ``analysis.autosteer``'s; the verdict over
training seeds is the report's (``jobs.autosteer_section``). Outputs in --out: strategies.parquet
(one row per strategy), layers.parquet (the oracle grid, the probe, the first-order prediction and
the scan per layer), verdicts.parquet (one model's reading), iti_heads.parquet (every head's probe
when ITI ran), summary.md, params.json, strategies.png.

Also ``python -m jobs.autosteer ...``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from jobs.config import JobConfig, out_dir_ready, steering_position
from jobs.registry import PROMPT_TOKENS, Experiment, statistics_metrics
from spectral import tables as schemas
from spectral.errors import UsageError
from spectral.models import Device
from spectral.steering.choices import AUTOMATED, MULTIPLIERS, STRATEGIES, SYSTEM

RESULT_FILE = "strategies.parquet"


class AutosteerConfig(JobConfig):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME."""
    out: Path
    """Output directory."""
    concept: str = "sentiment"
    """'sentiment' or 'names' (organisms), 'love-hate' (English tokenizers), or a YAML/JSON concept file."""
    prompts: int = Field(64, ge=8)
    """Evaluation prompts of an organism's built-in concept (half choose, half are held out)."""
    kl_budget: float = Field(0.25, gt=0)
    """Side-effect budget: the mean KL (nats) on the neutral prompts every strategy is matched to."""
    strategies: list[str] = list(STRATEGIES)
    """Strategies to compare (the oracle and the --system always run)."""
    system: str = SYSTEM
    """The automated choice the success-metric-5 verdict reads (one of the automated strategies)."""
    vector: Literal["caa", "actadd"] = "caa"
    """The vector the layer-choosing strategies (oracle, probe, theory, spectral, adaptive) steer with."""
    layers: list[int] | None = None
    """Candidate layers of the layer-choosing strategies (comma-separated; default all)."""
    exclude_layers: list[int] = []
    """Layers removed from the candidates (e.g. 0, where a vector rewrites the token)."""
    layer: int | None = None
    """The baselines' layer (ActAdd, CAA, mean-diff, PCA-diff, random; default the middle layer)."""
    probe_prompts: int = Field(8, ge=2)
    """Prompts of the calibration probe: this many neutral prompts and this many selection prompts per layer."""
    iti_heads: int = Field(4, ge=1)
    """ITI: the top-K heads by the probe's held-out accuracy on the contrast pairs."""
    random_draws: int = Field(20, ge=1)
    """Draws of the random direction (each matched to the budget on its own; the row is their mean)."""
    positions: str | int = "all"
    """Add the vector at every position ('all'), at each prompt's last token ('last'), or at one token index."""
    read_at: str | int = "last"
    """Read the vectors at the contrast prompts' last token ('last'), their token mean ('mean'), or one token index."""
    selection_fraction: float = Field(0.5, gt=0, lt=1)
    """Fraction of the evaluation prompts every choice is made on; every effect is reported on the rest."""
    seed: int = 0
    """Seed of the split, the random draws, ITI's pair split and the bootstrap."""
    scan_seed: int = 0
    """Seed of the held-out scan prompts of an organism concept (the spectral rule's scan)."""
    device: Device = "auto"
    """Where the model runs."""
    force: bool = False
    """Overwrite existing results in --out."""

    @field_validator("strategies")
    @classmethod
    def _known(cls, value):
        bad = [s for s in value if s not in STRATEGIES]
        if bad:
            raise ValueError(f"unknown strategy {bad[0]!r} (known: {', '.join(STRATEGIES)})")
        return value

    @field_validator("system")
    @classmethod
    def _automated(cls, value):
        if value not in AUTOMATED:
            raise ValueError(f"the system must be an automated strategy ({', '.join(AUTOMATED)}), got {value!r}")
        return value

    @field_validator("positions", "read_at")
    @classmethod
    def _position(cls, value, info):
        return steering_position(value, info.field_name)

    def wanted(self) -> list[str]:
        """The strategies to run, in report order: the requested ones plus the oracle and the system
        (and the probe, which ``adaptive`` and ``probe-k`` take their layers from)."""
        want = set(self.strategies) | {"oracle", self.system}
        if want & {"adaptive", "probe-k"}:
            want.add("probe")
        return [s for s in STRATEGIES if s in want]


def candidate_layers(config: AutosteerConfig, n_layers: int) -> list[int]:
    from spectral.models.ranges import check_range

    chosen = check_range("layer", config.layers, n_layers, option="--layers")
    check_range("layer", config.exclude_layers, n_layers, option="--exclude-layers")
    left = [l for l in chosen if l not in set(config.exclude_layers)]
    if not left:
        raise UsageError("--layers / --exclude-layers: no layers left to choose from")
    return left


def run(config: AutosteerConfig, *, echo=print):
    import numpy as np

    from analysis.autosteer import model_rows, model_verdict
    from analysis.steering import selection_split
    from cluster.executors import LocalExecutor
    from spectral.kernels.scan import ScanSettings, scan_table
    from spectral.models.adapter import HeadAdapter
    from spectral.models.loading import load_model, model_shape, parse_spec, require_causal_lm, resolve_device
    from spectral.models.ranges import check_range
    from spectral.steering import autosteer as A
    from spectral.steering import baselines as B
    from spectral.steering.concepts import concept_for, scan_texts
    from spectral.steering.measure import Evaluator
    from spectral.steering.strategies import layer_gaps
    from spectral.steering.vectors import actadd, caa
    from spectral.theory.first_order import first_order_layers

    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    n_layers, _ = model_shape(spec)
    require_causal_lm(spec, "eigengap autosteer")
    layers = candidate_layers(config, n_layers)
    baseline_layer = n_layers // 2 if config.layer is None else config.layer
    check_range("layer", [baseline_layer], n_layers, option="--layer")
    device = resolve_device(config.device)
    loaded = load_model(spec, device=device)
    concept = concept_for(config.concept, loaded, scan_seed=config.scan_seed, n=config.prompts)
    if config.probe_prompts > len(concept.neutral):
        raise UsageError(f"--probe-prompts: the concept has {len(concept.neutral)} neutral prompts, "
                         f"fewer than {config.probe_prompts}")
    adapter = HeadAdapter(loaded.model)
    tok = loaded.tokenizer
    ev = Evaluator(adapter, tok, concept, config.concept)  # checks every word and prompt before any work
    try:
        split = selection_split(len(concept.prompts), config.selection_fraction, config.seed,
                                strata=(ev.base_score > 0).cpu().numpy())
    except ValueError as err:
        raise UsageError(f"--selection-fraction: {err}") from None
    if config.probe_prompts > len(split.selection):
        raise UsageError(f"--probe-prompts: the selection split has {len(split.selection)} prompts, "
                         f"fewer than {config.probe_prompts}")
    wanted = config.wanted()
    budget = config.kl_budget
    make_vectors = caa if config.vector == "caa" else actadd
    vectors = {l: v for l, v in make_vectors(adapter, tok, concept, layers, device, config.read_at).items()}
    positions = config.positions

    choices, layer_info = [], {l: {} for l in range(n_layers)}
    search = A.layer_search(ev, vectors, budget, positions)
    vectors = {l: v for l, v in vectors.items() if l not in search.dropped}  # every choice among the same layers
    choices.append(A.oracle(search, vectors, positions, split.selection))
    for l in vectors:
        layer_info[l].update(scale=search.scale[l], kl=search.kl[l],
                             selection_effect=float(np.mean(search.effect[l][list(split.selection)])),
                             heldout_effect=float(np.mean(search.effect[l][list(split.heldout)])))
    probe_choice = None
    if "probe" in wanted:
        probe_choice, probe_k = A.probe(adapter, tok, concept, vectors, budget, positions, split.selection,
                                        config.probe_prompts, config.concept)
        choices += [probe_choice] + ([probe_k] if "probe-k" in wanted else [])
        for l in vectors:
            layer_info[l].update(probe_effect=probe_choice.details["probe_effect"][l],
                                 probe_scale=probe_choice.details["probe_scale"][l])
    if "theory" in wanted:
        t0 = time.perf_counter()
        sub = A.sub_concept(concept, list(split.selection))
        predicted = {l: float(fo.effect_at_budget(budget))
                     for l, fo in first_order_layers(adapter, tok, sub, vectors, positions, source=config.concept).items()}
        c = A.theory(predicted, vectors, positions, time.perf_counter() - t0)
        choices.append(c)
        for l in vectors:
            layer_info[l]["predicted_effect"] = c.details["predicted_effect"][l]
    scan_info = {}
    if {"spectral", "spectral-1"} & set(wanted):
        t0 = time.perf_counter()
        texts, scan_info = scan_texts(concept, "held-out")
        scan = scan_table(LocalExecutor(loaded, progress=False), spec.text, texts, ScanSettings(), n_layers,
                          adapter.n_heads, adapter.n_kv_heads)
        gaps = {l: g for l, g in layer_gaps(scan.to_pylist()).items() if l in vectors}
        if not gaps:
            raise UsageError("spectral: no candidate layer has a finite gap in the scan")
        for l, (g_min, g_mean) in gaps.items():
            layer_info[l].update(min_gap=g_min, mean_gap=g_mean)
        choices += [c for c in A.spectral(gaps, vectors, positions, time.perf_counter() - t0) if c.name in wanted]
    if "adaptive" in wanted:
        t0 = time.perf_counter()
        layer = next(iter(probe_choice.layers))
        injection, info = A.adaptive_injection(adapter, ev, layer, vectors[layer], positions)
        choices.append(A.Choice("adaptive", "adaptive", injection.scaled, {layer: 1.0},
                                "the probe's layer, alpha_i = alpha x g_i / g_ref (the prompt's own min key-kernel "
                                "gap over the median of the neutral prompts')",
                                probe_choice.seconds + time.perf_counter() - t0, details=info))

    # baselines at the fixed layer
    b = baseline_layer
    base_vectors = {
        "actadd": lambda: actadd(adapter, tok, concept, [b], device, config.read_at),
        "caa": lambda: caa(adapter, tok, concept, [b], device, config.read_at),
        "mean-diff": lambda: B.mean_difference_vectors(adapter, tok, concept, [b], device, "mean"),
        "pca-diff": lambda: B.pca_difference_vectors(adapter, tok, concept, [b], device, config.read_at)}
    text = {"actadd": "ActAdd: the first contrast pair's difference", "caa": "CAA: the mean difference over the pairs",
            "mean-diff": "the mean difference of the pairs' token-mean residuals (repeng's mean aggregator)",
            "pca-diff": "repeng's pca_diff direction (centred PCA of the differences, majority sign rule)"}
    for name, build in base_vectors.items():
        if name in wanted:
            t0 = time.perf_counter()
            v = build()
            choices.append(A.Choice(name, "baseline", A.vector_maker(v, {b: 1.0}, positions), {b: 1.0},
                                    f"{text[name]} at layer {b}", time.perf_counter() - t0))
    iti_rows = []
    if "iti" in wanted:
        t0 = time.perf_counter()
        probes = B.fit_iti(adapter, tok, concept, layers, seed=config.seed, device=device, at=config.read_at)
        k = min(config.iti_heads, len(probes.probes))
        injection = probes.injection(k, 1.0, positions)
        top = probes.top(k)
        iti_rows = probes.rows()
        choices.append(A.Choice("iti", "baseline", injection.scaled, {},
                                f"ITI: top {k} heads by held-out probe accuracy ("
                                + ", ".join(f"L{p.layer}H{p.head}" for p in top) + "), alpha x sigma x mass-mean direction",
                                time.perf_counter() - t0))
    if "random" in wanted:
        reference = caa(adapter, tok, concept, [b], device, config.read_at)
        draws = tuple(A.vector_maker(B.random_vectors(reference, seed=config.seed * 1000 + i), {b: 1.0}, positions)
                      for i in range(config.random_draws))
        choices.append(A.Choice("random", "baseline", None, {b: 1.0},
                                f"a random direction at the CAA vector's norm at layer {b}, mean of "
                                f"{config.random_draws} draws", 0.0, draws=draws))

    order = {s: i for i, s in enumerate(STRATEGIES)}
    choices.sort(key=lambda c: order[c.name])
    results = [A.summarize(ev, c, budget, MULTIPLIERS) for c in choices]
    rows = model_rows(spec.text, concept.name, results, split, budget=budget, system=config.system,
                      vector=config.vector, multipliers=MULTIPLIERS, seed=config.seed)
    verdict = model_verdict(spec.text, results, split, system=config.system, seed=config.seed)
    layer_rows = [{"layer": l, "candidate": l in vectors, "dropped": search.dropped.get(l, ""),
                   **{k: float(layer_info[l].get(k, math.nan)) for k in
                      ("scale", "kl", "selection_effect", "heldout_effect", "probe_effect", "probe_scale",
                       "predicted_effect", "min_gap", "mean_gap")}} for l in range(n_layers)]
    seconds = time.perf_counter() - start
    timing = {"seconds": round(seconds, 3), "oracle_grid_seconds": round(search.seconds, 3),
              **{f"choice_seconds/{c.name}": round(c.seconds, 3) for c in choices}}
    text_md = summary(config, spec.text, concept, rows, verdict, layer_rows, split, baseline_layer, timing)
    _write(config, rows, layer_rows, verdict, iti_rows, text_md, {
        "budget_kl": budget, "system": config.system, "strategies": wanted, "candidate_layers": layers,
        "dropped_layers": {str(l): why for l, why in search.dropped.items()},
        "baseline_layer": baseline_layer, "multipliers": list(MULTIPLIERS), "scan": scan_info,
        "split": {"seed": split.seed, "fraction": split.fraction, "selection": list(split.selection),
                  "heldout": list(split.heldout), "stratified_by": "sign of the unsteered score"},
        "choices": {c.name: {"layers": {str(l): w for l, w in c.layers.items()}, "details": _plain(c.details)}
                    for c in choices},
        "timing": timing})
    echo(text_md)
    echo(f"wrote {config.out}")
    return rows, verdict


def _plain(value):
    """JSON-ready details (numpy scalars and int keys)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    try:
        return float(value) if not isinstance(value, str | bool | int) else value
    except (TypeError, ValueError):
        return str(value)


def summary(config, model, concept, rows, verdict, layer_rows, split, baseline_layer, timing) -> str:
    def num(x, f=".3g"):
        return "nan" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, f)

    lines = [f"# eigengap autosteer: {model}", "",
             f"Concept {concept.name}: {len(concept.prompts)} evaluation prompts, {len(split.selection)} to choose on "
             f"(selection) and {len(split.heldout)} held out (every effect below), {len(concept.neutral)} neutral "
             f"prompts (the KL budget {config.kl_budget:g} nats each strategy is matched to), "
             f"{len(concept.heldout)} held-out texts (loss increase). Layer-choosing strategies steer with {config.vector} "
             f"vectors; baselines at layer {baseline_layer}. Steerability: per prompt the slope of the effect over "
             f"{', '.join(f'{m:g}' for m in MULTIPLIERS)} x the matched scale; anti-steerable: the fraction of prompts "
             "with a negative slope (Tan et al. 2024).", "",
             "| strategy | layers (weights) | scale | KL | effect [95 %] | - oracle [95 %] | / oracle | loss increase | "
             "steerability [95 %] | anti-steerable | choice s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (system)" if r["system"] else ""
        lines.append(
            f"| {r['strategy']}{mark} | {r['layers'] or r['description'][:40]} | {num(r['scale'])} | {num(r['kl'], '.4g')} | "
            f"{num(r['effect'])} [{num(r['effect_low'])}, {num(r['effect_high'])}] | {num(r['vs_oracle'])} "
            f"[{num(r['vs_oracle_low'])}, {num(r['vs_oracle_high'])}] | {num(r['ratio_to_oracle'], '.2f')} | "
            f"{num(r['loss_increase'])} | {num(r['steerability'])} [{num(r['steerability_low'])}, "
            f"{num(r['steerability_high'])}] | {r['anti_steerable']:.0%} | {num(r['choice_seconds'], '.2f')} |")
    lines += ["", "| layer | oracle scale | selection effect | held-out effect | probe effect | first-order effect | "
              "min gap |", "|---|---|---|---|---|---|---|"]
    for r in layer_rows:
        if r["candidate"]:
            lines.append(f"| {r['layer']} | {num(r['scale'])} | {num(r['selection_effect'])} | "
                         f"{num(r['heldout_effect'])} | {num(r['probe_effect'])} | {num(r['predicted_effect'])} | "
                         f"{num(r['min_gap'])} |")
    dropped = [f"layer {r['layer']} ({r['dropped']})" for r in layer_rows if r["dropped"]]
    if dropped:
        lines += ["", "Left out of every choice: " + "; ".join(dropped) + "."]
    worst = max(r["kl_relative_error"] for r in rows)
    beaten = [f"{r['strategy']} ({outside_the_grid(r, config.vector)})" for r in rows if r["beats_oracle_beyond_interval"]]
    lines += ["", f"Every strategy's neutral KL is within {worst:.1%} of the budget (tolerance 2 %). "
              + (f"Beating the oracle by more than its own interval (a sanity check): {', '.join(beaten)}."
                 if beaten else "No strategy beats the oracle by more than the oracle's own interval."), "",
              f"**{verdict['key']} (success metric 5), one model: {verdict['verdict']}**: D = effect({config.system}) - "
              f"0.9 x effect(oracle) = {num(verdict['value'])} [{num(verdict['low'])}, {num(verdict['high'])}]; "
              f"{verdict['note']}. {verdict['scheme']}. The verdict over training seeds is the report's.", "",
              f"Timing: {timing['seconds']:.1f} s in all; the oracle grid {timing['oracle_grid_seconds']:.1f} s; "
              + ", ".join(f"{k.split('/')[1]} {v:.2f} s" for k, v in timing.items() if k.startswith("choice_seconds/"))
              + " to choose."]
    return "\n".join(lines)


def outside_the_grid(row, vector: str) -> str:
    """Why a strategy lies outside the oracle's grid (one layer, the --vector's vector), or that it
    lies inside it (then beating the oracle beyond its interval would be a fault)."""
    import json

    layers = json.loads(row["layers"]) if row["layers"] else {}
    if row["strategy"] == "iti":
        return "outside the oracle's grid: heads' outputs, not the residual stream"
    if len(layers) > 1:
        return "outside the oracle's grid: several layers"
    if row["family"] == "baseline" and row["strategy"] != vector or row["strategy"] == "adaptive":
        return "outside the oracle's grid: another vector or per-prompt coefficients"
    return "INSIDE the oracle's grid: check the run"


def _write(config, rows, layer_rows, verdict, iti_rows, text, extra) -> None:
    from cluster.store import write_json, write_parquet, write_text

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    write_json({"config": config.model_dump(mode="json"), **extra}, out / "params.json")
    write_parquet(schemas.from_rows(layer_rows, schemas.AUTOSTEER_LAYERS, "layers.parquet"), out / "layers.parquet",
                  schemas.AUTOSTEER_LAYERS)
    write_parquet(schemas.from_rows([verdict], schemas.AUTOSTEER_VERDICTS, "verdicts.parquet"),
                  out / "verdicts.parquet", schemas.AUTOSTEER_VERDICTS)
    if iti_rows:
        write_parquet(schemas.from_rows(iti_rows, schemas.AUTOSTEER_ITI, "iti_heads.parquet"), out / "iti_heads.parquet",
                      schemas.AUTOSTEER_ITI)
    strategies_plot(rows, out / "strategies.png", config.model)
    write_text(text + "\n", out / "summary.md")
    write_parquet(schemas.from_rows(rows, schemas.AUTOSTEER_STRATEGIES, RESULT_FILE), out / RESULT_FILE,
                  schemas.AUTOSTEER_STRATEGIES)  # last: its presence means the run completed


def strategies_plot(rows, path: Path, title: str) -> Path:
    """Each strategy's held-out effect with its 95 % interval; the oracle's as a band, 90 % of it dashed."""
    import numpy as np

    from analysis.render.plots import pyplot, save

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(rows) + 2), 3.4))
    x = np.arange(len(rows))
    eff = np.array([r["effect"] for r in rows])
    lo, hi = np.array([r["effect_low"] for r in rows]), np.array([r["effect_high"] for r in rows])
    colours = ["C3" if r["strategy"] == "oracle" else "C2" if r["system"] else "C0" if r["automated"] else "C7"
               for r in rows]
    ax.errorbar(x, eff, yerr=[eff - lo, hi - eff], fmt="none", ecolor="0.5", capsize=2)
    ax.scatter(x, eff, c=colours, zorder=3)
    oracle = next((r for r in rows if r["strategy"] == "oracle"), None)
    if oracle is not None:
        ax.axhspan(oracle["effect_low"], oracle["effect_high"], color="C3", alpha=0.1)
        ax.axhline(0.9 * oracle["effect"], color="C3", ls="--", lw=1)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(x, [r["strategy"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("held-out effect at the budget")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """The one-model verdict's statistics and each strategy's held-out effect (``effect/<strategy>``)."""
    from cluster.store import read_parquet

    metrics, params = statistics_metrics(cell_dir / "verdicts.parquet", schemas.AUTOSTEER_VERDICTS)
    if (cell_dir / RESULT_FILE).is_file():
        for r in read_parquet(cell_dir / RESULT_FILE, schemas.AUTOSTEER_STRATEGIES, ["strategy", "effect"]).to_pylist():
            metrics[f"effect/{r['strategy']}"] = float(r["effect"])
    return metrics, params


def cost(params, facts) -> float:
    """Per layer ~15 KL evaluations twice (the grid and the probe), a forward-mode pass, and ~13 strategies
    matched (~15 evaluations) and measured at 5 multipliers, on 64 prompts each."""
    return float((32 * facts.layers + 13 * 20) * 64 * PROMPT_TOKENS)


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="autosteer", help="automated steering strategies and baselines against the oracle grid at a KL budget",
    config=AutosteerConfig, run=run,
    tables={RESULT_FILE: schemas.AUTOSTEER_STRATEGIES, "layers.parquet": schemas.AUTOSTEER_LAYERS,
            "verdicts.parquet": schemas.AUTOSTEER_VERDICTS},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["autosteer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
