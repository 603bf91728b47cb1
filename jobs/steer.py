"""``eigengap steer``: ActAdd/CAA steering, strategies compared at a matched side-effect budget.

Also ``python -m jobs.steer ...``.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from analysis.steering import report, strategy_rows
from cluster.store import write_json, write_parquet, write_text
from jobs.config import ExecutorOptions, add_arguments, out_dir_ready, parse_config
from spectral.adapter import HeadAdapter
from spectral.concepts import concept_for
from spectral.errors import UsageError
from spectral.loading import load_model, model_shape, parse_spec
from spectral.scan import ScanSettings, finalize, reduce_partials, result_table, scan_unit, shard
from spectral.steering import Concept, Evaluator, Injection, actadd, caa
from spectral.strategies import STRATEGIES, layer_gaps, match_budget, profiles

RESULT_FILE = "strategies.parquet"


class SteerConfig(ExecutorOptions):
    model: str
    """Model spec: hub id, checkpoint directory, random:ARCH[?k=v&...] or organism-NAME."""
    out: Path
    """Output directory."""
    concept: str = "sentiment"
    """'sentiment' (organisms), 'love-hate' (English tokenizers), or a YAML/JSON concept file."""
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
    """Seed of the random strategy, sampled generation and bootstrap."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
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
        named = ("all", "last") if info.field_name == "positions" else ("last", "mean")
        if value in named:
            return value
        if isinstance(value, int) and value >= 0:
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        raise ValueError(f"expected {' or '.join(named)} or a token index >= 0, got {value!r}")

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
    memo = loaded.__dict__.setdefault("_steer_memo", {})
    if concept not in memo:
        memo.clear()
        memo[concept] = Evaluator(HeadAdapter(loaded.model), loaded.tokenizer, concept, source)
    return memo[concept]


def steer_unit(loaded, unit: SteerUnit) -> dict:
    ev = _evaluator(loaded, unit.concept)
    vectors = {l: v.to(loaded.model.get_input_embeddings().weight.device) for l, v in unit.vectors.items()}

    def injection(scale: float) -> Injection:
        return Injection(vectors, {l: c * scale for l, c in unit.profile.items()}, unit.positions)

    scale = unit.scale
    if scale is None:
        scale, _ = match_budget(lambda s: ev.kl(injection(s)), unit.budget)
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
    start = time.perf_counter()
    spec = parse_spec(config.model)
    out_dir_ready(config.out, RESULT_FILE, config.force)
    n_layers, _ = model_shape(spec)
    baseline_layer = n_layers // 2 if config.layer is None else config.layer
    if not 0 <= baseline_layer < n_layers:
        raise UsageError(f"--layer: layer {baseline_layer} out of range (the model has layers 0..{n_layers - 1})")
    device = "cuda" if config.device == "auto" and torch.cuda.is_available() else ("cpu" if config.device == "auto" else config.device)
    probe = load_model(spec, device=device)
    concept = concept_for(config.concept, probe)
    ev = _evaluator(probe, concept, config.concept)  # checks every word and prompt before any work is sent out
    adapter = ev.adapter
    make = actadd if config.vector == "actadd" else caa
    vectors = {l: v.cpu() for l, v in make(adapter, probe.tokenizer, concept, range(n_layers), device, config.read_at).items()}

    # the scan the spectral strategy reads: key kernel over every text of the concept
    settings = ScanSettings()
    texts = [t for pair in concept.pairs for t in pair] + list(concept.prompts) + list(concept.neutral)
    scan = result_table(finalize(reduce_partials([scan_unit(probe, u) for u in shard(texts, settings, 64)]), settings),
                        settings, spec.text, n_layers, adapter.n_heads)
    gaps = layer_gaps(scan.to_pylist())

    budget = config.kl_budget
    if config.coefficient is not None:
        base = Injection({baseline_layer: vectors[baseline_layer]}, {baseline_layer: config.coefficient}, config.positions)
        budget = ev.kl(base)
        if not budget > 0:
            raise UsageError(f"the baseline (layer {baseline_layer}, coefficient {config.coefficient}) changes nothing "
                             "on the neutral prompts: give --kl-budget")
    profs = profiles(n_layers, baseline_layer=baseline_layer, gaps=gaps, seed=config.seed)
    units = []
    for name in config.strategies:
        if name == "oracle":
            units += [SteerUnit(f"layer {l}", concept, vectors, {l: 1.0}, config.positions, None, budget)
                      for l in range(n_layers)]
        else:
            units.append(SteerUnit(name, concept, vectors, profs[name], config.positions, None, budget,
                                   config.generate_tokens, config.seed))
    units += [SteerUnit(f"grid {l} {c:g}", concept, vectors, {l: 1.0}, config.positions, c, budget)
              for l in range(n_layers) for c in config.grid]
    executor = config.make_executor({"device": config.device}, loaded=probe)
    with executor:
        results = executor.map(spec.text, steer_unit, units, desc="steer")

    matched = [r for r in results if not r["name"].startswith("grid")]
    if "oracle" in config.strategies:  # the oracle's generations, at its best layer
        best = max((r for r in matched if r["name"].startswith("layer ")), key=lambda r: np.mean(r["effect"]))
        extra = SteerUnit("oracle", concept, vectors, best["profile"], config.positions, best["scale"], budget,
                          config.generate_tokens, config.seed)
        matched.append(steer_unit(probe, extra))
    tables = strategy_rows(matched, [r for r in results if r["name"].startswith("grid")], gaps, config.seed)
    text = report(tables, gaps, budget, baseline_layer, config, spec.text)
    _write(config, tables, scan, text, {"budget_kl": budget, "baseline_layer": baseline_layer,
                                        "seconds": round(time.perf_counter() - start, 3)})
    echo(text)
    echo(f"wrote {config.out}")
    return tables


def _write(config, tables, scan, text, extra) -> None:
    from analysis.plots import effect_by_layer, effect_vs_side_effect

    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    write_json({"config": config.model_dump(mode="json"), **extra}, out / "params.json")
    write_parquet(scan, out / "scan.parquet")
    write_parquet(tables["layers"], out / "layers.parquet")
    write_parquet(tables["grid"], out / "grid.parquet")
    write_parquet(tables["per_prompt"], out / "per_prompt.parquet")
    write_parquet(tables["verdicts"], out / "verdicts.parquet")
    effect_by_layer(tables["layers"], out / "effect_by_layer.png", title=config.model)
    effect_vs_side_effect(tables["strategies"], tables["grid"], out / "effect_vs_side_effect.png", title=config.model)
    write_text(text + "\n", out / "report.md")
    write_parquet(tables["strategies"], out / RESULT_FILE)  # last: its presence means the run completed


def add_parser(sub) -> None:
    parser = sub.add_parser("steer", help="steering strategies at a matched side-effect budget",
                            description=__doc__.splitlines()[0])
    add_arguments(parser, SteerConfig)
    parser.set_defaults(handler=lambda ns: run(parse_config(SteerConfig, ns)))


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["steer", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
