"""``eigengap dynamics steer`` (experiment kind ``dynamics_steer``): spectrally adaptive steering
vs a fixed coefficient at the same mean-KL budget, during greedy generation (issue 17, point 4).

One run, on one model:

1. the concept (``--concept``, as ``eigengap steer``: sentiment for organisms, love-hate, or a
   concept file) and its ActAdd (default) or CAA vector at the injection layer: ``--layer``, by
   default the steer job's baseline layer (the middle layer, ``n_layers // 2``), chosen before any
   measurement;
2. the evaluation prompts (with the organisms' sentiment concept ``--prompts`` distinct sentiment
   contexts, default 256: ``spectral.dynamics.adaptive.sentiment_prompts``; other concepts: their
   own);
3. per arm (``fixed``: alpha_t = alpha; ``adaptive``: ``--rule``, by default
   alpha_t = alpha x g_t / g_0, ``spectral.dynamics.adaptive``), the scale alpha at which the mean
   KL(unsteered || steered) over the ``--max-new-tokens`` steps and the prompts equals ``--budget``
   (``match_scale``, 2 % tolerance). ``--match-on evaluated`` (default): on every prompt, the very
   prompts whose effect is compared ("at the same mean KL budget on the same prompts"; the scale
   depends on the KL only, never on the effect, and the layer is fixed before any measurement);
   ``--match-on selection``: on a selection split (``--selection-fraction``, ``--split-seed``,
   stratified by the sign of the unsteered score, as ``eigengap steer``), effects on the held-out
   rest, then both arms at their scales on every prompt;
4. the effect and KL of the evaluated prompts compared (``analysis.adaptive_steering``): the
   paired difference adaptive - fixed with a bootstrap interval over prompts (the scales held
   fixed) and this model's reading of ``adaptive_steering_beats_fixed``, with its validity guard
   (``analysis.adaptive_steering.kl_guard``: a claim counts only when the winner did not spend more
   KL than the loser; matched on the evaluated prompts it holds by construction up to the
   matcher's tolerance). The verdict over a population's training seeds is the report's.

Writes dynamics_steer_steps.parquet (per arm x prompt x step), dynamics_steer_arms.parquet (per
arm and the difference), dynamics_steer_verdicts.parquet (this model's reading), params.json,
summary.md (with the rule) and steps.png; dynamics_steer_arms.parquet last (its presence means the
run completed: without --force an existing one is kept and the run refused).

Also ``python -m jobs.dynamics_steer ...``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from jobs.config import JobConfig, out_dir_ready, steering_position
from jobs.registry import PROMPT_TOKENS, Experiment, statistics_metrics
from spectral import tables as schemas
from spectral.models import Device

RESULT_FILE = "dynamics_steer_arms.parquet"
DEFAULT_PROMPTS = 256
"""The sentiment concept's evaluation prompts (all matched and evaluated; with --match-on selection 128 +
128): the adaptive arm's per-prompt KL is heavy-tailed, and on organism-xs a budget matched on 16 selection
prompts left its held-out mean KL anywhere in 0.01-0.9 (5-95 % over splits), on 128 in 0.1-0.5 (the language
has 272 distinct contexts)."""
STEPS_FILE = "dynamics_steer_steps.parquet"
VERDICTS_FILE = "dynamics_steer_verdicts.parquet"


class DynamicsSteerConfig(JobConfig):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME (a causal LM)."""
    out: Path
    """Output directory."""
    concept: str = "sentiment"
    """'sentiment' (organisms), 'love-hate' (English tokenizers), or a YAML/JSON concept file."""
    vector: Literal["actadd", "caa"] = "actadd"
    """ActAdd (the first contrast pair) or CAA (mean difference over all pairs), as eigengap steer."""
    layer: int | None = None
    """Injection layer (default: the steer job's baseline layer, the middle layer n_layers // 2)."""
    rule: Literal["gap", "inverse-gap"] = "gap"
    """The adaptive arm's rule: gap (alpha_t = alpha g_t / g_0) or inverse-gap (alpha_t = alpha g_0 / g_t)."""
    max_new_tokens: int = Field(8, gt=0)
    """Tokens generated per prompt (greedy); every step is measured."""
    budget: float = Field(0.25, gt=0)
    """Side-effect budget: the mean KL(unsteered || steered) over steps and the matched prompts (nats) each
    arm is scaled to (the steer job's default budget)."""
    match_on: Literal["evaluated", "selection"] = "evaluated"
    """Match each arm's scale on the evaluated prompts themselves (every prompt; the default) or on a
    selection split, with effects on the held-out rest (--selection-fraction, --split-seed)."""
    read_at: str | int = "last"
    """Read the vector at the contrast prompts' last token ('last'), their token mean ('mean') or a token index."""
    prompts: int | None = Field(None, ge=4)
    """Evaluation prompts of the organisms' sentiment concept: that many distinct sentiment contexts
    (even; default DEFAULT_PROMPTS). Other concepts use their own prompts."""
    selection_fraction: float = Field(0.5, gt=0, lt=1)
    """With --match-on selection: the fraction of the prompts the scales are matched on; effects on the rest."""
    split_seed: int = 0
    """Seed of the bootstrap (and with --match-on selection of the selection / held-out split)."""
    scan_seed: int = 0
    """Seed of the organisms' sentiment concept's scan prompts (as eigengap steer; not used here otherwise)."""
    batch_size: int = Field(64, ge=1)
    """Prompts per forward pass (each runs twice: steered and unsteered)."""
    device: Device = "auto"
    """Where the model runs."""
    force: bool = False
    """Overwrite existing results in --out."""

    @field_validator("read_at")
    @classmethod
    def _position(cls, value):
        return steering_position(value, "read_at")


def run(config: DynamicsSteerConfig, *, echo=print):
    import numpy as np
    import torch

    from analysis.adaptive_steering import ArmResult, model_rows, model_verdict, rule
    from analysis.sae_steering import steer_split
    from spectral.dynamics.adaptive import (RULE_TEXT, AdaptiveSettings, match_scale, missed_match,
                                            sentiment_prompts, steered_generation, token_rows)
    from spectral.errors import UsageError
    from spectral.models.adapter import HeadAdapter
    from spectral.models.loading import load_model, model_shape, parse_spec, require_causal_lm, resolve_device
    from spectral.models.ranges import check_range
    from spectral.steering.concepts import concept_for, single_token_ids
    from spectral.steering.measure import Evaluator
    from spectral.steering.vectors import actadd, caa
    from spectral.tokens import pad_id

    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    require_causal_lm(spec, "eigengap dynamics steer")
    n_layers, _ = model_shape(spec)
    layer = n_layers // 2 if config.layer is None else config.layer
    check_range("layer", [layer], n_layers, option="--layer")
    loaded = load_model(spec, device=resolve_device(config.device))
    concept = concept_for(config.concept, loaded, scan_seed=config.scan_seed)
    if config.concept == "sentiment":
        import dataclasses
        import json

        from spectral.models.loading import checkpoint_path

        tasks = json.loads((checkpoint_path(loaded) / "tasks.json").read_text())
        concept = dataclasses.replace(concept, prompts=sentiment_prompts(tasks, config.prompts or DEFAULT_PROMPTS))
    elif config.prompts is not None:
        raise UsageError(f"--prompts applies to the organisms' sentiment concept only; {config.concept!r} brings "
                         "its own prompts")
    adapter = HeadAdapter(loaded.model)
    ev = Evaluator(adapter, loaded.tokenizer, concept, config.concept)  # checks every word and prompt
    split = steer_split(ev.base_score, config.selection_fraction, config.split_seed) \
        if config.match_on == "selection" else None
    device = loaded.model.get_input_embeddings().weight.device
    make = actadd if config.vector == "actadd" else caa
    vector = make(adapter, loaded.tokenizer, concept, [layer], device, config.read_at)[layer]
    target = single_token_ids(loaded.tokenizer, concept.target, "target", config.concept)
    opposite = single_token_ids(loaded.tokenizer, concept.opposite, "opposite", config.concept)
    rows = token_rows(loaded.tokenizer, concept.prompts)
    settings = AdaptiveSettings(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
    pad = pad_id(loaded.tokenizer)
    matched = rows if split is None else [rows[i] for i in split.selection]

    def generation(prompts, scale: float, rule_name: str):
        return steered_generation(adapter, prompts, vector, layer, scale, rule_name, target, opposite, settings, pad)

    arms: dict[str, ArmResult] = {}
    missed: dict[str, str] = {}
    steps_rows = []
    for arm, rule_name in (("fixed", "fixed"), ("adaptive", config.rule)):
        echo(f"{arm} arm ({RULE_TEXT[rule_name]}): matching the mean KL to {config.budget:g} on "
             f"{len(matched)} {'evaluated' if split is None else 'selection'} prompts x {config.max_new_tokens} steps")
        scale, g = match_scale(lambda s: generation(matched, s, rule_name), config.budget)
        missed[arm] = missed_match(g.mean_kl, config.budget, scale)
        if missed[arm]:
            echo(f"warning: {arm} arm: {missed[arm]} (kept; the note and params.json say so)")
        if split is not None:
            g = generation(rows, scale, rule_name)
        arms[arm] = ArmResult(rule_name, scale, g.effect, g.kl, g.coefficient, g.gap)
        split_of = np.array(["evaluated" if split is None else "heldout"] * len(rows), dtype=object)
        if split is not None:
            split_of[list(split.selection)] = "selection"
        n, steps = g.tokens.shape
        steps_rows.append({
            "model": [spec.text] * n * steps, "arm": [arm] * n * steps, "rule": [rule_name] * n * steps,
            "layer": np.full(n * steps, layer), "prompt": np.repeat(np.arange(n), steps),
            "split": np.repeat(split_of, steps).tolist(), "step": np.tile(np.arange(steps), n),
            "token": g.tokens.ravel(), "scale": np.full(n * steps, scale), "coefficient": g.coefficient.ravel(),
            "gap": g.gap.ravel(), "effect": g.effect.ravel(), "kl": g.kl.ravel(),
            "score_unsteered": g.score_unsteered.ravel()})
    rule_text = rule(RULE_TEXT[config.rule], config.match_on)
    arm_rows = model_rows(spec.text, arms, split, layer=layer, vector=config.vector, budget=config.budget,
                          rule_text=RULE_TEXT, seed=config.split_seed)
    verdict = model_verdict(arm_rows, rule_text)
    import pyarrow as pa

    steps_table = pa.concat_tables([schemas.conform(pa.table(c), schemas.DYNAMICS_STEER_STEPS, "steps")
                                    for c in steps_rows])
    text = summary(spec.text, arm_rows, verdict, layer, config, split)
    params = {"config": config.model_dump(mode="json"), "layer": layer, "budget_kl": config.budget,
              "match_on": config.match_on, "match_missed": {arm: text for arm, text in missed.items() if text},
              "split": None if split is None else {
                  "seed": split.seed, "fraction": split.fraction, "selection": list(split.selection),
                  "heldout": list(split.heldout), "stratified_by": "sign of the unsteered score"},
              "prompts": list(concept.prompts), "scales": {arm: a.scale for arm, a in arms.items()}, "rule": rule_text,
              "torch_threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - start, 3)}
    _write(config.out, steps_table, arm_rows, verdict, params, text, spec.text)
    echo(text)
    echo(f"wrote {config.out}")
    return arm_rows


def summary(model: str, arm_rows: list[dict], verdict: dict, layer: int, config: DynamicsSteerConfig, split) -> str:
    """summary.md: the arms at the budget, the difference and this model's reading, with the rule."""
    def f(x) -> str:
        return "–" if x != x else f"{x:.4g}"

    chosen = "--layer" if config.layer is not None else "the steer job's baseline: n_layers // 2"
    n = arm_rows[0]["n_heldout"]
    where = (f"the {n} prompts whose effects are compared (each arm's scale matched there, within 2 % unless the note says otherwise)"
             if split is None else f"the {len(split.selection)} selection prompts; effects on the "
             f"{len(split.heldout)} held-out prompts")
    lines = [f"# Spectrally adaptive steering: {model}", "",
             f"Injection layer {layer} ({chosen}), {config.vector} vector of the concept {config.concept!r}, "
             f"{config.max_new_tokens} greedy tokens per prompt, budget: mean KL {config.budget:g} nats over steps "
             f"and {where}. Intervals: paired bootstrap over the evaluated prompts with the scales held fixed.", "",
             "| arm | rule | scale | KL (matched on) | KL (evaluated) [95 %] | effect [95 %] | mean coefficient "
             "| mean gap |", "|---|---|---|---|---|---|---|---|"]
    for r in arm_rows:
        lines.append(f"| {r['arm']} | {r['rule']} | {f(r['scale'])} | {f(r['kl_selection'])} | {f(r['kl'])} "
                     f"[{f(r['kl_low'])}, {f(r['kl_high'])}] | {f(r['effect'])} [{f(r['effect_low'])}, "
                     f"{f(r['effect_high'])}] | {f(r['mean_coefficient'])} | {f(r['mean_gap'])} |")
    lines += ["", f"**{verdict['key']}** on this model: **{verdict['verdict']}** (adaptive - fixed "
              f"{f(verdict['value'])} "
              f"[{f(verdict['low'])}, {f(verdict['high'])}], p pass {f(verdict['p_pass'])}, p fail "
              f"{f(verdict['p_fail'])}; {verdict['scheme']}); {verdict['note']}.", "", f"Rule: {verdict['rule']}", ""]
    return "\n".join(lines)


def _write(out: Path, steps, arm_rows, verdict, params, text, title) -> None:
    from cluster.store import write_json, write_parquet, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(params, out / "params.json")
    write_parquet(steps, out / STEPS_FILE, schemas.DYNAMICS_STEER_STEPS)
    write_parquet(schemas.from_rows([verdict], schemas.DYNAMICS_STEER_VERDICTS, "verdicts"), out / VERDICTS_FILE,
                  schemas.DYNAMICS_STEER_VERDICTS)
    steps_plot(steps, out / "steps.png", title)
    write_text(text, out / "summary.md")
    write_parquet(schemas.from_rows(arm_rows, schemas.DYNAMICS_STEER_ARMS, "arms"), out / RESULT_FILE,
                  schemas.DYNAMICS_STEER_ARMS)  # last: its presence means the run completed


def steps_plot(steps, path: Path, title: str = "") -> Path:
    """Per arm, the mean over the evaluated prompts of the coefficient, the gap, the effect and the KL by step."""
    import numpy as np

    from analysis.render.plots import pyplot, save

    plt = pyplot()
    d = {k: np.asarray(steps[k].to_pylist()) for k in ("arm", "split", "step", "coefficient", "gap", "effect", "kl")}
    held = np.isin(d["split"], ["heldout", "evaluated"])
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2))
    for arm in sorted(set(d["arm"])):
        m = held & (d["arm"] == arm)
        x = np.unique(d["step"][m])
        for ax, key in zip(axes, ("coefficient", "gap", "effect", "kl")):
            ax.plot(x, [d[key][m & (d["step"] == s)].mean() for s in x], marker="o", ms=3, label=arm)
            ax.set_xlabel("step")
            ax.set_title(key, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}: evaluated prompts, mean per step", fontsize=10)
    fig.tight_layout()
    return save(fig, path)


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """This model's reading (``<key>/value|low|high``, ``verdict/<key>``) and each arm's evaluated
    effect, KL and scale (``effect/<arm>``, ``kl/<arm>``, ``scale/<arm>``)."""
    import math

    from cluster.store import read_parquet

    metrics, params = statistics_metrics(cell_dir / VERDICTS_FILE, schemas.DYNAMICS_STEER_VERDICTS)
    if (cell_dir / RESULT_FILE).is_file():
        arms = read_parquet(cell_dir / RESULT_FILE, schemas.DYNAMICS_STEER_ARMS, ["arm", "effect", "kl", "scale"])
        for r in arms.to_pylist():
            for k in ("effect", "kl", "scale"):
                if r[k] is not None and math.isfinite(r[k]):
                    metrics[f"{k}/{r['arm']}"] = float(r[k])
    return metrics, params


def cost(params, facts) -> float:
    """Two arms x ~12 budget evaluations on all prompts (--match-on selection: on half of them, then
    both arms on all, 6 + 1 passes): passes of all prompts x (prompt + new tokens), each run twice
    (steered and unsteered)."""
    tokens = int(params.get("max_new_tokens", 8)) + PROMPT_TOKENS
    passes = 7 if params.get("match_on") == "selection" else 12
    return float(2 * passes * int(params.get("prompts") or DEFAULT_PROMPTS) * 2 * tokens)


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="dynamics_steer", help="spectrally adaptive steering vs a fixed coefficient at the same KL budget",
    config=DynamicsSteerConfig, run=run,
    tables={RESULT_FILE: schemas.DYNAMICS_STEER_ARMS, STEPS_FILE: schemas.DYNAMICS_STEER_STEPS,
            VERDICTS_FILE: schemas.DYNAMICS_STEER_VERDICTS},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["dynamics", "steer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
