"""``eigengap dynamics train`` (experiment kind ``dynamics_train``, issue 17): spectra and
behaviour across training checkpoints, their change-points, and whether the heads' key-kernel
gaps change before in-context learning emerges.

Models:

- an organism (``organism-xs``, ``organism-s?seed=3``): the cached entry with ``--checkpoints``
  training checkpoints for each of ``--seeds`` (default: the spec's seed), trained first when it
  is not cached (``spectral.organisms.suite.organism_dir``);
- a local organism directory holding ``checkpoints/`` (``spectral.organisms.checkpoints``);
- a hub model with ``--revisions step1000,step2000,...`` (Pythia's intermediate checkpoints),
  each revision loaded by name (safetensors only, no remote code); ``--prompts`` required.

Per checkpoint (``spectral.dynamics.training``, inputs fixed for the whole run): the ICL score,
the repeat accuracy and attention-pattern scores on repeated random tokens, the organisms'
induction and IOI accuracy, the training loss (the checkpoint manifest), and every head's key
scan of the fixed prompts. Then ``analysis.dynamics``: change-points of every series, each head's
lag to the ICL score's change-point and the verdicts over the seeds (one population: the model):
``spectral_changes_precede_icl`` and, against the training loss's first change-point (the generic
early-training transient), ``spectral_changes_precede_icl_beyond_loss``; the loss's own lag as a
control and each head's late gap change-point (after the loss's, before the ICL score's).

Writes into ``--out``: dynamics_checkpoints.parquet, dynamics_heads.parquet,
dynamics_changepoints.parquet, dynamics_models.parquet, dynamics_verdicts.parquet, params.json,
prompts.txt (the scan's prompts, one per line), summary.md (with the rules), dynamics_icl.png and
dynamics_gaps.png. Nothing is written before every input has been checked; the verdicts table is
written last (its presence means the run completed).
"""

from __future__ import annotations

import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, field_validator

from jobs.config import JobConfig, out_dir_ready
from jobs.registry import Experiment
from spectral import tables
from spectral.errors import UsageError
from spectral.kernels.registry import RidgeMode
from spectral.models import Device, DType

RESULT_FILE = "dynamics_verdicts.parquet"
CHECKPOINTS_FILE = "dynamics_checkpoints.parquet"
HEADS_FILE = "dynamics_heads.parquet"
CHANGEPOINTS_FILE = "dynamics_changepoints.parquet"
MODELS_FILE = "dynamics_models.parquet"
MODEL_SERIES = ("train_loss", "repeat_accuracy", "induction_accuracy", "ioi_accuracy", "max_induction_score",
                "max_previous_token_score")
"""Model-level series besides the ICL score that get change-points (when finite at every checkpoint)."""
HEAD_METRICS = (*tables.SPECTRUM_METRICS, *tables.DYNAMICS_PATTERNS)
"""Per-head series that get change-points: ``gap`` (the verdict's) and the exploratory rest."""
_REVISION = re.compile(r"step(\d+)")


class DynamicsTrainConfig(JobConfig):
    model: str
    """organism-NAME[?seed=N], a local organism directory with checkpoints/, or a hub id with --revisions."""
    out: Path
    """Output directory (dynamics_*.parquet, params.json, prompts.txt, summary.md, plots)."""
    seeds: str | None = None
    """Training seeds of an organism, e.g. 0,1,2 or 0-4 (default: the spec's seed)."""
    checkpoints: int = Field(30, ge=2)
    """Training checkpoints per organism seed (the cache entry NAME[-seedN]-checkpointsK; trained if absent)."""
    revisions: str | None = None
    """Hub models: the revisions to read, e.g. step1000,step2000,... (names stepN, N increasing)."""
    prompts: Path | None = None
    """Key-scan prompts (one per line or JSONL 'text'); organisms: n-prompts generated episodes by default."""
    n_prompts: int = Field(64, gt=0)
    """Generated organism prompts for the key scan (4 episodes each)."""
    max_tokens: int | None = Field(None, gt=0)
    """Cut every key-scan prompt to this many tokens (default: the context the organism was trained
    on, from its recipe, so no key comes from a position training never reached; hub models: the
    model's maximum)."""
    n_sequences: int = Field(128, gt=0)
    """Sequences of the ICL score and of the repeated random tokens."""
    n_induction: int = Field(100, gt=0)
    """Organisms: induction-task samples per checkpoint."""
    n_ioi_per_template: int = Field(20, gt=0)
    """Organisms: IOI examples per template per checkpoint."""
    ridge: float = Field(1e-2, gt=0)
    """Ridge lambda added to the key Gram."""
    ridge_mode: RidgeMode = "absolute"
    """absolute (lambda = ridge) or relative (lambda = ridge x the kernel's mean eigenvalue)."""
    center: bool = True
    """Subtract the mean key before forming the Gram."""
    batch_size: int = Field(16, gt=0)
    """Sequences or prompts per forward pass."""
    device: Device = "auto"
    """Where the models run ('auto': a CUDA GPU when there is one)."""
    dtype: DType = "float32"
    """Model weights dtype."""
    force: bool = False
    """Overwrite an existing dynamics_verdicts.parquet in --out."""

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, value):
        from spectral.organisms.suite import parse_seeds

        if value is not None:
            parse_seeds(value)  # ValueError names the form
        return value

    @field_validator("revisions")
    @classmethod
    def _revisions(cls, value):
        if value is not None:
            revision_steps(value)
        return value

    def seed_list(self) -> list[int] | None:
        from spectral.organisms.suite import parse_seeds

        return parse_seeds(self.seeds)


def revision_steps(text: str) -> list[tuple[str, int]]:
    """'step1000,step2000' -> [('step1000', 1000), ('step2000', 2000)]; a ValueError unless every
    name is stepN, N strictly increasing, and there are enough for change-points."""
    from spectral.dynamics.changepoints import MIN_LENGTH

    names = [part.strip() for part in text.split(",") if part.strip()]
    steps = []
    for name in names:
        match = _REVISION.fullmatch(name)
        if not match:
            raise ValueError(f"revision {name!r} is not of the form stepN (e.g. step1000)")
        steps.append(int(match[1]))
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError("revisions must be in strictly increasing step order")
    if len(steps) < MIN_LENGTH:
        raise ValueError(f"{len(steps)} revisions; change-points need at least {MIN_LENGTH}")
    return list(zip(names, steps))


@dataclass(frozen=True)
class Point:
    """One checkpoint to measure."""

    step: int
    source: str
    """A checkpoint directory, or the hub id."""
    revision: str | None
    """The hub revision (None: a directory)."""
    train_loss: float
    lr: float


@dataclass(frozen=True)
class Run:
    """One training seed's checkpoints."""

    population: str
    seed: int | None
    model: str
    points: list[Point]
    context: int | None = None
    """The training context (organisms and checkpoint directories with a recipe; None: unknown)."""


def _from_checkpoints(population: str, seed: int | None, model: str, checkpoints, context: int | None) -> Run:
    return Run(population, seed, model, [Point(c.step, str(c.path), None, float(c.train_loss), float(c.lr))
                                         for c in checkpoints], context)


def plan_runs(config: DynamicsTrainConfig, *, train: bool) -> list[Run]:
    """The runs of ``config``; every input checked (a one-line UsageError), nothing written.
    With ``train``, an organism seed not cached with its checkpoints is trained now."""
    from spectral.dynamics.changepoints import MIN_LENGTH
    from spectral.models.specs import parse_spec
    from spectral.organisms.checkpoints import checkpoints_recipe, list_checkpoints
    from spectral.organisms.suite import organism_dir, recipe_of, spec_text

    spec = parse_spec(config.model)
    seeds = config.seed_list()
    if spec.kind != "organism" and seeds is not None:
        raise UsageError(f"--seeds applies to organisms; {spec.text!r} is one run")
    if spec.kind != "hub" and config.revisions is not None:
        raise UsageError(f"--revisions applies to hub models; {spec.text!r} is a {spec.kind} model")
    if spec.kind == "organism":
        recipes = [recipe_of(spec.name, s, config.checkpoints) for s in (seeds or [spec.seed])]
        runs = []
        for r in recipes:
            if not train:
                continue
            path = organism_dir(spec_text(r), checkpoints=config.checkpoints)
            runs.append(_from_checkpoints(r.name, r.seed, spec_text(r), list_checkpoints(path), r.context))
        return runs
    if spec.kind == "local":
        checkpoints = list_checkpoints(Path(spec.name))
        if len(checkpoints) < MIN_LENGTH:
            raise UsageError(f"{spec.text}: {len(checkpoints)} checkpoints; change-points need at least {MIN_LENGTH}")
        context = checkpoints_recipe(Path(spec.name)).get("context")
        return [_from_checkpoints(Path(spec.name).name, None, spec.text, checkpoints,
                                  int(context) if context else None)]
    if spec.kind == "hub":
        if config.revisions is None:
            raise UsageError(f"{spec.text} is a hub model: name its checkpoints with --revisions step1000,step2000,...")
        if config.prompts is None:
            raise UsageError(f"{spec.text}: --prompts is required for a hub model (organisms generate their own)")
        nan = float("nan")
        return [Run(spec.text, None, spec.text, [Point(step, spec.text, name, nan, nan)
                                                 for name, step in revision_steps(config.revisions)])]
    raise UsageError(f"{spec.text} ({spec.kind} model) has no training checkpoints: give an organism, a directory "
                     "with checkpoints/ or a hub model with --revisions")


def run(config: DynamicsTrainConfig, *, echo=print):
    """Check everything, train what is missing, measure every checkpoint, analyse, then write."""
    from spectral.kernels.prompts import read_prompts

    start = time.perf_counter()
    plan_runs(config, train=False)  # every check that needs no training
    prompts = read_prompts(config.prompts) if config.prompts is not None else None
    out_dir_ready(config.out, RESULT_FILE, config.force)
    runs = plan_runs(config, train=True)
    checkpoint_rows, head_rows, probes = [], [], None
    for r in runs:
        echo(f"{r.model}: {len(r.points)} checkpoints (steps {r.points[0].step} .. {r.points[-1].step})")
        for point in r.points:
            probes, rows, heads = _measure_point(config, r, point, prompts, probes)
            checkpoint_rows.append(rows)
            head_rows += heads
    analysis, notes = analyse_rows(checkpoint_rows, head_rows)
    params = {"config": config.model_dump(mode="json"),
              "runs": [{"model": r.model, "seed": r.seed, "steps": [p.step for p in r.points],
                        "scan_max_tokens": scan_max_tokens(config, r)} for r in runs],
              "icl_form": probes.icl.form, "early_token": probes.icl.early, "late_token": probes.icl.late,
              "n_prompts": len(probes.prompts), "seconds": round(time.perf_counter() - start, 3)}
    summary = _summary(config, checkpoint_rows, analysis, notes)
    _write(config.out, checkpoint_rows, head_rows, analysis, params, probes.prompts, summary)
    echo(summary)
    echo(f"wrote {config.out} ({len(checkpoint_rows)} checkpoints, {len(head_rows)} head rows) in "
         f"{params['seconds']:.1f} s")
    return analysis


def scan_max_tokens(config: DynamicsTrainConfig, r: Run) -> int | None:
    """The key scan's prompt length limit for run ``r`` (``DynamicsTrainConfig.max_tokens``)."""
    return config.max_tokens or r.context


def _measure_point(config: DynamicsTrainConfig, r: Run, point: Point, prompts, probes):
    """(probes, the checkpoint's row, its head rows); the probes are made at the first checkpoint."""
    import torch

    from spectral.dynamics import training
    from spectral.dynamics.changepoints import log_step
    from spectral.kernels.scan import ScanSettings
    from spectral.models.loading import load_model, resolve_device
    from spectral.organisms.evaluate import load_tasks

    loaded = load_model(point.source, revision=point.revision, device=resolve_device(config.device),
                        dtype=getattr(torch, config.dtype))
    if probes is None:
        tasks_path = Path(point.source) / "tasks.json"
        tasks = load_tasks(Path(point.source)) if point.revision is None and tasks_path.is_file() else None
        texts = prompts if prompts is not None else training.organism_probe_prompts(config.n_prompts)
        probes = training.make_probes(loaded, tasks, texts, n_sequences=config.n_sequences,
                                      n_induction=config.n_induction, n_ioi_per_template=config.n_ioi_per_template)
    settings = ScanSettings(ridge=config.ridge, center=config.center, ridge_mode=config.ridge_mode,
                            batch_size=config.batch_size, max_tokens=scan_max_tokens(config, r))
    m = training.measure(loaded, probes, settings, r.model, batch_size=config.batch_size)
    where = point.revision or point.source
    x = float(log_step([point.step])[0])
    base = dict(population=r.population, seed=r.seed, model=r.model, checkpoint=where, step=point.step, log_step=x)
    row = dict(base, train_loss=point.train_loss, lr=point.lr, icl_score=m.icl.score, loss_early=m.icl.loss_early,
               loss_late=m.icl.loss_late, icl_form=probes.icl.form, early_token=m.icl.early, late_token=m.icl.late,
               repeat_accuracy=m.repeat_accuracy, induction_accuracy=m.induction_accuracy,
               ioi_accuracy=m.ioi_accuracy, max_induction_score=float(m.patterns["induction"].max()),
               max_previous_token_score=float(m.patterns["previous_token"].max()),
               n_sequences=int(probes.icl.tokens.shape[0]))
    heads = []
    for s in m.scan.to_pylist():
        l, h = s["layer"], s["head"]
        heads.append(dict(base, **{k: s[k] for k in tables.DYNAMICS_HEADS.names if k in s and k not in base},
                          induction_score=float(m.patterns["induction"][l, h]),
                          previous_token_score=float(m.patterns["previous_token"][l, h]),
                          duplicate_token_score=float(m.patterns["duplicate_token"][l, h])))
    return probes, row, heads


def seed_dynamics(checkpoint_rows: list[dict], head_rows: list[dict]) -> tuple[list, list[str]]:
    """``analysis.dynamics.SeedDynamics`` per (population, seed, model) from the job's rows, and
    notes on the series left out (a value that is not finite at some checkpoint)."""
    import numpy as np

    from analysis.dynamics import SeedDynamics

    keyed: dict[tuple, list[dict]] = {}
    for r in checkpoint_rows:
        keyed.setdefault((r["population"], r["seed"], r["model"]), []).append(r)
    heads: dict[tuple, list[dict]] = {}
    for h in head_rows:
        heads.setdefault((h["population"], h["seed"], h["model"]), []).append(h)
    out, notes = [], []
    for key, rows in keyed.items():
        rows = sorted(rows, key=lambda r: r["step"])
        index = {r["step"]: i for i, r in enumerate(rows)}
        series = {}
        for name in MODEL_SERIES:
            values = np.array([r[name] for r in rows], float)
            if np.isfinite(values).all():
                series[name] = values
            elif np.isfinite(values).any():
                notes.append(f"{key[2]}: {name} not finite at every checkpoint: no change-points")
        per_head: dict[str, dict] = {m: {} for m in HEAD_METRICS}
        for h in heads.get(key, []):
            for m in HEAD_METRICS:
                per_head[m].setdefault((h["layer"], h["head"]), np.full(len(rows), np.nan))[index[h["step"]]] = h[m]
        kept = {}
        for m, by_head in per_head.items():
            bad = [k for k, v in by_head.items() if not np.isfinite(v).all()]
            if bad:
                notes.append(f"{key[2]}: {m} not finite at every checkpoint for {len(bad)} head(s): left out")
            kept[m] = {k: v for k, v in by_head.items() if k not in bad}
        out.append(SeedDynamics(key[0], key[1], key[2], [r["step"] for r in rows],
                                [r["icl_score"] for r in rows], {m: v for m, v in kept.items() if v}, series))
    return out, notes


def analyse_rows(checkpoint_rows: list[dict], head_rows: list[dict]):
    """(``analysis.dynamics.DynamicsAnalysis``, notes) of the job's rows."""
    from analysis.dynamics import analyse

    seeds, notes = seed_dynamics(checkpoint_rows, head_rows)
    return analyse(seeds), notes


def _fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}g}"


def _limit_text(config: DynamicsTrainConfig) -> str:
    if config.max_tokens:
        return f"{config.max_tokens} tokens (--max-tokens)"
    return "the organism's training context (its recipe) or, without one, the model's maximum"


def _summary(config: DynamicsTrainConfig, rows: list[dict], analysis, notes: list[str]) -> str:
    from analysis.dynamics import (BEYOND_KEY, BEYOND_RULE, CONTROL_KEY, ICL, LOSS, MODEL_LEVEL, RULE,
                                   VERDICT_KEY, VERDICT_METRIC)
    from spectral.dynamics.changepoints import RULE as CPD_RULE

    first = rows[0]
    lines = [f"# Training dynamics: {config.model}", "",
             f"ICL score: loss at token {first['late_token']} minus token {first['early_token']} (1-based) of "
             f"{first['n_sequences']} '{first['icl_form']}' sequences (spectral.dynamics.training). Key scan: "
             f"every prompt cut to {_limit_text(config)}.", "",
             "| seed | checkpoints | ICL first / last | induction acc first / last | IOI acc first / last | "
             f"ICL change-point (step) | {LOSS} change-point (step) | heads: gap change-point / precede ICL / "
             f"before the {LOSS} | median gap lag / {LOSS} lag / gap - {LOSS} (decades) |",
             "|---|---:|---|---|---|---:|---:|---|---|"]
    icl_cp = {(r["population"], r["seed"]): r for r in analysis.changepoints if r["series"] == ICL}
    loss_cp = {(r["population"], r["seed"]): r for r in analysis.changepoints
               if r["series"] == LOSS and r["layer"] == MODEL_LEVEL}
    models = {(m["population"], m["seed"]): m for m in analysis.models if m["metric"] == VERDICT_METRIC}
    keys = list(dict.fromkeys((r["population"], r["seed"]) for r in rows))
    for key in keys:
        mine = sorted((r for r in rows if (r["population"], r["seed"]) == key), key=lambda r: r["step"])
        a, b = mine[0], mine[-1]
        m = models.get(key, {})
        lines.append(f"| {key[1]} | {len(mine)} | {_fmt(a['icl_score'])} / {_fmt(b['icl_score'])} | "
                     f"{_fmt(a['induction_accuracy'])} / {_fmt(b['induction_accuracy'])} | "
                     f"{_fmt(a['ioi_accuracy'])} / {_fmt(b['ioi_accuracy'])} | "
                     f"{_fmt(icl_cp[key]['first_step'], 6) if key in icl_cp else 'n/a'} | "
                     f"{_fmt(loss_cp[key]['first_step'], 6) if key in loss_cp else 'n/a'} | "
                     f"{m.get('n_changed', 0)} of {m.get('n_heads', 0)} / {m.get('n_precede', 0)} / "
                     f"{m.get('n_before_loss', 0)} | {_fmt(m.get('median_lag'))} / {_fmt(m.get('loss_lag'))} / "
                     f"{_fmt(m.get('median_minus_loss'))} |")
    what = {VERDICT_KEY: "mean median gap lag to ICL", BEYOND_KEY: f"mean median (gap - {LOSS}) change-point",
            CONTROL_KEY: f"{LOSS} lag to ICL (control)"}
    lines += ["", "| verdict | claim | population | statistic (decades) [95 % CI] | p pass / fail (Holm) | seeds | "
              "note |", "|---|---|---|---|---|---:|---|"]
    for v in analysis.verdicts:
        if v["key"] in what:
            lines.append(f"| {v['verdict'] or '(control)'} | {v['key']} | {v['population']} | {what[v['key']]} "
                         f"{_fmt(v['value'])} [{_fmt(v['low'])}, {_fmt(v['high'])}] | {_fmt(v['p_pass_holm'])} / "
                         f"{_fmt(v['p_fail_holm'])} | {v['k']} of {v['n_seeds']} | {v['note']} |")
    lines += ["", f"Late gap change-points (exploratory, no verdict): per head the change-point nearest before the "
              f"ICL score's first that lies after the {LOSS}'s first (is anything spectral moving in the run-up to "
              "the emergence rather than in the early transient?)."]
    late: dict[tuple, list[float]] = {}
    for r in analysis.changepoints:
        if r["series"] == VERDICT_METRIC and r["layer"] != MODEL_LEVEL and math.isfinite(r["late_step"]):
            late.setdefault((r["population"], r["seed"]), []).append(r["late_step"])
    for key in keys:
        m = models.get(key, {})
        steps = sorted(late.get(key, []))
        lines.append(f"- seed {key[1]}: {m.get('n_late', 0)} of {m.get('n_heads', 0)} heads" + (
            f", median {_fmt(m.get('median_late_lag'))} decades before the ICL change-point (steps "
            f"{', '.join(f'{x:g}' for x in steps)})" if steps else ""))
    series = {}
    for r in analysis.changepoints:
        if r["layer"] == MODEL_LEVEL and r["series"] != ICL:
            series.setdefault(r["series"], []).append(_fmt(r["lag"]))
    if series:
        lines += ["", "First change-point of each model-level series minus the ICL score's (decades; per seed; a "
                  "series moving as early as the heads is a competing explanation of their lead): " + "; ".join(
                      f"{name} {' / '.join(lags)}" for name, lags in series.items())]
    explored = [v for v in analysis.verdicts if v["exploratory"] and v["key"] != CONTROL_KEY]
    if explored:
        lines += ["", "Exploratory (no verdict): " + "; ".join(
            f"{v['metric']} {_fmt(v['value'])} [{_fmt(v['low'])}, {_fmt(v['high'])}]"
            + (f" {v['direction']}" if v["direction"] else "") for v in explored)]
    lines += ["", f"Rule: {RULE}", "", f"Rule: {BEYOND_RULE}", "", f"Change-points: {CPD_RULE}."]
    lines += [f"- {n}" for n in dict.fromkeys(notes)]
    lines += ["", "Timing only: an early change of the heads says nothing by itself about their causing the emergence."]
    return "\n".join(lines)


def _write(out: Path, checkpoint_rows, head_rows, analysis, params, prompts, summary) -> None:
    from analysis.render.training_plots import gap_series, icl_series
    from cluster.store import write_json, write_parquet, write_text

    out.mkdir(parents=True, exist_ok=True)
    write_json(params, out / "params.json")
    write_text("".join(p.replace("\n", " ") + "\n" for p in prompts), out / "prompts.txt")
    write_text(summary + "\n", out / "summary.md")
    icl_series(checkpoint_rows, analysis.changepoints, out / "dynamics_icl.png")
    gap_series(head_rows, analysis.changepoints, out / "dynamics_gaps.png")
    for rows, schema, name in ((checkpoint_rows, tables.DYNAMICS_CHECKPOINTS, CHECKPOINTS_FILE),
                               (head_rows, tables.DYNAMICS_HEADS, HEADS_FILE),
                               (analysis.changepoints, tables.DYNAMICS_CHANGEPOINTS, CHANGEPOINTS_FILE),
                               (analysis.models, tables.REPORT_DYNAMICS_MODELS, MODELS_FILE),
                               (analysis.verdicts, tables.REPORT_DYNAMICS_VERDICTS, RESULT_FILE)):
        write_parquet(tables.from_rows(rows, schema, name), out / name, schema)  # verdicts last


def unit_metrics(cell_dir: Path) -> tuple[dict[str, float], dict[str, str]]:
    """Each verdict's value and interval (``spectral_changes_precede_icl/value``, ``/low``, ``/high``;
    ``spectral_changes_precede_icl_beyond_loss/...``) and its verdict; per seed the ICL score at the last
    checkpoint (``icl_score_final/seed_<s>``)."""
    from cluster.store import read_parquet

    metrics, params = {}, {}
    path = cell_dir / RESULT_FILE
    if path.is_file():
        rows = [r for r in read_parquet(path, tables.REPORT_DYNAMICS_VERDICTS).to_pylist() if not r["exploratory"]]
        for r in rows:
            for stat in ("value", "low", "high"):
                if r[stat] is not None and math.isfinite(r[stat]):
                    metrics[f"{r['key']}/{stat}"] = float(r[stat])
            params[f"verdict/{r['key']}"] = r["verdict"]
    path = cell_dir / CHECKPOINTS_FILE
    if path.is_file():
        last: dict = {}
        for r in read_parquet(path, tables.DYNAMICS_CHECKPOINTS, ["seed", "step", "icl_score"]).to_pylist():
            if r["seed"] not in last or r["step"] > last[r["seed"]][0]:
                last[r["seed"]] = (r["step"], r["icl_score"])
        for seed, (_, value) in last.items():
            if math.isfinite(value):
                metrics[f"icl_score_final/seed_{'none' if seed is None else seed}"] = float(value)
    return metrics, params


def cost(params, facts) -> float:
    """Token-forwards: per checkpoint and seed, the scan prompts (64 x 96 tokens when generated),
    the ICL and repeated sequences (2 x 128 x 96) and the task samples (about 100 x 24)."""
    seeds = len(str(params.get("seeds") or "0").split(","))
    n = params.get("checkpoints", 30) if not params.get("revisions") else len(str(params["revisions"]).split(","))
    per_point = (params.get("n_prompts", 64) * 96 + 2 * params.get("n_sequences", 128) * 96
                 + params.get("n_induction", 100) * 24)
    return float(seeds * n * per_point)


def load(cell_dir: Path):
    from cluster.store import read_cell

    return read_cell(cell_dir, EXPERIMENT.tables)


EXPERIMENT = Experiment(
    kind="dynamics_train", help="spectra, ICL score and task accuracy across training checkpoints; change-points "
                                "and the lag of the heads' gaps to in-context learning",
    config=DynamicsTrainConfig, run=run,
    tables={CHECKPOINTS_FILE: tables.DYNAMICS_CHECKPOINTS, HEADS_FILE: tables.DYNAMICS_HEADS,
            CHANGEPOINTS_FILE: tables.DYNAMICS_CHANGEPOINTS, MODELS_FILE: tables.REPORT_DYNAMICS_MODELS,
            RESULT_FILE: tables.REPORT_DYNAMICS_VERDICTS},
    cost=cost, metrics=unit_metrics, load=load)


def main(argv: list[str] | None = None) -> int:
    from jobs.cli import main as cli_main

    return cli_main(["dynamics_train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from jobs.cli import exit_now

    exit_now(main())
