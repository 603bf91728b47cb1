"""Do the heads' spectra change before in-context learning emerges (issue 17, training dynamics)?
Change-points, lags and the verdict across training seeds. Series come from the training
dynamics job; this module never loads a model.

Input per model (one training seed of a population; ``SeedDynamics``): the training step of
each checkpoint, the in-context-learning (ICL) score per checkpoint, per head metric (``gap``
and any other) each head's series, and optionally other model-level series (training loss,
induction score, ...).

Change-points (``changepoint_rows``; one row per series): ``spectral.dynamics.changepoints``
with its fixed penalty rule (``spectral.dynamics.changepoints.RULE``); positions are interpolated
``log10(1 + step)``, so every lag is in decades of training steps (log10 units). The ICL
change-point is the *first* change-point of the ICL score; a head's change-point is the first of
its series. ``lag = head's first change - ICL's first change``: negative when the head changes
first. Lags are also given for the other model-level series.

Per model and metric (``model_rows``): the median lag over the heads that have a change-point,
how many heads precede (lag < 0) and follow (lag > 0), and ``fraction_precede`` = heads that
precede / all heads (a head without a change-point does not precede). Nothing is dropped
silently: heads without a change-point are counted (``n_heads - n_changed``) and named in the
note; a model whose ICL score has no change-point, or none of whose heads has one, has no lag
(NaN) and is counted as such.

Across the seeds of a population (``population_rows``; the seeds are the replicates): the mean
of the per-seed median lags with the t-interval ``mean ± t(k-1) x SD / sqrt(k)`` over the k
seeds with a value (``analysis.population.across_seeds``) and one-sided t p-values
(``analysis.population.one_sided_t``).

Verdict ``VERDICT_KEY`` per population (``RULE``, printed with it): claim "the population's mean
of the per-seed median lag of ``gap`` < 0" (spectral change-points precede ICL emergence): PASS /
FAIL when the Holm-adjusted (across populations; the PASS and FAIL claims each) one-sided t p-value
is below ``ONE_SIDED_LEVEL`` (1.75 %), else INCONCLUSIVE (also with fewer than 2 seeds with a
value). Every other head metric gives an exploratory row (``EXPLORATORY_KEY``, its metric in
``metric``): the same statistics, no verdict, Holm over the metrics of its population, read as
``direction`` at the same level.

Why 1.75 % and not 2.5 %: the nominal level of the claim is one-sided 2.5 %, and the project's
rule is that a verdict's null simulation does not PASS more often than that. The t over few seeds
is liberal when the per-seed lags have lighter tails than normal: at level 2.5 % it passed, with
head and ICL change-points drawn independently from one distribution of log-steps (8 heads, each
missing with probability 0.2; 200,000 families each), in 2.5 % of families for normal positions but
3.1 / 3.1 / 2.9 / 2.7 % (uniform, k = 3 / 4 / 5 / 8 seeds), 3.2 / 3.0 / 2.9 / 2.7 % (arcsine, the
U-shaped beta(0.5, 0.5)), 2.6 % (triangular) and 3.1 / 3.0 / 3.0 / 2.7 % (uniform over the
midpoints of 30 log-spaced checkpoints, as real change-points fall). ``ONE_SIDED_LEVEL`` was chosen
once, over 1-2.5 % in steps of 0.25 %, as the largest level whose worst rate over those five nulls
at k = 2, 3, 4, 5, 8 seeds stays at most 2.5 %: at 1.75 % the worst is 2.29 % (arcsine, k = 3;
uniform 2.21 %, grid 2.22 %, triangular 1.87 %, normal 1.79 %); at 2 % it was 2.58 %. The cost is
power: under normal lags the test is then conservative (1.75 % instead of 2.5 %).
``tests/test_dynamics_analysis.py`` asserts the rate at most 2.5 % + 3 binomial SEs for each null.

Control: the training loss (``LOSS``, a model-level series). On organism-xs the heads' first gap
change-points coincide with the loss's first (the generic early-training transient), which precedes
the ICL score as much, so the first verdict alone cannot tell a precursor of ICL from a change in
that transient. Hence, per model, the loss's lag (``loss_lag`` = its first change-point - the ICL
score's) and ``median_minus_loss`` = the heads' median first gap change-point - the loss's first
(= ``median_lag - loss_lag``: below 0 the gaps move before the loss, about 0 with it, above 0 after
it); across seeds both get the mean with the t-interval: the loss's as a control row
(``CONTROL_KEY``, no verdict) and the difference as the second verdict ``BEYOND_KEY`` (``BEYOND_RULE``):
claim "the heads' gap change-points precede the ICL change-point by more than the training loss's
does", i.e. the mean of the per-seed ``median_minus_loss`` < 0, with the same t rule, the same
calibrated level and Holm across populations (its own family). Its statistic has the first verdict's
form with the loss's first change-point in place of the ICL score's (per seed the median of the heads'
first change-points minus one model-level change-point; across seeds the t), so under the null (head
and loss change-points drawn independently from one distribution) the same simulation covers it; the
tests also run it through the module's rows. The first verdict's note says when the loss's lag is as
negative as the gaps' (their intervals overlap): the precedence is then not specific to in-context
learning. (A loss moving clearly before the gaps gets no caveat: the gaps then move after the generic
transient, and the second verdict FAILs.) A seed without a loss change-point (or a model without the
loss series, e.g. hub revisions) or without an ICL change-point has no difference (the difference is
``median_lag - loss_lag`` on exactly the first verdict's seeds); it is counted, not used.

Late spectral changes (exploratory, no verdict): per head the change-point of its series nearest
before the ICL score's first that lies after the loss's first (``late_step``, ``late_log_step``;
NaN: none), per model how many heads have one (``n_late``) and the median of (late change - ICL
change) over them (``median_late_lag``): whether anything spectral happens in the run-up to the
emergence rather than in the early transient.

The claims are about timing only: an early change of the heads says nothing by itself about
their causing the emergence.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from analysis.population import across_seeds, holm, one_sided_t
from analysis.stats import CONFIDENCE, decide_claims
from spectral.dynamics import changepoints as cpd
from spectral.errors import UsageError

NAN = float("nan")
ICL = "icl_score"
"""Name of the ICL score's series in ``changepoint_rows``."""
VERDICT_METRIC = "gap"
VERDICT_KEY = "spectral_changes_precede_icl"
NOMINAL = 0.025
"""The claim's nominal one-sided level."""
ONE_SIDED_LEVEL = 0.0175
"""The one-sided level the Holm-adjusted t p-values are compared with: ``NOMINAL`` calibrated for the
t over few seeds under light-tailed nulls (module docstring: worst null rate 2.29 % over normal,
uniform, triangular, arcsine and checkpoint-grid positions at 2-8 seeds)."""
EXPLORATORY_KEY = "exploratory_lag"
LOSS = "train_loss"
"""The control series: the model-level training loss (``SeedDynamics.series``)."""
BEYOND_KEY = "spectral_changes_precede_icl_beyond_loss"
CONTROL_KEY = "control_loss_lag"
"""The control row's key: the loss's first change-point - the ICL score's, across seeds (no verdict)."""
MODEL_LEVEL = -1
"""``layer`` and ``head`` of a model-level series (the ICL score, the loss, ...)."""


def rule(metric: str = VERDICT_METRIC) -> str:
    """The verdict's rule in words."""
    return (f"{VERDICT_KEY}: per population, claim 'the heads' {metric} change-points precede the change-point of "
            "the in-context-learning score'; change-points by penalised l2 segmentation over checkpoints "
            f"({cpd.RULE}); per head lag = its first change-point - the ICL score's first, in decades of "
            "log10(1 + step); per seed the median lag over its heads with a change-point (heads without one and "
            "seeds without an ICL change-point are counted, not used); across seeds the mean with a t-interval "
            "(mean ± t(k-1) x SD/sqrt(k)); one-sided t p-values for '< 0' (PASS) and '> 0' (FAIL), Holm across "
            f"populations for each claim; PASS / FAIL when the adjusted p < {ONE_SIDED_LEVEL} (the nominal one-sided "
            f"{NOMINAL} calibrated for the t over few seeds: under light-tailed nulls at 2-8 seeds it passes in at "
            "most 2.3 %), else INCONCLUSIVE (also with fewer than 2 seeds with a value).")


RULE = rule()


def beyond_rule(metric: str = VERDICT_METRIC, control: str = LOSS) -> str:
    """The second verdict's rule in words."""
    return (f"{BEYOND_KEY}: per population, claim 'the heads' {metric} change-points precede the ICL change-point "
            f"by more than the {control}'s first change-point does'; per seed the median over its heads of the first "
            f"{metric} change-point minus the {control}'s first change-point (= median lag - the {control}'s lag), "
            f"decades of log10(1 + step) (seeds without a {control}, ICL or head change-point are "
            "counted, not used); across seeds the mean with a t-interval; one-sided t p-values for '< 0' (PASS: the "
            "gaps move before the loss's transient) and '> 0' (FAIL: after it), Holm across populations for each "
            f"claim; PASS / FAIL when the adjusted p < {ONE_SIDED_LEVEL} (the first verdict's calibrated level; the "
            f"statistic has its form with the {control} in place of the ICL score, so the same null simulation "
            "covers it), else INCONCLUSIVE.")


BEYOND_RULE = beyond_rule()

CHANGEPOINT_COLUMNS = ("population", "seed", "model", "series", "layer", "head", "n_checkpoints", "method", "sigma",
                       "penalty", "n_changes", "indices", "steps", "log_steps", "shifts", "first_step",
                       "first_log_step", "lag", "late_step", "late_log_step", "note")
MODEL_COLUMNS = ("population", "seed", "model", "metric", "n_heads", "n_changed", "n_precede", "n_follow",
                 "icl_log_step", "median_lag", "fraction_precede", "loss_log_step", "loss_lag", "median_minus_loss",
                 "n_before_loss", "n_late", "median_late_lag", "note")
POPULATION_COLUMNS = ("population", "metric", "quantity", "n_seeds", "k", "n_seeds_no_icl_change",
                      "n_seeds_no_head_change", "n_heads", "n_heads_no_change", "n_heads_late", "value", "low", "high",
                      "se", "df", "p_above", "p_below", "same_sign", "fraction_precede", "per_seed", "scheme", "note")
VERDICT_COLUMNS = ("key", "population", "metric", "exploratory", "rule", "value", "low", "high", "p_pass", "p_fail",
                   "p_pass_holm", "p_fail_holm", "verdict", "direction", "n_seeds", "k", "n_seeds_no_icl_change",
                   "n_seeds_no_head_change", "n_heads", "n_heads_no_change", "fraction_precede", "n_heads_late",
                   "per_seed", "correction", "note")
"""Keys of the rows of ``changepoint_rows`` (``spectral.tables.DYNAMICS_CHANGEPOINTS``), ``model_rows``
(``REPORT_DYNAMICS_MODELS``), ``population_rows`` and ``verdict_rows`` (``REPORT_DYNAMICS_VERDICTS``).
Lists in change-point rows (indices, steps, log_steps, shifts) are JSON. ``quantity`` of a population row:
``lag`` (the median lag), ``minus_loss`` (``median_minus_loss``) or ``loss_lag`` (the control's lag; its
``metric`` is the control series)."""


class SeedDynamics(NamedTuple):
    """One training seed's series over its checkpoints (each series: one value per checkpoint)."""

    population: str
    seed: int | None
    model: str
    steps: Sequence[float]
    """(n,) training step of each checkpoint, increasing."""
    icl: Sequence[float]
    """(n,) the in-context-learning score."""
    heads: Mapping[str, Mapping[tuple[int, int], Sequence[float]]]
    """metric -> (layer, head) -> (n,) series."""
    series: Mapping[str, Sequence[float]] | None = None
    """Other model-level series by name (loss, induction score, ...): change-points and lags only."""


# ---------------------------------------------------------------------------- per series
def _detect(s: SeedDynamics, what: str, values) -> cpd.ChangePoints:
    try:
        return cpd.change_points(values, s.steps)
    except UsageError as err:
        raise UsageError(f"{s.model} (seed {s.seed}) {what}: {err}") from None


def late_change(cp: cpd.ChangePoints, loss_log_step: float, icl_log_step: float) -> tuple[float, float]:
    """(step, log-step) of the change-point of ``cp`` nearest before the ICL score's first change that
    lies after the loss's first; (NaN, NaN) when there is none (or either reference has no change)."""
    inside = [(x, st) for x, st in zip(cp.log_steps, cp.steps) if loss_log_step < x < icl_log_step]
    if not inside:
        return NAN, NAN
    x, st = max(inside)
    return float(st), float(x)


def _row(s: SeedDynamics, name: str, layer: int, head: int, cp: cpd.ChangePoints, icl: float,
         loss: float = NAN) -> dict:
    f = cpd.first(cp)
    first_log = f.log_step if f else NAN
    lag = first_log - icl if name != ICL else NAN
    note = "" if f else "no change-point"
    if name != ICL and f and not np.isfinite(icl):
        note = "the ICL score has no change-point: no lag"
    late_step, late_log = late_change(cp, loss, icl) if layer != MODEL_LEVEL else (NAN, NAN)
    return dict(population=s.population, seed=s.seed, model=s.model, series=name, layer=layer, head=head,
                n_checkpoints=cp.n, method=cp.method, sigma=cp.sigma, penalty=cp.penalty, n_changes=len(cp.indices),
                indices=json.dumps(list(cp.indices)), steps=json.dumps(list(cp.steps)),
                log_steps=json.dumps([round(x, 6) for x in cp.log_steps]),
                shifts=json.dumps([float(f"{x:.6g}") for x in cp.shifts]), first_step=f.step if f else NAN,
                first_log_step=first_log, lag=lag, late_step=late_step, late_log_step=late_log, note=note)


def changepoint_rows(s: SeedDynamics, control: str = LOSS) -> list[dict]:
    """One row per series of the seed (``CHANGEPOINT_COLUMNS``): the ICL score, the other model-level
    series, then every head of every metric (with its late change-point: after the ``control`` series'
    first change and before the ICL score's); bad series are a one-line ``UsageError`` naming them."""
    icl_cp = _detect(s, ICL, s.icl)
    icl = cpd.first(icl_cp)
    icl_log = icl.log_step if icl else NAN
    rows = [_row(s, ICL, MODEL_LEVEL, MODEL_LEVEL, icl_cp, icl_log)]
    for name, values in (s.series or {}).items():
        rows.append(_row(s, name, MODEL_LEVEL, MODEL_LEVEL, _detect(s, name, values), icl_log))
    loss = next((r["first_log_step"] for r in rows[1:] if r["series"] == control), NAN)
    for metric, heads in s.heads.items():
        for (layer, head), values in sorted(heads.items()):
            cp = _detect(s, f"{metric} of L{layer}H{head}", values)
            rows.append(_row(s, metric, int(layer), int(head), cp, icl_log, loss))
    return rows


# ---------------------------------------------------------------------------- per model
def model_row(population: str, seed: int | None, model: str, metric: str, icl_log_step: float,
              first_log_steps: Sequence[float], loss_log_step: float = NAN,
              late_log_steps: Sequence[float] | None = None, has_loss: bool | None = None) -> dict:
    """One model's summary (``MODEL_COLUMNS``) from the ICL score's first change (NaN: none), each
    head's first change (NaN: none), the control loss's first change (NaN: none) and each head's late
    change (NaN: none; None: not given), all interpolated log10(1 + step). ``has_loss`` False: the
    model has no loss series (default: True when ``loss_log_step`` is finite)."""
    first = np.asarray(first_log_steps, dtype=float)  # (heads,)
    changed = np.isfinite(first)
    has_icl = bool(np.isfinite(icl_log_step))
    has_loss_change = bool(np.isfinite(loss_log_step))
    has_loss = has_loss_change if has_loss is None else has_loss
    lag = first[changed] - icl_log_step if has_icl else np.array([])  # (changed heads,) decades
    late = np.full(first.shape, NAN) if late_log_steps is None else np.asarray(late_log_steps, dtype=float)
    late_lag = late[np.isfinite(late)] - icl_log_step  # (heads with a late change,)
    notes = []
    if not has_icl:
        notes.append("the ICL score has no change-point: no lag")
    if first.size - changed.sum():
        notes.append(f"{first.size - int(changed.sum())} of {first.size} heads without a change-point")
    if not has_loss:
        notes.append(f"no {LOSS} series: no control")
    elif not has_loss_change:
        notes.append(f"the {LOSS} has no change-point: no difference to it")
    minus = first[changed] - loss_log_step if has_loss_change and has_icl else np.array([])  # (changed heads,)
    return dict(population=population, seed=seed, model=model, metric=metric, n_heads=int(first.size),
                n_changed=int(changed.sum()), n_precede=int((lag < 0).sum()), n_follow=int((lag > 0).sum()),
                icl_log_step=float(icl_log_step), median_lag=float(np.median(lag)) if lag.size else NAN,
                fraction_precede=float((lag < 0).sum() / first.size) if has_icl and first.size else NAN,
                loss_log_step=float(loss_log_step),
                loss_lag=float(loss_log_step - icl_log_step) if has_icl and has_loss_change else NAN,
                median_minus_loss=float(np.median(minus)) if minus.size else NAN,
                n_before_loss=int((minus < 0).sum()), n_late=int(late_lag.size),
                median_late_lag=float(np.median(late_lag)) if late_lag.size else NAN, note="; ".join(notes))


def model_rows(changepoints: Sequence[Mapping], control: str = LOSS) -> list[dict]:
    """Per (model, head metric), the summary of its heads' lags from ``changepoint_rows`` rows, with
    the ``control`` series' first change-point (NaN: the model has none or no such series)."""
    icl = {(r["population"], r["seed"], r["model"]): r["first_log_step"] for r in changepoints if r["series"] == ICL}
    loss = {(r["population"], r["seed"], r["model"]): r["first_log_step"] for r in changepoints
            if r["series"] == control and r["layer"] == MODEL_LEVEL}
    cells: dict[tuple, list[tuple[float, float]]] = {}
    for r in changepoints:
        if r["layer"] != MODEL_LEVEL:
            key = (r["population"], r["seed"], r["model"], r["series"])
            cells.setdefault(key, []).append((r["first_log_step"], r["late_log_step"]))
    out = []
    for (pop, seed, model, metric), heads in cells.items():
        if (pop, seed, model) not in icl:
            raise UsageError(f"{model} (seed {seed}): head series without the {ICL} series")
        out.append(model_row(pop, seed, model, metric, icl[(pop, seed, model)], [h[0] for h in heads],
                             loss.get((pop, seed, model), NAN), [h[1] for h in heads],
                             has_loss=(pop, seed, model) in loss))
    return out


# ---------------------------------------------------------------------------- across seeds
def _estimate(values: Sequence[float]) -> dict:
    value, low, high, se, df, k = across_seeds(values, False, CONFIDENCE)
    p_above, p_below = one_sided_t(value, se, df)
    finite = np.array([v for v in values if np.isfinite(v)])
    return dict(value=value, low=low, high=high, se=se, df=df, k=k, p_above=p_above, p_below=p_below,
                same_sign=float(np.mean(np.sign(finite) == np.sign(value))) if k and value != 0 else NAN)


def _population(pop: str, metric: str, members: Sequence[Mapping], quantity: str = "lag",
                control: str = LOSS) -> dict:
    column = {"lag": "median_lag", "minus_loss": "median_minus_loss", "loss_lag": "loss_lag"}[quantity]
    values = [m[column] for m in members]
    est = _estimate(values)
    k = est["k"]
    no_icl = sum(not np.isfinite(m["icl_log_step"]) for m in members)
    no_head = sum(np.isfinite(m["icl_log_step"]) and m["n_changed"] == 0 for m in members)
    no_loss = sum(not np.isfinite(m["loss_log_step"]) for m in members)
    fractions = [m["fraction_precede"] for m in members if np.isfinite(m["median_lag"])]
    notes = [f"{k} of {len(members)} seeds with a value"] if k < len(members) else []
    notes += [f"{no_icl} seed(s) without an ICL change-point"] if no_icl else []
    notes += [f"{no_head} seed(s) without a head change-point"] if no_head and quantity != "loss_lag" else []
    if no_loss and quantity != "lag":
        notes.append(f"{no_loss} seed(s) without a {control} change-point (or series)")
    n_heads = sum(m["n_heads"] for m in members)
    no_change = sum(m["n_heads"] - m["n_changed"] for m in members)
    notes += [f"{no_change} of {n_heads} heads without a change-point"] if no_change and quantity != "loss_lag" else []
    if quantity == "lag":
        per_seed = "; ".join(f"seed {m['seed']}: {m['median_lag']:.3g} ({m['n_precede']} of {m['n_heads']} heads "
                             f"precede, {m['n_changed']} with a change-point, {m['n_late']} with a late change)"
                             for m in members)
        scheme = "per seed the median over its heads of (first change-point - the ICL score's first)"
    elif quantity == "minus_loss":
        per_seed = "; ".join(f"seed {m['seed']}: {m['median_minus_loss']:.3g} ({m['n_before_loss']} of "
                             f"{m['n_heads']} heads before the {control}'s change-point)" for m in members)
        scheme = f"per seed the median over its heads of (first change-point - the {control}'s first)"
    else:
        per_seed = "; ".join(f"seed {m['seed']}: {m['loss_lag']:.3g}" for m in members)
        scheme = f"per seed the {control}'s first change-point - the ICL score's first"
    return dict(
        population=pop, metric=metric if quantity != "loss_lag" else control, quantity=quantity,
        n_seeds=len(members), k=k, n_seeds_no_icl_change=no_icl, n_seeds_no_head_change=no_head, n_heads=n_heads,
        n_heads_no_change=no_change, n_heads_late=sum(m["n_late"] for m in members),
        **{c: est[c] for c in ("value", "low", "high", "se", "df", "p_above", "p_below", "same_sign")},
        fraction_precede=float(np.mean(fractions)) if fractions else NAN, per_seed=per_seed,
        scheme=(f"{len(members)} seeds: mean ± t(k-1) x SD/sqrt(k) over the seeds with a value; {scheme}, decades "
                "of log10(1 + step)"),
        note="; ".join(notes))


def population_rows(models: Sequence[Mapping], metric: str = VERDICT_METRIC, control: str = LOSS) -> list[dict]:
    """Per (population, metric), the across-seed estimate of the mean median lag (``POPULATION_COLUMNS``,
    quantity ``lag``); for ``metric`` also that of ``median_minus_loss`` (``minus_loss``) and of the
    ``control``'s own lag (``loss_lag``)."""
    cells: dict[tuple[str, str], list[Mapping]] = {}
    for m in models:
        cells.setdefault((m["population"], m["metric"]), []).append(m)
    out = []
    for (pop, name), members in cells.items():
        out.append(_population(pop, name, members, "lag", control))
        if name == metric:
            out.append(_population(pop, name, members, "minus_loss", control))
            out.append(_population(pop, name, members, "loss_lag", control))
    return out


def _direction(p_precede: float, p_follow: float) -> str:
    if np.isfinite(p_precede) and p_precede < ONE_SIDED_LEVEL:
        return "precede"
    if np.isfinite(p_follow) and p_follow < ONE_SIDED_LEVEL:
        return "follow"
    return ""


def not_specific(verdict: Mapping, control: Mapping | None) -> str:
    """The first verdict's caveat when the control's lag is as negative as the gaps' (their intervals
    overlap); '' otherwise (the loss moves clearly before the gaps, or clearly after them) or without
    both intervals."""
    if control is None or not all(np.isfinite(r[c]) for r in (control, verdict) for c in ("low", "high")):
        return ""
    if not (control["low"] <= verdict["high"] and verdict["low"] <= control["high"]):
        return ""
    return (f"not specific to in-context learning: the {control['metric']}'s first change-point precedes the ICL "
            f"score's as much (mean lag {control['value']:.3g} [{control['low']:.3g}, {control['high']:.3g}] vs the "
            f"gaps' {verdict['value']:.3g} [{verdict['low']:.3g}, {verdict['high']:.3g}]); see {BEYOND_KEY}")


def verdict_rows(populations: Sequence[Mapping], metric: str = VERDICT_METRIC, control: str = LOSS) -> list[dict]:
    """Per population: the verdict on ``metric`` (``VERDICT_KEY``), the verdict beyond the ``control``
    (``BEYOND_KEY``), each Holm across populations, the control's lag (``CONTROL_KEY``, no verdict) and the
    exploratory rows of every other metric (Holm over the metrics of their population) (``VERDICT_COLUMNS``)."""
    out = []
    for r in populations:
        main = r["metric"] == metric and r["quantity"] == "lag"
        key = {"minus_loss": BEYOND_KEY, "loss_lag": CONTROL_KEY}.get(r["quantity"], VERDICT_KEY if main
                                                                      else EXPLORATORY_KEY)
        out.append(dict(
            key=key, population=r["population"], metric=r["metric"], exploratory=key in (EXPLORATORY_KEY, CONTROL_KEY),
            rule={VERDICT_KEY: rule(metric), BEYOND_KEY: beyond_rule(metric, control)}.get(key, ""),
            value=r["value"], low=r["low"], high=r["high"],
            p_pass=r["p_below"], p_fail=r["p_above"], p_pass_holm=NAN, p_fail_holm=NAN, verdict="", direction="",
            **{c: r[c] for c in ("n_seeds", "k", "n_seeds_no_icl_change", "n_seeds_no_head_change", "n_heads",
                                 "n_heads_no_change", "fraction_precede", "n_heads_late", "per_seed")},
            correction="", note=r["note"]))
    families: dict[tuple, list[dict]] = {}
    for r in out:
        families.setdefault((r["key"],) if r["key"] in (VERDICT_KEY, BEYOND_KEY, CONTROL_KEY)
                            else (r["population"],), []).append(r)
    for fam, rs in families.items():
        m = int(sum(np.isfinite(r["p_pass"]) for r in rs))
        for r, a, b in zip(rs, holm([r["p_pass"] for r in rs]), holm([r["p_fail"] for r in rs])):
            if fam == (CONTROL_KEY,):
                r["direction"] = _direction(r["p_pass"], r["p_fail"])
                r["rule"] = (f"control, no verdict: the {control}'s first change-point - the ICL score's, per seed; "
                             f"mean and t-interval over seeds; read as 'direction' at one-sided {ONE_SIDED_LEVEL}")
                r["correction"] = "none (a control, read with the verdicts' intervals)"
                continue
            r["p_pass_holm"], r["p_fail_holm"] = float(a), float(b)
            r["direction"] = _direction(a, b)
            if fam in ((VERDICT_KEY,), (BEYOND_KEY,)):
                r["verdict"] = decide_claims(a, b, alpha=2 * ONE_SIDED_LEVEL)
                r["correction"] = (f"Holm over {m} population(s), PASS and FAIL claims each; one-sided tests at "
                                   f"{ONE_SIDED_LEVEL} (nominal {NOMINAL}, calibrated)")
            else:
                r["rule"] = (f"exploratory, no verdict: 'the mean median lag of {r['metric']} != 0', t over seeds; "
                             f"read as 'direction' at one-sided {ONE_SIDED_LEVEL}")
                r["correction"] = (f"Holm over {m} metric(s) of this population (the verdict's metric excluded), each "
                                   "direction; not corrected across populations")
    controls = {r["population"]: r for r in out if r["key"] == CONTROL_KEY}
    for r in out:
        if r["key"] == VERDICT_KEY:
            control_row = controls.get(r["population"])
            caveat = not_specific(r, control_row)
            if not caveat and (control_row is None or not np.isfinite(control_row["value"])):
                caveat = (f"no {control} change-point (or series): not checked against the generic early-training "
                          "transient")
            r["note"] = "; ".join(x for x in (caveat, r["note"]) if x)
    return out


@dataclass
class DynamicsAnalysis:
    """Change-points, lags and verdicts over models and populations: plain rows for Parquet."""

    changepoints: list[dict]
    """One row per series (``CHANGEPOINT_COLUMNS``)."""
    models: list[dict]
    """Per model and head metric (``MODEL_COLUMNS``)."""
    populations: list[dict]
    """Per population and head metric, across seeds (``POPULATION_COLUMNS``)."""
    verdicts: list[dict]
    """Per population: ``VERDICT_KEY``, ``BEYOND_KEY``, ``CONTROL_KEY`` and the exploratory rows
    (``VERDICT_COLUMNS``)."""


def analyse(seeds: Sequence[SeedDynamics], metric: str = VERDICT_METRIC, control: str = LOSS) -> DynamicsAnalysis:
    """Every table of this module for ``seeds``, the verdicts on ``metric``, ``control`` the
    model-level series of the second verdict."""
    if not seeds:
        raise UsageError("dynamics: no seeds to analyse")
    if not any(metric in s.heads for s in seeds):
        raise UsageError(f"dynamics: no seed has head series of {metric!r} (the verdict's metric)")
    changepoints = [r for s in seeds for r in changepoint_rows(s, control)]
    models = model_rows(changepoints, control)
    populations = population_rows(models, metric, control)
    return DynamicsAnalysis(changepoints, models, populations, verdict_rows(populations, metric, control))
