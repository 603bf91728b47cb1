"""Cross-model analysis of a sweep run over *populations* of models (reads result tables only;
never loads a model).

Populations. Models whose specs differ only by their training seed (``organism-s``,
``organism-s?seed=1``, ...; ``spectral.models.specs.population``) form a population, and the unit of
replication of every verdict is the seed: a verdict about ``organism-s`` is a claim about the
recipe, not about one training draw. A hub model or a local checkpoint is a population of one
model (its verdicts describe that model only and say so).

Per population, every success metric of the research plan is an across-seed estimate
(``analysis.population``, the one estimator): the mean over seeds of the per-seed statistic,
per-seed values and t-scaled intervals (heads or layers, and examples, resampled jointly), the
verdict interval across seeds (the t-interval over the seeds' values, mean ± t(k-1) x SD /
sqrt(k)), the hierarchical bootstrap interval seeds -> heads -> examples beside it (shown, not
used for verdicts: it counts within-seed noise twice and is conservative) and the fraction of
seeds with the sign of the mean. Verdicts rest on differences; a ratio claim "a > c x b" is tested as
``a - c b > 0`` and only where b's interval lies above 0 (else undefined). PASS / FAIL come from
one-sided tests at 2.5 % (the two sides of a 95 % interval) after Holm's correction within the
verdict's family (one metric over all populations of the run). Every rule is in ``RULES`` and
printed on the page.

``load_run`` gathers what each model's finished cells hold and names what is missing;
``analyse`` builds the report's tables. Non-finite values are excluded from the statistics that
read them and counted in ``ModelData.excluded``; nothing is dropped silently.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats

from analysis.calibration import IMPORTANCE_RULE, STEERABLE_RULE, Calibration, calibrate, calibrate_layers, important
from analysis.information import N_PERMUTATIONS, entropy_by_stability, mutual_information
from analysis.population import (
    Member, PopulationEstimate, Stat, clip, estimate, estimate_many, from_values, holm, interval_at, p_value,
)
from analysis.scaling import restrict_to_separating, scaling_table
from analysis.stats import decide_claims, df_group, df_groups, group_contrast, r_inverse_gap, restoration, welch_df
from cluster.layout import Cell, RunLayout
from cluster.store import CellData
from spectral.kernels.metrics import UNSTABLE_GAP

NAN = float("nan")
ALPHA = 0.05
"""Two-sided level of every interval (95 %); a one-sided claim is tested at ALPHA / 2."""
BAND = 0.05
"""Half-width of the band around 0.77 the plan allows ("threshold holds ±0.05")."""
STABLE_RANGE = 0.10
"""Largest spread of population thresholds that still counts as one threshold (2 x BAND)."""
LAYER_CHOICE_TOLERANCE = 0.10
"""Fraction of the oracle's effect the automated layer choice may lose and still match it."""
TARGET_R = 0.7
TARGET_RATIO = 2.0
TARGET_IMPROVEMENT = 0.25
MIN_SCALING_POPULATIONS = 3
IMPORTANCE_METHODS = ("exact", "attribution")
"""Patch methods whose restoration (direction denoise) measures importance. Noise-direction
runs and ablations restore ~1 for *unimportant* heads: they are excluded with a note."""

# verdict keys (flat names for summary.json / MLflow) -> metric as the page states it
POPULATION_METRICS = {
    "importance_correlation": f"r(1/gap, importance) > {TARGET_R:g}",
    "restoration_difference": f"restoration: unstable - stable heads > 0 (gap <= {UNSTABLE_GAP:g})",
    "restoration_ratio": f"restoration of unstable heads > {TARGET_RATIO:g}x stable (unstable - {TARGET_RATIO:g} x stable > 0)",
    "steering_difference": "spectral steering - baseline effect > 0 (1 layer each)",
    "steering_improvement": (f"spectral steering improves on the baseline by >= {TARGET_IMPROVEMENT:.0%} "
                             f"(spectral - {1 + TARGET_IMPROVEMENT:g} x baseline > 0)"),
    "spectral_vs_random": "spectral steering - random layers > 0 (k layers each)",
    "layer_choice": (f"automated layer choice matches the oracle (effect lost <= {LAYER_CHOICE_TOLERANCE:.0%}: "
                     f"spectral - {1 - LAYER_CHOICE_TOLERANCE:g} x oracle >= 0)"),
    "threshold_heads": f"head threshold within {UNSTABLE_GAP:g} ± {BAND:g}",
    "threshold_layers": f"layer threshold within {UNSTABLE_GAP:g} ± {BAND:g}",
}
CROSS_POPULATION_METRICS = {
    "threshold_holds_heads": f"{UNSTABLE_GAP:g} holds across populations (important heads)",
    "threshold_holds_layers": f"{UNSTABLE_GAP:g} holds across populations (steerable layers)",
    "threshold_stable_heads": "threshold stable across populations (important heads)",
    "threshold_stable_layers": "threshold stable across populations (steerable layers)",
    "consistent_importance_r": "r(importance, 1/gap) consistent across populations",
    "consistent_steering_r": "r(layer min gap, steering effect) consistent across populations",
}
ALL = "all"
"""The ``population`` of cross-population rows."""

RULE = ("Each verdict is about a population of models: the training seeds of one recipe (a hub model or a "
        "checkpoint is a population of one, labelled 'one model', whose verdicts describe that model only). "
        "Value: the mean over seeds of the per-seed statistic. Per seed: the statistic with an interval from a "
        "bootstrap resampling heads (key-head clusters of grouped-query models; layers) and examples jointly (prompts "
        "for steering), value ± t(df) x SE x sqrt(n/(n-1)) as validate's page computes it (Fisher z with n - 3 df for "
        "correlations, Welch df for group differences, prompts - 1 for steering contrasts). 95 % interval of the "
        "verdict: with k >= 2 seeds, mean ± t(k-1) x SD/sqrt(k) of the seeds' values (each seed's value already "
        "carries its heads' and examples' noise); with one seed, that model's interval (describes that model only; "
        "thresholds: the calibration's interval and exact AUROC test). Shown beside it, not used for verdicts: the "
        "hierarchical bootstrap seeds -> heads or layers -> examples, mean ± t(k-1) x SE x sqrt(k/(k-1)), which "
        "counts within-seed noise twice and is conservative (the 'interval' column; 'scheme' in verdicts.parquet). "
        "PASS when the one-sided p-value of the metric's claim is < 0.025 after Holm's correction within the "
        "verdict family (the same metric over every population of the run); FAIL when that of the opposite claim "
        "is; else INCONCLUSIVE. Without the correction this is 'the 95 % interval lies on the claim's side of the "
        "target'. A claim 'a > c x b' is tested as a - c x b > 0, and only where b's interval lies above 0 "
        "(otherwise the ratio is undefined and the verdict INCONCLUSIVE).")

RULES = {
    "importance_correlation": f"Pearson r(1/gap, restoration) across heads, per seed; claim: mean r > {TARGET_R:g}.",
    "restoration_difference": (f"mean restoration of unstable heads (gap <= {UNSTABLE_GAP:g}) minus that of stable "
                               "heads, per seed; claim: > 0. Group sizes per seed in the 'groups' column."),
    "restoration_ratio": (f"claim: unstable > {TARGET_RATIO:g} x stable, tested as unstable - {TARGET_RATIO:g} x "
                          "stable > 0; undefined (INCONCLUSIVE) unless the stable group's mean restoration has an "
                          "interval above 0. The ratio of the means is shown only where both group means' intervals "
                          "lie above 0."),
    "steering_difference": ("spectral rule's single layer minus the 1-layer baseline, mean effect over held-out "
                            "prompts, per seed; claim: > 0."),
    "steering_improvement": (f"claim: spectral >= {1 + TARGET_IMPROVEMENT:g} x baseline (1 layer each), tested as "
                             f"spectral - {1 + TARGET_IMPROVEMENT:g} x baseline > 0; undefined (INCONCLUSIVE) unless "
                             "the baseline's effect interval lies above 0."),
    "spectral_vs_random": ("spectral rule at its k layers minus the random control at k layers (per prompt, the "
                           "mean over the control's draws); claim: > 0."),
    "layer_choice": (f"claim: spectral (k layers) keeps >= {1 - LAYER_CHOICE_TOLERANCE:.0%} of the oracle's effect "
                     f"(k layers; chosen on the selection prompts where the steer job records a split), tested as "
                     f"spectral - {1 - LAYER_CHOICE_TOLERANCE:g} x oracle > 0 (PASS) against < 0 (FAIL); "
                     "undefined unless the oracle's effect interval lies above 0."),
    "threshold": (f"the Youden-optimal gap threshold (important heads: {IMPORTANCE_RULE}; steerable layers: "
                  f"{STEERABLE_RULE}). PASS when the threshold lies within [{UNSTABLE_GAP - BAND:.2f}, "
                  f"{UNSTABLE_GAP + BAND:.2f}] (both one-sided tests, TOST) and the gap separates (AUROC > 0.5); "
                  "FAIL when it lies outside the band or the AUROC is below 0.5 (small gaps mark the LESS important "
                  "units); one-sided tests at 0.025, Holm over populations. Across seeds: t-interval of the seeds' "
                  "thresholds (each seed's threshold already varies with its heads); one model: the calibration's "
                  "stratified bootstrap."),
    "threshold_holds": ("PASS when every population's threshold verdict is PASS (an intersection-union rule: no "
                   "correction needed); FAIL when any is FAIL (those verdicts are Holm-corrected over populations); "
                   "else INCONCLUSIVE (also with fewer than 2 populations)."),
    "threshold_stable": (f"PASS when the 95 % intervals of all population thresholds lie within one window of width "
                         f"{STABLE_RANGE:.2f}; FAIL when two populations' Bonferroni-simultaneous intervals "
                         f"(1 - 0.05/m for m populations) are more than {STABLE_RANGE:.2f} apart; else INCONCLUSIVE "
                         "(also with fewer than 2 populations)."),
    "correlation_consistent": (
        "Fisher z per seed (SE 1/sqrt(n - 3), n heads or layers; seeds with n <= 3 excluded); a population's z is "
        "the mean over its seeds with variance max(between-seed variance, mean 1/(n-3)) / k and k - 1 degrees of "
        "freedom (one seed: 1/(n-3), known). Heterogeneity across populations: Cochran's Q with these weights, its "
        "p-value from Welch's F test (chi-square when every variance is known); I² = (Q - df)/Q. FAIL when the "
        "Holm-adjusted (over the two correlations) heterogeneity p < 0.05; PASS when the heterogeneity p >= 0.05, "
        "the pooled z differs from 0 (Holm-adjusted two-sided p < 0.05) and every population's mean r has the "
        "pooled sign (no evidence of heterogeneity alone is not consistency); else INCONCLUSIVE (also with fewer "
        "than 2 populations)."),
}


# --- loading ---------------------------------------------------------------------------

@dataclass
class ModelData:
    """Everything the finished cells of one model (one seed of a population) hold."""

    name: str
    population: str
    seed: int | None
    facts: dict | None
    """model.json: parameters, layers, heads (per layer), d_model, d_head; None if absent."""
    cells: dict[str, CellData]
    """kind -> what the first finished cell of that kind holds (its loader's CellData)."""
    scan: dict[str, np.ndarray] | None = None
    """layer, head, gap, entropy of every head."""
    heads: dict[str, np.ndarray] | None = None
    """layer, head, gap, restoration (the measured importance) of every patched head."""
    examples: dict[str, np.ndarray] | None = None
    """patched, clean, corrupt: (heads, examples) metrics aligned with ``heads`` (None: only
    per-head restorations are known and intervals resample heads only)."""
    layers: dict[str, np.ndarray] | None = None
    """layer, min_gap, effect, effect_low, effect_high from the steering experiment."""
    arms: dict[str, dict] = field(default_factory=dict)
    """Steering role (baseline, spectral1, spectral_k, random_k, oracle_k) -> {name, k, n_draws,
    effects: (prompts,) per-prompt effect (mean over draws), n_prompts}."""
    prompts: str = ""
    """Which prompts the steering effects are measured on (held-out split or all)."""
    validate: dict[str, dict] = field(default_factory=dict)
    """validate.parquet rows by their ``key``."""
    steer: dict[str, dict] = field(default_factory=dict)
    """steer verdicts.parquet rows by their ``key``."""
    scan_set: str = ""
    """held-out / in-sample scan prompts of the validate cell ('' when not recorded)."""
    steer_scan_set: str = ""
    """held-out / in-sample scan texts the steer cell's spectral rule read ('' when not recorded)."""
    importance_source: str = ""
    heads_cell: Path | None = None
    """The cell ``heads`` were read from (validate, else patch)."""
    notes: list[str] = field(default_factory=list)
    excluded: dict[str, int] = field(default_factory=dict)
    """Non-finite values excluded, by quantity."""


@dataclass
class Population:
    """The finished models (seeds) of one population, seeds in ascending order."""

    name: str
    members: list[ModelData]
    listed: list[str]
    """Every spec of the sweep in this population (finished or not)."""

    @property
    def seeds(self) -> list[int | None]:
        return [m.seed for m in self.members]

    @property
    def one_model(self) -> bool:
        """One model only: its verdicts describe that model, not a recipe."""
        return len(self.members) <= 1

    @property
    def facts(self) -> dict | None:
        return next((m.facts for m in self.members if m.facts is not None), None)


@dataclass
class RunData:
    run_dir: Path
    run_id: str
    config: dict
    models: list[ModelData]
    populations: list[Population]
    found: list[str]
    """Finished cells, one line each."""
    missing: list[str]
    """What the report could not use, one line each."""
    cells: list[tuple[Cell, Path]] = field(default_factory=list)
    """Every finished cell and its directory (what kinds without an analysis here are shown from)."""


def population_of(spec: str) -> tuple[str, int | None]:
    """(population, seed) of a model spec (``spectral.models.specs.population``); a spec it cannot
    parse is a population of one with an unknown seed."""
    from spectral.errors import UsageError
    from spectral.models.specs import population

    try:
        return population(spec)
    except (UsageError, ValueError):
        return spec, None


READS = ("scan", "patch", "validate", "steer")
"""Experiment kinds this analysis reads; the report shows cells of other kinds with their kind's
own metrics (``jobs.registry.Experiment.metrics``), in its "Other experiments" section."""
SCAN_KINDS = ("validate", "scan", "steer")
"""Experiment kinds whose cells hold a scan.parquet, in the order the report prefers."""


def _columns(table, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Columns ``names`` of a (schema-checked) table as float arrays."""
    return {n: table[n].to_numpy(zero_copy_only=False).astype(float) for n in names}


def _rows_by_key(table) -> dict[str, dict]:
    """Rows of a job's statistics table by their stable ``key``."""
    return {r["key"]: r for r in table.to_pylist()}


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def _scan(cells: dict[str, CellData]) -> dict[str, np.ndarray] | None:
    for kind in SCAN_KINDS:
        if kind in cells:
            return _columns(cells[kind].table("scan.parquet"), ("layer", "head", "gap", "entropy"))
    return None


def _per_example(table) -> tuple[list[tuple[int, int]], dict[str, np.ndarray]]:
    """(sorted (layer, head) keys, {patched, clean, corrupt: (heads, examples)}) of a per-example
    patching table; missing cells are NaN."""
    t = _columns(table, ("layer", "head", "example", "metric_patched", "metric_clean", "metric_corrupt"))
    lh = np.c_[t["layer"], t["head"]].astype(int)
    keys, index = np.unique(lh, axis=0, return_inverse=True)
    ex = t["example"].astype(int)
    shape = (len(keys), int(ex.max()) + 1 if ex.size else 0)
    out = {}
    for name in ("patched", "clean", "corrupt"):
        m = np.full(shape, np.nan)
        m[index.ravel(), ex] = t[f"metric_{name}"]
        out[name] = m
    return [(int(a), int(b)) for a, b in keys], out


def _patch_params(cell: CellData) -> tuple[str, str]:
    """(method, direction) of a patch cell, from the config in its params.json."""
    from spectral.errors import UsageError

    config = cell.params.get("config", {})
    if "method" not in config or "direction" not in config:
        raise UsageError(f"{cell.path / 'params.json'}: no config.method and config.direction (the patch job writes both)")
    return config["method"], config["direction"]


def _kv_heads(md: ModelData) -> None:
    """Copy the validate cell's scan ``kv_head`` (grouped-query models) onto the patched heads."""
    unit = md.cells.get("validate")
    if md.heads is None or unit is None:
        return
    t = unit.table("scan.parquet")
    kv = {(int(l), int(h)): float(k) for l, h, k in zip(t["layer"].to_pylist(), t["head"].to_pylist(),
                                                        t["kv_head"].to_pylist())}
    md.heads["kv_head"] = np.array([kv.get((int(l), int(h)), np.nan) for l, h in zip(md.heads["layer"], md.heads["head"])])


def _heads(md: ModelData) -> None:
    """Fill ``heads`` and ``examples`` from the validate cell, else from a patch cell whose
    restoration measures importance (exact / attribution patching, direction denoise)."""
    cells, scan = md.cells, md.scan
    unit, source = None, ""
    if "validate" in cells:
        unit, source = cells["validate"], "validate (exact patching, denoise)"
        md.scan_set = str(unit.params.get("scan_set") or "")
    elif "patch" in cells:
        method, direction = _patch_params(cells["patch"])
        if method not in IMPORTANCE_METHODS or direction != "denoise":
            md.notes.append(f"patch cell with method {method}, direction {direction}: its restoration is ~1 for "
                            "heads that do NOT matter (it measures what survives, not importance); not read as "
                            "importance")
            return
        unit, source = cells["patch"], f"patch ({method}, {direction})"
    if unit is None:
        return
    md.importance_source, md.heads_cell = source, unit.path
    gap_of = {} if scan is None else {(int(l), int(h)): g for l, h, g in zip(scan["layer"], scan["head"], scan["gap"])
                                     if np.isfinite(l) and np.isfinite(h)}
    keys, ex = _per_example(unit.table("patch_examples.parquet"))
    gap = np.array([gap_of.get(k, np.nan) for k in keys])
    missing = ~np.isfinite(np.stack(list(ex.values()))).all(axis=(0, 2)) if ex["clean"].size else np.zeros(len(keys), bool)
    measured = restoration(ex["patched"], ex["clean"], ex["corrupt"])
    md.excluded["heads with missing per-example metrics"] = int(missing.sum())
    md.excluded["restoration undefined (clean ~ corrupt)"] = int((np.isnan(measured) & ~missing).sum())
    measured = np.where(missing, np.nan, measured)
    md.heads = {"layer": np.array([k[0] for k in keys], float), "head": np.array([k[1] for k in keys], float),
                "gap": gap, "restoration": measured}
    md.examples = ex


def _arms(cell: CellData) -> tuple[dict[str, dict], str]:
    """Steering arms by role from per_prompt.parquet (held-out prompts) and which prompts they
    are measured on."""
    rows = [r for r in cell.table("per_prompt.parquet").to_pylist()
            if r["split"] == "heldout" and r["family"] != "layer"]
    by: dict[str, dict] = {}
    for r in rows:
        a = by.setdefault(r["strategy"], {"name": r["strategy"], "family": r["family"], "k": int(r["k"]), "draws": {}})
        a["draws"].setdefault(int(r["draw"]), {})[int(r["prompt"])] = float(r["effect"])
    arms = {}
    for a in by.values():
        prompts = sorted(set.intersection(*(set(d) for d in a["draws"].values())))
        effects = np.array([[d[p] for p in prompts] for d in a["draws"].values()], dtype=float)
        a.update(prompts=prompts, effects=effects.mean(0), n_draws=len(a["draws"]), n_prompts=len(prompts))
        del a["draws"]
        arms[a["name"]] = a

    def pick(family: str, largest: bool) -> dict | None:
        c = [a for a in arms.values() if a["family"] == family]
        if not c:
            return None
        return max(c, key=lambda a: a["k"]) if largest else min(c, key=lambda a: a["k"])

    roles = {"baseline": pick("baseline", False), "spectral1": pick("spectral", False),
             "spectral_k": pick("spectral", True), "random_k": pick("random", True), "oracle_k": pick("oracle", True)}
    roles = {k: v for k, v in roles.items() if v is not None}
    if "spectral_k" in roles:  # comparisons at equal numbers of layers only
        for r in ("random_k", "oracle_k"):
            if r in roles and roles[r]["k"] != roles["spectral_k"]["k"]:
                del roles[r]
    return roles, "held-out split of the evaluation prompts (the oracle chosen on the selection split)"


def _count_bad(*arrays: np.ndarray) -> int:
    return int((~np.all([np.isfinite(a) for a in arrays], axis=0)).sum()) if arrays[0].size else 0


def read_model_data(name: str, facts: dict | None, cells: dict[str, CellData]) -> ModelData:
    pop, seed = population_of(name)
    md = ModelData(name, pop, seed, facts, cells)
    md.scan = _scan(cells)
    _heads(md)
    _kv_heads(md)
    if "steer" in cells:
        md.layers = _columns(cells["steer"].table("layers.parquet"),
                             ("layer", "min_gap", "effect", "effect_low", "effect_high"))
        md.steer = _rows_by_key(cells["steer"].table("verdicts.parquet"))
        md.arms, md.prompts = _arms(cells["steer"])
        config = cells["steer"].params.get("config", {})
        md.steer_scan_set = str(config.get("scan_set") or "")
    if "validate" in cells:
        md.validate = _rows_by_key(cells["validate"].table("validate.parquet"))
    if md.scan is not None:
        md.excluded["gap (scan)"] = _count_bad(md.scan["gap"])
        md.excluded["entropy (scan)"] = _count_bad(md.scan["entropy"])
    if md.heads is not None:
        md.excluded["gap or restoration (patched heads)"] = _count_bad(md.heads["gap"], md.heads["restoration"])
    if md.layers is not None:
        md.excluded["min gap or effect (steered layers)"] = _count_bad(md.layers["min_gap"], md.layers["effect"],
                                                                      md.layers["effect_low"])
    return md


def load_run(run_dir: Path, load_cell: Callable[[str, Path], CellData]) -> RunData:
    """Read ``run_dir/sweep.json`` and every finished cell (``cluster.layout.RunLayout``), each
    through ``load_cell(kind, cell_dir)``: its experiment kind's loader (``jobs.report.load_cell``
    reads ``jobs.registry``), which checks every table against its schema. A cell without its
    marker ``cell.json`` is unfinished: named in ``missing`` and not read. Models
    are grouped into populations by ``spectral.models.specs.population`` (order of first
    appearance in the sweep)."""
    layout = RunLayout(run_dir)
    sweep = layout.sweep_state()
    config = sweep.get("config", {})
    experiments = [e.get("kind", "?") for e in config.get("experiments", [])]
    found, missing, models = [], [], []
    finished: list[tuple[Cell, Path]] = []
    for kind in ("validate", "steer"):
        if kind not in experiments and not (kind == "validate" and "patch" in experiments):
            missing.append(f"the sweep has no {kind} experiment: its metrics are not evaluated")
    listed: dict[str, list[str]] = {}
    seen: dict[tuple[str, int | None], str] = {}
    for model in config.get("models", []):
        pop, seed = population_of(model)
        listed.setdefault(pop, []).append(model)
        if seed is not None and (pop, seed) in seen:
            missing.append(f"{model}: the same model as {seen[(pop, seed)]} (population {pop}, seed {seed}): "
                           "counted once")
            continue
        seen[(pop, seed)] = model
        cells: dict[str, CellData] = {}
        for i, kind in enumerate(experiments):
            cell = Cell(model, i, kind)
            unit = layout.cell_dir(cell)
            if not unit.is_dir():
                missing.append(f"{model}: {cell.label} not run")
            elif not layout.finished(cell):
                missing.append(f"{model}: {cell.label} not finished (no {RunLayout.DONE})")
            else:
                found.append(f"{model}: {cell.label}")
                finished.append((cell, unit))
                if kind not in cells:
                    cells[kind] = load_cell(kind, unit)
        facts = _read_json(layout.model_file(model))
        if facts is None:
            missing.append(f"{model}: model.json (size facts) missing: excluded from scaling fits")
        md = read_model_data(model, facts, cells)
        missing += [f"{model}: {n}" for n in md.notes if "not read as importance" in n]
        models.append(md)
    populations = []
    for pop, specs in listed.items():
        members = sorted([m for m in models if m.population == pop and m.cells],
                         key=lambda m: (m.seed is None, m.seed if m.seed is not None else 0))
        populations.append(Population(pop, members, specs))
    return RunData(run_dir, str(sweep.get("run_id", run_dir.name)), config, models, populations, found, missing,
                   finished)


# --- finite views ------------------------------------------------------------------------

def finite_heads(md: ModelData) -> dict[str, np.ndarray] | None:
    if md.heads is None:
        return None
    ok = np.isfinite(md.heads["gap"]) & np.isfinite(md.heads["restoration"])
    return {k: v[ok] for k, v in md.heads.items()}


def finite_layers(md: ModelData) -> dict[str, np.ndarray] | None:
    if md.layers is None:
        return None
    ok = np.isfinite(md.layers["min_gap"]) & np.isfinite(md.layers["effect"]) & np.isfinite(md.layers["effect_low"])
    return {k: v[ok] for k, v in md.layers.items()}


def finite_gaps(md: ModelData) -> np.ndarray:
    if md.scan is None:
        return np.zeros(0)
    return md.scan["gap"][np.isfinite(md.scan["gap"])]


def head_member(md: ModelData) -> Member | None:
    """The model as a population member for head-level statistics: ``per_unit`` gap (and
    importance, the measured restoration, when there are no per-example metrics), ``per_example``
    patched / clean / corrupt. Heads with a non-finite gap or restoration are left out (counted in
    ``excluded``).
    Heads sharing one key head (grouped-query attention: the scan's ``kv_head`` column) form a
    cluster, resampled whole."""
    h = finite_heads(md)
    if h is None or h["gap"].size == 0:
        return None
    ok = np.isfinite(md.heads["gap"]) & np.isfinite(md.heads["restoration"])
    clusters = None
    if "kv_head" in h and np.isfinite(h["kv_head"]).all() and np.unique(h["kv_head"]).size < np.unique(h["head"]).size:
        clusters = h["layer"].astype(int) * 100_000 + h["kv_head"].astype(int)  # as analysis.validation
    if md.examples is not None:
        ex = {k: v[ok] for k, v in md.examples.items()}
        return Member(md.seed, {"gap": h["gap"]}, ex, clusters) if clusters is not None else \
            Member(md.seed, {"gap": h["gap"]}, ex)
    per_unit = {"gap": h["gap"], "restoration": h["restoration"]}
    return Member(md.seed, per_unit, {}, clusters) if clusters is not None else Member(md.seed, per_unit)


def arm_member(md: ModelData, roles: Sequence[str]) -> Member | None:
    """The model as a member for steering contrasts: one unit, per-prompt effects of each role
    (paired: one example axis), or None when a role is missing or prompts differ."""
    if not all(r in md.arms for r in roles):
        return None
    prompts = [md.arms[r]["prompts"] for r in roles]
    if any(p != prompts[0] for p in prompts) or len(prompts[0]) < 2:
        return None
    return Member(md.seed, {"one": np.zeros(1)}, {r: md.arms[r]["effects"][None, :] for r in roles})


# --- statistics of the report not in analysis.stats ------------------------------------------

def arm_contrast(weights: dict[str, float]) -> Stat:
    """Steering: sum of weight x mean effect over the prompts of each role (``arm_member``)."""
    def f(pu, mu):
        return sum(w * mu[r][:, 0] for r, w in weights.items())
    return Stat(" + ".join(f"{w:g} x {r}" for r, w in weights.items()), batched=f)


def entropy_difference(threshold: float = UNSTABLE_GAP) -> Stat:
    """Median entropy of unstable heads minus that of stable heads."""
    def f(pu, mu):
        g, e = pu["gap"], pu["entropy"]
        ok = np.isfinite(g) & np.isfinite(e)
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            a = np.nanmedian(np.where(ok & (g <= threshold), e, np.nan), axis=1)
            b = np.nanmedian(np.where(ok & (g > threshold), e, np.nan), axis=1)
        return a - b
    return Stat("median entropy unstable - stable", batched=f)


def df_entropy(m: Member) -> float:
    """Welch's df of the entropy difference, at most n - 2."""
    g, e = np.asarray(m.per_unit["gap"], float), np.asarray(m.per_unit["entropy"], float)
    return min(welch_df(e[g <= UNSTABLE_GAP], e[g > UNSTABLE_GAP]), g.size - 2)


# --- decisions -----------------------------------------------------------------------------

# --- rows ------------------------------------------------------------------------------------

def _fmt(v: float, lo: float = NAN, hi: float = NAN) -> str:
    if not np.isfinite(v):
        return "–"
    return f"{v:.3g}" + (f" [{lo:.3g}, {hi:.3g}]" if np.isfinite(lo) and np.isfinite(hi) else "")


def _units_text(n_units: Sequence[int]) -> str:
    n = [int(x) for x in n_units]
    if not n:
        return "0"
    return str(n[0]) if min(n) == max(n) else f"{min(n)}–{max(n)}"


def _row(population: str, key: str, *, pop: Population | None = None, e: PopulationEstimate | None = None,
         target: float = NAN, unit: str = "", groups: str = "", note: str = "", p_pass: float = NAN,
         p_fail: float = NAN, value: float | None = None, low: float | None = None, high: float | None = None,
         family: str | None = None, scheme_text: str | None = None, prompts: str = "") -> dict:
    names = {**POPULATION_METRICS, **CROSS_POPULATION_METRICS}
    n_seeds = e.n_seeds if e is not None else (len(pop.members) if pop is not None else 0)
    per_seed = ""
    if e is not None and e.n_seeds:
        per_seed = "; ".join(f"{'seed ' + str(s) if s is not None else 'model'}: {_fmt(v, lo, hi)}"
                             for s, v, lo, hi in zip(e.seeds, e.per_seed, e.per_seed_low, e.per_seed_high))
    one = pop is not None and pop.one_model
    return {
        "population": population, "key": key, "metric": names[key], "family": family or key,
        "n_seeds": int(n_seeds), "seeds": "one model" if one else (
            ", ".join(str(s) for s in (e.seeds if e is not None else pop.seeds if pop else []))),
        "unit": unit, "n_units": _units_text(e.n_units) if e is not None and e.n_units else "",
        "groups": groups, "value": float(e.value if value is None and e is not None else (NAN if value is None else value)),
        "low": float(e.low if low is None and e is not None else (NAN if low is None else low)),
        "high": float(e.high if high is None and e is not None else (NAN if high is None else high)),
        "hier_low": float(e.hier_low) if e is not None else NAN,
        "hier_high": float(e.hier_high) if e is not None else NAN,
        "same_sign": float(e.same_sign) if e is not None else NAN, "per_seed": per_seed,
        "target": float(target), "p_pass": float(p_pass), "p_fail": float(p_fail),
        "p_pass_holm": NAN, "p_fail_holm": NAN, "verdict": "INCONCLUSIVE",
        "scheme": scheme_text if scheme_text is not None else (e.scheme if e is not None else ""),
        "correction": "", "prompts": prompts, "note": note,
    }


def _apply_holm(rows: list[dict]) -> None:
    """Holm within each family (the same key over populations), PASS and FAIL claims each;
    verdicts from the adjusted one-sided p-values."""
    families: dict[str, list[dict]] = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    for fam, rs in families.items():
        pp = holm([r["p_pass"] for r in rs])
        pf = holm([r["p_fail"] for r in rs])
        m = sum(np.isfinite(r["p_pass"]) or np.isfinite(r["p_fail"]) for r in rs)
        for r, a, b in zip(rs, pp, pf):
            r["p_pass_holm"], r["p_fail_holm"] = float(a), float(b)
            r["verdict"] = decide_claims(a, b)
            r["correction"] = (f"Holm over {m} population(s) (family: {fam}); one-sided tests at 0.025" if m > 1 else
                               "none needed (one test in its family); one-sided tests at 0.025" if m == 1 else
                               "no test (undefined)")


# --- per-population verdicts -----------------------------------------------------------------

def _groups_text(pop_members: list[ModelData], threshold: float = UNSTABLE_GAP) -> str:
    parts = []
    for md in pop_members:
        h = finite_heads(md)
        if h is not None:
            u = int((h["gap"] <= threshold).sum())
            parts.append(f"{u}/{h['gap'].size - u}")
    return ("unstable/stable heads per seed: " + ", ".join(parts)) if parts else ""


@dataclass
class PopulationResult:
    """The estimates behind one population's rows."""

    estimates: dict[str, PopulationEstimate] = field(default_factory=dict)
    calibrations: dict[str, list[Calibration | None]] = field(default_factory=dict)
    """'heads' / 'layers' -> per seed (None where the seed has no such data)."""


def _scan_note(pop: Population) -> str:
    sets = sorted({m.scan_set for m in pop.members if m.scan_set})
    return ("gaps from " + "/".join(sets) + " scan prompts") if sets else ""


def head_rows(pop: Population, res: PopulationResult, n_resamples: int, seed: int) -> list[dict]:
    members = [(md, m) for md in pop.members if (m := head_member(md)) is not None]
    absent = "no patched heads (no finished validate experiment, or its restoration is not importance)"
    keys = ("importance_correlation", "restoration_difference", "restoration_ratio")
    if not members:
        return [_row(pop.name, k, pop=pop, note=absent, target={"importance_correlation": TARGET_R}.get(k, 0.0))
                for k in keys]
    mds, ms = [x[0] for x in members], [x[1] for x in members]
    es = estimate_many(ms, {"r": r_inverse_gap, "diff": group_contrast(),
                            "margin": group_contrast(stable=-TARGET_RATIO), "unstable": group_contrast(stable=0.0),
                            "stable": group_contrast(unstable=0.0, stable=1.0)}, n_resamples=n_resamples, seed=seed,
                       df={"diff": df_groups(), "margin": df_groups(), "unstable": df_group(unstable=True),
                           "stable": df_group(unstable=False)})  # r: Fisher z, n - 3
    r_raw, diff, margin, unstable, stable = (es[k] for k in ("r", "diff", "margin", "unstable", "stable"))
    r = clip(r_raw, -1.0, 1.0)
    res.estimates.update(importance_correlation=r, restoration_difference=diff, restoration_ratio=margin,
                         unstable_mean=unstable, stable_mean=stable)
    groups, scan = _groups_text(mds), _scan_note(pop)
    notes = scan
    rows = [
        _row(pop.name, "importance_correlation", pop=pop, e=r, target=TARGET_R, unit="heads",
             note="; ".join(x for x in (notes, job_verdicts(mds, "importance_correlation", "validate")) if x),
             p_pass=p_value(r_raw, TARGET_R, "above"), p_fail=p_value(r_raw, TARGET_R, "below")),
        _row(pop.name, "restoration_difference", pop=pop, e=diff, target=0.0, unit="heads", groups=groups,
             note="; ".join(x for x in (f"unstable {_fmt(unstable.value, unstable.low, unstable.high)}, stable "
                                        f"{_fmt(stable.value, stable.low, stable.high)}", notes,
                                        job_verdicts(mds, "restoration_difference", "validate")) if x),
             p_pass=p_value(diff, 0.0, "above"), p_fail=p_value(diff, 0.0, "below")),
    ]
    defined = np.isfinite(stable.low) and stable.low > 0
    ratio = unstable.value / stable.value if defined and np.isfinite(unstable.low) and unstable.low > 0 else NAN
    if defined:
        note = (f"ratio of the mean restorations {ratio:.3g}" if np.isfinite(ratio) else
                "ratio not shown: the unstable group's mean is not known to be > 0") + \
               f"; stable mean {_fmt(stable.value, stable.low, stable.high)} > 0"
        note = "; ".join(x for x in (note, job_verdicts(mds, "restoration_ratio", "validate")) if x)
        rows.append(_row(pop.name, "restoration_ratio", pop=pop, e=margin, target=0.0, unit="heads", groups=groups,
                         note=note, p_pass=p_value(margin, 0.0, "above"), p_fail=p_value(margin, 0.0, "below")))
    else:
        rows.append(_row(pop.name, "restoration_ratio", pop=pop, e=margin, target=0.0, unit="heads", groups=groups,
                         note=(f"undefined: the stable heads' mean restoration {_fmt(stable.value, stable.low, stable.high)} "
                               "is not known to be > 0 (a ratio would invert or explode); read restoration_difference")))
    return rows


def steer_rows(pop: Population, res: PopulationResult, n_resamples: int, seed: int) -> list[dict]:
    specs = {
        "steering_difference": (("spectral1", "baseline"), {"spectral1": 1.0, "baseline": -1.0}, None),
        "steering_improvement": (("spectral1", "baseline"), {"spectral1": 1.0, "baseline": -(1 + TARGET_IMPROVEMENT)},
                                 "baseline"),
        "spectral_vs_random": (("spectral_k", "random_k"), {"spectral_k": 1.0, "random_k": -1.0}, None),
        "layer_choice": (("spectral_k", "oracle_k"), {"spectral_k": 1.0, "oracle_k": -(1 - LAYER_CHOICE_TOLERANCE)},
                         "oracle_k"),
    }
    rows = []
    prompts = "; ".join(sorted({m.prompts for m in pop.members if m.prompts}))
    sets = sorted({m.steer_scan_set for m in pop.members if m.steer_scan_set})
    if sets:
        prompts += ("; " if prompts else "") + "spectral rule read a " + "/".join(sets) + " scan" + (
            " (IN-SAMPLE: it includes the evaluation prompts)" if "in-sample" in sets else "")
    for key, (roles, weights, gate) in specs.items():
        mds = [md for md in pop.members if arm_member(md, roles) is not None]
        if not mds:
            have = [md for md in pop.members if md.arms]
            why = ("no finished steer experiment" if not any("steer" in md.cells for md in pop.members) else
                   f"no per-prompt effects of {' and '.join(roles)}" if not have else
                   f"the steer runs lack {' or '.join(roles)} (or measured them on different prompts)")
            rows.append(_row(pop.name, key, pop=pop, target=0.0, note=why, prompts=prompts))
            continue
        ms = [arm_member(md, roles) for md in mds]
        kw = dict(n_resamples=n_resamples, seed=seed, resample_units=False, unit_name="prompts")  # df prompts - 1
        es = estimate_many(ms, {"c": arm_contrast(weights), **({"g": arm_contrast({gate: 1.0})} if gate else {})}, **kw)
        e = es["c"]
        res.estimates[key] = e
        ks = sorted({md.arms[roles[0]]["k"] for md in mds})
        draws = sorted({md.arms[r]["n_draws"] for md in mds for r in roles if r == "random_k"})
        n_prompts = sorted({md.arms[roles[0]]["n_prompts"] for md in mds})
        groups = (f"k = {'/'.join(map(str, ks))} layer(s); prompts per seed {_units_text(n_prompts)}"
                  + (f"; random draws {'/'.join(map(str, draws))}" if draws else ""))
        parts = [f"{md.arms[r]['name']}" for md in mds[:1] for r in roles]
        note = " vs ".join(parts)
        row = _row(pop.name, key, pop=pop, e=e, target=0.0, unit="prompts", groups=groups, prompts=prompts,
                   p_pass=p_value(e, 0.0, "above"), p_fail=p_value(e, 0.0, "below"))
        row["n_units"] = _units_text(n_prompts)
        if gate is not None:
            g = es["g"]
            res.estimates[f"{key}:{gate}"] = g
            if not (np.isfinite(g.low) and g.low > 0):
                row.update(p_pass=NAN, p_fail=NAN)
                note += (f"; undefined: the {md_role(gate)} effect {_fmt(g.value, g.low, g.high)} is not known to be "
                         "> 0 (a relative claim is meaningless)")
            else:
                note += f"; {md_role(gate)} effect {_fmt(g.value, g.low, g.high)} > 0"
        row["note"] = "; ".join(x for x in (note, job_verdicts(mds, key, "steer")) if x)
        rows.append(row)
    return rows


def job_verdicts(mds: Sequence[ModelData], key: str, kind: str) -> str:
    """The per-model verdicts the validate / steer jobs wrote for ``key``, for the note: a
    cross-check, not the population's verdict."""
    got = []
    for md in mds:
        r = (md.validate if kind == "validate" else md.steer).get(key)
        if r is not None and r.get("verdict"):
            got.append(f"{'seed ' + str(md.seed) if md.seed is not None else md.name} {r['verdict']}")
    return f"{kind} job per model (its own rule): " + ", ".join(got) if got else ""


def md_role(role: str) -> str:
    return {"baseline": "baseline's", "oracle_k": "oracle's", "spectral1": "spectral rule's",
            "spectral_k": "spectral rule's", "random_k": "random control's"}.get(role, role)


def _band_ps(t: PopulationEstimate, a: PopulationEstimate) -> tuple[float, float]:
    """(p of PASS, p of FAIL) of the threshold rule: TOST within the band and AUROC > 0.5;
    outside the band (either side, Bonferroni x 2) or AUROC < 0.5 (x 3 in all)."""
    lo_edge, hi_edge = round(UNSTABLE_GAP - BAND, 10), round(UNSTABLE_GAP + BAND, 10)
    p_pass = max(p_value(t, lo_edge, "above"), p_value(t, hi_edge, "below"), p_value(a, 0.5, "above"))
    fails = [p_value(t, lo_edge, "below"), p_value(t, hi_edge, "above"), p_value(a, 0.5, "below")]
    fails = [p for p in fails if np.isfinite(p)]
    p_fail = min(1.0, len(fails) * min(fails)) if fails else NAN
    return p_pass, p_fail


def threshold_rows(pop: Population, res: PopulationResult, n_resamples: int, seed: int) -> list[dict]:
    rows = []
    b = n_resamples
    for which, key in (("heads", "threshold_heads"), ("layers", "threshold_layers")):
        cals = []
        for md in pop.members:
            c = None
            if which == "heads" and (h := finite_heads(md)) is not None and h["gap"].size:
                c = calibrate(h["gap"], important(h["restoration"]), n_resamples=b, seed=seed)
            elif which == "layers" and (l := finite_layers(md)) is not None and l["min_gap"].size:
                c = calibrate_layers(l["min_gap"], l["effect"], l["effect_low"], n_resamples=b, seed=seed)
            cals.append(c)
        res.calibrations[which] = cals
        have = [(md, c) for md, c in zip(pop.members, cals) if c is not None]
        absent = "no patched heads" if which == "heads" else "no finished steer experiment"
        if not have:
            rows.append(_row(pop.name, key, pop=pop, target=UNSTABLE_GAP, note=absent))
            continue
        seeds = [md.seed for md, _ in have]
        units = [c.n for _, c in have]
        what = f"Youden-optimal threshold, stratified bootstrap over {which} ({b})"
        t = from_values([c.threshold for _, c in have], seeds, units, [c.threshold_low for _, c in have],
                            [c.threshold_high for _, c in have], what=what)
        a = from_values([c.auroc for _, c in have], seeds, units, [c.auroc_low for _, c in have],
                            [c.auroc_high for _, c in have], what=f"AUROC of -gap, stratified bootstrap ({b})")
        p_pass, p_fail = _band_ps(t, a)
        t, a = clip(t, 0.0, 1.0), clip(a, 0.0, 1.0)  # for display (p-values read the t scale)
        res.estimates[key], res.estimates[f"auroc_{which}"] = t, a
        sep = ""
        if len(have) == 1:  # one model: the calibration's exact AUROC test decides separation
            c = have[0][1]
            sep = c.separation
            if c.separation != "separates":
                p_pass = NAN
            if c.separation == "reversed":
                p_fail = 0.0
        pos = ", ".join(f"{c.n_positive}/{c.n - c.n_positive}" for _, c in have)
        undefined = [f"seed {md.seed}: {c.reason}" for md, c in have if c.reason and not np.isfinite(c.threshold)]
        note = "; ".join(x for x in (f"AUROC {_fmt(a.value, a.low, a.high)}" + (f" ({sep})" if sep else ""),
                                     ("seeds without a threshold: " + "; ".join(undefined)) if undefined else "",
                                     _scan_note(pop) if which == "heads" else "") if x)
        rows.append(_row(pop.name, key, pop=pop, e=t, target=UNSTABLE_GAP, unit=which,
                         groups=f"{'important' if which == 'heads' else 'steerable'}/other per seed: {pos}",
                         note=note, p_pass=p_pass, p_fail=p_fail))
    return rows


# --- cross-population rules -------------------------------------------------------------------

def threshold_holds(verdicts: list[str]) -> tuple[str, str]:
    """RULES['threshold_holds'] over the populations' Holm-corrected threshold verdicts."""
    n = len(verdicts)
    if n < 2:
        return "INCONCLUSIVE", f"generalization needs at least 2 populations; this run has {n} with a threshold"
    note = f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, {verdicts.count('INCONCLUSIVE')} INCONCLUSIVE of {n}"
    if "FAIL" in verdicts:
        return "FAIL", note
    if all(v == "PASS" for v in verdicts):
        return "PASS", note
    return "INCONCLUSIVE", note


def threshold_stable(estimates: list[PopulationEstimate]) -> tuple[str, str]:
    """RULES['threshold_stable']."""
    es = [e for e in estimates if np.isfinite(e.value)]
    m = len(es)
    if m < 2:
        return "INCONCLUSIVE", f"generalization needs at least 2 populations; this run has {m} with a threshold"
    lows, highs = np.array([e.low for e in es]), np.array([e.high for e in es])
    sim = [interval_at(e, 1 - ALPHA / m) for e in es]
    slo, shi = np.array([s[0] for s in sim]), np.array([s[1] for s in sim])
    ok = np.isfinite(slo) & np.isfinite(shi)
    apart = float(slo[ok].max() - shi[ok].min()) if ok.sum() >= 2 else NAN
    window = float(highs.max() - lows.min()) if np.isfinite(lows).all() and np.isfinite(highs).all() else NAN
    note = (f"range of population thresholds {np.ptp([e.value for e in es]):.3f}; envelope of the 95 % intervals "
            + (f"{window:.3f}" if np.isfinite(window) else "undefined (a population without an interval)")
            + (f"; largest distance between simultaneous intervals {max(apart, 0.0):.3f}" if np.isfinite(apart) else ""))
    if np.isfinite(apart) and apart > STABLE_RANGE:
        return "FAIL", note
    if np.isfinite(window) and window <= STABLE_RANGE:
        return "PASS", note
    return "INCONCLUSIVE", note


@dataclass(frozen=True)
class Study:
    """One population's correlation on the Fisher-z scale (RULES['correlation_consistent'])."""

    population: str
    z: float
    var: float
    df: float
    """Degrees of freedom of ``var`` (inf: known, one seed)."""
    r_seeds: tuple[float, ...]
    n_seeds: tuple[int, ...]
    """Units (heads or layers) per used seed."""
    n_excluded: int
    """Seeds left out (n <= 3 or r undefined)."""

    @property
    def r(self) -> float:
        return float(np.tanh(self.z))


def study(population: str, r: Sequence[float], n: Sequence[int]) -> Study | None:
    """A population's Fisher z from its seeds' correlations ``r`` over ``n`` units each; seeds
    with n <= 3 or an undefined r are excluded; None when no seed is left."""
    r, n = np.asarray(r, float), np.asarray(n, float)
    ok = np.isfinite(r) & (n > 3)
    if not ok.any():
        return None
    z = np.arctanh(np.clip(r[ok], -1 + 1e-9, 1 - 1e-9))
    within = 1.0 / (n[ok] - 3)
    k = int(ok.sum())
    if k == 1:
        return Study(population, float(z[0]), float(within[0]), math.inf, tuple(r[ok]), tuple(int(x) for x in n[ok]),
                     int((~ok).sum()))
    var = max(float(z.var(ddof=1)), float(within.mean())) / k
    return Study(population, float(z.mean()), var, float(k - 1), tuple(r[ok]), tuple(int(x) for x in n[ok]),
                 int((~ok).sum()))


@dataclass(frozen=True)
class Heterogeneity:
    """Pooling of population correlations on the Fisher-z scale, Cochran's Q with Welch's test."""

    pooled: float
    pooled_low: float
    pooled_high: float
    pooled_p: float
    """Two-sided p of pooled z = 0."""
    q: float
    df: int
    p_value: float
    """Heterogeneity p: chi-square(df) when every variance is known, else Welch's F."""
    test: str
    i2: float
    """max(0, (Q - df) / Q): share of the spread beyond chance."""
    n_models: int
    """Populations used."""
    n_positive: int
    """Populations with r > 0."""
    n_excluding_zero_positive: int
    n_excluding_zero_negative: int
    reason: str = ""


def heterogeneity(studies: Sequence[Study | None]) -> Heterogeneity:
    s = [x for x in studies if x is not None and np.isfinite(x.z) and x.var > 0]
    z = np.array([x.z for x in s])
    var = np.array([x.var for x in s])
    dfs = np.array([x.df for x in s])
    half = np.array([stats.t.ppf(1 - ALPHA / 2, d) if np.isfinite(d) else stats.norm.ppf(1 - ALPHA / 2) for d in dfs])
    lo, hi = z - half * np.sqrt(var), z + half * np.sqrt(var)
    counts = (len(s), int((z > 0).sum()), int((lo > 0).sum()), int((hi < 0).sum()))
    if len(s) < 2:
        return Heterogeneity(NAN, NAN, NAN, NAN, NAN, 0, NAN, "", NAN, *counts,
                             reason=f"needs >= 2 populations with a correlation over > 3 units; have {len(s)}")
    w = 1 / var
    W = w.sum()
    zbar = float((w * z).sum() / W)
    q = float((w * (z - zbar) ** 2).sum())
    k = len(s)
    df1 = k - 1
    lam = float(sum((1 - wi / W) ** 2 / d for wi, d in zip(w, dfs) if np.isfinite(d)))
    if lam == 0:
        p, test = float(stats.chi2.sf(q, df1)), f"chi-square({df1})"
    else:
        f = (q / df1) / (1 + 2 * (k - 2) * lam / (k * k - 1))
        df2 = (k * k - 1) / (3 * lam)
        p, test = float(stats.f.sf(f, df1, df2)), f"Welch F({df1}, {df2:.1f}) = {f:.2f}"
    frac = sum((wi / W) ** 2 / d for wi, d in zip(w, dfs) if np.isfinite(d))
    df_pool = 1 / frac if frac > 0 else math.inf
    se = 1 / math.sqrt(W)
    tq = stats.t.ppf(1 - ALPHA / 2, df_pool) if np.isfinite(df_pool) else stats.norm.ppf(1 - ALPHA / 2)
    pp = float(2 * (stats.t.sf(abs(zbar) / se, df_pool) if np.isfinite(df_pool) else stats.norm.sf(abs(zbar) / se)))
    return Heterogeneity(float(np.tanh(zbar)), float(np.tanh(zbar - tq * se)), float(np.tanh(zbar + tq * se)), pp,
                         q, df1, p, test, max(0.0, (q - df1) / q) if q > 0 else 0.0, *counts)


def consistency_verdict(h: Heterogeneity, p_het_adjusted: float | None = None,
                        p_pooled_adjusted: float | None = None) -> tuple[str, str]:
    """RULES['correlation_consistent'] (adjusted p-values default to the raw ones)."""
    if h.reason:
        return "INCONCLUSIVE", h.reason
    ph = h.p_value if p_het_adjusted is None else p_het_adjusted
    pp = h.pooled_p if p_pooled_adjusted is None else p_pooled_adjusted
    note = (f"Q = {h.q:.2f} (df {h.df}), {h.test}, p = {h.p_value:.3g} (Holm {ph:.3g}), I² = {h.i2:.2f}; pooled p = "
            f"{h.pooled_p:.3g} (Holm {pp:.3g}); {h.n_positive} of {h.n_models} populations r > 0")
    if ph < ALPHA:
        return "FAIL", note
    same = h.n_positive in (0, h.n_models) and (h.n_positive == 0) == (h.pooled < 0)
    if h.p_value >= ALPHA and pp < ALPHA and same:
        return "PASS", note
    return "INCONCLUSIVE", note


# --- the whole run ---------------------------------------------------------------------

SCALING_QUANTITIES = {
    "threshold_heads": "calibrated threshold (important heads)",
    "threshold_layers": "calibrated threshold (steerable layers)",
    "min_gap": "minimum gap",
    "unstable_fraction": f"fraction unstable (gap <= {UNSTABLE_GAP:g})",
    "importance_correlation": "r(importance, 1/gap)",
}
"""Key of each population quantity the scaling fits read (``quantity`` column of scaling.parquet)
-> its label."""
THRESHOLD_QUANTITIES = {"threshold_heads": "heads", "threshold_layers": "layers"}
"""The scaling quantities that are calibrated thresholds -> their calibration target."""
BOUNDED = {"threshold_heads": (0.0, 1.0), "threshold_layers": (0.0, 1.0), "min_gap": (0.0, 1.0),
           "unstable_fraction": (0.0, 1.0), "importance_correlation": (-1.0, 1.0)}
"""The range a scaling quantity can take; a prediction outside it is not reported."""
CALIBRATION_TARGETS = {"heads": "important heads", "layers": "steerable layers"}
"""Key of each calibration target (``target`` column of calibration.parquet) -> its label."""
FACT_KEYS = ("parameters", "layers", "heads", "d_model", "d_head")


@dataclass
class Analysis:
    """The report's tables (lists of rows) and the numbers behind its figures."""

    calibrations: dict[str, dict[str, Calibration | None]]
    """Model -> 'heads' / 'layers' -> calibration (None where absent)."""
    calibration_rows: list[dict]
    verdicts: list[dict]
    correlations: list[dict]
    """population, correlation ('importance' / 'steering'), r (mean over seeds), low, high, per-seed r and n."""
    heterogeneity: dict[str, Heterogeneity]
    spread: dict[str, dict]
    """'heads' / 'layers' -> n, mean, sd, min, max, range of population thresholds."""
    per_population: dict[str, dict[str, float]]
    """Population -> {scaling quantity: across-seed mean}."""
    quantities: dict[str, dict[str, float]]
    """Scaling quantity -> {population: value} (those fitted only)."""
    scaling_rows: list[dict]
    scaling_reason: str
    scaling_models: list[dict]
    information_rows: list[dict]
    results: dict[str, PopulationResult] = field(default_factory=dict)
    scaling_excluded: list[str] = field(default_factory=list)


def _spread(values: list[float]) -> dict:
    v = np.array([x for x in values if np.isfinite(x)])
    if v.size == 0:
        return {"n": 0, "mean": NAN, "sd": NAN, "min": NAN, "max": NAN, "range": NAN}
    return {"n": int(v.size), "mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else NAN,
            "min": float(v.min()), "max": float(v.max()), "range": float(np.ptp(v))}


def _seed_r_layers(md: ModelData) -> tuple[float, int]:
    l = finite_layers(md)
    if l is None or l["min_gap"].size < 3:
        return NAN, 0 if l is None else int(l["min_gap"].size)
    from analysis.stats import pearson

    return pearson(l["min_gap"], l["effect"]), int(l["min_gap"].size)


def correlations(run: RunData, results: dict[str, PopulationResult]) -> tuple[list[dict], dict[str, list[Study | None]]]:
    """Per population: r(importance, 1/gap) (t-interval over the seeds; one seed: its Fisher-z
    interval over heads x examples) and r(layer min gap, steering effect) (seeds' t-interval; one
    seed: Fisher-z interval over its layers, no prompt-level interval); and the Fisher-z studies
    the consistency verdicts read."""
    rows, studies = [], {"importance": [], "steering": []}
    for pop in run.populations:
        e = results[pop.name].estimates.get("importance_correlation")
        if e is not None:
            rows.append({"population": pop.name, "correlation": "importance", "r": e.value, "low": e.low,
                         "high": e.high, "n_seeds": e.n_seeds, "per_seed_r": list(e.per_seed),
                         "per_seed_n": list(e.n_units), "scheme": e.scheme, "note": ""})
            studies["importance"].append(study(pop.name, e.per_seed, e.n_units))
        else:
            studies["importance"].append(None)
        rs = [(md.seed, *_seed_r_layers(md)) for md in pop.members if md.layers is not None]
        if rs:
            vals = [r for _, r, _ in rs]
            ns = [n for _, _, n in rs]
            if len(rs) == 1:
                r, n = vals[0], ns[0]
                lo = hi = NAN
                if np.isfinite(r) and n > 3:
                    z, se = np.arctanh(np.clip(r, -1 + 1e-9, 1 - 1e-9)), 1 / math.sqrt(n - 3)
                    lo, hi = float(np.tanh(z - 1.96 * se)), float(np.tanh(z + 1.96 * se))
                scheme_text = (f"one model: Fisher-z interval over its {n} layers (SE 1/sqrt(n-3))" if n > 3 else
                               f"one model, {n} layers: too few for an interval")
                rows.append({"population": pop.name, "correlation": "steering", "r": r, "low": lo, "high": hi,
                             "n_seeds": 1, "per_seed_r": vals, "per_seed_n": ns, "scheme": scheme_text,
                             "note": "descriptive: layers are the units; not comparable with other studies' r"})
            else:
                e = clip(from_values(vals, [s for s, _, _ in rs], ns, what="r over the seed's layers, no interval"),
                         -1.0, 1.0)
                rows.append({"population": pop.name, "correlation": "steering", "r": e.value, "low": e.low,
                             "high": e.high, "n_seeds": e.n_seeds, "per_seed_r": vals, "per_seed_n": ns,
                             "scheme": e.scheme,
                             "note": f"{_units_text(ns)} layers per seed: per-seed r has no interval; "
                                     "the interval is across seeds"})
            studies["steering"].append(study(pop.name, vals, ns))
        else:
            studies["steering"].append(None)
    return rows, studies


def cross_rows(run: RunData, results: dict[str, PopulationResult], pop_rows: list[dict],
               het: dict[str, Heterogeneity]) -> list[dict]:
    rows = []
    for which in ("heads", "layers"):
        key = f"threshold_{which}"
        vs = [r["verdict"] for r in pop_rows if r["key"] == key and np.isfinite(r["value"])]
        es = [results[p.name].estimates[key] for p in run.populations if key in results[p.name].estimates
              and np.isfinite(results[p.name].estimates[key].value)]
        v, note = threshold_holds(vs)
        pts = np.array([e.value for e in es])
        row = _row(ALL, f"threshold_holds_{which}", target=UNSTABLE_GAP,
                   value=float(np.median(pts)) if pts.size else NAN,
                   note="value: median of the population thresholds; " + note, family="threshold_holds",
                   scheme_text="rule over the populations' threshold verdicts")
        row.update(verdict=v, n_seeds=sum(e.n_seeds for e in es), unit=which, n_units=str(len(es)) + " populations",
                   correction="intersection-union for PASS (no correction needed); FAIL reads Holm-corrected verdicts")
        rows.append(row)
        v, note = threshold_stable(es)
        row = _row(ALL, f"threshold_stable_{which}", target=STABLE_RANGE, value=float(np.ptp(pts)) if pts.size else NAN,
                   note="value: range of the population thresholds; " + note, family="threshold_stable",
                   scheme_text="rule over the populations' threshold intervals")
        row.update(verdict=v, n_seeds=sum(e.n_seeds for e in es), unit=which, n_units=str(len(es)) + " populations",
                   correction=f"Bonferroni-simultaneous intervals (1 - 0.05/{max(len(es), 1)}) for FAIL")
        rows.append(row)
    hs = [het["importance"], het["steering"]]
    ph = holm([h.p_value for h in hs])
    pp = holm([h.pooled_p for h in hs])
    m = sum(np.isfinite(h.p_value) for h in hs)
    for (which, key), h, a, b in zip((("importance", "consistent_importance_r"), ("steering", "consistent_steering_r")),
                                     hs, ph, pp):
        v, note = consistency_verdict(h, None if not np.isfinite(a) else float(a), None if not np.isfinite(b) else float(b))
        row = _row(ALL, key, value=h.pooled, low=h.pooled_low, high=h.pooled_high,
                   note="value: pooled r (fixed effect over populations); " + note, family="correlation_consistent",
                   scheme_text=("Fisher z; population variance = max(between-seed, within 1/(n-3)) / k; "
                                "Welch-F / chi-square heterogeneity test"))
        row.update(verdict=v, n_seeds=h.n_models, unit="heads" if which == "importance" else "layers",
                   n_units=f"{h.n_models} populations", p_fail=h.p_value, p_fail_holm=float(a),
                   p_pass=h.pooled_p, p_pass_holm=float(b),
                   correction=f"Holm over the {m} consistency tests" if m > 1 else "none needed (one test)")
        rows.append(row)
    return rows


def population_quantities(pop: Population, res: PopulationResult) -> dict[str, float]:
    """Across-seed means of the scaling quantities."""
    def mean(vals):
        v = np.array([x for x in vals if np.isfinite(x)])
        return float(v.mean()) if v.size else NAN

    gaps = [finite_gaps(md) for md in pop.members]
    t_heads = res.estimates.get("threshold_heads")
    t_layers = res.estimates.get("threshold_layers")
    r = res.estimates.get("importance_correlation")
    return {"threshold_heads": t_heads.value if t_heads else NAN, "threshold_layers": t_layers.value if t_layers else NAN,
            "min_gap": mean([float(g.min()) for g in gaps if g.size]),
            "unstable_fraction": mean([float((g <= UNSTABLE_GAP).mean()) for g in gaps if g.size]),
            "importance_correlation": r.value if r else NAN}


def scaling(run: RunData, results: dict[str, PopulationResult], per_pop: dict[str, dict[str, float]]
            ) -> tuple[list[dict], list[dict], str, dict, list[str]]:
    """(size facts, scaling rows, reason when no rows, quantities fitted, exclusions). A
    population's quantity is its across-seed mean; a threshold is fitted only over populations
    whose AUROC interval lies above 0.5 (where the gap separates at all)."""
    facts = [{"model": p.name, **{k: p.facts[k] for k in FACT_KEYS}} for p in run.populations
             if p.facts is not None and all(k in p.facts for k in FACT_KEYS)]
    names = {f["model"] for f in facts}
    excluded: list[str] = []
    quantities = {}
    for q in SCALING_QUANTITIES:
        values = {p: v[q] for p, v in per_pop.items() if p in names and np.isfinite(v[q])}
        if q in THRESHOLD_QUANTITIES:
            which = THRESHOLD_QUANTITIES[q]
            auroc = {}
            for p in values:
                pop = next(x for x in run.populations if x.name == p)
                cals = [c for c in results[p].calibrations.get(which, []) if c is not None]
                # one model: its calibration (interval and exact test); several seeds: the across-seed AUROC
                auroc[p] = cals[0] if len(pop.members) == 1 and cals else results[p].estimates.get(f"auroc_{which}")
            values, notes = restrict_to_separating(values, auroc, SCALING_QUANTITIES[q])
            excluded += notes
        quantities[q] = values
    if len(facts) < MIN_SCALING_POPULATIONS:
        return facts, [], (f"scaling fits need at least {MIN_SCALING_POPULATIONS} populations with size facts; "
                           f"this run has {len(facts)}"), quantities, excluded
    rows = scaling_table(facts, {q: v for q, v in quantities.items() if v}, bounds=BOUNDED)
    return facts, rows, "", quantities, excluded


def _info_row(level: str, population: str, model: str, measure: str, **values) -> dict:
    row = dict.fromkeys(("value", "low", "high", "null_mean", "null_p95", "corrected", "p_value", "p_holm",
                         "mc_error", "unstable_median", "stable_median"), NAN)
    row.update({"level": level, "population": population, "model": model, "measure": measure, "family": "",
                "n": 0, "n_dropped": 0, "n_strata": 0, "n_permutations": 0, "unstable_n": 0, "stable_n": 0,
                "reason": ""})
    row.update(values)
    return row


MI_HEADS = "mi_gap_restoration"
MI_LAYERS = "mi_min_gap_effect"
ENTROPY = "entropy_difference"
INFORMATION_MEASURES = {
    MI_HEADS: "MI(gap, importance) [nats]",
    MI_LAYERS: "MI(layer min gap, steering effect) [nats]",
    ENTROPY: f"spectral entropy, median unstable - stable (gap <= {UNSTABLE_GAP:g})",
}
"""Key of each information measure (``measure`` column of information.parquet) -> its label."""


def _mi_row(level, population, model, measure, x, y, strata, n_permutations, seed) -> dict:
    mi = mutual_information(x, y, n_permutations=n_permutations, seed=seed, strata=strata)
    return _info_row(level, population, model, measure, value=mi.value, null_mean=mi.null_mean,
                     null_p95=mi.null_p95, corrected=mi.corrected, p_value=mi.p_value, mc_error=mi.mc_error,
                     n=mi.n, n_dropped=mi.n_dropped, n_strata=mi.n_strata, n_permutations=mi.n_permutations,
                     reason=mi.reason)


def _stack(parts: list[tuple[str, dict[str, np.ndarray] | None]], x: str, y: str):
    parts = [(name, p) for name, p in parts if p is not None and p[x].size]
    if not parts:
        return None
    return (np.concatenate([p[x] for _, p in parts]), np.concatenate([p[y] for _, p in parts]),
            np.concatenate([np.full(p[x].size, i) for i, (_, p) in enumerate(parts)]))


def information_rows(run: RunData, results: dict[str, PopulationResult], n_permutations: int, n_resamples: int,
                     seed: int) -> list[dict]:
    """MI per model, per population (pooled over its seeds, shuffles within each seed) and over
    all models (shuffles within each model); spectral entropy of unstable vs stable heads per
    model (Mann-Whitney) and per population (across-seed estimate). p-values Holm-corrected
    within each family (measure x level)."""
    rows = []
    for measure, get, x, y in ((MI_HEADS, finite_heads, "gap", "restoration"),
                               (MI_LAYERS, finite_layers, "min_gap", "effect")):
        for md in run.models:
            d = get(md)
            if d is None:
                rows.append(_info_row("model", md.population, md.name, measure, reason="no data"))
            else:
                rows.append(_mi_row("model", md.population, md.name, measure, d[x], d[y], None, n_permutations, seed))
        for pop in run.populations:
            if len(pop.members) < 2:
                continue
            s = _stack([(md.name, get(md)) for md in pop.members], x, y)
            if s is None:
                rows.append(_info_row("population", pop.name, "", measure, reason="no data"))
            else:
                rows.append(_mi_row("population", pop.name, "", measure, *s, n_permutations, seed))
        if len(run.models) > 1:
            s = _stack([(md.name, get(md)) for md in run.models], x, y)
            if s is None:
                rows.append(_info_row(ALL, ALL, "", measure, reason="no data"))
            else:
                rows.append(_mi_row(ALL, ALL, "", measure, *s, n_permutations, seed))
    for md in run.models:
        if md.scan is None:
            rows.append(_info_row("model", md.population, md.name, ENTROPY, reason="no scan"))
            continue
        c = entropy_by_stability(md.scan["gap"], md.scan["entropy"], n_resamples=n_resamples, seed=seed)
        rows.append(_info_row("model", md.population, md.name, ENTROPY, value=c.median_diff, low=c.median_diff_low,
                              high=c.median_diff_high, p_value=c.p_value, n=c.unstable.n + c.stable.n,
                              n_dropped=c.n_dropped, unstable_n=c.unstable.n, stable_n=c.stable.n,
                              unstable_median=c.unstable.median, stable_median=c.stable.median, reason=c.reason))
    for pop in run.populations:
        if len(pop.members) < 2:
            continue
        ms = []
        for md in pop.members:
            if md.scan is not None:
                ok = np.isfinite(md.scan["gap"]) & np.isfinite(md.scan["entropy"])
                if ok.sum() >= 2:
                    ms.append(Member(md.seed, {"gap": md.scan["gap"][ok], "entropy": md.scan["entropy"][ok]}))
        if not ms:
            rows.append(_info_row("population", pop.name, "", ENTROPY, reason="no scan"))
            continue
        e = estimate(ms, entropy_difference(), n_resamples=n_resamples, seed=seed, df=df_entropy)
        results[pop.name].estimates["entropy_difference"] = e
        p2 = min(1.0, 2 * min(p_value(e, 0.0, "above"), p_value(e, 0.0, "below")))
        rows.append(_info_row("population", pop.name, "", ENTROPY, value=e.value, low=e.low, high=e.high,
                              p_value=p2, n=int(sum(e.n_units)), n_strata=e.n_seeds,
                              reason=f"mean over {e.n_seeds} seeds; {e.scheme}"))
    families: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        families.setdefault((r["measure"], r["level"]), []).append(r)
    for (measure, level), rs in families.items():
        adj = holm([r["p_value"] for r in rs])
        m = sum(np.isfinite(r["p_value"]) for r in rs)
        for r, a in zip(rs, adj):
            r["p_holm"] = float(a)
            label = INFORMATION_MEASURES[measure]
            r["family"] = f"{label.split(' [')[0].split(',')[0]} per {level}: Holm over {m}" if m else ""
    return rows


def analyse(run: RunData, *, n_resamples: int = 2000, n_permutations: int = N_PERMUTATIONS, seed: int = 0) -> Analysis:
    results = {p.name: PopulationResult() for p in run.populations}
    pop_rows = []
    for pop in run.populations:
        res = results[pop.name]
        pop_rows += head_rows(pop, res, n_resamples, seed)
        pop_rows += steer_rows(pop, res, n_resamples, seed)
        pop_rows += threshold_rows(pop, res, n_resamples, seed)
    order = list(POPULATION_METRICS)
    pop_rows.sort(key=lambda r: (order.index(r["key"]), [p.name for p in run.populations].index(r["population"])))
    _apply_holm(pop_rows)
    cal = {}
    for pop in run.populations:
        for i, md in enumerate(pop.members):
            cal[md.name] = {w: (results[pop.name].calibrations.get(w) or [None] * len(pop.members))[i]
                            for w in ("heads", "layers")}
    for md in run.models:
        cal.setdefault(md.name, {"heads": None, "layers": None})
    cal_rows = [calibration_row(m, target, c) for m, cs in cal.items()
                for target, c in cs.items() if c is not None]
    for target in CALIBRATION_TARGETS:  # the exact AUROC tests: Holm over the models
        rs = [r for r in cal_rows if r["target"] == target]
        for r, q in zip(rs, holm([r.get("auroc_p_value", NAN) for r in rs])):
            r["auroc_p_holm"] = float(q)
    corr, studies = correlations(run, results)
    het = {w: heterogeneity(studies[w]) for w in ("importance", "steering")}
    verdicts = pop_rows + cross_rows(run, results, pop_rows, het)
    spread = {w: _spread([results[p.name].estimates[f"threshold_{w}"].value for p in run.populations
                          if f"threshold_{w}" in results[p.name].estimates]) for w in ("heads", "layers")}
    per_pop = {p.name: population_quantities(p, results[p.name]) for p in run.populations}
    facts, scaling_rows, reason, quantities, excluded = scaling(run, results, per_pop)
    info = information_rows(run, results, n_permutations, n_resamples, seed)
    return Analysis(cal, cal_rows, verdicts, corr, het, spread, per_pop, quantities, scaling_rows, reason, facts,
                    info, results, excluded)


def calibration_row(model: str, target: str, c: Calibration) -> dict:
    pop, seed = population_of(model)
    row = {"model": model, "population": pop, "seed": seed, "target": target,
           "rule": IMPORTANCE_RULE if target == "heads" else STEERABLE_RULE}
    row.update(asdict(c))
    return row


def _key(text: str) -> str:
    """A name MLflow accepts (alphanumerics, _ - . space / :)."""
    return "".join(ch if ch.isalnum() or ch in "_-./: " else "_" for ch in text).strip()


def cell_metrics(run: RunData, a: Analysis) -> dict[str, dict[str, float | None]]:
    """Per cell (its name, ``cluster.layout.Cell.name``) the calibrated threshold of its model
    (``calibrated_threshold/value|low|high``) and the AUROC behind it (``calibration_auroc/...``):
    important heads on the cell the heads were read from (validate, else patch), steerable
    layers on the steer cell. Every model's cell carries the same keys, so MLflow's compare view
    lines the thresholds of the models up; an undefined value is None (MLflow gets NaN)."""
    out: dict[str, dict[str, float | None]] = {}
    cells = {md.name: {"heads": md.heads_cell, "layers": md.cells["steer"].path if "steer" in md.cells else None}
             for md in run.models}
    for r in a.calibration_rows:
        cell = cells.get(r["model"], {}).get(r["target"])
        if cell is None:
            continue
        values = {f"calibrated_threshold/{k}": r[f"threshold{s}"] for k, s in (("value", ""), ("low", "_low"),
                                                                               ("high", "_high"))}
        values.update({f"calibration_auroc/{k}": r[f"auroc{s}"] for k, s in (("value", ""), ("low", "_low"),
                                                                             ("high", "_high"))})
        out[Path(cell).relative_to(run.run_dir).as_posix()] = {
            k: float(v) if v is not None and np.isfinite(v) else None for k, v in values.items()}
    return out


def summary(run: RunData, a: Analysis) -> dict:
    """summary.json: flat finite metrics (keys of identifiers only: model specs, population names,
    verdict and quantity keys), flat verdicts (population/key), verdict details (n seeds, units,
    scheme, correction), the calibrated thresholds per cell (``cell_metrics``), populations,
    missing, excluded counts."""
    metrics: dict[str, float] = {}
    for r in a.calibration_rows:
        for k in ("threshold", "threshold_low", "threshold_high", "auroc", "auroc_low", "auroc_high", "j_at_reference"):
            metrics[f"{r['model']}/calibration_{r['target']}/{k}"] = r[k]
    for r in a.verdicts:
        for k in ("value", "low", "high", "same_sign", "p_pass_holm", "p_fail_holm"):
            metrics[f"{r['population']}/{r['key']}/{k}"] = r[k]
        for k in ("hier_low", "hier_high"):  # beside the verdict interval, where computed (>= 2 seeds)
            if np.isfinite(r.get(k, NAN)):
                metrics[f"{r['population']}/{r['key']}/{k}"] = r[k]
    for p, values in a.per_population.items():
        for quantity, v in values.items():
            metrics[f"{p}/scaling/{quantity}"] = v
    for which, s in a.spread.items():
        for k in ("sd", "range", "mean"):
            metrics[f"{ALL}/threshold_{which}/{k}"] = s[k]
    for which, h in a.heterogeneity.items():
        for k in ("q", "p_value", "i2", "pooled", "pooled_p"):
            metrics[f"{ALL}/heterogeneity_{which}_r/{k}"] = getattr(h, k)
    for r in a.information_rows:  # a population and its seed-0 model share a name: the level tells them apart
        who = r["model"] or r["population"]
        measure = r["measure"] + ("_over_seeds" if r["level"] == "population" else "")
        for k in ("value", "corrected", "p_value", "p_holm", "low", "high"):
            metrics[f"{who}/{measure}/{k}"] = r[k]
    finite = {_key(k): float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)}
    details = {_key(f"{r['population']}/{r['key']}"): {
        k: r[k] for k in ("metric", "verdict", "n_seeds", "seeds", "unit", "n_units", "groups", "scheme", "correction",
                          "family", "prompts")} for r in a.verdicts}
    return {"run_id": run.run_id, "rule": RULE, "metrics": finite,
            "undefined_metrics": sorted(_key(k) for k, v in metrics.items() if v is None or not np.isfinite(v)),
            "verdicts": {_key(f"{r['population']}/{r['key']}"): r["verdict"] for r in a.verdicts},
            "verdict_details": details, "cell_metrics": cell_metrics(run, a),
            "populations": {p.name: {"seeds": [m.seed for m in p.members], "models": [m.name for m in p.members],
                                     "listed": p.listed} for p in run.populations},
            "models": [md.name for md in run.models], "missing": run.missing,
            "excluded_non_finite": {md.name: md.excluded for md in run.models},
            "scaling": a.scaling_reason or f"fitted over {len(a.scaling_models)} populations (exploratory)",
            "scaling_excluded": a.scaling_excluded}
