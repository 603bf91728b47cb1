"""Held-out prediction from per-head and per-layer features (``analysis.features``, engine
``analysis.heldout``).

Populations as the organisms have them: 4 populations (organism-xs/s/m/l: 16/12/32/48 heads)
x 5 seeds. A head's importance ~ Beta(0.5, 2) (skewed, like restorations); z is its standardised
value. Features: 5 spectral (``key_raw.*``) and 3 baselines, N(0, 1) unless a test plants one.

- a planted predictor (a spectral feature = -z + small noise) PASSes both verdicts against an
  informative baseline (z + large noise); a shuffled one FAILs; a feature whose relation to
  importance flips between populations (near perfect inside every model, so it would win any
  in-sample comparison) FAILs held out;
- the held-out group's data never reach its fold's choices (replacing them changes no choice);
- null simulations, one per verdict family, with an exact binomial bound on the PASS rate
  (``within_nominal``: fails when P(X >= k | n, 0.025) < 0.01): features independent of importance
  (both verdicts and the per-feature Holm family), spectral and baseline features equally
  informative (both verdicts, PASS and FAIL), and leave-one-model-out (``replicate="group"``). The
  counts measured with these seeds are written next to each assertion; the larger runs (1,000
  simulations each) are quoted in ``analysis/features.py``;
- the fast code (rank rows, AUROC, per-model Spearman, forward selection + ridge) against scipy
  and scikit-learn;
- steering: layer features are min / mean over heads; models with fewer than 4 layers are left
  out, and fewer than 2 populations left give INCONCLUSIVE with the reason;
- bad input: unknown feature, missing columns, one-model groups.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats
from sklearn.linear_model import Ridge
from sklearn.metrics import roc_auc_score

from analysis import heldout
from analysis.features import (
    FEATURE_VERDICT, FOLD_COLUMNS, FEATURE_COLUMNS, MODEL_VERDICT, VERDICT_COLUMNS, Units, evaluate, head_units,
    layer_units,
)
from spectral.errors import UsageError

HEADS = {"organism-xs": 16, "organism-s": 12, "organism-m": 32, "organism-l": 48}
SPECTRAL = ["key_raw.gap", "key_raw.entropy", "scores.gap", "probs.stable_rank", "qk.lambda1_share"]
BASELINE = ["baseline.output_norm", "baseline.attention_entropy", "baseline.wq_norm"]
NOMINAL = 0.025


def within_nominal(k: int, n: int, rate: float = NOMINAL) -> bool:
    """Exact binomial test of "PASS rate <= rate" at level 0.01."""
    return stats.binomtest(k, n, rate, alternative="greater").pvalue >= 0.01


def population(rng, planted=None, baseline=None, heads=HEADS, seeds=5) -> list[Units]:
    """Every model of ``heads`` x ``seeds``; ``planted(z, p, rng)`` -> key_raw.gap and ``baseline(z, rng)``
    -> baseline.output_norm where given (p: the population's index)."""
    out = []
    for p, (pop, n) in enumerate(heads.items()):
        for s in range(seeds):
            imp = rng.beta(0.5, 2.0, n)
            z = (imp - imp.mean()) / imp.std()
            f = {k: rng.normal(size=n) for k in SPECTRAL + BASELINE}
            if planted is not None:
                f["key_raw.gap"] = planted(z, p, rng)
            if baseline is not None:
                f["baseline.output_norm"] = baseline(z, rng)
            out.append(Units(f"{pop}?seed={s}", {"population": pop}, s, "head", f, imp))
    return out


def noisy(scale, sign=1.0):
    return lambda z, *rest: sign * z + scale * rest[-1].normal(size=z.size)


def verdicts(res) -> dict[str, str]:
    return {r["key"]: r["verdict"] for r in res.verdicts}


# --- planted, shuffled, in-sample ---------------------------------------------------------------

def test_a_planted_predictor_passes_and_is_chosen_in_every_fold():
    res = evaluate(population(np.random.default_rng(0), noisy(0.2, -1.0), noisy(2.0)), n_resamples=300,
                   n_permutations=2000)
    assert verdicts(res) == {FEATURE_VERDICT: "PASS", MODEL_VERDICT: "PASS"}
    assert [f["best_spectral"] for f in res.folds] == ["key_raw.gap"] * 4
    assert [f["best_spectral_sign"] for f in res.folds] == [-1] * 4   # small gap = important, chosen in training
    assert all(f["spectral_model"].startswith("key_raw.gap") for f in res.folds)
    gap = next(r for r in res.features if r["feature"] == "key_raw.gap")
    assert gap["spearman"] > 0.9 and gap["auroc"] > 0.9 and gap["significant"]
    assert gap["correction"].startswith("Holm over 8 features")
    row = next(r for r in res.verdicts if r["key"] == FEATURE_VERDICT)
    assert 0.4 < row["value"] < 0.7 and row["low"] > 0 and row["n_groups"] == 4 and row["n_models"] == 20
    assert "Leave-one-population-out" in row["rule"] and "PASS when" in row["rule"]


def test_a_shuffled_predictor_fails_against_an_informative_baseline():
    shuffled = lambda z, p, rng: rng.permutation(z)  # noqa: E731
    res = evaluate(population(np.random.default_rng(1), shuffled, noisy(0.5)), n_resamples=300, n_permutations=500)
    assert verdicts(res) == {FEATURE_VERDICT: "FAIL", MODEL_VERDICT: "FAIL"}
    assert not next(r for r in res.features if r["feature"] == "key_raw.gap")["significant"]


def test_a_feature_that_predicts_only_in_sample_fails():
    """Its relation to importance flips between populations (+ on xs and s, - on m and l): inside every
    model |rho| > 0.9, so chosen and oriented on the test data it would win; chosen on the other
    populations it points the wrong way on every held-out one."""
    flip = lambda z, p, rng: (1 if p < 2 else -1) * z + 0.05 * rng.normal(size=z.size)  # noqa: E731
    models = population(np.random.default_rng(2), flip, noisy(1.0))
    assert min(abs(stats.spearmanr(m.features["key_raw.gap"], m.target).statistic) for m in models) > 0.9
    res = evaluate(models, n_resamples=300, n_permutations=500)
    assert verdicts(res)[FEATURE_VERDICT] == "FAIL"
    gap = next(r for r in res.features if r["feature"] == "key_raw.gap")
    assert gap["spearman"] < -0.5 and not gap["significant"]


def test_the_held_out_group_never_reaches_its_folds_choices():
    """Replacing organism-l's importances and features by fresh noise changes nothing chosen in the
    organism-l fold (directions, best features, training scores, model features and coefficients):
    they are computed from the other populations only. Its held-out scores do change."""
    rng = np.random.default_rng(3)
    models = population(rng, noisy(0.5, -1.0), noisy(1.0))
    other = [Units(m.model, m.groups, m.seed, "head", {k: rng.normal(size=v.size) for k, v in m.features.items()},
                   rng.permutation(m.target)) if m.groups["population"] == "organism-l" else m for m in models]
    a, b = (next(f for f in evaluate(x, n_resamples=20, n_permutations=10).folds if f["held_out"] == "organism-l")
            for x in (models, other))
    chosen = [k for k in FOLD_COLUMNS if k.startswith("best_") and not k.endswith("_test") or
              k.endswith("_model") or k.endswith("_coefficients")]
    assert {k: a[k] for k in chosen} == {k: b[k] for k in chosen}
    assert a["best_spectral_test"] != b["best_spectral_test"]


# --- null simulations ---------------------------------------------------------------------------

def _null_counts(make, n_sims: int, seed: int, **kwargs) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    counts = {"feature PASS": 0, "feature FAIL": 0, "model PASS": 0, "model FAIL": 0, "any feature significant": 0}
    for i in range(n_sims):
        res = evaluate(make(rng), n_resamples=150, n_permutations=1000, seed=i, **kwargs)
        v = verdicts(res)
        for name, key in (("feature", FEATURE_VERDICT), ("model", MODEL_VERDICT)):
            counts[f"{name} PASS"] += v[key] == "PASS"
            counts[f"{name} FAIL"] += v[key] == "FAIL"
        counts["any feature significant"] += any(r["significant"] for r in res.features)
    return counts


def test_null_features_independent_of_importance():
    """Null (i): no feature carries information. Measured: 0 feature PASS, 0 model PASS, 0 Holm
    families with a significant feature in 160."""
    n = 160
    c = _null_counts(lambda rng: population(rng), n, seed=10)
    for family in ("feature PASS", "model PASS", "any feature significant"):
        assert within_nominal(c[family], n), (family, c)


def test_null_spectral_and_baseline_equally_informative():
    """Null (ii): one spectral feature and one baseline are the same noisy copy of importance (-z
    and z + N(0, 1)); the others are noise, so the choices are stable and the difference's spread
    is all sampling. "Spectral beats baseline" must not PASS (nor FAIL) above the nominal rate.
    Measured: feature PASS 1, FAIL 4; model PASS 1, FAIL 3 of 160."""
    n = 160
    c = _null_counts(lambda rng: population(rng, noisy(1.0, -1.0), noisy(1.0)), n, seed=20)
    for family in ("feature PASS", "feature FAIL", "model PASS", "model FAIL"):
        assert within_nominal(c[family], n), (family, c)


def test_null_leave_one_model_out():
    """Null (ii) with one model per hold-out group (6 models of 32-64 heads, e.g. a model family's
    sizes), whole groups resampled (``replicate="group"``). Measured: feature PASS 2, model PASS 1 of 100."""
    n = 100
    heads = {f"pythia-{i}": h for i, h in enumerate((32, 32, 48, 48, 64, 64))}
    c = _null_counts(lambda rng: population(rng, noisy(1.0, -1.0), noisy(1.0), heads=heads, seeds=1), n, seed=30,
                     hold_out="population", replicate="group")
    for family in ("feature PASS", "model PASS"):
        assert within_nominal(c[family], n), (family, c)


def test_within_nominal_allows_monte_carlo_error_only():
    assert within_nominal(9, 160) and not within_nominal(10, 160)
    assert within_nominal(7, 100) and not within_nominal(8, 100)


# --- fast code against plain code ---------------------------------------------------------------

def test_rank_rows_and_auroc_match_scipy_and_sklearn():
    rng = np.random.default_rng(4)
    a = rng.integers(0, 6, (3, 4, 15)).astype(float)   # many ties
    np.testing.assert_array_equal(heldout.rank_rows(a), stats.rankdata(a, axis=-1))
    x, pos = a[0, 0], a[1, 1] > 2
    assert heldout.auroc(x, pos) == pytest.approx(roc_auc_score(pos, x))


def test_per_model_matches_plain_spearman_and_auroc_with_nans():
    rng = np.random.default_rng(5)
    x = np.round(rng.normal(size=(20, 4)), 1)
    x[[2, 7], 1] = np.nan
    x[:, 3] = np.repeat([0.0, 1.0], 10)     # two distinct values: Spearman undefined (NaN)
    y, pos = rng.normal(size=20), np.arange(20) % 3 == 0
    rho, auc, z, ry = heldout.per_model(x, y, pos)
    ok = np.isfinite(x[:, 1])
    for j, mask in ((0, slice(None)), (1, ok), (2, slice(None))):
        assert rho[j] == pytest.approx(stats.spearmanr(x[mask, j], y[mask]).statistic)
        assert auc[j] == pytest.approx(roc_auc_score(pos[mask], x[mask, j]))
    assert np.isnan(rho[3]) and z[2, 1] == 0.0
    np.testing.assert_allclose(ry, (stats.rankdata(y) - 10.5) / 20)


def test_forward_ridge_matches_a_plain_greedy_loop_with_sklearn():
    rng = np.random.default_rng(6)
    blocks = [rng.normal(size=(n, 7)) for n in (12, 20, 9)]
    ys = [b[:, 2] - 0.5 * b[:, 5] + rng.normal(size=len(b)) for b in blocks]
    x, y = np.vstack(blocks), np.concatenate(ys)
    eligible = np.array([True] * 6 + [False])
    chosen: list[int] = []
    for _ in range(3):
        def rss(j):
            fit = Ridge(alpha=1.0, fit_intercept=False).fit(x[:, chosen + [j]], y)
            return ((y - fit.predict(x[:, chosen + [j]])) ** 2).sum()
        chosen.append(min((j for j in range(7) if eligible[j] and j not in chosen), key=rss))
    coef = Ridge(alpha=1.0, fit_intercept=False).fit(x[:, chosen], y).coef_
    got, beta = heldout.forward_ridge((x.T @ x)[None], (x.T @ y)[None], np.array([y @ y]), eligible, 3, 1.0)
    assert got[0].tolist() == chosen and chosen[:2] == [2, 5]
    np.testing.assert_allclose(beta[0], coef, rtol=1e-10)


def test_the_small_models_held_out_score_is_the_spearman_of_its_prediction():
    """The fold row's model test score equals a plain recomputation: ridge on the training models'
    centred ranks (scikit-learn), prediction on each held-out model, scipy Spearman, mean."""
    models = population(np.random.default_rng(7), noisy(0.7, -1.0), noisy(1.0))
    res = evaluate(models, n_resamples=10, n_permutations=10)
    fold = next(f for f in res.folds if f["held_out"] == "organism-s")
    names = fold["spectral_model"].split(",")

    def ranks(m):
        cols = [(stats.rankdata(m.features[n]) - (m.target.size + 1) / 2) / m.target.size for n in names]
        return np.column_stack(cols), (stats.rankdata(m.target) - (m.target.size + 1) / 2) / m.target.size

    train = [ranks(m) for m in models if m.groups["population"] != "organism-s"]
    fit = Ridge(alpha=1.0, fit_intercept=False).fit(np.vstack([t[0] for t in train]),
                                                    np.concatenate([t[1] for t in train]))
    np.testing.assert_allclose([float(c) for c in fold["spectral_model_coefficients"].split(",")], fit.coef_, rtol=1e-3)
    test = [stats.spearmanr(fit.predict(ranks(m)[0]), m.target).statistic
            for m in models if m.groups["population"] == "organism-s"]
    assert fold["spectral_model_test"] == pytest.approx(np.mean(test), abs=1e-9)


def test_a_features_held_out_spearman_and_auroc_are_the_plain_leave_one_out():
    """Per-feature rows against a plain recomputation with scipy and scikit-learn: per fold the sign
    of the mean training Spearman, the mean oriented Spearman (AUROC) over the held-out models, the
    mean over folds."""
    models = population(np.random.default_rng(13), noisy(1.5, -1.0), noisy(1.0))
    res = evaluate(models, n_resamples=10, n_permutations=10)
    pops = list(HEADS)
    for row in res.features[:3] + res.features[-2:]:
        f, spear, area = row["feature"], [], []
        for pop in pops:
            rho = lambda m: stats.spearmanr(m.features[f], m.target).statistic  # noqa: E731
            sign = np.sign(np.mean([rho(m) for m in models if m.groups["population"] != pop]))
            test = [m for m in models if m.groups["population"] == pop]
            spear.append(sign * np.mean([rho(m) for m in test]))
            area.append(np.mean([roc_auc_score(m.positive, sign * m.features[f]) for m in test]))
        assert row["spearman"] == pytest.approx(np.mean(spear), abs=1e-12)
        assert row["auroc"] == pytest.approx(np.mean(area), abs=1e-12)


def test_permuted_per_model_values_are_those_of_the_permuted_target():
    """The permutation test's per-model Spearman and AUROC (columns with and without NaN) equal scipy
    and scikit-learn on the permuted target and its permuted positive class."""
    rng = np.random.default_rng(14)
    x = rng.normal(size=(3, 24, 3))
    x[0, [1, 5, 9], 1] = np.nan
    target = rng.beta(0.5, 2.0, (3, 24))
    positive = [np.arange(24) % 4 == 0] * 3
    d = heldout.prepare(["key_raw.gap", "scores.gap", "baseline.wq_norm"], np.array([True, True, False]),
                        ["a", "b", "c"], list(x), list(target), positive)
    rho, auc = heldout.permuted_per_model(d, np.random.default_rng(0), 4)
    draw = np.random.default_rng(0)
    for m in range(3):
        perm = np.argsort(draw.random((4, 24)), axis=1)
        for c in range(4):
            for j in range(3):
                ok = np.isfinite(x[m, :, j])
                t, p = target[m][perm[c]][ok], positive[m][perm[c]][ok]
                assert rho[c, m, j] == pytest.approx(stats.spearmanr(x[m, ok, j], t).statistic, abs=1e-12)
                assert auc[c, m, j] == pytest.approx(roc_auc_score(p, x[m, ok, j]), abs=1e-12)


# --- rows ---------------------------------------------------------------------------------------

def test_rows_have_the_stable_keys_and_plain_types():
    res = evaluate(population(np.random.default_rng(8)), n_resamples=20, n_permutations=50)
    for rows, keys in ((res.verdicts, VERDICT_COLUMNS), (res.features, FEATURE_COLUMNS), (res.folds, FOLD_COLUMNS)):
        assert rows and all(tuple(r) == keys for r in rows)
        assert all(type(v) in (str, float, int, bool) for r in rows for v in r.values())
    assert len(res.features) == 8 and {r["group"] for r in res.features} == {"spectral", "baseline"}
    assert all(r["positive_class"].startswith("important head: a head is important when") for r in res.features)


# --- steering, layers ----------------------------------------------------------------------------

def _features_table(model: str, layers: int, heads: int, rng) -> pa.Table:
    n = layers * heads
    cols = {"model": [model] * n, "layer": np.repeat(np.arange(layers), heads),
            "head": np.tile(np.arange(heads), layers)}
    cols.update({k: rng.normal(size=n) for k in SPECTRAL + BASELINE})
    return pa.table(cols)


def test_layer_units_aggregate_each_feature_by_min_and_mean():
    t = pa.table({"model": ["m"] * 4, "layer": [0, 0, 1, 1], "head": [0, 1, 0, 1],
                  "key_raw.gap": [0.5, 0.9, np.nan, 0.7], "baseline.wq_norm": [1.0, 3.0, 2.0, 2.0]})
    u = layer_units(t, pa.table({"layer": [0, 1], "effect": [0.2, 0.1]}), groups={"population": "p"},
                    names=["key_raw.gap", "baseline.wq_norm"])
    assert list(u.features) == ["min:key_raw.gap", "mean:key_raw.gap", "min:baseline.wq_norm", "mean:baseline.wq_norm"]
    np.testing.assert_allclose(u.features["min:key_raw.gap"], [0.5, 0.7])
    np.testing.assert_allclose(u.features["mean:key_raw.gap"], [0.7, 0.7])
    np.testing.assert_allclose(u.features["mean:baseline.wq_norm"], [2.0, 2.0])
    assert u.unit == "layer" and u.positive.tolist() == [True, False]


def test_steering_leaves_out_models_with_fewer_than_4_layers():
    """organism-xs (2 layers) and -s (3) are left out; m (4) and l (6) remain: two populations, a
    verdict is taken. Without l only one population remains: INCONCLUSIVE, reason given."""
    rng = np.random.default_rng(9)
    layers = {"organism-xs": 2, "organism-s": 3, "organism-m": 4, "organism-l": 6}
    units = []
    for pop, n_layers in layers.items():
        for s in range(3):
            effect = pa.table({"layer": np.arange(n_layers), "effect": rng.normal(size=n_layers)})
            units.append(layer_units(_features_table(f"{pop}?seed={s}", n_layers, 4, rng), effect,
                                     groups={"population": pop}, seed=s, names=SPECTRAL + BASELINE))
    res = evaluate(units, n_resamples=30, n_permutations=50)
    assert len(res.excluded) == 6 and all("left out of steering" in e for e in res.excluded)
    assert [f["held_out"] for f in res.folds] == ["organism-m", "organism-l"]
    assert all(r["n_models"] == 6 for r in res.verdicts) and all(r["target"] == "steering" for r in res.verdicts)
    res = evaluate([u for u in units if u.groups["population"] != "organism-l"], n_resamples=30, n_permutations=50)
    assert verdicts(res) == {FEATURE_VERDICT: "INCONCLUSIVE", MODEL_VERDICT: "INCONCLUSIVE"}
    assert all("1 population(s) with models of >= 4 layers" in r["note"] for r in res.verdicts)
    assert all(r["positive_class"].startswith("steerable layer") for r in res.features)


# --- bad input ----------------------------------------------------------------------------------

def test_head_units_join_restoration_and_drop_unmeasured_heads():
    rng = np.random.default_rng(10)
    t = _features_table("m", 2, 3, rng)
    heads = pa.table({"layer": [0, 0, 0, 1, 1], "head": [0, 1, 2, 0, 1], "restoration": [0.1, np.nan, 0.3, 0.4, 0.5]})
    u = head_units(t, heads, groups={"population": "p"}, names=SPECTRAL + BASELINE)
    assert u.target.tolist() == [0.1, 0.3, 0.4, 0.5]
    np.testing.assert_array_equal(u.features["key_raw.gap"], np.asarray(t["key_raw.gap"])[[0, 2, 3, 4]])
    assert u.note == "2 of 6 heads dropped (no finite restoration; 1 not in the heads table)"


def test_bad_input_is_one_usage_error():
    rng = np.random.default_rng(11)
    t = _features_table("m", 2, 3, rng)
    heads = pa.table({"layer": [0, 1], "head": [0, 0], "restoration": [0.1, 0.2]})
    with pytest.raises(UsageError, match="unknown feature 'key_raw.gapp'"):
        head_units(t, heads, groups={"population": "p"}, names=["key_raw.gapp"])
    with pytest.raises(UsageError, match="features table lacks column.*'scores.entropy'"):
        head_units(t, heads, groups={"population": "p"}, names=["scores.entropy"])
    with pytest.raises(UsageError, match="heads table lacks column.*'restoration'"):
        head_units(t, heads.drop(["restoration"]), groups={"population": "p"}, names=SPECTRAL)
    with pytest.raises(UsageError, match="no hold-out column 'family'"):
        evaluate(population(rng), hold_out="family")
    with pytest.raises(UsageError, match="at least one spectral and one baseline"):
        evaluate([Units(m.model, m.groups, m.seed, "head", {k: v for k, v in m.features.items() if k in SPECTRAL},
                        m.target) for m in population(rng)])
    for err in (UsageError("x"),):
        assert "\n" not in str(err)


def test_a_held_out_group_of_one_model_gives_no_verdict_under_model_replicates():
    models = population(np.random.default_rng(12), noisy(0.2, -1.0), noisy(2.0))
    models = [m for m in models if m.groups["population"] != "organism-xs" or m.seed == 0]
    res = evaluate(models, n_resamples=30, n_permutations=50)
    assert verdicts(res) == {FEATURE_VERDICT: "INCONCLUSIVE", MODEL_VERDICT: "INCONCLUSIVE"}
    assert all("organism-xs have one model" in r["note"] and "replicate='group'" in r["note"] for r in res.verdicts)
