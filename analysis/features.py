"""Held-out prediction from per-unit features (issue 15, point 3): does any spectral feature
predict which heads matter (exact restoration) or which layers steer (effect at the matched KL
budget) on models it was never chosen on, better than the best non-spectral baseline?

Inputs (``Units``, one per model): a value per unit (head, or layer) for every feature and the
unit's target. Heads: the feature table's columns (``spectral.features.names``), target the
head's restoration (``head_units``). Layers: each head feature aggregated over the layer's heads
by min and by mean (``"min:key_raw.gap"``, ``"mean:key_raw.gap"``: the weakest-link hypothesis
asks for the min), target the layer's steering effect (``layer_units``).

Hold-out (``evaluate``)
-----------------------
Models are grouped by a column of ``Units.groups`` (``hold_out``: ``"population"`` by default,
i.e. leave-one-organism-out; any other column, e.g. ``"family"`` for Pythia vs Llama). For each
held-out group every choice is made on the OTHER groups' models only:

- a feature's direction: the sign of its mean per-model Spearman with the target on the
  training models (so a feature is never flipped on the test data);
- the best spectral and the best baseline feature: largest |mean training Spearman| among the
  features with a value on every training model;
- the small models: up to ``MAX_FEATURES`` features chosen by forward selection (least training
  residual sum of squares), then ridge regression (``RIDGE_ALPHA``, no intercept) of the target's
  within-model centred rank on the features' within-model centred ranks, pooled over the training
  models; one model from spectral features, one from baseline features.

Held-out scores: per held-out model, the Spearman correlation over its units of the oriented
feature (or the model's prediction) with the target; per group the mean over its models; over
groups the mean of the group means. AUROC: per held-out model, of the oriented feature for the
positive class (``IMPORTANT_RULE`` for heads, ``STEERABLE_RULE`` for layers), averaged the same
way. A per-model Spearman needs ``MIN_UNITS`` units: a model with fewer (organism-xs and -s have
2 and 3 layers) is left out of that target, and said so in the notes.

Intervals, p-values, verdicts
-----------------------------
The folds share training data (fold p's choices read the models that fold q tests on), so the
held-out scores of different folds are positively correlated: a t-interval over the 4 held-out
populations PASSed 33 / 500 (6.6 %) null simulations at a nominal 2.5 % (an earlier draft), and
a t-interval over the held-out seeds with the choices held fixed 23 / 400 (5.8 %, a prototype). Here the WHOLE
procedure, choices and fits included, is rerun on each of ``N_RESAMPLES`` bootstrap resamples of
the models (``analysis.heldout``): ``replicate="model"`` resamples the models (seeds) within each
held-out group, the groups fixed (a claim about these groups); ``replicate="group"`` resamples
whole groups (for hold-outs of one model per group, e.g. leave-one-model-out). A model's
Spearman already carries the noise of which heads it has, so heads are not resampled again
inside it (that counts their noise twice: ``analysis.population``'s hierarchical interval, 0-0.1 %
PASS at a nominal 2.5 %). Interval ``value ± t(df) x SE x sqrt(n/(n-1))``, one-sided p-values from
the same t; ``analysis.stats.decide_claims``: PASS when p("spectral > baseline") < 0.025, FAIL
when p("spectral < baseline") < 0.025, else INCONCLUSIVE (also with fewer than 2 groups, or a
held-out group of one model under ``replicate="model"``). The verdict rows compare one chosen
feature (or model) per fold, chosen inside the resampled procedure: no correction across
features applies.

Per-feature rows: the held-out Spearman and AUROC with the same bootstrap interval; the p-value
of "held-out Spearman > 0" (and "AUROC > 0.5") is a permutation p (``heldout.permutation_p``:
each model's target permuted across its units, the whole single-feature procedure rerun; exact
when the feature is independent of the target), Holm-adjusted over the target's features. The
bootstrap's t-approximation holds at 0.025 but is not guaranteed in the far tail Holm reads (p <
0.025 / F): in the 1,000 null simulations below it gave 34 families with a significant feature
(3.4 %, exact binomial p = 0.045 against 2.5 %), the permutation p 28 (2.8 %, p = 0.30).

Null simulations (populations as the organisms: 4 x 5 seeds, 16/12/32/48 heads; 8 spectral and 4
baseline features; 1,000 simulations, 400 resamples, 2,000 permutations; nominal 2.5 % each):

=============================================  ==========  ===========  ===============
null                                           feature     small model  any feature
                                               PASS/FAIL   PASS/FAIL    significant
=============================================  ==========  ===========  ===============
(i) every feature independent of importance    0 / 0       6 / 5        28
(ii) one spectral = one baseline = z + N(0,1)  23 / 24     16 / 22      (all: informative)
(ii') every feature = z + N(0, 1)              0 / 3       6 / 4        (all)
=============================================  ==========  ===========  ===============

Power (spectral z + N(0, 1) against baseline z + N(0, 2), 4 x 5 seeds as above): the feature
verdict PASSed 993 and the small model 985 of 1,000. Leave-one-model-out (``replicate="group"``, 6
models of 32-64 heads, one per group): (i) feature 1 / 2, model 4 / 5, any feature significant 24;
(ii) feature 28 / 25 (2.8 %: within Monte Carlo error of 2.5 %, exact binomial p = 0.30), model
13 / 16; power 785 and 707 of 1,000. ``tests/test_feature_prediction.py`` repeats smaller versions
with an exact binomial bound.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from analysis import heldout
from analysis.calibration import IMPORTANCE_RULE, important, steerable
from analysis.heldout import ALPHA, Data, Run, procedure, summaries, t_interval, replicates
from analysis.population import holm
from analysis.stats import decide_claims
from spectral.errors import UsageError
from spectral.features.names import all_features, check_feature, is_spectral

NAN = float("nan")
IMPORTANCE, STEERING = "importance", "steering"
TARGET_OF_UNIT = {"head": IMPORTANCE, "layer": STEERING}
AGGREGATES = ("min", "mean")
"""How a head feature becomes a layer feature: ``"<aggregate>:<feature>"`` over the layer's heads."""
MAX_FEATURES = 3
RIDGE_ALPHA = 1.0
"""Ridge penalty on within-model centred ranks (scaled to [-0.5, 0.5]) pooled over training models."""
MIN_UNITS = 4
"""Units (heads or layers) a model needs for its per-model Spearman; fewer: left out of the target."""
N_RESAMPLES = 1000
N_PERMUTATIONS = 10_000
"""Permutations of the per-feature test: Holm over F features needs p < 0.025 / F, and a
permutation p is at least 1 / (1 + N_PERMUTATIONS) (10,000: up to 250 features can reach it)."""
CHUNK_CELLS = 2_000_000
"""Resamples run at once: at most this many cells of the resampled Gram matrices (b x F x F)."""
IMPORTANT_RULE = f"important head: {IMPORTANCE_RULE} (analysis.calibration.important)"
STEERABLE_RULE = ("steerable layer: its steering effect at the matched budget is >= the median effect over the "
                  "model's layers (the upper half; analysis.calibration.steerable without lower bounds)")
FEATURE_VERDICT = "spectral_feature_beats_baseline"
MODEL_VERDICT = "spectral_model_beats_baseline_model"
VERDICT_KEYS = (FEATURE_VERDICT, MODEL_VERDICT)

VERDICT_COLUMNS = ("key", "target", "hold_out", "replicate", "rule", "value", "low", "high", "p_pass", "p_fail",
                   "verdict", "n_groups", "n_models", "per_group", "correction", "note")
"""Keys of ``Prediction.verdicts`` rows, in order (str, or float for value..p_fail, int for n_*)."""
FEATURE_COLUMNS = ("feature", "group", "target", "hold_out", "spearman", "spearman_low", "spearman_high", "p_value",
                   "p_holm", "significant", "auroc", "auroc_low", "auroc_high", "auroc_p_value", "auroc_p_holm",
                   "positive_class", "direction", "n_groups", "n_models", "correction", "note")
"""Keys of ``Prediction.features`` rows (``significant``: bool; n_*: int; numbers: float)."""
FOLD_COLUMNS = ("target", "hold_out", "held_out", "n_train_models", "n_test_models",
                *(f"best_{k}{x}" for k in ("spectral", "baseline") for x in ("", "_sign", "_train", "_test")),
                *(f"{k}_model{x}" for k in ("spectral", "baseline") for x in ("", "_coefficients", "_test")))
"""Keys of ``Prediction.folds`` rows: per held-out group, the choices made on the other groups
(``best_*``: feature name, sign (int, 0: none), oriented training and held-out Spearman;
``*_model``: comma-joined features, comma-joined coefficients, held-out Spearman)."""


# --- inputs ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Units:
    """One model's units (heads or layers) as the evaluation reads them."""

    model: str
    groups: Mapping[str, str]
    """Hold-out columns -> this model's value, e.g. {"population": "organism-s", "family": "organism"}."""
    seed: int | None
    unit: str
    """"head" (target: restoration) or "layer" (target: steering effect)."""
    features: Mapping[str, np.ndarray]
    """Feature name -> (n,) values (NaN where undefined)."""
    target: np.ndarray
    """(n,) restoration or steering effect, finite."""
    note: str = ""
    """Units dropped while building, and why."""

    @property
    def positive(self) -> np.ndarray:
        """(n,) the positive class: important heads or steerable layers."""
        return important(self.target) if self.unit == "head" else steerable(self.target)


def _table(x, what: str) -> pa.Table:
    if isinstance(x, pa.Table):
        return x
    try:
        return pa.table(x)
    except (TypeError, ValueError, pa.ArrowException) as e:
        raise UsageError(f"{what}: not a table ({type(x).__name__}): {e}") from None


def _require(t: pa.Table, names: Sequence[str], what: str) -> None:
    missing = [n for n in names if n not in t.column_names]
    if missing:
        raise UsageError(f"{what} lacks column(s) {', '.join(map(repr, missing[:5]))}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def _one_model(t: pa.Table, what: str) -> str:
    models = sorted(set(t.column("model").to_pylist()))
    if len(models) != 1:
        raise UsageError(f"{what} must hold one model, found {len(models)}: {', '.join(models[:3])}")
    return models[0]


def _names(names: Sequence[str] | None) -> list[str]:
    return [check_feature(n) for n in (all_features() if names is None else names)]


def head_units(features, heads, *, groups: Mapping[str, str], seed: int | None = None,
               names: Sequence[str] | None = None) -> Units:
    """One model's heads: ``features`` (features.parquet rows of one model: model, layer, head and
    the feature columns ``names``, all features by default) joined on (layer, head) with
    ``heads`` (validate_heads.parquet: layer, head, restoration). Heads without a finite
    restoration are dropped and counted in ``note``."""
    ft, ht = _table(features, "features table"), _table(heads, "heads table")
    names = _names(names)
    _require(ft, ("model", "layer", "head", *names), "features table")
    _require(ht, ("layer", "head", "restoration"), "heads table")
    model = _one_model(ft, "features table")
    restoration = {(int(a), int(b)): float(r) for a, b, r in zip(
        ht.column("layer").to_pylist(), ht.column("head").to_pylist(), ht.column("restoration").to_pylist())}
    keys = list(zip(ft.column("layer").to_pylist(), ft.column("head").to_pylist()))
    y = np.array([restoration.get((int(a), int(b)), NAN) for a, b in keys], dtype=float)
    keep = np.isfinite(y)
    unmeasured = sum((int(a), int(b)) not in restoration for a, b in keys)
    note = (f"{int((~keep).sum())} of {len(keys)} heads dropped (no finite restoration"
            + (f"; {unmeasured} not in the heads table" if unmeasured else "") + ")") if not keep.all() else ""
    cols = {n: np.asarray(ft.column(n).to_numpy(zero_copy_only=False), dtype=float)[keep] for n in names}
    return Units(model, dict(groups), seed, "head", cols, y[keep], note)


def layer_feature(aggregate: str, name: str) -> str:
    """The name of a layer feature: ``"min:key_raw.gap"``."""
    if aggregate not in AGGREGATES:
        raise UsageError(f"unknown aggregate {aggregate!r} (one of {', '.join(AGGREGATES)})")
    return f"{aggregate}:{check_feature(name)}"


def layer_units(features, layers, *, groups: Mapping[str, str], seed: int | None = None,
                names: Sequence[str] | None = None) -> Units:
    """One model's layers: every head feature of ``features`` (as ``head_units``) aggregated over
    the layer's heads by min and by mean (over heads with a finite value; NaN when none), joined
    on ``layer`` with ``layers`` (steer_layers.parquet: layer, effect at the matched budget).
    Layers without a finite effect are dropped and counted in ``note``."""
    ft, lt = _table(features, "features table"), _table(layers, "steering layers table")
    names = _names(names)
    _require(ft, ("model", "layer", "head", *names), "features table")
    _require(lt, ("layer", "effect"), "steering layers table")
    model = _one_model(ft, "features table")
    effect = dict(zip((int(x) for x in lt.column("layer").to_pylist()),
                      (float(x) for x in lt.column("effect").to_pylist())))
    head_layer = np.asarray(ft.column("layer").to_numpy(zero_copy_only=False))
    ids = np.unique(head_layer)
    y = np.array([effect.get(int(k), NAN) for k in ids], dtype=float)
    keep = np.isfinite(y)
    cols: dict[str, np.ndarray] = {}
    for n in names:
        v = np.asarray(ft.column(n).to_numpy(zero_copy_only=False), dtype=float)
        per = [v[(head_layer == k) & np.isfinite(v)] for k in ids[keep]]
        cols[f"min:{n}"] = np.array([p.min() if p.size else NAN for p in per])
        cols[f"mean:{n}"] = np.array([p.mean() if p.size else NAN for p in per])
    note = f"{int((~keep).sum())} of {ids.size} layers dropped (no finite steering effect)" if not keep.all() else ""
    return Units(model, dict(groups), seed, "layer", cols, y[keep], note)


def spectral_name(name: str) -> bool:
    """A (head or layer) feature is spectral: its head feature is ``<kernel>.<metric>``."""
    return is_spectral(name.split(":", 1)[1] if ":" in name else name)


def rule(target: str, hold_out: str, replicate: str, n_resamples: int, max_features: int, alpha: float) -> str:
    """The verdict rule in words, printed in every verdict row."""
    rep = ("models resampled within each held-out group (the groups fixed: a claim about these groups); n = fewest "
           "models of a held-out group, df = sum(n_g - 1)" if replicate == "model" else
           "whole groups resampled (a claim about groups like these); n = groups, df = groups - 1")
    return (f"Leave-one-{hold_out}-out on {target}: for each held-out {hold_out}, every choice (each feature's "
            f"direction = sign of its mean per-model Spearman on the other {hold_out}s; the best spectral and the "
            "best baseline feature = largest |mean training Spearman|; the small models = forward selection of <= "
            f"{max_features} features by training RSS + ridge (alpha {alpha:g}) on within-model centred ranks, "
            f"one spectral, one baseline) is made on the other {hold_out}s' models only. Statistic: mean over "
            "held-out groups of the group's mean held-out Spearman of the spectral choice minus that of the baseline "
            f"choice. Interval: the whole procedure, choices and fits included, rerun on {n_resamples} bootstrap "
            f"resamples, {rep}; value ± t(df) x SE x sqrt(n/(n-1)). PASS when the one-sided p of 'difference > 0' "
            "< 0.025 (the interval's low end > 0), FAIL when that of 'difference < 0' < 0.025, else INCONCLUSIVE.")


VERDICT_CORRECTION = ("none across features: one spectral and one baseline choice per fold, made on the training "
                      "groups and part of the resampled procedure; one-sided tests at 0.025")


@dataclass
class Prediction:
    """The held-out evaluation of one target: plain rows (str/float/int/bool values) for Parquet."""

    verdicts: list[dict]
    """One row per verdict key (``VERDICT_KEYS``): key, target, hold_out, replicate, rule, value,
    low, high, p_pass, p_fail, verdict, n_groups, n_models, per_group, correction, note."""
    features: list[dict]
    """One row per feature: feature, group, target, hold_out, spearman (+ _low, _high), p_value,
    p_holm, significant, auroc (+ _low, _high), auroc_p_value, auroc_p_holm, positive_class,
    direction, n_groups, n_models, correction, note."""
    folds: list[dict]
    """One row per held-out group: its choices (made on the other groups) and held-out scores."""
    excluded: list[str]
    """Models left out of the target (too few units) and units dropped while building them."""


def _check(units: Sequence[Units], hold_out: str, replicate: str) -> list[str]:
    if not units:
        raise UsageError("evaluate needs at least one model")
    if replicate not in ("model", "group"):
        raise UsageError(f"replicate must be 'model' or 'group', got {replicate!r}")
    kinds = {u.unit for u in units}
    if len(kinds) != 1 or not kinds <= set(TARGET_OF_UNIT):
        raise UsageError(f"evaluate needs units of one kind (head or layer), got {', '.join(sorted(kinds))}")
    names = list(units[0].features)
    for u in units:
        if hold_out not in u.groups:
            raise UsageError(f"model {u.model!r} has no hold-out column {hold_out!r} (has: {', '.join(u.groups)})")
        if list(u.features) != names:
            odd = next(iter(set(u.features) ^ set(names)), "order")
            raise UsageError(f"model {u.model!r} has other features than {units[0].model!r} ({odd!r})")
        bad = [n for n in names if np.asarray(u.features[n]).shape != np.asarray(u.target).shape]
        if bad:
            raise UsageError(f"model {u.model!r}: feature {bad[0]!r} has not one value per unit")
        if not np.isfinite(np.asarray(u.target, dtype=float)).all():
            raise UsageError(f"model {u.model!r}: the target has non-finite values (drop those units first)")
    spectral = [n for n in names if spectral_name(n)]
    if not spectral or len(spectral) == len(names):
        raise UsageError("evaluate needs at least one spectral and one baseline feature")
    return names


def _ordered(row: dict, columns: tuple[str, ...]) -> dict:
    if set(row) != set(columns):
        raise AssertionError(f"row keys {sorted(set(row) ^ set(columns))} differ from the declared columns")
    return {k: row[k] for k in columns}


def _fmt(v: float) -> str:
    return f"{v:.3g}" if np.isfinite(v) else "NaN"


def _empty(names: list[str], target: str, hold_out: str, replicate: str, rule_text: str, reason: str,
           n_models: int, excluded: list[str]) -> Prediction:
    verdicts = [dict(key=k, target=target, hold_out=hold_out, replicate=replicate, rule=rule_text, value=NAN,
                     low=NAN, high=NAN, p_pass=NAN, p_fail=NAN, verdict="INCONCLUSIVE", n_groups=0, n_models=n_models,
                     per_group="", correction=VERDICT_CORRECTION, note=reason) for k in VERDICT_KEYS]
    rows = [dict(feature=n, group="spectral" if spectral_name(n) else "baseline", target=target, hold_out=hold_out,
                 spearman=NAN, spearman_low=NAN, spearman_high=NAN, p_value=NAN, p_holm=NAN, significant=False,
                 auroc=NAN, auroc_low=NAN, auroc_high=NAN, auroc_p_value=NAN, auroc_p_holm=NAN,
                 positive_class=IMPORTANT_RULE if target == IMPORTANCE else STEERABLE_RULE, direction="",
                 n_groups=0, n_models=n_models, correction="no test (undefined)", note=reason) for n in names]
    return Prediction([_ordered(r, VERDICT_COLUMNS) for r in verdicts], [_ordered(r, FEATURE_COLUMNS) for r in rows],
                      [], excluded)


def evaluate(units: Sequence[Units], *, hold_out: str = "population", replicate: str = "model",
             n_resamples: int = N_RESAMPLES, n_permutations: int = N_PERMUTATIONS, seed: int = 0,
             max_features: int = MAX_FEATURES, ridge_alpha: float = RIDGE_ALPHA, min_units: int = MIN_UNITS
             ) -> Prediction:
    """The held-out evaluation of one target (importance for head units, steering for layer
    units; module docstring). ``hold_out``: the ``Units.groups`` column whose values are held out
    one at a time; ``replicate``: what the bootstrap resamples ("model": models within each
    held-out group; "group": whole groups)."""
    names = _check(units, hold_out, replicate)
    target = TARGET_OF_UNIT[units[0].unit]
    rule_text = rule(target, hold_out, replicate, n_resamples, max_features, ridge_alpha)
    excluded = [f"{u.model}: {u.note}" for u in units if u.note]
    kept = []
    for u in units:
        if u.target.size < min_units:
            excluded.append(f"{u.model} ({hold_out} {u.groups[hold_out]}): {u.target.size} {u.unit}s < {min_units}, "
                            f"left out of {target} (a Spearman over so few {u.unit}s is not informative)")
        else:
            kept.append(u)
    groups = list(dict.fromkeys(u.groups[hold_out] for u in kept))
    if len(groups) < 2:
        return _empty(names, target, hold_out, replicate, rule_text,
                      f"{len(groups)} {hold_out}(s) with models of >= {min_units} {units[0].unit}s: nothing to hold "
                      "out against (no verdict)" + (f"; left out: {'; '.join(excluded)}" if excluded else ""),
                      len(kept), excluded)
    d = heldout.prepare(names, np.array([spectral_name(n) for n in names]), [u.groups[hold_out] for u in kept],
                        [np.column_stack([np.asarray(u.features[n], dtype=float) for n in names]) for u in kept],
                        [np.asarray(u.target, dtype=float) for u in kept], [u.positive for u in kept])
    point = procedure(d, np.ones((1, len(kept))), np.ones((1, len(groups))), max_features, ridge_alpha)
    observed = {k: v[0] for k, v in summaries(point).items()}
    rng = np.random.default_rng(seed)
    boot = _bootstrap(d, rng, n_resamples, replicate, max_features, ridge_alpha)
    p_values = heldout.permutation_p(d, rng, n_permutations)
    ctx = dict(target=target, hold_out=hold_out, note="; ".join(excluded))
    verdicts = _verdict_rows(d, point, observed, boot, replicate, rule_text, ctx)
    features = _feature_rows(d, point, observed, boot, p_values, replicate, ctx)
    return Prediction([_ordered(r, VERDICT_COLUMNS) for r in verdicts],
                      [_ordered(r, FEATURE_COLUMNS) for r in features],
                      [_ordered(r, FOLD_COLUMNS) for r in _fold_rows(d, point, ctx)], excluded)


def _bootstrap(d: Data, rng: np.random.Generator, n_resamples: int, replicate: str, k: int, alpha: float
               ) -> dict[str, np.ndarray]:
    """``summaries`` of the whole procedure on ``n_resamples`` bootstrap resamples, run in chunks."""
    step = max(1, CHUNK_CELLS // max(g.shape[1] ** 2 for g in d.gram.values()))
    chunks = [summaries(procedure(d, *heldout.bootstrap_weights(d, rng, min(step, n_resamples - s), replicate), k,
                                  alpha)) for s in range(0, n_resamples, step)]
    return {key: np.concatenate([c[key] for c in chunks]) for key in chunks[0]}


def _verdict_rows(d: Data, point: Run, observed: dict, boot: dict, replicate: str, rule_text: str,
                  ctx: dict) -> list[dict]:
    rows = []
    for key, stat in ((FEATURE_VERDICT, heldout.FEATURE), (MODEL_VERDICT, heldout.MODEL)):
        if key == FEATURE_VERDICT:
            bs, bb = point.best["spectral"][0], point.best["baseline"][0]
            finite = np.zeros(d.group.size, dtype=bool)
            for g in range(len(d.labels)):
                if bs[g] >= 0 and bb[g] >= 0:
                    finite |= (d.group == g) & np.isfinite(d.rho[:, bs[g]]) & np.isfinite(d.rho[:, bb[g]])
        else:
            finite = np.ones(d.group.size, dtype=bool)
        n, df, why = replicates(d, finite, replicate)
        value = float(observed[stat])
        low, high, p_pass, p_fail = t_interval(value, boot[stat], n, df)
        if not why and not np.isfinite(low):
            why = "undefined on the data or on more than half the resamples"
        per_group = observed[f"{stat}:groups"]
        rows.append(dict(
            key=key, target=ctx["target"], hold_out=ctx["hold_out"], replicate=replicate, rule=rule_text,
            value=value, low=low, high=high, p_pass=p_pass, p_fail=p_fail,
            verdict=decide_claims(p_pass, p_fail) if not why else "INCONCLUSIVE",
            n_groups=int(np.isfinite(per_group).sum()), n_models=int(finite.sum()),
            per_group="; ".join(f"{lab}: {_fmt(v)}" for lab, v in zip(d.labels, per_group)),
            correction=VERDICT_CORRECTION, note="; ".join(x for x in (why, ctx["note"]) if x)))
    return rows


def _feature_rows(d: Data, point: Run, observed: dict, boot: dict, p_values: tuple[np.ndarray, np.ndarray],
                  replicate: str, ctx: dict) -> list[dict]:
    rows = []
    p_rho, p_auc = (np.asarray(p, dtype=float) for p in p_values)
    positive = IMPORTANT_RULE if ctx["target"] == IMPORTANCE else STEERABLE_RULE
    for f, name in enumerate(d.names):
        n, df, why = replicates(d, np.isfinite(d.rho[:, f]), replicate)
        value, auc = float(observed["spearman"][f]), float(observed["auroc"][f])
        lo, hi, _, _ = t_interval(value, boot["spearman"][:, f], n, df)
        a_lo, a_hi, _, _ = t_interval(auc, boot["auroc"][:, f], n, df, target=0.5)
        p, a_p = float(p_rho[f]), float(p_auc[f])
        signs = point.sign[0, :, f]
        rows.append(dict(
            feature=name, group="spectral" if d.spectral[f] else "baseline", target=ctx["target"],
            hold_out=ctx["hold_out"], spearman=value, spearman_low=lo, spearman_high=hi, p_value=p, p_holm=NAN,
            significant=False, auroc=auc, auroc_low=a_lo, auroc_high=a_hi, auroc_p_value=a_p, auroc_p_holm=NAN,
            positive_class=positive,
            direction=", ".join(f"{lab}: {'+' if s > 0 else '-' if s < 0 else '?'}" for lab, s in zip(d.labels, signs)),
            n_groups=int(np.isfinite(point.test[0, :, f]).sum()), n_models=int(np.isfinite(d.rho[:, f]).sum()),
            correction="", note="; ".join(x for x in (why, ctx["note"]) if x)))
    m_rho, m_auc = int(np.isfinite(p_rho).sum()), int(np.isfinite(p_auc).sum())
    for r, a, b in zip(rows, holm(p_rho), holm(p_auc)):
        r["p_holm"], r["auroc_p_holm"] = float(a), float(b)
        r["significant"] = bool(np.isfinite(a) and a < ALPHA / 2)
        r["correction"] = (f"Holm over {m_rho} features (one-sided permutation p of held-out Spearman > 0; of AUROC > "
                           f"0.5: Holm over {m_auc}); significant when the Holm-adjusted p < {ALPHA / 2:g}")
    return rows


def _fold_rows(d: Data, point: Run, ctx: dict) -> list[dict]:
    rows = []
    for g, label in enumerate(d.labels):
        row = dict(target=ctx["target"], hold_out=ctx["hold_out"], held_out=label,
                   n_train_models=int((d.group != g).sum()), n_test_models=int((d.group == g).sum()))
        for kind in ("spectral", "baseline"):
            i = int(point.best[kind][0, g])
            row[f"best_{kind}"] = d.names[i] if i >= 0 else ""
            row[f"best_{kind}_sign"] = int(point.sign[0, g, i]) if i >= 0 else 0
            row[f"best_{kind}_train"] = float(point.train[0, g, i]) if i >= 0 else NAN
            row[f"best_{kind}_test"] = float(point.test[0, g, i]) if i >= 0 else NAN
        for kind in ("spectral", "baseline"):
            chosen = [int(c) for c in point.chosen[kind][0, g] if c >= 0]
            row[f"{kind}_model"] = ",".join(d.names[c] for c in chosen)
            row[f"{kind}_model_coefficients"] = ",".join(f"{c:.4g}" for c in point.coef[kind][0, g, :len(chosen)])
            row[f"{kind}_model_test"] = float(point.model[kind][0, g])
        rows.append(row)
    return rows
