"""``eigengap steer``: ActAdd/CAA steering, strategies compared at a matched side-effect budget.

Strategies are compared at equal numbers of layers, the oracle chooses on a selection split
of the evaluation prompts and every effect is reported on the held-out rest, the random
control is the mean over >= 20 draws, and the scan the spectral rule reads is held out from
the evaluation prompts unless ``--scan-set in-sample`` (see ``analysis.steering``).

Also ``python -m jobs.steer ...``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import Field, field_validator

from jobs.config import ExecutorOptions, out_dir_ready, steering_position
from jobs.registry import PROMPT_TOKENS, Experiment, statistics_metrics
from spectral import tables as schemas
from spectral.errors import UsageError
from spectral.models import Device
from spectral.models.ranges import check_range
from spectral.steering.strategies import MIN_RANDOM_DRAWS, STRATEGIES

if TYPE_CHECKING:
    import torch

    from spectral.steering.concepts import Concept
    from spectral.steering.measure import Evaluator

RESULT_FILE = "strategies.parquet"


class SteerConfig(ExecutorOptions):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME."""
    out: Path
    """Output directory."""
    concept: str = "sentiment"
    """'sentiment' or 'names' (organisms), 'love-hate' (English tokenizers), or a YAML/JSON concept file."""
    strategies: list[str] = list(STRATEGIES)
    """Strategies to compare (baseline, oracle, random, spectral, all)."""
    vector: Literal["actadd", "caa"] = "actadd"
    """ActAdd (the first contrast pair) or CAA (mean difference over all pairs)."""
    layer: int | None = None
    """The baseline's fixed layer (default: the middle layer)."""
    kl_budget: float = Field(0.25, gt=0)
    """Side-effect budget: the mean KL (nats) on the neutral prompts every strategy is scaled to."""
    coefficient: float | None = None
    """Instead of --kl-budget: the budget is the KL of the baseline at this coefficient."""
    grid: list[float] = [-2.0, -1.0, -0.5, 0.5, 1.0, 2.0]
    """Coefficients of the exhaustive layer x coefficient grid (negative steers the other way;
    write --grid=-4,-1,1 so that the leading minus is not read as an option)."""
    positions: str | int = "all"
    """Add the vector at every position ('all'), at each prompt's last token ('last'), or at one
    token index (e.g. 0)."""
    read_at: str | int = "last"
    """Read the vectors at the contrast prompts' last token ('last'), their token mean ('mean'),
    or one token index (e.g. 2)."""
    generate_tokens: int = Field(8, ge=1)
    """Tokens generated per prompt for the target-word fraction."""
    seed: int = 0
    """Seed of the random control's draws, sampled generation, the bootstrap and (unless
    --split-seed) the selection / held-out split."""
    random_draws: int = Field(MIN_RANDOM_DRAWS, ge=MIN_RANDOM_DRAWS)
    """Draws of the random control (each of k random layers, matched to the budget on its own)."""
    selection_fraction: float = Field(0.5, gt=0, lt=1)
    """Fraction of the evaluation prompts the oracle chooses its layers on; every effect is
    reported on the held-out rest."""
    split_seed: int | None = None
    """Seed of the selection / held-out split of the evaluation prompts (default: --seed)."""
    scan_set: Literal["held-out", "in-sample"] = "held-out"
    """Texts of the scan the spectral rule reads: 'held-out' (contrast pairs, the concept's scan
    prompts and neutral prompts, none of them an evaluation prompt) or 'in-sample' (pairs,
    evaluation prompts and neutral prompts; labelled as such in the outputs)."""
    scan_seed: int = 0
    """Seed of the held-out scan prompts drawn for the organisms' sentiment concept."""
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

    @field_validator("positions", "read_at")
    @classmethod
    def _position(cls, value, info):
        return steering_position(value, info.field_name)

    @field_validator("coefficient", "grid")
    @classmethod
    def _finite(cls, value):
        for v in value if isinstance(value, list) else [] if value is None else [value]:
            if not math.isfinite(v):
                raise ValueError(f"coefficient {v} is not finite")
        return value


@dataclass
class SteerUnit:
    """Measure one injection profile: at a fixed scale (grid), or at the scale matching the budget."""

    name: str
    concept: Concept
    vectors: dict[int, torch.Tensor]
    profile: dict[int, float]
    positions: str | int
    scale: float | None  # None: match the budget
    budget: float
    generate_tokens: int = 0
    seed: int = 0


def _evaluator(loaded, concept: Concept, source: str = "concept") -> Evaluator:
    from spectral.models.adapter import HeadAdapter
    from spectral.steering.measure import Evaluator

    memo = loaded.__dict__.setdefault("_steer_memo", {})
    if concept not in memo:
        memo.clear()
        memo[concept] = Evaluator(HeadAdapter(loaded.model), loaded.tokenizer, concept, source)
    return memo[concept]


def steer_unit(loaded, unit: SteerUnit) -> dict:
    from spectral.steering.strategies import match_budget
    from spectral.steering.injection import Injection

    ev = _evaluator(loaded, unit.concept)
    vectors = {l: v.to(loaded.model.get_input_embeddings().weight.device) for l, v in unit.vectors.items()}

    def injection(scale: float) -> Injection:
        return Injection(vectors, {l: c * scale for l, c in unit.profile.items()}, unit.positions)

    scale = unit.scale
    if scale is None:
        try:
            scale, _ = match_budget(lambda s: ev.kl(injection(s)), unit.budget)
        except ValueError as err:  # the budget is out of this profile's reach: a one-line error
            raise UsageError(f"--kl-budget: {unit.name}: {err}; give a smaller --kl-budget") from None
    m = ev.measure(injection(scale))
    out = {"name": unit.name, "profile": unit.profile, "scale": scale, "effect": m.effect.tolist(),
           "kl": m.kl.tolist(), "loss_increase": m.loss_increase.tolist()}
    if unit.generate_tokens:
        out["greedy_fraction"] = ev.target_fraction(injection(scale), sample=False,
                                                    max_new_tokens=unit.generate_tokens).tolist()
        out["sampled_fraction"] = ev.target_fraction(injection(scale), sample=True, seed=unit.seed,
                                                     max_new_tokens=unit.generate_tokens).tolist()
    return out


def run(config: SteerConfig, *, echo=print):
    import numpy as np
    import pyarrow as pa

    from analysis.render.markdown import steering_report
    from analysis.steering import selection_split, strategy_rows
    from cluster.executors import LocalExecutor
    from spectral.kernels.scan import ScanSettings, scan_table
    from spectral.models.loading import load_model, model_shape, parse_spec, require_causal_lm, resolve_device
    from spectral.steering.concepts import concept_for, scan_texts
    from spectral.steering.strategies import arms, layer_gaps, oracle_arms, order, spectral_k
    from spectral.steering.injection import Injection
    from spectral.steering.vectors import actadd, caa

    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    n_layers, _ = model_shape(spec)
    require_causal_lm(spec, "eigengap steer")
    baseline_layer = n_layers // 2 if config.layer is None else config.layer
    check_range("layer", [baseline_layer], n_layers, option="--layer")
    device = resolve_device(config.device)
    probe = load_model(spec, device=device)
    concept = concept_for(config.concept, probe, scan_seed=config.scan_seed)
    ev = _evaluator(probe, concept, config.concept)  # checks every word and prompt before any work is sent out
    split_seed = config.seed if config.split_seed is None else config.split_seed
    try:  # stratified by the sign of the unsteered score: both halves hold positive and negative contexts
        split = selection_split(len(concept.prompts), config.selection_fraction, split_seed,
                                strata=(ev.base_score > 0).cpu().numpy())
    except ValueError as err:
        raise UsageError(f"--selection-fraction: {err}") from None
    adapter = ev.adapter
    make = actadd if config.vector == "actadd" else caa
    vectors = {l: v.cpu() for l, v in make(adapter, probe.tokenizer, concept, range(n_layers), device, config.read_at).items()}
    zero = [l for l, v in vectors.items() if not float(v.double().norm()) > 0]
    if zero:  # the oracle and the random control need every layer
        raise UsageError(f"--concept {config.concept}: the steering vector is zero at layer(s) "
                         f"{', '.join(map(str, zero))} (the contrast pairs' residuals agree there, e.g. every pair ends "
                         "in the same token); eigengap steer needs one at every layer: use eigengap autosteer, which "
                         "leaves such layers out")

    # the scan the spectral strategy reads: key kernel, held out from the evaluation prompts by default
    settings = ScanSettings()
    texts, scan_info = scan_texts(concept, config.scan_set)
    scan_info["scan_seed"] = config.scan_seed
    scan = scan_table(LocalExecutor(probe, progress=False), spec.text, texts, settings, n_layers, adapter.n_heads,
                      adapter.n_kv_heads)  # kv_head right for grouped-query models too
    scan = scan.append_column("scan_set", pa.array([config.scan_set] * scan.num_rows))
    gaps = layer_gaps(scan.to_pylist())

    budget = config.kl_budget
    if config.coefficient is not None:
        base = Injection({baseline_layer: vectors[baseline_layer]}, {baseline_layer: config.coefficient}, config.positions)
        budget = ev.kl(base)
        if not budget > 0:
            raise UsageError(f"the baseline (layer {baseline_layer}, coefficient {config.coefficient}) changes nothing "
                             "on the neutral prompts: give --kl-budget")
    fixed = arms(n_layers, baseline_layer=baseline_layer, gaps=gaps, families=config.strategies, seed=config.seed,
                 draws=config.random_draws)
    units = Units(concept, vectors, config, budget)
    if "oracle" in config.strategies:  # the oracle's search: every single layer at the budget
        for l in range(n_layers):
            units.add({l: 1.0}, generate=False)
    for arm in fixed:  # generations for every fixed strategy, not for the random control's draws
        for profile in arm.profiles:
            units.add(profile, generate=arm.family != "random")
    grid = [SteerUnit(f"grid {l} {c:g}", concept, vectors, {l: 1.0}, config.positions, c, budget)
            for l in range(n_layers) for c in config.grid]
    executor = config.make_executor({"device": config.device}, loaded=probe)
    with executor:
        results = executor.map(spec.text, steer_unit, units.units + grid, desc="steer")
        done = dict(zip(units.keys, results))
        chosen = []
        if "oracle" in config.strategies:  # chosen on the selection split only, then run with generations
            selection = list(split.selection)
            chosen = oracle_arms(n_layers, gaps, {l: float(np.mean(np.asarray(done[_key({l: 1.0})]["effect"])[selection]))
                                                  for l in range(n_layers)})
            second = Units(concept, vectors, config, budget)
            for arm in chosen:
                known = done.get(_key(arm.profiles[0]))
                if known is None or "greedy_fraction" not in known:  # a known profile is rerun at its scale
                    second.add(arm.profiles[0], generate=True, scale=known["scale"] if known else None)
            done.update(dict(zip(second.keys, executor.map(spec.text, steer_unit, second.units, desc="oracle")))
                        if second.units else {})
    rows = [{"name": arm.name, "family": arm.family, "k": arm.k, "runs": [done[_key(p)] for p in arm.profiles]}
            for arm in order(fixed + chosen)]
    layer_runs = {l: done[_key({l: 1.0})] for l in range(n_layers)} if "oracle" in config.strategies else {}
    tables = strategy_rows(rows, layer_runs, results[len(units.units):], gaps, split, config.seed, config.scan_set)
    text = steering_report(tables, gaps, budget, baseline_layer, config, spec.text, split, scan_info)
    _write(config, tables, scan, text, {
        "budget_kl": budget, "baseline_layer": baseline_layer, "spectral_k": spectral_k(n_layers),
        "scan": scan_info, "split": {"seed": split.seed, "fraction": split.fraction, "selection": list(split.selection),
                                     "heldout": list(split.heldout), "stratified_by": "sign of the unsteered score"},
        "oracle": {arm.name: sorted(arm.profiles[0]) for arm in chosen},
        "seconds": round(time.perf_counter() - start, 3)})
    echo(text)
    echo(f"wrote {config.out}")
    return tables


def _key(profile: dict[int, float]) -> str:
    return json.dumps(sorted((int(l), float(c)) for l, c in profile.items()))


class Units:
    """Distinct profiles to run once each (strategies often share one: the baseline's layer is
    one of the oracle's, a random draw repeats another); generations where any user wants them."""

    def __init__(self, concept, vectors, config, budget):
        self.concept, self.vectors, self.config, self.budget = concept, vectors, config, budget
        self.keys: list[str] = []
        self.units: list[SteerUnit] = []

    def add(self, profile: dict[int, float], *, generate: bool, scale: float | None = None) -> None:
        key = _key(profile)
        tokens = self.config.generate_tokens if generate else 0
        if key in self.keys:
            unit = self.units[self.keys.index(key)]
            if tokens and not unit.generate_tokens:
                unit.generate_tokens = tokens
            return
        name = f"layer {next(iter(profile))}" if len(profile) == 1 and next(iter(profile.values())) == 1.0 else f"profile {key}"
        self.keys.append(key)
        self.units.append(SteerUnit(name, self.concept, self.vectors, dict(profile), self.config.positions, scale,
                                    self.budget, tokens, self.config.seed))


def _write(config, tables, scan, text, extra) -> None:
    from analysis.render.plots import effect_by_layer, effect_vs_side_effect
    from cluster.store import write_json, write_parquet, write_text

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    write_json({"config": config.model_dump(mode="json"), **extra}, out / "params.json")
    write_parquet(scan, out / "scan.parquet", schemas.STEER_SCAN)
    write_parquet(tables["layers"], out / "layers.parquet", schemas.STEER_LAYERS)
    write_parquet(tables["grid"], out / "grid.parquet", schemas.STEER_GRID)
    write_parquet(tables["per_prompt"], out / "per_prompt.parquet", schemas.STEER_PER_PROMPT)
    write_parquet(tables["verdicts"], out / "verdicts.parquet", schemas.STEER_VERDICTS)
    effect_by_layer(tables["layers"], out / "effect_by_layer.png", title=config.model)
    effect_vs_side_effect(tables["strategies"], tables["grid"], out / "effect_vs_side_effect.png", title=config.model)
    write_text(text + "\n", out / "report.md")
    write_parquet(tables["strategies"], out / RESULT_FILE, schemas.STEER_STRATEGIES)  # last: its presence means the run completed


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Every statistic of verdicts.parquet (``<key>/value|low|high``, ``verdict/<key>``) and each
    strategy's effect at the budget (``effect/<strategy>``)."""
    from cluster.store import read_parquet

    metrics, params = statistics_metrics(cell_dir / "verdicts.parquet", schemas.STEER_VERDICTS)
    if (cell_dir / RESULT_FILE).is_file():
        for r in read_parquet(cell_dir / RESULT_FILE, schemas.STEER_STRATEGIES, ["strategy", "effect"]).to_pylist():
            metrics[f"effect/{r['strategy']}"] = float(r["effect"])
    return metrics, params


def cost(params, facts) -> float:
    """~15 budget evaluations per strategy and layer, and the grid, on 64 prompts each."""
    evaluations = 15 * (4 + facts.layers) + 6 * facts.layers
    return float(evaluations * 64 * PROMPT_TOKENS)


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="steer", help="steering strategies at a matched side-effect budget", config=SteerConfig, run=run,
    tables={RESULT_FILE: schemas.STEER_STRATEGIES, "layers.parquet": schemas.STEER_LAYERS, "grid.parquet": schemas.STEER_GRID,
            "per_prompt.parquet": schemas.STEER_PER_PROMPT, "verdicts.parquet": schemas.STEER_VERDICTS,
            "scan.parquet": schemas.STEER_SCAN},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["steer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
