"""SAE ground truth on organisms (``spectral.saes.groundtruth``, ``analysis.sae_groundtruth``): the
vectorised AUROC equals scikit-learn's; a planted variable read by one hand-made feature is
recovered (AUROC near 1) while the best random direction falls clearly short; on organism-xs the
probes are balanced, the final-position z equals a per-prompt reference, and the rows have the
stated sizes and ranges; bad input is one UsageError; the verdict PASSes a planted effect, FAILs
the opposite, and its null simulation stays within the nominal 2.5 %."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score

from analysis.sae_groundtruth import SEED_COLUMNS, VERDICT_COLUMNS, VERDICT_KEY, SeedRecovery, seed_rows, verdicts
from spectral import tables
from spectral.errors import UsageError
from spectral.models.adapter import HeadAdapter
from spectral.organisms.evaluate import load_tasks
from spectral.saes.groundtruth import (
    Probe, RecoveryRow, auroc_matrix, final_z, paired_auroc, probes, recover, recovery, stratified_split,
)
from spectral.saes.metrics import TopKSAE

NOMINAL = 0.025


def within_nominal(k: int, n: int, rate: float = NOMINAL) -> bool:
    """Exact binomial test of "PASS rate <= rate" at level 0.01."""
    return stats.binomtest(k, n, rate, alternative="greater").pvalue >= 0.01


def signed_basis(d: int) -> TopKSAE:
    """2d features: +x_i and -x_i (ReLU'd), all kept (k = d: at most d are positive)."""
    w = torch.cat([torch.eye(d), -torch.eye(d)], 1)
    return TopKSAE(w, torch.zeros(2 * d), w.T.clone(), torch.zeros(d), k=d)


# --- AUROC and split ----------------------------------------------------------------------------

def test_auroc_matrix_and_paired_auroc_equal_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = np.round(rng.normal(size=(40, 6)), 1)  # rounded: many ties
    scores[:, 5] = 0.0  # a constant column: 0.5
    labels = rng.integers(0, 3, 40)
    onehot = labels[:, None] == np.arange(3)[None, :]
    got = auroc_matrix(scores, onehot)
    want = np.array([[roc_auc_score(onehot[:, c], scores[:, f]) for f in range(6)] for c in range(3)])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    assert np.all(got[:, 5] == 0.5)
    batched = np.stack([scores[:, :3], scores[::-1, :3]])  # (2, n, 3): column j scored against class j
    np.testing.assert_allclose(paired_auroc(batched, np.stack([onehot, onehot])),
                               [[roc_auc_score(onehot[:, j], b[:, j]) for j in range(3)] for b in batched], atol=1e-12)


def test_stratified_split_cuts_every_class_in_proportion():
    labels = np.repeat([0, 1, 2], [10, 4, 6])
    s = stratified_split(labels, 0.5, seed=3)
    assert [int((labels[s.selection] == c).sum()) for c in range(3)] == [5, 2, 3]
    assert sorted(np.r_[s.selection, s.evaluation].tolist()) == list(range(20))
    again = stratified_split(labels, 0.5, seed=3)
    assert np.array_equal(s.selection, again.selection)
    assert [int((labels[stratified_split(labels, 0.25, 3).selection] == c).sum()) for c in range(3)] == [2, 1, 2]


# --- a planted variable -------------------------------------------------------------------------

@pytest.mark.parametrize("sign", [1, -1])
def test_a_planted_feature_is_recovered_and_random_directions_fall_short(sign):
    """64-d Gaussian inputs; the variable adds 5 along e = x_0. Feature 0 reads sign x (x_0 - 2.5)
    (firing on the class when sign = +1, off it when -1): it misses a prompt only when the noise
    along e exceeds 2.5 (0.6 %), so its AUROC is about 0.99-1 (measured: 1.0 for +1, 0.995 for -1).
    The other 63 features read random directions at norm 0.25 (below feature 0 in the top 8). A
    random unit direction u carries 5 (u.e) with |u.e| ~ 1/8; the best of 64 scores about 0.83."""
    g = torch.Generator().manual_seed(0)
    n, d = 400, 64
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g)
    x[:, 0] += 5.0 * y
    w = torch.randn(d, d, generator=g)
    w *= 0.25 / w.norm(dim=0, keepdim=True)
    w[:, 0] = 0.0
    w[0, 0] = float(sign)
    b = torch.zeros(d)
    b[0] = -2.5 * sign
    sae = TopKSAE(w, b, w.T.clone(), torch.zeros(d), k=8)
    probe = Probe("planted", ("",) * n, y.numpy(), ("off", "on"), (1,))
    split = stratified_split(probe.labels, 0.5, seed=0)
    cls, var = recover(sae, x, probe, split, model="synthetic", name="planted", layer=0, head=0, random_draws=10,
                       seed=1, n_bootstrap=200)
    assert (cls.scope, cls.positive_class, cls.feature, cls.sign) == ("class", "on", 0, sign)
    assert (cls.n_selection, cls.n_evaluation, cls.n_positive_selection, cls.n_positive_evaluation) == (200, 200, 100,
                                                                                                         100)
    assert cls.auroc >= 0.99 and cls.auroc_low >= 0.98
    assert cls.random_auroc == pytest.approx(0.83, abs=0.03) and cls.random_high < 0.9 and cls.difference > 0.15
    assert (var.scope, var.n_classes, var.feature, var.auroc, var.random_auroc) == (
        "variable", 1, None, cls.auroc, cls.random_auroc)


# --- an organism --------------------------------------------------------------------------------

def test_probes_are_balanced_fresh_and_end_where_the_variable_is_predicted(organism_cache):
    tasks = load_tasks(organism_cache)
    ioi, sentiment = probes(tasks, 64, seed=5)
    assert np.bincount(ioi.labels).tolist() == [4] * 16 and ioi.classes == tuple(tasks["names"])
    assert all(p.endswith(" to") and f" {ioi.classes[c]} " in p for p, c in zip(ioi.prompts, ioi.labels))
    assert np.bincount(sentiment.labels).tolist() == [32, 32] and sentiment.scored == (1,)
    assert all(p.split()[-1] in ("is", "feels") for p in sentiment.prompts)
    assert all((" love" in p) == (c == 1) for p, c in zip(sentiment.prompts, sentiment.labels))
    assert probes(tasks, 64, seed=5)[0].prompts == ioi.prompts != probes(tasks, 64, seed=6)[0].prompts


def test_final_z_equals_each_prompt_run_alone(organism):
    prompts = ["When Mary and John went to the store, John gave a drink to", "I love the apple. It is",
               "Then Bob and Kate had fun at the park. Kate threw the ball to"]
    got = final_z(organism, prompts, [0, 1], batch_size=3)  # one padded batch
    adapter = HeadAdapter(organism.model)
    for i, p in enumerate(prompts):
        ids = organism.tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"]
        alone = adapter.run(ids, sites=["result"], layers=[0, 1])
        for layer in (0, 1):
            torch.testing.assert_close(got[layer][i], alone[(layer, "result")][0, -1].float())


def test_recovery_on_organism_xs_rows(organism):
    saes = {"L1H5": (1, 5, signed_basis(16)), "L0": (0, None, signed_basis(128))}
    rows = recovery(organism, saes, n_prompts=64, seed=7, random_draws=3, n_bootstrap=50)
    assert len(rows) == 2 * (16 + 1) + 2 * (1 + 1)  # per SAE: 16 names + mean; sentiment class + variable
    table = tables.from_rows([r.as_dict() for r in rows], tables.SAE_RECOVERY, "sae_recovery")
    assert table.num_rows == len(rows) and tables.SAE_RECOVERY.names == list(RecoveryRow.__dataclass_fields__)
    for r in rows:
        assert 0.5 <= r.auroc_selection <= 1 and 0 <= r.auroc_low <= r.auroc_high <= 1
        assert 0 <= r.auroc <= 1 and 0 <= r.random_low <= r.random_high <= 1 and r.random_draws == 3
        assert r.difference == pytest.approx(r.auroc - r.random_auroc) and r.prompt_seed == 7
        assert (r.n_selection, r.n_evaluation) == (32, 32)
        assert r.d_in == (16 if r.sae == "L1H5" else 128) and r.d_sae == 2 * r.d_in
    ioi = [r for r in rows if r.variable == "ioi_io" and r.sae == "L1H5"]
    assert [r.scope for r in ioi] == ["class"] * 16 + ["variable"]
    assert all((r.n_positive_selection, r.n_positive_evaluation) == (2, 2) for r in ioi)
    assert all(0 <= r.feature < 32 and r.sign in (1, -1) for r in ioi[:-1])
    assert ioi[-1].auroc == pytest.approx(np.mean([r.auroc for r in ioi[:-1]]))
    assert ioi[-1].random_auroc == pytest.approx(np.mean([r.random_auroc for r in ioi[:-1]]))
    layer_sentiment = next(r for r in rows if (r.sae, r.variable, r.scope) == ("L0", "sentiment", "class"))
    assert (layer_sentiment.positive_class, layer_sentiment.kind, layer_sentiment.head,
            layer_sentiment.n_positive_evaluation) == ("positive", "layer", -1, 16)
    assert layer_sentiment.auroc >= 0.9  # the polarity word is one token back; layer 0's heads carry it


def test_bad_input_is_one_usage_error(organism, neox):
    ok = {"h": (1, 5, signed_basis(16))}
    cases = [
        (lambda: recovery(neox, {"h": (0, 0, signed_basis(16))}), "needs a model organism"),
        (lambda: recovery(organism, {"h": (1, 9, signed_basis(16))}), "head 9 out of range"),
        (lambda: recovery(organism, {"h": (2, 0, signed_basis(16))}), "layer 2 out of range"),
        (lambda: recovery(organism, {"h": (1, 0, signed_basis(8))}), "SAE 'h' reads d_in=8"),
        (lambda: recovery(organism, {}), "no SAEs given"),
        (lambda: recovery(organism, ok, n_prompts=16), "fewer than 2 IOI prompts per name"),
        (lambda: recovery(organism, ok, n_prompts=32, selection_fraction=0.9), "too few prompts for a split"),
        (lambda: recovery(organism, ok, selection_fraction=1.0), "strictly between 0 and 1"),
    ]
    for call, message in cases:
        with pytest.raises(UsageError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


# --- the verdict --------------------------------------------------------------------------------

def seed_of(pop: str, s: int, rng: np.random.Generator, effect: float, noise: float = 0.03,
            select_on_evaluation: bool = False) -> SeedRecovery:
    """Three SAEs per variable, each with a true recoverability q ~ U(0.6, 0.9): selection, SAE
    and random AUROCs are q plus independent noise, the SAE's shifted by ``effect``."""
    rows = []
    for variable in ("ioi_io", "sentiment"):
        for name in ("L0H0", "L1H1", "L1"):
            q = rng.uniform(0.6, 0.9)
            auroc, rand = q + effect + rng.normal(0, noise), q + rng.normal(0, noise)
            sel = auroc if select_on_evaluation else q + effect + rng.normal(0, noise)
            rows.append(dict(sae=name, kind="layer" if name == "L1" else "head", variable=variable, scope="variable",
                             auroc_selection=sel, auroc=auroc, auroc_low=auroc - 0.05, auroc_high=auroc + 0.05,
                             random_auroc=rand, random_sd=noise, difference=auroc - rand))
    return SeedRecovery(f"{pop}?seed={s}", pop, s, rows)


def population(rng, effect: float, **kw) -> list[SeedRecovery]:
    return [seed_of(pop, s, rng, effect, **kw) for pop in ("organism-xs", "organism-s", "organism-m", "organism-l")
            for s in range(5)]


def test_the_seed_row_is_the_sae_chosen_on_the_selection_prompts():
    rows = [dict(sae=n, kind=h, variable="ioi_io", scope="variable", auroc_selection=sel, auroc=a, auroc_low=a,
                 auroc_high=a, random_auroc=0.7, random_sd=0.0, difference=a - 0.7)
            for n, h, sel, a in (("L0H0", "head", 0.8, 0.95), ("L1H1", "head", 0.9, 0.75), ("L1", "layer", 0.85, 0.99))]
    rows.append({**rows[0], "scope": "class"})  # class rows are not read
    s = SeedRecovery("m", "p", 0, rows)
    (row,) = seed_rows(s)
    assert (row["sae"], row["auroc"], row["n_saes"], row["difference"]) == ("L1H1", 0.75, 3, pytest.approx(0.05))
    assert tuple(row) == SEED_COLUMNS
    assert seed_rows(s, "layer")[0]["sae"] == "L1" and seed_rows(s, "head")[0]["sae"] == "L1H1"


def test_a_planted_effect_passes_and_the_opposite_fails():
    rng = np.random.default_rng(0)
    res = verdicts(population(rng, 0.1, noise=0.02))
    assert [r["verdict"] for r in res.verdicts] == ["PASS"] * 8 and len(res.seeds) == 40
    assert all(tuple(r) == VERDICT_COLUMNS and r["key"] == VERDICT_KEY and r["n_seeds"] == 5 for r in res.verdicts)
    assert res.verdicts[0]["correction"].startswith("Holm over 8 (population, variable) claim(s)")
    assert [r["verdict"] for r in verdicts(population(rng, -0.1, noise=0.02)).verdicts] == ["FAIL"] * 8
    one = verdicts([seed_of("p", 0, rng, 0.05)]).verdicts
    assert [(r["verdict"], r["k"]) for r in one] == [("INCONCLUSIVE", 1)] * 2


def test_null_without_an_effect_does_not_pass_above_nominal():
    """200 simulations of 4 populations x 2 variables x 5 seeds with SAE and random AUROCs equal in
    distribution. Holm across the 8 claims bounds the chance that any PASSes by 2.5 %. Measured:
    1 of 200 families with a PASS. Choosing each seed's SAE on the evaluation AUROC instead (the
    selection seeing the scored data) passes in 16 of 200 (8 %): the bias the selection split prevents."""
    rng = np.random.default_rng(1)
    honest = biased = 0
    for _ in range(200):
        honest += any(r["verdict"] == "PASS" for r in verdicts(population(rng, 0.0)).verdicts)
        leaked = verdicts(population(rng, 0.0, select_on_evaluation=True))
        biased += any(r["verdict"] == "PASS" for r in leaked.verdicts)
    assert (honest, biased) == (1, 16) and within_nominal(honest, 200)


def test_bad_verdict_input_is_one_usage_error():
    with pytest.raises(UsageError, match="model 'm': recovery row 0 lacks column 'auroc_selection'"):
        SeedRecovery("m", "p", 0, [dict(sae="a", kind="head", variable="v", scope="variable")])
    with pytest.raises(UsageError, match="kind must be one of all, head, layer"):
        verdicts([seed_of("p", 0, np.random.default_rng(0), 0.0)], kind="heads")
    with pytest.raises(UsageError, match="at least one seed"):
        verdicts([])
