"""Runtime-monitor metrics and the verdict of one model's pairing (issue 19, point 3). Scores come
from ``spectral.monitor``; this module never loads a model.

Per (pairing, detector): AUROC and average precision of the scores of the anomalous (1) against the
benign (0) test prompts (scikit-learn), and the true-positive rate at a 1 % false-positive rate,
the threshold set on held-out benign *calibration* prompts (the 99th percentile of their scores,
prompts the detectors were not fitted on), with the false-positive rate that threshold actually
gives on the test's benign prompts. Intervals: a stratified bootstrap over the test prompts
(``N_BOOTSTRAP`` resamples, each class resampled within itself, the same draws for every detector:
paired), percentile 95 %.

Verdict ``VERDICT_KEY`` per pairing ("does the spectral monitor match or beat the activation
baselines?"): D_b = AUROC(spectral) - AUROC(b) for each baseline b in ``BASELINES``, paired bootstrap
intervals. PASS (non-inferior to every baseline) when every D_b's one-sided 97.5 % lower bound is
above -``MARGIN``: an intersection-union test, which needs no multiplicity correction; FAIL when
some D_b's upper bound is below -``MARGIN`` after Holm over the baselines (inferior to at least one);
else INCONCLUSIVE. The negative-control pairing has no verdict (both classes are benign: its AUROCs
must sit near 0.5). ``tests/test_monitor_analysis.py`` checks by simulation that with the spectral
detector exactly ``MARGIN`` worse than a baseline it passes at most at the nominal 2.5 %.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

NAN = float("nan")
N_BOOTSTRAP = 2000
MARGIN = 0.02
"""Non-inferiority margin on the AUROC: the spectral monitor "matches" a baseline when its AUROC is
at most 0.02 below it."""
FPR = 0.01
SPECTRAL = "spectral"
BASELINES = ("mahalanobis", "signature")
VERDICT_KEY = "spectral_monitor_matches_baselines"
RULE = (f"{VERDICT_KEY}: per pairing, claim 'the spectral detector's AUROC is at least that of every activation "
        f"baseline ({', '.join(BASELINES)}) minus {MARGIN}'. D_b = AUROC(spectral) - AUROC(b) on the test prompts, "
        f"a paired stratified bootstrap over them ({N_BOOTSTRAP} resamples, percentile); PASS when every D_b's "
        f"one-sided 97.5 % lower bound is above -{MARGIN} (intersection-union test: no correction needed), FAIL when "
        f"some D_b's one-sided 97.5 % upper bound is below -{MARGIN} after Holm over the {len(BASELINES)} baselines, "
        "else INCONCLUSIVE; the negative control has no verdict.")


def auroc(benign: np.ndarray, anomalous: np.ndarray) -> float:
    """P(anomalous score > benign score) + 0.5 P(tie): the Mann-Whitney U / (n0 n1)."""
    ranks = stats.rankdata(np.concatenate([benign, anomalous]))
    n0, n1 = len(benign), len(anomalous)
    return float((ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def _auroc_rows(benign: np.ndarray, anomalous: np.ndarray) -> np.ndarray:
    """Row-wise AUROC of (draws, n0) and (draws, n1) score matrices."""
    both = np.concatenate([benign, anomalous], axis=1)
    ranks = stats.rankdata(both, axis=1)
    n0, n1 = benign.shape[1], anomalous.shape[1]
    return (ranks[:, n0:].sum(1) - n1 * (n1 + 1) / 2) / (n0 * n1)


def detector_rows(pairing: str, scores: Mapping[str, tuple[np.ndarray, np.ndarray]],
                  calibration: Mapping[str, np.ndarray], *, seed: int = 0,
                  n_bootstrap: int = N_BOOTSTRAP) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Per detector: AUROC, AP, TPR at 1 % FPR with intervals (``scores``: detector -> (benign,
    anomalous) test scores; ``calibration``: detector -> benign calibration scores). Also returns
    each detector's bootstrap AUROCs (paired draws) for the verdict."""
    from sklearn.metrics import average_precision_score

    names = list(scores)
    n0, n1 = len(scores[names[0]][0]), len(scores[names[0]][1])
    rng = np.random.default_rng(seed)
    i0, i1 = rng.integers(0, n0, (n_bootstrap, n0)), rng.integers(0, n1, (n_bootstrap, n1))
    rows, boots = [], {}
    for name in names:
        b, a = (np.asarray(x, float) for x in scores[name])
        threshold = float(np.quantile(np.asarray(calibration[name], float), 1 - FPR))
        boot = _auroc_rows(b[i0], a[i1])
        boots[name] = boot
        tpr_boot = (a[i1] > threshold).mean(1)
        labels = np.r_[np.zeros(n0), np.ones(n1)]
        lo, hi = np.quantile(boot, [0.025, 0.975])
        tlo, thi = np.quantile(tpr_boot, [0.025, 0.975])
        rows.append(dict(pairing=pairing, detector=name, auroc=auroc(b, a), auroc_low=float(lo), auroc_high=float(hi),
                         average_precision=float(average_precision_score(labels, np.r_[b, a])),
                         tpr_at_1pct_fpr=float((a > threshold).mean()), tpr_low=float(tlo), tpr_high=float(thi),
                         test_fpr=float((b > threshold).mean()), threshold=threshold, n_benign=n0, n_anomalous=n1))
    return rows, boots


def holm(p: Sequence[float]) -> np.ndarray:
    from analysis.population import holm as _holm

    return _holm(p)


def pairing_verdict(pairing: str, rows: Sequence[Mapping], boots: Mapping[str, np.ndarray]) -> dict:
    """The verdict of one pairing (module docstring); NaN-free rows only."""
    by = {r["detector"]: r for r in rows}
    if pairing == "control" or SPECTRAL not in boots or not all(b in boots for b in BASELINES):
        return {}
    diffs = {b: boots[SPECTRAL] - boots[b] for b in BASELINES}
    values = {b: by[SPECTRAL]["auroc"] - by[b]["auroc"] for b in BASELINES}
    lows = {b: float(np.quantile(d, 0.025)) for b, d in diffs.items()}
    highs = {b: float(np.quantile(d, 0.975)) for b, d in diffs.items()}
    # bootstrap p-values of "D_b <= -MARGIN" (non-inferiority) and "D_b >= -MARGIN" (inferiority)
    p_noninferior = {b: float((d <= -MARGIN).mean()) for b, d in diffs.items()}
    p_inferior = {b: float((d >= -MARGIN).mean()) for b, d in diffs.items()}
    passes = all(lows[b] > -MARGIN for b in BASELINES)
    adjusted = holm([p_inferior[b] for b in BASELINES])
    fails = bool(np.nanmin(adjusted) < 0.025)
    verdict = "PASS" if passes else "FAIL" if fails else "INCONCLUSIVE"
    worst = min(BASELINES, key=lambda b: values[b])
    return dict(key=VERDICT_KEY, pairing=pairing, rule=RULE, value=values[worst], low=lows[worst], high=highs[worst],
                verdict=verdict, baseline=worst,
                detail="; ".join(f"{SPECTRAL} - {b}: {values[b]:+.3f} [{lows[b]:+.3f}, {highs[b]:+.3f}] (p "
                                 f"non-inferior {p_noninferior[b]:.3g}, p inferior Holm {a:.3g})"
                                 for b, a in zip(BASELINES, adjusted)))


# ---------------------------------------------------------------------------- across seeds
POPULATION_RULE = (f"{VERDICT_KEY} over training seeds: per (population, pairing) and baseline b, per seed "
                   "D_b = AUROC(spectral) - AUROC(b) on that seed's test prompts; across seeds the mean with a "
                   "t-interval (mean ± t(k-1) x SD/sqrt(k)); one-sided t p-values of 'D_b > -"
                   f"{MARGIN}' and 'D_b < -{MARGIN}'. PASS claim (non-inferior to every baseline): its p is the "
                   "largest over the baselines (intersection-union); FAIL claim (inferior to some baseline): Holm over "
                   "the baselines, the smallest adjusted p; then Holm across every (population, pairing) row for each "
                   "claim; PASS / FAIL when the adjusted p < 0.025, else INCONCLUSIVE (also with fewer than 2 seeds). "
                   "The negative control has no verdict.")


def population_verdicts(seeds: Sequence[tuple[str, int | None, Sequence[Mapping]]]) -> list[dict]:
    """``seeds``: (population, seed, monitor.parquet rows) per model. One row per (population, pairing)
    with a verdict (``spectral.tables.MONITOR_POPULATION`` columns)."""
    from analysis.population import across_seeds, holm_claims, one_sided_t
    from analysis.stats import CONFIDENCE, decide_claims

    cells: dict[tuple[str, str], list[tuple[int | None, dict[str, float]]]] = {}
    for pop, seed, rows in seeds:
        by: dict[str, dict[str, float]] = {}
        for r in rows:
            by.setdefault(r["pairing"], {})[r["detector"]] = float(r["auroc"])
        for pairing, aucs in by.items():
            if pairing != "control" and SPECTRAL in aucs and all(b in aucs for b in BASELINES):
                cells.setdefault((pop, pairing), []).append((seed, aucs))
    out = []
    for (pop, pairing), members in cells.items():
        per_b = {}
        for b in BASELINES:
            d = [a[SPECTRAL] - a[b] for _, a in members]
            value, low, high, se, df, k = across_seeds(d, False, CONFIDENCE)
            p_pass, p_fail = one_sided_t(value + MARGIN, se, df)
            per_b[b] = dict(value=value, low=low, high=high, k=k, p_pass=p_pass, p_fail=p_fail)
        p_pass = max(v["p_pass"] for v in per_b.values())
        fails = holm([v["p_fail"] for v in per_b.values()])
        worst = min(BASELINES, key=lambda b: per_b[b]["value"])
        out.append(dict(population=pop, pairing=pairing, p_above=p_pass,
                        p_below=float(np.nanmin(fails)) if np.any(np.isfinite(fails)) else NAN,
                        value=per_b[worst]["value"], low=per_b[worst]["low"], high=per_b[worst]["high"],
                        baseline=worst, k=per_b[worst]["k"], n_seeds=len(members),
                        per_seed="; ".join(f"seed {s}: " + ", ".join(f"{SPECTRAL} {a[SPECTRAL]:.3f} / {b} {a[b]:.3f}"
                                                                       for b in BASELINES) for s, a in members),
                        detail="; ".join(f"{SPECTRAL} - {b}: {v['value']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
                                         for b, v in per_b.items())))
    pass_holm, fail_holm, m = holm_claims(out)
    for r, a, b in zip(out, pass_holm, fail_holm):
        r.update(key=VERDICT_KEY, rule=POPULATION_RULE, p_pass_holm=float(a), p_fail_holm=float(b),
                 verdict=decide_claims(a, b) if r["k"] >= 2 else "INCONCLUSIVE",
                 correction=f"Holm over {m} (population, pairing) row(s), PASS and FAIL claims each; one-sided 0.025")
    return out
