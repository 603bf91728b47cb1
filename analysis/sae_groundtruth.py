"""Do SAE features recover the organisms' planted variables better than random directions? The
verdict across the training seeds of an organism population (issue 16, point 5).

Input per seed (``SeedRecovery``): the rows ``spectral.saes.groundtruth.recovery`` gave for that
seed's model (``spectral.tables.SAE_RECOVERY`` columns, as dicts). Only the ``scope ==
"variable"`` rows are read (IOI: the mean over names; sentiment: positive vs negative).

Per seed and variable (``seed_rows``): among the seed's SAEs (all, or only per-head or only
per-layer ones: ``kind``), the one whose best feature scored highest on the *selection* prompts
(``auroc_selection``; ties: the first name in sorted order), and its evaluation-part difference
``auroc - random_auroc`` (best feature minus the mean over draws of the best random direction,
both chosen on the selection prompts and scored on the evaluation prompts). The SAE is chosen
the way the feature is, without the scored prompts: choosing it by its evaluation AUROC would
bias the difference upward, which the null simulation in ``tests/test_sae_groundtruth.py``
shows.

Across the seeds (the replicates): the mean difference with the t-interval ``mean ± t(k-1) x
SD / sqrt(k)`` over the seeds with a value (``analysis.population.across_seeds``) and one-sided
t p-values of "> 0" and "< 0".

Verdict ``VERDICT_KEY`` per (population, variable), ``RULE``: PASS / FAIL by
``analysis.stats.decide_claims`` at one-sided 0.025 after Holm across every (population,
variable) claim of the call (the PASS and FAIL claims each), else INCONCLUSIVE (also with fewer
than 2 seeds with a value). The null simulation in the tests bounds the PASS rate by 2.5 %.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from analysis.population import across_seeds, holm, one_sided_t
from analysis.stats import decide_claims
from spectral.errors import UsageError

NAN = float("nan")
CONFIDENCE = 0.95
VERDICT_KEY = "sae_features_beat_random"
Kind = Literal["all", "head", "layer"]
KINDS: tuple[str, ...] = ("all", "head", "layer")
NEEDED = ("sae", "kind", "variable", "scope", "auroc_selection", "auroc", "auroc_low", "auroc_high", "random_auroc",
          "random_sd", "difference")
"""SAE_RECOVERY columns this module reads."""

RULE = (f"{VERDICT_KEY}: per population and planted variable, claim 'the best SAE feature recovers the variable "
        "better than the best random direction' (AUROC, both chosen on the selection prompts, scored on the "
        "evaluation prompts); per seed the difference best-feature AUROC - mean best-random AUROC of the SAE whose "
        "feature scored highest on the selection prompts; across seeds the mean with a t-interval (mean ± t(k-1) x "
        "SD/sqrt(k)); one-sided t p-values for '> 0' (PASS) and '< 0' (FAIL), Holm across every (population, "
        "variable) claim for each; PASS / FAIL when the adjusted p < 0.025, else INCONCLUSIVE (also with fewer "
        "than 2 seeds with a value).")

SEED_COLUMNS = ("model", "population", "seed", "variable", "kind", "sae", "n_saes", "auroc_selection", "auroc",
                "auroc_low", "auroc_high", "random_auroc", "random_sd", "difference", "note")
"""Keys of ``GroundTruthVerdicts.seeds`` rows: per seed and variable, the chosen SAE's variable row."""
VERDICT_COLUMNS = ("key", "population", "variable", "kind", "rule", "value", "low", "high", "se", "df", "auroc",
                   "random_auroc", "p_pass", "p_fail", "p_pass_holm", "p_fail_holm", "verdict", "n_seeds", "k",
                   "per_seed", "scheme", "correction", "note")
"""Keys of ``GroundTruthVerdicts.verdicts`` rows. ``value``/``low``/``high``: the mean difference
and its interval; ``auroc``, ``random_auroc``: the seeds' means of the two terms."""


@dataclass(frozen=True)
class SeedRecovery:
    """One training seed of a population and its ground-truth rows."""

    model: str
    population: str
    seed: int | None
    rows: Sequence[Mapping]
    """``spectral.tables.SAE_RECOVERY`` rows (``RecoveryRow.as_dict()`` or read from Parquet)."""

    def __post_init__(self):
        for i, row in enumerate(self.rows):
            missing = [c for c in NEEDED if c not in row]
            if missing:
                raise UsageError(f"model {self.model!r}: recovery row {i} lacks column {missing[0]!r}")


@dataclass
class GroundTruthVerdicts:
    seeds: list[dict]
    """Per seed and variable (``SEED_COLUMNS``)."""
    verdicts: list[dict]
    """Per population and variable (``VERDICT_COLUMNS``)."""


def _of_kind(row: Mapping, kind: str) -> bool:
    return kind == "all" or row["kind"] == kind


def seed_rows(s: SeedRecovery, kind: Kind = "all") -> list[dict]:
    """Per variable of the seed, the SAE chosen on the selection prompts and its evaluation
    difference (``SEED_COLUMNS``)."""
    by_variable: dict[str, list[Mapping]] = {}
    for r in s.rows:
        if r["scope"] == "variable" and _of_kind(r, kind):
            by_variable.setdefault(r["variable"], []).append(r)
    out = []
    for variable, rs in by_variable.items():
        usable = sorted((r for r in rs if np.isfinite(r["auroc_selection"]) and np.isfinite(r["difference"])),
                        key=lambda r: r["sae"])
        row = dict(model=s.model, population=s.population, seed=s.seed, variable=variable, kind=kind, sae="",
                   n_saes=len(rs), auroc_selection=NAN, auroc=NAN, auroc_low=NAN, auroc_high=NAN, random_auroc=NAN,
                   random_sd=NAN, difference=NAN, note="" if usable else "no SAE with a finite score")
        if usable:
            best = max(usable, key=lambda r: r["auroc_selection"])  # max keeps the first of equals
            row.update({c: best[c] for c in ("sae", "auroc_selection", "auroc", "auroc_low", "auroc_high",
                                             "random_auroc", "random_sd", "difference")})
        out.append(row)
    return out


def _seed_mean(rs: Sequence[dict], key: str) -> float:
    v = np.array([r[key] for r in rs], dtype=float)
    return float(v[np.isfinite(v)].mean()) if np.isfinite(v).any() else NAN


def population_row(population: str, variable: str, kind: str, rs: Sequence[dict]) -> dict:
    """The across-seed estimate of one (population, variable) (``VERDICT_COLUMNS``, before Holm)."""
    value, low, high, se, df, k = across_seeds([r["difference"] for r in rs], False, CONFIDENCE)
    p_pass, p_fail = one_sided_t(value, se, df)
    return dict(
        key=VERDICT_KEY, population=population, variable=variable, kind=kind, rule=RULE, value=value, low=low,
        high=high, se=se, df=df, auroc=_seed_mean(rs, "auroc"), random_auroc=_seed_mean(rs, "random_auroc"),
        p_pass=p_pass, p_fail=p_fail, p_pass_holm=NAN, p_fail_holm=NAN, verdict="", n_seeds=len(rs), k=k,
        per_seed="; ".join(f"{r['model']}: {r['sae'] or '-'} {r['auroc']:.3f} vs {r['random_auroc']:.3f}"
                           for r in rs),
        scheme=(f"{len(rs)} seeds: mean ± t(k-1) x SD/sqrt(k) over the seeds with a value; per seed the SAE chosen "
                "on the selection prompts, its difference on the evaluation prompts"),
        correction="", note=f"{k} of {len(rs)} seeds with a value" if k < len(rs) else "")


def verdicts(seeds: Sequence[SeedRecovery], *, kind: Kind = "all") -> GroundTruthVerdicts:
    """Per seed the chosen SAE's difference, per (population, variable) the verdict, Holm across
    all of them."""
    if not seeds:
        raise UsageError("the SAE ground-truth verdict needs at least one seed")
    if kind not in KINDS:
        raise UsageError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    per_seed = [r for s in seeds for r in seed_rows(s, kind)]
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in per_seed:
        cells.setdefault((r["population"], r["variable"]), []).append(r)
    rows = [population_row(pop, var, kind, rs) for (pop, var), rs in cells.items()]
    m = sum(math.isfinite(r["p_pass"]) for r in rows)
    for r, a, b in zip(rows, holm([r["p_pass"] for r in rows]), holm([r["p_fail"] for r in rows])):
        r.update(p_pass_holm=float(a), p_fail_holm=float(b), verdict=decide_claims(a, b),
                 correction=f"Holm over {m} (population, variable) claim(s), PASS and FAIL each; one-sided at 0.025")
    return GroundTruthVerdicts([{c: r[c] for c in SEED_COLUMNS} for r in per_seed],
                               [{c: r[c] for c in VERDICT_COLUMNS} for r in rows])
