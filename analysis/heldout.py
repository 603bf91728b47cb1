"""The resampled leave-one-group-out procedure behind ``analysis.features`` (numpy on arrays).

``prepare`` computes once, per model, the Spearman and AUROC of every feature with the target and
the centred ranks and normal equations the small models need. ``procedure`` runs the whole
leave-one-group-out evaluation on b weightings of the models at once: b = 1 with every weight 1
is the evaluation of the data as observed; ``bootstrap_weights`` gives the multiplicities of b
bootstrap resamples (models within each held-out group, or whole groups), so that every choice
(directions, best features, forward selection, ridge fits) is remade inside every resample.
``summaries`` reduces a run to the statistics the rows report; ``t_interval`` and ``replicates``
give their intervals and one-sided p-values:

    value ± t(df) x SE x sqrt(n/(n-1)),   SE = standard deviation of the resampled values,

n = the fewest models of a held-out group (with ``replicate="group"``: the groups), df = sum over
held-out groups of (n_g - 1) (groups - 1). The sqrt(n/(n-1)) and t(df) are those of
``analysis.population.scaled_interval`` (a bootstrap variance is (n-1)/n of the variance; few
replicates need t quantiles).

Why the whole procedure is resampled: the folds share training data (fold p's choices read the
models fold q tests on), so held-out scores of different folds are positively correlated; a
t-interval over the held-out groups, or over their models with the choices held fixed, is
anti-conservative (null simulations: 6.5 % and 5.8 % PASS at a nominal 2.5 %). Resampled with
its choices, the procedure's spread contains that correlation (``tests/test_feature_prediction.py``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from analysis.stats import average_ranks, spearman

NAN = float("nan")
ALPHA = 0.05
FEATURE, MODEL = "feature_difference", "model_difference"
"""``summaries`` keys: held-out Spearman of the chosen spectral feature (model) minus that of the
chosen baseline feature (model), mean over held-out groups (``<key>:groups``: per group)."""


# --- per-model quantities ----------------------------------------------------------------------

def rank_rows(a: np.ndarray) -> np.ndarray:
    """Mid-ranks (1..n, ties averaged, as ``scipy.stats.rankdata``) along the last axis of a finite
    array of any shape (numpy, vectorised over the leading axes)."""
    a = np.asarray(a, dtype=float)
    n = a.shape[-1]
    order = np.argsort(a, axis=-1, kind="stable")
    s = np.take_along_axis(a, order, axis=-1)
    pos = np.broadcast_to(np.arange(n), a.shape)
    first = np.ones(a.shape, dtype=bool)
    first[..., 1:] = s[..., 1:] != s[..., :-1]
    last = np.ones(a.shape, dtype=bool)
    last[..., :-1] = first[..., 1:]
    start = np.maximum.accumulate(np.where(first, pos, 0), axis=-1)
    end = np.flip(np.minimum.accumulate(np.flip(np.where(last, pos, n), -1), axis=-1), -1)
    out = np.empty(a.shape)
    np.put_along_axis(out, order, (start + end) / 2 + 1, axis=-1)
    return out


def auroc(x: np.ndarray, positive: np.ndarray) -> float:
    """AUROC of the score ``x`` for ``positive`` over the finite scores (Mann-Whitney with mid-ranks,
    as ``sklearn.metrics.roc_auc_score``); NaN when a class is empty."""
    x, positive = np.asarray(x, dtype=float), np.asarray(positive, dtype=bool)
    ok = np.isfinite(x)
    x, p = x[ok], positive[ok]
    n1, n0 = int(p.sum()), int((~p).sum())
    if n1 == 0 or n0 == 0:
        return NAN
    return float((average_ranks(x)[p].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def centred_ranks(v: np.ndarray) -> np.ndarray:
    """(rank - (n+1)/2) / n over the finite values (mid-ranks; in [-0.5, 0.5]); NaN -> 0 (the
    middle rank)."""
    v = np.asarray(v, dtype=float)
    out = np.zeros(v.shape)
    ok = np.isfinite(v)
    n = int(ok.sum())
    if n:
        out[ok] = (average_ranks(v[ok]) - (n + 1) / 2) / n
    return out


def per_model(x: np.ndarray, target: np.ndarray, positive: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One model's (F,) Spearman of each column of ``x`` (n, F) with ``target`` (``analysis.stats
    .spearman``: NaN with fewer than 3 distinct finite values), (F,) AUROC of each column for
    ``positive`` (``auroc``), (n, F) centred ranks (``centred_ranks``) and (n,) those of the target.
    Columns without a NaN are computed at once; the others one by one."""
    n, f = x.shape
    full = np.isfinite(x).all(0)
    z = np.zeros((n, f))
    rho, auc = np.full(f, NAN), np.full(f, NAN)
    y = centred_ranks(target)
    if full.any():
        r = rank_rows(x[:, full].T)                               # (F_full, n)
        z[:, full] = ((r - (n + 1) / 2) / n).T
        distinct = 1 + (np.diff(np.sort(x[:, full], axis=0), axis=0) != 0).sum(0)
        with np.errstate(all="ignore"):
            c = z[:, full]
            rr = (c.T @ y) / np.sqrt((c * c).sum(0) * (y @ y))
        rho[full] = np.where((distinct >= 3) & np.isfinite(rr), np.clip(rr, -1, 1), NAN)
        n1 = int(positive.sum())
        if 0 < n1 < n:
            auc[full] = (r[:, positive].sum(1) - n1 * (n1 + 1) / 2) / (n1 * (n - n1))
    for j in np.flatnonzero(~full):
        rho[j], auc[j], z[:, j] = spearman(x[:, j], target), auroc(x[:, j], positive), centred_ranks(x[:, j])
    return rho, auc, z, y


@dataclass
class Data:
    """Everything the resampled procedure reads, computed once."""

    names: list[str]
    spectral: np.ndarray          # (F,) bool
    group: np.ndarray             # (n,) group code per model
    labels: list[str]             # group code -> value
    rho: np.ndarray               # (n, F) per-model Spearman
    auc: np.ndarray               # (n, F) per-model AUROC
    complete: np.ndarray          # (n, F) every unit finite
    z: list[np.ndarray]           # per model (n_m, F) centred ranks
    y: list[np.ndarray]           # per model (n_m,) centred ranks of the target
    positive: list[np.ndarray]    # per model (n_m,) positive class
    finite: list[np.ndarray]      # per model (n_m, F) finite feature values
    gram: dict[str, np.ndarray] = field(default_factory=dict)    # "spectral"/"baseline": (n, Fc, Fc)
    cross: dict[str, np.ndarray] = field(default_factory=dict)   # (n, Fc)
    yy: np.ndarray | None = None  # (n,)
    stacks: dict[int, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = field(default_factory=dict)
    """group -> [(model indices, (M, n_units, F) centred ranks, (M, n_units) target ranks)], models
    of one group with one unit count stacked (the held-out predictions are ranked at once)."""

    def columns(self, kind: str) -> np.ndarray:
        return np.flatnonzero(self.spectral if kind == "spectral" else ~self.spectral)


def prepare(names: Sequence[str], spectral: np.ndarray, groups: Sequence[str], x: Sequence[np.ndarray],
            target: Sequence[np.ndarray], positive: Sequence[np.ndarray]) -> Data:
    """The procedure's data from, per model: its hold-out group, its (n_units, F) feature values
    (columns ``names``; ``spectral`` marks the spectral ones), its (n_units,) finite target and
    (n_units,) positive class."""
    labels = list(dict.fromkeys(groups))
    group = np.array([labels.index(g) for g in groups])
    rho, auc, z, y = zip(*(per_model(np.asarray(xi, dtype=float), np.asarray(t, dtype=float), np.asarray(p, dtype=bool))
                           for xi, t, p in zip(x, target, positive)))
    d = Data(list(names), np.asarray(spectral, dtype=bool), group, labels, np.array(rho), np.array(auc),
             np.array([np.isfinite(xi).all(0) for xi in x]), list(z), list(y),
             [np.asarray(p, dtype=bool) for p in positive], [np.isfinite(np.asarray(xi, dtype=float)) for xi in x])
    for kind in ("spectral", "baseline"):
        c = d.columns(kind)
        d.gram[kind] = np.stack([zi[:, c].T @ zi[:, c] for zi in z])
        d.cross[kind] = np.stack([zi[:, c].T @ yi for zi, yi in zip(z, y)])
    d.yy = np.array([yi @ yi for yi in y])
    sizes = np.array([zi.shape[0] for zi in d.z])
    for g in range(len(labels)):
        for size in np.unique(sizes[group == g]):
            idx = np.flatnonzero((group == g) & (sizes == size))
            d.stacks.setdefault(g, []).append((idx, np.stack([d.z[m] for m in idx]), np.stack([d.y[m] for m in idx])))
    return d


# --- the small model ---------------------------------------------------------------------------

def forward_ridge(gram: np.ndarray, cross: np.ndarray, yy: np.ndarray, eligible: np.ndarray, k: int,
                  alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Forward selection of up to ``k`` columns and their ridge coefficients from the normal
    equations of b training sets at once: ``gram`` (b, F, F) = X^T X, ``cross`` (b, F) = X^T y,
    ``yy`` (b,) = y^T y. Each step adds the eligible column with the least training residual sum
    of squares ``||y - X_S beta||^2`` at beta = (X_S^T X_S + alpha I)^-1 X_S^T y (ties: the first
    column). Returns (chosen (b, k') column indices, beta (b, k')), k' = min(k, eligible columns)."""
    b, f = cross.shape
    k = min(k, int(eligible.sum()))
    rows = np.arange(b)[:, None, None]
    chosen = np.zeros((b, 0), dtype=int)
    for s in range(k):
        idx = np.concatenate([np.broadcast_to(chosen[:, None, :], (b, f, s)),
                              np.broadcast_to(np.arange(f)[None, :, None], (b, f, 1))], axis=2)  # (b, F, s+1)
        m = gram[rows[..., None], idx[..., :, None], idx[..., None, :]]                              # (b, F, s+1, s+1)
        v = np.take_along_axis(cross[:, None, :], idx, axis=2)                                     # (b, F, s+1)
        beta = np.linalg.solve(m + alpha * np.eye(s + 1), v[..., None])[..., 0]
        rss = yy[:, None] - 2 * (beta * v).sum(-1) + np.einsum("bfi,bfij,bfj->bf", beta, m, beta)
        taken = (np.arange(f)[None, :, None] == chosen[:, None, :]).any(-1)
        rss = np.where(taken | ~eligible[None, :], np.inf, rss)
        chosen = np.concatenate([chosen, rss.argmin(1)[:, None]], axis=1)
    m = gram[np.arange(b)[:, None, None], chosen[:, :, None], chosen[:, None, :]] if k else np.zeros((b, 0, 0))
    v = np.take_along_axis(cross, chosen, axis=1)
    beta = np.linalg.solve(m + alpha * np.eye(k), v[..., None])[..., 0] if k else np.zeros((b, 0))
    return chosen, beta


def spearman_rows(pred: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """(b, M) Spearman of ``pred`` (b, M, n) with the target along the last axis, ``ry`` (M, n) the
    target's centred ranks (mid-ranks)."""
    rp = rank_rows(pred) - (ry.shape[-1] + 1) / 2
    with np.errstate(all="ignore"):
        r = (rp * ry).sum(-1) / np.sqrt((rp * rp).sum(-1) * (ry * ry).sum(-1))
    return np.where(np.isfinite(r), r, NAN)


# --- the resampled procedure -------------------------------------------------------------------

def _wmean(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(b, F) weighted mean over models of ``x`` (n, F), NaN entries left out; NaN without weight."""
    ok = np.isfinite(x)
    with np.errstate(all="ignore"):
        den = w @ ok
        return np.where(den > 0, (w @ np.where(ok, x, 0.0)) / np.where(den > 0, den, 1), NAN)


@dataclass
class Run:
    """The procedure on b resamples (b = 1: the data as observed). Arrays (b, G[, ...])."""

    weight: np.ndarray     # (b, G) how often each held-out group counts
    sign: np.ndarray       # (b, G, F) direction chosen on the training groups
    train: np.ndarray      # (b, G, F) oriented mean training Spearman
    test: np.ndarray       # (b, G, F) oriented held-out Spearman (mean over the group's models)
    test_auc: np.ndarray   # (b, G, F) oriented held-out AUROC
    best: dict[str, np.ndarray]       # kind -> (b, G) feature index (-1: none)
    model: dict[str, np.ndarray]      # kind -> (b, G) held-out Spearman of the small model
    chosen: dict[str, np.ndarray]     # kind -> (b, G, k) column indices into d.names
    coef: dict[str, np.ndarray]       # kind -> (b, G, k)


def _fold_model(d: Data, kind: str, group: int, wtr: np.ndarray, wte: np.ndarray, eligible: np.ndarray, k: int,
                alpha: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cols = d.columns(kind)
    gram = np.einsum("bn,nij->bij", wtr, d.gram[kind])
    chosen, beta = forward_ridge(gram, wtr @ d.cross[kind], wtr @ d.yy, eligible[cols], k, alpha)
    b = wtr.shape[0]
    score = np.full(b, NAN)
    if chosen.shape[1]:
        num, den = np.zeros(b), np.zeros(b)
        for idx, z, y in d.stacks[group]:
            pred = np.einsum("mnbk,bk->bmn", z[:, :, cols[chosen]], beta)     # (b, M, n_units)
            r = spearman_rows(pred, y)                                        # (b, M)
            w = wte[:, idx]
            ok = np.isfinite(r) & (w > 0)
            num += np.where(ok, w * np.nan_to_num(r), 0).sum(1)
            den += np.where(ok, w, 0).sum(1)
        score = np.where(den > 0, num / np.where(den > 0, den, 1), NAN)
    trained = wtr.sum(1) > 0
    score = np.where(trained, score, NAN)
    return score, cols[chosen] if chosen.shape[1] else chosen, beta


def procedure(d: Data, w: np.ndarray, fold_weight: np.ndarray, k: int, alpha: float) -> Run:
    """The leave-one-group-out evaluation on b weightings at once: ``w`` (b, n_models) model
    multiplicities, ``fold_weight`` (b, G) how often each held-out group counts. For each group g,
    the training side is every model of another group (weighted by ``w``), the test side the
    models of g: directions, best features and the small models (``forward_ridge``, at most ``k``
    features, ridge ``alpha``) come from the training side only."""
    b, f, g_count = w.shape[0], d.rho.shape[1], len(d.labels)
    shape = (b, g_count, f)
    out = Run(fold_weight.astype(float), np.full(shape, NAN), np.full(shape, NAN), np.full(shape, NAN),
              np.full(shape, NAN), {}, {}, {}, {})
    for kind in ("spectral", "baseline"):
        out.best[kind] = np.full((b, g_count), -1)
        out.model[kind] = np.full((b, g_count), NAN)
        out.chosen[kind] = np.full((b, g_count, k), -1)
        out.coef[kind] = np.full((b, g_count, k), NAN)
    for g in range(g_count):
        in_train = d.group != g
        wtr, wte = w * in_train, w * ~in_train
        mean_train = _wmean(wtr, d.rho)
        sign = np.where(np.isfinite(mean_train), np.where(mean_train >= 0, 1.0, -1.0), NAN)
        out.sign[:, g], out.train[:, g] = sign, sign * mean_train
        out.test[:, g] = sign * _wmean(wte, d.rho)
        auc = _wmean(wte, d.auc)
        out.test_auc[:, g] = np.where(np.isfinite(sign), np.where(sign > 0, auc, 1 - auc), NAN)
        everywhere = np.isfinite(d.rho[in_train]).all(0) & (in_train.sum() > 0)
        complete = d.complete[in_train].all(0) & everywhere
        for kind in ("spectral", "baseline"):
            mask = everywhere & (d.spectral if kind == "spectral" else ~d.spectral)
            score = np.where(mask[None] & np.isfinite(out.train[:, g]), out.train[:, g], -np.inf)
            best = score.argmax(1)
            out.best[kind][:, g] = np.where(np.isfinite(score[np.arange(b), best]), best, -1)
            score_m, chosen, beta = _fold_model(d, kind, g, wtr, wte, complete, k, alpha)
            out.model[kind][:, g] = score_m
            out.chosen[kind][:, g, :chosen.shape[1]] = chosen
            out.coef[kind][:, g, :beta.shape[1]] = beta
    return out


def bootstrap_weights(d: Data, rng: np.random.Generator, b: int, replicate: str) -> tuple[np.ndarray, np.ndarray]:
    """(b, n) model multiplicities and (b, G) group weights of b bootstrap resamples."""
    g_count = len(d.labels)
    if replicate == "group":
        counts = np.stack([np.bincount(rng.integers(0, g_count, g_count), minlength=g_count) for _ in range(b)])
        return counts[:, d.group].astype(float), counts.astype(float)
    w = np.zeros((b, d.group.size))
    for g in range(g_count):
        idx = np.flatnonzero(d.group == g)
        w[:, idx] = rng.multinomial(idx.size, np.full(idx.size, 1 / idx.size), size=b)
    return w, np.ones((b, g_count))


def over_groups(per_group: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Weighted mean over the group axis (axis 1) of (b, G[, F]) values, NaN groups left out."""
    w = weight if per_group.ndim == 2 else weight[..., None]
    w = np.broadcast_to(w, per_group.shape)
    ok = np.isfinite(per_group) & (w > 0)
    with np.errstate(all="ignore"):
        den = np.where(ok, w, 0).sum(1)
        return np.where(den > 0, np.where(ok, w * np.nan_to_num(per_group), 0).sum(1) / np.where(den > 0, den, 1),
                        NAN)


def summaries(run: Run) -> dict[str, np.ndarray]:
    """Per resample: the per-feature held-out Spearman and AUROC (b, F), the two verdicts'
    differences (b,) and their per-group values (b, G)."""
    b, g_count, _ = run.test.shape
    at = np.arange(b)[:, None], np.arange(g_count)[None, :]

    def chosen(kind: str) -> np.ndarray:
        i = run.best[kind]
        return np.where(i >= 0, run.test[at[0], at[1], np.maximum(i, 0)], NAN)

    feature_diff = chosen("spectral") - chosen("baseline")
    model_diff = run.model["spectral"] - run.model["baseline"]
    return {"spearman": over_groups(run.test, run.weight), "auroc": over_groups(run.test_auc, run.weight),
            FEATURE: over_groups(feature_diff, run.weight), MODEL: over_groups(model_diff, run.weight),
            f"{FEATURE}:groups": feature_diff, f"{MODEL}:groups": model_diff}


def t_interval(value: float, boot: np.ndarray, n_min: float, df: float, target: float = 0.0
               ) -> tuple[float, float, float, float]:
    """(low, high, p "above target", p "below target"): ``value ± t(df) x SE x sqrt(n/(n-1))``,
    SE the standard deviation of the finite resamples; NaN when fewer than half are finite,
    n < 2 or df < 1."""
    ok = boot[np.isfinite(boot)]
    if not (np.isfinite(value) and ok.size >= max(2, boot.size / 2) and n_min >= 2 and df >= 1):
        return NAN, NAN, NAN, NAN
    se = float(np.std(ok, ddof=1)) * math.sqrt(n_min / (n_min - 1))
    half = float(stats.t.ppf(1 - ALPHA / 2, df)) * se
    if se > 0:
        t = (value - target) / se
        p_above, p_below = float(stats.t.sf(t, df)), float(stats.t.cdf(t, df))
    else:
        p_above, p_below = float(value <= target), float(value >= target)
    return value - half, value + half, p_above, p_below


def replicates(d: Data, finite: np.ndarray, replicate: str) -> tuple[float, float, str]:
    """(n, df, note) of an interval from ``finite`` (n_models,): which models have a value.
    Models: n = fewest models of a group with values, df = sum(n_g - 1); groups: n = groups with
    a value, df = groups - 1."""
    counts = np.array([int((finite & (d.group == g)).sum()) for g in range(len(d.labels))])
    have = counts > 0
    if replicate == "group":
        k = int(have.sum())
        return float(k), float(k - 1), "" if k >= 2 else f"{k} held-out group(s) with a value: no interval"
    if have.sum() < 1:
        return NAN, NAN, "no held-out model with a value"
    one = [d.labels[g] for g in np.flatnonzero(counts == 1)]
    note = (f"held-out group(s) {', '.join(one)} have one model with a value: no replicate within them "
            "(hold out coarser groups, or replicate='group')") if one else ""
    return float(counts[have].min()), float((counts[have] - 1).sum()), note


# --- per-feature permutation test ---------------------------------------------------------------

def permuted_per_model(d: Data, rng: np.random.Generator, c: int) -> tuple[np.ndarray, np.ndarray]:
    """(c, n_models, F) per-model Spearman and AUROC of every feature after permuting each model's
    target (and with it the positive class) across its units, c times."""
    n_models, f = d.rho.shape
    rho, auc = np.full((c, n_models, f), NAN), np.full((c, n_models, f), NAN)
    for m, (z, y, pos) in enumerate(zip(d.z, d.y, d.positive)):
        n = y.size
        perm = np.argsort(rng.random((c, n)), axis=1)
        yp, pp = y[perm], pos[perm]                                  # (c, n)
        full = d.complete[m] & np.isfinite(d.rho[m])
        with np.errstate(all="ignore"):
            rho[:, m, full] = (yp @ z[:, full]) / np.sqrt((z[:, full] ** 2).sum(0) * (y @ y))
        n1 = int(pos.sum())
        if 0 < n1 < n:
            ranks = z[:, d.complete[m]] * n + (n + 1) / 2                # (n, F_complete) mid-ranks
            auc[:, m, d.complete[m]] = (pp @ ranks - n1 * (n1 + 1) / 2) / (n1 * (n - n1))
        for j in np.flatnonzero(~d.complete[m]):
            ok = d.finite[m][:, j]
            k = int(ok.sum())
            zy = rank_rows(yp[:, ok]) - (k + 1) / 2                      # the target re-ranked among the finite units
            zx = z[ok, j]
            if np.isfinite(d.rho[m, j]):
                with np.errstate(all="ignore"):
                    rho[:, m, j] = (zy @ zx) / np.sqrt((zy * zy).sum(1) * (zx @ zx))
            p1 = pp[:, ok].sum(1)
            with np.errstate(all="ignore"):
                a = ((pp[:, ok] @ (zx * k + (k + 1) / 2)) - p1 * (p1 + 1) / 2) / (p1 * (k - p1))
            auc[:, m, j] = np.where((p1 > 0) & (p1 < k), a, NAN)
    return rho, auc


def _held_out(d: Data, rho: np.ndarray, auc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(c, F) held-out Spearman and AUROC of every single feature (as ``summaries``) from c sets of
    per-model values ``rho``, ``auc`` (c, n_models, F): each fold's direction the sign of the mean
    training Spearman, the held-out mean over the group's models, then the mean over groups."""
    spear, area = [], []
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for g in range(len(d.labels)):
            train, test = d.group != g, d.group == g
            mean_train = np.nanmean(rho[:, train], axis=1)
            sign = np.where(np.isfinite(mean_train), np.where(mean_train >= 0, 1.0, -1.0), NAN)
            spear.append(sign * np.nanmean(rho[:, test], axis=1))
            a = np.nanmean(auc[:, test], axis=1)
            area.append(np.where(np.isfinite(sign), np.where(sign > 0, a, 1 - a), NAN))
    ones = np.ones((1, len(d.labels)))
    return over_groups(np.stack(spear, axis=1), ones), over_groups(np.stack(area, axis=1), ones)


def permutation_p(d: Data, rng: np.random.Generator, n_permutations: int,
                  cells: int = 2_000_000) -> tuple[np.ndarray, np.ndarray]:
    """(F,) one-sided permutation p-values of "held-out Spearman > 0" and "held-out AUROC > 0.5" per
    feature: each model's target (and positive class) permuted across its units, the whole
    single-feature procedure (directions chosen on the training groups) rerun, p = (1 + #{T* >=
    T}) / (1 + n_permutations). Exact under "the feature is independent of the target in every
    model", whatever the dependence between folds."""
    obs_rho, obs_auc = (v[0] for v in _held_out(d, d.rho[None], d.auc[None]))
    ge_rho, ge_auc = np.zeros(obs_rho.size), np.zeros(obs_rho.size)
    step = max(1, cells // d.rho.size)
    for start in range(0, n_permutations, step):
        rho, auc = _held_out(d, *permuted_per_model(d, rng, min(step, n_permutations - start)))
        ge_rho += (rho >= obs_rho - 1e-12).sum(0)
        ge_auc += (auc >= obs_auc - 1e-12).sum(0)
    p = lambda ge, obs: np.where(np.isfinite(obs), (1 + ge) / (1 + n_permutations), NAN)  # noqa: E731
    return p(ge_rho, obs_rho), p(ge_auc, obs_auc)
